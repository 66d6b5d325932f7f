"""mist: determinism, fused == reference masked attention (outputs and gradients), padding and permutation invariance
of the encoders, the closed-form MIs against Monte Carlo / numerical integration, KSG against a brute-force neighbour
count and a Gaussian's closed form, CCA against canonical correlations, the pinball loss, the --data-dir loader."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, without_timing, write_pickle

m = load("mist")


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert without_timing(first["results"]) == without_timing(second["results"])
    assert first["history"] == second["history"]
    other = m.main(replace(args, seed=1))
    assert other["history"][-1]["train/loss"] != first["history"][-1]["train/loss"]
    a, b = without_timing(first["results"]), without_timing(other["results"])
    assert b["MIST"]["imd_mse"] != a["MIST"]["imd_mse"]
    assert b["KSG"] == a["KSG"]  # the test sets and the baselines do not depend on --seed


@pytest.mark.parametrize("tq", [1, 17])  # PMA-like (few queries) and self-attention shapes
def test_fused_equals_reference_with_padding_masks_outputs_and_gradients(tq):
    torch.manual_seed(0)
    q = torch.randn(4, 3, tq, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(4, 3, 23, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keep = torch.arange(23)[None] < torch.tensor([23, 1, 9, 14])[:, None]  # (B, Tk) variable lengths, never empty
    out_ref, out_fused = m.attention_reference(q, k, v, keep), m.attention_fused(q, k, v, keep)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), g)
    grads_fused = torch.autograd.grad(out_fused, (q, k, v), g)
    for a, b in zip(grads_fused, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert grads_ref[1][1, :, 1:].abs().max() == 0 and grads_ref[2][1, :, 1:].abs().max() == 0  # padded keys unused
    torch.testing.assert_close(m.attention_fused(q, k, v), m.attention_reference(q, k, v), atol=1e-12, rtol=1e-10)


def datasets(n_sets: int, seed: int = 0) -> list[dict]:
    args = m.Args()
    return [s for s in m.make_test_set(["student-dense-base", "normal-sparse-wiggly"], (9, 20), 1, args, seed)][:n_sets]


@pytest.mark.parametrize("encoder", ["rowcol", "rows"])
def test_whole_model_same_output_on_both_paths_with_padding(encoder):
    a = replace(m.Args(), encoder=encoder, width=32, n_heads=4)
    torch.manual_seed(0)
    ref, fused = m.MIST(a, m.attention_reference).double().eval(), m.MIST(a, m.attention_fused).double().eval()
    fused.load_state_dict(ref.state_dict())
    x, y, rk, ck = m.pad_batch(datasets(4), "cpu")  # mixed N (9, 20) and d: rows and cells padded
    assert not rk.all()
    tau = torch.tensor([[0.05, 0.5, 0.95]], dtype=torch.float64).expand(4, -1)
    args = (x.double(), y.double(), rk, ck, tau)
    torch.testing.assert_close(fused(*args), ref(*args), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("encoder", ["rowcol", "rows"])
def test_padding_does_not_change_a_datasets_estimate(encoder):
    a = replace(m.Args(), encoder=encoder, width=32, n_heads=4)
    torch.manual_seed(1)
    model = m.MIST(a, m.attention_fused).double()
    sets = datasets(4, seed=3)
    together = m.run_mist(model, sets, "cpu", (0.3, 0.7), batch=4)  # padded to the largest N and d
    alone = np.concatenate([m.run_mist(model, [s], "cpu", (0.3, 0.7)) for s in sets])
    np.testing.assert_allclose(together, alone, atol=1e-6)  # pad_batch rounds the inputs to float32 first


def test_rowcol_encoder_is_invariant_to_sample_order_and_x_coordinate_order():
    torch.manual_seed(2)
    model = m.MIST(replace(m.Args(), encoder="rowcol"), m.attention_fused).eval()
    s = next(d for d in m.make_test_set(["normal-dense-base"], (40,), 8, m.Args(), 5) if d["d"] == 3)
    rng = np.random.default_rng(0)
    base = m.run_mist(model, [s], "cpu")[0, 0]
    rows, cols = rng.permutation(40), np.array([2, 0, 1])
    assert abs(m.run_mist(model, [dict(s, x=s["x"][rows], y=s["y"][rows])], "cpu")[0, 0] - base) < 1e-5
    assert abs(m.run_mist(model, [dict(s, x=s["x"][:, cols])], "cpu")[0, 0] - base) < 1e-5
    swapped = m.run_mist(model, [dict(s, x=s["y"], y=s["x"])], "cpu")[0, 0]  # roles are embedded: X != Y to the model
    assert abs(swapped - base) > 1e-6


def brute_force_ksg(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """KSG-1 with explicit loops: k-th neighbour in the max-norm of z = (x, y), strict counts in each marginal."""
    n = len(x)
    digamma = lambda t: torch.special.digamma(torch.tensor(float(t), dtype=torch.float64)).item()  # noqa: E731
    total = 0.0
    for i in range(n):
        dz = sorted(max(np.abs(x[i] - x[j]).max(), np.abs(y[i] - y[j]).max()) for j in range(n) if j != i)
        eps = dz[k - 1]
        nx = sum(np.abs(x[i] - x[j]).max() < eps for j in range(n) if j != i)
        ny = sum(np.abs(y[i] - y[j]).max() < eps for j in range(n) if j != i)
        total += digamma(nx + 1) + digamma(ny + 1)
    return digamma(k) + digamma(n) - total / n


@pytest.mark.parametrize("k", [1, 3])
def test_ksg_matches_brute_force_neighbour_counts(k):
    rng = np.random.default_rng(k)
    x, y = rng.normal(size=(13, 1)), rng.normal(size=(13, 2))
    y[:, 0] += x[:, 0]
    got = m.ksg(torch.from_numpy(x)[None], torch.from_numpy(y)[None], k).item()
    assert got == pytest.approx(brute_force_ksg(x, y, k), abs=1e-12)


def test_ksg_approaches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    sigma = (1 - 0.4) * np.eye(4) + 0.4 * np.ones((4, 4))  # dense, d = 2
    z = rng.multivariate_normal(np.zeros(4), sigma, size=(4, 1500))
    est = m.ksg(torch.from_numpy(z[..., :2]), torch.from_numpy(z[..., 2:]), 5).mean().item()
    truth = m.gaussian_mi(sigma, 2)
    assert abs(est - truth) < 0.03, (est, truth)
    np.testing.assert_allclose(m.cca_mi(torch.from_numpy(z[..., :2]), torch.from_numpy(z[..., 2:])).mean().item(),
                               truth, atol=0.02)


def test_gaussian_mi_of_independent_pairs_is_the_sum_of_pair_mis():
    sigma = np.eye(6)
    for i, r in enumerate([0.3, 0.8, 0.0]):
        sigma[i, 3 + i] = sigma[3 + i, i] = r
    expected = sum(-0.5 * math.log(1 - r**2) for r in [0.3, 0.8, 0.0])
    assert m.gaussian_mi(sigma, 3) == pytest.approx(expected, abs=1e-12)


def test_cca_mi_equals_minus_half_sum_log_one_minus_canonical_correlations_squared():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, 2)), rng.normal(size=(50, 3))
    y[:, :2] += 0.7 * x
    S = np.cov(np.hstack([x, y]).T) + 1e-6 * np.eye(5)
    inv_sqrt = lambda a: np.linalg.inv(np.linalg.cholesky(a))  # noqa: E731  whitening
    rho = np.linalg.svd(inv_sqrt(S[:2, :2]) @ S[:2, 2:] @ inv_sqrt(S[2:, 2:]).T, compute_uv=False)
    got = m.cca_mi(torch.from_numpy(x)[None], torch.from_numpy(y)[None]).item()
    assert got == pytest.approx(-0.5 * np.log(1 - rho**2).sum(), abs=1e-9)


def test_student_t_mi_closed_form_against_monte_carlo():
    from scipy.stats import multivariate_t

    assert m.student_mi_correction(1.0, 1, 1) == pytest.approx(0.2242, abs=1e-4)  # the card's check value
    nu, sigma = 2.5, m.joint_covariance("dense", 2, np.random.default_rng(1))
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal(np.zeros(4), sigma, size=200_000) / np.sqrt(rng.chisquare(nu, (200_000, 1)) / nu)
    logp = lambda a, s: multivariate_t(np.zeros(len(s)), s, df=nu).logpdf(a)  # noqa: E731
    mc = np.mean(logp(z, sigma) - logp(z[:, :2], sigma[:2, :2]) - logp(z[:, 2:], sigma[2:, 2:]))
    assert m.gaussian_mi(sigma, 2) + m.student_mi_correction(nu, 2, 2) == pytest.approx(mc, abs=0.01)


@pytest.mark.parametrize("eps", [0.2, 0.5, 1.3])
def test_additive_noise_mi_against_numerical_integration(eps):
    # Y = X + U(-eps, eps), X ~ U(0, 1): p(y) = |[0, 1] and [y - eps, y + eps] overlap| / (2 eps); I = h(Y) - log 2eps
    y = np.linspace(-eps, 1 + eps, 400_001)
    p = np.clip(np.minimum(1, y + eps) - np.maximum(0, y - eps), 0, None) / (2 * eps)
    h_y = -np.trapezoid(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), y)
    assert m.additive_noise_mi(np.array([eps])) == pytest.approx(h_y - math.log(2 * eps), abs=1e-6)


def test_transforms_are_strictly_increasing_so_mi_is_unchanged():
    t = np.linspace(-30, 30, 200_001)
    for name, f in m.TRANSFORMS.items():
        assert (np.diff(f(t)) > 0).all(), name


def test_meta_samples_have_their_stated_shapes_and_mi_range():
    rng = np.random.default_rng(0)
    for fam in m.TRAIN_FAMILIES + m.OOMD_FAMILIES:
        x, y, mi = m.sample_dataset(fam, 50, 3, rng, 6.0)
        assert x.shape == y.shape == (50, 3) and np.isfinite(x).all() and 0 <= mi <= 6.0, fam
    assert not set(m.OOMD_FAMILIES) & set(m.TRAIN_FAMILIES) and set(m.IMD_FAMILIES) <= set(m.TRAIN_FAMILIES)


def test_pinball_loss_is_minimised_by_the_quantile():
    target = torch.from_numpy(np.random.default_rng(0).gamma(2.0, size=4001))
    grid = torch.linspace(0, 8, 8001, dtype=torch.float64)
    for tau in (0.05, 0.5, 0.9):
        losses = torch.stack([m.pinball(q.expand_as(target), target, torch.tensor(tau)) for q in grid])
        best = grid[losses.argmin()].item()
        assert best == pytest.approx(np.quantile(target.numpy(), tau), abs=3e-3)


def test_data_dir_loads_official_pickles_and_rejects_malformed_ones(tmp_path):
    rng = np.random.default_rng(0)
    good = [{"source": rng.normal(size=(30, 4)), "target": 0.7, "dimension": 2},
            {"source": rng.normal(size=(12, 2)).tolist(), "target": 0.1, "dimension": 1}]
    write_pickle(tmp_path / "imd_dataset.pkl", good)
    sets = m.load_official_pickles(str(tmp_path))
    assert [(s["n"], s["d"], s["mi"]) for s in sets] == [(30, 2, 0.7), (12, 1, 0.1)]
    np.testing.assert_allclose(sets[0]["y"], m.robust_scale(good[0]["source"][:, 2:]))
    for name, bad in [("shape_dataset.pkl", [{"source": rng.normal(size=(30, 5)), "target": 1.0, "dimension": 2}]),
                      ("keys_dataset.pkl", [{"samples": rng.normal(size=(30, 4)), "target": 1.0}]),
                      ("empty_dataset.pkl", [])]:
        folder = tmp_path / name.split("_")[0]
        folder.mkdir()
        write_pickle(folder / name, bad)
        with pytest.raises(shared.UsageError, match=name):
            m.load_official_pickles(str(folder))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "junk_dataset.pkl").write_bytes(b"not a pickle")
    with pytest.raises(shared.UsageError, match="junk_dataset.pkl"):
        m.load_official_pickles(str(tmp_path / "junk"))


@pytest.mark.parametrize("flags, words", [
    (["--width", "64", "--n-heads", "5"], ["divide"]),
    (["--ksg-k", "20"], ["ksg-k"]),
    (["--data-dir", "/nonexistent/mist"], ["data-dir"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("mist", *flags), *words)


def test_validate_rejects_more_bad_arguments():
    for bad in (dict(d_min=3, d_max=2), dict(n_boot=1), dict(steps=0), dict(test_ns=(4,))):
        with pytest.raises(shared.UsageError):
            m.validate(replace(m.Args(), **bad))


@pytest.mark.claim
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_preset_reproduces_the_claim(tmp_path, seed):
    record = m.main(replace(m.Args(), seed=seed, out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
