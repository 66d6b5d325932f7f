"""icl_multihead_softmax: determinism, fused == reference attention, the circuit readout against the forward pass,
the Bayes ridge against Gaussian conditioning, the paired-head softmax expansion against debiased GD (error O(w^3)),
the length behaviour of softmax vs fixed-normalisation linear attention, and bad arguments."""

import functools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, load, run_script

m = load("icl_multihead_softmax")


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert first["results"] == second["results"]
    assert [h["train/loss"] for h in first["history"]] == [h["train/loss"] for h in second["history"]]
    other = m.main(replace(args, seed=1))
    assert other["history"][-1]["train/loss"] != first["history"][-1]["train/loss"]
    assert other["results"][m.main_name(args)] != first["results"][m.main_name(args)]


@pytest.mark.parametrize("n_queries", [1, 3])  # the model's single query, and a general case
def test_fused_equals_reference_outputs_and_gradients(n_queries):
    torch.manual_seed(0)
    q = torch.randn(3, 5, n_queries, 7, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 5, 17, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out_ref, out_fused = m.attention_reference(q, k, v), m.attention_fused(q, k, v)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, (q, k, v), g), torch.autograd.grad(out_ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_whole_model_same_output_and_gradients_on_both_paths():
    torch.manual_seed(0)
    ref = m.OneLayerAttention(5, 4, m.attention_reference).double()
    fused = m.OneLayerAttention(5, 4, m.attention_fused).double()
    fused.load_state_dict(ref.state_dict())
    x, y, xq, yq = (t.double() for t in m.sample_tasks(9, 23, 5, 0.1, torch.Generator().manual_seed(1)))
    z, zq = m.to_tokens(x, y, xq)
    out_ref, out_fused = ref(z, zq), fused(z, zq)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g_ref = torch.autograd.grad((out_ref - yq).pow(2).mean(), list(ref.parameters()))
    g_fused = torch.autograd.grad((out_fused - yq).pow(2).mean(), list(fused.parameters()))
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_tokens_and_task_distribution():
    x, y, xq, yq = m.sample_tasks(200_000, 3, 4, 0.1, torch.Generator().manual_seed(0))
    z, zq = m.to_tokens(x, y, xq)
    assert z.shape == (200_000, 3, 5) and zq.shape == (200_000, 1, 5)
    torch.testing.assert_close(z[..., :4], x)
    torch.testing.assert_close(z[..., 4], y)
    assert (zq[..., 4] == 0).all()
    # beta ~ N(0, I/d) and x ~ N(0, I): E y^2 = E||beta||^2 + sigma^2 = 1.1 for any d
    assert abs(yq.pow(2).mean().item() - 1.1) < 0.02 and abs(y.pow(2).mean().item() - 1.1) < 0.02


def test_circuit_readout_reproduces_the_forward_pass():
    """yhat = sum_h OV_h . sum_l a_l^h z_l with a^h = softmax_l(z_l^T KQ_h z_q / sqrt(E)): the KQ / OV products the
    file reports are exactly what the model computes, on random (untrained) weights."""
    torch.manual_seed(3)
    model = m.OneLayerAttention(4, 3, m.attention_reference).double()
    x, y, xq, _ = (t.double() for t in m.sample_tasks(6, 11, 4, 0.1, torch.Generator().manual_seed(2)))
    z, zq = m.to_tokens(x, y, xq)
    c = m.circuit(model)
    scores = torch.einsum("nle,hef,nf->nhl", z, c["KQ"], zq[:, 0]) / math.sqrt(5)  # (n, H, L)
    by_hand = torch.einsum("nhl,nle,he->n", scores.softmax(-1), z, c["OV"])
    with torch.no_grad():
        torch.testing.assert_close(model(z, zq), by_hand, atol=1e-12, rtol=1e-10)


def _paired_model(d: int, omegas, mus) -> m.OneLayerAttention:
    """Heads with KQ_h = omega_h sqrt(E) on the x-block (0 elsewhere) and OV_h = mu_h e_y: the paper's circuit."""
    E, H = d + 1, len(omegas)
    model = m.OneLayerAttention(d, H, m.attention_reference).double()
    P, ey = torch.diag(torch.tensor([1.0] * d + [0.0], dtype=torch.float64)), torch.zeros(E, dtype=torch.float64)
    ey[d] = 1.0
    with torch.no_grad():
        model.q_proj.weight.copy_(torch.cat([w * math.sqrt(E) * P for w in omegas]))
        model.k_proj.weight.copy_(torch.cat([P] * H))
        model.v_proj.weight.copy_(torch.cat([torch.outer(ey, ey)] * H))
        model.o_proj.weight.copy_(torch.cat([mu * ey for mu in mus])[None])
    return model


def test_readout_recovers_a_planted_circuit():
    c = m.circuit(_paired_model(5, [0.3, -0.2, 0.1], [1.5, -1.0, -0.5]))
    torch.testing.assert_close(c["omega"], torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    torch.testing.assert_close(c["mu"], torch.tensor([1.5, -1.0, -0.5], dtype=torch.float64))
    assert c["offdiag_ratio"].abs().max() < 1e-12 and c["ov_x_sum"] < 1e-12


def test_paired_heads_implement_debiased_gd_up_to_third_order():
    """Softmax expansion: a pair (omega, mu), (-omega, -mu) outputs 2 mu omega (1/L) sum_l y_l (x_l - xbar)^T x_q
    + O(omega^3) (the mean of y and every even order cancel); one head alone keeps mu * ybar and the O(omega^2)."""
    d, L, mu = 5, 40, 1.3
    x, y, xq, _ = (t.double() for t in m.sample_tasks(4000, L, d, 0.1, torch.Generator().manual_seed(7)))
    z, zq = m.to_tokens(x, y, xq)
    dgd, ybar = m.gd_direction(x, y, xq, debiased=True), y.mean(1)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    pair, one = {}, {}
    with torch.no_grad():
        for w in (0.04, 0.02):
            pair[w] = rms(_paired_model(d, [w, -w], [mu, -mu])(z, zq) - 2 * mu * w * dgd)
            one[w] = rms(_paired_model(d, [w], [mu])(z, zq) - mu * ybar - mu * w * dgd)
            assert pair[w] < 0.02 * rms(2 * mu * w * dgd)
    assert 1 / 10 < pair[0.02] / pair[0.04] < 1 / 6.5  # halving omega divides the pair's error by ~8: third order
    assert 1 / 5 < one[0.02] / one[0.04] < 1 / 3  # one head keeps the second-order term ...
    assert rms(mu * ybar) > 50 * pair[0.02]  # ... and the mean-of-y term mu * ybar, which the pair cancels


def test_bayes_ridge_is_the_gaussian_posterior_mean():
    """With beta ~ N(0, I/d), y = X beta + eps: E[y_q | X, y, x_q] = c^T C^{-1} y, C = X X^T / d + sigma^2 I,
    c = X x_q / d (plain Gaussian conditioning, no ridge formula): equals ridge with lambda = sigma^2 d."""
    rng = np.random.default_rng(0)
    d, L, s2 = 5, 7, 0.1
    X, Y, xq = rng.normal(size=(3, L, d)), rng.normal(size=(3, L)), rng.normal(size=(3, d))
    got = m.ridge_predict(*map(torch.from_numpy, (X, Y, xq)), lam=s2 * d).numpy()
    for b in range(3):
        C = X[b] @ X[b].T / d + s2 * np.eye(L)
        np.testing.assert_allclose(got[b], (X[b] @ xq[b] / d) @ np.linalg.solve(C, Y[b]), rtol=1e-10)


def test_gd_directions_and_fitted_step_size():
    rng = np.random.default_rng(1)
    X, Y, xq = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 6)), rng.normal(size=(2, 3))
    for debiased in (False, True):
        got = m.gd_direction(*map(torch.from_numpy, (X, Y, xq)), debiased=debiased).numpy()
        for b in range(2):
            Xc = X[b] - X[b].mean(0) if debiased else X[b]
            np.testing.assert_allclose(got[b], sum(Y[b, l] * Xc[l] @ xq[b] for l in range(6)) / 6, rtol=1e-12)
    s, yq = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    eta = m.fit_eta(s, yq)
    loss = lambda e: (e * s - yq).pow(2).mean()  # noqa: E731
    assert loss(eta) < loss(eta + 1e-3) and loss(eta) < loss(eta - 1e-3)


def test_softmax_ignores_a_duplicated_context_linear_attention_doubles():
    """Why softmax length-generalises: repeating every context pair leaves softmax attention unchanged, while the
    fixed 1/L_train normalisation of linear attention doubles its output."""
    torch.manual_seed(0)
    soft = m.OneLayerAttention(5, 4, m.attention_fused)
    lin = m.OneLayerAttention(5, 4, functools.partial(m.linear_attention, n_norm=40))
    lin.load_state_dict(soft.state_dict())
    x, y, xq, _ = m.sample_tasks(8, 40, 5, 0.1, torch.Generator().manual_seed(0))
    z, zq = m.to_tokens(x, y, xq)
    z2 = torch.cat([z, z], 1)  # (8, 80, 6): the same pairs twice
    with torch.no_grad():
        torch.testing.assert_close(soft(z2, zq), soft(z, zq), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin(z2, zq), 2 * lin(z, zq), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags, words", [
    (["--n-heads", "1"], ["n-heads"]),
    (["--test-lengths", "10", "20"], ["test-lengths", "n-ctx"]),
    (["--noise-var", "-1"], ["noise-var"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("icl_multihead_softmax", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
