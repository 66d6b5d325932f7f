"""batchformer: determinism, fused == reference attention over the batch, the BatchFormer layer against torch's own
nn.TransformerEncoderLayer, the train/test behaviour (shared classifier, module removed at test), Balanced Softmax
and the long-tail profile against hand computations, the CIFAR pickle loader, bad arguments."""

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism, spoil, write_pickle

SLUG = "batchformer"
m = load(SLUG)


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, again, other = smoke_determinism(m, tmp_path)
    assert first["history"] == again["history"]
    assert [h["train/loss"] for h in other["history"]] != [h["train/loss"] for h in first["history"]]


def test_fused_equals_reference_outputs_and_gradients():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 13, 5, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    out_ref, out_fused = m.attention_reference(q, k, v), m.attention_fused(q, k, v)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, (q, k, v), g), torch.autograd.grad(out_ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_reference_attention_is_the_literal_softmax_over_the_batch():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    out = m.attention_reference(q, k, v)[0, 0]
    for i in range(4):  # sample i: weights exp(q_i.k_j / sqrt(3)) / sum_j' ..., one weight per sample j of the batch
        w = np.exp([float(q[0, 0, i] @ k[0, 0, j]) / np.sqrt(3) for j in range(4)])
        expected = (w[:, None] / w.sum() * v[0, 0].numpy()).sum(0)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-12)


def test_attention_dropout_is_applied_in_both_paths():
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    for fn in (m.attention_reference, m.attention_fused):
        assert not torch.allclose(fn(q, k, v, 0.5), fn(q, k, v, 0.0))


@pytest.mark.parametrize("attn", ["reference", "fused"])
def test_layer_equals_torch_transformer_encoder_layer_over_the_batch(attn):
    """The official module is nn.TransformerEncoderLayer(C, 4, C, 0.5) applied to x.unsqueeze(1) (batch_first=False,
    so the mini-batch is the sequence). Ours, with the same weights, must give the same X' (dropout off)."""
    C, H, N = 12, 4, 11
    torch.manual_seed(0)
    official = nn.TransformerEncoderLayer(C, H, C, 0.0).double().train()  # train mode: no inference fast path
    ours = m.BatchFormerLayer(C, H, 0.0, m.ATTENTION[attn]).double().train()
    ours.in_proj.weight.data.copy_(official.self_attn.in_proj_weight)
    ours.in_proj.bias.data.copy_(official.self_attn.in_proj_bias)
    ours.out_proj.load_state_dict(official.self_attn.out_proj.state_dict())
    for name in ("linear1", "linear2", "norm1", "norm2"):
        getattr(ours, name).load_state_dict(getattr(official, name).state_dict())
    x = torch.randn(N, C, dtype=torch.float64)
    torch.testing.assert_close(ours(x), official(x.unsqueeze(1)).squeeze(1), atol=1e-10, rtol=1e-9)


def test_layer_starts_like_the_official_attention():
    """nn.MultiheadAttention's init: xavier-uniform W_q, W_k, W_v (bound sqrt(6 / (C + 3C))), zero biases."""
    torch.manual_seed(0)
    layer = m.BatchFormerLayer(64, 4, 0.5, m.attention_fused)
    bound = (6 / (64 + 3 * 64)) ** 0.5
    w = layer.in_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert not layer.in_proj.bias.any() and not layer.out_proj.bias.any()


def tiny_args(**kw):
    return replace(m.PRESETS["smoke"], **kw)


def test_whole_model_same_output_on_both_paths_in_training_mode():
    args = tiny_args(bf_dropout=0.0)
    torch.manual_seed(0)
    ref = m.Net(args, 5, True, m.attention_reference).double().train()
    fused = m.Net(args, 5, True, m.attention_fused).double().train()
    fused.load_state_dict(ref.state_dict())
    x, y = torch.rand(9, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (9,))
    (a, ya), (b, yb) = ref(x, y), fused(x, y)
    torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
    assert torch.equal(ya, yb)


def test_shared_classifier_duplicated_labels_and_removed_at_test():
    torch.manual_seed(0)
    net = m.Net(tiny_args(), 5, True, m.attention_fused).train()
    x, y = torch.rand(7, 3, 32, 32), torch.randint(0, 5, (7,))
    logits, yy = net(x, y)
    assert logits.shape == (14, 5) and torch.equal(yy, torch.cat([y, y]))  # [X; X'] and [y; y]
    torch.testing.assert_close(logits[:7], net.classifier(net.backbone((x - 0.5) / 0.25)))  # first half: g(f(x))
    net.eval()
    out, _ = net(x)
    assert torch.equal(out, net.classifier(net.backbone((x - 0.5) / 0.25)))  # eval: exactly the no-BF path
    single = torch.cat([net(x[i:i + 1])[0] for i in range(7)])
    torch.testing.assert_close(single, out)  # test predictions do not depend on the rest of the batch


def test_batchformer_mixes_samples_and_is_permutation_equivariant():
    torch.manual_seed(0)
    layer = m.BatchFormerLayer(8, 4, 0.0, m.attention_fused).train()
    x = torch.randn(6, 8)
    out = layer(x)
    x2 = x.clone()
    x2[5] += 3.0  # change one sample of the batch ...
    assert not torch.allclose(layer(x2)[0], out[0])  # ... and sample 0's refined feature changes (batch_first pitfall)
    perm = torch.randperm(6)
    torch.testing.assert_close(layer(x[perm]), out[perm], atol=1e-6, rtol=1e-5)  # no positions: order-free


def test_balanced_softmax_by_hand():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(6, 4)), np.array([0, 3, 1, 1, 2, 3])
    counts = np.array([50.0, 20.0, 5.0, 1.0])
    pi = counts / counts.sum()
    # -log( pi_y e^{z_y} / sum_j pi_j e^{z_j} ), averaged over the samples
    expected = np.mean([-np.log(pi[t] * np.exp(z[i, t]) / (pi * np.exp(z[i])).sum()) for i, t in enumerate(y)])
    got = m.balanced_softmax_loss(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(np.log(pi))).item()
    assert abs(got - expected) < 1e-12
    assert abs(m.balanced_softmax_loss(torch.from_numpy(z), torch.from_numpy(y), torch.zeros(4)).item()
               - F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y)).item()) < 1e-12  # uniform prior = CE


def test_long_tail_counts_follow_the_imbalance_ratio():
    counts = m.long_tail_counts(300, 100.0, 10)
    assert counts == [300, 180, 108, 65, 39, 23, 14, 8, 5, 3]  # the card's profile
    assert counts[0] / counts[-1] == 100
    ratios = np.array(counts[:-1], dtype=float) / counts[1:]
    assert np.allclose(ratios[:4], 100 ** (1 / 9), rtol=0.02)  # geometric: a constant ratio rho^(1/(K-1))
    assert m.split_of(counts, m.Args()) == ["many"] * 3 + ["medium"] * 3 + ["few"] * 4
    data = m.make_procedural(replace(m.Args(), n_test=4), seed=0)
    assert np.bincount(data["y_train"]).tolist() == counts and np.bincount(data["y_test"]).tolist() == [4] * 10
    assert data["x_train"].shape == (745, 3, 32, 32) and 0 <= data["x_train"].min() and data["x_train"].max() <= 1
    again = m.make_procedural(replace(m.Args(), n_test=4), seed=1)
    assert np.array_equal(data["x_test"], again["x_test"])  # one fixed test set for every training seed
    assert not np.array_equal(data["x_train"][:10], again["x_train"][:10])


def test_palette_pairs_share_colours_but_not_shapes():
    u, v = np.meshgrid(np.linspace(-1, 1, 41), np.linspace(-1, 1, 41))
    masks = [m.shape_mask(s, u, v) for s in range(10)]
    for a in range(10):
        assert masks[a].mean() > 0.05  # every shape is visible
        for b in range(a + 1, 10):
            assert (masks[a] != masks[b]).mean() > 0.05, (m.SHAPES[a], m.SHAPES[b])
    assert all(m.PALETTES[c % 5] == m.PALETTES[(c + 5) % 5] for c in range(5))


# ---- the CIFAR pickle loader on tiny files written here -------------------------------------------------------------
def write_cifar10(folder, per_class=6, n_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.repeat(np.arange(n_classes), per_class // 2 if name != "test_batch" else 2).tolist()
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        write_pickle(folder / name, {b"data": data, b"labels": labels})
    return folder


def test_well_formed_cifar10_loads_long_tailed_and_runs(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")  # 15 training images per class
    args = tiny_args(data_dir=str(folder), n_max=15, imbalance=5.0, out_dir=str(tmp_path))
    data = m.load_cifar_lt(args, seed=0)
    assert np.bincount(data["y_train"]).tolist() == m.long_tail_counts(15, 5.0, 10)
    assert data["x_test"].shape == (20, 3, 32, 32) and data["x_train"].dtype == np.float32
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    np.testing.assert_allclose(data["x_test"][3], raw[3].reshape(3, 32, 32) / 255, rtol=1e-6)
    record = m.main(args)
    assert np.isfinite(record["results"]["CE + BF"]["acc_all"])


def test_well_formed_cifar100_format_loads(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, per in (("train", 4), ("test", 1)):
        labels = np.repeat(np.arange(20), per).tolist()
        write_pickle(folder / name, {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                                     b"fine_labels": labels, b"coarse_labels": [0] * len(labels)})
    data = m.load_cifar_lt(tiny_args(data_dir=str(folder), n_max=4, imbalance=4.0), seed=0)
    assert len(np.bincount(data["y_train"])) == 20 and data["y_train"].tolist().count(0) == 4
    assert data["y_train"].tolist().count(19) == 1


@pytest.mark.parametrize("broken, obj, words", [
    ("data_batch_3", "not a pickle", ["data_batch_3"]),
    ("test_batch", {b"data": np.zeros((4, 3072), np.uint8)}, ["test_batch", "labels"]),
    ("data_batch_1", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, ["data_batch_1", "3072"]),
    ("data_batch_2", [1, 2, 3], ["data_batch_2", "dict"]),
    ("data_batch_5", None, ["missing", "data_batch_5"]),
])
def test_malformed_cifar_files_name_the_file(tmp_path, broken, obj, words):
    folder = write_cifar10(tmp_path / "c10")
    spoil(folder / broken, obj)
    with pytest.raises(shared.UsageError) as err:
        m.load_cifar_lt(tiny_args(data_dir=str(folder), n_max=15, imbalance=5.0), seed=0)
    assert all(w.lower() in str(err.value).lower() for w in words), str(err.value)


def test_too_few_images_for_the_profile_is_a_usage_error(tmp_path):
    folder = write_cifar10(tmp_path / "c10")
    with pytest.raises(shared.UsageError, match="n-max"):
        m.load_cifar_lt(tiny_args(data_dir=str(folder), n_max=40, imbalance=5.0), seed=0)


def test_malformed_data_dir_from_the_command_line(tmp_path):
    folder = write_cifar10(tmp_path / "c10")
    (folder / "test_batch").write_text("garbage")
    assert_usage_error(run_script(SLUG, "--preset", "smoke", "--data-dir", folder, "--n-max", "15", "--imbalance",
                                  "5", "--out-dir", tmp_path), "test_batch")


@pytest.mark.parametrize("flags, words", [
    (["--heads", "5"], ["heads", "divide"]),
    (["--n-max", "50", "--imbalance", "100"], ["rarest class"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script(SLUG, *flags), *words)


def test_validate_rejects_a_batch_of_one():
    with pytest.raises(shared.UsageError, match="batch"):
        m.validate(replace(m.Args(), batch=1))


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
