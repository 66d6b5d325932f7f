"""icl_learning_algorithm: determinism, fused == reference attention, the reference predictors against independent
computations (numpy least squares, autograd gradient steps, brute-force neighbours), the probe pipeline, bad args."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_causal_attention_paths_agree, assert_usage_error, load, run_script

m = load("icl_learning_algorithm")


def numbers(record: dict) -> dict:
    return record["results"]


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    args = replace(m.PRESETS["smoke"], out_dir=str(tmp_path))
    first, second = m.main(args), m.main(args)
    assert numbers(first) == numbers(second)
    assert first["history"][-1]["train/loss"] == second["history"][-1]["train/loss"]
    other = m.main(replace(args, seed=1))
    assert other["history"][-1]["train/loss"] != first["history"][-1]["train/loss"]


def test_fused_equals_reference_outputs_and_gradients():
    assert_causal_attention_paths_agree(m)


def test_reference_attention_is_causal():
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    v2 = v.clone()
    v2[:, :, 5:] += 10.0  # change the future of query 4
    torch.testing.assert_close(m.attention_reference(q, k, v)[:, :, :5], m.attention_reference(q, k, v2)[:, :, :5])


def test_whole_model_same_output_on_both_paths():
    a = m.Args()
    torch.manual_seed(0)
    ref = m.ICLTransformer(a.d, a.n_points, a.width, 2, a.n_heads, m.attention_reference).eval()
    fused = m.ICLTransformer(a.d, a.n_points, a.width, 2, a.n_heads, m.attention_fused).eval()
    fused.load_state_dict(ref.state_dict())
    x, y, _ = m.sample_tasks(8, a.n_points, a.d, 1.0, 0.0, torch.Generator().manual_seed(1))
    tokens = m.to_tokens(x, y)
    torch.testing.assert_close(fused(tokens), ref(tokens), atol=1e-5, rtol=1e-4)


def test_tokens_interleave_x_and_padded_y():
    x, y, _ = m.sample_tasks(3, 5, 4, 1.0, 0.0, torch.Generator().manual_seed(0))
    t = m.to_tokens(x, y)
    assert t.shape == (3, 10, 4)
    torch.testing.assert_close(t[:, 0::2], x)
    torch.testing.assert_close(t[:, 1::2, 0], y)
    assert (t[:, 1::2, 1:] == 0).all()


def test_prediction_at_query_i_ignores_everything_after_it():
    a = m.Args()
    model = m.ICLTransformer(a.d, a.n_points, 32, 2, 4, m.attention_fused).eval()
    x, y, _ = m.sample_tasks(2, a.n_points, a.d, 1.0, 0.0, torch.Generator().manual_seed(0))
    y2 = y.clone()
    y2[:, 6:] += 5.0  # y_6.. are after the query x_6
    with torch.no_grad():
        torch.testing.assert_close(model(m.to_tokens(x, y))[:, :7], model(m.to_tokens(x, y2))[:, :7])


@pytest.mark.parametrize("k", [1, 3, 4, 7])  # under-determined (k < d = 4) and over-determined
def test_ols_is_the_min_norm_least_squares_solution(k):
    rng = np.random.default_rng(k)
    X, Y = rng.normal(size=(5, k, 4)), rng.normal(size=(5, k))
    w = m.ridge_weights(torch.from_numpy(X), torch.from_numpy(Y), 0.0).numpy()
    for b in range(5):  # numpy's lstsq returns the minimum-norm solution
        np.testing.assert_allclose(w[b], np.linalg.lstsq(X[b], Y[b], rcond=None)[0], atol=1e-10)


def test_ridge_matches_numpy_solve():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 6))
    w = m.ridge_weights(torch.from_numpy(X), torch.from_numpy(Y), 0.25).numpy()
    for b in range(4):
        np.testing.assert_allclose(w[b], np.linalg.solve(X[b].T @ X[b] + 0.25 * np.eye(3), X[b].T @ Y[b]), atol=1e-10)


def test_gd_and_sgd_are_gradient_steps_on_the_squared_loss():
    torch.manual_seed(0)
    X, Y = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    w0 = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((torch.einsum("bkd,bd->bk", X, w0) - Y).pow(2).sum(), w0)
    torch.testing.assert_close(m.gd_weights(X, Y, 0.03), -0.03 * grad)  # w1 = w0 - alpha * grad, w0 = 0
    w = torch.zeros(3, 4, dtype=torch.float64)
    for j in range(6):  # one example per step, in order
        wj = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(((X[:, j] * wj).sum(-1) - Y[:, j]).pow(2).sum(), wj)
        w = w - 0.05 * g
    torch.testing.assert_close(m.sgd_weights(X, Y, 0.05), w)


def test_best_gd_step_size_is_a_minimum():
    a = replace(m.Args(), n_points=10)
    alphas = m.gd_best_alpha(a, 0.0)
    x, y, _ = m.sample_tasks(20_000, 10, a.d, 1.0, 0.0, torch.Generator().manual_seed(5))
    k = 6
    err = lambda al: (torch.einsum("bd,bd->b", m.gd_weights(x[:, :k], y[:, :k], al), x[:, k]) - y[:, k]).pow(2).mean()
    assert err(alphas[k]) < err(alphas[k] * 0.8) and err(alphas[k]) < err(alphas[k] * 1.2)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(1)
    X, Y, xq = rng.normal(size=(2, 7, 3)), rng.normal(size=(2, 7)), rng.normal(size=(2, 4, 3))
    got_u = m.knn_predict(*map(torch.from_numpy, (X, Y, xq))).numpy()
    got_w = m.knn_predict(*map(torch.from_numpy, (X, Y, xq)), weighted=True).numpy()
    for b in range(2):
        for q in range(4):
            d2 = ((X[b] - xq[b, q]) ** 2).sum(-1)
            nearest = np.argsort(d2)[:3]
            np.testing.assert_allclose(got_u[b, q], Y[b, nearest].mean())
            np.testing.assert_allclose(got_w[b, q], (Y[b, nearest] / d2[nearest]).sum() / (1 / d2[nearest]).sum())


class OLSFromTokens(torch.nn.Module):
    """A 'trained model' that is exactly min-norm OLS, read off the prompt tokens: its SPD and ILWD to OLS must be 0,
    which tests the token layout, the prefix each query sees and the probe pipeline end to end."""

    def forward(self, tokens):
        x, y = tokens[:, 0::2], tokens[:, 1::2, 0]  # (B, ceil(T/2), d), (B, floor(T/2))
        preds = [torch.einsum("bd,bd->b", x[:, i], m.ridge_weights(x[:, :i], y[:, :i], 0.0)) for i in range(x.shape[1])]
        return torch.stack(preds, 1)


def test_probe_pipeline_recovers_an_exact_ols_model():
    a = replace(m.PRESETS["smoke"], n_test=64, n_probe_prompts=8)
    out = m.evaluate({"exact": OLSFromTokens().double()}, {"OLS": lambda X, Y, xq: torch.einsum(
        "bqd,bd->bq", xq, m.ridge_weights(X, Y, 0.0))}, a, 0.0, torch.device("cpu"))
    assert max(out["spd"]["exact"]["OLS"]) < 1e-8
    assert max(out["ilwd"]["exact"]["OLS"]) < 1e-8
    assert out["error"]["exact"][-1] < 1e-8  # n - 1 > d noiseless examples determine w


@pytest.mark.parametrize("flags, words", [
    (["--width", "64", "--n-heads", "5"], ["divide"]),
    (["--n-points", "5"], ["n-points"]),
    (["--n-probes", "2"], ["n-probes"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("icl_learning_algorithm", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
