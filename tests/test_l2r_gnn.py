"""l2r_gnn: batched == looped (outputs and gradients), the weighted covariance against numpy, the correlation-stability
matrix against a per-graph loop, k-medoids on a planted structure, the generated graphs, determinism, bad arguments,
GIN-format --data-dir files, and (opt-in) the claim at the default preset."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script

SLUG = "l2r_gnn"
m = load(SLUG)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    drop = lambda r: {k: {a: b for a, b in v.items() if a != "ms_per_step"} for k, v in r["results"].items()}  # noqa
    first, again = m.main(smoke), m.main(smoke)
    assert drop(first) == drop(again)
    assert drop(m.main(replace(smoke, seed=1))) != drop(first)
    key = first["key"]
    assert np.isfinite(first["results"][key["method"]][key["metric"]])
    assert (tmp_path / "l2r_gnn__smoke__s0.png").exists()


# ---- fast == literal ----------------------------------------------------------------------------------------------
def tiny_batch(count=5, seed=0):
    graphs = m.make_split(count, 0.5, False, np.random.default_rng(seed))
    m.add_features(graphs, "degree")
    return graphs, m.collate(graphs, "cpu")


def test_index_add_aggregation_matches_the_per_node_loop_outputs_and_gradients():
    _, (x, ei, _) = tiny_batch()
    h = torch.randn(x.shape[0], 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(x.shape[0], 7, dtype=torch.float64)
    outs = {}
    for name, fn in (("fused", m.aggregate_fused), ("reference", m.aggregate_reference)):
        out = fn(h, ei)
        outs[name] = (out, *torch.autograd.grad((out * g).sum(), h))
    for a, r in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_rff", [1, 3])
def test_one_matmul_decorrelation_matches_the_pair_loop_outputs_and_gradients(n_rff):
    gen = torch.Generator().manual_seed(1)
    N, d = 13, 7
    u = m.rff(torch.randn(N, d, dtype=torch.float64, generator=gen), n_rff, gen).requires_grad_(True)
    logits = torch.randn(N, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, -1, 0, 2])  # one dead dimension (-1): out of every pair
    mask = (labels[:, None] != labels[None, :]) & (labels[:, None] >= 0) & (labels[None, :] >= 0)
    outs = {}
    for name, fn in (("fused", m.decorrelation_fused), ("reference", m.decorrelation_reference)):
        loss = fn(u, torch.softmax(logits, 0), mask)
        outs[name] = (loss, *torch.autograd.grad(loss, (u, logits)))
    for a, r in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert outs["fused"][0] > 0


def test_whole_gin_same_weights_both_aggregation_paths():
    _, (x, ei, b) = tiny_batch(4, seed=3)
    torch.manual_seed(0)
    fused = m.GIN(x.shape[1], 6, 2, 3).double().eval()
    ref = m.GIN(x.shape[1], 6, 2, 3, aggregate=m.aggregate_reference).double().eval()
    ref.load_state_dict(fused.state_dict())
    for a, r in zip(fused(x.double(), ei, b, 4), ref(x.double(), ei, b, 4)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


# ---- the maths the method rests on, against independent computations -----------------------------------------------
def test_weighted_cross_covariance_equals_numpy_weighted_cov_and_repeated_rows():
    rng = np.random.default_rng(2)
    N, d, f = 9, 4, 2
    u = rng.standard_normal((N, d, f))
    counts = rng.integers(1, 4, N)  # integer weights = each row repeated counts[n] times
    w = counts / counts.sum()
    full = np.cov(u.reshape(N, d * f), rowvar=False, aweights=w, bias=True)  # numpy's weighted covariance
    rep = np.cov(np.repeat(u.reshape(N, d * f), counts, 0), rowvar=False, bias=True)  # brute force
    np.testing.assert_allclose(full, rep, atol=1e-12)
    block = lambda i, j: full[i * f:(i + 1) * f, j * f:(j + 1) * f]  # noqa: E731  Sigma_ij, (f, f)
    expected = sum(np.square(block(i, j)).sum() for i in range(d) for j in range(i + 1, d))
    mask = ~torch.eye(d, dtype=torch.bool)
    got = m.decorrelation_fused(torch.tensor(u), torch.tensor(w), mask).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_independent_columns_decorrelate_and_a_copied_column_does_not():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(20000, 2, dtype=torch.float64, generator=gen)
    w = torch.full((20000,), 1 / 20000, dtype=torch.float64)
    mask = ~torch.eye(2, dtype=torch.bool)
    indep = m.decorrelation_fused(m.rff(z, 5, gen), w, mask).item()
    copied = m.decorrelation_fused(m.rff(torch.stack([z[:, 0], z[:, 0] ** 2], 1), 5, gen), w, mask).item()
    assert indep < 0.01 < copied  # RFF see the nonlinear dependence x -> x^2 that a Pearson correlation misses


def test_correlation_stability_matches_a_per_graph_numpy_loop():
    gen = torch.Generator().manual_seed(5)
    sizes = [5, 7, 6]
    rep = torch.randn(sum(sizes), 4, dtype=torch.float64, generator=gen)
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    dis, alive = m.correlation_stability(rep, batch, 3)
    rhos = np.stack([np.corrcoef(rep[batch == g].numpy(), rowvar=False) for g in range(3)])
    np.testing.assert_allclose(dis.numpy(), rhos.std(0), atol=1e-6)
    assert alive.all()
    rep[:, 2] = 0.0  # a dead ReLU dimension is flagged, not NaN
    dis, alive = m.correlation_stability(rep, batch, 3)
    assert alive.tolist() == [True, True, False, True] and torch.isfinite(dis).all()


def test_k_medoids_recovers_planted_blocks():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    dis = np.where(labels[:, None] == labels[None, :], 0.1, 1.0)
    np.fill_diagonal(dis, 0.0)
    got = m.k_medoids(dis, 3, np.random.default_rng(0))
    assert len({tuple(np.flatnonzero(got == c)) for c in range(3)} ^ {(0, 1, 2), (3, 4), (5, 6, 7, 8)}) == 0


def test_effective_sample_size_and_group_ratio_by_hand():
    graphs = [{"group": g} for g in (1, 1, 0, 0)]
    s = m.weight_stats(torch.tensor([1.0, 1.0, 1.0, 1.0]), graphs)
    assert s == {"ess": 1.0, "w_ratio": 1.0}
    s = m.weight_stats(torch.tensor([0.5, 0.5, 1.5, 1.5]), graphs)  # (4)^2 / (4 * 5) = 0.8; ratio 1.5 / 0.5 = 3
    assert s["ess"] == pytest.approx(0.8) and s["w_ratio"] == pytest.approx(3.0)


def test_generated_graphs_have_the_planted_motif_and_the_bias():
    rng = np.random.default_rng(6)
    for label, (n_edges, motif) in enumerate(zip((5, 6, 7), m.MOTIFS)):
        g = m.make_graph(label, 1, False, rng)  # ladder base: 2r nodes, 3r - 2 edges
        r = (g["n"] - 5) // 2
        assert len(g["edges"]) == (3 * r - 2) + n_edges + 1 and g["y"] == label
        assert {tuple(e) for e in g["edges"][-n_edges - 1:-1] - (g["n"] - 5)} == set(m.MOTIFS[motif])
    wheel = m.make_graph(0, 2, False, rng)
    assert np.bincount(wheel["edges"].reshape(-1))[0] - (wheel["n"] - 6) in (0, 1)  # hub: every rim node (+ glue)
    graphs = m.make_split(3000, 0.9, False, np.random.default_rng(7))
    majority = np.mean([g["group"] for g in graphs])
    assert abs(majority - 0.9) < 0.02  # base = the label's base with probability b exactly
    test = m.make_split(3000, 1 / 3, False, np.random.default_rng(8))
    assert abs(np.mean([g["group"] for g in test]) - 1 / 3) < 0.03
    m.add_features(graphs[:1], "degree")
    deg = np.bincount(graphs[0]["edges"].reshape(-1), minlength=graphs[0]["n"])
    assert (graphs[0]["x"][np.arange(len(deg)), 1 + np.minimum(deg, m.MAX_DEG)] == 1).all()
    assert (graphs[0]["x"].sum(1) == 2).all()


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--bias", "0.2"], "bias"),
    (["--clusters", "1"], "clusters"),
    (["--models", "erm", "magic"], "models"),
    (["--warmup", "40"], "warmup"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


GOOD = "4\n3 0\n1 2 1 2\n1 2 0 2\n1 2 0 1\n2 1\n1 1 1\n1 1 0\n4 0\n1 1 1\n1 2 0 2\n1 2 1 3\n1 1 2\n5 1\n" \
       "1 1 1\n1 2 0 2\n1 2 1 3\n1 2 2 4\n1 1 3\n"


def write_tu(tmp_path, text, name="TOY"):
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / name / f"{name}.txt").write_text(text)
    return replace(m.PRESETS["smoke"], data_dir=str(tmp_path), tu_name=name, out_dir=str(tmp_path))


@pytest.mark.parametrize("text, word", [
    (GOOD.replace("1 2 1 2\n", "1 2 1 9\n", 1), "neighbour"),  # neighbour index out of range
    ("4\n3 0\n1 2 1 2\n", "ends early"),  # truncated
    ("four\n", "malformed"),  # bad header
    ("2\n1 0\n1 0\n1 0\n1 0\n", "at least 4 graphs"),
])
def test_malformed_tu_files_name_the_file(tmp_path, text, word):
    args = write_tu(tmp_path, text)
    with pytest.raises(shared.UsageError, match="(?i)" + word) as err:
        m.load_tu(args)
    assert "TOY.txt" in str(err.value)


def test_missing_tu_file_is_a_usage_error(tmp_path):
    assert_usage_error(run_script(SLUG, "--data-dir", tmp_path, "--tu-name", "NOPE"), "missing file", "NOPE.txt")


def test_well_formed_tu_file_loads_with_the_size_split(tmp_path):
    args = write_tu(tmp_path, GOOD)
    data = m.load_tu(args)
    assert sorted(g["n"] for g in data["train"] + data["val"]) == [2, 3]  # the two smallest graphs train
    assert sorted(g["n"] for g in data["test"]) == [4, 5] and data["test_large"][0]["n"] == 5
    tri = next(g for g in data["train"] + data["val"] if g["n"] == 3)
    assert {tuple(e) for e in tri["edges"]} == {(0, 1), (0, 2), (1, 2)} and tri["y"] == 0
    path = next(g for g in data["test"] if g["n"] == 5)
    assert path["y"] == 1 and len(path["edges"]) == 4


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
