"""interclr: semi-hard sampling against brute force, the margin sign by hand, inter loss == per-query loop, online
k-means bookkeeping, shuffle-BN, determinism, bad arguments, --data-dir files, and (opt-in) the default-preset claim."""

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism

SLUG = "interclr"
m = load(SLUG)


def tiny_bank(N=40, D=6, C=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    labels = torch.arange(N) % C  # every cluster populated
    labels = labels[torch.randperm(N, generator=g)]
    return bank, labels, g


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, again, other = smoke_determinism(m, tmp_path)
    assert first["history"] == again["history"]
    assert other["history"]["interclr"] != first["history"]["interclr"]


# ---- fused (batched) == reference (per query / per cluster) -------------------------------------------------------
def test_inter_loss_batched_equals_per_query_loop_values_and_gradients():
    bank, _, g = tiny_bank(N=53, D=5, C=6)
    B, K = 7, 11
    q = F.normalize(torch.randn(B, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    pos = torch.randint(53, (B,), generator=g)
    neg = torch.randint(53, (B, K), generator=g)
    valid = torch.rand(B, K, generator=g) > 0.2
    valid[:, 0] = True  # at least one negative per query
    for margin in (-0.5, 0.0, 0.5):
        ref = m.inter_loss_reference(q, bank, pos, neg, valid, margin, 0.2)
        fus = m.inter_loss_fused(q, bank, pos, neg, valid, margin, 0.2)
        torch.testing.assert_close(fus, ref, rtol=1e-12, atol=1e-12)
        (g_ref,), (g_fus,) = torch.autograd.grad(ref, q), torch.autograd.grad(fus, q)
        torch.testing.assert_close(g_fus, g_ref, rtol=1e-12, atol=1e-12)


def test_whole_model_gradients_agree_through_both_loss_paths():
    args = m.PRESETS["smoke"]
    torch.manual_seed(0)
    net = m.Encoder(args).double()
    x = torch.rand(8, 3, 24, 24, dtype=torch.float64)
    bank, labels, g = tiny_bank(N=30, D=args.feat_dim, C=3)
    idx = torch.arange(8)
    grads = {}
    for name, fn in (("reference", m.inter_loss_reference), ("fused", m.inter_loss_fused)):
        q = m.encode(net, x, 2)
        g.manual_seed(1)
        pos = m.sample_positives(labels, idx, g)
        neg, valid = m.sample_negatives_fused(q, bank, labels, labels[idx], "semihard", 12, 5, g)
        loss = fn(q, bank, pos, neg, valid, -0.5, 0.2)
        grads[name] = (loss, *torch.autograd.grad(loss, list(net.parameters())))
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_centroids_index_add_equals_the_loop_and_keeps_empty_clusters():
    bank, labels, g = tiny_bank(N=31, D=5, C=5)
    labels[labels == 3] = 2  # cluster 3 is empty
    old = torch.randn(6, 5, generator=g, dtype=torch.float64)  # cluster 5 never used either
    fus, ref = m.centroids_fused(bank, labels, old), m.centroids_reference(bank, labels, old)
    torch.testing.assert_close(fus, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fus[[3, 5]], old[[3, 5]])
    torch.testing.assert_close(fus[0], bank[labels == 0].mean(0))


# ---- the maths the method rests on, against brute force and hand-worked cases --------------------------------------
def brute_pool(q, bank, P, largest=True):
    """Top-P bank indices by similarity, with plain Python sorting."""
    out = []
    for qi in q.tolist():
        sims = [(sum(a * b for a, b in zip(qi, row)), j) for j, row in enumerate(bank.tolist())]
        out.append({j for _, j in sorted(sims, reverse=largest)[:P]})
    return out


@pytest.mark.parametrize("mode", ["semihard", "semieasy"])
@pytest.mark.parametrize("sampler", ["fused", "reference"])
def test_pool_sampling_returns_only_other_label_entries_of_the_pool(mode, sampler):
    bank, labels, g = tiny_bank()
    q = F.normalize(bank[:5] + 0.3 * torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    anchor, P, K = labels[:5], 12, 5
    pools = brute_pool(q, bank, P, largest=(mode == "semihard"))
    fn = m.sample_negatives_fused if sampler == "fused" else m.sample_negatives_reference
    for _ in range(20):
        neg, valid = fn(q, bank, labels, anchor, mode, P, K, g)
        assert neg.shape == (5, K) and valid.all()
        for i in range(5):
            assert set(neg[i].tolist()) <= pools[i]
            assert (labels[neg[i]] != anchor[i]).all()
            if sampler == "fused":
                assert len(set(neg[i].tolist())) == K  # without replacement


def test_semihard_draws_are_uniform_over_the_allowed_pool():
    bank, labels, g = tiny_bank(seed=3)
    q, anchor, P, K = bank[:1], labels[:1], 12, 4
    allowed = [j for j in brute_pool(q, bank, P)[0] if labels[j] != anchor[0]]
    counts = torch.zeros(len(bank))
    reps = 3000
    for _ in range(reps):
        neg, _ = m.sample_negatives_fused(q, bank, labels, anchor, "semihard", P, K, g)
        counts[neg[0]] += 1
    expected = reps * K / len(allowed)
    freq = counts[allowed]
    assert counts.sum() == freq.sum()  # nothing outside the allowed set
    assert ((freq - expected).abs() / expected).max() < 0.1, (freq, expected)  # sd ~ 2.5 % of expected


def test_hard_negatives_are_the_nearest_of_other_labels():
    bank, labels, g = tiny_bank()
    q, anchor = bank[:3], labels[:3]
    neg, valid = m.sample_negatives_fused(q, bank, labels, anchor, "hard", 12, 6, g)
    ref, _ = m.sample_negatives_reference(q, bank, labels, anchor, "hard", 12, 6, g)
    assert valid.all() and torch.equal(neg, ref)
    for i in range(3):
        sims = sorted(((float(q[i] @ bank[j]), j) for j in range(len(bank)) if labels[j] != anchor[i]), reverse=True)
        assert neg[i].tolist() == [j for _, j in sims[:6]]


def test_too_small_pool_masks_same_label_leftovers():
    bank, labels, g = tiny_bank(C=2)
    neg, valid = m.sample_negatives_fused(bank[:2], bank, labels, labels[:2], "semihard", 8, 8, g)
    assert torch.equal(valid, labels[neg] != labels[:2, None]) and not valid.all()


def test_positives_share_the_label_and_exclude_self_works():
    _, labels, g = tiny_bank(N=30, C=3)
    labels[0] = 3  # a singleton cluster: its only positive is itself
    idx = torch.arange(30).repeat(50)
    pos = m.sample_positives(labels, idx, g)
    assert torch.equal(labels[pos], labels[idx]) and (pos == idx).any()  # itself allowed (official)
    pos = m.sample_positives(labels, idx, g, exclude_self=True)
    assert torch.equal(labels[pos], labels[idx])
    assert ((pos == idx) == (idx == 0)).all()  # never itself, except the singleton


def test_margin_sign_by_hand():
    # q = (1, 0); positive at cosine 0.5, negatives at cosines 0.2 and -0.1; tau = 0.2.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    bank = torch.tensor([[0.5, 0.75 ** 0.5], [0.2, 0.96 ** 0.5], [-0.1, 0.99 ** 0.5]], dtype=torch.float64)
    pos, neg, valid = torch.tensor([0]), torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool)
    loss = {mg: m.inter_loss_fused(q, bank, pos, neg, valid, mg, 0.2).item() for mg in (-0.5, 0.0, 0.5)}
    # m = -0.5: positive logit (0.5 + 0.5) / 0.2 = 5, negatives 1 and -0.5
    assert loss[-0.5] == pytest.approx(-5 + math.log(math.exp(5) + math.exp(1) + math.exp(-0.5)), rel=1e-12)
    assert loss[0.0] == pytest.approx(-2.5 + math.log(math.exp(2.5) + math.exp(1) + math.exp(-0.5)), rel=1e-12)
    assert loss[-0.5] < loss[0.0] < loss[0.5]  # a negative m is the LESS stringent boundary


def test_online_update_and_small_cluster_handling_keep_every_cluster_populated():
    args = replace(m.Args(), clusters=6, min_cluster=4, init_kmeans_iters=5)
    bank, _, g = tiny_bank(N=60, D=6, C=6, seed=5, dtype=torch.float32)
    mb = m.MemoryBank(bank.clone(), args, g)
    assert (torch.bincount(mb.labels, minlength=6) >= 1).all()
    # online relabel: overwritten features (mu = 1), label = argmax_c C_c . M_i
    idx, k = torch.tensor([1, 7, 9]), torch.randn(3, 6, generator=g)
    mb.update(idx, k, online=True)
    torch.testing.assert_close(mb.feats[idx], F.normalize(k, dim=1))
    assert torch.equal(mb.labels[idx], (mb.feats[idx] @ mb.centroids.T).argmax(1))
    # degenerate on purpose: cluster 0 keeps 2 members, clusters 4 and 5 are emptied into cluster 1
    mb.labels[mb.labels == 0] = 1
    mb.labels[:2] = 0
    mb.labels[(mb.labels == 4) | (mb.labels == 5)] = 1
    was = mb.labels.clone()
    mb.deal_with_small_clusters()
    counts = torch.bincount(mb.labels, minlength=6)
    assert (counts >= 1).all() and counts.sum() == 60
    assert (mb.labels[:2] != 0).all()  # members of the small cluster were moved out
    for c in (0, 4, 5):  # re-seeded clusters: centroid = mean of the members they received
        members = mb.labels == c
        assert members.any() and (was[members] != c).all()
        torch.testing.assert_close(mb.centroids[c], mb.feats[members].mean(0))


def test_shuffle_bn_unshuffles_and_changes_batch_statistics():
    torch.manual_seed(0)
    net = m.Encoder(m.PRESETS["smoke"]).double()
    x, perm = torch.rand(12, 3, 24, 24, dtype=torch.float64), torch.randperm(12)
    net.eval()  # running statistics: the permutation must be undone exactly
    torch.testing.assert_close(m.encode(net, x, 3, perm), m.encode(net, x, 3))
    net.train()  # one BN group: order does not matter; three groups: a query and its key see other statistics
    torch.testing.assert_close(m.encode(net, x, 1, perm), m.encode(net, x, 1))
    assert not torch.allclose(m.encode(net, x, 3, perm), m.encode(net, x, 3))


def test_shapes_are_balanced_in_range_and_the_test_set_is_another_draw():
    x, y = m.make_shapes(40, 24, 0)
    x2, _ = m.make_shapes(40, 24, 1)
    assert x.shape == (40, 3, 24, 24) and 0 <= x.min() and x.max() <= 1
    assert (np.bincount(y) == 4).all() and not np.allclose(x, x2)
    v = m.augment(torch.from_numpy(x), torch.Generator().manual_seed(0))
    assert v.shape == x.shape and 0 <= v.min() and v.max() <= 1


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
def test_bad_argument_stops_with_one_sentence():
    assert_usage_error(run_script(SLUG, "--neg", "hardest"), "neg")


@pytest.mark.parametrize("changes, word", [
    ({"ablations": ("margin-1",)}, "ablations"),
    ({"queue": 1000}, "queue"),
    ({"bn_groups": 3}, "bn-groups"),
    ({"n_neg": 600}, "pool"),
    ({"labels": "sometimes"}, "labels"),
])
def test_bad_arguments_raise_usage_errors(changes, word):
    with pytest.raises(shared.UsageError, match=word):
        m.validate(replace(m.Args(), **changes))


def write_cifar(folder, n_train=48, n_test=20, bad=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", n_train // 2), ("data_batch_2", n_train // 2), ("test_batch", n_test)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        if bad == name:
            d[b"data"] = d[b"data"][:, :100]
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)


def tiny_args(tmp_path, folder):
    return replace(m.PRESETS["smoke"], data_dir=str(folder), out_dir=str(tmp_path), image_size=16, batch_size=8,
                   bn_groups=2, queue=16, clusters=4, min_cluster=2, pool=16, n_neg=4, knn_k=5, ablations=())


def test_cifar_pickles_load_and_run(tmp_path):
    write_cifar(tmp_path / "cifar")
    args = tiny_args(tmp_path, tmp_path / "cifar")
    data = m.make_data(args, torch.device("cpu"))
    assert data["x"].shape == (48, 3, 16, 16) and data["x_test"].shape == (20, 3, 16, 16)
    assert math.isfinite(m.main(args)["results"]["interclr"]["knn_acc"])


@pytest.mark.parametrize("bad, words", [("data_batch_2", ["malformed", "data_batch_2"]),
                                        ("not-pickle", ["cannot read", "test_batch"]),
                                        ("missing", ["missing file", "test_batch"])])
def test_malformed_cifar_files_name_the_file(tmp_path, bad, words):
    folder = tmp_path / "cifar"
    write_cifar(folder, bad=bad)
    if bad == "not-pickle":
        (folder / "test_batch").write_text("not a pickle")
    if bad == "missing":
        (folder / "test_batch").unlink()
    with pytest.raises(shared.UsageError) as err:
        m.make_data(tiny_args(tmp_path, folder), torch.device("cpu"))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_image_folder_loads_and_a_broken_image_is_named(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("val", 3)):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    data = m.make_data(tiny_args(tmp_path, tmp_path / "imgs"), torch.device("cpu"))
    assert data["x"].shape == (24, 3, 16, 16) and set(data["y_test"].tolist()) == {0, 1}
    (tmp_path / "imgs" / "val" / "dog" / "broken.png").write_text("no image")
    with pytest.raises(shared.UsageError, match="broken.png"):
        m.make_data(tiny_args(tmp_path, tmp_path / "imgs"), torch.device("cpu"))


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
