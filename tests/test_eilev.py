"""eilev: determinism, fused == reference attention (LM causal + pad mask, Q-Former self and cross), the whole model on
both paths, the splice order, the label layout, the in-context sampler's exclusions, the Zipf split, the metrics
against hand-worked cases, left-padded generation, bad arguments and the --data-dir loader."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, load, run_script, without_timing

m = load("eilev")
SMOKE = m.PRESETS["smoke"]


@pytest.fixture(scope="module")
def data():
    return m.make_data(replace(SMOKE, cnn_steps=0), torch.device("cpu"))


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(SMOKE, out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert without_timing(first["results"]) == without_timing(second["results"])
    assert [h["train/loss"] for h in first["history"]] == [h["train/loss"] for h in second["history"]]
    other = m.main(replace(args, seed=1))
    assert [h["train/loss"] for h in other["history"]] != [h["train/loss"] for h in first["history"]]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sq, sk", [(17, 17), (3, 13)])
def test_fused_equals_reference_outputs_and_gradients(sq, sk, masked):
    torch.manual_seed(0)
    q = torch.randn(3, 2, sq, 5, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, sk, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if masked:  # the LM's mask: causal, left pads of different lengths per row, diagonal always allowed
        keep = torch.ones(3, sk, dtype=torch.bool)
        keep[0, :4], keep[1, :1] = False, False
        mask = m.lm_mask(keep)[..., -sq:, :]
    out_ref, out_fused = m.attention_reference(q, k, v, mask), m.attention_fused(q, k, v, mask)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, (q, k, v), g), torch.autograd.grad(out_ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_lm_mask_is_causal_and_hides_pads():
    keep = torch.tensor([[False, False, True, True, True]])
    mask = m.lm_mask(keep)[0, 0]
    assert not mask.triu(1).any()  # nothing after the query
    assert not mask[3:, :2].any()  # real tokens never see the pads
    assert mask.diagonal().all()  # no empty row


def tiny_batch(data, k=3, n=4, seed=0):
    rng = np.random.default_rng(seed)
    sampler = m.ContextSampler(data)
    seqs = []
    for q in data["train_idx"][:n]:
        vs, ns = sampler.bursty(q, k, 0.5, rng)
        seqs.append(m.build_sequence(data, vs + ns, q, m.choose_words(data, rng), rng, SMOKE.n_queries, True))
    return seqs


def test_whole_model_same_logits_on_both_paths(data):
    torch.manual_seed(0)
    a = SMOKE
    ref = m.VideoLM(len(data["words"]), 64, 32, a, m.attention_reference).eval()
    fused = m.VideoLM(len(data["words"]), 64, 32, a, m.attention_fused).eval()
    fused.load_state_dict(ref.state_dict())
    for left in (False, True):
        ids, _, keep, clips = m.collate(tiny_batch(data), torch.device("cpu"), left=left)
        torch.testing.assert_close(fused(ids, data["feats"][clips], keep), ref(ids, data["feats"][clips], keep),
                                   atol=1e-5, rtol=1e-4)


def test_left_padding_does_not_change_the_logits(data):
    torch.manual_seed(0)
    model = m.VideoLM(len(data["words"]), 64, 32, SMOKE, m.attention_fused).eval()
    seqs = tiny_batch(data)
    ids, _, keep, clips = m.collate(seqs, torch.device("cpu"), left=True)
    batched = model(ids, data["feats"][clips], keep)
    for b, s in enumerate(seqs):  # each sequence alone, no padding at all
        i1, _, k1, c1 = m.collate([s], torch.device("cpu"))
        torch.testing.assert_close(batched[b, -len(s[0]):], model(i1, data["feats"][c1], k1)[0], atol=1e-5, rtol=1e-4)


def test_visual_features_are_spliced_clip_by_clip_in_sequence_order(data):
    model = m.VideoLM(len(data["words"]), 64, 32, SMOKE, m.attention_fused)
    seqs = tiny_batch(data)
    ids, _, keep, clips = m.collate(seqs, torch.device("cpu"))
    seen = {}
    model.encode_clips = lambda frames: torch.arange(len(frames), dtype=torch.float)[:, None, None].expand(
        -1, SMOKE.n_queries, SMOKE.width)  # clip number j -> value j
    model.pos.data.zero_()
    model.layers = torch.nn.ModuleList()
    model.ln_f = torch.nn.Identity()
    model.tok.weight.data.zero_()
    model.tok.weight.data[:, 0] = 1.0  # logits = hidden @ E^T: its first unit reads the hidden state back
    h = model(ids, data["feats"][clips], keep)[..., 0]  # (B, S)
    j = 0
    for b, (sid, sclips, _) in enumerate(seqs):
        vis = [p for p, t in enumerate(sid) if t == m.VIS]
        for c in range(len(sclips)):  # the K placeholders of the c-th example of row b hold clip number j
            seen[(b, c)] = h[b, vis[c * SMOKE.n_queries : (c + 1) * SMOKE.n_queries]].tolist()
            assert seen[(b, c)] == [float(j)] * SMOKE.n_queries
            j += 1
    assert clips.tolist() == [c for s in seqs for c in s[1]]


def test_only_the_query_narration_newline_and_eos_are_labelled(data):
    rng = np.random.default_rng(0)
    words = m.choose_words(data, rng)
    ids, clips, target = m.build_sequence(data, [0, 1], 2, words, rng, 2, True)
    labelled = [t for t, f in zip(ids, target) if f]
    assert labelled == m.narration(data, 2, words) + [m.NL, m.EOS]
    assert ids[-len(labelled):] == labelled and sum(target) == len(labelled)  # at the very end, nothing else
    assert ids.count(m.VIS) == 2 * 3 and clips == [0, 1, 2]
    for c in (0, 1):  # context narrations use the same per-sequence words, and are inputs only
        nar = m.narration(data, c, words)
        pos = next(i for i in range(len(ids)) if ids[i : i + len(nar)] == nar)
        assert not any(target[pos : pos + len(nar)])


def test_sampler_never_uses_the_same_pair_and_follows_the_buckets(data):
    sampler, rng = m.ContextSampler(data), np.random.default_rng(0)
    pool = set(data["train_idx"].tolist())
    for q in list(data["train_idx"][:30]) + list(data["test_idx"][:30]):
        v, n = data["verb"][q], data["noun"][q]
        vs, ns = sampler.bursty(q, 8, 0.5, rng)
        ctx = vs + ns
        assert len(ctx) == 8 and len(set(ctx)) == 8 and q not in ctx and set(ctx) <= pool
        assert not any(data["verb"][c] == v and data["noun"][c] == n for c in ctx)
        assert all(data["verb"][c] == v for c in vs)
        n_verb_bucket = len(sampler.buckets[int(v), int(n)][0])
        assert len(vs) == min(4, n_verb_bucket) or len(ns) < 4  # floor(k r) from the verb bucket unless re-balanced


def test_zipf_split_brute_force():
    rng = np.random.default_rng(3)
    order, p, n_common = m.zipf_split(rng, 1.0, 0.8)
    ranks = np.arange(1, 433)
    brute = next(i for i in range(1, 433) if (1 / ranks[:i]).sum() / (1 / ranks).sum() >= 0.8)
    assert n_common == brute and 100 <= n_common <= 130  # ~115 pairs, as the card computes
    common = order[:n_common]
    assert set(common // 36) == set(range(12)) and set(common % 36) == set(range(36))
    assert sorted(order.tolist()) == list(range(432))


def test_eval_contexts_are_nested_and_from_the_training_pool(data):
    plan = m.presample_eval(data, SMOKE)
    pool = set(data["train_idx"].tolist())
    for e in plan[:20]:
        prev = set()
        for k in (0, 1, 2, 4, 8):
            ctx = m.context_for(e, k, 0.5, np.random.default_rng(e["seed"]))
            assert len(ctx) == k and set(ctx) <= pool and prev <= set(ctx)
            prev = set(ctx)


def test_metrics_on_hand_worked_cases():
    assert m.rouge_l([1, 2, 3, 4], [1, 3, 4]) == pytest.approx(2 * 3 / 7)  # LCS = 3
    assert m.rouge_l([1, 2], [3, 4]) == 0.0
    assert m.token_f1([1, 2, 2, 5], [2, 2, 3]) == pytest.approx(2 * 2 / 7)


def test_clips_show_their_motion(data):
    clips, targets = m.render_clips(np.arange(12).repeat(4), np.zeros(48, int), np.random.default_rng(0))
    x, y, r, a = (targets[..., i] for i in range(4))
    assert (np.diff(x[0:4], axis=1) < 0).all() and (np.diff(x[4:8], axis=1) > 0).all()  # slide left / right
    assert (np.diff(y[8:12], axis=1) < 0).all() and (np.diff(r[16:20], axis=1) > 0).all()  # slide up / grow
    assert (np.diff(a[40:44], axis=1) > 0).all() and (np.diff(a[44:48], axis=1) < 0).all()  # fade in / out
    assert clips.shape == (48, 8, 3, 16, 16)


@pytest.mark.parametrize("flags, words", [
    (["--width", "64", "--n-heads", "5"], ["divide"]),
    (["--verb-noun-ratio", "1.5"], ["verb-noun-ratio"]),
    (["--max-len", "40"], ["max-len"]),
    (["--common-mass", "1.0"], ["common-mass"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("eilev", *flags), *words)


HEADER = "frame_path,video_uid,clip_index,narration_timestamp_sec,narration_text,structured_verb,structured_noun\n"


def write_ego4d(root, n_train=12, n_test=4, shape=(8, 3, 16)):
    rng = np.random.default_rng(0)
    verbs, nouns = ["take", "put", "cut"], ["knife", "cup"]
    for split, n in (("train", n_train), ("test", n_test)):
        lines = [HEADER]
        for i in range(n):
            v, o = verbs[i % 3], nouns[(i // 3) % 2]
            np.save(root / f"{split}{i}.npy", rng.normal(size=shape).astype(np.float32))
            lines.append(f"{split}{i},vid,{i},1.0,#C C {v}s a {o}.,{v},{o}\n")
        (root / f"{split}.csv").write_text("".join(lines))


def test_ego4d_loader_reads_a_tiny_well_formed_folder(tmp_path):
    write_ego4d(tmp_path)
    data = m.load_ego4d(replace(SMOKE, data_dir=str(tmp_path)), torch.device("cpu"))
    assert data["feats"].shape == (16, 24, 16) and len(data["train_idx"]) == 12
    assert " ".join(data["words"][t] for t in data["narr"][0]) == "the camera wearer takes a knife ."
    record = m.main(replace(SMOKE, data_dir=str(tmp_path), n_eval=4, out_dir=str(tmp_path), shots=(0, 2)))
    assert np.isfinite(record["results"]["EILEV"]["rougeL_k2"])


def test_ego4d_loader_names_the_broken_file(tmp_path):
    write_ego4d(tmp_path)
    (tmp_path / "test.csv").write_text("frame_path,narration_text\ntest0,hello\n")
    assert_usage_error(run_script("eilev", "--data-dir", tmp_path, "--n-eval", "2", "--n-test", "2"), "test.csv",
                       "columns")
    write_ego4d(tmp_path)
    (tmp_path / "train3.npy").write_text("not numpy")
    with pytest.raises(m.shared.UsageError, match="train3.npy"):
        m.load_ego4d(replace(SMOKE, data_dir=str(tmp_path)), torch.device("cpu"))
    (tmp_path / "train.csv").unlink()
    with pytest.raises(m.shared.UsageError, match="train.csv"):
        m.load_ego4d(replace(SMOKE, data_dir=str(tmp_path)), torch.device("cpu"))


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
