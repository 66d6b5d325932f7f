"""deep_learning_theory: quadrature and recursions against closed forms and Monte Carlo, batched ensemble layer and
vmap NTK against literal loops (outputs and gradients), determinism, bad arguments, and (opt-in) the default claim."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, load, run_script

SLUG = "deep_learning_theory"
m = load(SLUG)
CPU = torch.device("cpu")


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, again = m.main(smoke), m.main(smoke)
    assert first["results"] == again["results"]
    other = m.main(replace(smoke, seed=1))
    assert other["results"]["critical"] != first["results"]["critical"]
    key = first["key"]
    assert math.isfinite(first["results"][key["method"]][key["metric"]])
    assert math.isfinite(first["results"][key["baseline"]][key["metric"]])


# ---- fast (batched / vmap) == reference (loops) ----------------------------------------------------------------------
def test_batched_ensemble_layer_matches_the_loop_outputs_and_gradients():
    g = torch.Generator().manual_seed(0)
    M, P, n_in, n_out = 5, 3, 7, 11
    h = torch.randn(M, P, n_in, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(M, n_out, n_in, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(M, n_out, dtype=torch.float64, generator=g, requires_grad=True)
    probe = torch.randn(M, P, n_out, dtype=torch.float64, generator=g)
    outs = {}
    for name, fn in (("fast", m.ensemble_layer_fast), ("reference", m.ensemble_layer_reference)):
        z = fn(h, W, b)
        outs[name] = (z, *torch.autograd.grad((torch.tanh(z) * probe).sum(), (h, W, b)))
    for a, r in zip(outs["fast"], outs["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_whole_ensemble_is_the_same_with_either_layer():
    args = replace(m.PRESETS["smoke"], chunk=7)  # several chunks, one of them ragged
    for act, init in (("relu", "critical"), ("tanh", "torch_default")):
        fast = m.run_ensemble(args, CPU, act, init, 9, 4, 17, tag=3)
        ref = m.run_ensemble(args, CPU, act, init, 9, 4, 17, tag=3, layer_fn=m.ensemble_layer_reference)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
        assert fast.shape == (4, 17, 3)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_vmap_ntk_matches_the_per_example_loop(act):
    g = torch.Generator().manual_seed(1)
    params = m.init_mlp(act, "critical", 5, 9, 3, g, CPU)
    params = tuple(p + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params)  # non-zero biases
    lrs = m.learning_rates(params, 0.7, 1.3)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)
    fast, ref = m.ntk_fast(params, lrs, x, act), m.ntk_reference(params, lrs, x, act)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(fast).min() > -1e-10  # a Gram matrix


def test_gd_step_gradient_matches_autograd_and_the_ntk_predicts_a_small_step():
    g = torch.Generator().manual_seed(2)
    params = m.init_mlp("relu", "critical", 4, 13, 3, g, CPU)
    lrs = m.learning_rates(params, 1.0, 1.0)
    x, y = torch.randn(9, 4, dtype=torch.float64, generator=g), torch.randn(9, dtype=torch.float64, generator=g)
    grads, loss = torch.func.grad_and_value(m.half_mse)(params, x, y, "relu")
    ps = tuple(p.clone().requires_grad_() for p in params)
    ref = torch.autograd.grad(m.half_mse(ps, x, y, "relu"), ps)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-14)
    # one tiny GD step with lambda-scaled rates moves f by -(eta/N) Theta (f - y) to first order (Sec. 7.1)
    eta = 1e-4
    new, _ = m.train(params, lrs, x, y, "relu", 1, eta, torch.func.grad_and_value(m.half_mse))
    df = m.mlp(new, x, "relu") - m.mlp(params, x, "relu")
    predicted = -eta / len(x) * m.ntk_fast(params, lrs, x, "relu") @ (m.mlp(params, x, "relu") - y)
    torch.testing.assert_close(df, predicted, rtol=1e-3, atol=1e-9)


# ---- the maths the method rests on, against independent computations -----------------------------------------------
def test_gauss_hermite_matches_closed_forms_and_brute_force():
    K = 1.7
    relu = m.ACT_NP["relu"]
    assert m.gauss(lambda z: relu(z) ** 2, K) == pytest.approx(K / 2, rel=1e-12)  # <relu^2>_K = K/2
    assert m.gauss(lambda z: relu(z) ** 4, K) == pytest.approx(1.5 * K**2, rel=1e-12)  # <relu^4>_K = 3K^2/2
    # tanh against a fine Riemann sum of the Gaussian density
    z = np.linspace(-12, 12, 200_001) * math.sqrt(K)
    dens = np.exp(-z**2 / (2 * K)) / math.sqrt(2 * math.pi * K)
    brute = np.sum(np.tanh(z) ** 2 * dens) * (z[1] - z[0])
    assert m.gauss(lambda v: np.tanh(v) ** 2, K) == pytest.approx(brute, rel=1e-6)  # 80 nodes: ~1e-7


def test_relu_recursions_by_hand():
    # critical ReLU: K^(l) = C_W |x|^2/n_0 at every depth; C_W=1: halves per layer
    hyp = m.layer_hypers("critical", "relu", 4, 10, 6)
    np.testing.assert_allclose(m.kernel_theory("relu", hyp, 1.3), 2.6, rtol=1e-12)
    low = m.layer_hypers("low", "relu", 4, 10, 6)
    np.testing.assert_allclose(m.kernel_theory("relu", low, 1.0), 0.5 ** np.arange(6), rtol=1e-12)
    # V recursion for ReLU: V^(l+1) = 5 K^2 + V^(l), so 3V/(nK^2) = 15 (l-1)/n, the first-order term of the exact product
    n = 10
    np.testing.assert_allclose(m.kurtosis_theory("relu", hyp, 1.0, n), 15 * np.arange(6) / n, rtol=1e-12, atol=1e-14)
    exact = m.relu_kurtosis_exact(n, 6)
    assert exact[1] == pytest.approx(15 / n) and exact[0] == 0.0
    assert exact[3] == pytest.approx(3 * ((1.5) ** 3 - 1))
    # NTK with lambda/L rates at criticality: Theta^(L) = lambda_b + lambda_W |x|^2/n_0, independent of depth (Ch. 9)
    for L in (2, 5, 9):
        assert m.ntk_theory("relu", m.layer_hypers("critical", "relu", 4, 10, L), 1.3, 0.7, 1.1) == pytest.approx(
            0.7 + 1.1 * 1.3, rel=1e-12)
    # torch default init: C_W = 1/3, C_b = 1/(3 fan_in), which is the variance of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    cw, cb, dist = m.layer_hypers("torch_default", "tanh", 4, 10, 2)[1]
    assert (cw, cb, dist) == (pytest.approx(1 / 3), pytest.approx(1 / 30), "uniform")
    lin = torch.nn.Linear(10, 2000)
    assert lin.weight.var().item() == pytest.approx(cw / 10, rel=0.05)


def test_tanh_critical_kernel_decays_like_one_over_2l():
    hyp = m.layer_hypers("critical", "tanh", 4, 10, 2000)
    K = m.kernel_theory("tanh", hyp, 1.0)
    l = np.array([500, 1000, 2000])
    ratio = K[l - 1] * 2 * l  # -> 1 with log corrections (Sec. 5.3.3)
    assert np.all(np.abs(ratio - 1) < 0.06) and np.all(np.diff(np.abs(ratio - 1)) < 0)


def test_second_layer_kurtosis_by_monte_carlo():
    # Hand-worked l = 2: S = (2/n) sum_j relu(z_j)^2 with z_j ~ N(0, K) iid, so Var S = 5 K^2 / n and kappa_4 = 15/n.
    rng = np.random.default_rng(3)
    n, K = 12, 2.0
    z = rng.standard_normal((400_000, n)) * math.sqrt(K)
    S = 2 / n * (np.maximum(z, 0) ** 2).sum(1)
    assert 3 * S.var() / S.mean() ** 2 == pytest.approx(15 / n, rel=0.02)
    # and the measurement identity: z^(2) = sqrt(S) g has E z^4 = 3 E S^2, so raw z^4 gives the same kappa_4
    z2 = np.sqrt(S) * rng.standard_normal(len(S))
    assert (z2**4).mean() / (z2**2).mean() ** 2 - 3 == pytest.approx(15 / n, abs=0.06)
    # tanh at l = 2: the V recursion's first step is exactly 3 C_W^2 Var(tanh^2)/(n K^2) with K^(2) = <tanh^2>
    hyp = m.layer_hypers("critical", "tanh", 4, n, 2)
    th = np.tanh(rng.standard_normal((400_000, n)))  # K^(1) = 1
    S = (th**2).mean(1)
    assert m.kurtosis_theory("tanh", hyp, 1.0, n)[1] == pytest.approx(3 * S.var() / S.mean() ** 2, rel=0.03)


def test_arc_cosine_map_matches_monte_carlo():
    rng = np.random.default_rng(4)
    for rho in (-0.5, 0.3, 0.9):
        u, v = rng.standard_normal((2, 2_000_000))
        za, zb = u, rho * u + math.sqrt(1 - rho**2) * v
        mc = 2 * np.mean(np.maximum(za, 0) * np.maximum(zb, 0))  # C_W = 2, K = 1: the next correlation
        assert m.relu_correlation_theory(rho, 2)[1] == pytest.approx(mc, abs=3e-3)


def test_small_ensemble_agrees_with_the_exact_relu_moments():
    args = replace(m.PRESETS["smoke"], nets=3000, chunk=1000, bootstrap=50)
    S = m.run_ensemble(args, CPU, "relu", "critical", 24, 4, 3000, tag=0)
    st = m.ensemble_stats(S, args, 0)
    np.testing.assert_allclose(st["mean"], 2.0, rtol=0.05)  # E[S^(l)] = K^(1) = 2 exactly for ReLU, C_b = 0
    exact = m.relu_kurtosis_exact(24, 4)
    assert st["kappa"][0] == pytest.approx(0.0, abs=1e-9)  # S^(1) is deterministic: layer 1 is exactly Gaussian
    assert np.all(np.abs(st["kappa"][1:] - exact[1:]) < 4 * st["kappa_se"][1:] + 0.05)


# ---- bad arguments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--rho0", "1.5"], "rho0"),
    (["--ntk-depths", "4"], "ntk-depths"),
    (["--widths", "1", "8"], "widths"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


def test_validate_rejects_other_bad_values():
    for bad, word in ((dict(nets=3), "nets"), (dict(lr=0.0), "learning"), (dict(ntk_points=999), "ntk-points"),
                      (dict(depth_ratio=0.0), "depth-ratio")):
        with pytest.raises(m.shared.UsageError, match=word):
            m.validate(replace(m.Args(), **bad))


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
