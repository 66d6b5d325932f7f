"""local_linear_attention: determinism; the four LLA paths (literal, moment-SDPA, blockwise torch, Triton under the
interpreter and on CUDA) equal on outputs and gradients; the maths LLA rests on against independent computations
(weighted least squares by numpy lstsq, the softmax and OLS limits, rows of l summing to 1, a running ridge);
the task-A splits; bad arguments."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_outputs_and_grads_close, assert_usage_error, load, run_script, smoke_determinism

m = load("local_linear_attention")
F64 = torch.float64


def qkv(B=2, H=3, Sq=17, Sk=17, D=5, Dv=3, seed=0, dtype=F64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, E, generator=g, dtype=dtype).requires_grad_(grad)
            for S, E in ((Sq, D), (Sk, D), (Sk, Dv))]


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert first["results"]["LLA"]["sphere/mse_s16"] != other["results"]["LLA"]["sphere/mse_s16"]
    assert first["history"][-1]["train/loss"] != other["history"][-1]["train/loss"]


@pytest.mark.parametrize("causal, Sq, Sk", [(True, 17, 17), (False, 7, 13)])
def test_fused_equals_reference_outputs_and_gradients(causal, Sq, Sk):
    q, k, v = qkv(Sq=Sq, Sk=Sk)
    scale = torch.tensor([0.5, 0.8, 1.1], dtype=F64).view(1, 3, 1, 1).requires_grad_()  # learned per-head scale
    kw = dict(lam=0.3, causal=causal, scale=scale, eps=0.0)
    assert_outputs_and_grads_close(m.attention_fused(q, k, v, **kw), m.attention_reference(q, k, v, **kw),
                                   (q, k, v, scale), 1e-10, 1e-9)


@pytest.mark.parametrize("causal, Sq, Sk", [(True, 19, 19), (False, 11, 21)])
def test_blockwise_cg_equals_reference_outputs_and_gradients(causal, Sq, Sk):
    """The matrix-free backward (two sweeps and a second CG solve per query tile) against autograd through the
    literal path, with a learned per-head scale."""
    q, k, v = qkv(Sq=Sq, Sk=Sk, seed=1)
    scale = torch.tensor([0.7, 0.4, 1.2], dtype=F64).view(1, 3, 1, 1).requires_grad_()
    kw = dict(lam=0.5, causal=causal, scale=scale, eps=0.0)
    out = m.attention_blockwise(q, k, v, n_iter=10, tol=1e-30, block=8, **kw)  # 3 tiles, n_iter >= D
    assert_outputs_and_grads_close(out, m.attention_reference(q, k, v, **kw), (q, k, v, scale), 1e-10, 1e-9)


def test_jacobi_preconditioned_cg_gives_the_same_solution():
    q, k, v = (t.detach()[0] for t in qkv(seed=2))
    sc = torch.full((3,), 0.9, dtype=F64)
    plain = m.blockwise_forward_torch(q, k, v, sc, 0.2, True, 0.0, 12, 1e-30, 8)
    jacobi = m.blockwise_forward_torch(q, k, v, sc, 0.2, True, 0.0, 12, 1e-30, 8, jacobi=True)
    for a, b in zip(plain, jacobi):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


def test_three_paths_agree_in_fp32_on_task_a_data():
    a = replace(m.PRESETS["smoke"], n_tasks=6, n_ctx=100)
    data = m.sphere_tasks(a, a.n_ctx, False, torch.Generator().manual_seed(0))
    q, k, v = (data[n].unsqueeze(1).float() for n in ("q", "k", "v"))
    kw = dict(lam=1e-3, causal=False, scale=16.0)
    ref = m.attention_reference(q, k, v, **kw)
    torch.testing.assert_close(m.attention_fused(q, k, v, **kw), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(m.attention_blockwise(q, k, v, block=32, **kw), ref, atol=1e-4, rtol=0)


def test_reference_is_causal():
    q, k, v = qkv(B=1, H=1, Sq=9, Sk=9, grad=False)
    v2 = v.clone()
    v2[:, :, 5:] += 10.0
    torch.testing.assert_close(m.attention_reference(q, k, v, lam=0.5)[:, :, :5],
                               m.attention_reference(q, k, v2, lam=0.5)[:, :, :5])


def test_whole_model_same_output_on_every_path():
    a = replace(m.PRESETS["smoke"], b_width=16, b_heads=2, b_pairs=6)
    tokens, _ = m.icl_batch(3, a.b_pairs, torch.Generator().manual_seed(0))
    outs = []
    for path in (m.attention_reference, m.attention_fused,
                 lambda q, k, v, **kw: m.attention_blockwise(q, k, v, n_iter=16, tol=1e-30, block=4, **kw)):
        torch.manual_seed(0)
        model = m.ICLModel(a, "LLA", path).double().eval()
        outs.append(model(tokens.double()))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-9, rtol=1e-8)


# ---- the maths LLA rests on ------------------------------------------------------------------------------------------
def test_lla_is_the_weighted_least_squares_intercept():
    """Brute force: per query, lstsq on rows sqrt(w_j) [1, k_j - q] | sqrt(w_j) v_j plus ridge rows sqrt(lam omega)."""
    q, k, v = (t.detach() for t in qkv(B=1, H=2, Sq=6, Sk=10, D=3, Dv=2, seed=3, grad=False))
    lam, s = 0.4, 0.9
    out = m.attention_reference(q, k, v, lam=lam, causal=False, scale=s, eps=0.0).numpy()
    qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
    for h in range(2):
        for i in range(6):
            w = np.exp(s * kn[0, h] @ qn[0, h, i])
            w = w / w.max()  # the same m_i shift: the ridge is lam * omega with omega = sum_j w_j
            X = np.hstack([np.ones((10, 1)), kn[0, h] - qn[0, h, i]]) * np.sqrt(w)[:, None]
            ridge = np.hstack([np.zeros((3, 1)), np.sqrt(lam * w.sum()) * np.eye(3)])
            sol = np.linalg.lstsq(np.vstack([X, ridge]), np.vstack([vn[0, h] * np.sqrt(w)[:, None],
                                                                     np.zeros((3, 2))]), rcond=None)[0]
            np.testing.assert_allclose(out[0, h, i], sol[0], atol=1e-10)  # the intercept b


def test_large_lambda_is_softmax_attention():
    q, k, v = qkv(grad=False)
    out = m.attention_reference(q, k, v, lam=1e10, scale=0.6)
    torch.testing.assert_close(out, m.softmax_attention(q, k, v, scale=0.6), atol=1e-8, rtol=0)


def test_flat_kernel_and_no_ridge_is_ols_with_intercept():
    q, k, v = (t.detach() for t in qkv(B=4, H=1, Sq=5, Sk=30, D=3, Dv=2, seed=4, grad=False))
    out = m.attention_reference(q, k, v, lam=1e-12, causal=False, scale=1e-9, eps=0.0)
    ols = m.global_ridge(k[:, 0], v[:, 0], q[:, 0], ridge=0.0)
    torch.testing.assert_close(out[:, 0], ols, atol=1e-6, rtol=0)


def test_equivalent_kernel_rows_sum_to_one_and_linear_targets_are_exact():
    q, k, _ = qkv(grad=False)
    ones = torch.ones(*k.shape[:-1], 1, dtype=F64)
    for fn in (m.attention_reference, m.attention_fused):
        torch.testing.assert_close(fn(q, k, ones, lam=0.5, eps=0.0), torch.ones(*q.shape[:-1], 1, dtype=F64))
    # local *linear*: with no ridge an exactly linear map v = A k + b is reproduced at every query (softmax is not)
    A, b = torch.randn(3, 5, dtype=F64), torch.randn(3, dtype=F64)
    qn, kn = q[:, :, :7], k[:, :, 7:]  # non-causal, 10 keys in R^5
    out = m.attention_reference(qn, kn, kn @ A.T + b, lam=1e-12, causal=False, eps=0.0)
    torch.testing.assert_close(out, qn @ A.T + b, atol=1e-8, rtol=0)


def test_mesa_layer_is_a_running_ridge_solve():
    q, k, v = (t.detach() for t in qkv(B=1, H=1, Sq=6, Sk=6, D=3, Dv=2, seed=5, grad=False))
    out = m.mesa_attention(q, k, v, lam=0.7).numpy()[0, 0]
    qn, kn, vn = q.numpy()[0, 0], k.numpy()[0, 0], v.numpy()[0, 0]
    for i in range(6):
        W = vn[: i + 1].T @ kn[: i + 1] @ np.linalg.inv(kn[: i + 1].T @ kn[: i + 1] + 0.7 * np.eye(3))
        np.testing.assert_allclose(out[i], W @ qn[i], atol=1e-12)


def test_boundary_split_keys_on_the_cap_queries_on_the_rim():
    a = replace(m.PRESETS["smoke"], n_tasks=5, cap=0.3)
    data = m.sphere_tasks(a, 40, True, torch.Generator().manual_seed(0))
    assert data["k"].shape == (5, 40, 3) and (data["k"][..., 0] > 0.3).all()
    torch.testing.assert_close(data["q"][..., 0], torch.full((5, a.n_query), 0.3, dtype=F64))
    torch.testing.assert_close(data["q"].norm(dim=-1), torch.ones(5, a.n_query, dtype=F64))
    assert (data["y"].abs() < 1).all()  # noiseless tanh targets


# ---- the Triton kernel -----------------------------------------------------------------------------------------------
TRITON_SCRIPT = """
import json, sys, torch
sys.path.insert(0, "tests")
from conftest import load
m = load("local_linear_attention")
errs = {}
for causal, Sq, Sk in ((True, 40, 40), (False, 23, 37)):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 8, generator=g).requires_grad_() for S in (Sq, Sk, Sk))
    s = torch.tensor(0.6, requires_grad=True)  # a learnable scale: its gradient comes out of the kernels too
    out = m.attention_triton(q, k, v, n_iter=16, block=16, lam=0.5, causal=causal, scale=s)
    q64, k64, v64, s64 = (t.detach().double().requires_grad_() for t in (q, k, v, s))  # ground truth: literal, fp64
    ref = m.attention_reference(q64, k64, v64, lam=0.5, causal=causal, scale=s64)
    gr = torch.randn(ref.shape, generator=g, dtype=ref.dtype)  # seeded: the same check on every run
    ga, gb = torch.autograd.grad(out, (q, k, v, s), gr.float()), torch.autograd.grad(ref, (q64, k64, v64, s64), gr)
    errs[str(causal)] = [float((out.double() - ref).detach().abs().max())] + [  # ds: a sum over all pairs, relative
        float((x.double() - y).abs().max() / (y.abs().max() if y.ndim == 0 else 1)) for x, y in zip(ga, gb)]
q, k, v = (t.detach()[0] for t in (q, k, v))  # the Jacobi-preconditioned CG of the kernel, forward only
o, _ = m.blockwise_forward_triton(q, k, v, torch.full((2,), 0.6), 0.5, False, 1e-12, 16, 1e-12, 16, jacobi=True)
ref = m.attention_reference(q[None].double(), k[None].double(), v[None].double(), lam=0.5, causal=False, scale=0.6)[0]
errs["jacobi"] = [float((o.double() - ref).abs().max())]
print("ERRS" + json.dumps(errs))
"""


@pytest.mark.skipif(m.triton is None, reason="triton is not installed")
def test_triton_kernel_under_the_interpreter_matches_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")  # read at @triton.jit time: a fresh process
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = json.loads(proc.stdout.split("ERRS")[-1])
    assert set(errs) == {"True", "False", "jacobi"}
    assert [len(e) for e in errs.values()] == [5, 5, 1]
    for case, out_and_grad_errs in errs.items():  # fp32 kernels vs fp64 reference: output, then dq, dk, dv, ds
        assert max(out_and_grad_errs) < 1e-4, (case, out_and_grad_errs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_compiled_triton_kernel_on_cuda(dtype, tol):
    g = torch.Generator().manual_seed(0)
    q, k, v = (m.unit(torch.randn(2, 2, 300, 64, generator=g)).cuda().to(dtype).requires_grad_() for _ in range(3))
    kw = dict(lam=10.0, causal=True)
    out = m.attention_triton(q, k, v, n_iter=32, **kw)
    ref = m.attention_reference(q.float(), k.float(), v.float(), **kw)
    assert_outputs_and_grads_close(out, ref, (q, k, v), atol=tol, rtol=tol, grad_tol=10)


def test_kernel_sweep_times_each_kernel_and_reports_a_failing_one_without_stopping():
    """The GPU bench's kernel-vs-kernel table (ours vs the authors' FlashLLA), run here on a torch path."""
    def blockwise(q, k, v):
        return m.attention_blockwise(q[None], k[None], v[None], lam=10.0, causal=True, n_iter=8, block=16)[0]

    def broken(q, k, v):
        raise RuntimeError("no kernel here")

    rows = m.kernel_sweep({"blockwise": blockwise, "broken": broken}, (24, 40), 2, 8, torch.float32,
                          torch.device("cpu"), 10.0, 8)
    assert [(r["S"], r["kernel"]) for r in rows] == [(24, "blockwise"), (24, "broken"), (40, "blockwise"),
                                                     (40, "broken")]
    for ok in rows[::2]:  # CG is exact after D = 8 iterations: the blockwise path equals the moment path
        assert ok["max_err"] < 1e-4 and ok["grad_err"] < 1e-4 and ok["fwd_ms"] > 0 and ok["fwd+bwd_ms"] > 0, ok
    for bad in rows[1::2]:
        assert bad["failed"] == "RuntimeError: no kernel here" and "fwd_ms" not in bad


@pytest.mark.slow
def test_compiled_blockwise_matches_eager():
    q, k, v = (t[0] for t in qkv(B=1, H=2, Sq=24, Sk=24, D=4, Dv=2, dtype=torch.float32, grad=False))
    sc = torch.full((2,), 0.5)
    eager = m.blockwise_forward_torch(q, k, v, sc, 0.5, True, 1e-12, 8, 1e-12, 8)
    compiled = torch.compile(m.blockwise_forward_torch)(q, k, v, sc, 0.5, True, 1e-12, 8, 1e-12, 8)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags, words", [
    (["--b-width", "64", "--b-heads", "3"], ["divide"]),
    (["--head-s", "5"], ["head-s"]),
    (["--attn", "triton", "--device", "cpu"], ["cuda"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("local_linear_attention", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
