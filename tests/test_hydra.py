"""hydra: the gated arbitrary-pair loss against a brute-force per-anchor loop (float64), batched == literal loop on
outputs and gradients, the effective rank on matrices with known spectra, the data generator's class relationships,
the feature filter's symmetry, determinism, bad arguments, CIFAR pickle files, and (opt-in) the default claim."""

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism

SLUG = "hydra"
m = load(SLUG)


# ---- determinism ---------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, again, other = smoke_determinism(m, tmp_path)
    assert [h["train/loss"] for h in first["history"]] == [h["train/loss"] for h in again["history"]]
    assert [h["train/loss"] for h in other["history"]] != [h["train/loss"] for h in first["history"]]


# ---- the maths: brute force, literal loop, batched -----------------------------------------------------------------
def brute_force_loss(z, g, y, c, tau, similarity):
    """Independent numpy float64 version: per anchor a, per positive p (y_p == c_a):
    -log( exp(s_ap) / (exp(s_ap) + sum_{n: y_n not in {y_a, c_a}} exp(s_an)) ), averaged over all (anchor, positive)
    pairs, with s_ab = cos(g_a*z_a, g_a*z_b) / tau (cosine), sum_d u_ad g_ad^2 u_bd / tau with u = z/||z||
    (normalised), or sum_d z_ad g_ad^2 z_bd (official)."""
    z, g = z.detach().numpy(), g.detach().numpy()
    terms = []
    for a in range(len(z)):
        sim = []
        for b in range(len(z)):
            if similarity == "cosine":
                u, v = g[a] * z[a], g[a] * z[b]
                sim.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) / tau)
            elif similarity == "normalised":
                ua, ub = z[a] / np.linalg.norm(z[a]), z[b] / np.linalg.norm(z[b])
                sim.append(sum(ua[d] * g[a, d] ** 2 * ub[d] for d in range(len(ua))) / tau)
            else:
                sim.append(sum(z[a, d] * g[a, d] ** 2 * z[b, d] for d in range(z.shape[1])))
        negs = [sim[n] for n in range(len(z)) if y[n] != y[a] and y[n] != c[a]]
        for p in range(len(z)):
            if y[p] == c[a]:
                terms.append(-sim[p] + math.log(math.exp(sim[p]) + sum(math.exp(s) for s in negs)))
    return sum(terms) / len(terms)


def random_batch(B=13, K=7, C=5, seed=0, kind="arbitrary"):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, K, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.rand(B, K, dtype=torch.float64, generator=gen).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=gen)
    return z, g, y, m.partner_classes(y, kind, C, gen)


SIMILARITIES = ["official", "normalised", "cosine"]


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("kind", ["arbitrary", "identical", "distinct"])
def test_gated_loss_equals_brute_force_per_anchor_loop(kind, similarity):
    z, g, y, c = random_batch(seed=1, kind=kind)
    expected = brute_force_loss(z, g, y.tolist(), c.tolist(), 0.1, similarity)
    assert m.hydra_loss(z, g, y, c, 0.1, similarity).item() == pytest.approx(expected, rel=1e-10)
    assert m.hydra_loss_reference(z, g, y, c, 0.1, similarity).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_batched_loss_equals_literal_loop_outputs_and_gradients(similarity):
    z, g, y, c = random_batch(B=17, K=9, C=4, seed=2)
    fused, ref = m.hydra_loss(z, g, y, c, 0.1, similarity), m.hydra_loss_reference(z, g, y, c, 0.1, similarity)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (z, g)), torch.autograd.grad(ref, (z, g))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_open_gate_identical_pairs_is_supcon_with_self_as_positive():
    """With g = 1 and c = y the loss is the SupCon-style multi-positive loss on plain cosine logits."""
    z, _, y, _ = random_batch(B=11, K=5, C=3, seed=3)
    ones = torch.ones_like(z)
    u = F.normalize(z, dim=1)
    L = u @ u.T / 0.5  # (B, B)
    same = y[:, None] == y[None, :]
    lse_neg = torch.logsumexp(L.masked_fill(same, -torch.inf), 1, keepdim=True)
    expected = ((torch.logaddexp(L, lse_neg) - L) * same).sum() / same.sum()
    for similarity in ("normalised", "cosine"):  # with an open gate both are the plain cosine / tau
        torch.testing.assert_close(m.hydra_loss(z, ones, y, y, 0.5, similarity), expected)
    # the official similarity is the plain dot product of z: the same loss on z / sqrt(tau)
    zn = F.normalize(z, dim=1) / math.sqrt(0.5)
    torch.testing.assert_close(m.hydra_loss(zn, ones, y, y, 123.0, "official"), expected)


def test_gate_selects_the_subspace():
    """Samples that agree only on the gated-on dimensions are perfectly similar in that pair's subspace."""
    z = torch.tensor([[1.0, 0.0, 5.0], [1.0, 0.0, -5.0]], dtype=torch.float64)
    g = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(m.gated_logits(z, g, 1.0, "cosine"), torch.ones(2, 2, dtype=torch.float64))
    # without re-normalisation the logit is the gated part of the cosine: u_1 . u_2 restricted to dim 0 = 1/26
    torch.testing.assert_close(m.gated_logits(z, g, 1.0, "normalised"), torch.full((2, 2), 1 / 26, dtype=torch.float64))
    torch.testing.assert_close(m.gated_logits(z, g, 1.0, "official"), torch.ones(2, 2, dtype=torch.float64))  # z_0^2
    assert m.gated_logits(z, torch.ones_like(z), 1.0, "cosine")[0, 1] < -0.9  # nearly opposite without the gate
    assert m.gated_logits(z, torch.ones_like(z), 1.0, "official")[0, 1] == -24.0  # 1 - 25


def test_feature_filter_is_symmetric_and_open_gate_is_ones():
    a = m.Args()
    torch.manual_seed(0)
    f = m.FeatureFilter(6, 8, 4, 5, gated=True).eval()
    y, c = torch.tensor([0, 1, 5, 2]), torch.tensor([3, 1, 2, 5])
    torch.testing.assert_close(f(y, c), f(c, y))
    assert ((f(y, c) > 0) & (f(y, c) < 1)).all()
    assert (m.FeatureFilter(6, a.proj_dim, 4, 5, gated=False)(y, c) == 1).all()


def test_partner_classes():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (50,), generator=gen)
    arb = m.partner_classes(y, "arbitrary", 7, gen)
    assert sorted(arb.tolist()) == sorted(y.tolist())  # a permutation of the batch labels
    assert (m.partner_classes(y, "identical", 7, gen) == y).all()
    dis = m.partner_classes(y, "distinct", 7, gen)
    assert (dis != y).all() and dis.min() >= 0 and dis.max() < 7


def test_effective_rank_on_known_spectra():
    d = 6
    eye = torch.cat([torch.eye(d), -torch.eye(d)])  # zero-mean columns, d equal singular values
    assert m.effective_rank(eye) == pytest.approx(d, rel=1e-10)
    u = torch.tensor([1.0, -2.0, 0.5, 0.5])  # zero-mean, so centring keeps it rank one
    assert m.effective_rank(torch.outer(u, torch.randn(5))) == pytest.approx(1.0, rel=1e-6)
    # singular values (1, 1, 2): p = (1/4, 1/4, 1/2), H = 1.5 log 2, erank = 2^1.5
    x = torch.cat([torch.diag(torch.tensor([1.0, 1.0, 2.0])), -torch.diag(torch.tensor([1.0, 1.0, 2.0]))])
    assert m.effective_rank(x) == pytest.approx(2**1.5, rel=1e-10)


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(40)
    h = torch.randn(120, 4, generator=gen) * 0.1 + F.one_hot(y, 4).float() * 3
    assert m.linear_probe(h, y, h, y, 3, 50, 1e-4) == 1.0


# ---- the data: class relationships match the class definitions -----------------------------------------------------
def test_shared_attribute_matrix_matches_the_class_definitions():
    names = [(s, col, sz) for s in m.SHAPES for col in m.COLOURS for sz in m.SIZES]  # class c = 6 shape + 2 col + size
    rel = m.shared_attributes()
    for a in range(24):
        for b in range(24):
            assert rel[a, b] == sum(p == q for p, q in zip(names[a], names[b]))
    assert (np.diag(rel) == 3).all() and (rel == rel.T).all()
    # per class: 1 + 6 partners sharing 2 attributes (3 other shapes + 2 colours + 1 size) + 11 sharing 1 + 6 sharing 0
    for row in rel:
        assert [int((row == k).sum()) for k in range(4)] == [6, 11, 6, 1]


def test_rendered_images_follow_their_class_attributes():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(24), 20)
    x = m.render(y, rng)
    assert x.shape == (480, 3, 16, 16) and x.dtype == np.float32
    attrs = m.class_attributes()
    # colour: the dominant channel of the brightest-saturation pixels is the class colour
    sat = x.max(1) - x.min(1)  # (N, 16, 16)
    top = sat.reshape(480, -1).argmax(1)
    dominant = x.reshape(480, 3, -1)[np.arange(480), :, top].argmax(1)
    assert (dominant == attrs[y, 1]).mean() > 0.98
    # size: the coloured area of large shapes is larger than that of small shapes of the same shape and colour
    area = (sat > 0.3).reshape(480, -1).sum(1).reshape(24, 20).mean(1)
    assert (area[1::2] > 1.5 * area[0::2]).all()
    data = m.make_shapes(replace(m.PRESETS["smoke"]))
    assert torch.equal(data["relation"], torch.from_numpy(m.shared_attributes()))
    assert torch.bincount(data["train"][1], minlength=24).tolist() == [12] * 24


def test_test_set_does_not_depend_on_the_training_seed():
    a, b = m.make_shapes(m.PRESETS["smoke"]), m.make_shapes(replace(m.PRESETS["smoke"], seed=5))
    assert torch.equal(a["test"][0], b["test"][0]) and not torch.equal(a["train"][0], b["train"][0])


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--models", "simclr"], "models"),
    (["--tau", "0"], "tau"),
    (["--batch-size", "2"], "batch-size"),
    (["--data-dir", "/nonexistent/cifar"], "not a folder"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


def write_batch(path, n=6, classes=3, key=b"labels", data=None):
    rng = np.random.default_rng(0)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
         key: [i % classes for i in range(n)]}
    path.write_bytes(pickle.dumps(d))


def test_missing_test_batch_is_a_usage_error(tmp_path):
    write_batch(tmp_path / "data_batch_1")
    with pytest.raises(shared.UsageError, match="missing file") as err:
        m.load_cifar(str(tmp_path))
    assert "test" in str(err.value)


@pytest.mark.parametrize("content, word", [
    (b"not a pickle", "cannot read"),
    (pickle.dumps([1, 2, 3]), "not a CIFAR pickle"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "labels"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "3072"),
])
def test_malformed_pickles_name_the_file(tmp_path, content, word):
    write_batch(tmp_path / "test_batch")
    (tmp_path / "data_batch_1").write_bytes(content)
    with pytest.raises(shared.UsageError, match=word) as err:
        m.load_cifar(str(tmp_path))
    assert "data_batch_1" in str(err.value)


def test_well_formed_cifar_pickles_load_and_run(tmp_path):
    for i in (1, 2):
        write_batch(tmp_path / f"data_batch_{i}", n=48)
    write_batch(tmp_path / "test_batch", n=12)
    data = m.load_cifar(str(tmp_path))
    assert data["train"][0].shape == (96, 3, 32, 32) and data["classes"] == 3
    assert 0 <= data["train"][0].min() and data["train"][0].max() <= 1
    # CIFAR-100 layout: `train` / `test` files with fine_labels
    other = tmp_path / "c100"
    other.mkdir()
    write_batch(other / "train", n=20, classes=5, key=b"fine_labels")
    write_batch(other / "test", n=5, classes=5, key=b"fine_labels")
    assert m.load_cifar(str(other))["classes"] == 5
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path), out_dir=str(tmp_path), batch_size=32)
    record = m.main(args)
    assert math.isfinite(record["results"]["hydra"]["probe_acc"])
    assert "gate_vs_shared_spearman" not in record["results"]["hydra"]  # no known relations on CIFAR


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
