"""dbpm: per-pair NT-Xent vs a per-sample loop, memory statistics / flags / weights vs the literal official
computation and a hand-built memory, the planted bad pairs, the TS-TCC loader, determinism, bad arguments, and
(opt-in) the claim at the default preset."""

import math
from dataclasses import replace

import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

SLUG = "dbpm"
m = load(SLUG)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert without_timing(other["results"]) != without_timing(first["results"])


# ---- fused (batched tensors) == reference (the literal per-pair computations) ---------------------------------------
def test_batched_ntxent_equals_the_per_sample_loop_outputs_and_gradients():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    fused, ref = m.ntxent_pair_loss(z1, z2, 0.2), m.ntxent_pair_loss_reference(z1, z2, 0.2)
    assert fused.shape == (7,)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    gw = torch.randn(7, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad((fused * gw).sum(), (z1, z2)), torch.autograd.grad((ref * gw).sum(), (z1, z2))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ntxent_by_hand_for_two_pairs():
    # B = 2, unit vectors: u1 = e1, v1 = e1 (perfect pair), u2 = e2, v2 = -e2. Each view has 1 positive + 2 negatives.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[2.0, 0.0], [0.0, -3.0]], dtype=torch.float64)  # norms do not matter (cosine similarity)
    tau = 0.5
    e = lambda s: math.exp(s / tau)  # noqa: E731
    # u1: pos s=1, negatives u2 (0), v2 (0); v1: pos 1, negatives u2 (0), v2 (0)
    l1 = -math.log(e(1) / (e(1) + e(0) + e(0)))
    # u2: pos s=-1, negatives u1 (0), v1 (0); v2 the same
    l2 = -math.log(e(-1) / (e(-1) + e(0) + e(0)))
    torch.testing.assert_close(m.ntxent_pair_loss(z1, z2, tau), torch.tensor([l1, l2], dtype=torch.float64))


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_tensor_memory_and_flags_equal_the_official_dict_of_lists(variant):
    args = replace(m.Args(), memory_mean=variant, beta_np=1.5, beta_fp=1.5)
    g = torch.Generator().manual_seed(1)
    N, E, e = 53, 9, 6
    M = (3 + torch.randn(N, E, dtype=torch.float64, generator=g)).abs()
    M[:, e:] = float("nan")  # later epochs not recorded yet
    stats = m.memory_statistics(M, e, E, args)
    ref = m.memory_statistics_reference({i: M[i, :e].tolist() for i in range(N)}, e, E, args)
    torch.testing.assert_close(stats["m"], torch.tensor([ref["m"][i] for i in range(N)], dtype=torch.float64))
    assert stats["mu"].item() == pytest.approx(ref["mu"], rel=1e-12)
    assert stats["sigma"].item() == pytest.approx(ref["sigma"], rel=1e-12)
    assert stats["np_mask"].nonzero().flatten().tolist() == sorted(ref["np_index"])
    assert stats["fp_mask"].nonzero().flatten().tolist() == sorted(ref["fp_index"])
    assert stats["np_mask"].any() and stats["fp_mask"].any()  # the comparison is not vacuous
    # weights of a batch: masks vs list look-ups, both weight functions
    idx = torch.randperm(N, generator=g)[:19]
    loss = torch.rand(19, dtype=torch.float64, generator=g) * 6
    flagged = (stats["np_mask"] | stats["fp_mask"])[idx]
    assert flagged.any()
    for fn in ("pdf", "kernel"):
        w = m.pair_weights(loss, flagged, stats["mu"], stats["sigma"], fn)
        w_ref = m.pair_weights_reference(loss.tolist(), idx.tolist(), ref["np_index"], ref["fp_index"],
                                         ref["mu"], ref["sigma"], fn)
        torch.testing.assert_close(w, torch.tensor(w_ref, dtype=torch.float64), rtol=1e-12, atol=1e-14)


# ---- the maths the method rests on, on hand-built cases --------------------------------------------------------------
def test_memory_means_and_flags_on_a_hand_built_memory():
    # 10 pairs, E = 4 total epochs, statistics before epoch e = 2 (epochs 0 and 1 recorded).
    # pair 0: losses (0.2, 0.2) -> very low; pair 9: (9, 9) -> very high; pairs 1-8: (3, 5) -> middle.
    M = torch.full((10, 4), float("nan"), dtype=torch.float64)
    M[:, 0], M[:, 1] = 3.0, 5.0
    M[0, :2], M[9, :2] = 0.2, 9.0
    args = replace(m.Args(), beta_np=1.5, beta_fp=1.5)
    # paper: plain mean -> m = (0.2, 4, ..., 4, 9); mu = (0.2 + 32 + 9)/10 = 4.12
    s = m.memory_statistics(M, 2, 4, replace(args, memory_mean="paper"))
    m_paper = torch.tensor([0.2] + [4.0] * 8 + [9.0], dtype=torch.float64)
    torch.testing.assert_close(s["m"], m_paper)
    mu = 4.12
    sigma = math.sqrt(((0.2 - mu) ** 2 + 8 * (4 - mu) ** 2 + (9 - mu) ** 2) / 10)  # population std
    assert s["mu"].item() == pytest.approx(mu) and s["sigma"].item() == pytest.approx(sigma)
    # thresholds mu -/+ 1.5 sigma = 4.12 -/+ 3.41 -> only pair 0 is noisy, only pair 9 faulty
    assert s["np_mask"].nonzero().flatten().tolist() == [0] and s["fp_mask"].nonzero().flatten().tolist() == [9]
    # code: m_i = mean_{e'<2} M[i,e'] (e'+1)/E = (M[i,0] * 1/4 + M[i,1] * 2/4) / 2
    s = m.memory_statistics(M, 2, 4, replace(args, memory_mean="code"))
    m_code = torch.tensor([(0.2 / 4 + 0.2 / 2) / 2] + [(3 / 4 + 5 / 2) / 2] * 8 + [(9 / 4 + 9 / 2) / 2],
                          dtype=torch.float64)
    torch.testing.assert_close(s["m"], m_code)
    assert s["np_mask"].nonzero().flatten().tolist() == [0] and s["fp_mask"].nonzero().flatten().tolist() == [9]
    # a pair never seen (all NaN) is neither counted in mu nor flagged
    M2 = torch.cat([M, torch.full((1, 4), float("nan"), dtype=torch.float64)])
    s2 = m.memory_statistics(M2, 2, 4, replace(args, memory_mean="paper"))
    assert s2["mu"].item() == pytest.approx(mu) and not s2["np_mask"][10] and not s2["fp_mask"][10]


def test_gaussian_pdf_weight_and_kernel_against_the_formula():
    mu, sigma = torch.tensor(4.0, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    loss = torch.tensor([4.0, 4.1, 3.9, 5.0, 2.0], dtype=torch.float64)
    flagged = torch.tensor([True, True, True, True, False])
    pdf = m.pair_weights(loss, flagged, mu, sigma, "pdf")
    by_hand = [math.exp(-((l - 4.0) ** 2) / (2 * 0.05**2)) / (0.05 * math.sqrt(2 * math.pi)) for l in loss.tolist()]
    torch.testing.assert_close(pdf[:4], torch.tensor(by_hand[:4], dtype=torch.float64), rtol=1e-12, atol=1e-300)
    assert pdf[4] == 1.0  # not flagged: weight 1
    # the pitfall of the card: with sigma < 1/sqrt(2 pi) ~ 0.4 the pdf at the mean exceeds 1 (here 7.98)
    assert pdf[0].item() == pytest.approx(1 / (0.05 * math.sqrt(2 * math.pi))) and pdf[0] > 1
    kernel = m.pair_weights(loss, flagged, mu, sigma, "kernel")
    torch.testing.assert_close(kernel, torch.tensor([1.0, math.exp(-2), math.exp(-2), math.exp(-200), 1.0],
                                                    dtype=torch.float64))
    assert (kernel <= 1).all()
    # the weight carries no gradient: d(w l)/dl = w
    l = loss.clone().requires_grad_()
    (grad,) = torch.autograd.grad((m.pair_weights(l, flagged, mu, sigma, "kernel") * l).sum(), l)
    torch.testing.assert_close(grad, kernel)


# ---- the planted bad pairs really are what the card describes ------------------------------------------------------
def test_noisy_pairs_are_planted_as_described():
    args = m.Args()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 1, 40, generator=g)
    xp, noisy, faulty = m.plant_bad_pairs(x, args, seed=3)
    assert int(noisy.sum()) == 10 and int(faulty.sum()) == 10 and not (noisy & faulty).any()
    assert torch.equal(xp[~noisy], x[~noisy])  # everything else untouched (faulty series are corrupted per fetch)
    xi = (xp[noisy] - 0.2 * x[noisy]) / 2.0  # the recovered pattern xi
    torch.testing.assert_close(xi.mean(-1), torch.zeros(10, 1), atol=1e-5, rtol=0)  # standardised
    torch.testing.assert_close(xi.std(-1, correction=0), torch.ones(10, 1), atol=1e-4, rtol=0)
    assert xi.diff(dim=-1).abs().mean() < 0.6 * xi.abs().mean()  # smooth: a random walk, not white noise
    # the noise dominates: a noisy series correlates with its own xi, far less with its clean original
    corr = lambda a, b: ((a - a.mean(-1, keepdim=True)) * (b - b.mean(-1, keepdim=True))).mean(-1) / (  # noqa: E731
        a.std(-1, correction=0) * b.std(-1, correction=0))
    assert corr(xp[noisy], xi).mean() > 0.95 and corr(xp[noisy], x[noisy]).abs().mean() < 0.4
    # the same seed plants the same pairs, another seed other ones
    assert torch.equal(m.plant_bad_pairs(x, args, seed=3)[1], noisy)
    assert not torch.equal(m.plant_bad_pairs(x, args, seed=4)[1], noisy)


def test_views_and_faulty_views_are_built_as_described():
    args = m.Args()
    x = torch.arange(40, dtype=torch.float32).repeat(6, 1)[:, None] + 1  # (6, 1, 40): values 1..40, all distinct
    faulty = torch.tensor([False, False, False, True, True, True])
    no_noise = replace(args, jitter_sigma=0.0, scale_sigma=0.0)
    weak, strong = m.make_views(x, faulty, no_noise, torch.Generator().manual_seed(0))
    assert torch.equal(weak, x)  # scale 0 -> the weak view is the series
    for b in range(6):
        values = strong[b, 0]
        if not faulty[b]:  # a permutation of contiguous segments: same values, runs of +1 steps
            assert sorted(values.tolist()) == x[b, 0].tolist()
            runs = 1 + int((values.diff() != 1).sum())
            assert 1 <= runs <= args.max_segments
        else:  # sign flipped, reversed (runs of -1 steps, in magnitude) and shuffled into at most 4 segments
            assert (values < 0).all() and sorted((-values).tolist()) == x[b, 0].tolist()
            # the strong view had <= max_segments runs; reversing keeps them, 4 segments add <= 3 breaks
            assert 1 + int(((-values).diff() != -1).sum()) <= args.max_segments + 3
    # with the default noise: weak = per-channel scale, constant ratio along time
    weak, _ = m.make_views(x, faulty, args, torch.Generator().manual_seed(1))
    ratio = weak / x
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    # segment permutation: k = 2..max_segments, every row a permutation of the time axis
    k = torch.tensor([2, 3, 5, 40])
    p = m.permute_segments(torch.arange(40.0).repeat(4, 1, 1), k, torch.Generator().manual_seed(5))  # (4, 1, 40)
    for b in range(4):
        assert sorted(p[b, 0].tolist()) == list(range(40))
        assert 1 + int((p[b, 0].diff() != 1).sum()) <= int(k[b])


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--warm-epochs", "50", "--epochs", "10"], "warm-epochs"),
    (["--tau", "0"], "tau"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


@pytest.mark.parametrize("change, word", [
    (dict(noisy_rate=0.6, faulty_rate=0.5), "rate"),
    (dict(widths=(8, 16), blocks=(1,)), "widths"),
    (dict(max_segments=1), "max-segments"),
    (dict(beta_fp=-1.0), "beta"),
])
def test_bad_arguments_in_process(change, word):
    with pytest.raises(shared.UsageError, match=word):
        m.validate(replace(m.Args(), **change))


def write_split(folder, name, samples, labels):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"samples": samples, "labels": labels}, folder / name)


def test_missing_test_file_is_a_usage_error(tmp_path):
    write_split(tmp_path, "train.pt", torch.zeros(4, 1, 10), torch.zeros(4, dtype=torch.long))
    assert_usage_error(run_script(SLUG, "--data-dir", tmp_path), "missing file", "test.pt")


@pytest.mark.parametrize("samples, labels, word", [
    (torch.zeros(4, 1, 2, 10), torch.zeros(4, dtype=torch.long), "samples must be"),  # 4-d samples
    (torch.zeros(4, 1, 10), torch.zeros(3, dtype=torch.long), "same n"),  # length mismatch
    (torch.full((4, 1, 10), float("nan")), torch.zeros(4, dtype=torch.long), "nan"),
    (torch.zeros(4, 1, 10), torch.tensor([0.0, 0.5, 1.0, 2.0]), "integers"),
])
def test_malformed_tstcc_files_name_the_problem(tmp_path, samples, labels, word):
    write_split(tmp_path, "train.pt", samples, labels)
    write_split(tmp_path, "test.pt", torch.zeros(2, 1, 10), torch.zeros(2, dtype=torch.long))
    with pytest.raises(shared.UsageError, match="(?i)" + word) as err:
        m.load_tstcc(replace(m.Args(), data_dir=str(tmp_path)))
    assert "train.pt" in str(err.value)


def test_not_a_torch_file_or_not_a_dict_is_a_usage_error(tmp_path):
    (tmp_path / "train.pt").write_text("not torch")
    with pytest.raises(shared.UsageError, match="cannot read"):
        m.load_tstcc(replace(m.Args(), data_dir=str(tmp_path)))
    torch.save([1, 2], tmp_path / "train.pt")
    with pytest.raises(shared.UsageError, match="keys"):
        m.load_tstcc(replace(m.Args(), data_dir=str(tmp_path)))


@pytest.mark.parametrize("multilabel", [False, True])
def test_well_formed_tstcc_files_load_and_run(tmp_path, multilabel):
    g = torch.Generator().manual_seed(8)
    n, n_test, C, T = 96, 32, 3, 24
    if multilabel:  # PTB-XL style (N, K) multi-hot labels -> BCE and macro AUROC
        y, y_test = (torch.rand(n, 4, generator=g) < 0.5).float(), (torch.rand(n_test, 4, generator=g) < 0.5).float()
    else:
        y, y_test = torch.arange(n) % 3, torch.arange(n_test) % 3
    write_split(tmp_path, "train.pt", torch.randn(n, C, T, generator=g), y)
    write_split(tmp_path, "test.pt", torch.randn(n_test, T, generator=g)[:, None].repeat(1, C, 1), y_test)
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path), out_dir=str(tmp_path), batch_size=32)
    data = m.load_tstcc(args)
    assert data["x"].shape == (n, C, T) and data["x_test"].shape == (n_test, C, T)
    assert data["y"].dtype == (torch.float32 if multilabel else torch.long)
    record = m.main(args)
    metric = "probe_auroc" if multilabel else "probe_acc"
    assert record["key"]["metric"] == metric and math.isfinite(record["results"]["dbpm"][metric])


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
