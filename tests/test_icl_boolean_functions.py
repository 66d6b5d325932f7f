"""icl_boolean_functions: determinism, fused == reference attention, the function-class samplers and every
reference learner against brute force (enumerated hypothesis classes, plain loops), the teaching sequence's
uniqueness, bad arguments."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_causal_attention_paths_agree, assert_usage_error, load, run_script

m = load("icl_boolean_functions")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert first["results"] == second["results"]
    assert first["history"][-1]["train/loss"] == second["history"][-1]["train/loss"]
    other = m.main(replace(args, seed=1))
    assert other["history"][-1]["train/loss"] != first["history"][-1]["train/loss"]
    assert other["results"]["TF@conjunction"] != first["results"]["TF@conjunction"]


def test_fused_equals_reference_outputs_and_gradients():
    assert_causal_attention_paths_agree(m)


def test_reference_attention_is_causal():
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    v2 = v.clone()
    v2[:, :, 5:] += 10.0  # the future of query 4
    torch.testing.assert_close(m.attention_reference(q, k, v)[:, :, :5], m.attention_reference(q, k, v2)[:, :, :5])


def test_whole_model_same_output_on_both_paths_and_prediction_ignores_the_future():
    torch.manual_seed(0)
    ref = m.ICLTransformer(7, 11, 32, 2, 4, m.attention_reference).double().eval()
    fused = m.ICLTransformer(7, 11, 32, 2, 4, m.attention_fused).double().eval()
    fused.load_state_dict(ref.state_dict())
    p = m.sample_prompts("conjunction", 5, 11, 7, gen())
    tokens = m.to_tokens(p["x"], p["y"]).double()
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), ref(tokens), atol=1e-10, rtol=1e-9)
        y2 = p["y"].clone()
        y2[:, 6:] *= -1  # labels from the query x_6 on
        torch.testing.assert_close(fused(tokens)[:, :7], fused(m.to_tokens(p["x"], y2).double())[:, :7])


def test_frozen_body_trains_only_read_in_and_read_out():
    model = m.ICLTransformer(5, 8, 16, 1, 2, m.attention_fused, frozen_body=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("read_in", "read_out")) for n in trainable)


def test_tokens_interleave_x_and_padded_y():
    p = m.sample_prompts("majority", 3, 5, 4, gen())
    t = m.to_tokens(p["x"], p["y"])
    assert t.shape == (3, 10, 4)
    torch.testing.assert_close(t[:, 0::2], p["x"])
    torch.testing.assert_close(t[:, 1::2, 0], p["y"])
    assert (t[:, 1::2, 1:] == 0).all()


# ---- the function classes, against plain loops ----------------------------------------------------------------
def literal_value(xv: float, wv: float) -> bool:
    return (wv > 0 and xv > 0) or (wv < 0 and xv < 0)


def test_conjunction_and_disjunction_labels_match_their_definition():
    x = m.rand_signs((40, 6, 7), gen(1))
    w = m.literal_weights(40, 7, 0.5, gen(2))
    conj, disj = m.conj_labels(x, w), m.disj_labels(x, w)
    for b, i in itertools.product(range(40), range(6)):
        lits = [literal_value(x[b, i, j].item(), w[b, j].item()) for j in range(7) if w[b, j] != 0]
        assert conj[b, i].item() == (1.0 if all(lits) else -1.0)  # the empty conjunction is true
        assert disj[b, i].item() == (1.0 if any(lits) else -1.0)  # the empty disjunction is false


@pytest.mark.parametrize("task", m.TASKS)
def test_every_class_gives_signs_and_balanced_enough_labels(task):
    p = m.sample_prompts(task, 400, 16, 8, gen(3), nn_start=4)
    assert set(p["x"].unique().tolist()) == {-1.0, 1.0} and set(p["y"].unique().tolist()) <= {-1.0, 1.0}
    assert 0.05 < (p["y"] > 0).float().mean().item() < 0.95  # never all one label (sign(0) would give 0)


def test_parity_and_nearest_neighbour_labels_match_loops():
    p = m.sample_prompts("sparse_parity", 30, 9, 6, gen(4))
    x = p["x"].numpy()
    for b in range(30):  # recover S from the labels by brute force: exactly one 2-subset must fit all points
        fits = [S for S in itertools.combinations(range(6), 2)
                if all(((x[b, i, list(S)] > 0).sum() % 2 == 1) == (p["y"][b, i] > 0) for i in range(9))]
        assert len(fits) >= 1
    q = m.sample_prompts("nearest_neighbours", 20, 12, 5, gen(5), nn_start=4)
    for b, i in itertools.product(range(20), range(4, 12)):
        d = [(q["x"][b, j] != q["x"][b, i]).sum().item() for j in range(i)]
        assert q["y"][b, i] == q["y"][b, int(np.argmin(d))]  # argmin = earliest on ties


def test_teaching_sequence_identifies_the_monotone_conjunction():
    n = 6
    p = m.sample_prompts("teach_conjunction", 50, n + 3, n, gen(6))
    x, y, n_teach = p["x"], p["y"], p["n_teach"]
    for b in range(50):
        T = n_teach[b].item()
        assert y[b, 0] == 1 and (y[b, 1:T] == -1).all()  # one positive, then k negatives
        consistent = [w for w in itertools.product([0.0, 1.0], repeat=n)
                      if torch.equal(m.conj_labels(x[b : b + 1, :T], torch.tensor([w])), y[b : b + 1, :T])]
        assert len(consistent) == 1  # the teaching set pins down the function among all 2^n monotone conjunctions
        assert torch.equal(m.conj_labels(x[b : b + 1], torch.tensor([consistent[0]])), y[b : b + 1])


# ---- the reference learners, against brute force -------------------------------------------------------------
def test_elimination_equals_the_most_specific_consistent_conjunction():
    n = 4
    all_w = torch.tensor(list(itertools.product([0.0, 1.0, -1.0], repeat=n)))  # every conjunction on 4 variables
    p = m.sample_prompts("conjunction", 60, 10, n, gen(7))
    x, y = p["x"], p["y"]
    pred = m.elimination_predict(x, y)
    for b, i in itertools.product(range(60), range(10)):
        if not (y[b, :i] > 0).any():
            assert pred[b, i] == -1  # no positive yet: contradictory hypothesis
            continue
        ok = [w for w in all_w if torch.equal(m.conj_labels(x[b : b + 1, :i], w[None]), y[b : b + 1, :i])]
        most_specific = max(ok, key=lambda w: w.abs().sum().item())
        assert pred[b, i] == m.conj_labels(x[b : b + 1, i : i + 1], most_specific[None])[0, 0]
    assert not ((pred > 0) & (y < 0)).any()  # a consistent most-specific learner never gives a false positive


def test_disjunction_elimination_is_exact_on_its_class_in_the_limit():
    p = m.sample_prompts("disjunction", 500, 60, 6, gen(8))
    pred = m.disjunction_elimination_predict(p["x"], p["y"])
    assert not ((pred < 0) & (p["y"] > 0)).any()  # by De Morgan duality: never a false negative
    assert (pred[:, -10:] == p["y"][:, -10:]).float().mean() > 0.99


def test_gf2_elimination_equals_brute_force_over_all_parities():
    n = 5
    subsets = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))  # all 2^n parities
    p = m.sample_prompts("parity", 40, 9, n, gen(9))
    x, y = p["x"], p["y"]
    pred = m.gf2_predict(x, y)
    for b, i in itertools.product(range(40), range(9)):
        ok = [s for s in subsets if torch.equal(m.parity_labels(x[b : b + 1, :i], s[None]), y[b : b + 1, :i])]
        votes = {m.parity_labels(x[b : b + 1, i : i + 1], s[None]).item() for s in ok}
        assert pred[b, i].item() == (votes.pop() if len(votes) == 1 else -1.0)  # determined -> that label, else -1


def test_query_only_parity_predictor_is_the_bayes_vote_over_all_pairs():
    n = 7
    x = m.rand_signs((1, 60, n), gen(11))
    pred = m.query_only_parity_predict(x, torch.zeros(1, 60))
    for i in range(60):
        ones = [x[0, i, a] > 0 for a in range(n)]
        p_plus = np.mean([ones[a] != ones[b] for a, b in itertools.combinations(range(n), 2)])
        assert pred[0, i] == (1.0 if p_plus > 0.5 else -1.0)


def test_knn_and_averaging_match_loops():
    p = m.sample_prompts("majority", 15, 12, 6, gen(10))
    x, y = p["x"].numpy(), p["y"].numpy()
    got = {k: m.knn_predict(p["x"], p["y"], k).numpy() for k in (1, 3)}
    avg = m.averaging_predict(p["x"], p["y"]).numpy()
    for b, i in itertools.product(range(15), range(12)):
        d = (x[b, :i] != x[b, i]).sum(-1)
        order = sorted(range(i), key=lambda j: (d[j], j))
        for k in (1, 3):
            s = y[b, order[:k]].sum() if i else 0.0
            assert got[k][b, i] == (1.0 if s > 0 else -1.0)
        s = x[b, i] @ (y[b, :i, None] * x[b, :i]).sum(0) if i else 0.0
        assert avg[b, i] == (1.0 if s > 0 else -1.0)


@pytest.mark.parametrize("flags, words", [
    (["--width", "64", "--n-heads", "5"], ["divide"]),
    (["--n-points", "8"], ["n-points"]),
    (["--extra-tasks", "xor"], ["extra-tasks", "xor"]),
    (["--nn-start", "0"], ["nn-start"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("icl_boolean_functions", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
