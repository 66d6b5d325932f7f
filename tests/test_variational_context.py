"""variational_context: determinism, fused == reference (word attention and context posterior, outputs and
gradients, whole model), the VC score against a literal per-candidate loop of the lower bound, the generator's
uniqueness / decoy guarantees against brute force, the unsupervised setting, the refer loader, bad arguments."""

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, without_timing

SLUG = "variational_context"
m = load(SLUG)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, again = m.main(args), m.main(args)
    assert without_timing(first["results"]) == without_timing(again["results"])
    assert first["history"] == again["history"]
    other = m.main(replace(args, seed=1))
    assert other["history"] != first["history"]


def test_unsupervised_setting_runs_and_is_finite(tmp_path):
    record = m.main(replace(m.PRESETS["smoke"], out_dir=str(tmp_path), supervision="unsupervised"))
    assert np.isfinite(record["results"]["VC"]["acc"])
    assert all(np.isfinite(h["train/loss"]) for h in record["history"])


# ---- fused == reference ---------------------------------------------------------------------------------------------
def check_paths(inputs, grads_of):
    out_ref, out_fused = m.attention_reference(*inputs), m.attention_fused(*inputs)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, grads_of, g), torch.autograd.grad(out_ref, grads_of, g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_word_attention_paths_agree_with_padding_mask():
    gen = torch.Generator().manual_seed(0)
    M, C, T, d, De = 7, 5, 11, 13, 9
    q, k, v = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
               for s in ((M, 1, C, d), (M, 1, T, d), (M, 1, T, De)))
    lens = torch.tensor([1, 3, 11, 5, 7, 2, 10])
    mask = (torch.arange(T)[None] < lens[:, None])[:, None, None]  # (M, 1, 1, T), key padding
    check_paths((q, k, v, mask, None), (q, k, v))
    # padded words get zero weight: changing their values does not move the output
    v2 = v.detach().clone()
    v2[0, :, 1:] += 100.0
    torch.testing.assert_close(m.attention_reference(q, k, v2, mask)[0], m.attention_reference(q, k, v, mask)[0])


def test_context_attention_paths_agree_with_region_mask_and_bias():
    gen = torch.Generator().manual_seed(1)
    M, N, Fd = 6, 7, 9
    f = torch.randn(M, 1, N, Fd, generator=gen, dtype=torch.float64, requires_grad=True)
    e = torch.randn(M, 1, N, N, generator=gen, dtype=torch.float64, requires_grad=True)
    n_valid = torch.tensor([4, 7, 5, 6, 4, 7])
    mask = (torch.arange(N)[None] < n_valid[:, None])[:, None, None].expand(M, 1, N, N)
    mask = mask & ~torch.eye(N, dtype=torch.bool)  # --mask-self on top of the padding
    zero = torch.zeros(M, 1, N, 1, dtype=torch.float64)
    check_paths((zero, zero, f, mask, e), (f, e))
    # it is the posterior-weighted context: sum_j softmax_j(e_ij) f_j over the allowed j
    out = m.attention_reference(zero, zero, f, mask, e)
    i, b = 2, 0
    w = torch.softmax(e[b, 0, i].masked_fill(~mask[b, 0, i], float("-inf")), -1)
    torch.testing.assert_close(out[b, 0, i], w @ f[b, 0])


def smoke_batch(args, n=5, seed=3):
    data = m.make_split(n, (args.min_objects, args.max_objects), args.mix, np.random.default_rng(seed))
    return data, m.to_device(data, np.arange(n), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["vc", "cmn", "free"])
def test_whole_model_same_scores_on_both_paths(kind):
    args = replace(m.PRESETS["smoke"], mask_self=True)
    _, b = smoke_batch(args)
    torch.manual_seed(0)
    ref = m.Grounder(kind, args, len(m.VOCAB), m.attention_reference).double()
    fused = m.Grounder(kind, args, len(m.VOCAB), m.attention_fused).double()
    fused.load_state_dict(ref.state_dict())
    inputs = (b["vis"], b["spatial"].double(), b["rmask"], b["cat"], b["tokens"], b["lens"], b["emask"])
    torch.testing.assert_close(fused(*inputs), ref(*inputs), atol=1e-10, rtol=1e-8)


# ---- the maths: VC's score is the bound evaluated at the mean context sample, candidate by candidate ----------------
def test_vc_score_equals_the_literal_per_candidate_bound():
    args = replace(m.PRESETS["smoke"], emb=6, lstm=5, vis=7)
    _, b = smoke_batch(args, n=3, seed=4)
    torch.manual_seed(1)
    model = m.Grounder("vc", args, len(m.VOCAB), m.attention_reference).double()
    with torch.no_grad():
        model.alpha.copy_(torch.tensor([0.7, 1.3, 0.9, 1.1]))
        S = model(b["vis"], b["spatial"].double(), b["rmask"], b["cat"], b["tokens"], b["lens"], b["emask"])
        f_all = model.regions(b["vis"], b["spatial"].double(), b["rmask"], b["cat"])
        a1, a2, b1, b2 = model.alpha.tolist()
        for s in range(3):
            for e in range(2):
                n = int(b["rmask"][s].sum())
                f, l = f_all[s, :n], b["spatial"][s, :n].double()
                y = model.phrases(b["tokens"][s, e][None], b["lens"][s, e][None])[0]  # (5, D)
                for i in range(n):  # candidate referent x_i
                    logits = torch.stack([a1 * model.single_c(f[j][None], y[0][None])[0] +
                                          a2 * model.pair_c(l[i][None], l[j][None], y[1][None])[0] for j in range(n)])
                    q = torch.softmax(logits, 0)  # q(j | x_i, L)
                    z = (q[:, None] * f).sum(0)  # the mean sample z~_i
                    log_q = a1 * model.single_c(z[None], y[0][None])[0] + a2 * model.pair_c(l[i][None], z[None, -5:],
                                                                                            y[1][None])[0]
                    log_p = b1 * model.single_r(f[i][None], y[2][None])[0] + \
                        b2 * model.pair_r(l[i][None], z[None, -5:], y[3][None])[0]
                    prior = model.single_g(f[i][None], y[4][None])[0]
                    torch.testing.assert_close(S[2 * s + e, i], log_p + prior - log_q, atol=1e-10, rtol=1e-8)
                assert torch.isinf(S[2 * s + e, n:]).all()  # padded regions are never candidates


def test_cmn_takes_the_max_over_other_regions_only():
    args = m.PRESETS["smoke"]
    _, b = smoke_batch(args, n=2, seed=5)
    torch.manual_seed(2)
    model = m.Grounder("cmn", args, len(m.VOCAB), m.attention_reference).double()
    with torch.no_grad():
        S = model(b["vis"], b["spatial"].double(), b["rmask"], b["cat"], b["tokens"], b["lens"], b["emask"])
        f = model.regions(b["vis"], b["spatial"].double(), b["rmask"], b["cat"])
        n = int(b["rmask"][0].sum())
        y = model.phrases(b["tokens"][0, :1], b["lens"][0, :1])
        for i in range(n):
            best = max(model.obj(f[0, j][None], y[:, 1])[0] + model.rel(b["spatial"][0, i][None].double(),
                       b["spatial"][0, j][None].double(), y[:, 2])[0] for j in range(n) if j != i)
            torch.testing.assert_close(S[0, i], model.subj(f[0, i][None], y[:, 0])[0] + best)


# ---- the data: brute-force check of the generator's guarantees -----------------------------------------------------
def brute_holds(rel, a, b):
    """The relation, written from its definition: centre of a in the 90-degree cone of b, or the closest."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {0: dx > abs(dy), 1: -dx > abs(dy), 2: dy > abs(dx), 3: -dy > abs(dx)}[rel]


@pytest.mark.parametrize("heldout", [False, True])
def test_expressions_are_unambiguous_and_relational_ones_have_a_decoy(heldout):
    rng = np.random.default_rng(7)
    n_range = (8, 10) if heldout else (4, 7)
    counts = np.zeros(3, int)
    for _ in range(60):
        kind = int(rng.integers(0, 3))
        scene = None
        while scene is None:
            scene = m.make_scene(kind, int(rng.integers(n_range[0], n_range[1] + 1)), rng, heldout)
        attrs, boxes, exprs = scene
        counts[kind] += 1
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert len(attrs) >= n_range[0] and len(exprs) == 2 and exprs[0][1] != exprs[1][1]
        for words, tgt in exprs:
            if kind == 0:  # T1: exactly one object fits every stated attribute
                fits = [all(w in (m.SHAPES[a[0]], m.COLOURS[a[1]], m.SIZE_WORDS[a[2]], "the", "object") for w in words)
                        for a in attrs]
                assert np.nonzero(fits)[0].tolist() == [tgt], words
                continue
            rel = [r for r, ws in enumerate(m.RELATIONS) if words[2:2 + len(ws)] == list(ws)][0]
            ctx_words = words[2 + len(m.RELATIONS[rel]) + 1:]
            ctx = [c for c, a in enumerate(attrs) if all(w in (m.SHAPES[a[0]], m.COLOURS[a[1]], m.SIZE_WORDS[a[2]])
                                                          for w in ctx_words)]
            assert len(ctx) == 1, words  # the context phrase names one object
            c = ctx[0]
            cands = [x for x in range(len(attrs))
                     if x != c and (words[1] == "object" or m.SHAPES[attrs[x, 0]] == words[1])]
            if rel == 4:
                d = np.hypot(*(centres[cands] - centres[c]).T)
                assert cands[int(np.argmin(d))] == tgt
            else:
                assert [x for x in cands if brute_holds(rel, centres[x], centres[c])] == [tgt], words
            if kind == 1:  # the referent phrase fits exactly two objects: the referent and the decoy's referent
                assert len([x for x in range(len(attrs)) if m.SHAPES[attrs[x, 0]] == words[1]]) == 2
                assert ((m.SHAPES.index(words[1]), int(attrs[c, 1])) in m.HELDOUT) == heldout
        if kind > 0:  # both expressions share the relation and the referent phrase; contexts differ in one attribute
            (w0, _), (w1, _) = exprs
            assert w0[:len(w0) - 3] == w1[:len(w1) - 3] or w0[:2] == w1[:2]
    assert counts.min() > 5


def test_regions_spatial_features_and_crops():
    data = m.make_split(6, (4, 7), (0.3, 0.5, 0.2), np.random.default_rng(0), keep_images=2)
    s = 0
    n = int(data["rmask"][s].sum())
    box = data["boxes"][s, 0]
    l = data["spatial"][s, 0]
    np.testing.assert_allclose(l[:4], box / 64, rtol=1e-6)
    np.testing.assert_allclose(l[4], (box[2] - box[0]) * (box[3] - box[1]) / 64 ** 2, rtol=1e-6)
    assert (data["spatial"][s, n:] == 0).all() and data["crops"].shape[2:] == (3, 12, 12)
    assert data["crops"][s, 0].max() > 150  # the object's colour is inside its crop


# ---- the refer-toolkit loader ---------------------------------------------------------------------------------------
def write_refer(root, refs=None, feats=True, embed_shape=(4, 8)):
    root.mkdir(parents=True, exist_ok=True)
    refs = refs if refs is not None else [
        {"image_id": 1, "ann_id": 11, "split": "train", "sentences": [{"tokens": ["left", "man"]}]},
        {"image_id": 1, "ann_id": 12, "split": "train", "sentences": [{"tokens": ["man"]}, {"tokens": ["right"]}]},
        {"image_id": 2, "ann_id": 21, "split": "test", "sentences": [{"tokens": ["man"]}]}]
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (root / "instances.json").write_text(json.dumps({"annotations": [], "images": []}))
    (root / "vocabulary.txt").write_text("<pad>\nman\nleft\nright\n")
    np.save(root / "embed_matrix.npy", np.zeros(embed_shape, np.float32))
    if feats:
        (root / "feats").mkdir(exist_ok=True)
        for image_id, anns in ((1, [11, 12, 13]), (2, [21, 22])):
            n = len(anns)
            np.savez(root / "feats" / f"{image_id}.npz", vis=np.random.rand(n, 6), spatial=np.random.rand(n, 5),
                     boxes=np.random.rand(n, 4), ann_ids=np.array(anns))


def test_well_formed_refer_folder_loads_and_trains(tmp_path):
    write_refer(tmp_path / "ref")
    splits, vocab, _ = m.load_refer_dir(str(tmp_path / "ref"))
    train = splits["train"]
    assert train["feats"].shape == (1, 3, 6) and train["emask"].sum() == 3
    assert train["target"][0][train["emask"][0]].tolist() == [0, 1, 1]
    assert train["tokens"][0, 0, :2].tolist() == [vocab["left"], vocab["man"]]
    record = m.main(replace(m.PRESETS["smoke"], out_dir=str(tmp_path), data_dir=str(tmp_path / "ref"), emb=8,
                            batch=1))
    assert np.isfinite(record["results"]["VC"]["acc"])


@pytest.mark.parametrize("break_it, words", [
    (lambda r: (r / "refs(unc).p").write_text("not a pickle"), ["refs(unc).p"]),
    (lambda r: (r / "vocabulary.txt").unlink(), ["vocabulary.txt"]),
    (lambda r: np.save(r / "embed_matrix.npy", np.zeros((3, 8))), ["embed_matrix.npy", "shape"]),
    (lambda r: np.savez(r / "feats" / "1.npz", vis=np.zeros((3, 6))), ["1.npz", "spatial"]),
])
def test_malformed_refer_files_name_the_problem(tmp_path, break_it, words):
    write_refer(tmp_path)
    break_it(tmp_path)
    with pytest.raises(shared.UsageError) as err:
        m.load_refer_dir(str(tmp_path))
    assert all(w.lower() in str(err.value).lower() for w in words), str(err.value)


def test_malformed_refer_file_from_the_command_line(tmp_path):
    write_refer(tmp_path)
    (tmp_path / "refs(unc).p").write_text("garbage")
    assert_usage_error(run_script(SLUG, "--preset", "smoke", "--data-dir", tmp_path), "refs(unc).p")


@pytest.mark.parametrize("flags, words", [
    (["--batch", "100", "--n-train", "50"], ["batch", "n-train"]),
    (["--min-objects", "3"], ["min-objects"]),
    (["--mix", "0", "0", "0"], ["mix"]),
    (["--data-dir", "/nonexistent/x"], ["data-dir"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script(SLUG, *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
