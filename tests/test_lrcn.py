"""lrcn: the two LSTM paths (and nn.LSTM) agree on outputs and gradients, a hand-worked LSTM step, order-blindness of
the single-frame score, the generated data, determinism, bad arguments, the UCF101 --data-dir layout, and (opt-in)
the claim at the default preset."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script

SLUG = "lrcn"
m = load(SLUG)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    smoke = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, again = m.main(smoke), m.main(smoke)
    assert first["results"] == again["results"]
    assert [h["train/loss"] for h in first["history"]] == [h["train/loss"] for h in again["history"]]
    other = m.main(replace(smoke, seed=1))
    assert [h["train/loss"] for h in other["history"]] != [h["train/loss"] for h in first["history"]]
    key = first["key"]
    assert math.isfinite(first["results"][key["method"]][key["metric"]])


# ---- fused (torch.lstm) == reference (the cell equations in a loop) ------------------------------------------------
def random_lstm(T=7, B=3, D=5, H=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, dtype=dtype, generator=g, requires_grad=True)
    w = [(torch.randn(4 * H, D, dtype=dtype, generator=g) * 0.5).requires_grad_(),
         (torch.randn(4 * H, H, dtype=dtype, generator=g) * 0.5).requires_grad_(),
         (torch.randn(4 * H, dtype=dtype, generator=g) * 0.5).requires_grad_()]
    return x, w


def test_lstm_paths_agree_on_outputs_and_gradients():
    x, w = random_lstm()
    out_ref, out_fused = m.lstm_reference(x, *w), m.lstm_fused(x, *w)
    assert out_ref.shape == (7, 3, 11)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, [x, *w], g), torch.autograd.grad(out_ref, [x, *w], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_lstm_runs_in_training_mode_whenever_a_backward_can_follow(monkeypatch):
    """cuDNN refuses the backward of an RNN called with train=False (a CUDA run failed so); CPU does not care."""
    seen, real = [], torch.lstm

    def spy(*a):
        seen.append(a[6])  # torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, ...)
        return real(*a)

    monkeypatch.setattr(torch, "lstm", spy)
    x, w = torch.randn(3, 2, 4), [torch.randn(8, 4), torch.randn(8, 2), torch.randn(8)]
    m.lstm_fused(x, *w)
    with torch.no_grad():
        m.lstm_fused(x, *w)
    assert seen == [True, False]


def test_reference_equals_nn_lstm_after_copying_weights():
    """An independent implementation: torch.nn.LSTM with our weights copied in (gates i, f, g, o; b_hh = 0)."""
    x, w = random_lstm(T=9, B=2, D=4, H=6, seed=1)
    net = torch.nn.LSTM(4, 6).double()
    with torch.no_grad():
        net.weight_ih_l0.copy_(w[0]), net.weight_hh_l0.copy_(w[1]), net.bias_ih_l0.copy_(w[2])
        net.bias_hh_l0.zero_()
    out_ref = m.lstm_reference(x, *w)
    out_nn = net(x)[0]
    torch.testing.assert_close(out_ref, out_nn, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out_ref)
    gx_ref, gw_ref = torch.autograd.grad(out_ref, [x, w[0]], g)
    gx_nn, gw_nn = torch.autograd.grad(out_nn, [x, net.weight_ih_l0], g)
    torch.testing.assert_close(gx_ref, gx_nn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw_ref, gw_nn, rtol=1e-10, atol=1e-12)


def test_lstm_one_step_by_hand():
    # D = H = 1, one step from h_0 = c_0 = 0: z = w_ih x + b, gates (i, f, g, o) packed in that order.
    x = torch.tensor([[[2.0]]], dtype=torch.float64)  # (T=1,B=1,D=1)
    w_ih = torch.tensor([[0.5], [-1.0], [0.25], [1.0]], dtype=torch.float64)
    w_hh = torch.zeros(4, 1, dtype=torch.float64)
    b = torch.tensor([0.0, 3.0, 0.0, -1.0], dtype=torch.float64)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    i, f, g, o = sig(1.0), sig(1.0), math.tanh(0.5), sig(1.0)
    c = f * 0.0 + i * g
    h = o * math.tanh(c)
    for fn in (m.lstm_reference, m.lstm_fused):
        assert fn(x, w_ih, w_hh, b).item() == pytest.approx(h, rel=1e-12)
    # second step with x = 0: c_2 = f_2 c_1 + i_2 g_2, the recurrent weights now matter
    w_hh2 = torch.tensor([[1.0], [0.0], [-2.0], [0.5]], dtype=torch.float64)
    x2 = torch.tensor([[[2.0]], [[0.0]]], dtype=torch.float64)
    i2, f2, g2, o2 = sig(h), sig(3.0), math.tanh(-2 * h), sig(-1 + 0.5 * h)
    h2 = o2 * math.tanh(f2 * c + i2 * g2)
    for fn in (m.lstm_reference, m.lstm_fused):
        assert fn(x2, w_ih, w_hh2, b)[1].item() == pytest.approx(h2, rel=1e-12)


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_whole_lrcn_same_weights_both_paths(path):
    args = replace(m.Args(), size=16, channels=(3, 4, 5), fc6=7, hidden=9, frames=5)
    torch.manual_seed(0)
    model = m.LRCN(args, 16).double().eval()
    x = torch.randn(2, 5, 3, 16, 16, dtype=torch.float64)
    model.lstm = m.LSTM_PATHS["reference"]
    ref = model(x)
    model.lstm = m.LSTM_PATHS[path]
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-12)
    assert ref.shape == (2, 5, 16)


# ---- the maths and data the method rests on -------------------------------------------------------------------------
def test_single_frame_score_is_order_blind_and_lrcn_is_not():
    args = replace(m.Args(), size=16, channels=(3, 4, 5), fc6=7, hidden=9, frames=6, dropout=0.0)
    torch.manual_seed(1)
    sf, lrcn = m.SingleFrame(args, 16).double(), m.LRCN(args, 16).double()
    with torch.no_grad():  # larger LSTM weights than the official U(-0.01, 0.01), so order visibly matters
        lrcn.w_ih.mul_(100), lrcn.w_hh.mul_(100), lrcn.fc8.weight.mul_(100)
    x = torch.randn(3, 6, 3, 16, 16, dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(m.predict(sf, x[:, perm], "cpu"), m.predict(sf, x, "cpu"))
    assert (m.predict(lrcn, x[:, perm], "cpu") - m.predict(lrcn, x, "cpu")).abs().max() > 1e-3


def test_frame_diff_and_reconstruction():
    x = torch.randn(2, 5, 3, 4, 4)
    d = m.frame_diff(x)
    assert (d[:, 0] == 0).all()
    torch.testing.assert_close(x[:, :1] + d.cumsum(1), x)  # x_t = x_1 + sum_{s<=t} d_s


def test_generated_videos():
    data = m.make_videos(64, 16, 32, np.random.default_rng(0))
    assert data["rgb"].shape == (64, 16, 3, 32, 32) and data["words"].shape == (64, m.MAX_WORDS)
    assert torch.bincount(data["y"], minlength=16).tolist() == [4] * 16  # uniform class prior, exact
    assert data["rgb"].min() >= -0.5 and data["rgb"].max() <= 0.5
    rng = np.random.default_rng(1)
    for cls in range(16):
        video, words = m.render_video(cls, 16, 32, rng, noise=0.0)
        sentence = [m.VOCAB[w] for w in words if m.VOCAB[w] not in ("<pad>", "<eos>")]
        if cls >= 6:  # the sentence names the class's motion
            assert sentence[1:] == m.MOTION_WORDS[cls - 6]
        else:
            assert sentence[0] == m.SHAPES[3 + cls]
        # the actor (pixels off the grey background) never leaves the frame: it is visible in every frame
        background = video[:, :, :1, :1]
        assert ((np.abs(video - background).sum(1) > 0.2).sum((1, 2)) > 0).all(), cls


def test_order_pairs_see_the_same_frames_in_a_different_order():
    # right-then-left and left-then-right share the same multiset of per-frame velocities (for turns tau and
    # T-1-tau): what tells them apart is the ORDER, which frame averages cannot see.
    T = 16
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    x_rl = m.motion_path(6, T, rng1)[0]
    x_lr = m.motion_path(7, T, rng2)[0]
    v_rl, v_lr = np.diff(x_rl), np.diff(x_lr)
    assert (v_rl[:5] > 0).all() and (v_lr[:5] < 0).all()  # opposite first moves
    np.testing.assert_allclose(np.sort(np.abs(v_rl)), np.sort(np.abs(v_lr)))
    # time-reversing right-then-left gives right-then-left again (why the file shuffles, not reverses, frames)
    assert (np.diff(x_rl[::-1])[:3] > 0).all()


def test_sentence_scores():
    W = m.WORD
    ref = torch.tensor([[W["ring"], W["grows"], W["<eos>"], 0, 0, 0], [W["disk"], W["shrinks"], W["<eos>"], 0, 0, 0]])
    pred = torch.tensor([[W["ring"], W["grows"], W["<eos>"], 5, 5, 5], [W["disk"], W["grows"], W["<eos>"], 0, 0, 0]])
    s = m.sentence_scores(pred, ref)
    assert s["word_acc"] == pytest.approx(5 / 6) and s["sentence_acc"] == pytest.approx(0.5)
    assert m.decode(ref[0]) == "ring grows"


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [
    (["--size", "30"], "multiple of 8"),
    (["--frames", "2"], "frames"),
    (["--dropout", "1.5"], "dropout"),
    (["--n-train", "3"], "n-train"),
])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


def write_ucf(root, n_frames=4, bad_class=False, flow=True):
    from PIL import Image

    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 Jump\n2 Swim\n")
    (lists / "trainlist01.txt").write_text("Jump/v_Jump_g01_c01.avi 1\nSwim/v_Swim_g01_c01.avi 2\n")
    test_cls = "Dance" if bad_class else "Swim"
    (lists / "testlist01.txt").write_text(f"Jump/v_Jump_g02_c01.avi\n{test_cls}/v_Swim_g02_c01.avi\n")
    rng = np.random.default_rng(0)
    for vid in ("v_Jump_g01_c01", "v_Swim_g01_c01", "v_Jump_g02_c01", "v_Swim_g02_c01"):
        for kind in ("frames", "flow_images") if flow else ("frames",):
            (root / kind / vid).mkdir(parents=True)
            for t in range(n_frames):
                img = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
                img.save(root / kind / vid / f"{t + 1:04d}.jpg")


def test_well_formed_ucf101_layout_loads(tmp_path):
    write_ucf(tmp_path, n_frames=6)
    args = replace(m.Args(), data_dir=str(tmp_path), frames=4, size=16)
    train, test, n_classes = m.load_ucf101(args)
    assert n_classes == 2 and train["rgb"].shape == (2, 4, 3, 16, 16) and train["diff"].shape == (2, 4, 3, 16, 16)
    assert train["y"].tolist() == [0, 1] and test["y"].tolist() == [0, 1]
    assert train["rgb"].abs().max() <= 0.5 + 1e-6
    record = m.main(replace(m.PRESETS["smoke"], data_dir=str(tmp_path), frames=4, sf_frames=2, size=16,
                            out_dir=str(tmp_path)))  # the whole run on real-layout files
    assert set(record["results"]["lrcn_rgb"]) == {"accuracy"} and "3. order" not in " ".join(record["claim"]["checks"])


@pytest.mark.parametrize("kw, words", [
    ({"bad_class": True}, ["testlist01.txt", "known classes"]),
    ({"n_frames": 2}, ["jpg frames"]),
    ({"flow": False}, ["flow_images"]),
])
def test_malformed_ucf101_layout_is_a_usage_error(tmp_path, kw, words):
    write_ucf(tmp_path, **kw)
    with pytest.raises(shared.UsageError) as err:
        m.load_ucf101(replace(m.Args(), data_dir=str(tmp_path), frames=4, size=16))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_missing_split_file_from_the_command_line(tmp_path):
    proc = run_script(SLUG, "--data-dir", tmp_path, "--frames", "4", "--sf-frames", "2")
    assert_usage_error(proc, "missing file", "classInd.txt")


def test_not_an_image_is_a_usage_error(tmp_path):
    write_ucf(tmp_path)
    (tmp_path / "frames" / "v_Jump_g01_c01" / "0002.jpg").write_text("not a jpeg")
    with pytest.raises(shared.UsageError, match="cannot read"):
        m.load_ucf101(replace(m.Args(), data_dir=str(tmp_path), frames=4, size=16))


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["text"]


def test_end_to_end_finetuning_and_reference_lstm_run(tmp_path):
    """The paper's path (--finetune-convs, whole CNN trained inside LRCN) and --lstm reference run and give numbers."""
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path), finetune_convs=True, lstm="reference", describe=False)
    record = m.main(args)
    assert math.isfinite(record["results"]["lrcn_rgb"]["accuracy"])
