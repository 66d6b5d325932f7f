"""rcal: NT-Xent literal == fused, LOF vs its definition and scikit-learn, per-class statistics vs numpy, the tail
calibration by hand, Gaussian sampling moments, the noise transition matrices and their empirical rates,
determinism, bad arguments, --data-dir pickles, and (opt-in) the claim at the default preset."""

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

SLUG = "rcal"
m = load(SLUG)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert without_timing(other["results"]) != without_timing(first["results"])
    assert set(first["results"]) == {*m.MODELS, "rcal_ft"}  # the smoke preset also runs the fine-tuning stage


# ---- fused == reference ----------------------------------------------------------------------------------------------
def test_nt_xent_fused_equals_the_per_anchor_formula_outputs_and_gradients():
    g = torch.Generator().manual_seed(0)
    p1, p2 = (torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    ref, fused = m.nt_xent_reference(p1, p2, 0.3), m.nt_xent_fused(p1, p2, 0.3)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (p1, p2)), torch.autograd.grad(ref, (p1, p2))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nt_xent_by_hand_on_two_pairs():
    # B = 1: two views, the only k != i is the positive, so the loss is -s/tau + log exp(s/tau) = 0
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert m.nt_xent_fused(p, torch.tensor([[0.6, 0.8]], dtype=torch.float64), 0.5).item() == pytest.approx(0.0)
    # B = 2, orthonormal views: s_pos = 1, negatives s = 0 -> l = -1/tau + log(e^{1/tau} + 2)
    a, b = torch.eye(4, dtype=torch.float64)[:2], torch.eye(4, dtype=torch.float64)[:2]
    expected = -2.0 + math.log(math.exp(2.0) + 2)
    assert m.nt_xent_fused(a, b, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_lof_fused_equals_the_definition_and_scikit_learn():
    from sklearn.neighbors import LocalOutlierFactor

    rng = np.random.default_rng(1)
    z = np.r_[rng.standard_normal((30, 4)), rng.standard_normal((3, 4)) * 0.5 + 6]  # a cluster + 3 far points
    zt = torch.tensor(z)
    for k in (3, 7):
        fused, ref = m.lof_fused(zt, k), m.lof_reference(zt, k)
        torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
        sk = -LocalOutlierFactor(n_neighbors=k).fit(z).negative_outlier_factor_
        np.testing.assert_allclose(fused.numpy(), sk, rtol=1e-6)


def test_lof_keep_mask_drops_a_planted_mislabelled_point_and_skips_small_classes():
    rng = np.random.default_rng(2)
    z = torch.tensor(np.r_[rng.standard_normal((40, 3)), [[9.0, 9.0, 9.0]], rng.standard_normal((5, 3))])
    noisy = torch.tensor([0] * 41 + [1] * 5)
    keep = m.lof_keep_mask(z, noisy, 2, m.Args())
    assert not keep[40] and keep[41:].all() and keep[:40].float().mean() > 0.85


# ---- the statistics, the tail calibration, the sampler --------------------------------------------------------------
def test_batched_class_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(3)
    z, y = rng.standard_normal((53, 6)), rng.integers(0, 4, 53)
    y[:2] = 3  # class 3 has points; class 4 (K=5) is empty
    mu, cov = m.class_stats(torch.tensor(z), torch.tensor(y), 5)
    for c in range(4):
        np.testing.assert_allclose(mu[c].numpy(), z[y == c].mean(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(cov[c].numpy(), np.cov(z[y == c].T), rtol=1e-5, atol=1e-8)
    assert (mu[4] == 0).all() and (cov[4] == 0).all()
    for a, b in zip((mu, cov), m.class_stats_reference(torch.tensor(z), torch.tensor(y), 5)):
        torch.testing.assert_close(a, b)


def test_tail_calibration_by_hand():
    # 4 classes in 2-d, counts 50, 40, 30, 3 -> heads {0, 1}, tails {2, 3} (head_fraction 0.5), q = 1
    mu = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 1.0], [9.0, 2.0]], dtype=torch.float64)
    cov = torch.stack([torch.eye(2) * 1.0, torch.eye(2) * 3.0, torch.tensor([[2.0, 1.0], [1.0, 2.0]]),
                       torch.zeros(2, 2)]).double()
    nk = torch.tensor([50, 40, 30, 3])
    args = replace(m.Args(), q=1, alpha=0.5, head_fraction=0.5)
    mu2, cov2, tails = m.calibrate_tails(mu, cov, nk, args)
    assert sorted(tails.tolist()) == [2, 3]
    # class 2 is nearest head 0: mu' = ((1,1) + (0,0)) / 2, Sigma' = ([[2,1],[1,2]] + I) / 2 + 0.5 I
    torch.testing.assert_close(mu2[2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(cov2[2], torch.tensor([[2.0, 0.5], [0.5, 2.0]], dtype=torch.float64))
    # class 3 is nearest head 1: mu' = ((9,2) + (10,0)) / 2, Sigma' = (0 + 3 I) / 2 + 0.5 I = 2 I
    torch.testing.assert_close(mu2[3], torch.tensor([9.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(cov2[3], 2 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(mu2[:2], mu[:2])  # heads untouched
    torch.testing.assert_close(cov2[:2], cov[:2])
    # q = 2: class 3 averages with both heads: Sigma' = (0 + I + 3 I) / 3 + 0.5 I
    mu3, cov3, _ = m.calibrate_tails(mu, cov, nk, replace(args, q=2))
    torch.testing.assert_close(cov3[3], (4 / 3 + 0.5) * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(mu3[3], torch.tensor([19 / 3, 2 / 3], dtype=torch.float64))
    # mean calibration off: only the covariance is borrowed
    mu4, _, _ = m.calibrate_tails(mu, cov, nk, replace(args, calibrate_mean=False))
    torch.testing.assert_close(mu4, mu)


def test_sampled_moments_match_the_gaussians_within_monte_carlo_error():
    mu = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 0.0]], dtype=torch.float64)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.3, 0.4]], dtype=torch.float64)
    cov = torch.stack([A @ A.T, torch.diag(torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))])
    n = torch.tensor([40_000, 7])
    zs, ys = m.sample_gaussians(mu, cov, n, torch.Generator().manual_seed(4))
    assert zs.shape == (40_007, 3) and (torch.bincount(ys) == n).all()
    z0 = zs[ys == 0]
    se = (cov[0].diagonal() / 40_000).sqrt()  # standard error of each mean coordinate
    assert ((z0.mean(0) - mu[0]).abs() < 5 * se).all()
    assert (torch.cov(z0.T) - cov[0] - 1e-4 * torch.eye(3)).abs().max() < 0.05  # + the Cholesky jitter


# ---- the data: long-tail profile, noise transition matrices and their empirical rates ------------------------------
def test_long_tail_profile():
    c = m.lt_counts(300, 100, 10)
    assert c[0] == 300 and c[-1] == 3 and (np.diff(c) < 0).all() and c.sum() == 745
    assert m.lt_counts(50, 1, 4).tolist() == [50] * 4


@pytest.mark.parametrize("kind", ["sym", "asym", "lt-prop"])
def test_transition_matrices_have_the_stated_rates(kind):
    counts, r, K = np.array([300, 100, 30, 10]), 0.4, 4
    T = m.transition_matrix(kind, r, counts)
    np.testing.assert_allclose(T.sum(1), 1)
    np.testing.assert_allclose(np.diag(T), 1 - r)
    off = T[~np.eye(K, dtype=bool)].reshape(K, K - 1)
    if kind == "sym":
        np.testing.assert_allclose(off, r / (K - 1))
    elif kind == "asym":
        np.testing.assert_allclose([T[i, (i + 1) % K] for i in range(K)], r)
    else:  # P(j | i) = r n_j / sum_{l != i} n_l for j != i
        for i in range(K):
            others = [j for j in range(K) if j != i]
            np.testing.assert_allclose(T[i, others], r * counts[others] / counts[others].sum())
    # the sampler draws from those rows: empirical transition frequencies within 5 standard errors
    y = np.repeat(np.arange(K), 20_000)
    noisy = m.add_noise(y, T, np.random.default_rng(5))
    emp = np.stack([np.bincount(noisy[y == i], minlength=K) / 20_000 for i in range(K)])
    assert (np.abs(emp - T) <= 5 * np.sqrt(T * (1 - T) / 20_000) + 1e-12).all()


def test_generated_images_are_valid_and_classes_differ():
    y = np.repeat(np.arange(10), 20)
    x = m.draw_shapes(y, np.random.default_rng(6))
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    means = np.stack([x[y == c].mean(0) for c in range(10)]).reshape(10, -1)
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert d[~np.eye(10, dtype=bool)].min() > 0.5  # no two classes render the same mean image


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--noise-types", "pairflip", "--noise-rates", "0.2"], "noise type"),
    (["--noise-types", "asym", "--noise-rates", "0.6"], "asym"),
    (["--noise-types", "sym", "asym", "--noise-rates", "0.2"], "same length"),
    (["--classes", "11"], "classes"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


def write_cifar10(folder, per_class=12, test_per_class=3, broken=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(8)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = test_per_class if name == "test_batch" else (per_class if i == 0 else 1)
        labels = list(np.repeat(np.arange(10), n))
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
    if broken == "not a pickle":
        (folder / "data_batch_2").write_text("hello")
    elif broken == "shape":
        with open(folder / "data_batch_3", "wb") as fh:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, fh)
    elif broken == "missing":
        (folder / "test_batch").unlink()


@pytest.mark.parametrize("broken, words", [("not a pickle", ("cannot read", "data_batch_2")),
                                           ("shape", ("3072", "data_batch_3")),
                                           ("missing", ("missing file", "test_batch"))])
def test_malformed_cifar_files_name_the_file(tmp_path, broken, words):
    write_cifar10(tmp_path / "c10", broken=broken)
    with pytest.raises(shared.UsageError) as err:
        m.load_cifar(str(tmp_path / "c10"))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_malformed_data_dir_is_a_usage_error_from_the_command_line(tmp_path):
    write_cifar10(tmp_path / "c10", broken="not a pickle")
    assert_usage_error(run_script(SLUG, "--preset", "smoke", "--data-dir", tmp_path / "c10", "--out-dir", tmp_path),
                       "data_batch_2")


def test_well_formed_cifar10_pickles_load_and_run(tmp_path):
    write_cifar10(tmp_path / "c10")
    xtr, ytr, xte, _ = m.load_cifar(str(tmp_path / "c10"))
    assert xtr.shape == (160, 3, 32, 32) and xte.shape == (30, 3, 32, 32)
    assert 0 <= xtr.min() and xtr.max() <= 1 and np.bincount(ytr).tolist() == [16] * 10
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path / "c10"), out_dir=str(tmp_path), n_max=12)
    data = m.make_data(args)
    assert data["counts"].tolist() == m.lt_counts(12, 10.0, 10).tolist() and len(data["ytr"]) == data["counts"].sum()
    record = m.main(args)
    assert math.isfinite(record["results"]["rcal"]["sym0.4/acc"])


def test_cifar100_layout_is_read(tmp_path):
    folder = tmp_path / "c100"
    folder.mkdir()
    for name, n in (("train", 5), ("test", 2)):
        labels = list(np.repeat(np.arange(100), n))
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": np.zeros((len(labels), 3072), np.uint8), b"fine_labels": labels,
                         b"coarse_labels": [0] * len(labels)}, fh)
    xtr, ytr, _, yte = m.load_cifar(str(folder))
    assert len(xtr) == 500 and len(yte) == 200 and ytr.max() == 99


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
