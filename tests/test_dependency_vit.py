"""dependency_vit: determinism, fused == reference reversed attention (outputs, gradients, prune scores), the
log-sum-exp the fused path rests on, the transposed normalisation, top-k pruning by brute force, tree purity by hand,
the scene generator's masks, the CIFAR pickle reader on tiny files written here, bad arguments."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import (assert_outputs_and_grads_close, assert_usage_error, load, run_script, smoke_determinism, spoil,
                      write_cifar10, write_pickle)

m = load("dependency_vit")


def gates(B, H, N, dtype=torch.float64, seed=0):
    """Random q, k, v and the model's gates: p a softmax over heads (B, H, 1, N), m a product of sigmoids in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, 5, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    p = torch.softmax(torch.randn(B, H, 1, N, generator=g, dtype=dtype) / 0.1, dim=1).requires_grad_()
    mm = torch.sigmoid(torch.randn(B, 1, 1, N, generator=g, dtype=dtype)).requires_grad_()
    return q, k, v, p, mm


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert first["history"][-1]["train/loss"] != other["history"][-1]["train/loss"]


# ---- fused == reference ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [1, 17, 70])  # 70 > the 64-row chunk: the chunked LSE merges two chunks
def test_fused_equals_reference_outputs_gradients_and_prune_scores(N):
    inputs = gates(2, 3, N)
    out_r, score_r = m.attention_reference(*inputs)
    out_f, score_f = m.attention_fused(*inputs)
    torch.testing.assert_close(score_f, score_r, atol=1e-12, rtol=1e-10)
    assert_outputs_and_grads_close(out_f, out_r, inputs, atol=1e-12, rtol=1e-10, grad_tol=10)


def test_fused_float32_within_1e5_with_large_logits():
    q, k, v, p, mm = (t.detach().float() for t in gates(2, 4, 33, seed=3))
    q, k = 3 * q, 3 * k  # peaked softmaxes: the shift c and exp(L^k - c) are exercised
    (o_r, s_r), (o_f, s_f) = m.attention_reference(q, k, v, p, mm), m.attention_fused(q, k, v, p, mm)
    torch.testing.assert_close(o_f, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_f, s_r, atol=1e-5, rtol=1e-5)


def test_fused_path_keeps_no_n_by_n_tensor_for_backward():
    inputs = gates(2, 3, 100)
    n_by_n = 2 * 3 * 100 * 100 * 8  # bytes of one (B, H, N, N) float64 tensor
    assert m.saved_bytes(lambda: m.attention_fused(*inputs)) < n_by_n
    assert m.saved_bytes(lambda: m.attention_reference(*inputs)) >= n_by_n


@pytest.mark.parametrize("lite", [False, True])
def test_whole_model_same_output_on_both_paths(lite):
    a = replace(m.PRESETS["smoke"], dim=24, heads=3, depth=3)
    keep = m.keep_schedule(64, 3, (2, 3), 0.25) if lite else None
    torch.manual_seed(0)
    ref = m.VisionNet(a, 3, 32, 6, True, m.attention_reference, keep).double().eval()
    fused = m.VisionNet(a, 3, 32, 6, True, m.attention_fused, keep).double().eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-10, rtol=1e-9)


# ---- the maths the fused path and the method rest on -----------------------------------------------------------------
def test_chunked_lse_is_a_natural_log_and_its_backward_is_exact():
    q, k = (torch.randn(2, 3, n, 4, dtype=torch.float64, requires_grad=True) for n in (70, 23))
    rows, cols = m.score_logsumexp(q, k, 0.5, chunk=16)  # 70 rows = 5 chunks, the last one short
    s = q @ k.transpose(-2, -1) * 0.5
    torch.testing.assert_close(rows, torch.logsumexp(s, -1))  # natural log, not log2
    torch.testing.assert_close(cols, torch.logsumexp(s, -2))
    a, b = q[:1, :2, :11].detach().requires_grad_(), k[:1, :2, :7].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: m.score_logsumexp(a, b, 0.5, 4), (a, b))


def test_flex_attention_lse_is_a_natural_log_forward():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    try:
        _, lse = flex.flex_attention(q, k, v, return_lse=True)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"flex_attention does not run eager here: {e}")
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) / math.sqrt(8), -1), atol=1e-5, rtol=0)


def test_reversed_attention_columns_sum_to_one_over_receivers_before_gating():
    q, k, *_ = gates(2, 3, 11)
    a_r = m.reversed_attention_matrix(q, k)
    torch.testing.assert_close(a_r.sum(dim=-2), torch.ones(2, 3, 11, dtype=torch.float64))  # each child sends 1
    assert (a_r.sum(dim=-1) - 1).abs().max() > 0.1  # what a token receives is not normalised
    wrong_axis = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(5), dim=-2)  # the pitfall: not the same thing
    assert (wrong_axis - a_r).abs().max() > 0.1


def test_gates_act_on_senders_columns():
    q, k, v, p, mm = (t.detach() for t in gates(1, 2, 9))
    mm[..., 4] = 0.0  # token 4 has sent: its message must vanish everywhere
    v2 = v.clone()
    v2[:, :, 4] += 100.0
    torch.testing.assert_close(m.attention_reference(q, k, v, p, mm)[0], m.attention_reference(q, k, v2, p, mm)[0])
    # received score = sum over heads and senders of the gated A_R
    a = m.reversed_attention_matrix(q, k) * p * mm
    torch.testing.assert_close(m.attention_reference(q, k, v, p, mm)[1], a.sum(dim=(1, 3)))


def test_pruning_keeps_exactly_the_top_k_scored_tokens():
    g = torch.Generator().manual_seed(0)
    B, N, C, n_keep = 3, 13, 4, 6
    x, score = torch.randn(B, N, C, generator=g), torch.rand(B, N, generator=g)
    mm, pos = torch.rand(B, 1, 1, N, generator=g), torch.arange(N).expand(B, N) + 100
    xk, mk, pk = m.prune_tokens(x, mm, pos, score, n_keep)
    for b in range(B):
        best = sorted(sorted(range(N), key=lambda i: -score[b, i].item())[:n_keep])  # brute force, original order
        assert pk[b].tolist() == [100 + i for i in best]
        torch.testing.assert_close(xk[b], x[b, best])
        torch.testing.assert_close(mk[b, 0, 0], mm[b, 0, 0, best])


def test_keep_schedule_is_relative_to_the_original_token_count():
    assert m.keep_schedule(64, 4, (2, 3), 0.25) == [None, 48, 32, None]
    assert m.keep_schedule(196, 12, (2, 5, 8, 11), 0.16) == [None, 165, None, None, 133, None, None, 102, None, None,
                                                              71, None]  # 84 / 68 / 52 / 36 % of 196


def test_lite_model_really_prunes_and_random_pruning_differs():
    a = replace(m.PRESETS["smoke"], dim=16, heads=2, depth=3)
    net = m.VisionNet(a, 3, 32, 6, True, m.attention_fused, m.keep_schedule(64, 3, (2, 3), 0.25)).eval()
    for blk in net.blocks:
        blk.record = {}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        by_score = net(x)
    # pruning follows the attention of blocks 2 and 3: their attentions see 64 and 48 tokens, the head 32
    assert [blk.record["q"].shape[2] for blk in net.blocks] == [64, 64, 48]
    with torch.no_grad():
        by_random = net(x, prune="random", gen=torch.Generator().manual_seed(0))
    assert not torch.allclose(by_score, by_random)


def test_tree_purity_on_a_hand_built_parent_array():
    labels = torch.tensor([[0, 1, 1, 1, 2, 2, -1, 0]])  # N = 8: object 1 has 3 tokens, object 2 has 2
    parent = torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0]])  # 1, 2 -> object 1 (yes), 3 -> 4 (no), 4 -> 5 (yes), 5 -> 0 (no)
    purity, chance = m.tree_purity(parent, labels)
    assert purity == pytest.approx(3 / 5)
    assert chance == pytest.approx((3 * 2 / 7 + 2 * 1 / 7) / 5)


def test_token_objects_needs_half_the_pixels():
    obj = torch.zeros(1, 8, 8, dtype=torch.long)
    obj[0, :4, :4] = 1  # token 0 fully object 1
    obj[0, :2, 4:8] = 2  # token 1: 8 of 16 pixels object 2 -> counts
    obj[0, 4:5, 0:4] = 1  # token 2: 4 of 16 pixels -> background
    obj[0, 4:6, 4:8], obj[0, 6:8, 4:6] = 1, 2  # token 3: 8 of object 1, 4 of object 2, 4 background -> 1
    assert m.token_objects(obj, 4).tolist() == [[1, 2, 0, 1]]


# ---- data ----------------------------------------------------------------------------------------------------------
def test_scene_masks_match_the_drawn_shapes():
    for seed in range(6):
        img, obj, part, label, specs = m.render_scene(np.random.default_rng(seed), 2, noise=0.0)
        assert obj.max() == 2 and set(np.unique(part)) <= {0, 1, 2}
        for o in (1, 2):  # every body / part region has one flat colour (noise off)
            for pid in (1, 2):
                region = (obj == o) & (part == pid)
                if region.any():
                    assert np.ptp(img[:, region], axis=1).max() < 1e-6
        body, prt, cx, cy, size = specs[-1]  # the largest object is drawn last: fully visible
        assert size == max(s[-1] for s in specs) and label == 2 * body + prt
        part_mask = m.shape_mask(m.PARTS[prt], cx, cy, size)
        np.testing.assert_array_equal((obj == 2) & (part == 2), part_mask)
        np.testing.assert_array_equal((obj == 2) & (part == 1), m.shape_mask(m.BODIES[body], cx, cy, size) & ~part_mask)


def test_shapes_have_their_geometric_areas():
    r = 7.0
    assert m.shape_mask("disc", 16, 16, 2 * r).sum() == pytest.approx(math.pi * r * r, rel=0.05)
    assert m.shape_mask("square", 16, 16, 10).sum() == 100
    assert m.shape_mask("triangle", 16, 16, 12).sum() == pytest.approx(72, rel=0.1)


def test_shifted_scenes_have_three_larger_objects():
    d, s = m.make_scenes(40, 0), m.make_scenes(40, 0, shift=True)
    assert d["obj"].amax((1, 2)).max() == 2 and (s["obj"].amax((1, 2)) >= 2).all()
    assert (s["obj"] > 0).float().mean() > (d["obj"] > 0).float().mean()


# ---- CIFAR-10 pickles written here ----------------------------------------------------------------------------------
def test_cifar_reader_decodes_the_plane_layout(tmp_path):
    r, g, b = (np.arange(1024, dtype=np.int64) * s % 256 for s in (1, 3, 7))
    row = np.concatenate([r, g, b]).astype(np.uint8)  # 1024 R, then 1024 G, then 1024 B, each row-major 32x32
    path = tmp_path / "test_batch"
    write_pickle(path, {b"data": row[None], b"labels": [7]})
    x, y = m.read_cifar_pickle(path)
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [7]
    for c, plane in enumerate((r, g, b)):
        np.testing.assert_array_equal(x[0, c], plane.reshape(32, 32))
    assert x[0, 0, 1, 0] == 32 % 256 and x[0, 2, 0, 1] == 7  # pixel (row 1, col 0) of R, (row 0, col 1) of B


def test_tiny_cifar_folder_loads_and_runs(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")
    record = m.main(replace(m.PRESETS["smoke"], data_dir=str(tmp_path), out_dir=str(tmp_path), n_test=3))
    assert set(record["results"]["DependencyViT"]) >= {"test_acc"} and "shift_acc" not in record["results"]["ViT"]
    data = m.load_data(replace(m.PRESETS["smoke"], data_dir=str(folder), n_train=20))
    assert data["train"]["x"].shape == (20, 3, 32, 32) and data["test"]["x"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("broken, obj, words", [
    ("data_batch_2", "not a pickle", ["data_batch_2", "pickle"]),
    ("data_batch_4", {b"data": np.zeros((4, 3072), np.uint8)}, ["data_batch_4", "labels"]),
    ("test_batch", {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, ["test_batch", "3072"]),
    ("data_batch_1", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, ["data_batch_1", "0..9"]),
    ("data_batch_5", None, ["data_batch_5", "missing"]),
])
def test_malformed_cifar_files_name_the_file(tmp_path, broken, obj, words):
    folder = write_cifar10(tmp_path / "c10")
    spoil(folder / broken, obj)
    with pytest.raises(shared.UsageError) as e:
        m.load_data(replace(m.PRESETS["smoke"], data_dir=str(folder)))
    assert all(w.lower() in str(e.value).lower() for w in words), str(e.value)


def test_malformed_data_dir_from_the_command_line(tmp_path):
    folder = write_cifar10(tmp_path / "c10")
    (folder / "data_batch_3").write_bytes(b"\x00garbage")
    assert_usage_error(run_script("dependency_vit", "--preset", "smoke", "--data-dir", folder, "--out-dir", tmp_path),
                       "data_batch_3")


@pytest.mark.parametrize("flags, words", [
    (["--dim", "64", "--heads", "5"], ["divide"]),
    (["--prune-ratio", "0.6"], ["prune-ratio"]),
    (["--prune-blocks", "2", "9"], ["prune-blocks"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("dependency_vit", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
