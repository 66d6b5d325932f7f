"""vsformer: determinism, fused == reference view-set attention (with key-padding masks), exact invariance to the view
order, padded == unpadded view sets, the renderer and cameras against closed forms, retrieval mAP against sklearn,
the RotationNet PNG loader on files written here, bad arguments."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism

SLUG = "vsformer"
m = load(SLUG)
TINY = replace(m.PRESETS["smoke"], dim=12, heads=3, layers=2, image_size=16)


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, again, other = smoke_determinism(m, tmp_path)
    assert first["history"] == again["history"]
    assert other["history"] != first["history"]  # the seed drives the training shapes and the initialisations
    assert other["results"]["VSFormer"]["retrieval_mAP"] != first["results"]["VSFormer"]["retrieval_mAP"]


def padding_mask(n_views, V):
    return (torch.arange(V)[None] < torch.tensor(n_views)[:, None])[:, None, None]  # (B, 1, 1, V)


@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_equals_reference_outputs_and_gradients(with_mask):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 3, 7, 6, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    mask = padding_mask([1, 7, 3, 5, 2], 7) if with_mask else None  # every set keeps >= 1 view
    out_ref, out_fused = m.attention_reference(q, k, v, mask), m.attention_fused(q, k, v, mask)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, (q, k, v), g), torch.autograd.grad(out_ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_attention_is_a_softmax_over_the_real_views_only():
    """Hand-checked on one head: the weights are softmax(q.k / sqrt(d)) over the unpadded keys; padded values never
    reach the output."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 4, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = padding_mask([3], 4)
    w = torch.tensor([[math.exp(float(q[0, 0, i] @ k[0, 0, j]) / math.sqrt(2)) for j in range(3)] for i in range(4)])
    expected = (w / w.sum(1, keepdim=True)).double() @ v[0, 0, :3]
    torch.testing.assert_close(m.attention_reference(q, k, v, mask)[0, 0], expected)
    v2 = v.clone()
    v2[..., 3, :] += 100.0  # change the padded view
    torch.testing.assert_close(m.attention_fused(q, k, v2, mask), m.attention_fused(q, k, v, mask))


def tiny_model(attn_fn=m.attention_fused):
    torch.manual_seed(0)
    model = m.VSFormer(TINY, m.make_initializer(TINY), 5, attn_fn).double()
    for p in model.parameters():  # move BatchNorm running statistics away from the identity
        p.data += 0.01 * torch.randn_like(p)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_whole_model_same_logits_on_both_paths():
    ref, fused = tiny_model(m.attention_reference), tiny_model(m.attention_fused)
    h = torch.randn(4, 9, TINY.dim, dtype=torch.float64)
    valid = padding_mask([9, 2, 5, 1], 9)[:, 0, 0]
    with torch.no_grad():
        torch.testing.assert_close(fused(h, valid), ref(h, valid), atol=1e-10, rtol=1e-8)


def test_padded_sets_give_the_same_logits_as_the_sets_alone():
    """The independent check of the flexible view set: images of three shapes with 3, 7 and 20 views, batched with
    padding (garbage in the padded slots) vs each set on its own, no padding, through the whole model (CNN included)."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    sizes, V = [3, 7, 20], 20
    images = torch.randint(0, 256, (3, V, 3, 16, 16), generator=gen, dtype=torch.uint8)
    valid = padding_mask(sizes, V)[:, 0, 0]
    with torch.no_grad():
        padded = model(images, valid)  # (3, C)
        alone = torch.cat([model(images[i:i + 1, :n], torch.ones(1, n, dtype=torch.bool)) for i, n in enumerate(sizes)])
    assert (padded - alone).abs().max() < 1e-5
    torch.testing.assert_close(padded, alone, atol=1e-10, rtol=1e-8)


def test_a_permutation_of_the_views_changes_the_logits_by_less_than_1e_5():
    model = tiny_model().float()
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(6, 20, TINY.dim, generator=gen)
    valid = torch.ones(6, 20, dtype=torch.bool)
    perm = torch.randperm(20, generator=gen)
    with torch.no_grad():
        base, shuffled = model(h, valid), model(h[:, perm], valid)
        assert (shuffled - base).abs().max() < 1e-5
        # the check can fail: a positional term (which VSFormer does not have) breaks the invariance
        pos = torch.randn(20, TINY.dim, generator=gen)
        assert (model(h[:, perm] + pos, valid) - model(h + pos, valid)).abs().max() > 1e-3


def test_dodecahedron_cameras_and_rotations():
    cams = m.dodecahedron_cameras()
    assert cams.shape == (20, 3) and np.allclose(np.linalg.norm(cams, axis=1), 1)
    dist = np.linalg.norm(cams[:, None] - cams[None], axis=-1) + 10 * np.eye(20)
    edge = dist.min()
    assert np.all((np.abs(dist - edge) < 1e-9).sum(1) == 3)  # a dodecahedron vertex has exactly 3 neighbours
    assert abs(edge - 2 / (math.sqrt(3) * (1 + math.sqrt(5)) / 2)) < 1e-9  # edge of the unit-circumradius solid
    frames = m.camera_frames(cams, np.random.default_rng(0).normal(0, 0.1, 20))
    assert np.allclose(frames @ frames.transpose(0, 2, 1), np.eye(3)) and np.allclose(np.linalg.det(frames), 1)
    assert np.allclose(frames[:, 2], -cams)  # the camera looks at the origin
    rot = m.random_rotation(np.random.default_rng(0))
    assert np.allclose(rot @ rot.T, np.eye(3)) and np.isclose(np.linalg.det(rot), 1)


def test_rendered_sphere_matches_the_closed_form():
    """A dense sphere of radius 0.9 seen from any camera: a disk of radius 0.9 * 24 px around the image centre, so
    every pixel inside the disk is lit and no pixel outside it; centre depth 1 - (1 - 0.9) / 2, centre shade n.l = 1."""
    pts, nrm = m.sphere(40000, np.random.default_rng(0), r=0.9)
    img = m.render(pts, nrm, m.camera_frames(m.dodecahedron_cameras()[:3], np.zeros(3)), 48).astype(float) / 255
    assert img.shape == (3, 3, 48, 48)
    lo, hi = np.arange(48.0) - 24, np.arange(48.0) - 23  # pixel edges, centred coordinates
    near = np.minimum(np.abs(lo), np.abs(hi)) * (lo * hi > 0)  # distance of the pixel's nearest point to 0
    far = np.maximum(np.abs(lo), np.abs(hi))
    r = 0.9 * 24
    inside = np.hypot(far[:, None], far[None]) < r - 0.05  # pixels wholly inside the disk
    touching = np.hypot(near[:, None], near[None]) < r  # pixels the disk reaches
    sil = img[:, 2] > 0
    assert sil[:, inside].all() and not sil[:, ~touching].any()
    assert abs(sil.mean() - math.pi * r * r / 48**2) < 0.05  # about the disk's area
    centre = img[:, :, 22:26, 22:26].mean((2, 3))  # (V, 3)
    assert np.allclose(centre[:, 0], 0.95, atol=0.02) and np.allclose(centre[:, 1], 1.0, atol=0.02)


@pytest.mark.parametrize("cls", ["sphere", "ellipsoid", "cube", "slab", "cylinder", "cone", "pyramid", "hex_prism",
                                 "capsule"])
def test_convex_shapes_have_unit_outward_normals(cls):
    """For a convex solid the outward normal at a surface point p makes n.(p - c) > 0 with any interior point c."""
    pts, nrm = m.sample_shape(cls, 2000, np.random.default_rng(0))
    assert pts.shape == nrm.shape == (2000, 3)
    assert np.allclose(np.linalg.norm(nrm, axis=1), 1)
    assert (((pts - pts.mean(0)) * nrm).sum(1) > 0).all()


def test_generated_shapes_are_normalised_and_labelled():
    images, labels = m.make_shapes(1, replace(TINY, points=500), np.random.default_rng(0))
    n = len(m.CLASSES)
    assert images.shape == (n, 20, 3, 16, 16) and images.dtype == np.uint8
    assert list(labels) == list(range(n))
    assert (images[:, :, 2] > 0).any((2, 3)).all()  # every view sees the shape


def test_retrieval_map_matches_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    desc, labels = rng.normal(size=(17, 5)), rng.integers(0, 3, 17)
    d = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    aps = [average_precision_score(np.delete(labels == labels[i], i), np.delete(d @ d[i], i)) for i in range(17)]
    assert abs(m.retrieval_map(torch.from_numpy(desc), torch.from_numpy(labels)) - np.mean(aps)) < 1e-10


def test_learning_rate_schedule():
    a = replace(TINY, epochs=30, warmup_epochs=5, restart_epochs=10, restart_gamma=0.5)
    assert m.lr_factor(2.5, a) == 0.5  # half-way through the warm-up
    assert m.lr_factor(5, a) == 1.0 and abs(m.lr_factor(10, a) - 0.5) < 1e-12  # cosine peak, then mid-cycle
    assert abs(m.lr_factor(15, a) - 0.5) < 1e-12  # first restart: peak x gamma
    assert abs(m.lr_factor(20, replace(a, restart_epochs=0)) - 0.5 * (1 + math.cos(math.pi * 15 / 25))) < 1e-12


def write_png(path, rng, size=20):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)  # grayscale like RotationNet


def write_rotationnet(root, shapes_per_split, views, rng):
    for cls in ("bench", "chair"):
        for split, n in shapes_per_split.items():
            for i in range(n):
                for v in range(1, views + 1):
                    write_png(root / cls / split / f"{cls}_{i + 1:04d}_{v:03d}.png", rng)


def test_well_formed_rotationnet_folder_loads_and_runs(tmp_path):
    rng = np.random.default_rng(0)
    write_rotationnet(tmp_path / "mv", {"train": 5, "test": 2}, 3, rng)
    data = m.load_rotationnet_dir(str(tmp_path / "mv"), 3, 16)
    assert data["classes"] == ["bench", "chair"]
    assert data["train"][0].shape == (10, 3, 3, 16, 16) and list(data["test"][1]) == [0, 0, 1, 1]
    x = data["train"][0][0, 2]  # bench_0001_003.png: grey, so the three channels are equal
    assert (x[0] == x[1]).all() and (x[1] == x[2]).all()
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path), data_dir=str(tmp_path / "mv"), views=3, image_size=16,
                   curve_views=(1, 3), subset_views=2)
    record = m.main(args)
    assert math.isfinite(record["results"]["VSFormer"]["acc_all_views"])


@pytest.mark.parametrize("bad, words", [
    ("name", ["chair_x.png", "_<vvv>.png"]),
    ("missing", ["chair_0002", "expected 1..3"]),
    ("unreadable", ["chair_0001_002.png", "cannot read"]),
])
def test_malformed_rotationnet_files_name_the_problem(tmp_path, bad, words):
    rng = np.random.default_rng(0)
    write_rotationnet(tmp_path, {"train": 2, "test": 1}, 3, rng)
    if bad == "name":
        write_png(tmp_path / "chair" / "train" / "chair_x.png", rng)
    elif bad == "missing":
        (tmp_path / "chair" / "train" / "chair_0002_003.png").unlink()
    else:
        (tmp_path / "chair" / "train" / "chair_0001_002.png").write_text("not a png")
    with pytest.raises(shared.UsageError) as err:
        m.load_rotationnet_dir(str(tmp_path), 3, 16)
    assert all(w.lower() in str(err.value).lower() for w in words), str(err.value)


def test_a_broken_png_through_the_script_is_one_clear_sentence(tmp_path):
    write_rotationnet(tmp_path, {"train": 2, "test": 1}, 3, np.random.default_rng(0))
    (tmp_path / "bench" / "test" / "bench_0001_001.png").write_bytes(b"\x89PNG broken")
    assert_usage_error(run_script(SLUG, "--preset", "smoke", "--views", "3", "--subset-views", "2", "--curve-views", "1", "3",
                                  "--data-dir", tmp_path), "bench_0001_001.png")


@pytest.mark.parametrize("changes, words", [
    ({"heads": 5}, ["heads", "divide"]),
    ({"subset_views": 21}, ["subset-views", "between"]),
    ({"accum": 3}, ["accum", "divide"]),
    ({"init_weights": "nope.pth"}, ["init-weights"]),
    ({"data_dir": "/no/such/folder"}, ["data-dir", "not a folder"]),
])
def test_bad_arguments_are_one_clear_sentence(changes, words):
    with pytest.raises(shared.UsageError) as err:
        m.validate(replace(m.Args(), **changes))
    assert all(w.lower() in str(err.value).lower() for w in words), str(err.value)


def test_bad_argument_through_the_script():
    assert_usage_error(run_script(SLUG, "--heads", "5"), "heads", "divide")


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
