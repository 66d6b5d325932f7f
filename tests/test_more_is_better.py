"""more_is_better: eigenframework vs an independent brentq solver and its own defining equations, the KRR limit,
Monte Carlo RF risk vs theory, eigh-once ridge sweep == per-ridge solves, the arc-cosine kernel vs sampled ReLU
features, determinism, bad arguments, CIFAR --data-dir files, and (opt-in) the claim at the default preset."""

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script

SLUG = "more_is_better"
m = load(SLUG)
CPU = torch.device("cpu")


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, again = m.main(smoke), m.main(smoke)
    assert first["results"] == again["results"]
    other = m.main(replace(smoke, seed=1))
    key = first["key"]
    assert other["results"][key["method"]][key["metric"]] != first["results"][key["method"]][key["metric"]]
    assert math.isfinite(first["results"][key["method"]][key["metric"]])
    assert math.isfinite(first["results"][key["baseline"]][key["metric"]])


# ---- fast == reference ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k", [(23, 61), (37, 11)])  # over- and under-parameterised (rank-deficient Gram)
def test_ridge_sweep_equals_one_solve_per_ridge(n, k):
    g = torch.Generator().manual_seed(0)
    F = torch.randn(n, k, dtype=torch.float64, generator=g)
    K, y = F @ F.T / k, torch.randn(n, dtype=torch.float64, generator=g)
    ridges = torch.tensor([0.0, 1e-3, 0.1, 7.0], dtype=torch.float64)
    (a_fast, tr_fast), (a_ref, tr_ref) = m.ridge_sweep(K, y, ridges), m.ridge_sweep_reference(K, y, ridges)
    torch.testing.assert_close(a_fast, a_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(tr_fast, tr_ref, rtol=1e-8, atol=1e-12)
    if k > n:  # ridgeless interpolates when the Gram has full rank
        assert tr_fast[0].item() < 1e-20
    else:  # ridgeless = least squares on k features: residual orthogonal to the features
        resid = y - K @ a_fast[:, 0]
        assert (F.T @ resid).abs().max().item() < 1e-9


def test_vectorised_eigenframework_matches_brentq_reference():
    lam, v2 = m.power_law(1.3, 1.7, 500, CPU)
    n = np.array([20, 20, 50, 80, 80, 33, 64])
    k = np.array([60, 7, 50, np.inf, 300, 17, 64])
    d = np.array([1e-3, 0.0, 0.5, 0.0, 2.0, 1e-5, 1e-2])
    fast = m.theory_cells(m.rf_theory, lam, v2, n, k, d, 0.01)
    ref = m.rf_theory_reference(lam, v2, n, k, d, 0.01)
    for key in ("test", "train", "gamma", "kappa"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-8, atol=1e-14)


@pytest.mark.slow
def test_compiled_eigenframework_matches_eager():
    lam, v2 = m.power_law(1.2, 1.4, 300, CPU)
    n, k, d = (torch.tensor(a, dtype=torch.float64) for a in ([20.0, 50.0], [80.0, 30.0], [0.0, 0.1]))
    eager = m.rf_theory(lam, v2, n, k, d, 0.0)["test"]
    torch.testing.assert_close(torch.compile(m.rf_theory)(lam, v2, n, k, d, 0.0)["test"], eager, rtol=1e-10, atol=0)


# ---- the maths the method rests on, against independent computations -----------------------------------------------
def test_solution_satisfies_the_papers_two_coupled_equations():
    lam, v2 = m.power_law(1.5, 1.2, 800, CPU)
    n, k, d = np.array([40.0, 100.0, 60.0]), np.array([150.0, 30.0, 60.0]), np.array([0.05, 1.0, 1e-3])
    th = m.theory_cells(m.rf_theory, lam, v2, n, k, d, 0.0)
    g, kap = th["gamma"], th["kappa"]
    z = (lam[None] / (lam[None] + g[:, None])).sum(1)
    # n = sum_i lambda_i/(lambda_i + gamma) + delta/kappa  and  k = sum_i lambda_i/(lambda_i + gamma) + k kappa/gamma
    torch.testing.assert_close(z + torch.tensor(d) / kap, torch.tensor(n), rtol=1e-10, atol=0)
    torch.testing.assert_close(z + torch.tensor(k) * kap / g, torch.tensor(k), rtol=1e-10, atol=0)
    # E_tr / E_te = (delta / (n kappa))^2
    torch.testing.assert_close(th["ratio"], (torch.tensor(d) / (torch.tensor(n) * kap)) ** 2, rtol=1e-8, atol=0)


def test_large_k_tends_to_the_krr_eigenframework():
    lam, v2 = m.power_law(1.2, 1.4, 1000, CPU)
    n, d = 64.0, 1e-2
    # KRR by hand: kappa solves n = sum_i lambda_i/(lambda_i + kappa) + delta/kappa, E = n/(n - q) sum (1-L)^2 v^2
    from scipy.optimize import brentq

    lam_np, v2_np = lam.numpy(), v2.numpy()
    kappa = brentq(lambda c: np.sum(lam_np / (lam_np + c)) + d / c - n, 1e-12, 1e6, xtol=1e-15)
    L = lam_np / (lam_np + kappa)
    krr = n / (n - np.sum(L**2)) * np.sum((1 - L) ** 2 * v2_np)
    inf = m.theory_cells(m.rf_theory, lam, v2, n, np.inf, d, 0.0)["test"].item()
    assert inf == pytest.approx(krr, rel=1e-9)
    big = m.theory_cells(m.rf_theory, lam, v2, n, np.array([1e3, 1e5, 1e7]), d, 0.0)["test"].numpy()
    assert np.all(np.diff(big) < 0) and big[-1] == pytest.approx(krr, rel=1e-4)  # more features: closer, and better


def test_monte_carlo_rf_risk_matches_the_eigenframework():
    # Gaussian RF: average the exact population MSE of the RF predictor over many draws of data and features
    args = replace(m.PRESETS["smoke"], modes=200, ns=(40,), ks=(20, 120), ridges=(0.05,), trials=60, fixed_n=40,
                   fixed_k=20)
    lam, v2 = m.power_law(1.4, 1.6, 200, CPU)
    A = m.gaussian_rf_grid(args, CPU, lam, v2, 0.0)
    th = m.theory_cells(m.rf_theory, lam, v2, 40.0, np.array([[20.0], [120.0]]), A["ridges"].numpy()[None], 0.0)
    emp = A["test"][0].reshape(-1)
    rel = ((emp - th["test"]) / th["test"]).abs()
    assert rel.max().item() < 0.08, (emp, th["test"])  # n = 40, k = 20 / 120, both ridges: finite-size gap < 8%
    krr = m.theory_cells(m.rf_theory, lam, v2, 40.0, np.inf, A["ridges"].numpy(), 0.0)["test"]
    assert ((A["krr_test"][0] - krr).abs() / krr).max().item() < 0.05


def test_arccos_kernel_is_the_relu_feature_expectation():
    g = torch.Generator().manual_seed(3)
    X = torch.rand(5, 7, dtype=torch.float64, generator=g)
    X[1] = -X[0]  # an opposite pair: angle pi, kernel 0
    W = torch.randn(400_000, 7, dtype=torch.float64, generator=g) * math.sqrt(2 / 7)
    feats = torch.relu(X @ W.T)  # (5, k)
    mc = feats @ feats.T / W.shape[0]
    exact = m.arccos_kernel(X, X)
    assert ((mc - exact).abs().max() / exact.max()).item() < 0.01
    torch.testing.assert_close(torch.diag(exact), (X * X).sum(1) / 7)  # t = 0: |x|^2 / d
    assert abs(exact[0, 1].item()) < 1e-12


def test_pool_eigenstructure_reproduces_the_kernel_and_target():
    g = torch.Generator().manual_seed(4)
    X = torch.rand(30, 6, dtype=torch.float64, generator=g)
    y = torch.sign(torch.randn(30, dtype=torch.float64, generator=g))
    K = m.arccos_kernel(X, X)
    lam, v2 = m.eigenstructure(K, y)
    assert lam.sum().item() == pytest.approx(torch.trace(K).item() / 30, rel=1e-10)
    assert v2.sum().item() == pytest.approx(1.0, rel=1e-10)  # sum_i v_i^2 = mean(y^2) = 1
    assert torch.all(lam[:-1] >= lam[1:])


def test_power_law_exponents_are_recovered():
    lam, v2 = m.power_law(1.7, 1.9, 5000, CPU)
    a, b = m.fit_exponents(lam, v2)
    assert a == pytest.approx(1.7, abs=1e-9) and b == pytest.approx(1.9, abs=0.05)


def test_interpolation_is_optimal_when_beta_exceeds_alpha_and_not_otherwise():
    # Sec. 5: noiseless power law with beta >= alpha -> delta* = 0; beta < alpha -> a small positive delta*
    lam, v2 = m.power_law(1.5, 2.0, 3000, CPU)
    assert m.theory_optimum(m.rf_theory, lam, v2, [200], [np.inf], 0.0)["delta"][0] == 0.0
    lam, v2 = m.power_law(2.0, 1.3, 3000, CPU)
    opt = m.theory_optimum(m.rf_theory, lam, v2, [200], [np.inf], 0.0)
    assert opt["delta"][0] > 0 and 0 < opt["ratio"][0] < 0.5


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--ns", "64", "32"], "ns"),
    (["--tasks", "1.2-1.4"], "alpha:beta"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


@pytest.mark.parametrize("change, word", [
    (dict(modes=500), "modes"),
    (dict(fixed_n=100), "fixed-n"),
    (dict(alpha=0.8), "alpha > 1"),
    (dict(ks=(256, 512)), "k <= n/2"),
    (dict(ridges=(0.0, 1.0)), "positive"),
])
def test_bad_values_raise_usage_errors(change, word):  # the same validate() that the script runs, in process
    with pytest.raises(shared.UsageError, match=word.replace("(", r"\(")):
        m.validate(replace(m.Args(), **change))


def write_batch(path, data, labels):
    with open(path, "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels}, fh)


def test_missing_cifar_batches_is_a_usage_error(tmp_path):
    assert_usage_error(run_script(SLUG, "--data-dir", tmp_path, "--preset", "smoke"), "no CIFAR-10 batches")


@pytest.mark.parametrize("content, word", [
    (b"not a pickle", "cannot read"),
    ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, "(N, 3072)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}, "0..9"),
    ({b"labels": [0]}, "cannot read"),
])
def test_malformed_cifar_batches_name_the_file(tmp_path, content, word):
    path = tmp_path / "data_batch_1"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with open(path, "wb") as fh:
            pickle.dump(content, fh)
    with pytest.raises(shared.UsageError, match=r"(?i)" + word.replace("(", r"\(").replace(")", r"\)")) as err:
        m.load_cifar_pool(replace(m.Args(), data_dir=str(tmp_path)), CPU)
    assert "data_batch_1" in str(err.value)


def test_well_formed_cifar_batches_load_and_run(tmp_path):
    rng = np.random.default_rng(5)
    write_batch(tmp_path / "data_batch_1", rng.integers(0, 256, (150, 3072), dtype=np.uint8), list(range(10)) * 15)
    write_batch(tmp_path / "test_batch", rng.integers(0, 256, (50, 3072), dtype=np.uint8), [7] * 50)
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path), out_dir=str(tmp_path), pool_size=180)
    X, y = m.load_cifar_pool(args, CPU)
    assert X.shape == (180, 3072) and torch.allclose(X.mean(1), torch.zeros(180, dtype=torch.float64), atol=1e-12)
    assert y[:10].tolist() == [1, 1, -1, -1, -1, -1, -1, 1, 1, 1] and (y[150:] == 1).all()
    record = m.main(args)
    assert "CIFAR-10/n32/test_mse_opt" in record["results"]["rf_wide"]


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
