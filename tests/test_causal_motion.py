"""causal_motion: determinism, fused == reference neighbour attention, the losses (SupCon, IRMv1, risk) against
independent computations, the simulator's collision avoidance and time-to-collision, the ORCA loader, bad args."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import shared
from conftest import assert_usage_error, load, run_script

SLUG = "causal_motion"
m = load(SLUG)


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert first["results"] == second["results"]
    assert first["history"] == second["history"]
    other = m.main(replace(args, seed=1))
    assert other["results"]["Inv+Mod"]["ADE IID"] != first["results"]["Inv+Mod"]["ADE IID"]


def random_mask(n, a, gen):
    present = torch.rand(n, a, generator=gen) < 0.5
    return (present[:, None, :] | torch.eye(a, dtype=torch.bool))[:, None]  # self always kept: no empty row


def test_fused_equals_reference_outputs_and_gradients():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(13, 3, 5, 7, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    mask = random_mask(13, 5, gen)
    assert not mask.all()  # some neighbours really are masked
    out_ref, out_fused = m.attention_reference(q, k, v, mask), m.attention_fused(q, k, v, mask)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, (q, k, v), g), torch.autograd.grad(out_ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_masked_neighbours_do_not_matter():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 2, 3, 5, generator=gen) for _ in range(3))
    mask = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    mask[..., 2] = False  # nobody attends to agent 2 ...
    mask[:, :, 2, 2] = True  # ... except itself
    v2 = v.clone()
    v2[:, :, 2] += 100.0
    torch.testing.assert_close(m.attention_reference(q, k, v, mask)[:, :, :2],
                               m.attention_reference(q, k, v2, mask)[:, :, :2])


def test_whole_model_same_output_on_both_paths():
    a = replace(m.PRESETS["smoke"], backbone="attn")
    torch.manual_seed(0)
    ref = m.CausalMotion(a, m.attention_reference).double()
    fused = m.CausalMotion(a, m.attention_fused).double()
    fused.load_state_dict(ref.state_dict())
    traj = torch.from_numpy(m.simulate(0.3, 9, np.random.default_rng(0))).double()
    obs, _ = m.split(traj)
    s = ref.env_style(traj)
    torch.testing.assert_close(fused(obs, s), ref(obs, s), atol=1e-10, rtol=1e-8)


def supcon_loop(z, labels, tau):
    """SupCon written as the sum in Khosla et al. (2020), Eq. (2), one anchor and one positive at a time."""
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(np.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
        total += -np.mean([np.log(np.exp(z[i] @ z[p] / tau) / denom) for p in positives])
        anchors += 1
    return total / anchors


def test_supcon_matches_the_literal_sum():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(11, 4))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 2, 1, 0, 2, 2, 1, 0, 3])  # label 3 has no positive: not an anchor
    got = m.supcon(torch.from_numpy(z), torch.from_numpy(labels), 0.5).item()
    assert abs(got - supcon_loop(z, labels, 0.5)) < 1e-10


def test_irm_penalty_is_the_product_of_half_batch_gradients():
    """dR/ds at s = 1 for R = mean ||s p - y||^2 is mean 2 p.(p - y): check the estimator against that closed form."""
    gen = torch.Generator().manual_seed(2)
    pred, y = torch.randn(6, 2, 12, 2, generator=gen, dtype=torch.float64), torch.randn(6, 2, 12, 2, generator=gen,
                                                                                     dtype=torch.float64)
    risk, pen = m.risk_and_penalty(pred, y, irm=True)
    grad = lambda p, t: (2 * (p * (p - t)).sum(-1)).mean()  # noqa: E731  (mean over scenes, agents, time)
    torch.testing.assert_close(pen, grad(pred[0::2], y[0::2]) * grad(pred[1::2], y[1::2]))
    torch.testing.assert_close(risk, (pred - y).pow(2).sum(-1).mean())
    torch.testing.assert_close(m.risk_and_penalty(pred, y, irm=False)[0], risk)


def test_time_to_collision_hand_worked():
    # head-on: 10 m apart, closing speed 2 m/s, radius 0.5 -> contact when the gap is 1 m, at t = 4.5 s
    d, w = np.array([[10.0, 0.0]]), np.array([[2.0, 0.0]])
    assert np.allclose(m.time_to_collision(d, w, 0.5), 4.5)
    assert np.isinf(m.time_to_collision(d, -w, 0.5)).all()  # moving apart
    assert np.isinf(m.time_to_collision(np.array([[10.0, 3.0]]), w, 0.5)).all()  # passes 3 m to the side
    assert m.time_to_collision(np.array([[0.5, 0.0]]), w, 0.5)[0] == 0.0  # overlapping and closing in


def test_simulated_clearance_grows_with_the_radius_and_speed_is_bounded():
    medians = []
    for r in (0.1, 0.3, 0.5):
        traj = m.simulate(r, 200, np.random.default_rng(3), noise=0.0)
        gap = np.linalg.norm(traj[:, 1] - traj[:, 0], axis=-1).min(1)  # (n,) closest approach over the window
        # the soft cost (1.5 / ttc) lets a few scenes cut the corner, but most keep the 2r clearance of the discs
        assert np.percentile(gap, 10) > 2 * r - 0.1 and np.median(gap) < 2 * r + 0.5, (r, np.percentile(gap, 10))
        medians.append(np.median(gap))
        step = np.linalg.norm(np.diff(traj, axis=2), axis=-1)
        assert step.max() < 1.05 * 0.4 + 1e-6  # never faster than the preferred speed (0.4 s per frame)
    assert medians[0] < medians[1] < medians[2]  # the style of an environment is its clearance


def test_predictions_integrate_from_the_last_observed_position():
    traj = torch.from_numpy(m.simulate(0.3, 4, np.random.default_rng(0)))
    _, y = m.split(traj)
    ade, fde = m.ade_fde(y, traj)  # the true displacements give zero error
    assert ade < 1e-5 and fde < 1e-5


def write_npz(folder, name, raw):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, raw=raw)


@pytest.mark.parametrize("name, raw, words", [
    ("orca_3_scenes.npz", np.zeros((5, 2, 20, 2)), ["radius"]),
    ("orca_0.1_radius_.npz", np.zeros((5, 3, 20, 2)), ["shape", "orca_0.1_radius_.npz"]),
    ("orca_0.1_radius_.npz", np.full((5, 2, 20, 2), np.nan), ["nan", "orca_0.1_radius_.npz"]),
])
def test_malformed_orca_files_name_the_problem(tmp_path, name, raw, words):
    write_npz(tmp_path, name, raw)
    with pytest.raises(shared.UsageError) as err:
        m.load_orca_dir(str(tmp_path))
    assert all(w.lower() in str(err.value).lower() for w in words), str(err.value)


def test_not_an_npz_file_is_a_usage_error(tmp_path):
    (tmp_path / "x_0.2_radius_.npz").write_text("not numpy")
    assert_usage_error(run_script(SLUG, "--preset", "smoke", "--data-dir", tmp_path), "x_0.2_radius_.npz")


def test_well_formed_orca_files_load_and_run(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path), data_dir=str(tmp_path / "orca"))
    rng = np.random.default_rng(0)
    radii = sorted(set(args.train_radii) | set(args.inter_radii) | set(args.extra_radii))
    for r in radii:
        write_npz(tmp_path / "orca", f"orca_circle_crossing_{r}_radius_.npz", m.simulate(r, 160, rng))
    loaded = m.load_orca_dir(args.data_dir)
    assert sorted(loaded) == radii and loaded[0.1].shape == (160, 2, 20, 2)
    record = m.main(args)
    assert np.isfinite(record["results"]["Inv+Mod"]["ADE OOD-Extra"])


@pytest.mark.parametrize("flags, words", [
    (["--train-radii", "0.1"], ["train-radii"]),
    (["--n-train", "100", "--batch", "64"], ["n-train", "batch"]),
    (["--lowshot-k", "1"], ["lowshot-k"]),
    (["--backbone", "attn", "--heads", "5"], ["heads", "divide"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script(SLUG, *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
