"""sgfd: determinism, batched L_B == per-slice L_B (outputs and gradients), RFF and cross-covariance by brute force,
reweighting lowers L_B on a planted correlated batch, guided backprop by hand, the environment's API, determinism
and inverse kinematics, DrQ shift, bad arguments, and (opt-in) the claim at the default preset."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

SLUG = "sgfd"
m = load(SLUG)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert without_timing(other["results"]) != without_timing(first["results"])
    assert (tmp_path / "sgfd__smoke__s0.png").exists()


# ---- fused (batched) == reference (per-slice loop, the official code's form) ----------------------------------------
def random_case(N=37, d=11, Q=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, d, dtype=torch.float64, generator=g).tanh()
    omega = torch.randn(Q, dtype=torch.float64, generator=g)
    phase = 2 * math.pi * torch.rand(d, Q, dtype=torch.float64, generator=g)
    logits = torch.randn(N, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.softmax(torch.randn(1, d, dtype=torch.float64, generator=g), -1) * 7
    return z, omega, phase, logits, s.T @ s


def test_batched_lossb_equals_the_per_slice_loop_outputs_and_gradients():
    z, omega, phase, logits, M = random_case()
    phi = m.rff_features(z, omega, phase).requires_grad_(True)  # (37, 11, 6)
    outs = {}
    for name, fn in (("fused", m.lossb_fused), ("reference", m.lossb_reference)):
        loss = fn(phi, torch.softmax(logits, 0), M)
        outs[name] = (loss, *torch.autograd.grad(loss, (logits, phi)))
    for a, b in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_weight_objective_gradient_matches_the_literal_loss():
    """The whole inner-loop objective (memory rows, RFF, L_B, L_P) with the fused L_B vs the literal one."""
    z, omega, phase, _, M = random_case(N=26, d=9)
    w = torch.randn(13, 1, dtype=torch.float64, requires_grad=True)
    w_pre = torch.randn(13, 1, dtype=torch.float64)
    (g_fused,) = torch.autograd.grad(m.weight_objective(w, w_pre, z, omega, phase, M, 5.0), w)
    p = torch.softmax(torch.cat([w, w_pre]).squeeze(1), 0)
    lb = m.lossb_reference(m.rff_features(z, omega, phase), p, M)
    lp = torch.softmax(w.squeeze(1), 0).pow(2).sum()
    (g_ref,) = torch.autograd.grad(lb / lb.detach() + 5.0 * lp / lp.detach(), w)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-10, atol=1e-14)


# ---- the maths the method rests on, by brute force -----------------------------------------------------------------
def test_rff_features_and_cross_covariance_by_brute_force():
    z, omega, phase, logits, M = random_case(N=7, d=4, Q=2, seed=1)
    phi = m.rff_features(z, omega, phase)  # (7, 4, 4)
    p = torch.softmax(logits, 0).detach()
    N, d, Q = 7, 4, 2
    total = 0.0
    for f in range(Q):
        # u_{n,j} = omega_f z_nj + b_jf, then min-max normalised over j for each n into [0, pi/2]
        feats = np.zeros((N, d, 2))
        for n in range(N):
            u = [omega[f].item() * z[n, j].item() + phase[j, f].item() for j in range(d)]
            lo, hi = min(u), max(u)
            for j in range(d):
                v = (u[j] - lo) / (hi - lo) * math.pi / 2
                feats[n, j] = math.sqrt(2 / Q) * math.cos(v), math.sqrt(2 / Q) * math.sin(v)
        for c, k in ((0, f), (1, Q + f)):  # slice order: all cos, then all sin
            np.testing.assert_allclose(phi[:, :, k].numpy(), feats[:, :, c], rtol=1e-12, atol=1e-12)
            x = feats[:, :, c]
            mu = [sum(p[n].item() * x[n, i] for n in range(N)) for i in range(d)]
            for i in range(d):
                for j in range(d):
                    if i != j:  # weighted covariance sum_n p_n (x_ni - mu_i)(x_nj - mu_j)
                        cov = sum(p[n].item() * (x[n, i] - mu[i]) * (x[n, j] - mu[j]) for n in range(N))
                        total += M[i, j].item() * cov**2
    assert m.lossb_fused(phi, p, M).item() == pytest.approx(total, rel=1e-10)


def test_reweighting_lowers_lossb_on_a_planted_correlated_batch():
    """Dims 0 and 1 both carry a binary 'environment' bit for 90% of the samples and disagree on 10%: upweighting
    the disagreeing samples decorrelates them, so the learned weights must cut L_B, most on the planted pair."""
    g = torch.Generator().manual_seed(3)
    B, d = 128, 6
    bit = (torch.rand(B, generator=g) < 0.5).double()
    other = torch.where(torch.rand(B, generator=g) < 0.1, 1 - bit, bit)
    z = 0.3 * torch.randn(B, d, dtype=torch.float64, generator=g)
    z[:, 0] += 2 * bit - 1
    z[:, 1] += 2 * other - 1
    z = z.tanh().float()
    M = torch.ones(d, d)
    M[:2, :2] = 20.0  # the saliency names the two changed dims
    args = replace(m.Args(), epochb=20, seed_steps=0)
    learner = m.WeightLearner(args)
    learner.z_pre, learner.w_pre = z.clone(), torch.ones(B, 1)  # memory = the same batch, uniform
    torch.manual_seed(0)
    w = learner.learn(z, M, step=100, update_memory=False)
    draws = [m.draw_rff(d, 5, "cpu", torch.Generator().manual_seed(10 + i)) for i in range(16)]

    def lb(weights):
        return np.mean([m.lossb_fused(m.rff_features(z, *dr), torch.softmax(weights.squeeze(1), 0), M).item()
                        for dr in draws])

    before, after = lb(torch.ones(B, 1)), lb(w)
    assert after < 0.85 * before, (before, after)  # measured: -25% with the official lambda_p = 5, 20 iterations
    p = torch.softmax(w.squeeze(1), 0)
    disagree = bit != other
    assert p[disagree].mean() > p[~disagree].mean()  # the decorrelating samples gained weight
    assert 1 / p.pow(2).sum().item() > 0.3 * B  # and the weights did not collapse onto a few samples


def test_guided_backprop_saliency_by_hand():
    torch.manual_seed(4)
    clf = m.EnvClassifier(5, 7, 3).double()
    z = torch.randn(4, 5, dtype=torch.float64)
    M, s = m.saliency_matrix(clf, z, 7.0)
    W1, b1, W2 = clf.fc1.weight.detach(), clf.fc1.bias.detach(), clf.fc2.weight.detach()
    att = torch.zeros(4, 5, dtype=torch.float64)
    for t in range(3):  # guided backprop: the hidden gradient W2[t] passes where h > 0 AND W2[t] > 0
        for b in range(4):
            h = W1 @ z[b] + b1
            att[b] += W1.T @ (W2[t] * (h > 0) * (W2[t] > 0)) / 3
    s_hand = 7 * torch.softmax(att.abs().mean(0), 0)
    torch.testing.assert_close(s, s_hand)
    torch.testing.assert_close(M, torch.outer(s_hand, s_hand))
    assert s.sum().item() == pytest.approx(7.0)


# ---- the environment -----------------------------------------------------------------------------------------------
def test_environment_api_determinism_and_inverse_kinematics():
    args = m.Args()
    env = m.make_env("E2", args)
    obs, info = env.reset(seed=5)
    assert obs.shape == env.observation_space.shape == (3, 32, 32) and obs.dtype == np.uint8
    assert env.action_space.shape == (2,) and "distance" in info
    again, _ = m.make_env("E2", args).reset(seed=5)
    assert (obs == again).all()
    assert not (obs == m.make_env("E2", args).reset(seed=6)[0]).all()
    # analytic inverse kinematics of the arm -> the action that reaches the target exactly
    l1, l2, (x, y) = env.l1, env.l2, env.target
    c2 = (x * x + y * y - l1 * l1 - l2 * l2) / (2 * l1 * l2)
    t2 = math.acos(max(-1.0, min(1.0, c2)))
    t1 = math.atan2(y, x) - math.atan2(l2 * math.sin(t2), l1 + l2 * math.cos(t2))
    t1 = (t1 + math.pi) % (2 * math.pi) - math.pi
    nxt, reward, terminated, truncated, info = env.step([t1 / math.pi, t2 / math.pi])
    assert terminated and truncated and nxt.shape == obs.shape
    assert reward == pytest.approx(0.0, abs=1e-9) and info["distance"] == pytest.approx(0.0, abs=1e-9)
    env.reset(seed=5)
    _, reward, *_ = env.step([0.3, -0.2])
    assert -2.0 <= reward < -1e-3  # distance <= (|ee| + |target|) / (l1 + l2) <= 2


def test_environments_break_the_training_correlation():
    args = m.Args()
    bg = {n: m.make_env(n, args).bg for n in [*m.TRAIN_ENVS, *m.TEST_ENVS]}
    assert np.allclose(bg["T_swap"], bg["E3"])  # the swap test pairs E3's background ...
    assert m.make_env("T_swap", args).l1 == m.make_env("E0", args).l1  # ... with E0's arm
    train = list(m.TRAIN_ENVS)
    assert all(not np.allclose(bg[a], bg[b]) for a in train for b in train if a != b)
    # multi-step mode: increments of 0.3 a, truncation at the horizon
    env = m.make_env("E0", replace(args, horizon=3))
    env.reset(seed=0)
    theta0 = env.theta.copy()
    flags = [env.step([1.0, -1.0])[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    np.testing.assert_allclose(env.theta, theta0 + 3 * 0.3 * np.array([1.0, -1.0]))


def test_random_shift_is_a_crop_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    assert torch.equal(m.random_shift(x, 0), x)
    torch.manual_seed(0)
    y = m.random_shift(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for n in range(2):
        assert any(torch.equal(y[n], padded[n, :, i:i + 6, j:j + 6]) for i in range(5) for j in range(5))


# ---- bad arguments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [(["--horizon", "0"], "horizon"), (["--seed-steps", "10"], "seed-steps")])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


@pytest.mark.parametrize("change, word", [({"image_size": 20}, "image-size"), ({"presave": 1.0}, "presave"),
                                          ({"num_f": 0}, "num-f"), ({"conv_layers": 6}, "conv-layers")])
def test_bad_arguments_in_process(change, word):
    with pytest.raises(shared.UsageError, match=word):
        m.validate(replace(m.Args(), **change))


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
