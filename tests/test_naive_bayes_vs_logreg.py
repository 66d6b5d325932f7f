"""naive_bayes_vs_logreg: NB by hand, exact Gaussian error vs Monte Carlo, torch L-BFGS LR vs sklearn, batched == loop,
determinism, bad arguments, --data-dir files, and (opt-in) the claim at the default preset."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script

SLUG = "naive_bayes_vs_logreg"
m = load(SLUG)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, again = m.main(smoke), m.main(smoke)
    assert first["results"] == again["results"]
    other = m.main(replace(smoke, seed=1))
    assert other["results"] != first["results"]
    key = first["key"]
    assert math.isfinite(first["results"][key["method"]][key["metric"]])


# ---- fused (vectorised / batched) == reference (loops) -------------------------------------------------------------
def test_vectorised_nb_matches_the_loop_outputs_and_gradients():
    g = torch.Generator().manual_seed(0)
    R, mm, n, K = 3, 17, 5, 3
    x = torch.randn(R, mm, n, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.stack([torch.randperm(mm, generator=g) % K for _ in range(R)])  # every class present
    gw, gb = torch.randn(R, K, n, dtype=torch.float64, generator=g), torch.randn(R, K, dtype=torch.float64, generator=g)
    outs = {}
    for name, fit in (("fused", m.nb_fit), ("reference", m.nb_fit_loop)):
        W, b = fit(x, y, K, 1e-9)
        outs[name] = (W, b, *torch.autograd.grad((W * gw).sum() + (b * gb).sum(), x))
    for a, r in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("K", [2, 3])
def test_batched_lr_fit_equals_one_fit_at_a_time(K):
    rng = np.random.default_rng(1)
    mix = m.make_mixture(K, 7, "easy", torch.device("cpu"))
    x, y = m.sample_mixture(mix, [m.stratified_counts(23, K, rng) for _ in range(4)], rng)
    batched = m.lr_fit(x, y, K, C=1.0, tol=1e-9, max_iter=5000)
    looped = m.lr_fit_one_by_one(x, y, K, C=1.0, tol=1e-9, max_iter=5000)
    torch.testing.assert_close(batched[0], looped[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1] - batched[1].mean(-1, keepdim=True),
                               looped[1] - looped[1].mean(-1, keepdim=True), rtol=0, atol=1e-5)


def test_lr_objective_gradient_matches_the_hand_derived_one():
    g = torch.Generator().manual_seed(2)
    R, mm, n, C = 2, 11, 4, 0.7
    x = torch.randn(R, mm, n, dtype=torch.float64, generator=g)
    # binary: d/dw = (1/m) X^T (sigmoid(z) - y) + w / (C m),  d/db = mean(sigmoid(z) - y)
    y = torch.randint(0, 2, (R, mm), generator=g)
    theta = torch.randn(R, n + 1, dtype=torch.float64, generator=g, requires_grad=True)
    (grad,) = torch.autograd.grad(m.lr_objective(theta, x, y, 2, C), theta)
    w, b = theta.detach()[:, :n], theta.detach()[:, n]
    r = torch.sigmoid(torch.einsum("rmn,rn->rm", x, w) + b[:, None]) - y
    torch.testing.assert_close(grad[:, :n], torch.einsum("rmn,rm->rn", x, r) / mm + w / (C * mm))
    torch.testing.assert_close(grad[:, n], r.mean(1))
    # multinomial: d/dW_k = (1/m) sum_i (p_ik - [y_i = k]) x_i + W_k / (C m)
    K = 3
    y = torch.randint(0, K, (R, mm), generator=g)
    theta = torch.randn(R, K * (n + 1), dtype=torch.float64, generator=g, requires_grad=True)
    (grad,) = torch.autograd.grad(m.lr_objective(theta, x, y, K, C), theta)
    W, b = theta.detach()[:, : K * n].reshape(R, K, n), theta.detach()[:, K * n :]
    r = torch.softmax(torch.einsum("rmn,rkn->rmk", x, W) + b[:, None], -1) - torch.nn.functional.one_hot(y, K)
    expected = torch.einsum("rmk,rmn->rkn", r, x) / mm + W / (C * mm)
    torch.testing.assert_close(grad[:, : K * n].reshape(R, K, n), expected)
    torch.testing.assert_close(grad[:, K * n :], r.mean(1))


@pytest.mark.slow
def test_compiled_objective_matches_eager():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 13, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (2, 13), generator=g)
    theta = torch.randn(2, 18, dtype=torch.float64, generator=g, requires_grad=True)
    eager = torch.autograd.grad(m.lr_objective(theta, x, y, 3, 1.0), theta)[0]
    compiled = torch.autograd.grad(torch.compile(m.lr_objective)(theta, x, y, 3, 1.0), theta)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


# ---- the maths the method rests on, against independent computations -----------------------------------------------
def test_naive_bayes_on_a_hand_worked_case():
    # class 0: (0,0) (2,0) (0,2) (2,2) -> mean (1,1), biased variances (1,1), prior 2/3
    # class 1: (4,1) (6,5)            -> mean (5,3), biased variances (1,4), prior 1/3
    # pooled variance vbar = 2/3 (1,1) + 1/3 (1,4) = (1,2)
    x = torch.tensor([[[0, 0], [2, 0], [0, 2], [2, 2], [4, 1], [6, 5]]], dtype=torch.float64)
    y = torch.tensor([[0, 0, 0, 0, 1, 1]])
    W, b = m.nb_fit(x, y, 2, var_smoothing=0.0)
    # W_k = mu_k / vbar, b_k = log pi_k - 1/2 sum_j mu_kj^2 / vbar_j
    torch.testing.assert_close(W[0], torch.tensor([[1.0, 0.5], [5.0, 1.5]], dtype=torch.float64))
    torch.testing.assert_close(b[0], torch.tensor([math.log(2 / 3) - 0.75, math.log(1 / 3) - 14.75],
                                                  dtype=torch.float64))
    # the official score log pi_k - 1/2 sum_j (x_j - mu_kj)^2 / vbar_j at (3,2): class 0 -2.655, class 1 -3.349:
    # equal distances to both means, so the prior decides (class 0); at (3.5,2) class 1 wins.
    test = torch.tensor([[3.0, 2.0], [3.5, 2.0]], dtype=torch.float64)
    full = lambda t, mu, p: math.log(p) - 0.5 * ((t[0] - mu[0]) ** 2 / 1 + (t[1] - mu[1]) ** 2 / 2)  # noqa: E731
    by_hand = [[full(t, (1, 1), 2 / 3), full(t, (5, 3), 1 / 3)] for t in test.tolist()]
    linear = test @ W[0].T + b[0]
    by_hand = torch.tensor(by_hand, dtype=torch.float64)
    torch.testing.assert_close(linear - linear[:, :1], by_hand - by_hand[:, :1])  # equal up to a per-point constant
    assert (linear.argmax(-1) == torch.tensor([0, 1])).all()


def test_exact_gaussian_error_matches_monte_carlo():
    mix = m.make_mixture(2, 6, "hard", torch.device("cpu"))  # correlated covariance: exercises Sigma and the sampler
    rng = np.random.default_rng(4)
    x, y = m.sample_mixture(mix, [np.array([200_000, 200_000])], rng)
    # the sampler really has covariance Sigma
    emp = torch.cov((x[0] - mix["mu"][y[0]]).T)
    assert ((emp - mix["sigma"]).abs().max() / mix["sigma"].abs().max()).item() < 0.02
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 2, 6, dtype=torch.float64, generator=g)
    b = torch.randn(3, 2, dtype=torch.float64, generator=g) * 3
    exact = m.exact_binary_error(W, b, mix)
    mc = m.test_error(W, b, x[0], y[0])
    assert (exact - mc).abs().max().item() < 4e-3, (exact, mc)  # MC std ~ 8e-4
    assert exact.min() > 0.01  # the rules are not trivially perfect


def test_bayes_error_is_phi_of_half_the_mahalanobis_distance():
    for n in (6, 9):
        mix = m.make_mixture(2, n, "easy", torch.device("cpu"))
        rules = m.population_rules(mix)
        bayes = m.exact_binary_error(*rules["logistic_regression"], mix).item()
        delta2 = 4 * (n // 2) / n + 4 * (n - n // 2)  # sum_j (mu_1j - mu_0j)^2 / sigma_j^2 (= 2n+2 for even n)
        assert bayes == pytest.approx(0.5 * math.erfc(math.sqrt(delta2) / 2 / math.sqrt(2)), rel=1e-10)
        # in easy mode Sigma is diagonal, so NB's population rule is the Bayes rule
        assert m.exact_binary_error(*rules["naive_bayes"], mix).item() == pytest.approx(bayes, rel=1e-8)


@pytest.mark.parametrize("K", [2, 3])
def test_torch_lbfgs_lr_matches_sklearn(K):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(6)
    n, mm, C = 5, 60, 0.5
    xs = rng.standard_normal((mm, n)) + np.repeat(rng.standard_normal((K, n)), mm // K, 0)
    ys = np.repeat(np.arange(K), mm // K)
    sk = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(xs, ys)
    W, b = m.lr_fit(torch.tensor(xs)[None], torch.tensor(ys)[None], K, C=C, tol=1e-10, max_iter=5000)
    if K == 2:  # sklearn: one row for class 1; ours: class 0 scores 0
        torch.testing.assert_close(W[0, 1], torch.tensor(sk.coef_[0]), rtol=0, atol=1e-5)
        assert b[0, 1].item() == pytest.approx(sk.intercept_[0], abs=1e-5)
    else:
        torch.testing.assert_close(W[0], torch.tensor(sk.coef_), rtol=0, atol=1e-5)
        torch.testing.assert_close(b[0] - b[0].mean(), torch.tensor(sk.intercept_ - sk.intercept_.mean()),
                                   rtol=0, atol=1e-5)
    ours = (torch.tensor(xs) @ W[0].T + b[0]).argmax(-1).numpy()
    assert (ours == sk.predict(xs)).all()


def test_m_grid_and_first_m_within():
    args = m.Args()
    grid = m.m_grid(args, 50)
    assert grid[0] == 4 and grid[-1] == 1000 and 8 in grid and grid == sorted(set(grid))
    official = m.m_grid(replace(args, grid="arithmetic", m_start=4, m_max_factor=100.0), 100)
    assert official[:3] == [4, 9, 14] and official[-1] < 100 * 100  # step ceil(ln 100) = 5
    assert m.first_m_within([4, 8, 16], [0.3, 0.009, 0.001], 0.01) == 8
    assert m.first_m_within([4, 8], [0.3, 0.2], 0.01) is None


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--dims", "0", "50"], "dims"),
    (["--repeats", "0"], "repeats"),
    (["--mode", "medium"], "mode"),
    (["--m-start", "2"], "2K"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


def write_features(folder, train, val):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train_features.npy", train), ("val_features.npy", val)):
        if arr is not None:
            np.save(folder / name, arr)


def test_missing_feature_file_is_a_usage_error(tmp_path):
    write_features(tmp_path / "clip" / "cifar10", np.zeros((4, 3)), None)
    assert_usage_error(run_script(SLUG, "--data-dir", tmp_path, "--dims", "20", "--no-transfer"),
                       "missing file", "val_features.npy")


@pytest.mark.parametrize("train, word", [
    (np.zeros(8), "2-d"),  # wrong ndim
    (np.c_[np.zeros((6, 2)), np.linspace(0, 1, 6)], "integer labels"),  # non-integer labels
    (np.c_[np.full((6, 2), np.nan), np.zeros(6)], "nan"),  # non-finite features
])
def test_malformed_feature_files_name_the_problem(tmp_path, train, word):
    write_features(tmp_path / "clip" / "cifar10", train, np.c_[np.zeros((3, 2)), np.zeros(3)])
    args = replace(m.Args(), data_dir=str(tmp_path))
    with pytest.raises(shared.UsageError, match="(?i)" + word) as err:
        m.load_feature_dir(args, torch.device("cpu"))
    assert "train_features.npy" in str(err.value)


def test_not_an_npy_file_is_a_usage_error(tmp_path):
    folder = tmp_path / "clip" / "cifar10"
    folder.mkdir(parents=True)
    (folder / "train_features.npy").write_text("not numpy")
    with pytest.raises(shared.UsageError, match="cannot read"):
        m.load_feature_dir(replace(m.Args(), data_dir=str(tmp_path)), torch.device("cpu"))


def test_well_formed_feature_files_load_and_run(tmp_path):
    rng = np.random.default_rng(7)
    labels = np.repeat([3, 7], 10)  # labels need not start at 0: they are mapped to 0..K-1
    train = np.c_[rng.standard_normal((20, 4)) + labels[:, None], labels]
    val = np.c_[rng.standard_normal((6, 4)) + np.repeat([3, 7], 3)[:, None], np.repeat([3, 7], 3)]
    write_features(tmp_path / "resnet" / "cifar10", train, val)
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path), feature_backbone="resnet", out_dir=str(tmp_path),
                   probe_m=(4, 8), dims=(20,))
    xtr, ytr, xte, yte = m.load_feature_dir(args, torch.device("cpu"))
    assert xtr.shape == (20, 4) and xte.shape == (6, 4) and set(ytr.tolist()) == {0, 1}
    assert (yte == torch.tensor([0, 0, 0, 1, 1, 1])).all()
    record = m.main(args)
    assert "resnet-cifar10/err_m8" in record["results"]["naive_bayes"]


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["text"]
