"""Tests of methods/recurrent_relational_networks.py: determinism, fused == reference message passing (values and
gradients, and the whole model), the Sudoku graph, the exact solver against brute force, puzzle generation (unique,
valid, k givens), constraint propagation, the paper's csv format, bad arguments, the claim logic."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, without_timing

m = load("recurrent_relational_networks")
SLUG = "recurrent_relational_networks"


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    a, b = m.main(smoke), m.main(smoke)
    assert without_timing(a["results"]) == without_timing(b["results"])
    assert a["history"] == b["history"]
    c = m.main(replace(smoke, seed=1))
    assert c["history"] != a["history"]  # the seed reaches the weights, the pool and the stream
    assert (tmp_path / f"{SLUG}__smoke__s0.png").exists()


# ------------------------------------------------------------------------------------------- fused == reference
@pytest.mark.parametrize("p, q, H, layers", [(2, 2, 7, 0), (2, 3, 5, 1), (3, 3, 6, 2), (2, 3, 9, 3)])
def test_fused_messages_equal_literal_per_edge_messages(p, q, H, layers):
    torch.manual_seed(0)
    f = m.mlp(2 * H, 11, H, layers).double()
    nbr = m.neighbour_table(p, q)
    h0 = torch.randn(3, (p * q) ** 2, H, dtype=torch.float64)
    w = torch.randn(3, (p * q) ** 2, H, dtype=torch.float64)  # a generic downstream function of the output
    outs, grads = [], []
    for fn in (m.messages_reference, m.messages_fused):
        h = h0.clone().requires_grad_(True)
        out = fn(h, f, nbr)
        outs.append(out)
        grads.append(torch.autograd.grad((out * w).sum() + out.square().sum(), [h, *f.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


def test_message_sum_by_hand():
    """m_j = sum over j's neighbours of f([h_i ; h_j]), written as an explicit loop over cells."""
    torch.manual_seed(1)
    f, nbr = m.mlp(8, 5, 4, 1).double(), m.neighbour_table(2, 2)
    h = torch.randn(2, 16, 4, dtype=torch.float64)
    by_hand = torch.stack([torch.stack([sum(f(torch.cat([h[b, i], h[b, j]])) for i in nbr[j].tolist())
                                        for j in range(16)]) for b in range(2)])
    for fn in (m.messages_reference, m.messages_fused):
        torch.testing.assert_close(fn(h, f, nbr), by_hand)


def test_whole_model_same_weights_both_paths():
    args = replace(m.PRESETS["smoke"], hidden=6, embed=3, mlp_layers=2)
    puz, sol = m.draw_puzzles(np.random.default_rng(0), *m.make_pool(np.random.default_rng(0), 3, 2, 3), 4,
                              (14, 20), 2, 3)
    puz, sol = torch.as_tensor(puz), torch.as_tensor(sol)
    models = []
    for fn in (m.messages_reference, m.messages_fused):
        torch.manual_seed(0)
        models.append(m.RRN(2, 3, args, fn).double())
    logits = [mod(puz, 5) for mod in models]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-10, atol=1e-10)
    assert logits[0].shape == (5, 4, 36, 7)
    grads = [torch.autograd.grad(m.step_loss(lg, sol), list(mod.parameters())) for lg, mod in zip(logits, models)]
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)


def test_loss_is_the_mean_of_per_step_cross_entropies():
    g = torch.Generator().manual_seed(0)
    logits, sol = torch.randn(3, 2, 4, 5, generator=g), torch.randint(1, 5, (2, 4), generator=g)
    per_step = [torch.nn.functional.cross_entropy(logits[t].reshape(-1, 5), sol.reshape(-1)) for t in range(3)]
    torch.testing.assert_close(m.step_loss(logits, sol), torch.stack(per_step).mean())


# ------------------------------------------------------------------------------------------- graph, solver, data
@pytest.mark.parametrize("p, q", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_neighbour_table_degree_and_symmetry(p, q):
    N = p * q
    nbr = m.neighbour_table(p, q)
    assert nbr.shape == (N * N, 2 * (N - 1) + (p - 1) * (q - 1))  # 20 on 9x9, 12 on 6x6, 7 on 4x4
    edges = {(int(i), j) for j in range(N * N) for i in nbr[j]}
    assert all((j, i) in edges for i, j in edges) and all(i != j for i, j in edges)
    if (p, q) == (2, 2):
        assert sorted(nbr[0].tolist()) == [1, 2, 3, 4, 5, 8, 12]  # row 0, column 0, and cell 5 of the box


def all_4x4_grids():
    """Every 4x4 Sudoku grid by brute force over row permutations (there are 288)."""
    perms, out = list(itertools.permutations(range(1, 5))), []
    for rows in itertools.product(perms, repeat=4):
        g = np.array(rows)
        if all(len(set(g[:, c])) == 4 for c in range(4)) and all(
                len(set(g[r:r + 2, c:c + 2].ravel())) == 4 for r in (0, 2) for c in (0, 2)):
            out.append(g.ravel())
    return np.array(out)


def test_solver_counts_match_brute_force_on_4x4():
    grids = all_4x4_grids()
    assert len(grids) == 288 and all(m.is_solution(g, 2, 2) for g in grids)
    rng = np.random.default_rng(0)
    for _ in range(150):
        puzzle = grids[rng.integers(288)] * (rng.random(16) < rng.uniform(0.1, 0.6))
        consistent = ((puzzle == 0) | (grids == puzzle)).all(1)  # (288,) grids that extend the puzzle
        count, sol = m.count_solutions(puzzle, 2, 2, limit=1000)
        assert count == consistent.sum()
        assert sol is not None and any((grids[consistent] == sol).all(1))
        assert m.count_solutions(puzzle, 2, 2, limit=2)[0] == min(consistent.sum(), 2)
    bad = grids[0].copy()
    bad[1] = bad[0]  # two equal digits in row 0
    assert m.count_solutions(bad, 2, 2) == (0, None) and not m.is_solution(bad, 2, 2)


@pytest.mark.parametrize("p, q", [(2, 2), (2, 3)])
def test_minimal_puzzles_are_unique_and_minimal(p, q):
    rng = np.random.default_rng(3)
    grids, minimal = m.make_pool(rng, 6, p, q)
    for g, mask in zip(grids, minimal):
        assert m.is_solution(g, p, q)
        puz = g * mask
        assert m.count_solutions(puz, p, q) == (1, g.tolist())
        for i in np.flatnonzero(mask):  # minimal: dropping any one given makes it ambiguous
            less = puz.copy()
            less[i] = 0
            assert m.count_solutions(less, p, q)[0] == 2


def test_drawn_puzzles_keep_validity_uniqueness_and_k_givens():
    grids, minimal = m.make_pool(np.random.default_rng(0), 8, 2, 3)
    puz, sol = m.draw_puzzles(np.random.default_rng(1), grids, minimal, 40, (14, 22), 2, 3)
    k = (puz > 0).sum(1)
    assert ((k >= 14) & (k <= 22)).all() and ((puz == 0) | (puz == sol)).all()
    for x, s in zip(puz, sol):
        assert m.is_solution(s, 2, 3) and m.count_solutions(x, 2, 3) == (1, s.tolist())
    assert len({s.tobytes() for s in sol}) == 40  # symmetries: no two draws repeat a grid
    tp, ts = m.make_test_set(grids, minimal, 12, (10, 13), 0, 2, 3)
    assert sorted(set((tp > 0).sum(1).tolist())) == [10, 11, 12, 13]


def test_propagation_only_places_forced_digits():
    grids, minimal = m.make_pool(np.random.default_rng(0), 3, 3, 3)
    for g, mask in zip(grids, minimal):
        filled = np.array(m.propagate(g * mask, 3, 3))
        assert ((filled == 0) | (filled == g)).all()  # never a wrong digit
    hand = np.array(grids[0])
    hand[[0, 40, 80]] = 0  # three blanks, each a naked single
    assert m.propagate(hand, 3, 3) == grids[0].tolist()


# ------------------------------------------------------------------------------------------- Pretty-CLEVR
def test_messages_with_edge_features_fused_equal_reference():
    torch.manual_seed(0)
    H, D = 5, 3
    f = m.mlp(2 * H + D, 7, H, 2).double()
    nbr = torch.tensor([[i for i in range(8) if i != j] for j in range(8)])
    h0, edge0 = torch.randn(4, 8, H, dtype=torch.float64), torch.randn(4, 8, 7, D, dtype=torch.float64)
    outs, grads = [], []
    for fn in (m.messages_reference, m.messages_fused):
        h, edge = h0.clone().requires_grad_(True), edge0.clone().requires_grad_(True)
        out = fn(h, f, nbr, edge)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sin().sum(), [h, edge, *f.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)
    # by hand: node 2 receives f([h_i ; h_2 ; e]) from every other node i, e the feature of edge i -> 2
    by_hand = sum(f(torch.cat([h0[1, i], h0[1, 2], edge0[1, 2, k]])) for k, i in enumerate(nbr[2].tolist()))
    torch.testing.assert_close(outs[0][1, 2], by_hand)


def test_scene_model_same_weights_both_paths_and_edge_is_the_distance():
    args = replace(m.PRESETS["smoke"], clevr_hidden=6, mlp_layers=2)
    scenes = m.Scenes(np.random.default_rng(0), 5, 0.1)
    obj, dist, qn, ans, _ = (torch.as_tensor(a) for a in scenes.questions(np.random.default_rng(1), 6))
    models = []
    for fn in (m.messages_reference, m.messages_fused):
        torch.manual_seed(0)
        models.append(m.SceneRRN(args, fn).double())
    logits = [mod(obj.double(), dist.double(), qn.double(), 4) for mod in models]
    assert logits[0].shape == (4, 6, 16)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(m.step_loss(lg, ans), list(mod.parameters())) for lg, mod in zip(logits, models)]
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)
    pos = obj[..., :2].double()
    torch.testing.assert_close(dist.double(), torch.cdist(pos, pos), rtol=1e-5, atol=1e-6)


def test_scenes_have_each_colour_and_shape_once_and_spaced_objects():
    pos, colour, shape = m.clevr_scenes(np.random.default_rng(0), 200, 0.15)
    assert (np.sort(colour, 1) == np.arange(8)).all() and (np.sort(shape, 1) == np.arange(8)).all()
    d = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1) + 9 * np.eye(8)
    assert d.min() > 0.15 and pos.min() >= 0 and pos.max() <= 1


def test_greedy_paths_match_a_plain_loop():
    """path[s, a, n]: walk from a, each time to the closest object not visited yet (written out per scene)."""
    pos, _, _ = m.clevr_scenes(np.random.default_rng(1), 30, 0.1)
    path = m.greedy_paths(pos)
    for s in range(30):
        for a in range(8):
            walk = [a]
            while len(walk) < 8:
                here = pos[s, walk[-1]]
                rest = [o for o in range(8) if o not in walk]
                walk.append(min(rest, key=lambda o: float(np.hypot(*(pos[s, o] - here)))))
            assert path[s, a].tolist() == walk


def test_questions_answer_the_other_attribute_of_the_object_reached():
    scenes = m.Scenes(np.random.default_rng(2), 10, 0.1)
    rng = np.random.default_rng(3)
    obj, dist, qn, ans, n = scenes.questions(rng, 300)
    colour, shape = obj[:, :, 2:10].argmax(-1), obj[:, :, 10:18].argmax(-1)  # (300,8) read back from the input
    for b in range(300):
        anchor, jumps = int(qn[b, :16].argmax()), int(qn[b, 16:].argmax())
        assert jumps == n[b]
        start = int(np.flatnonzero(colour[b] == anchor)[0]) if anchor < 8 else int(
            np.flatnonzero(shape[b] == anchor - 8)[0])
        here, seen = start, {start}
        for _ in range(jumps):  # closest unvisited object, by the distances given to the model
            here = min((o for o in range(8) if o not in seen), key=lambda o: dist[b, here, o])
            seen.add(here)
        assert ans[b] == (8 + shape[b, here] if anchor < 8 else colour[b, here])
    test = m.clevr_test_set(replace(m.Args(), clevr_test=5))
    assert (np.bincount(test[4]) == 5).all()  # every jump count 0..7 equally often


def test_clevr_only_run_gates_on_its_own_checks(tmp_path):
    record = m.main(replace(m.PRESETS["smoke"], task="clevr", out_dir=str(tmp_path)))
    assert set(record["results"]) == {"clevr_rrn", "clevr_rn", "clevr_mlp"}
    assert len(record["claim"]["checks"]) == 2 and record["key"]["method"] == "clevr_rrn"
    good = {"clevr_rrn": {"acc_j0": 1.0, "acc_j2plus": 0.6}, "clevr_rn": {"acc_j0": 0.95, "acc_j2plus": 0.3},
            "clevr_mlp": {"acc_j0": 0.92, "acc_j2plus": 0.45}}
    assert m.judge(m.Args(), good)["passed"] is True
    good["clevr_mlp"]["acc_j2plus"] = 0.55
    assert m.judge(m.Args(), good)["passed"] is False


# ------------------------------------------------------------------------------------------- the paper's csv files
def write_csv(path, grids, n=3):
    lines = ["quizzes,solutions"]
    for g in grids[:n]:
        q = g.copy()
        q[::3] = 0
        lines.append("".join(map(str, q)) + "," + "".join(map(str, g)))
    path.write_text("\n".join(lines) + "\n")


def test_csv_loads_and_feeds_a_run(tmp_path):
    grids, _ = m.make_pool(np.random.default_rng(0), 3, 3, 3)
    for name in ("train.csv", "test.csv"):
        write_csv(tmp_path / name, grids)
    quiz, sol = m.read_csv(tmp_path / "test.csv", 81, 9)
    assert quiz.shape == (3, 81) and (sol == grids).all() and (quiz[:, ::3] == 0).all()
    args = replace(m.PRESETS["smoke"], box_rows=3, box_cols=3, data_dir=str(tmp_path), train_givens=(50, 60),
                   hard_givens=(53, 54), n_test=2)
    sets = m.make_test_sets(args, 3, 3)
    assert sets["in"][0].shape == (2, 81) and sets["hard"][0].shape == (2, 81)


@pytest.mark.parametrize("text, words", [
    ("", "no puzzles"),
    ("123,456\n", "line 1"),
    ("0" * 81 + "\n", "line 1"),
    ("1" * 81 + "," + "1" * 81 + "\n" + "x" * 81 + "," + "1" * 81 + "\n", "line 2"),
    ("2" + "0" * 80 + "," + "1" * 81 + "\n", "subset"),
])
def test_malformed_csv_names_the_file_and_problem(tmp_path, text, words):
    f = tmp_path / "test.csv"
    f.write_text(text)
    with pytest.raises(shared.UsageError, match=words) as info:
        m.read_csv(f, 81, 9)
    assert "test.csv" in str(info.value)


def test_malformed_data_dir_exits_2(tmp_path):
    write_csv(tmp_path / "test.csv", m.make_pool(np.random.default_rng(0), 2, 3, 3)[0])
    (tmp_path / "train.csv").write_text("0" * 81 + ",123\n")
    proc = run_script(SLUG, "--preset", "smoke", "--box-rows", "3", "--box-cols", "3", "--data-dir", tmp_path,
                      "--train-givens", "50", "60", "--hard-givens", "53", "54", "--out-dir", tmp_path)
    assert_usage_error(proc, "train.csv", "line 1")


# ------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("flags, word", [
    (["--steps", "1"], "--steps"),
    (["--train-givens", "20", "14"], "--train-givens"),
    (["--clevr-min-dist", "0.5"], "--clevr-min-dist"),
    (["--task", "clevr", "--data-dir", "."], "Pretty-CLEVR"),
])
def test_bad_arguments_exit_2_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, "--preset", "smoke", *flags), word)


def test_validate_rejects_in_process(tmp_path):
    for bad in (dict(box_rows=0), dict(hidden=0), dict(eval_steps=4, steps=8), dict(hard_givens=(10, 36)),
                dict(data_dir="/no/such/folder"), dict(data_dir=str(tmp_path)), dict(lr=0.0),
                dict(data_dir=str(tmp_path), box_rows=3, box_cols=3)):  # the folder lacks train.csv / test.csv
        with pytest.raises(shared.UsageError):
            m.validate(replace(m.Args(), **bad))


def test_claim_logic_passes_and_names_each_failure():
    args = m.Args()
    rrn = {"in_solved_t1": 0.01, "in_solved_t8": 0.7, "in_solved_t16": 0.72, "hard_solved_t16": 0.1}
    good = {"rrn": rrn, "rn": {"in_solved": 0.01}, "mlp": {"in_solved": 0.3, "hard_solved": 0.01}}
    assert m.judge(args, good)["passed"] is True
    bad = {k: dict(v) for k, v in good.items()}
    bad["rrn"]["in_solved_t16"], bad["rn"]["in_solved"] = 0.6, 0.2
    claim = m.judge(args, bad)
    assert claim["passed"] is False and sum(not ok for ok in claim["checks"].values()) == 2
    assert "RN (T=1) solved 20.0% <= 5%" in claim["text"]


# ------------------------------------------------------------------------------------------- the claim
@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["results"]
