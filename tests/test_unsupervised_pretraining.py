"""unsupervised_pretraining: PPCA vs sklearn and vs the likelihood, exact factor-model risks vs Monte Carlo, the
oracle OLS formulas, EM (E-step by hand, monotone likelihood, batched == loop), the unseen-cluster formula, ridge/CV by
brute force, determinism, bad arguments, and (opt-in) the claim at the default preset."""

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script

SLUG = "unsupervised_pretraining"
m = load(SLUG)
CPU = torch.device("cpu")
DT = torch.float64


def small_factor(d=9, r=3, snr=3.0, seed=0):
    return m.make_factor_model(replace(m.Args(), fa_d=d, fa_r=r, fa_snr=snr, seed=seed), CPU)


def factor_draws(fm, T, N, key):
    draws = [m.sample_factor(fm, N, m.generator(CPU, key, t)) for t in range(T)]
    return torch.stack([a for a, _ in draws]), torch.stack([b for _, b in draws])


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, again = m.main(smoke), m.main(smoke)
    assert first["results"] == again["results"]
    other = m.main(replace(smoke, seed=1))
    assert other["results"] != first["results"]
    key = first["key"]
    for role in ("method", "baseline"):
        assert math.isfinite(first["results"][key[role]][key["metric"]])


# ---- fused (batched over trials) == reference (one trial at a time) -------------------------------------------------
def test_batched_ppca_matches_the_numpy_loop():
    x, _ = factor_draws(small_factor(d=11, r=3), T=3, N=37, key=1)
    B1, s1 = m.ppca_fit(x, 3)
    B0, s0 = m.ppca_fit_loop(x, 3)
    # B is defined up to a rotation (and eigenvector signs): compare B B^T
    torch.testing.assert_close(B1 @ B1.transpose(1, 2), B0 @ B0.transpose(1, 2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s1, s0, rtol=1e-12, atol=1e-14)


def test_batched_em_matches_the_per_trial_loop():
    gm = m.make_gmm(replace(m.Args(), gmm_d=7, gmm_k=5, gmm_c=2), CPU)
    x = torch.stack([m.sample_gmm(gm, 53, m.generator(CPU, 2, t))[0] for t in range(3)])  # (3, 53, 7)
    mu0 = m.kmeanspp(x, 5, m.generator(CPU, 3))
    mu, lp = mu0, torch.full((3, 5), -math.log(5), dtype=DT)
    for _ in range(25):
        mu, lp, _ = m.em_step(x, mu, lp)
    torch.testing.assert_close(mu, m.em_run_loop(x, mu0, 25), rtol=1e-9, atol=1e-9)


def test_batched_ols_and_ridge_match_direct_solves():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 17, 6, dtype=DT, generator=g), torch.randn(3, 17, dtype=DT, generator=g)
    for t in range(3):
        ref = np.linalg.lstsq(x[t].numpy(), y[t].numpy(), rcond=None)[0]
        np.testing.assert_allclose(m.ols(x, y)[t].numpy(), ref, rtol=1e-10, atol=1e-12)
    lams = torch.tensor([0.01, 1.0, 30.0], dtype=DT)
    xw = torch.randn(2, 5, 9, dtype=DT, generator=g)  # n < d: the SVD path must still be exact
    yw = torch.randn(2, 5, dtype=DT, generator=g)
    for xx, yy in ((x, y), (xw, yw)):
        path = m.ridge_path(xx, yy, lams)
        for t in range(xx.shape[0]):
            for j, lam in enumerate(lams):
                A = xx[t].T @ xx[t] + lam * torch.eye(xx.shape[2], dtype=DT)
                torch.testing.assert_close(path[t, j], torch.linalg.solve(A, xx[t].T @ yy[t]), rtol=1e-9, atol=1e-11)


def test_ridge_cv_picks_the_brute_force_lambda():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 13, 4, dtype=DT, generator=g), torch.randn(2, 13, dtype=DT, generator=g)
    lams = torch.logspace(-2, 3, 6, dtype=DT)
    folds = np.array_split(np.arange(13), 4)
    for t in range(2):
        errs = []
        for lam in lams.tolist():
            e = 0.0
            for part in folds:
                keep = np.setdiff1d(np.arange(13), part)
                X, Y = x[t, keep].numpy(), y[t, keep].numpy()
                w = np.linalg.solve(X.T @ X + lam * np.eye(4), X.T @ Y)
                e += ((x[t, part].numpy() @ w - y[t, part].numpy()) ** 2).sum()
            errs.append(e)
        assert m.ridge_cv_choice(x, y, lams, 4)[t].item() == int(np.argmin(errs))


@pytest.mark.slow
def test_compiled_em_step_matches_eager():
    g = torch.Generator().manual_seed(6)
    x, mu = torch.randn(2, 31, 5, dtype=DT, generator=g), torch.randn(2, 3, 5, dtype=DT, generator=g)
    lp = torch.full((2, 3), -math.log(3), dtype=DT)
    for a, b in zip(torch.compile(m.em_step)(x, mu, lp), m.em_step(x, mu, lp)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- the maths the method rests on, against independent computations -----------------------------------------------
def test_ppca_matches_sklearn_pca_covariance():
    from sklearn.decomposition import PCA

    x, _ = factor_draws(small_factor(d=10, r=3), T=1, N=400, key=7)
    xc = x[0] - x[0].mean(0)  # sklearn centres and divides by m - 1; ours is uncentred and divides by m
    B, s2 = m.ppca_fit(xc[None], 3)
    ours = (B[0] @ B[0].T + s2[0] * torch.eye(10, dtype=DT)) * 400 / 399
    sk = PCA(n_components=3).fit(xc.numpy())
    np.testing.assert_allclose(ours.numpy(), sk.get_covariance(), rtol=1e-8, atol=1e-10)


def test_ppca_is_the_maximum_likelihood():
    def loglik(S, C):  # mean Gaussian log-likelihood (up to constants) of a zero-mean model with covariance C
        return -0.5 * (torch.logdet(C) + torch.trace(torch.linalg.solve(C, S)))

    fm = small_factor(d=8, r=2)
    x, _ = factor_draws(fm, T=1, N=300, key=8)
    S = x[0].T @ x[0] / 300
    B, s2 = m.ppca_fit(x, 2)
    best = loglik(S, B[0] @ B[0].T + s2[0] * torch.eye(8, dtype=DT))
    assert best > loglik(S, fm["cov"])  # beats the truth in-sample
    g = torch.Generator().manual_seed(9)
    for _ in range(20):  # and every nearby factor model
        Bp, sp = B[0] + 0.05 * torch.randn(8, 2, dtype=DT, generator=g), s2[0] * (1 + 0.1 * torch.rand(1).item() - 0.05)
        assert best >= loglik(S, Bp @ Bp.T + sp * torch.eye(8, dtype=DT))


def test_bayes_predictor_and_exact_excess_match_monte_carlo():
    fm = small_factor(d=6, r=2)
    x, y = factor_draws(fm, T=1, N=400_000, key=10)
    x, y = x[0], y[0]
    w_hat = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]  # the population regression of y on x
    assert (w_hat - fm["w_star"]).abs().max() < 0.01
    assert ((y - x @ fm["w_star"]) ** 2).mean().item() == pytest.approx(fm["s2"], rel=0.01)
    w = fm["w_star"] + torch.linspace(-0.3, 0.3, 6, dtype=DT)
    mc = ((y - x @ w) ** 2).mean() - ((y - x @ fm["w_star"]) ** 2).mean()
    assert m.excess_linear(w, fm).item() == pytest.approx(mc.item(), rel=0.03)


def test_oracle_ols_formulas_s2_r_and_s2_d():
    fm = small_factor(d=6, r=2)
    T, n = 4000, 14
    x, y = factor_draws(fm, T=T, N=n, key=11)
    M = m.posterior_mean_map(fm["B"].expand(T, -1, -1), torch.full((T,), fm["sigma2"], dtype=DT))
    true_b = m.excess_linear(m.pretrain_erm_linear(M, x, y), fm).mean().item()
    assert true_b == pytest.approx(fm["s2"] * 2 / (n - 2 - 1), rel=0.06)  # OLS on r exact features
    on_x = m.excess_linear(m.ols(x, y), fm).mean().item()
    assert on_x == pytest.approx(fm["s2"] * 6 / (n - 6 - 1), rel=0.08)  # OLS on the d raw coordinates


def test_e_step_is_bayes_rule_with_gaussian_densities():
    from scipy.stats import multivariate_normal

    g = torch.Generator().manual_seed(12)
    x, mu = torch.randn(1, 5, 3, dtype=DT, generator=g), torch.randn(1, 4, 3, dtype=DT, generator=g)
    pi = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=DT)
    logr, _ = m.log_posterior(x, mu, pi.log())
    dens = np.stack([pi[0, k].item() * multivariate_normal(mu[0, k].numpy(), np.eye(3)).pdf(x[0].numpy())
                     for k in range(4)], 1)
    np.testing.assert_allclose(logr[0].exp().numpy(), dens / dens.sum(1, keepdims=True), rtol=1e-10)


def test_em_increases_the_likelihood_and_finds_separated_clusters():
    gm = m.make_gmm(replace(m.Args(), gmm_d=6, gmm_k=4, gmm_radius=6.0), CPU)
    x = m.sample_gmm(gm, 800, m.generator(CPU, 13))[0][None]
    trace = []
    m.em_fit(x, 4, 30, 1, m.generator(CPU, 14), trace=trace)
    assert all(b >= a - 1e-10 for a, b in zip(trace, trace[1:]))  # EM never decreases the likelihood
    mu_f, _ = m.em_fit(x, 4, 30, 5, m.generator(CPU, 14))
    assert torch.cdist(gm["mu"], mu_f[0]).min(1).values.max() < 0.5  # every true mean is found (up to relabelling)


def test_unseen_cluster_formula_by_simulation():
    K, C, n, T = 5, 3, 6, 40_000
    g = torch.Generator().manual_seed(15)
    psi = torch.tensor([0, 1, 2, 0, 1])
    z = torch.randint(0, K, (T, n), generator=g)  # oracle cluster assignments of the labeled points
    gmap = m.majority_map(z, psi[z], K, C, g)
    err = (gmap != psi).double().mean(1)  # uniform clusters: the error of x -> gmap[z(x)]
    assert err.mean().item() == pytest.approx((1 - 1 / K) ** n * (1 - 1 / C), abs=0.004)
    seen = torch.zeros(T, K, dtype=torch.bool).scatter_(1, z, True)
    assert (gmap[seen] == psi.expand(T, K)[seen]).all()  # every seen cluster gets its true label


def test_slope_recovers_a_power_law():
    assert m.slope([10, 100, 1000], [3.0, 0.3, 0.03]) == pytest.approx(-1.0)
    assert math.isnan(m.slope([10], [1.0]))


# ---- bad arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [(["--fa-n-ref", "7"], "fa-n-ref"), (["--settings", "vae"], "settings")])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


@pytest.mark.parametrize("change, word", [
    (dict(fa_n=(4, 100)), "r + 1"), (dict(gmm_c=1), "gmm-c"), (dict(fa_r=200), "fa-r"), (dict(cv_folds=50), "cv-folds"),
    (dict(gmm_m=(4,)), "gmm-m"), (dict(em_restarts=0), "em-restarts"),
])
def test_validate_names_the_bad_field(change, word):
    with pytest.raises(shared.UsageError, match=re.escape(word)):
        m.validate(replace(m.Args(), **change))


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["text"]
