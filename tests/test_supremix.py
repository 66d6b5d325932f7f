"""supremix: analytic mixture logits == materialised mixtures (values and gradients) == a brute-force loop over every
mixture vector; the distance-magnified weights and the loss on hand-worked cases; the gap-label split; determinism;
bad arguments; DIR-format --data-dir files; and (opt-in) the claim at the default preset."""

import csv
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

SLUG = "supremix"
m = load(SLUG)


def random_batch(V=17, d=6, n_labels=9, seed=0):
    """float64 unit vectors, integer labels with repeats (and some anchors without a same-label partner)."""
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(V, d, dtype=torch.float64, generator=g), dim=1).requires_grad_()
    y = torch.randint(0, n_labels, (V,), generator=g).double()
    alpha = torch.rand(V, V, dtype=torch.float64, generator=g)
    return f, y, alpha


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert without_timing(other["results"]) != without_timing(first["results"])


# ---- fused (analytic logits) == reference (every mixture vector materialised) -------------------------------------
@pytest.mark.parametrize("variant", list(m.LOSS_FLAGS))
def test_analytic_loss_matches_materialised_mixtures_values_and_gradients(variant):
    f, y, alpha = random_batch()
    use_neg, use_pos, weighted = m.LOSS_FLAGS[variant]
    kw = {"tau": 0.3, "window": 3.0, "use_neg": use_neg, "use_pos": use_pos, "weighted": weighted, "weight_unit": 2.0}
    fast, slow = m.supremix_loss(f, y, alpha, **kw), m.supremix_loss_reference(f, y, alpha, **kw)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    (g_fast,), (g_slow,) = torch.autograd.grad(fast, f), torch.autograd.grad(slow, f)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12)


def test_whole_model_both_loss_paths_give_the_same_gradients():
    torch.manual_seed(0)
    net = m.Net((4, 8, 8), 5, contrastive=True).double()
    x = torch.randn(18, 1, 20, 20, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 4, 5, 5, 6, 9] * 2, dtype=torch.float64)
    alpha = torch.rand(18, 18, dtype=torch.float64)
    grads = []
    for loss_fn in (m.supremix_loss, m.supremix_loss_reference):
        loss = loss_fn(net(x), y, alpha, 0.3, 5.0)
        grads.append([loss, *torch.autograd.grad(loss, list(net.parameters()))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_faithful_max_shift_changes_the_loss_but_stays_finite():
    f, y, alpha = random_batch(seed=3)
    exact = m.supremix_loss(f, y, alpha, 0.3, 3.0)
    shifted = m.supremix_loss(f, y, alpha, 0.3, 3.0, faithful_max_shift=True)
    assert torch.isfinite(shifted) and not torch.isclose(exact, shifted)


# ---- the maths, independently: a loop that builds every mixture vector ------------------------------------------
def brute_force_loss(f, y, alpha, tau, window, use_neg=True, use_pos=True, weighted=True, unit=1.0):
    """Sec. 3, written from the definitions with python loops (no shared code with the method file)."""
    f, y, alpha = f.detach().numpy(), y.numpy(), alpha.numpy()
    V, per_anchor = len(y), []
    w = (lambda dy: 1 + abs(dy) / unit) if weighted else (lambda dy: 1.0)
    for a in range(V):
        cols = []  # (logit, weight, is_positive)
        for b in range(V):
            if b != a:
                cols.append((f[a] @ f[b] / tau, w(y[a] - y[b]), y[b] == y[a]))
        for k in range(V):
            if use_neg and y[k] != y[a]:
                mix = alpha[a, k] * f[a] + (1 - alpha[a, k]) * f[k]  # anchor-inclusive: a hard negative
                y_mix = alpha[a, k] * y[a] + (1 - alpha[a, k]) * y[k]
                cols.append((f[a] @ mix / tau, w(y[a] - y_mix), False))
        for j in range(V):
            for k in range(V):
                if use_pos and y[j] < y[a] < y[k] and y[a] - y[j] < window and y[k] - y[a] < window:
                    lam = (y[k] - y[a]) / (y[k] - y[j])
                    assert abs(lam * y[j] + (1 - lam) * y[k] - y[a]) < 1e-12  # the mixed label is the anchor's
                    cols.append((f[a] @ (lam * f[j] + (1 - lam) * f[k]) / tau, 1.0, True))
        log_denom = math.log(sum(wt * math.exp(lg) for lg, wt, _ in cols))
        pos = [lg for lg, _, p in cols if p]
        if pos:
            per_anchor.append(-sum(lg - log_denom for lg in pos) / len(pos))
    return float(np.mean(per_anchor))


@pytest.mark.parametrize("variant", list(m.LOSS_FLAGS))
def test_loss_equals_brute_force_over_every_mixture_vector(variant):
    f, y, alpha = random_batch(V=13, seed=5)
    flags = m.LOSS_FLAGS[variant]
    got = m.supremix_loss(f, y, alpha, 0.3, 4.0, *flags, 1.5).item()
    assert abs(got - brute_force_loss(f, y, alpha, 0.3, 4.0, *flags, unit=1.5)) < 1e-12


def test_hand_worked_weights_and_loss():
    # three identical unit vectors (every logit = 1 at tau = 1), labels 0, 0, 2, alpha = 1/2:
    # anchor 0: real columns b=1 (positive, w=1), b=2 (w = 1 + 2 = 3); negative mixture with k=2: mixed label 1,
    # w = 1 + (1 - 1/2) * 2 = 2; no bracketing pair -> L_0 = -(1 - log(e (1 + 3 + 2))) = log 6; same for anchor 1;
    # anchor 2 has no positive at all and is masked out.
    f = F.normalize(torch.ones(3, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    alpha = torch.full((3, 3), 0.5, dtype=torch.float64)
    _, logw, pos, a_idx, _ = m.supremix_logits(f, y, alpha, 1.0, 5.0, True, True, True)
    torch.testing.assert_close(logw[0].exp(), torch.tensor([1, 1, 3, 1, 1, 2], dtype=torch.float64))
    assert pos[0, :3].tolist() == [False, True, False] and not pos[2].any() and len(a_idx) == 0
    assert math.isclose(m.supremix_loss(f, y, alpha, 1.0).item(), math.log(6), rel_tol=1e-12)
    assert math.isclose(m.supremix_loss(f, y, alpha, 1.0, weighted=False).item(), math.log(3), rel_tol=1e-12)
    # anchor-exclusive weight: labels 0, 1, 3 -> for anchor 1, lam = (3 - 1) / (3 - 0) = 2/3, and no other triple
    y3 = torch.tensor([0.0, 1.0, 3.0])
    _, _, tri = m.pair_masks(y3, 5.0)
    assert tri.nonzero().tolist() == [[1, 0, 2]]
    assert math.isclose(m.mix_lambda(y3, *(torch.tensor([i]) for i in (1, 0, 2))).item(), 2 / 3, rel_tol=1e-6)
    _, _, tri = m.pair_masks(torch.tensor([0.0, 1.0, 6.0]), 5.0)  # y_k - y_a = 5 is outside the window n = 5
    assert not tri.any()


def test_mixture_gradient_flows_only_through_the_anchor():
    # with f_b frozen, d l-_ak / d f_a = (alpha sg(f_a) + (1 - alpha) sg(f_k)) / tau: a mixture never moves f_k
    f, y, alpha = random_batch(V=5, seed=7)
    s_logits, *_ = m.supremix_logits(f, y, alpha, 0.5, 3.0, True, False, False)
    col = 5 + 2  # anchor 0's negative mixture with k = 2 (after the 5 real columns)
    if y[0] == y[2]:
        pytest.skip("labels collide")
    (g,) = torch.autograd.grad(s_logits[0, col], f)
    expected = torch.zeros_like(f)
    expected[0] = (alpha[0, 2] * f[0] + (1 - alpha[0, 2]) * f[2]).detach() / 0.5
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


# ---- the data ----------------------------------------------------------------------------------------------------
def test_gap_labels_never_in_training_long_tailed_train_uniform_test():
    args = replace(m.Args(), n_train=3000, n_test=1500)
    data = m.make_data(args, torch.device("cpu"))
    ytr, yte = data["y_train"].long(), data["y_test"].long()
    gap = torch.arange(args.gap[0], args.gap[1] + 1)
    assert not torch.isin(ytr, gap).any()  # no training sample at a held-out target
    assert torch.isin(yte, gap).sum() > 100  # ~10% of the uniform test set sits in the gap
    counts = torch.bincount(ytr, minlength=50)
    assert counts[:5].sum() > 5 * counts[40:45].sum() > 0  # long tail p(y) ~ exp(-y/15)
    # the image cues grow with the label: mean ellipse brightness area correlates with y
    assert np.corrcoef(data["x_test"].sum((1, 2, 3)).numpy(), yte.numpy())[0, 1] > 0.5
    again = m.make_data(replace(args, seed=9), torch.device("cpu"))  # data depends on data_seed only
    assert torch.equal(again["x_train"], data["x_train"])


# ---- bad arguments -------------------------------------------------------------------------------------------------
def test_bad_arguments_give_one_clear_sentence():
    assert_usage_error(run_script(SLUG, "--methods", "simclr"), "methods", "simclr")
    for kw, word in [({"tau": 0.0}, "tau"), ({"gap": (30, 20)}, "gap"), ({"beta": (0.0, 8.0)}, "beta"),
                     ({"methods": ()}, "methods"), ({"img_size": 32}, "img-size"), ({"n_train": 10}, "n-train")]:
        with pytest.raises(shared.UsageError, match=word):
            m.validate(replace(m.Args(), **kw))


# ---- --data-dir: the DIR csv format --------------------------------------------------------------------------------
def write_dir(root, rows, images=True):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "agedb.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "age", "split"][: len(rows[0])])
        w.writerows(rows)
    if images:
        rng = np.random.default_rng(0)
        for path, *_ in rows:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((30, 24)) * 255).astype(np.uint8)).save(root / path)


def tiny_rows():
    return [[f"img/{i}.png", str(20 + i % 7), "train" if i < 24 else ("val" if i < 26 else "test")] for i in range(32)]


def test_missing_csv_is_a_usage_error(tmp_path):
    assert_usage_error(run_script(SLUG, "--data-dir", tmp_path, "--preset", "smoke"), "missing file", "agedb.csv")


@pytest.mark.parametrize("mutate, word", [
    (lambda r: [[p, a] for p, a, _ in r], "columns"),
    (lambda r: [[r[0][0], "old", "train"]] + r[1:], "not a number"),
    (lambda r: [[r[0][0], "30", "holdout"]] + r[1:], "not train, val or test"),
    (lambda r: [["img/none.png", "30", "train"]] + r[1:], "cannot read image"),
    (lambda r: [x for x in r if x[2] != "test"], "one test row"),
])
def test_malformed_dir_files_name_the_file(tmp_path, mutate, word):
    write_dir(tmp_path, tiny_rows())
    write_dir(tmp_path, mutate(tiny_rows()), images=False)
    with pytest.raises(shared.UsageError, match=word) as err:
        m.load_dir(replace(m.PRESETS["smoke"], data_dir=str(tmp_path)), torch.device("cpu"))
    assert "agedb.csv" in str(err.value)


def test_well_formed_dir_loads_and_runs(tmp_path):
    write_dir(tmp_path, tiny_rows())
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path), out_dir=str(tmp_path), batch_size=8, img_size=16)
    data = m.load_dir(args, torch.device("cpu"))
    assert data["x_train"].shape == (24, 1, 16, 16) and data["x_test"].shape == (6, 1, 16, 16)
    assert data["y_train"][:3].tolist() == [20.0, 21.0, 22.0]
    assert 0 <= data["x_train"].min() <= data["x_train"].max() <= 1
    record = m.main(args)
    assert math.isfinite(record["results"]["supremix"]["mae"])


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.slow
def test_bench_runs_and_checks_the_paths_agree(tmp_path):
    record = m.main(replace(m.PRESETS["smoke"], bench=True, out_dir=str(tmp_path)))
    assert all(r["reference_ms"] > 0 and r["fused_ms"] > 0 for r in record["rows"])


@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
