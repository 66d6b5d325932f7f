"""random_feature_attention: determinism, fused == reference attention (ReLU and softmax, outputs and gradients),
the model is linear in its values (output = explicit feature matrix x trained weights, features built by hand),
the closed-form ridge against gradient descent, permutation invariance of the targets and of RFA, bad arguments."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

m = load("random_feature_attention")


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert without_timing(first["results"]) != without_timing(other["results"])
    assert set(first["results"]) >= {"RFA", "BRFA c=2", "RF-MLP", "RFA softmax"}


def random_inputs(B=3, M=5, N=7, D=9, Dv=4, shared_values=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 1 if shared_values else M, N, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("activation", ["relu", "softmax"])
@pytest.mark.parametrize("shared_values", [False, True])
def test_fused_equals_reference_outputs_and_gradients(activation, shared_values):
    q, k, v = random_inputs(shared_values=shared_values)
    ref = m.attention_reference(q, k, v, activation)
    fused = m.attention_fused(q, k, v, activation)
    assert ref.shape == (3, 5, 4)
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fused, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_reference_is_the_written_formula():
    """One head, one sequence, by hand: sum_i relu(<q, k_i>) v_i / N, and the softmax-weighted sum."""
    q, k, v = random_inputs(B=1, M=1, N=5, D=3, Dv=2)
    s = [float(q[0, 0].detach() @ k[0, i].detach()) for i in range(5)]
    relu_out = sum(max(si, 0.0) * v[0, 0, i] for i, si in enumerate(s)) / 5
    w = np.exp(s) / np.exp(s).sum()
    soft_out = sum(w[i] * v[0, 0, i] for i in range(5))
    torch.testing.assert_close(m.attention_reference(q, k, v, "relu")[0, 0], relu_out)
    torch.testing.assert_close(m.attention_reference(q, k, v, "softmax")[0, 0], soft_out)


def tiny_model(attn, bias_c=2.0, activation="relu", heads=6, d=5):
    torch.manual_seed(0)
    return m.RandomFeatureAttention(m.sample_qk(heads, d, 0.5, bias_c, "cpu"), m.ATTENTION[attn], activation)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_whole_model_same_output_on_both_paths(activation):
    ref, fused = tiny_model("reference", activation=activation), tiny_model("fused", activation=activation)
    torch.nn.init.normal_(ref.V)
    fused.load_state_dict(ref.state_dict())
    X = m.sample_sequences(11, 7, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused(X), ref(X), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(fused.features(X), ref.features(X), atol=1e-12, rtol=1e-10)


def explicit_features(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """phi_m(X) = (1/N) sum_i relu(x~_0^T W_m x~_i) x~_i with plain loops, no torch."""
    n, N1, d = X.shape
    Xt = np.concatenate([X, np.ones((n, N1, 1))], -1)
    out = np.zeros((n, W.shape[0], d + 1))
    for j in range(n):
        for mm in range(W.shape[0]):
            for i in range(1, N1):
                out[j, mm] += max(Xt[j, 0] @ W[mm] @ Xt[j, i], 0.0) * Xt[j, i] / (N1 - 1)
    return out.reshape(n, -1)


@pytest.mark.parametrize("attn", ["fused", "reference"])
def test_model_output_is_the_feature_matrix_times_the_trained_weights(attn):
    model = tiny_model(attn)
    X_tr = m.sample_sequences(120, 7, 5, torch.Generator().manual_seed(2))
    X_te = m.sample_sequences(9, 7, 5, torch.Generator().manual_seed(3))
    y = torch.stack([m.targets(X_tr)[t] for t in m.TARGET_NAMES], 1)  # (120, 4)
    w, b, lams, _ = m.fit_ridge(model.features(X_tr).detach(), y, m.Args())
    assert all(lam in m.Args().lambdas for lam in lams)
    Phi = explicit_features(model.W.numpy(), X_te.numpy())  # (9, M (d+1))
    np.testing.assert_allclose(model.features(X_te).detach().numpy(), Phi, atol=1e-12)
    for j in range(len(m.TARGET_NAMES)):
        model.set_weights(w[:, j], b[j].item())
        np.testing.assert_allclose(model(X_te).detach().numpy(), Phi @ w[:, j].numpy() + b[j].item(), atol=1e-10)


def test_trained_values_live_on_the_device_of_the_frozen_weights():
    """V and b follow W (a CUDA run once failed with V left on the CPU); the meta device shows it without a GPU."""
    model = m.RandomFeatureAttention(torch.zeros(3, 5, 5, dtype=torch.float64, device="meta"), m.ATTENTION["fused"])
    assert {t.device.type for t in (model.W, model.V, model.b)} == {"meta"}
    assert model.V.dtype == model.b.dtype == torch.float64


def test_closed_form_ridge_matches_gradient_descent_primal_and_dual():
    g = torch.Generator().manual_seed(4)
    Z, Y = torch.randn(15, 6, generator=g, dtype=torch.float64), torch.randn(15, 2, generator=g, dtype=torch.float64)
    lam = 0.3
    primal = m.ridge_path(Z, Y, [lam])[0]  # p = 6 <= n = 15: primal form
    dual = m.ridge_path(Z.T.contiguous(), Y[:6], [lam])[0]  # p = 15 > n = 6: dual form
    b = torch.zeros(6, 2, dtype=torch.float64, requires_grad=True)
    smooth = 2 * (torch.linalg.eigvalsh(Z.T @ Z / 15).max().item() + lam)  # Lipschitz constant of the gradient
    opt = torch.optim.SGD([b], lr=1 / smooth)
    for _ in range(5000):  # plain GD on (1/n) ||Y - Z b||^2 + lam ||b||^2, each column of Y its own problem
        opt.zero_grad()
        ((Y - Z @ b).pow(2).sum() / 15 + lam * b.pow(2).sum()).backward()
        opt.step()
    torch.testing.assert_close(primal, b.detach(), atol=1e-9, rtol=1e-7)
    Zd = Z.T.contiguous()
    direct = torch.linalg.solve(Zd.T @ Zd / 6 + lam * torch.eye(15, dtype=torch.float64), Zd.T @ Y[:6] / 6)
    torch.testing.assert_close(dual, direct, atol=1e-10, rtol=1e-8)


def test_targets_and_rfa_are_permutation_invariant_rf_mlp_is_not():
    X = m.sample_sequences(50, 6, 4, torch.Generator().manual_seed(5))
    perm = torch.tensor([0, 3, 6, 1, 5, 2, 4])  # shuffle the keys, keep the query x_0 first
    Xp = X[:, perm]
    for name, y in m.targets(X).items():
        torch.testing.assert_close(m.targets(Xp)[name], y, msg=name)
    rfa = tiny_model("fused", d=4)
    torch.nn.init.normal_(rfa.V)
    torch.testing.assert_close(rfa(Xp), rfa(X))
    torch.manual_seed(0)
    mlp = m.RandomFeatureMLP(20, 6, 4, "cpu")
    torch.nn.init.normal_(mlp.a)
    assert (mlp(Xp) - mlp(X)).abs().max() > 1e-3  # the baseline sees the order of the flattened sequence
    swap = X.clone()
    swap[:, [0, 1]] = X[:, [1, 0]]  # the query is special: swapping it with a key changes the targets
    assert (m.targets(swap)["he3"] - m.targets(X)["he3"]).abs().max() > 1e-3


def test_scores_have_unit_scale_and_brfa_mean_is_c_times_the_inner_product():
    """t = sqrt(d) <x_0, x_i> has E t^2 = 1 exactly on the sphere, so he2 has mean 0 and lin variance 1/N; the
    zero-mean score x~_0^T W_m x~_i has variance w_std^2 ||x~_0||^2 ||x~_i||^2 = 1; and BRFA's W_m minus RFA's W_m
    (same seed) is c [[I,0],[0,0]]."""
    X = m.sample_sequences(40_000, 4, 6, torch.Generator().manual_seed(6))
    y = m.targets(X)
    assert abs(y["he2"].mean()) < 0.02 and abs(y["lin"].var() * 4 - 1) < 0.05
    torch.manual_seed(7)
    W0 = m.sample_qk(3, 6, 0.5, 0.0, "cpu")
    torch.manual_seed(7)
    W2 = m.sample_qk(3, 6, 0.5, 2.0, "cpu")
    mean = torch.zeros(7, 7, dtype=torch.float64)
    mean[:6, :6] = 2 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(W2 - W0, mean.expand(3, 7, 7))
    torch.manual_seed(8)
    W = m.sample_qk(4000, 6, 0.5, 0.0, "cpu")
    xt = m.lift(X[:1, :2])[0]  # two lifted tokens, ||x~||^2 = 2
    s = torch.einsum("a,mab,b->m", xt[0], W, xt[1])
    assert abs(s.var().item() - 0.25 * 2 * 2) < 0.1


@pytest.mark.parametrize("flags, words", [
    (["--n-train", "500", "100"], ["n-train"]),
    (["--w-std", "0"], ["w-std"]),
    (["--heads", "0"], ["heads"]),
    (["--repeats", "0"], ["repeats"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("random_feature_attention", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
    assert math.isfinite(record["results"]["RFA"][record["key"]["metric"]])
