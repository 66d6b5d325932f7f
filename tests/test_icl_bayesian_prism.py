"""icl_bayesian_prism: determinism, fused == reference attention, the posterior mean (PME) against independent
computations (Monte Carlo Bayes rule, brute-force Gaussian densities, the official constrained min-norm form, numpy
least squares), the priors' sampling and moments, the implied-weight probes, the other tasks end to end, bad args."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_causal_attention_paths_agree, assert_usage_error, load, run_script

m = load("icl_bayesian_prism")


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert first["results"] == second["results"]
    assert first["history"][-1]["train/loss"] == second["history"][-1]["train/loss"]
    other = m.main(replace(args, seed=1))
    assert other["history"][-1]["train/loss"] != first["history"][-1]["train/loss"]


def test_fused_equals_reference_outputs_and_gradients():
    assert_causal_attention_paths_agree(m)


@pytest.mark.parametrize("pos_embed", [False, True])
def test_whole_model_same_output_on_both_paths_and_causal(pos_embed):
    a = replace(m.Args(), pos_embed=pos_embed)
    torch.manual_seed(0)
    ref = m.ICLTransformer(a.d, a.n_points, 32, 2, 4, m.attention_reference, pos_embed).double().eval()
    fused = m.ICLTransformer(a.d, a.n_points, 32, 2, 4, m.attention_fused, pos_embed).double().eval()
    fused.load_state_dict(ref.state_dict())
    x, y, _, _ = m.sample_prompts(8, a, m.make_prior(a), torch.Generator().manual_seed(1))
    tokens = m.to_tokens(x, y).double()
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), ref(tokens), atol=1e-10, rtol=1e-8)
        y2 = y.clone()
        y2[:, 3:] += 5.0  # y_3.. come after the query x_3: predictions 0..3 must not move
        torch.testing.assert_close(fused(m.to_tokens(x, y2).double())[:, :4], fused(tokens)[:, :4])


def test_tokens_interleave_x_and_padded_y():
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5)
    t = m.to_tokens(x, y)
    assert t.shape == (3, 10, 4)
    torch.testing.assert_close(t[:, 0::2], x)
    torch.testing.assert_close(t[:, 1::2, 0], y)
    assert (t[:, 1::2, 1:] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# The Bayes predictor
# ---------------------------------------------------------------------------------------------------------------------
def monte_carlo_pme(X, Y, prior, noise_var, n=2_000_000, seed=0):
    """Self-normalised importance sampling from the prior: E[w | D] = E_prior[w L(w)] / E_prior[L(w)],
    L(w) = exp(-|y - X w|^2 / (2 noise_var)); also p(c | D) from the same samples."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(prior.pi.float(), n, replacement=True, generator=g)
    std = torch.diagonal(prior.cov, dim1=-2, dim2=-1).sqrt()  # the test priors are diagonal
    w = prior.mean[comp] + std[comp] * torch.randn(n, prior.mean.shape[1], generator=g, dtype=torch.float64)
    logl = -((Y[None] - w @ X.T) ** 2).sum(-1) / (2 * noise_var)
    lw = torch.softmax(logl, 0)
    post_c = torch.zeros(prior.pi.shape[0], dtype=torch.float64).index_add_(0, comp, lw)
    return (lw[:, None] * w).sum(0), post_c


@pytest.mark.parametrize("task, d, k", [("gmm", 2, 1), ("gmm", 3, 2), ("dr_sr", 3, 2)])
def test_pme_is_bayes_rule_against_monte_carlo(task, d, k):
    a = replace(m.Args(), task=task, d=d, sparsity=1, gmm_centre=1.5)  # centre 1.5: MC samples both modes well
    prior = m.make_prior(a)
    if task == "gmm":  # give the first coordinate real variance so plain Gaussian sampling represents the prior
        prior.cov[:, 0, 0] = 0.3
    g = torch.Generator().manual_seed(k)
    X, Y = torch.randn(k, d, generator=g, dtype=torch.float64), torch.randn(k, generator=g, dtype=torch.float64)
    w, post = m.pme(X[None], Y[None], prior, noise_var=0.5)
    w_mc, post_mc = monte_carlo_pme(X, Y, prior, 0.5)
    torch.testing.assert_close(w[0], w_mc, atol=2e-2, rtol=0)
    torch.testing.assert_close(post[0], post_mc, atol=1e-2, rtol=0)


def test_log_evidence_and_posterior_mean_match_dense_gaussian_formulas():
    a = replace(m.Args(), task="dr_sr", d=4, sparsity=2)
    prior = m.make_prior(a)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    w, log_ev = m.component_posteriors(X[None], Y[None], prior, noise_var=0.1)
    for c in range(prior.pi.shape[0]):
        S, mu = prior.cov[c], prior.mean[c]
        K = X @ S @ X.T + 0.1 * torch.eye(3, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(X @ mu, covariance_matrix=K)
        torch.testing.assert_close(log_ev[0, c], dist.log_prob(Y))
        # posterior mean via the precision form (on the support of S): (S^+ + X^T X / s2)^-1 (X^T y / s2 + S^+ mu)
        sup = torch.diagonal(S) > 0
        Xs = X[:, sup]
        prec = torch.linalg.inv(S[sup][:, sup]) + Xs.T @ Xs / 0.1
        expect = torch.zeros(4, dtype=torch.float64)
        expect[sup] = torch.linalg.solve(prec, Xs.T @ Y / 0.1 + torch.linalg.inv(S[sup][:, sup]) @ mu[sup])
        torch.testing.assert_close(w[0, c], expect, atol=1e-10, rtol=1e-8)


def test_noise_free_gmm_component_mean_is_the_official_constrained_min_norm_solution():
    """Official gmm_pme_eval_functions: w_c = argmin |w - m_c| s.t. w_1 = m_c1 and X w = y (solved there with cvxpy)."""
    a = m.Args()
    prior = m.make_prior(a)
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    w, _ = m.component_posteriors(X[None], Y[None], prior)
    for c, centre in enumerate((3.0, -3.0)):
        rest = np.linalg.lstsq(X[:, 1:].numpy(), (Y - centre * X[:, 0]).numpy(), rcond=None)[0]  # min-norm
        np.testing.assert_allclose(w[0, c].numpy(), np.r_[centre, rest], rtol=1e-4)  # eps = 1e-6 jitter


def test_pme_posterior_concentrates_on_the_true_component_once_k_reaches_d():
    a = replace(m.Args(), n_points=4)
    prior = m.make_prior(a)
    x, y, w, comp = m.sample_prompts(200, a, prior, torch.Generator().manual_seed(0))
    w_hat, post = m.pme(x.double(), y.double(), prior)  # k = 4 > d = 3 noise-free examples
    assert (post.argmax(-1) == comp).all()
    torch.testing.assert_close(w_hat, w.double(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_ols_is_the_min_norm_least_squares_solution(k):
    rng = np.random.default_rng(k)
    X, Y = rng.normal(size=(4, k, 3)), rng.normal(size=(4, k))
    w = m.ols(torch.from_numpy(X), torch.from_numpy(Y)).numpy()
    for b in range(4):
        np.testing.assert_allclose(w[b], np.linalg.lstsq(X[b], Y[b], rcond=None)[0], atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# Priors, sampling, scaling
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["gmm", "dr_sr", "fourier"])
def test_sampled_weights_and_outputs_have_the_priors_moments(task):
    a = replace(m.Args(), task=task, d=4, sparsity=2, max_freq=3, n_points=8)
    prior = m.make_prior(a)
    x, y, w, comp = m.sample_prompts(200_000, a, prior, torch.Generator().manual_seed(0))
    gauss = m.gaussian_matched(prior)
    torch.testing.assert_close(w.double().mean(0), gauss.mean[0], atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(w.double().T), gauss.cov[0], atol=0.03, rtol=0.02)
    assert abs(y.pow(2).mean().sqrt().item() / m.y_scale(a, prior) - 1) < 0.02  # the RMS used to normalise y
    if task == "dr_sr":  # a sparse prompt has exactly s non-zero weights on one support
        nz = (w[prior.family[comp] == 1] != 0).sum(-1)
        assert (nz == 2).all()
    if task == "fourier":  # N = 1 prompts: only cos(pi x / 5) and sin(pi x / 5), with unit variance
        w1 = w[comp == 0]
        assert (w1[:, [1, 2, 4, 5]] == 0).all() and abs(w1[:, 0].var().item() - 1) < 0.05


def test_fourier_features_reproduce_the_series():
    a = replace(m.Args(), task="fourier", max_freq=3)
    x = torch.linspace(-5, 5, 11).reshape(1, 11, 1)
    a_n, b_n = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.0, -0.5])
    f = sum(a_n[n - 1] * torch.cos(n * math.pi * x / 5) + b_n[n - 1] * torch.sin(n * math.pi * x / 5)
            for n in range(1, 4))
    torch.testing.assert_close((m.features(x, a) @ torch.cat([a_n, b_n]))[..., None], f)


def test_sparse_prior_enumerates_every_support_once():
    prior = m.make_prior(replace(m.Args(), task="dr_sr", d=5, sparsity=2))
    supports = {tuple(torch.nonzero(torch.diagonal(c)).flatten().tolist()) for c in prior.cov[1:]}
    assert supports == set(itertools.combinations(range(5), 2))
    assert math.isclose(prior.pi.sum().item(), 1.0) and math.isclose(prior.pi[0].item(), 0.5)


def test_curriculum_follows_the_official_schedule():
    paper = m.PRESETS["paper"]  # GMM: dims 5 -> 10 and points 6 -> 11, +1 every 2000 steps
    assert m.curriculum(0, paper) == (5, 6)
    assert m.curriculum(2000, paper) == (6, 7)
    assert m.curriculum(10_000, paper) == m.curriculum(400_000, paper) == (10, 11)
    lr_sr = replace(paper, task="dr_sr", d=20, n_points=41)  # official lr_sr: dims 5 -> 20, points 11 -> 41 (+2)
    assert m.curriculum(0, lr_sr) == (5, 11) and m.curriculum(30_000, lr_sr) == (20, 41)
    assert m.curriculum(0, m.Args()) == (3, 6)  # off in the CPU default


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation pipeline, end to end, with a "transformer" that is exactly the PME
# ---------------------------------------------------------------------------------------------------------------------
class PMEFromTokens(torch.nn.Module):
    """Reads x and y (scaled) back from the tokens and predicts with the mixture PME of the prefix before each query."""

    def __init__(self, args, prior):
        super().__init__()
        self.args, self.prior, self.scale = args, prior, m.y_scale(args, prior)

    def forward(self, tokens):
        x, y = tokens[:, 0::2].double(), tokens[:, 1::2, 0].double() * self.scale
        phi = m.features(x, self.args)
        out = [(phi[:, i] * m.pme(phi[:, :i], y[:, :i], self.prior)[0]).sum(-1) for i in range(x.shape[1])]
        return torch.stack(out, 1).float() / self.scale


@pytest.mark.parametrize("task", ["gmm", "fourier"])
def test_error_and_implied_weights_pipeline_recovers_an_exact_pme_model(task):
    a = replace(m.Args(), task=task, max_freq=2, n_test=200, n_probe_prompts=32)
    prior = m.make_prior(a)
    exact = {"exact": PMEFromTokens(a, prior)}
    ev = m.evaluate(exact, a, prior, torch.device("cpu"))
    np.testing.assert_allclose(ev["error"]["exact"], ev["error"]["mixture PME"], rtol=1e-4, atol=1e-5)
    imp = m.implied_weights(exact, a, prior, torch.device("cpu"))
    torch.testing.assert_close(imp["w"]["exact"], imp["w"]["mixture PME"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task, extra", [("dr_sr", dict(d=4, sparsity=1)), ("fourier", dict(max_freq=2, n_points=6))])
def test_other_tasks_run_end_to_end(task, extra, tmp_path):
    args = replace(m.PRESETS["smoke"], task=task, steps=5, out_dir=str(tmp_path), train_gaussian_baseline=True, **extra)
    record = m.main(args)
    key = record["key"]
    assert key["baseline"] == "TF (Gaussian prior)"
    assert all(math.isfinite(record["results"][key[role]][key["metric"]]) for role in ("method", "baseline"))
    assert isinstance(record["claim"]["passed"], bool)


@pytest.mark.parametrize("flags, words", [
    (["--width", "64", "--n-heads", "5"], ["divide"]),
    (["--n-points", "3"], ["n-points"]),
    (["--task", "dr_sr", "--sparsity", "3"], ["sparsity"]),
    (["--task", "fourier", "--max-freq", "0"], ["max-freq"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("icl_bayesian_prism", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
