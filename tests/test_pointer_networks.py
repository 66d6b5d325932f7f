"""Tests of methods/pointer_networks.py: determinism, fused == reference pointer scores (values and gradients),
the geometry and TSP solvers against brute force / hand-worked cases, the authors' file format, bad arguments."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, without_timing

m = load("pointer_networks")
# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    a, b = m.main(smoke), m.main(smoke)
    assert without_timing(a["results"]) == without_timing(b["results"])
    assert a["history"] == b["history"]
    c = m.main(replace(smoke, seed=1))
    assert c["history"] != a["history"]  # the seed reaches weights and the training stream


def test_head_to_head_models_train_on_the_same_examples_at_the_compare_n(tmp_path, monkeypatch):
    calls, real = [], m.make_batch

    def spy(task, rng, B, n_min, n_max):
        batch = real(task, rng, B, n_min, n_max)
        calls.append((task, n_min, n_max, batch))
        return batch
    monkeypatch.setattr(m, "make_batch", spy)
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path), hull_test_ns=(5, 8, 10, 20), hull_compare_n=8)
    m.main(args)
    k, c = args.hull_steps, args.hull_compare_steps  # order: hull 5..10 Ptr-Net, Ptr-Net at n, seq2seq at n, TSP
    assert [x[:3] for x in calls[:k]] == [("hull", 5, 10)] * k
    ptr, s2s = calls[k:k + c], calls[k + c:k + 2 * c]
    assert [x[:3] for x in ptr] == [x[:3] for x in s2s] == [("hull", 8, 8)] * c
    for (*_, a), (*_, b) in zip(ptr, s2s):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(calls[0][3][0][:, :5], ptr[0][3][0][:, :5])  # a stream of its own


def test_scoring_during_training_leaves_training_untouched(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    plain, scored = m.main(smoke), m.main(replace(smoke, hull_compare_test_every=1))
    assert without_timing(plain["results"]) == without_timing(scored["results"])
    c, k = smoke.hull_compare_n, smoke.hull_compare_steps
    for name in ("ptr_net_at_n", "seq2seq_attn"):
        rows = [r for r in scored["history"][name] if "test/acc" in r]
        assert [r["step"] for r in rows] == list(range(1, k + 1))
        assert rows[-1]["test/acc"] == scored["results"][name][f"hull_acc_n{c}"]  # the last score is the table's
        assert not any("test/acc" in r for r in plain["history"][name])


# ------------------------------------------------------------------------------------------- fused == reference
def random_scores(B=3, m_=7, N=13, d=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1e, w2d, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((B, N, d), (B, m_, d), (d,)))
    lengths = torch.tensor([N - 1, 5, 8])[:B]
    targets = torch.tensor([[3, 1, 12, 7, 0, 0, 0], [2, 4, 1, 0, 0, 0, 0], [8, 2, 6, 5, 1, 0, 0]])[:B, :m_]
    tmask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]).bool()[:B, :m_]
    mask = m.allowed_masks(lengths, targets, tmask, N, eos=True, mask_used=True)  # the model's own masks
    return w1e, w2d, v, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_equals_reference_values_and_gradients(seed):
    w1e, w2d, v, mask = random_scores(seed=seed)
    weight = torch.rand(mask.shape, dtype=torch.float64) * mask  # any smooth function of the finite entries
    outs, grads = [], []
    for fn in (m.attention_reference, m.attention_fused):
        xs = [t.clone().requires_grad_(True) for t in (w1e, w2d, v)]
        logp = fn(*xs, mask)
        outs.append(logp)
        grads.append(torch.autograd.grad((logp.masked_fill(~mask, 0) * weight).sum(), xs))
    assert torch.equal(torch.isinf(outs[0]), ~mask) and torch.equal(torch.isinf(outs[1]), ~mask)
    torch.testing.assert_close(outs[0][mask], outs[1][mask], rtol=1e-12, atol=1e-12)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    assert torch.allclose(outs[0].exp().sum(-1), torch.ones(1, dtype=torch.float64))  # a distribution per step


def test_pointer_formula_by_hand():
    """u_j = v^T tanh(W1 e_j + W2 d) for one step, written out with plain loops, then masked softmax."""
    w1e, w2d, v, mask = random_scores(B=1, m_=1, N=4, d=3)
    mask = torch.tensor([[[True, False, True, True]]])
    u = [sum(v[k] * torch.tanh(w1e[0, j, k] + w2d[0, 0, k]) for k in range(3)) for j in range(4)]
    p = torch.tensor([float(torch.exp(u[j])) if mask[0, 0, j] else 0.0 for j in range(4)], dtype=torch.float64)
    for fn in (m.attention_reference, m.attention_fused):
        torch.testing.assert_close(fn(w1e, w2d, v, mask).exp()[0, 0], p / p.sum())


@pytest.mark.parametrize("build", ["ptr_hull", "ptr_tsp", "seq2seq", "seq2seq_point"])
def test_whole_model_same_weights_both_paths(build):
    rng = np.random.default_rng(0)
    task, lo, hi = ("tsp", 4, 7) if build == "ptr_tsp" else ("hull", 5, 9)
    batch = m.make_batch(task, rng, 6, lo, hi)
    points = batch[0].double()
    models = []
    for fn in (m.attention_reference, m.attention_fused):
        torch.manual_seed(0)
        models.append({"ptr_hull": lambda: m.PointerNet(11, fn, eos=True),
                       "ptr_tsp": lambda: m.PointerNet(11, fn, eos=False),
                       "seq2seq": lambda: m.Seq2SeqAttention(11, fn, n_vocab=9),
                       "seq2seq_point": lambda: m.Seq2SeqAttention(11, fn, n_vocab=9, dec_input="point")}[build]().double())
    losses = [mod(points, *batch[1:]) for mod in models]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    g = [torch.autograd.grad(loss, list(mod.parameters()), allow_unused=True, materialize_grads=True)
         for loss, mod in zip(losses, models)]  # (the seq2seq "go" point is unused when it reads symbols)
    for ga, gb in zip(*g):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
    full = points[:, :hi] if task == "tsp" else points
    lengths = torch.full((len(full),), full.shape[1])
    assert torch.equal(models[0].decode(full, lengths), models[1].decode(full, lengths))


@pytest.mark.parametrize("dec_input", ["symbol", "point"])
def test_seq2seq_teacher_forcing_on_its_own_greedy_output_replays_the_same_logits(dec_input, monkeypatch):
    """Training and decoding must feed the decoder the same thing (start symbol, then C_{i-1} or P_{C_{i-1}}):
    teacher-forcing the model on its own greedy output reproduces every logit of the greedy run."""
    torch.manual_seed(0)
    model = m.Seq2SeqAttention(10, m.attention_fused, n_vocab=8, dec_input=dec_input).double()
    pts, lengths = torch.rand(6, 8, 2, dtype=torch.float64), torch.full((6,), 8)
    seen, real = [], m.Seq2SeqAttention.step

    def spy(self, *a):
        out = real(self, *a)
        seen.append(out[0])
        return out
    monkeypatch.setattr(m.Seq2SeqAttention, "step", spy)
    out = model.decode(pts, lengths)  # (B,T) symbols, 0 = EOS and after
    greedy, seen[:] = torch.stack(seen, 1), []
    tmask = (out == 0).cumsum(1) - (out == 0).long() == 0  # up to and including the first EOS
    assert (out == 0).any(1).all() and (out[:, 0] > 0).all()  # every row names a point, then ends
    model(pts, lengths, out, tmask)
    forced = torch.stack(seen, 1)
    torch.testing.assert_close(forced[tmask], greedy[:, :out.shape[1]][tmask], rtol=0, atol=1e-12)


def test_greedy_tsp_decoding_gives_permutations_and_padding_never_matters():
    torch.manual_seed(0)
    model = m.PointerNet(8, m.attention_fused, eos=False).double()
    pts = torch.rand(5, 7, 2, dtype=torch.float64)
    tours = model.decode(pts, torch.full((5,), 7)) - 1
    assert (tours.sort(1).values == torch.arange(7)).all()
    # a padded short row encodes exactly like the same row alone (packing keeps padding out of the state)
    padded = torch.cat([pts[:1, :4], torch.zeros(1, 3, 2, dtype=torch.float64)], 1)
    both = torch.cat([padded, pts[1:2]])
    e_pad, (h_pad, _) = m.encode(model.encoder, model.embed(both), torch.tensor([4, 7]))
    e_one, (h_one, _) = m.encode(model.encoder, model.embed(pts[:1, :4]), torch.tensor([4]))
    torch.testing.assert_close(e_pad[0, :4], e_one[0])
    torch.testing.assert_close(h_pad[0, 0], h_one[0, 0])


def test_allowed_masks_hand_case():
    # one hull example with n=4 (padded to 5 points), target 2 -> 4 -> 1 -> EOS, then a padded step
    mask = m.allowed_masks(torch.tensor([4]), torch.tensor([[2, 4, 1, 0, 0]]),
                           torch.tensor([[1, 1, 1, 1, 0]]).bool(), N=6, eos=True, mask_used=True)[0].int()
    expected = [[1, 1, 1, 1, 1, 0],   # step 1: EOS and points 1..4, not the padded slot 5
                [1, 1, 0, 1, 1, 0],   # 2 used
                [1, 1, 0, 1, 0, 0],   # 2, 4 used
                [1, 0, 0, 1, 0, 0],   # 2, 4, 1 used: only 3 or EOS
                [1, 1, 1, 1, 1, 1]]   # padded step: anything (ignored by the loss, never an empty row)
    assert mask.tolist() == expected


# ------------------------------------------------------------------------------------------- geometry and TSP
def brute_force_hull(P):
    """All-pairs half-plane test: (i, j) is a hull edge iff every other point is strictly left of i -> j.
    Following those edges gives the counter-clockwise cycle; start it at the lowest index."""
    n = len(P)
    nxt = {}
    for i, j in itertools.permutations(range(n), 2):
        d = P[j] - P[i]
        others = [k for k in range(n) if k not in (i, j)]
        if all(d[0] * (P[k][1] - P[i][1]) - d[1] * (P[k][0] - P[i][0]) > 0 for k in others):
            nxt[i] = j
    start = min(nxt)
    cycle = [start]
    while nxt[cycle[-1]] != start:
        cycle.append(nxt[cycle[-1]])
    return cycle


def test_monotone_chain_matches_brute_force_hull():
    rng = np.random.default_rng(0)
    for n in [3, 3, 4, 4, 5, 6, 7, 9, 12, 15] * 8:
        P = rng.random((n, 2))
        assert m.convex_hull(P) == brute_force_hull(P), P
    # a hand-made case: square corners 4, 0, 2, 1 and an interior point 3
    P = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]])
    assert m.convex_hull(P) == [0, 1, 2, 4]


def test_held_karp_matches_brute_force_and_heuristics_are_tours():
    rng = np.random.default_rng(1)
    for n in range(4, 9):
        P = rng.random((40, n, 2))
        bf, hk = m.tsp_brute_force(P), m.tsp_held_karp(P)
        np.testing.assert_allclose(m.tour_length(P, hk), m.tour_length(P, bf), rtol=1e-12)
        assert (hk == bf).all()  # same canonical tour: city 0 first, 2nd index < last index
        assert (bf[:, 0] == 0).all() and (bf[:, 1] < bf[:, -1]).all()
        opt = m.tour_length(P, hk)
        for heuristic in (m.nearest_neighbour, m.farthest_insertion):
            t = heuristic(P)
            assert (np.sort(t, 1) == np.arange(n)).all()
            assert (m.tour_length(P, t) >= opt - 1e-12).all()
    # a hand-worked case: the 4 corners of the unit square, optimal tour = perimeter 4
    sq = np.array([[[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    assert m.tsp_held_karp(sq).tolist() == [[0, 2, 1, 3]] and m.tour_length(sq, m.tsp_held_karp(sq))[0] == 4.0


def test_shoelace_and_simple_polygon_by_hand():
    L = np.array([[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]], float)  # L-shape: 2x2 square minus 1x1 = 3
    assert m.shoelace(L) == 3.0 and m.shoelace(L[::-1]) == -3.0
    assert m.shoelace(np.array([[0, 0], [4, 0], [0, 3]], float)) == 6.0
    assert m.is_simple_polygon(L)
    assert not m.is_simple_polygon(np.array([[0, 0], [1, 1], [1, 0], [0, 1]], float))  # bow-tie crosses
    assert not m.is_simple_polygon(np.array([[0, 0], [1, 1]], float))


def test_hull_scores_count_exact_area_and_invalid():
    P = np.array([[[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]]] * 3, float)
    truth = [[0, 1, 2, 3]] * 3
    preds = [[0, 1, 2, 3], [0, 1, 2], [0, 2, 1, 3]]  # exact; a valid half-square triangle; a bow-tie
    s = m.hull_scores(P, preds, truth)
    assert s["acc"] == pytest.approx(1 / 3) and s["invalid"] == pytest.approx(1 / 3)
    assert s["area"] == pytest.approx((1.0 + 0.5) / 2)  # averaged over the two valid outputs


# ------------------------------------------------------------------------------------------- the authors' files
def test_authors_file_loads_and_is_canonicalised(tmp_path):
    f = tmp_path / "convex_hull_5_test.txt"
    # points 1..5: square corners 1,2,3,5 and interior 4; the file lists the hull clockwise from 3, closed
    f.write_text("0 0 1 0 1 1 0.5 0.5 0 1 output 3 2 1 5 3\n0 0 1 0 1 1 0.4 0.6 0 1 output 1 2 3 5 1\n")
    pts, targets = m.read_authors_file(f, "hull")
    assert pts.shape == (2, 5, 2) and pts[0, 3].tolist() == [0.5, 0.5]
    assert targets == [[0, 1, 2, 4], [0, 1, 2, 4]] == [m.convex_hull(p) for p in pts]
    g = tmp_path / "tsp5_test.txt"
    g.write_text("0 0 1 0 1 1 0.5 1.2 0 1 output 1 5 4 3 2 1\n")
    pts, tours = m.read_authors_file(g, "tsp")
    assert tours == [[0, 1, 2, 3, 4]]  # direction flipped so that the 2nd city has the smaller index
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path), hull_test_ns=(5, 10, 20), n_test=3)
    sets = m.make_test_sets(args)
    assert sets["hull"][5][0].shape == (2, 5, 2) and sets["hull"][10][0].shape == (3, 10, 2)
    assert sets["tsp"][5].shape == (1, 5, 2)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("0 0 1 0 1 1 0 1 3 1 2\n", "output"),
    ("0 0 1 0 1 1 0 output 1 2 3 1\n", "even"),
    ("0 0 1 0 1 1 x 1 output 1 2 3 1\n", "not a number"),
    ("0 0 1 0 1 1 0 1 output 1 2 9 1\n", "1..4"),
    ("0 0 1 0 1 1 0 1 output 1 2 3 1\n0 0 1 0 1 1 0 1 0.5 0.5 output 1 2 3 1\n", "line 2"),
])
def test_malformed_authors_files_name_the_problem(tmp_path, text, words):
    f = tmp_path / "convex_hull_4_test.txt"
    f.write_text(text)
    with pytest.raises(shared.UsageError, match=words):
        m.read_authors_file(f, "hull")


def test_malformed_data_dir_file_exits_2(tmp_path):
    (tmp_path / "convex_hull_10_test.txt").write_text("0 0 1 0 1 1 0 1 output 1 2 3\n0.5 0.5 output 1\n")
    proc = run_script("pointer_networks", "--preset", "smoke", "--data-dir", tmp_path, "--out-dir", tmp_path)
    assert_usage_error(proc, "convex_hull_10_test.txt", "line 2")


# ------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("flags, word", [
    (["--hidden", "0"], "hidden"),
    (["--hull-n-min", "2"], "at least 3"),
    (["--hull-test-ns", "4", "10", "20"], "below the training minimum"),
    (["--hull-compare-n", "15"], "--hull-compare-n 15"),
    (["--hull-compare-test-every", "-1"], "0 (off)"),
])
def test_bad_arguments_exit_2_with_one_sentence(flags, word):
    assert_usage_error(run_script("pointer_networks", "--preset", "smoke", *flags), word)


def test_validate_rejects_in_process():
    for bad in (dict(tsp_test_ns=(5, 8, 13)), dict(hull_test_ns=(5, 10)), dict(hull_n_max=4), dict(lr=0.0),
                dict(hull_compare_n=40), dict(hull_compare_steps=0), dict(data_dir="/no/such/folder")):
        with pytest.raises(shared.UsageError):
            m.validate(replace(m.Args(), **bad))


def test_claim_logic_passes_and_names_each_failure():
    args = m.Args()
    good = {"ptr_net": {"hull_acc_n10": 0.6, "hull_area_n10": 0.99, "hull_invalid_n20": 0.02, "hull_area_n20": 0.98,
                        "tsp_gap_n5": 0.01, "tsp_gap_n8": 0.03, "tsp_len_n5": 2.14, "tsp_len_n8": 2.68},
            "ptr_net_at_n": {"hull_acc_n50": 0.30, "hull_area_n50": 0.99},
            "seq2seq_attn": {"hull_acc_n50": 0.0, "hull_area_n50": 0.5},
            "nearest_neighbour": {"tsp_len_n5": 2.2, "tsp_len_n8": 2.8}}
    assert m.judge(args, good)["passed"] is True
    bad = {k: dict(v) for k, v in good.items()}
    bad["seq2seq_attn"]["hull_acc_n50"], bad["ptr_net"]["hull_invalid_n20"] = 0.15, 0.06
    claim = m.judge(args, bad)
    assert claim["passed"] is False and sum(not ok for ok in claim["checks"].values()) == 2
    assert "over seq2seq+attn +15.0 points >= +20" in claim["text"] and "n=20 valid 94.0%" in claim["text"]
    bad = {k: dict(v) for k, v in good.items()}
    bad["seq2seq_attn"]["hull_area_n50"] = 0.995  # a baseline whose valid hulls cover more than Ptr-Net's
    claim = m.judge(args, bad)
    assert [k for k, ok in claim["checks"].items() if not ok] == [
        "n=50 (both trained at n=50) area 0.990 > seq2seq+attn's 0.995"]


# ------------------------------------------------------------------------------------------- the claim
@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["results"]
