"""icot_multiplication: determinism, fused == reference attention, the arithmetic the method rests on (running sums,
carries and the CoT against Python integers), the token layout and probe alignment, the ICoT schedule, the aux loss,
greedy decoding with an oracle model, the ridge probe against scikit-learn, bad arguments and --data-dir files."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_causal_attention_paths_agree, assert_usage_error, load, run_script

m = load("icot_multiplication")


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert first["results"] == second["results"]
    assert [h["train/loss"] for h in first["history"]] == [h["train/loss"] for h in second["history"]]
    other = m.main(replace(args, seed=1))
    assert [h["train/loss"] for h in other["history"]] != [h["train/loss"] for h in first["history"]]
    assert set(first["results"]) == {"SFT", "SFT + aux", "ICoT"}


def test_fused_equals_reference_outputs_and_gradients():
    assert_causal_attention_paths_agree(m)


def test_reference_attention_is_causal_and_rows_sum_to_one():
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    v2 = v.clone()
    v2[:, :, 5:] += 10.0  # change the future of query 4
    torch.testing.assert_close(m.attention_reference(q, k, v)[:, :, :5], m.attention_reference(q, k, v2)[:, :, :5])
    w = m.causal_weights(q, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 9))
    assert (w.triu(1) == 0).all()


def test_whole_model_same_logits_and_head_outputs_on_both_paths():
    torch.manual_seed(0)
    ref = m.Decoder(40, 32, 2, 4, m.attention_reference, n_aux=4).double().eval()
    fused = m.Decoder(40, 32, 2, 4, m.attention_fused, n_aux=4).double().eval()
    fused.load_state_dict(ref.state_dict())
    a, b = m.sample_pairs(6, 4, np.random.default_rng(0))
    tokens = m.make_sequences(a, b, 4, cot_keep=11)["tokens"]
    keep_r, keep_f = m.new_keep(), m.new_keep()
    torch.testing.assert_close(fused(tokens, keep_f), ref(tokens, keep_r), atol=1e-10, rtol=1e-8)
    for zr, zf in zip(keep_r["z"], keep_f["z"]):
        torch.testing.assert_close(zf, zr, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_running_sums_and_digits_match_python_integers(n):
    rng = np.random.default_rng(n)
    a, b = m.sample_pairs(300, n, rng)
    c_hat, c = m.running_sums(m.to_digits(a, n), m.to_digits(b, n))
    for i in range(len(a)):
        product = int(a[i]) * int(b[i])
        assert sum(int(d) * 10**k for k, d in enumerate(c[i])) == product  # c_k are the digits of a*b, LSB first
        digits_a = [int(a[i]) // 10**t % 10 for t in range(n)]
        digits_b = [int(b[i]) // 10**t % 10 for t in range(n)]
        carry = 0
        for k in range(2 * n):  # the definition, written out independently: s_k, c_hat_k, r_k
            s_k = sum(digits_a[p] * digits_b[k - p] for p in range(n) if 0 <= k - p < n)
            assert c_hat[i, k] == s_k + carry
            carry = (s_k + carry) // 10
        assert carry == 0


def test_hand_worked_running_sum():
    # 99 * 99 = 9801; reversed digits a = b = (9, 9): s = (81, 162, 81, 0)
    # c_hat_0 = 81 -> c_0 = 1, r = 8; c_hat_1 = 162 + 8 = 170 -> 0, r = 17; c_hat_2 = 81 + 17 = 98 -> 8, r = 9;
    # c_hat_3 = 0 + 9 = 9 -> 9
    c_hat, c = m.running_sums(np.array([[9, 9]]), np.array([[9, 9]]))
    assert c_hat.tolist() == [[81, 170, 98, 9]] and c.tolist() == [[1, 0, 8, 9]]


def decode_number(tokens) -> int:
    return sum(int(t) * 10**i for i, t in enumerate(tokens))


@pytest.mark.parametrize("n", [3, 4])
def test_cot_holds_the_shifted_partial_products_and_running_sums(n):
    a, b = m.sample_pairs(50, n, np.random.default_rng(1))
    cot = m.cot_tokens(a, b, n)
    assert cot.shape[1] == m.cot_length(n)
    for i in range(len(a)):
        text = "".join(m.TOKEN_TEXT[t] for t in cot[i])  # e.g. "08601+00720(08421)+..." (reversed numbers)
        parts = text.split("+")
        assert len(parts) == n
        running = 0
        for j, part in enumerate(parts):
            p_j = int(a[i]) * (int(b[i]) // 10**j % 10) * 10**j
            running += p_j
            number, _, rest = part.partition("(")
            assert len(number) == n + 1 + j and decode_number(number) == p_j
            if rest:  # "( S_j )" after every addition but the last
                assert rest.endswith(")") and decode_number(rest[:-1]) == running
        assert running == int(a[i]) * int(b[i])


def test_sequence_layout_mask_and_cot_removal_from_the_left():
    n = 4
    a, b = np.array([1234]), np.array([5678])
    full = m.make_sequences(a, b, n, m.cot_length(n))
    plain = m.make_sequences(a, b, n)
    text = "".join(m.TOKEN_TEXT[t] for t in plain["tokens"][0])
    assert text == "4321*8765$$#" + str(1234 * 5678).zfill(8)[::-1] + "$"
    assert plain["ans"] == 2 * n + 4 and plain["tokens"].shape[1] == 4 * n + 5
    assert plain["mask"].tolist() == [False] * (2 * n + 1) + [True] * (2 * n + 3)  # targets after the first <eos>
    cot = m.cot_tokens(a, b, n)[0]
    kept = m.make_sequences(a, b, n, 7)
    assert kept["tokens"][0, 2 * n + 2: 2 * n + 9].tolist() == cot[-7:].tolist()  # the RIGHT end survives
    assert full["tokens"][0, 2 * n + 2: 2 * n + 2 + len(cot)].tolist() == cot.tolist()
    for s in (full, kept, plain):  # the answer always follows "<eos> ####"
        assert s["tokens"][0, s["ans"] - 2: s["ans"]].tolist() == [m.EOS, m.ANS]
        assert s["tokens"][0, s["ans"]: s["ans"] + 2 * n].tolist() == s["c"][0].tolist()


def test_probe_alignment_index_arithmetic():
    n = 4
    s = m.make_sequences(np.array([4321]), np.array([8765]), n)
    tok = m.answer_positions(s["ans"], n, "token")
    pred = m.answer_positions(s["ans"], n, "pred")
    assert s["tokens"][0, tok].tolist() == s["c"][0].tolist()  # "token": the position holding c_k
    assert s["tokens"][0, pred + 1].tolist() == s["c"][0].tolist()  # "pred": the position whose output is c_k


def test_icot_schedule_removes_delta_per_stage_and_smoothing_is_geometric():
    args = replace(m.Args(), icot_full_steps=100, icot_stage_steps=10, icot_delta=8, icot_smoothing=0.0)
    L = m.cot_length(args.n_digits)
    rng = np.random.default_rng(0)
    assert m.cot_keep_at(0, args, rng) == (0, L) and m.cot_keep_at(99, args, rng) == (0, L)
    assert m.cot_keep_at(100, args, rng) == (8, L - 8) and m.cot_keep_at(119, args, rng) == (16, L - 16)
    assert m.cot_keep_at(10_000, args, rng) == (L, 0)
    smooth = replace(args, icot_smoothing=1.0)
    extra = np.array([L - 8 - m.cot_keep_at(100, smooth, rng)[1] for _ in range(4000)])
    freq = np.bincount(extra, minlength=3)[:3] / len(extra)  # P(o) ~ exp(-o): 0.632, 0.233, 0.086
    np.testing.assert_allclose(freq, np.exp(-np.arange(3)) * (1 - np.exp(-1)), atol=0.03)


def test_aux_loss_is_the_per_head_regression_of_c_hat():
    args = replace(m.Args(), width=32, aux_scale=50.0, aux_lambda=0.7)
    torch.manual_seed(0)
    model = m.Decoder(40, 32, 2, 4, m.attention_fused, n_aux=4)
    a, b = m.sample_pairs(5, 4, np.random.default_rng(0))
    batch, keep = m.make_sequences(a, b, 4), m.new_keep()
    model(batch["tokens"], keep)
    z = keep["z"][-1]  # (B, H, T, d_h)
    expected = 0.0
    for h in range(4):
        for k in range(8):
            pred = z[:, h, batch["ans"] + k] @ model.aux_probes[h]  # (B,)
            expected = expected + ((pred - batch["c_hat"][:, k] / 50.0) ** 2).mean() / 8
    torch.testing.assert_close(m.aux_loss(model, keep, batch, args), 0.7 * expected)


class Oracle(torch.nn.Module):
    """A 'model' that multiplies: reads a and b off the prompt and puts all its logit mass on the right next digit."""

    def forward(self, tokens, keep=None):
        B, T = tokens.shape
        logits = torch.zeros(B, T, m.VOCAB)
        for i in range(B):
            a = decode_number(tokens[i, :4].tolist())
            b = decode_number(tokens[i, 5:9].tolist())
            c = m.to_digits(np.array([a * b]), 8)[0]
            for t in range(11, min(T, 19)):  # position 11 (####) predicts c_0, position 12 + k predicts c_{k+1}
                logits[i, t, c[t - 11]] = 10.0
        return logits


def test_greedy_decoding_and_teacher_forcing_score_an_exact_model_perfectly():
    a, b = m.sample_pairs(20, 4, np.random.default_rng(3))
    acc, exact = m.greedy_accuracy(Oracle(), a, b, 4, torch.device("cpu"))
    assert exact == 1.0 and acc == [1.0] * 8
    ce, acc_tf = m.teacher_forced(Oracle(), a, b, 4, torch.device("cpu"))
    assert max(ce) < 1e-3 and acc_tf == [1.0] * 8


def test_ridge_probe_matches_scikit_learn():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    X, Xt = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 3, rng.normal(size=(100, 6)) * [1, 2, 3, 4, 5, 6] + 3
    w = rng.normal(size=6)
    y, yt = X @ w + rng.normal(size=300), Xt @ w + rng.normal(size=100)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    sk = Ridge(alpha=1.0).fit((X - mu) / sd, y)
    assert abs(m.ridge_r2(X, y, Xt, yt) - r2_score(yt, sk.predict((Xt - mu) / sd))) < 1e-9


def test_test_pairs_are_distinct_and_never_trained_on():
    args = replace(m.Args(), n_digits=2, n_test=500)
    a, b = m.test_pairs(args)
    codes = a * 100 + b
    assert len(set(codes.tolist())) == 500
    ta, tb = m.sample_pairs(20_000, 2, np.random.default_rng(0), codes)
    assert not np.isin(ta * 100 + tb, codes).any()


def test_data_dir_reads_deng_format(tmp_path):
    (tmp_path / "test.txt").write_text("4 3 2 1 * 8 7 6 5||4 0 ... #### 2 5 6 6 0 0 7 0\n\n0 0 0 9 * 1 0 0 0\n")
    a, b = m.load_operands(tmp_path / "test.txt", 4, 10)
    assert a.tolist() == [1234, 9000] and b.tolist() == [5678, 1]
    got = m.test_pairs(replace(m.Args(), data_dir=str(tmp_path)))
    assert got[0].tolist() == [1234, 9000]


@pytest.mark.parametrize("content, words", [
    ("4 3 2 * 8 7 6 5||x\n", ["line 1"]),
    ("4 3 2 1 * 8 7 x 5\n", ["line 1"]),
    ("\n\n", ["no operand pairs"]),
])
def test_malformed_data_files_are_one_clear_sentence(tmp_path, content, words):
    (tmp_path / "test.txt").write_text(content)
    assert_usage_error(run_script("icot_multiplication", "--data-dir", tmp_path, "--preset", "smoke",
                                  "--out-dir", tmp_path), "test.txt", *words)


@pytest.mark.parametrize("flags, words", [
    (["--n-digits", "7"], ["n-digits"]),
    (["--width", "30", "--n-heads", "4"], ["divide"]),
    (["--aux-layer", "2"], ["aux-layer"]),
    (["--data-dir", "/nonexistent/dir"], ["no file"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("icot_multiplication", *flags), *words)


def test_check_2_asks_for_the_aux_gain_on_c2_not_on_c1():
    """The paper's per-digit logs: early on the aux model is BEHIND SFT on c1 and ahead on c2; check 2 follows them."""
    base = {"exact_match": 0.0, **{f"acc_c{k}": 0.1 for k in range(8)}, **{f"ce_c{k}": 2.3 for k in range(8)},
            **{f"probe_r2_c_hat{k}": 0.5 for k in range(8)}}
    sft = dict(base, acc_c0=1.0, acc_c7=0.97, acc_c1=0.6, ce_c1=0.8, ce_c2=2.30)
    aux = dict(base, acc_c0=1.0, acc_c1=0.3, ce_c1=1.7, ce_c2=2.20)  # the paper's early picture
    claim = m.judge({"SFT": sft, "SFT + aux": aux, "ICoT": base}, n=4)
    assert claim["passed"], claim["checks"]
    claim = m.judge({"SFT": sft, "SFT + aux": dict(aux, ce_c2=2.31, acc_c1=0.9), "ICoT": base}, n=4)
    assert [k for k, ok in claim["checks"].items() if not ok] == [
        "2. the aux loss helps where short training can see it: aux CE c2 2.310 < SFT's 2.300 nats"]


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
