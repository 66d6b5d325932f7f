"""ResAD++ (methods/resad.py): determinism, loop == batched paths, the maths by brute force, the flow's log-det,
bad arguments and MVTec-format --data-dir files, and the claim at the default preset (opt-in)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

SLUG = "resad"
m = load(SLUG)


# ---- determinism ----------------------------------------------------------------------------------------------------
def test_smoke_is_deterministic_and_the_seed_matters(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path, conference=False)
    assert set(first["results"]) == {"resad++", "initial_features", "patchcore_4shot"}
    assert without_timing(first["results"]) != without_timing(other["results"])
    assert (tmp_path / "resad__smoke__s0.png").stat().st_size > 10_000


# ---- reference (literal loop) == fast (batched) paths -----------------------------------------------------------------
def test_batched_matching_equals_the_per_patch_loop():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x, pool = torch.randn(37, 11, generator=g, dtype=dtype), torch.randn(53, 11, generator=g, dtype=dtype)
        assert torch.equal(m.match_loop(x, pool), m.match_batched(x, pool))


def test_batched_efdm_equals_the_per_channel_loop_outputs_and_gradients():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 5, 29, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, 29, generator=g, dtype=torch.float64, requires_grad=True)
    ref, fast = m.efdm_loop(r, q, 0.4), m.efdm_batched(r, q, 0.4)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (r, q), w), torch.autograd.grad(ref, (r, q), w)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # fdm_alpha = 0 copies q's sorted values onto r's ranks; alpha = 1 leaves r unchanged
    full = m.efdm_batched(r, q, 0.0).detach()
    torch.testing.assert_close(full.sort(-1).values, q.detach().sort(-1).values)
    assert torch.equal(full.argsort(-1), r.detach().argsort(-1))
    torch.testing.assert_close(m.efdm_batched(r, q, 1.0), r)


def test_whole_model_scores_agree_between_loop_and_batched_matching(monkeypatch):
    args = replace(m.PRESETS["smoke"], n_test=2)
    data = m.build_data(args, torch.device("cpu"))
    backbone = m.RandomCNN(args.data_seed).eval()
    feats = {c: m.extract(backbone, imgs, 2) for c, (imgs, _) in data["seen"].items()}
    masks = {c: mk for c, (_, mk) in data["seen"].items()}
    model, flows, _ = m.train_model("t", "residual", "barrier", feats, masks, replace(args, epochs=1), "cpu")
    test = data["unseen"]["pill"]
    model, x = model.double(), [f.double() for f in m.extract(backbone, test["test"][0], 2)]  # float64: no near-ties
    pools = [p.double() for p in m.make_pool(m.extract(backbone, test["ref"], 2))]
    fast = m.score_resad(model, flows, x, pools, "residual", args, 64)
    monkeypatch.setattr(m, "match_batched", m.match_loop)
    torch.testing.assert_close(m.score_resad(model, flows, x, pools, "residual", args, 64), fast)


# ---- the maths the method rests on, by brute force and by hand --------------------------------------------------------
def test_residual_is_feature_minus_nearest_reference_by_brute_force():
    g = torch.Generator().manual_seed(2)
    x, pool = torch.rand(2, 6, 3, 4, generator=g, dtype=torch.float64), torch.rand(9, 6, generator=g,
                                                                                   dtype=torch.float64)
    r_sq, dist = m.residual_features(x, pool, "squared")
    r_signed, _ = m.residual_features(x, pool, "signed")
    for b in range(2):
        for i in range(3):
            for j in range(4):
                v = x[b, :, i, j]
                cos = [float(v @ p / (v.norm() * p.norm())) for p in pool]
                near = pool[int(np.argmax(cos))]
                torch.testing.assert_close(r_signed[b, :, i, j], v - near)
                torch.testing.assert_close(r_sq[b, :, i, j], (v - near) ** 2)
                assert dist[b, i, j].item() == pytest.approx(1 - max(cos))
    # a patch that IS a reference feature has a zero residual
    r0, _ = m.residual_features(pool[:4].T.reshape(1, 6, 2, 2), pool, "signed")
    assert r0.abs().max().item() < 1e-12


def test_log_barrier_occ_loss_on_a_hand_worked_case():
    sp = lambda u: math.log1p(math.exp(u))  # noqa: E731
    A = lambda n: math.sqrt(n + 1) - 1  # noqa: E731
    # norms 3, 0, 0.2, 5 -> A = 1, 0, 0.0954, 1.449; positions 0-2 normal, 3 anomalous
    e = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.2, 0.0], [3.0, 4.0]], dtype=torch.float64)
    t = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.2, 0.0], [4.0, 3.0]], dtype=torch.float64)
    abn = torch.tensor([False, False, False, True])
    r_max = min(0.9 * A(5.0), 0.4)  # = 0.4
    r_min = 0.99 * r_max
    over = sp(A(3) - r_max) * math.exp(A(3) - r_max)  # position 0: above the shell
    under = (sp(r_min - A(0)) * math.exp(r_min - A(0)) + sp(r_min - A(0.2)) * math.exp(r_min - A(0.2))) / 2
    mse, cos = ((3 - 4) ** 2 + (4 - 3) ** 2) / 2, 24 / 25
    expected = over + under + mse + (1 - cos)  # anomaly A = 1.449 is beyond beta = 0.5: no barrier term
    assert m.occ_loss(e, t, abn).item() == pytest.approx(expected, rel=1e-10)
    # an anomaly close to the origin sets r_max = 0.9 A_abn and triggers the outer barrier at beta = r_max + 0.1
    e2, t2 = e.clone(), t.clone()
    e2[3] = t2[3] = torch.tensor([0.3, 0.4], dtype=torch.float64)  # norm 0.5, A = 0.2247
    r_max = 0.9 * A(0.5)
    r_min, beta = 0.99 * r_max, r_max + 0.1
    over = sp(A(3) - r_max) * math.exp(A(3) - r_max)
    under = (sp(r_min - A(0)) * math.exp(r_min - A(0)) + sp(r_min - A(0.2)) * math.exp(r_min - A(0.2))) / 2
    barrier = sp(beta - A(0.5)) * math.exp(beta - A(0.5))
    assert m.occ_loss(e2, t2, abn).item() == pytest.approx(over + under + barrier, rel=1e-10)
    # without anomalies r_max = 0.4; the exp() weights are constants for the gradient
    e3 = e[:3].clone().requires_grad_(True)
    m.occ_loss(e3, t[:3], abn[:3]).backward()
    a0 = A(3.0)
    dA_dn = 0.5 / math.sqrt(3.0 + 1)  # dA/d||e|| at ||e|| = 3, and d||e||/de_0 = 1 there
    grad0 = 1 / (1 + math.exp(-(a0 - 0.4))) * math.exp(a0 - 0.4) * dA_dn  # softplus' = sigmoid
    assert e3.grad[0, 0].item() == pytest.approx(grad0, rel=1e-10)


def test_vq_assignment_is_the_argmin_distance():
    g = torch.Generator().manual_seed(3)
    r, codes = torch.randn(41, 7, generator=g, dtype=torch.float64), torch.randn(13, 7, generator=g,
                                                                                dtype=torch.float64)
    assert torch.equal(m.vq_assign(r, codes), torch.cdist(r, codes).argmin(1))
    assert torch.equal(m.vq_assign(codes, codes), torch.arange(13))


def test_flow_log_det_equals_the_jacobian_determinant():
    torch.manual_seed(4)
    flow = m.Flow(6, 4, 3, 1.9, torch.Generator().manual_seed(5)).double()
    for p in flow.parameters():  # non-trivial couplings and global scales
        p.data.add_(0.3 * torch.randn_like(p))
    for blk in flow.blocks:  # the rotation was drawn in float32: re-orthogonalise it in float64 (log|det| = 0 exactly)
        blk.w_perm = torch.linalg.qr(blk.w_perm)[0]
    x, c = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    z, logdet = flow(x, c)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], c[i : i + 1])[0][0], x[i])
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), rel=1e-9, abs=1e-9)
    logp_n, logp_a = m.log_likelihoods(z, logdet)
    normal = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(logp_n, (normal.log_prob(z).sum(1) + logdet) / 6)
    torch.testing.assert_close(logp_a, (normal.log_prob(z - 1).sum(1) + logdet) / 6)


def test_flow_losses_and_positional_encoding():
    logp_n = torch.tensor([-1.0, 0.5, -3.0, 2.0], dtype=torch.float64)
    logp_a = torch.tensor([-2.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    abn = torch.tensor([False, False, True, False])
    stage1 = m.flow_loss(logp_n, logp_a, abn, 0.0, -0.1, stage2=False)
    assert stage1.item() == pytest.approx(-F.logsigmoid(logp_n).mean().item())
    b_n, b_a = 0.0, -0.1
    p_abn = torch.softmax(torch.stack([logp_n, logp_a], 1), 1)[:, 1]
    pt = torch.where(abn, p_abn, 1 - p_abn)
    expected = (-F.logsigmoid(logp_n[~abn]).mean() - F.logsigmoid(logp_a[abn]).mean()
                + (-(1 - pt) ** 2 * pt.log()).mean()
                + F.softplus(b_n - torch.tensor(-1.0)) + 0)  # one normal below b_n; the anomaly is below b_a
    assert m.flow_loss(logp_n, logp_a, abn, b_n, b_a, stage2=True).item() == pytest.approx(expected.item())
    pe = m.positional_encoding(8, 3, 5, torch.device("cpu"))
    assert pe.shape == (15, 8) and torch.unique(pe, dim=0).shape[0] == 15  # every position is distinct


def test_procedural_defects_have_masks_and_change_the_image():
    rng = np.random.default_rng(0)
    for fam in m.FAMILIES:
        imgs, masks = m.make_family(fam, 2, 5, rng)
        assert imgs.shape == (7, 3, 64, 64) and 0 <= imgs.min() and imgs.max() <= 1
        assert masks[:2].sum() == 0
        area = masks[2:].reshape(5, -1).mean(1)
        assert (area > 0.001).all() and (area < 0.06).all(), (fam, area)


# ---- bad arguments and --data-dir files -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--residual", "cubic"], "residual"),
    (["--seen", "weave", "--unseen", "weave"], "share"),
    (["--stage1-epochs", "9", "--epochs", "8"], "stage1"),
    (["--backbone", "wrn50"], "weights"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


def write_mvtec(root, cls, n_good=2, broken_mask=False, no_mask=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    png = lambda p, a: (p.parent.mkdir(parents=True, exist_ok=True), Image.fromarray(a).save(p))  # noqa: E731
    for i in range(n_good):
        png(root / cls / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    png(root / cls / "test" / "good" / "000.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    png(root / cls / "test" / "crack" / "000.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    mpath = root / cls / "ground_truth" / "crack" / "000_mask.png"
    if not no_mask:
        png(mpath, mask)
    if broken_mask:
        mpath.write_text("not a png")


def mvtec_args(tmp_path, **kw):
    return replace(m.PRESETS["smoke"], data_dir=str(tmp_path), seen=("a",), unseen=("b",), k_shot=2, n_normal=2,
                   out_dir=str(tmp_path / "out"), **kw)


def test_well_formed_mvtec_folders_load_and_run(tmp_path):
    write_mvtec(tmp_path, "a")
    write_mvtec(tmp_path, "b", n_good=3)
    args = mvtec_args(tmp_path)
    data = m.load_mvtec(args, torch.device("cpu"))
    imgs, masks = data["seen"]["a"]
    assert imgs.shape == (4, 3, 64, 64) and masks.shape == (4, 1, 64, 64)
    area = masks.flatten(1).mean(1)  # train/good x2, then test/crack, test/good (folders in sorted order)
    torch.testing.assert_close(area, torch.tensor([0, 0, 100 / 1600, 0]), atol=0.01, rtol=0)
    assert data["unseen"]["b"]["ref"].shape == (2, 3, 64, 64)  # the first k_shot train/good images
    (tmp_path / "refs.txt").write_text("b/train/good/002.png\n")
    assert m.load_mvtec(replace(args, ref_list=str(tmp_path / "refs.txt")), "cpu")["unseen"]["b"]["ref"].shape[0] == 1
    record = m.main(replace(args, batch_size=2, conference=False))
    assert math.isfinite(record["results"]["resad++"]["b/pixel_auroc"])


def test_missing_mask_names_the_file(tmp_path):
    write_mvtec(tmp_path, "a", no_mask=True)
    write_mvtec(tmp_path, "b")
    with pytest.raises(shared.UsageError, match="000_mask.png"):
        m.load_mvtec(mvtec_args(tmp_path), torch.device("cpu"))


def test_unreadable_image_and_missing_folder_are_usage_errors(tmp_path):
    write_mvtec(tmp_path, "a", broken_mask=True)
    write_mvtec(tmp_path, "b")
    proc = run_script(SLUG, "--preset", "smoke", "--data-dir", tmp_path, "--seen", "a", "--unseen", "b",
                      "--k-shot", "2", "--out-dir", tmp_path / "out")
    assert_usage_error(proc, "cannot read", "000_mask.png")
    clean = tmp_path / "clean"
    write_mvtec(clean, "a")
    with pytest.raises(shared.UsageError, match="missing folder"):
        m.load_mvtec(replace(mvtec_args(clean), unseen=("nope",)), torch.device("cpu"))


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) ----------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
