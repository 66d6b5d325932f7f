"""cmim: log-densities against torch.distributions, the A-MIM loss on a hand-worked case, batched contrastive terms ==
per-sample loops (outputs and gradients), informative embeddings deterministic in eval mode, the InfoNCE views,
determinism, bad arguments, MedMNIST .npz files, and (opt-in) the claim at the default preset."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

import shared
from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

SLUG = "cmim"
m = load(SLUG)
F64 = {"dtype": torch.float64}


# ---- determinism --------------------------------------------------------------------------------------------------
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert without_timing(other["results"]) != without_timing(first["results"])


# ---- the maths: log-densities against torch.distributions (float64) -----------------------------------------------
def test_log_densities_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, log_sigma, eps = (torch.randn(5, 7, generator=g, **F64) for _ in range(3))
    z = mu + log_sigma.exp() * eps
    torch.testing.assert_close(m.log_q_reparam(log_sigma, eps), Normal(mu, log_sigma.exp()).log_prob(z).sum(-1))
    torch.testing.assert_close(m.log_prior(z), Normal(torch.zeros_like(z), 1.0).log_prob(z).sum(-1))
    logits = torch.randn(5, 11, generator=g, **F64)
    x = (torch.rand(5, 11, generator=g, **F64) < 0.5).to(torch.float64)
    torch.testing.assert_close(m.bernoulli_log_lik(logits, x), Bernoulli(logits=logits).log_prob(x).sum(-1))
    mean, log_std = torch.randn(5, 11, generator=g, **F64), torch.randn(5, 11, generator=g, **F64) * 0.3
    xr = torch.randn(5, 11, generator=g, **F64)
    torch.testing.assert_close(m.gaussian_log_lik(xr, mean, log_std), Normal(mean, log_std.exp()).log_prob(xr).sum(-1))


def test_amim_loss_on_a_hand_worked_case():
    # d_z = 1, one pixel x = 1: mu = 0, sigma = 1, eps = 0 -> z = 0, logits = 0.
    # log q = -(0 + 0 + log(2 pi)/2), log P(z) = -log(2 pi)/2, log p(x|z) = log sigmoid(0) = -log 2.
    # L_AMIM = -1/2 (-log 2 - log(2 pi)) = (log 2 + log(2 pi)) / 2
    zero = torch.zeros(1, 1, **F64)
    loss = m.amim_loss(m.bernoulli_log_lik(zero, torch.ones(1, 1, **F64)), m.log_q_reparam(zero, zero),
                       m.log_prior(zero))
    assert loss.item() == pytest.approx((math.log(2) + math.log(2 * math.pi)) / 2, rel=1e-12)
    # a second sample: sigma = e^-1, eps = 2 (z = mu + 2/e with mu = 1), x = 0, logits = 3
    z = 1 + 2 * math.exp(-1)
    by_hand = -0.5 * (-math.log1p(math.exp(3)) - (-1 + 2 + 0.5 * math.log(2 * math.pi))
                      - (0.5 * z * z + 0.5 * math.log(2 * math.pi)))
    two = m.amim_loss(m.bernoulli_log_lik(torch.tensor([[0.0], [3.0]], **F64), torch.tensor([[1.0], [0.0]], **F64)),
                      m.log_q_reparam(torch.tensor([[0.0], [-1.0]], **F64), torch.tensor([[0.0], [2.0]], **F64)),
                      m.log_prior(torch.tensor([[0.0], [z]], **F64)))
    assert two.item() == pytest.approx(((math.log(2) + math.log(2 * math.pi)) / 2 + by_hand) / 2, rel=1e-12)


def test_mim_and_vae_differ_in_the_sign_of_log_q():
    # the MIM objective rewards low posterior entropy: a smaller sigma lowers the loss at fixed log p and log P
    lp, lP = torch.tensor([-3.0], **F64), torch.tensor([-1.0], **F64)
    wide = m.amim_loss(lp, m.log_q_reparam(torch.zeros(1, 4, **F64), torch.zeros(1, 4, **F64)), lP)
    narrow = m.amim_loss(lp, m.log_q_reparam(torch.full((1, 4), -2.0, **F64), torch.zeros(1, 4, **F64)), lP)
    assert (wide - narrow).item() == pytest.approx(0.5 * 4 * 2.0)


# ---- fused (batched) == reference (per-sample loops): outputs and gradients -----------------------------------------
def _grads(fn, inputs):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, [t for t in inputs if torch.is_tensor(t) and t.requires_grad]))


@pytest.mark.parametrize("B", [1, 7, 13])
def test_contrastive_terms_equal_the_per_sample_loops(B):
    g = torch.Generator().manual_seed(B)
    u, v = (torch.randn(B, 5, generator=g, **F64).requires_grad_() for _ in range(2))
    for a, r in zip(_grads(lambda a, b: m.contrast_recon(a, b, 0.3), (u, v)),
                    _grads(lambda a, b: m.contrast_recon_loop(a, b, 0.3), (u, v))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    mu = torch.randn(B, 5, generator=g, **F64).requires_grad_()
    log_sigma = (torch.rand(B, 5, generator=g, **F64) - 0.5).requires_grad_()
    z = (mu + log_sigma.exp() * torch.randn(B, 5, generator=g, **F64)).detach().requires_grad_()
    for a, r in zip(_grads(m.contrast_posterior, (z, mu, log_sigma)),
                    _grads(m.contrast_posterior_loop, (z, mu, log_sigma))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    h1, h2 = (torch.randn(B, 5, generator=g, **F64).requires_grad_() for _ in range(2))
    if B > 1:
        for a, r in zip(_grads(lambda a, b: m.infonce(a, b, 0.2), (h1, h2)),
                        _grads(lambda a, b: m.infonce_loop(a, b, 0.2), (h1, h2))):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_contrast_value_does_not_shift_with_batch_size_when_codes_are_orthogonal():
    # u = v = orthonormal rows: positives score 1/tau, negatives 0. With the MEAN over candidates the loss is
    # -(1/tau - log((e^(1/tau) + B - 1) / B)), which tends to 0 as B grows; with a SUM it would grow like log B.
    tau = 0.5
    for B in (2, 4, 8):
        e = torch.eye(B, **F64)
        expected = -(1 / tau - math.log((math.exp(1 / tau) + B - 1) / B))
        assert m.contrast_recon(e, e, tau).item() == pytest.approx(expected, rel=1e-12)


def test_whole_model_loss_batched_equals_loop_path():
    # the same weights and the same noise: cmim_loss with the batched term == A-MIM + the literal loop term
    torch.manual_seed(0)
    model = m.AutoEncoder(9, 3, 8, "bernoulli", 0.05).double()
    x = torch.rand(6, 9, **F64)
    torch.manual_seed(1)
    loss, _ = m.cmim_loss(model, x, 1.0, 0.1, "recon", False)
    torch.manual_seed(1)
    mu, log_sigma = model.encode(x)
    eps = torch.randn_like(mu)
    z = mu + log_sigma.exp() * eps
    out = model.decode(z)
    zhat, _ = model.encode(torch.sigmoid(out))
    ref = m.amim_loss(m.bernoulli_log_lik(out, x), m.log_q_reparam(log_sigma, eps), m.log_prior(z)) \
        + m.contrast_recon_loop(mu, zhat, 0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    gb = torch.autograd.grad(loss, list(model.parameters()))
    gr = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(gb, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ---- informative embeddings and the InfoNCE views ------------------------------------------------------------------
def test_informative_embeddings_are_deterministic_and_built_from_the_mean_code():
    torch.manual_seed(0)
    model = m.AutoEncoder(10, 4, 12, "bernoulli", 0.05)
    x = torch.rand(9, 10)
    a, b = m.features(model, x, True), m.features(model, x, True)
    assert a.shape == (9, 4 + 2 * 12) and np.array_equal(a, b)
    assert model.training  # restored after extraction
    with torch.no_grad():
        mu, _ = model.encode(x)
        h1 = torch.relu(model.dec[0](mu))
        h2 = torch.relu(model.dec[1](h1))
    np.testing.assert_allclose(a, torch.cat([mu, h1, h2], -1).double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(m.features(model, x, False), mu.double().numpy(), rtol=1e-6)


def test_encoder_sigma_is_clamped():
    model = m.AutoEncoder(4, 2, 8, "bernoulli", 0.05)
    with torch.no_grad():
        model.enc[-1].bias[2:] = -50.0  # log sigma far below the clamp
    _, log_sigma = model.encode(torch.rand(3, 4))
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, math.log(0.05)))


def test_augment_shifts_erases_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.rand(50, 64)
    view = m.augment(x, (8, 8, 1), noise=0.0)
    assert view.shape == x.shape
    assert ((view == 0).sum(1) >= 4).all()  # a 2x2 erase (plus zero-filled border after a shift)
    seq = m.augment(torch.randn(5, 40), (40, 1, 1), noise=0.0)
    assert seq.shape == (5, 40) and ((seq == 0).sum(1) >= 2).all()


def test_attributes_ink_and_centre_of_mass():
    x = torch.zeros(1, 4 * 3)
    x.view(1, 4, 3)[0, 1, :] = 1.0  # a full row 1
    x.view(1, 4, 3)[0, 3, 0] = 3.0  # weight 3 on row 3
    ink, com = m.attributes(x, (4, 3, 1))[0].tolist()
    assert ink == pytest.approx(6.0) and com == pytest.approx((1 * 3 + 3 * 3) / 6)


# ---- bad arguments and --data-dir files ----------------------------------------------------------------------------
def test_a_bad_argument_stops_with_one_sentence():
    assert_usage_error(run_script(SLUG, "--batch-sizes", "1", "8"), "batch-sizes")


@pytest.mark.parametrize("change, word", [
    ({"epochs": (3,)}, "--epochs"),
    ({"batch_sizes": (8, 8), "epochs": (1, 1)}, "repeat"),
    ({"min_sigma": 0.0}, "--min-sigma"),
    ({"tau": -1.0}, "--tau"),
    ({"lam": -0.5}, "--lam"),
])
def test_validate_names_the_bad_argument(change, word):
    with pytest.raises(shared.UsageError, match=word):
        m.validate(replace(m.Args(), **change))


def _medmnist(path, n=24, hw=6, labels=None, **override):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n, hw, hw), dtype=np.uint8),
              "train_labels": (np.arange(n) % 3).reshape(n, 1) if labels is None else labels,
              "test_images": rng.integers(0, 256, (12, hw, hw), dtype=np.uint8),
              "test_labels": (np.arange(12) % 3).reshape(12, 1)}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize("override, word", [
    ({"test_labels": None}, "test_labels"),
    ({"train_images": np.zeros((24, 36))}, "train_images"),
    ({"train_labels": np.linspace(0, 1, 24).reshape(24, 1)}, "train_labels"),
    ({"test_images": np.full((12, 6, 6), 300.0)}, "[0, 255]"),
])
def test_malformed_medmnist_files_name_the_problem(tmp_path, override, word):
    path = _medmnist(tmp_path / "bad.npz", **override)
    with pytest.raises(shared.UsageError) as err:
        m.load_medmnist(str(path))
    assert word in str(err.value) and "bad.npz" in str(err.value)


def test_not_an_npz_is_a_usage_error(tmp_path):
    (tmp_path / "x.npz").write_text("not numpy")
    assert_usage_error(run_script(SLUG, "--data-dir", tmp_path / "x.npz"), "cannot read", "x.npz")


def test_well_formed_medmnist_loads_and_runs(tmp_path):
    _medmnist(tmp_path / "tiny.npz")
    xtr, ytr, xte, _, shape = m.load_medmnist(str(tmp_path))  # a folder holding one .npz
    assert xtr.shape == (24, 36) and xte.shape == (12, 36) and shape == (6, 6, 1)
    assert 0 <= xtr.min() and xtr.max() <= 1 and ytr.tolist()[:4] == [0, 1, 2, 0]
    args = replace(m.PRESETS["smoke"], data_dir=str(tmp_path), out_dir=str(tmp_path), batch_sizes=(4, 8))
    record = m.main(args)
    assert math.isfinite(record["results"]["cmim-8"]["probe_acc"])


# ---- the claim (default preset, minutes; opt-in with `pytest -m claim`) -------------------------------------------
@pytest.mark.claim
def test_claim_holds_at_the_default_preset(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]["checks"]
