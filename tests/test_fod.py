"""fod: determinism, fused == reference I2Correlation statistics (outputs and gradients, with and without the official
eps), the whole model on both paths, the maths against brute force (AUROC pair count, RBF target rows, exact KL and
entropy), the gradient routing of the minimax, the planted defects, the MVTec AD loader, bad arguments."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_usage_error, load, run_script, smoke_determinism

import shared

SLUG = "fod"
m = load(SLUG)
GRID = (5, 7)  # odd, non-square grid: L = 35


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert other["results"]["FOD"] != first["results"]["FOD"]


def random_inputs(n=2, heads=3, dh=6, grid=GRID, ref_batch=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1]
    q = torch.randn(n, heads, L, dh, generator=gen, dtype=torch.float64)
    # inter branch: keys / values come from one reference, broadcast over the batch (as in the model)
    kv_n = 1 if ref_batch else n
    k, v = (torch.randn(kv_n, heads, L, dh, generator=gen, dtype=torch.float64) for _ in range(2))
    sigma = torch.rand(n, heads, L, 2, generator=gen, dtype=torch.float64) * 1.7 + 0.25
    leaves = [t.requires_grad_(True) for t in (q, k, v, sigma)]
    if ref_batch:
        k, v = k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
    return leaves, (q, k, v, sigma)


@pytest.mark.parametrize("eps", [0.0, 1e-4])
@pytest.mark.parametrize("ref_batch", [False, True])
def test_fused_equals_reference_outputs_statistics_and_gradients(eps, ref_batch):
    leaves, (q, k, v, sigma) = random_inputs(ref_batch=ref_batch)
    out_r, st_r = m.attention_reference(q, k, v, sigma, GRID, eps)
    out_f, st_f = m.attention_fused(q, k, v, sigma, GRID, eps)
    torch.testing.assert_close(out_f, out_r, atol=1e-12, rtol=1e-10)
    assert set(st_f) == set(st_r) == {"disc_target", "disc_corr", "entropy"}
    g_out = torch.randn_like(out_r)
    for key in st_r:
        torch.testing.assert_close(st_f[key], st_r[key], atol=1e-10, rtol=1e-10)
        w = torch.randn_like(st_r[key])  # a random weighting of the rows checks every row's gradient
        grads_r = torch.autograd.grad((st_r[key] * w).sum() + (out_r * g_out).sum(), leaves, retain_graph=True,
                                      allow_unused=True)
        grads_f = torch.autograd.grad((st_f[key] * w).sum() + (out_f * g_out).sum(), leaves, retain_graph=True,
                                      allow_unused=True)
        for name, a, b in zip("qkvs", grads_f, grads_r):
            a = torch.zeros_like(leaves["qkvs".index(name)]) if a is None else a
            b = torch.zeros_like(leaves["qkvs".index(name)]) if b is None else b
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=f"{key} d/d{name} eps={eps}")


@pytest.mark.parametrize("fn", [m.attention_reference, m.attention_fused], ids=["reference", "fused"])
def test_minimax_gradient_routing(fn):
    """disc_target moves only the target (sigma); disc_corr and entropy move only the correlation (q, k)."""
    leaves, (q, k, v, sigma) = random_inputs(seed=1)
    _, st = fn(q, k, v, sigma, GRID, 1e-4)
    for key, moved in (("disc_target", "s"), ("disc_corr", "qk"), ("entropy", "qk")):
        grads = torch.autograd.grad(st[key].sum(), leaves, retain_graph=True, allow_unused=True)
        for name, g in zip("qkvs", grads):
            nonzero = g is not None and g.abs().max().item() > 0
            assert nonzero == (name in moved), (key, name)


def test_whole_model_same_on_both_paths():
    torch.manual_seed(0)
    x = torch.randn(3, 35, 10, dtype=torch.float64)
    ref = m.FOD(10, 12, 3, 2, GRID, x.mean(0), m.attention_reference).double().eval()
    fused = m.FOD(10, 12, 3, 2, GRID, x.mean(0), m.attention_fused).double().eval()
    fused.load_state_dict(ref.state_dict())
    (xr, sr), (xf, sf) = ref(x), fused(x)
    torch.testing.assert_close(xf, xr, atol=1e-10, rtol=1e-8)
    for branch in ("intra", "inter"):
        for key in ("disc_target", "disc_corr", "entropy"):
            torch.testing.assert_close(m.layer_mean(sf, branch, key), m.layer_mean(sr, branch, key),
                                       atol=1e-9, rtol=1e-8)
    args = m.Args()
    torch.testing.assert_close(m.fod_loss(fused, xf, x, sf, args), m.fod_loss(ref, xr, x, sr, args))


def test_auroc_matches_brute_force_pair_count():
    rng = np.random.default_rng(0)
    for trial in range(5):
        scores = rng.integers(0, 6, 40).astype(float)  # many ties
        labels = rng.random(40) < 0.4
        pos, neg = scores[labels], scores[~labels]
        brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert abs(m.auroc(scores, labels) - brute) < 1e-12
    assert m.auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1])) == 1.0


def test_rbf_target_rows_sum_to_one_and_match_the_formula():
    _, (_, _, _, sigma) = random_inputs(seed=2)
    t = m.target_correlation(sigma.detach(), GRID)  # (N, H, L, L)
    torch.testing.assert_close(t.sum(-1), torch.ones(t.shape[:-1], dtype=t.dtype))
    h, w = GRID
    i, j, b, hd = 17, 4, 1, 2  # one entry by hand
    (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
    sy, sx = sigma[b, hd, i].tolist()
    g = lambda r, c: math.exp(-(ri - r) ** 2 / (2 * sy ** 2) - (ci - c) ** 2 / (2 * sx ** 2))
    z = sum(g(r, c) for r in range(h) for c in range(w))
    assert abs(t[b, hd, i, j].item() - g(rj, cj) / z) < 1e-12
    # the separable normaliser and entropy used by the fused path
    logz, ent, _, _ = m._prior_rows(sigma.detach(), GRID)
    assert abs(logz[b, hd, i].item() - math.log(z)) < 1e-10
    probs = [g(r, c) / z for r in range(h) for c in range(w)]
    assert abs(ent[b, hd, i].item() + sum(p * math.log(p) for p in probs)) < 1e-10


def test_exact_statistics_match_a_literal_double_loop():
    """eps = 0: KL(P||T~) + KL(T~||P) and Ent(P) of one row written as plain Python sums."""
    _, (q, k, v, sigma) = random_inputs(n=1, heads=1, dh=4, grid=(2, 3), seed=3)
    _, st = m.attention_fused(q, k, v, sigma, (2, 3), 0.0)
    t = m.target_correlation(sigma.detach(), (2, 3))[0, 0]
    for i in range(6):
        s = [(q[0, 0, i] @ k[0, 0, j]).item() / 2.0 for j in range(6)]  # scale 1/sqrt(4)
        p = [math.exp(x) / sum(math.exp(y) for y in s) for x in s]
        kl = sum(p[j] * math.log(p[j] / t[i, j].item()) + t[i, j].item() * math.log(t[i, j].item() / p[j])
                 for j in range(6))
        assert abs(st["disc_corr"][0, 0, i].item() - kl) < 1e-10
        assert abs(st["entropy"][0, 0, i].item() + sum(x * math.log(x) for x in p)) < 1e-10


def test_eps_in_the_logs_only_shifts_statistics_slightly_for_broad_targets():
    """The official eps = 1e-4 vs the exact maths: close (1e-3 relative) when T~ and P have no entry below eps."""
    _, (q, k, v, _) = random_inputs(n=1, heads=2, dh=4, grid=(3, 3), seed=4)
    sigma = torch.full((1, 2, 9, 2), 2.0, dtype=torch.float64)
    _, exact = m.attention_fused(q * 0.3, k, v, sigma, (3, 3), 0.0)
    _, smoothed = m.attention_reference(q * 0.3, k, v, sigma, (3, 3), 1e-4)
    for key in exact:
        torch.testing.assert_close(smoothed[key], exact[key], rtol=1e-3, atol=1e-4)


def test_planted_defects_have_masks_of_the_right_size():
    for ci, cls in enumerate(m.CLASSES):
        imgs, labels, masks = m.make_class(cls, 3, 10, np.random.default_rng(ci))
        assert imgs.shape == (13, 3, 64, 64) and imgs.dtype == np.float32 and 0 <= imgs.min() and imgs.max() <= 1
        area = masks.reshape(13, -1).mean(1)
        assert (area[:3] == 0).all() and ((area[3:] >= 0.003) & (area[3:] <= 0.06)).all(), (cls, area)
        assert labels.tolist() == [0] * 3 + [1] * 10


def write_png(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def tiny_mvtec(root, size=20):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    for i in range(6):
        write_png(root / "toy" / "train" / "good" / f"{i:03d}.png", img())
    write_png(root / "toy" / "test" / "good" / "000.png", img())
    write_png(root / "toy" / "test" / "good" / "001.png", img())
    mask = np.zeros((size, size), np.uint8)
    mask[4:9, 5:11] = 255
    for i in range(2):
        write_png(root / "toy" / "test" / "crack" / f"{i:03d}.png", img())
        write_png(root / "toy" / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)


def test_well_formed_mvtec_tree_loads_and_runs(tmp_path):
    tiny_mvtec(tmp_path / "mvtec")
    train, test, labels, masks = m.load_mvtec(str(tmp_path / "mvtec"), "toy", 40)
    assert train.shape == (6, 3, 40, 40) and test.shape == (4, 3, 40, 40)
    assert labels.tolist() == [1, 1, 0, 0]  # sorted: crack/ before good/
    assert masks[0].sum() == 10 * 12 and masks[2].sum() == 0  # the 5x6 box, resized x2 with nearest
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path), data_dir=str(tmp_path / "mvtec"), classes=("toy",),
                   image_size=32, batch=4)
    record = m.main(args)
    assert math.isfinite(record["results"]["FOD"]["pixel_auroc"])


def test_missing_mask_and_broken_png_name_the_file(tmp_path):
    tiny_mvtec(tmp_path)
    (tmp_path / "toy" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(shared.UsageError, match="001_mask.png"):
        m.load_mvtec(str(tmp_path), "toy", 32)
    (tmp_path / "toy" / "test" / "crack" / "001.png").unlink()
    (tmp_path / "toy" / "train" / "good" / "002.png").write_text("not a png")
    with pytest.raises(shared.UsageError, match="002.png"):
        m.load_mvtec(str(tmp_path), "toy", 32)
    with pytest.raises(shared.UsageError, match="train"):
        m.load_mvtec(str(tmp_path), "absent", 32)


def test_broken_png_through_the_command_line(tmp_path):
    tiny_mvtec(tmp_path)
    (tmp_path / "toy" / "test" / "good" / "001.png").write_bytes(b"\x89PNG broken")
    proc = run_script(SLUG, "--preset", "smoke", "--data-dir", tmp_path, "--classes", "toy", "--image-size", "32",
                      "--out-dir", tmp_path / "runs")
    assert_usage_error(proc, "001.png")


@pytest.mark.parametrize("flags, words", [
    (["--heads", "3"], ["heads"]),
    (["--classes", "zebra"], ["classes"]),
    (["--backbone", "wrn50"], ["weights"]),
    (["--image-size", "60"], ["image-size"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script(SLUG, *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
