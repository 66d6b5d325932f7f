"""contrastive_temperature: literal == fused losses (outputs and gradients), the hardness-aware gradient and the
entropy of the relative penalty (card criterion 6), the tau limits, uniformity and tolerance against independent
computations, determinism, bad arguments, CIFAR-10 --data-dir files, and (opt-in) the claim at the default preset."""

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism

SLUG = "contrastive_temperature"
m = load(SLUG)


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path, baselines=False)
    assert other["results"]["infonce_tau0.2"] != first["results"]["infonce_tau0.2"]


# ---- literal (reference) == batched (fused) losses ----------------------------------------------------------------
@pytest.mark.parametrize("kind, k", [("contrastive", None), ("contrastive", 4), ("simple", None), ("simple", 4)])
@pytest.mark.parametrize("inbatch", [False, True])
def test_fused_loss_matches_the_literal_formula(kind, k, inbatch):
    B, N, d, tau = 7, 13, 5, 0.3
    z = unit(B, d, seed=1).requires_grad_(True)
    if inbatch:  # SimCLR: the bank is the batch's second views, the positive of row i is column i
        bank, idx = unit(B, d, seed=2).requires_grad_(True), torch.arange(B)
    else:  # memory bank: odd N, positives at arbitrary rows
        bank, idx = unit(N, d, seed=2).requires_grad_(True), torch.tensor([12, 0, 5, 3, 7, 1, 9])
    outs = {}
    for name, fn in m.LOSS.items():
        loss = fn(z, bank, idx, tau, kind, k)
        outs[name] = (loss, *torch.autograd.grad(loss, (z, bank)))
    for a, r in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_whole_train_step_same_gradients_with_both_loss_paths():
    """Same weights, same batch: the encoder's parameter gradients agree between the two paths."""
    torch.manual_seed(0)
    model = m.Encoder((1, 8, 8), "mlp", 16, 6).double()
    x = torch.rand(9, 1, 8, 8, dtype=torch.float64)
    bank, idx = unit(21, 6, seed=3), torch.arange(2, 11)
    grads = {}
    for name, fn in m.LOSS.items():
        grads[name] = torch.autograd.grad(fn(model(x)[1], bank, idx, 0.2, "contrastive", 5), list(model.parameters()))
    for a, r in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_hard_selection_is_the_top_k_negatives_and_never_the_positive():
    s = torch.tensor([[0.9, 0.1, 0.5, 0.7, -0.2], [0.3, 0.8, 0.6, 0.95, 0.0]])
    neg = torch.tensor([[False, True, True, True, True], [True, True, True, False, True]])  # positives: 0 and 3
    sel = m.hard_mask(s, neg, 2)
    assert sel.tolist() == [[False, False, True, True, False], [False, True, True, False, False]]


# ---- the maths the paper rests on (card criterion 6 and the definitions), against independent computations ----------
def test_criterion_6_entropy_of_r_falls_with_tau_and_positive_gradient_balances_the_negatives():
    g = torch.Generator().manual_seed(6)
    B, M = 16, 40
    s_neg = torch.rand(B, M, generator=g, dtype=torch.float64) * 2 - 1  # a fixed random batch of similarities
    taus = [5.0, 1.0, 0.5, 0.2, 0.1, 0.07, 0.03]
    ent = [m.penalty_entropy(s_neg, t).item() for t in taus]
    assert all(a > b for a, b in zip(ent, ent[1:])), ent  # strictly decreasing as tau decreases
    assert ent[0] < math.log(M) and ent[0] > math.log(M) - 0.05  # tau -> inf: uniform over the negatives
    for tau in taus:
        s_pos = (torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
        s_all = s_neg.clone().requires_grad_(True)
        loss = m.loss_from_sims(s_pos, s_all, torch.ones(B, M, dtype=torch.bool), tau, "contrastive") * B  # sum
        d_pos, d_neg = torch.autograd.grad(loss, (s_pos, s_all))
        # dL/ds_ii = -sum_{k != i} dL/ds_ik
        torch.testing.assert_close(d_pos, -d_neg.sum(1), rtol=0, atol=1e-5)
        # and the closed forms: dL/ds_ij = P_ij / tau, dL/ds_ii = -(1/tau) sum_k P_ik
        p = torch.softmax(torch.cat([s_pos.detach()[:, None], s_neg], 1) / tau, 1)  # (B, 1 + M)
        torch.testing.assert_close(d_neg, p[:, 1:] / tau, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(d_pos, -p[:, 1:].sum(1) / tau, rtol=1e-9, atol=1e-12)
    # r_i is the negatives' gradient normalised: relative_penalty = (dL/ds_ij) / sum_k dL/ds_ik
    torch.testing.assert_close(m.relative_penalty(s_neg, taus[-1]), d_neg / d_neg.sum(1, keepdim=True))


def test_the_two_temperature_limits():
    g = torch.Generator().manual_seed(7)
    B, M = 5, 9
    s_pos = torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1
    s_neg = torch.rand(B, M, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.ones(B, M, dtype=torch.bool)
    per_anchor = lambda tau: torch.stack([m.loss_from_sims(s_pos[i:i + 1], s_neg[i:i + 1], mask[:1], tau,  # noqa
                                                           "contrastive") for i in range(B)])
    # tau -> 0+: L ~ (1/tau) max(s_max - s_ii, 0): a triplet loss on the nearest negative
    tau = 1e-3
    triplet = (s_neg.max(1).values - s_pos).clamp_min(0) / tau
    assert (per_anchor(tau) - triplet).abs().max().item() < math.log(M + 1) + 1e-9
    # tau -> inf: L ~ log N - (N-1)/(N tau) s_ii + 1/(N tau) sum_k s_ik, N = M + 1 candidates
    tau, n = 1e3, M + 1
    linear = math.log(n) - (n - 1) / (n * tau) * s_pos + s_neg.sum(1) / (n * tau)
    torch.testing.assert_close(per_anchor(tau), linear, rtol=0, atol=1e-6)


def test_uniformity_log_space_equals_the_direct_formula_and_survives_underflow():
    f = unit(23, 4, seed=8)
    for t in (0.5, 2.0, 5.0):
        torch.testing.assert_close(m.uniformity(f, t), m.uniformity_direct(f, t), rtol=1e-10, atol=1e-12)
    # two antipodal points: ||a - b||^2 = 4, so U = t * 4 exactly
    assert m.uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)).item() == pytest.approx(8.0)
    # where the direct formula underflows (float32, large t), the log-space one stays finite and correct:
    # a regular tetrahedron on the sphere has every ||a - b||^2 = 8/3, so U = 8t/3 exactly
    tetra = F.normalize(torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]), dim=-1)  # float32
    assert math.isinf(m.uniformity_direct(tetra, 200.0).item())  # exp(-533) == 0 in float32
    assert m.uniformity(tetra, 200.0).item() == pytest.approx(200 * 8 / 3, rel=1e-5)


def test_tolerance_on_a_hand_worked_case():
    # class 0: (1,0) and (0,1), cosine 0; class 1: (1,0) and (-1,0), cosine -1; cross-class pairs do not count.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert m.tolerance(f, labels).item() == pytest.approx(-0.5)  # conditional mean over same-class pairs x != y
    # three points of one class at cosines 1, 0.5, 0.5 -> mean 2/3
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert m.tolerance(f, torch.zeros(3, dtype=torch.long)).item() == pytest.approx(2 / 3)


def test_weighted_knn_on_a_hand_worked_case():
    ftr = torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.0, 1.0], [-1.0, 0.0]])
    ytr = torch.tensor([0, 1, 1, 2])
    fte = torch.tensor([[0.99, 0.141], [0.1, 0.995]])
    # k=1: nearest neighbours are rows 0 and 2; k=3: test 0 sees classes 0, 1, 1 but class 0 is the nearest
    assert m.knn_accuracy(ftr, ytr, fte, torch.tensor([0, 1]), k=1) == 1.0
    assert m.knn_accuracy(ftr, ytr, fte, torch.tensor([1, 1]), k=3, sigma=10.0) == 1.0  # flat weights: majority
    assert m.knn_accuracy(ftr, ytr, fte, torch.tensor([0, 1]), k=3, sigma=0.01) == 1.0  # sharp weights: nearest


def test_digits_split_is_fixed_and_stratified():
    xtr, _, xte, yte = m.load_digits_split()
    assert xtr.shape == (1297, 1, 8, 8) and xte.shape == (500, 1, 8, 8)
    assert torch.bincount(yte).tolist() == [50] * 10 and 0 <= xtr.min() and xtr.max() <= 1
    assert torch.equal(m.load_digits_split()[0], xtr)  # independent of any seed
    torch.manual_seed(0)
    view = m.augment(xtr[:32])
    assert view.shape == (32, 1, 8, 8) and 0 <= view.min() and view.max() <= 1 and not torch.equal(view, xtr[:32])


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, word", [(["--negatives", "queue"], "negatives"), (["--hard-frac", "0"], "hard-frac")])
def test_bad_arguments_stop_with_one_sentence(flags, word):
    assert_usage_error(run_script(SLUG, *flags), word)


@pytest.mark.parametrize("change, word", [
    (dict(taus=(0.5, 0.0)), "temperature"), (dict(arch="vit"), "arch"), (dict(bank_momentum=1.0), "momentum"),
    (dict(max_train=10), "max-train"),
])
def test_bad_arguments_in_process(change, word):
    with pytest.raises(shared.UsageError, match=word):
        m.validate(replace(m.Args(), **change))


def write_cifar(folder, n=24, broken=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        if broken == name:
            batch = {b"data": np.zeros((n, 100), dtype=np.uint8), b"labels": [0] * n}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_missing_cifar_file_is_a_usage_error(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    assert_usage_error(run_script(SLUG, "--data-dir", tmp_path), "missing file", "test_batch")


def test_malformed_cifar_files_name_the_file(tmp_path):
    write_cifar(tmp_path, broken="data_batch_3")
    with pytest.raises(shared.UsageError, match="3072") as err:
        m.load_cifar10(str(tmp_path))
    assert "data_batch_3" in str(err.value)
    (tmp_path / "data_batch_3").write_text("not a pickle")
    with pytest.raises(shared.UsageError, match="cannot read .*data_batch_3"):
        m.load_cifar10(str(tmp_path))


def test_well_formed_cifar_files_load_and_run(tmp_path):
    write_cifar(tmp_path / "cifar", n=30)
    xtr, ytr, xte, _ = m.load_cifar10(str(tmp_path / "cifar"))
    assert ytr.shape == (150,) and 0 <= ytr.min() and ytr.max() <= 9
    assert xtr.shape == (150, 3, 32, 32) and xte.shape == (30, 3, 32, 32) and 0 <= xtr.min() and xtr.max() <= 1
    with open(tmp_path / "cifar" / "test_batch", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    assert torch.equal(xte[0, 0, 0, :3], torch.tensor(raw[b"data"][0, :3] / 255.0, dtype=torch.float32))
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path / "cifar"), out_dir=str(tmp_path), max_train=0,
                   simple=False, baselines=False, hard_taus=(1.0,))
    record = m.main(args)
    assert math.isfinite(record["results"]["hard_tau1"]["knn_acc"])


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
