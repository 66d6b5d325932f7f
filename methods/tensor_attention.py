"""How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation
(Alman, Song, ICLR 2024)
arXiv:2310.04064 (v1; the paper numbers definitions and theorems, not equations, so we cite them by name)
https://arxiv.org/abs/2310.04064
Official code: none (a theory paper with no experiments).

The method in a few lines
    Matrix attention scores pairs (query i, key j). Tensor attention scores triples: each query i scores every PAIR of
    keys (j1, j2) with the trilinear form <Q_i, K1_j1 o K2_j2> (o = entrywise product) and normalises over all n^2
    pairs; the value of a pair is V1_j1 o V2_j2. In matrix form, with the column-wise Kronecker product
    K1 (/) K2 in R^{n^2 x d} whose row (j1, j2) is K1_j1 o K2_j2:
        Att = D^-1 A (V1 (/) V2),  A = exp(Q (K1 (/) K2)^T / d),  D = diag(A 1_{n^2}).
    That costs n^3 d. The paper's results: if every entry of Q, K1, K2 is at most B = o(cuberoot(log n)) (d = O(log n))
    the output can be approximated to 1/poly(n) in n^{1+o(1)} time by the polynomial method (approximate exp by a
    degree-g polynomial on [-B^3, B^3], factor it as U1 (U2 (/) U3)^T, then use (U2 (/) U3)^T (V1 (/) V2) =
    (U2^T V1) o (U3^T V2)); if B = Omega(cuberoot(log n)), no n^{3-Omega(1)} algorithm exists under SETH. Tensor
    attention can detect triples (Match3: does x_i + x_j + x_k = 0 mod M?), which one matrix-attention layer provably
    cannot do with a small embedding (Sanford, Hsu, Telgarsky 2023).

Reproduces (CPU scale; the card's checks):
    (a) the polynomial method's max relative error grows monotonically with the entry bound B at fixed degree g;
    (b) at B <= 1 degree 4 already gives error <= 1e-4;   (c) at B = 2.5 every g <= 12 gives error >= 1e-2 (the
    cuberoot(log n) wall: the degree needed grows like B^3);  (d) runtime: exact (SDPA over the n^2 key pairs) vs
    polynomial (g = 4, B = 1), the exact/approx time ratio grows >= 5x from n = 64 to 1024 and the exact log-log
    slope over the last doubling (512 -> 1024) is >= 2.3 (cubic), while the polynomial path stays near-linear;
    (e) a hand-set one-head tensor attention solves Match3 with 100% accuracy (n = 16, M = 97).  Report only (no pass
    criterion, as the card says): one trained tensor layer vs one trained matrix layer on Match3 and the Match2
    control.

Run:
    python methods/tensor_attention.py                       # default: CPU, ~1 min on 2 quiet cores
    python methods/tensor_attention.py --preset smoke        # seconds, same code path
    python methods/tensor_attention.py --preset paper --device cuda   # n up to 8192, 20k training steps
    python methods/tensor_attention.py --attn reference      # the literal n x n x n score tensor in the models
    python methods/tensor_attention.py --attn poly --poly-degree 2   # the paper's polynomial method in the models
    python methods/tensor_attention.py --bench               # reference vs SDPA pairs vs polynomial, eager vs compile
    python methods/tensor_attention.py --help

Expected (default preset, seed 0: 61 s on a quiet 2-core CPU, 2 threads; the timings are from that quiet run; seeds
1 and 2 below ran with 1 thread each):
    Max relative error of the polynomial method vs exact tensor attention, n=64, d=4; cuberoot(ln n) = 1.61 (card's calibration in brackets)
    | B   | B^3   | g=4 (r=70)        | g=8 (r=495)       | g=12 (r=1820)     |
    |-----|-------|-------------------|-------------------|-------------------|
    | 0.5 | 0.125 | 2.07e-10 [4e-9]   | 1.10e-15          | 1.10e-15          |
    | 1   | 1     | 2.32e-05 [1.6e-5] | 5.96e-10 [4e-10]  | 5.00e-15          |
    | 1.5 | 3.38  | 4.24e-03 [2.6e-3] | 9.20e-06 [3e-6]   | 4.44e-09 [3e-9]   |
    | 2   | 8     | 2.37e-01 [0.37]   | 1.17e-02 [1.8e-2] | 1.40e-04 [1.8e-5] |
    | 2.5 | 15.6  | 7.70e-01 [0.52]   | 4.00e-01 [0.14]   | 1.09e-01 [4e-2]   |

    Runtime (ms, min over repeats), exact n^3 pair-SDPA vs polynomial; paper: n^3 vs n^{1+o(1)}
    | n    | exact ms | poly g=4 ms | exact / poly | poly max rel err |
    |------|----------|-------------|--------------|------------------|
    | 64   | 0.3214   | 0.4938      | 0.6508       | 1.7e-05          |
    | 128  | 2.008    | 0.5871      | 3.42         | 1.8e-05          |
    | 256  | 15.37    | 0.8884      | 17.31        | 9.5e-06          |
    | 512  | 138.2    | 1.381       | 100          | 2.0e-05          |
    | 1024 | 3495     | 2.535       | 1379         | 6.9e-05          |

    Match3 / Match2, one layer, D=64, 4 heads, M=97, train n=12 (1500 / 500 steps), held-out n=16; report only
    | metric                               | tensor (method) | matrix (baseline) | majority      | paper / card                                          |
    |--------------------------------------|-----------------|-------------------|---------------|-------------------------------------------------------|
    | match3 test acc                      | 0.6408          | 0.634             | 0.5593        | card 1500/4000 st: tensor .653/.663, matrix .646/.660 |
    | match3 test bal_acc                  | 0.672           | 0.6591            | 0.5           | 1 matrix layer cannot (Sanford+23)                    |
    | match3 heldout acc                   | 0.5318          | 0.5437            | 0.7598        | hand-set tensor head: 1.000                           |
    | match3 heldout bal_acc               | 0.668           | 0.6564            | 0.5           | 1 matrix layer cannot (Sanford+23)                    |
    | match2 test acc                      | 0.9999          | 0.9999            | 0.8769        | both solvable (control)                               |
    | match2 test bal_acc                  | 0.9998          | 0.9999            | 0.5           | both solvable (control)                               |
    | match2 heldout acc                   | 0.9999          | 0.9999            | 0.8474        | both solvable (control)                               |
    | match2 heldout bal_acc               | 0.9997          | 0.9997            | 0.5           | both solvable (control)                               |
    | Match3 positive rate test / held-out |                 |                   | 0.559 / 0.760 | card: 0.56 / 0.76                                     |

    CLAIM HOLDS: the polynomial method approximates tensor attention well only below the cuberoot(log n) entry
    bound, runs near-linearly while the exact path is cubic, and one tensor head solves Match3 (checks (a)-(e);
    trained tensor vs matrix is report-only)
      [x] (a) error monotone increasing in B at every g
      [x] (b) g=4, B <= 1: error <= 1e-4 (max 2.3e-05)
      [x] (c) B=2.5: every g <= 12 gives error >= 1e-2 (min 1.1e-01)
      [x] (d1) exact/poly time ratio grows >= 5x from n=64 to 1024 (2118.5x)
      [x] (d2) exact log-log slope n=512->1024 >= 2.3 (4.66; poly 0.88)
      [x] (e) hand-set tensor head solves Match3 at n=16, F=8: acc = 1 (1.0000)

Seeds 1 and 2 (full default runs, 129 s of 1-thread CPU each): Match3 held-out balanced accuracy tensor 0.677 /
0.673 vs matrix 0.668 / 0.661 (test 0.679 / 0.678 vs 0.671 / 0.665); Match2 >= 0.999 for both models. Seed 2
passes every check; seed 1 FAILS check (c): its g = 12 error at B = 2.5 is 6.5e-3 < 1e-2
(seed 0: 0.11, seed 2: 0.11). The errors are maxima over ONE random draw of U[-B, B] inputs, which rarely come near
the worst case |score| = B^3 of the theorem, so the card's single-draw threshold at g = 12 is not robust; (a), (b),
(d), (e) hold for all three seeds (g=4, B=1 error 2.3e-5 / 2.9e-5 / 4.9e-5; exact/poly ratio growth > 500x).

What does not reproduce: the trained separation. One trained tensor layer and one trained matrix layer (same width,
heads, embedding, sink, readout, 1500 AdamW steps) both learn Match3 only partially (balanced accuracy ~0.66-0.68)
and are not separated (tensor ahead by only 0.01-0.016 on all three seeds); both solve the Match2 control. Calibration on seed 0 (tensor only, 1500 steps): F = 8
frequencies 0.676, F = 8 with 2 heads of 32 dims (room for the hand-set solution) 0.683, lr 1e-2 0.591, initial
temperature e^2 0.675; the card saw the same at 4000 steps (tensor 66.3%, matrix 66.0%). Sanford et al.'s lower
bound is asymptotic (n large against width x heads x precision); at this size a matrix layer is not yet starved,
and gradient descent does not find the sharp (beta ~ 40 * sum_f cos) tensor solution that the hand-set head shows
exists. So the expressivity side of the paper is shown constructively (check (e)), not by training.

Implementation details:
    1. attention_reference forms the (B, H, n, m1, m2) score tensor Q.(K1_j1 o K2_j2) with one einsum, takes a
       softmax over the flattened (j1, j2) axis (= D^-1 exp(.) with the row maximum subtracted, which cancels) and
       contracts with V1_j1 o V2_j2. attention_fused builds the n^2 pair keys K1 (/) K2 and pair values V1 (/) V2
       and makes ONE F.scaled_dot_product_attention call over them: exactly the same function, O(n^2 d) memory.
    2. attention_poly is the paper's algorithm: monomial features of degree <= g (r = C(d+g, g) of them), U1 carries
       the Taylor coefficients scale^t / alpha!, and the n^2 pairs are never formed: Num = U1 [(U2^T V1) o (U3^T V2)],
       Den = U1 [(U2^T 1) o (U3^T 1)], O(n r d) time. A negative Den (Taylor far outside its range) gives NaN/garbage
       that is reported as a failure, never clipped.
    3. The approximation study uses the paper's setting: Q, K1, K2 ~ U[-B, B]^{n x d}, V1, V2 ~ U[-1, 1], scale 1/d,
       float64; error = max_i,l |T - Att| / max_i,l |Att| (the card's calibration).
    4. Match3 / Match2 models (shared by tensor and matrix): input = fixed Fourier features [cos, sin](2 pi f x / M),
       f = 1..4, through a linear map, plus a learned embedding; a learned sink vector appended to the keys; one
       attention layer with H heads and a learned per-head temperature; residual; a GELU MLP readout per token.
       The matrix model is the paper's special case: K2 = V2 = a single all-ones key, so the pair softmax reduces to
       the ordinary softmax over j1.
    5. AdamW with a one-cycle schedule (linear warm-up 10%, cosine down), batch 128, fresh samples every step,
       binary cross-entropy per token; test sets from a fixed generator independent of the training seed.

Deviations from the paper:
    1. The paper has no experiments; every number here is our CPU-scale illustration of its theorems (card's setup).
    2. The polynomial is the Taylor polynomial of exp at 0, not the Aggarwal-Alman polynomial of the proof; it needs
       a slightly higher degree for the same error but shows the same B^3 wall.
    3. Training uses scale 1/sqrt(d_h) (the 2-simplicial-attention convention) with a learned per-head temperature;
       the theory's 1/d is used in the approximation study and is a flag (--train-scale) for training.
    4. No causal mask: Match3 is a bidirectional task, so the causal (prefix-sum) variant is not implemented.
    5. The SDPA pair path is chunked over queries in the timing study so the CPU never holds more than
       2^24 pair scores at once (a GPU flash kernel would not need it); it is still the exact n^3 computation.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "tensor_attention"
PAPER = "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation"
ARXIV = "2310.04064"
TEST_SEED = 2024  # test sequences are the same for every training seed
ROUNDOFF = 1e-13  # float64 round-off floor of the relative error (n <= 512, d <= 8)


@dataclass
class Args:
    """Tensor (Kronecker) attention: exact, fused, the polynomial method, its B^3 wall, and triple detection."""

    preset: str = "default"
    """name of the preset these values came from (set by --preset; it names the output files)"""
    seed: int = 0
    """seed for model initialisation and the training samples"""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu or cuda"""
    compile: bool = False
    """wrap the Match3/Match2 models in torch.compile (tens of seconds of compilation first)"""
    bench: bool = False
    """only time reference vs fused vs polynomial attention (and eager vs compiled training) and write the bench JSON"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    attn: Literal["fused", "reference", "poly"] = "fused"
    """attention path of the trained models: SDPA over key pairs, the literal n^3 tensor, or the polynomial method"""
    poly_degree: int = 2
    """degree g of the polynomial path when --attn poly trains the models (r = C(d_h+g, g) features)"""
    # ---- approximation study (no training)
    approx_n: int = 64
    """n of the approximation-error study"""
    approx_d: int = 4
    """d of the approximation study and the timing study (keep <= 8: r = C(d+g, g) explodes)"""
    bounds: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5)
    """entry bounds B: Q, K1, K2 ~ U[-B, B]"""
    degrees: tuple[int, ...] = (4, 8, 12)
    """Taylor degrees g of the approximation study"""
    time_ns: tuple[int, ...] = (64, 128, 256, 512, 1024)
    """sequence lengths n of the runtime study (exact n^3 vs polynomial)"""
    time_degree: int = 4
    """degree g of the polynomial path in the runtime study (B = 1)"""
    time_repeats: int = 3
    """timing repeats per n (the minimum is kept: robust to a busy machine)"""
    # ---- Match3 / Match2 (Sanford et al. 2023)
    modulus: int = 97
    """M: tokens are uniform in Z_M"""
    n_train: int = 12
    """sequence length n of training (and of the in-distribution test)"""
    n_heldout: int = 16
    """sequence length of the held-out test"""
    n_test: int = 2000
    """test sequences per test set"""
    width: int = 64
    """model width D"""
    n_heads: int = 4
    """attention heads (must divide width)"""
    n_freq: int = 4
    """Fourier frequencies f = 1..F of the fixed input features"""
    train_scale: Literal["1/sqrt(d)", "1/d"] = "1/sqrt(d)"
    """score scale in the trained models (the theory's 1/d, or the usual 1/sqrt(d_h))"""
    steps: int = 1500
    """Match3 training steps per model"""
    match2_steps: int = 500
    """Match2 (control task) training steps per model"""
    batch_size: int = 128
    """sequences per step"""
    lr: float = 3e-3
    """peak AdamW learning rate of the one-cycle schedule"""
    construct_freq: int = 8
    """F of the hand-set Match3 construction (d = 4F + 1)"""
    construct_beta: float = 40.0
    """beta: the hand-set score is beta * sum_f cos(2 pi f (x_i + x_j + x_k) / M)"""


PRESETS = {
    "smoke": Args(preset="smoke", approx_n=16, bounds=(0.5, 1.0, 2.5), degrees=(4, 8), time_ns=(16, 32),
                  time_repeats=1, n_train=6, n_heldout=8, n_test=64, width=16, n_heads=2, steps=4, match2_steps=2,
                  batch_size=16),
    "paper": Args(preset="paper", approx_n=256, approx_d=8, degrees=(4, 6, 8), time_ns=(512, 1024, 2048, 4096, 8192),
                  modulus=4099, n_train=64, n_heldout=128, n_test=4000, width=128, steps=20_000, match2_steps=5000,
                  compile=True),
}


def n_monomials(d: int, g: int) -> int:
    """r = C(d + g, g): monomials of degree <= g in d variables."""
    return math.comb(d + g, g)


def validate(args: Args) -> None:
    if args.width % args.n_heads != 0:
        raise shared.UsageError(f"--n-heads {args.n_heads} must divide --width {args.width}.")
    if args.modulus < 3 or min(args.n_train, args.n_heldout) < 2:
        raise shared.UsageError("need --modulus >= 3 and sequence lengths >= 2.")
    if min(args.steps, args.match2_steps, args.batch_size, args.n_test, args.time_repeats, args.n_freq) < 1:
        raise shared.UsageError("steps, batch size, test size, timing repeats and frequencies must be positive.")
    if args.lr <= 0 or args.construct_beta <= 0 or any(b <= 0 for b in args.bounds) or not args.bounds:
        raise shared.UsageError("--lr, --construct-beta and every entry bound in --bounds must be positive.")
    if min((*args.degrees, args.time_degree, args.poly_degree)) < 1 or not args.degrees:
        raise shared.UsageError("every polynomial degree (--degrees, --time-degree, --poly-degree) must be >= 1.")
    if args.approx_d < 1 or max(n_monomials(args.approx_d, g) for g in (*args.degrees, args.time_degree)) > 20_000:
        raise shared.UsageError(f"--approx-d {args.approx_d} with degrees {args.degrees} needs more than 20000 "
                                "monomial features r = C(d+g, g); lower the degree or d.")
    if args.attn == "poly" and n_monomials(args.width // args.n_heads, args.poly_degree) > 20_000:
        raise shared.UsageError(f"--attn poly with head size {args.width // args.n_heads} and --poly-degree "
                                f"{args.poly_degree} needs more than 20000 features; lower the degree.")
    if min(args.approx_n, *args.time_ns) < 2:
        raise shared.UsageError("--approx-n and every --time-ns must be >= 2.")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Attention: the literal n^3 tensor, its exact fused form (SDPA over key pairs), the paper's polynomial method
# ---------------------------------------------------------------------------------------------------------------------
# Symbols: q -> Q (B, H, n, d); k1, v1 -> K1, V1 (B, H, m1, d); k2, v2 -> K2, V2 (B, H, m2, d); scale -> 1/d.
def attention_reference(q, k1, k2, v1, v2, scale: float) -> torch.Tensor:
    """Tensor attention, literally (Sec. 1, the ATAttC definition): Att = D^-1 exp(Q (K1 (/) K2)^T * scale)
    (V1 (/) V2), D = diag(exp(.) 1_{n^2}). Forms the full (B, H, n, m1, m2) score tensor."""
    # A[i, (j1, j2)] before exp: sum_l Q_il K1_j1l K2_j2l
    s = torch.einsum("bhid,bhjd,bhkd->bhijk", q, k1, k2) * scale  # (B, H, n, m1, m2)
    B, H, n, m1, m2 = s.shape
    # D^-1 exp(.): a softmax over the m1*m2 key pairs (its max subtraction cancels in D^-1 A)
    a = s.reshape(B, H, n, m1 * m2).softmax(-1).reshape(B, H, n, m1, m2)  # (B, H, n, m1, m2)
    # (V1 (/) V2) row (j1, j2) = V1_j1 o V2_j2 (Hadamard, not concatenation or outer product)
    return torch.einsum("bhijk,bhjd,bhkd->bhid", a, v1, v2)  # (B, H, n, d)


def column_kronecker(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (/) b: the column-wise Kronecker (face-splitting) product, row (j1, j2) = a_j1 o b_j2.
    a: (..., m1, d), b: (..., m2, d) -> (..., m1*m2, d)."""
    return (a.unsqueeze(-2) * b.unsqueeze(-3)).flatten(-3, -2)  # (..., m1*m2, d)


def attention_fused(q, k1, k2, v1, v2, scale: float) -> torch.Tensor:
    """The same function as ONE softmax attention over the n^2 pair keys K1 (/) K2 with pair values V1 (/) V2:
    F.scaled_dot_product_attention(Q, K1 (/) K2, V1 (/) V2) (flash / memory-efficient kernels on GPU)."""
    # DEVIATION: no causal mask (docstring 4): Match3 is bidirectional. (A causal version would mask pair (j1, j2)
    # unless j1 <= i and j2 <= i, e.g. with FlexAttention's mask_mod on the flattened pair index.)
    return F.scaled_dot_product_attention(q, column_kronecker(k1, k2), column_kronecker(v1, v2), scale=scale)


def monomials(x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All r = C(d+g, g) monomials prod_l x_l^alpha_l with |alpha| <= g. x: (..., d) -> (..., r), plus |alpha| (r,)
    and 1/alpha! (r,). A multiset of g indices from {0..d} is one monomial (index d stands for the constant 1)."""
    d = x.shape[-1]
    idx = torch.tensor(list(combinations_with_replacement(range(d + 1), g)), dtype=torch.long, device=x.device)
    counts = F.one_hot(idx, d + 1).sum(-2)[:, :d]  # (r, d): the multi-index alpha
    inv_fact = torch.exp(-torch.lgamma(counts.to(x.dtype) + 1).sum(-1))  # (r,) 1/alpha!
    x1 = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # (..., d+1)
    return x1[..., idx].prod(-1), counts.sum(-1), inv_fact  # (..., r), (r,), (r,)


def attention_poly(q, k1, k2, v1, v2, scale: float, degree: int = 4) -> torch.Tensor:
    """The paper's polynomial method (the upper-bound theorem's algorithm): exp(x) ~ P(x) = sum_{t<=g} x^t / t!, and
    P(Q (K1 (/) K2)^T scale) = U1 (U2 (/) U3)^T exactly (multinomial theorem), so the n^2 pairs are never formed."""
    # DEVIATION: Taylor coefficients 1/t! instead of the proof's Aggarwal-Alman polynomial (docstring 2)
    mq, t, inv_fact = monomials(q, degree)  # (B, H, n, r)
    u1 = mq * scale ** t.to(q.dtype) * inv_fact  # (B, H, n, r): U1[i, a] = scale^|a| / a! * prod_l Q_il^a_l
    u2, u3 = monomials(k1, degree)[0], monomials(k2, degree)[0]  # (B, H, m1, r), (B, H, m2, r)
    # Key identity: (U2 (/) U3)^T (V1 (/) V2) = (U2^T V1) o (U3^T V2), an r x d Hadamard product
    num = u1 @ ((u2.transpose(-2, -1) @ v1) * (u3.transpose(-2, -1) @ v2))  # (B, H, n, d)
    den = u1 @ (u2.sum(-2) * u3.sum(-2)).unsqueeze(-1)  # (B, H, n, 1): U1 [(U2^T 1) o (U3^T 1)]
    return num / den  # (B, H, n, d); den <= 0 (B too large) is a failure we report, never clip


ATTENTION = {"fused": attention_fused, "reference": attention_reference, "poly": attention_poly}


# ---------------------------------------------------------------------------------------------------------------------
# 2. Approximation study: error vs entry bound B (the cuberoot(log n) wall) and runtime vs n
# ---------------------------------------------------------------------------------------------------------------------
def bounded_inputs(n: int, d: int, bound: float, gen: torch.Generator, device) -> list[torch.Tensor]:
    """Q, K1, K2 ~ U[-B, B]^{n x d}, V1, V2 ~ U[-1, 1]^{n x d}, float64, shaped (1, 1, n, d)."""
    u = lambda b: ((torch.rand(1, 1, n, d, generator=gen, dtype=torch.float64) * 2 - 1) * b).to(device)  # noqa: E731
    return [u(bound), u(bound), u(bound), u(1.0), u(1.0)]


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """max |T - Att| / max |Att|; NaN or inf (a non-positive denominator) counts as an infinite error."""
    err = ((approx - exact).abs().max() / exact.abs().max()).item()
    return err if math.isfinite(err) else float("inf")


def approximation_study(args: Args, device) -> dict:
    """Max relative error of the polynomial method against the exact n^3 output, for every (B, g)."""
    gen, out = torch.Generator().manual_seed(TEST_SEED + 10 * args.seed), {}  # inputs differ per seed
    for bound in args.bounds:
        q, k1, k2, v1, v2 = bounded_inputs(args.approx_n, args.approx_d, bound, gen, device)
        exact = attention_reference(q, k1, k2, v1, v2, 1 / args.approx_d)  # (1, 1, n, d)
        for g in args.degrees:
            out[(bound, g)] = rel_error(attention_poly(q, k1, k2, v1, v2, 1 / args.approx_d, g), exact)
    return out


def exact_chunked(q, k1, k2, v1, v2, scale: float) -> torch.Tensor:
    """attention_fused over query chunks (exact: the softmax is per query row); at most 2^24 pair scores at once."""
    # DEVIATION: chunking is for CPU memory only (docstring 5); it is still the n^3 d computation
    chunk = max(1, 2**24 // (k1.shape[-2] * k2.shape[-2]))
    return torch.cat([attention_fused(q[..., s : s + chunk, :], k1, k2, v1, v2, scale)
                      for s in range(0, q.shape[-2], chunk)], dim=-2)  # (B, H, n, d)


def timing_study(args: Args, device) -> dict:
    """Wall time (min over repeats) of the exact pair-SDPA path and the polynomial path, B = 1, float64."""
    gen, sync = torch.Generator().manual_seed(TEST_SEED + 10 * args.seed + 1), (
        torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    out = {"n": list(args.time_ns), "exact_ms": [], "poly_ms": [], "poly_err": []}
    for n in args.time_ns:
        x = bounded_inputs(n, args.approx_d, 1.0, gen, device)
        scale = 1 / args.approx_d
        for name, fn in (("exact", lambda: exact_chunked(*x, scale)),
                         ("poly", lambda: attention_poly(*x, scale, args.time_degree))):
            times = []
            for _ in range(args.time_repeats):
                sync()
                t0 = time.perf_counter()
                res = fn()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            out[f"{name}_ms"].append(min(times))
            if name == "exact":
                exact = res
        out["poly_err"].append(rel_error(res, exact))
        print(f"  n={n:5d}: exact {out['exact_ms'][-1]:9.1f} ms | poly g={args.time_degree} "
              f"{out['poly_ms'][-1]:7.1f} ms | max rel err {out['poly_err'][-1]:.1e}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 3. Data: Match3 and Match2 (Sanford, Hsu, Telgarsky 2023)
# ---------------------------------------------------------------------------------------------------------------------
def make_match(batch: int, n: int, modulus: int, order: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_1..x_n iid uniform in Z_M. Match3 (order 3): y_i = 1{exists j, k: x_i + x_j + x_k = 0 mod M}; Match2
    (order 2): y_i = 1{exists j: x_i + x_j = 0 mod M}. j, k range over all positions, repeats allowed."""
    x = torch.randint(0, modulus, (batch, n), generator=gen)  # (B, n)
    if order == 3:
        pair_sums = (x[:, :, None] + x[:, None, :]).flatten(1) % modulus  # (B, n^2): every x_j + x_k
    else:
        pair_sums = x
    present = torch.zeros(batch, modulus, dtype=torch.bool).scatter_(1, pair_sums, True)  # (B, M)
    y = present.gather(1, (-x) % modulus)  # (B, n): is -x_i among the sums?
    return x, y.float()


# ---------------------------------------------------------------------------------------------------------------------
# 4. Model: one attention layer over Fourier + learned embeddings with a sink; tensor or matrix (the special case)
# ---------------------------------------------------------------------------------------------------------------------
def fourier_features(x: torch.Tensor, modulus: int, n_freq: int) -> torch.Tensor:
    """[cos, sin](2 pi f x / M) for f = 1..F. x: (B, n) -> (B, n, 2F)."""
    f = torch.arange(1, n_freq + 1, device=x.device, dtype=torch.float32)  # (F,)
    angle = 2 * math.pi * x[..., None].float() * f / modulus  # (B, n, F)
    return torch.cat([angle.cos(), angle.sin()], -1)  # (B, n, 2F)


class OneLayer(nn.Module):
    """logits (B, n) from tokens (B, n). tensor=True: K1, K2, V1, V2 learned (tensor attention); tensor=False: K2 and
    V2 are one all-ones key, so softmax over (j1, j2) = softmax over j1: ordinary matrix attention, same parts."""

    def __init__(self, args: Args, attn_fn: Callable, tensor: bool):
        super().__init__()
        D, self.H, self.tensor, self.attn_fn = args.width, args.n_heads, tensor, attn_fn
        self.modulus, self.n_freq, self.dh = args.modulus, args.n_freq, D // args.n_heads
        self.feat, self.embed = nn.Linear(2 * args.n_freq, D), nn.Embedding(args.modulus, D)
        self.sink = nn.Parameter(torch.randn(D) * 0.02)  # appended to the keys: lets a query attend to "nothing"
        self.ln = nn.LayerNorm(D)
        self.q, self.k1, self.v1 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.k2, self.v2 = (nn.Linear(D, D), nn.Linear(D, D)) if tensor else (None, None)
        self.log_temp = nn.Parameter(torch.zeros(args.n_heads))  # learned per-head temperature (card's pitfall)
        # DEVIATION: 1/sqrt(d_h) by default in training (docstring 3); the theory's 1/d is --train-scale 1/d
        self.scale = 1 / self.dh if args.train_scale == "1/d" else 1 / math.sqrt(self.dh)
        self.proj = nn.Linear(D, D)
        self.readout = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, 1))

    def heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, m, D) -> (B, H, m, d_h)
        return t.view(t.shape[0], t.shape[1], self.H, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, n) integers in Z_M
        h = self.feat(fourier_features(x, self.modulus, self.n_freq).to(self.sink.dtype)) + self.embed(x)  # (B, n, D)
        z = self.ln(h)
        keys = torch.cat([z, self.sink.expand(z.shape[0], 1, -1)], 1)  # (B, n+1, D): tokens + sink
        q = self.heads(self.q(z)) * self.log_temp.exp()[:, None, None]  # (B, H, n, d_h); temperature folded into Q
        k1, v1 = self.heads(self.k1(keys)), self.heads(self.v1(keys))  # (B, H, n+1, d_h)
        if self.tensor:
            k2, v2 = self.heads(self.k2(keys)), self.heads(self.v2(keys))  # (B, H, n+1, d_h)
        else:  # NOTE: matrix attention = tensor attention with K2 = V2 = 1 (the paper's special case), one key
            k2 = v2 = torch.ones_like(k1[:, :, :1])  # (B, H, 1, d_h)
        a = self.attn_fn(q, k1, k2, v1, v2, self.scale)  # (B, H, n, d_h)
        h = h + self.proj(a.transpose(1, 2).reshape(h.shape))  # (B, n, D)
        return self.readout(h).squeeze(-1)  # (B, n) logits of y_i


# ---------------------------------------------------------------------------------------------------------------------
# 5. Train and evaluate: a plain loop on fresh samples
# ---------------------------------------------------------------------------------------------------------------------
def lr_at(step: int, args: Args, total: int) -> float:
    """One-cycle: linear warm-up over 10% of the steps, then cosine decay to 0."""
    warm = max(1, total // 10)
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> dict:
    """Accuracy and balanced accuracy (mean of the true-positive and true-negative rates) of per-token predictions."""
    model.eval()
    pred = torch.cat([model(xb.to(device)).cpu() > 0 for xb in x.split(500)])  # (N, n)
    model.train()
    pos, neg = y == 1, y == 0
    tpr = (pred & pos).sum().item() / max(1, pos.sum().item())
    tnr = (~pred & neg).sum().item() / max(1, neg.sum().item())
    return {"acc": (pred == pos).float().mean().item(), "bal_acc": 0.5 * (tpr + tnr)}


def train(model: nn.Module, args: Args, order: int, steps: int, tests: dict, device, name: str) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed * 1000 + order)  # training samples: own stream, fixed by seed
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    if args.compile:
        print(f"[{name}] torch.compile: the first steps compile the model (seconds to a minute)...", flush=True)
    fwd = torch.compile(model) if args.compile else model
    progress, history, t0 = shared.Progress(name, steps), [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = make_match(args.batch_size, args.n_train, args.modulus, order, gen)
        loss = F.binary_cross_entropy_with_logits(fwd(x.to(device)), y.to(device))
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, loss=loss.item())
        if step % max(1, steps // 10) == 0 or step == steps:
            history.append({"model": name, "step": step, "train/loss": loss.item(),
                            "eval/bal_acc": evaluate(model, *tests["test"], device)["bal_acc"],
                            "time_s": round(time.perf_counter() - t0, 2)})
    return history


# ---------------------------------------------------------------------------------------------------------------------
# 6. Constructive Match3: one tensor head with hand-set weights (exact, no training)
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def constructive_match3(args: Args, n_freq: int, n: int) -> float:
    """cos(a+b+c) = ca cb cc - ca sb sc - sa cb sc - sa sb cc is trilinear, so Q_i . (K1_j o K2_k) can equal
    beta sum_f cos(2 pi f (x_i + x_j + x_k) / M): maximal exactly at a match. A sink pair scores midway between a
    match and the best non-match; V1 o V2 = 1 on token pairs, 0 on sink pairs; predict y_i = [mass on tokens > 1/2]."""
    x, y = make_match(args.n_test, n, args.modulus, 3, torch.Generator().manual_seed(TEST_SEED + 3))
    ang = 2 * math.pi * x[..., None].double() * torch.arange(1, n_freq + 1, dtype=torch.float64) / args.modulus
    c, s = ang.cos(), ang.sin()  # (N, n, F)
    kernel = torch.cos(2 * math.pi * torch.arange(1, args.modulus)[:, None] * torch.arange(1, n_freq + 1)
                       / args.modulus).sum(-1)  # (M-1,): sum_f cos(2 pi f r / M) for residues r != 0
    sink = args.construct_beta * (n_freq + kernel.max().item()) / 2  # midway: match = beta * F, best miss below
    one, zero = torch.ones_like(c[..., :1]), torch.zeros_like(c[..., :1])
    q = args.construct_beta * torch.cat([c, -c, -s, -s], -1)  # (N, n, 4F): signs of the four terms
    q = torch.cat([q, one * sink / 1.0], -1)  # (N, n, 4F+1): last coordinate carries the sink score
    k1 = torch.cat([torch.cat([c, s, c, s], -1), zero], -1)  # (N, n, 4F+1)
    k2 = torch.cat([torch.cat([c, s, s, c], -1), one], -1)  # (N, n, 4F+1)
    k1_sink = torch.cat([torch.zeros_like(c[:, :1]).repeat(1, 1, 4), one[:, :1]], -1)  # (N, 1, 4F+1): e_last
    k2_sink = torch.cat([torch.zeros_like(c[:, :1]).repeat(1, 1, 4), one[:, :1]], -1)  # (N, 1, 4F+1)
    k1, k2 = torch.cat([k1, k1_sink], 1), torch.cat([k2, k2_sink], 1)  # (N, n+1, 4F+1)
    v = torch.cat([torch.ones(x.shape[0], n, 1, dtype=torch.float64), torch.zeros(x.shape[0], 1, 1,
                                                                                   dtype=torch.float64)], 1)
    mass = attention_fused(q[:, None], k1[:, None], k2[:, None], v[:, None], v[:, None], 1.0)[:, 0, :, 0]  # (N, n)
    return ((mass > 0.5).double() == y).double().mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# 7. Benchmark: reference vs fused (and the polynomial method) at the paper preset's shapes; eager vs compile
# ---------------------------------------------------------------------------------------------------------------------
def bench(args: Args, device: torch.device) -> dict:
    paper = PRESETS["paper"]
    B, H, n, dh = (8, paper.n_heads, paper.n_train, paper.width // paper.n_heads) if device.type == "cuda" else (
        2, args.n_heads, 48, args.width // args.n_heads)  # CPU: the n^3 reference at B=8, n=64 takes seconds
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = [torch.randn(B, H, n + 1 if i else n, dh, device=device, dtype=dtype, requires_grad=True) for i in range(5)]
    scale = 1 / math.sqrt(dh)
    ref32 = attention_reference(*[t.float() for t in x], scale)
    err = (attention_fused(*x, scale).float() - ref32).abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    if err > tol:
        raise RuntimeError(f"fused attention differs from the reference by {err:.2e} (> {tol}) at the bench shapes")
    shape = f"B={B} H={H} n={n} +sink d_h={dh} {str(dtype)[6:]}"
    rows = []
    for what, fn_of in [("tensor attention fwd", lambda f: lambda: f(*x, scale)),
                        ("tensor attention fwd+bwd", lambda f: lambda: f(*x, scale).sum().backward())]:
        rows.append({"what": f"{what} ({shape})", "reference_ms": shared.benchmark(fn_of(attention_reference), device),
                     "fused_ms": shared.benchmark(fn_of(attention_fused), device)})
    # the paper's point: exact n^3 (pair SDPA, "reference" column) vs polynomial method ("fused" column), B = 1
    n_big = max(args.time_ns)
    xb = bounded_inputs(n_big, args.approx_d, 1.0, torch.Generator().manual_seed(0), device)
    rows.append({"what": f"exact pair-SDPA (ref col) vs poly g={args.time_degree} (fused col), n={n_big} "
                         f"d={args.approx_d} fp64",
                 "reference_ms": shared.benchmark(lambda: exact_chunked(*xb, 1 / args.approx_d), device, 1, 3),
                 "fused_ms": shared.benchmark(lambda: attention_poly(*xb, 1 / args.approx_d, args.time_degree),
                                              device, 1, 3)})
    size = paper if device.type == "cuda" else args
    xt, yt = make_match(size.batch_size, size.n_train, size.modulus, 3, torch.Generator().manual_seed(0))
    xt, yt = xt.to(device), yt.to(device)
    step_ms = []
    for compiled in (False, True):
        shared.seed_everything(0)
        model = OneLayer(size, resolve_attention(args), tensor=True).to(device)
        opt, fwd = torch.optim.AdamW(model.parameters()), (torch.compile(model) if compiled else model)

        def step():
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(fwd(xt), yt).backward()
            opt.step()

        if compiled:
            print("compiling the model (tens of seconds)...", flush=True)
        step_ms.append(shared.benchmark(step, device, warmup=3, repeats=10))
    rows.append({"what": f"train step (tensor, n={size.n_train}, D={size.width}, B={size.batch_size}, "
                         f"attn={args.attn}) eager vs compile", "reference_ms": step_ms[0], "fused_ms": step_ms[1]})
    return shared.save_bench(args, SLUG, device, rows, max_abs_err=err)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Main
# ---------------------------------------------------------------------------------------------------------------------
def resolve_attention(args: Args) -> Callable:
    """The callable the models receive; the polynomial path takes its degree from --poly-degree."""
    return partial(attention_poly, degree=args.poly_degree) if args.attn == "poly" else ATTENTION[args.attn]


def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return shared.seed_everything(args.seed) or bench(args, device)
    t_start = time.perf_counter()

    # ---- (a)-(c): approximation error vs entry bound B -----------------------------------------------------------
    print(f"approximation study: n={args.approx_n}, d={args.approx_d}, B in {args.bounds}, g in {args.degrees}",
          flush=True)
    errs = approximation_study(args, device)
    wall = math.log(args.approx_n) ** (1 / 3)  # cuberoot(ln n): the bound where the theory's regime ends
    # NOTE: below ~1e-13 the error is float64 round-off, whose order is noise; such pairs count as non-decreasing
    monotone = all(all(errs[(b1, g)] <= max(errs[(b2, g)], ROUNDOFF) for b1, b2 in zip(args.bounds, args.bounds[1:]))
                   for g in args.degrees)
    small = [errs[(b, min(args.degrees))] for b in args.bounds if b <= 1.0]
    big_b = max(args.bounds)
    # ---- (d): runtime vs n -----------------------------------------------------------------------------------------
    print(f"runtime study: exact pair-SDPA (n^3) vs polynomial g={args.time_degree}, d={args.approx_d}, B=1, fp64",
          flush=True)
    timing = timing_study(args, device)
    ratio = [e / p for e, p in zip(timing["exact_ms"], timing["poly_ms"])]
    ratio_growth = ratio[-1] / ratio[0]
    slope = math.log(timing["exact_ms"][-1] / timing["exact_ms"][-2]) / math.log(timing["n"][-1] / timing["n"][-2])
    poly_slope = math.log(timing["poly_ms"][-1] / timing["poly_ms"][-2]) / math.log(timing["n"][-1] / timing["n"][-2])
    # ---- (e): hand-set tensor head on Match3 ---------------------------------------------------------------------
    construct = {F_: constructive_match3(args, F_, args.n_heldout) for F_ in (args.construct_freq, 4)}
    print(f"constructive Match3 (n={args.n_heldout}, M={args.modulus}, beta={args.construct_beta:g}): "
          + ", ".join(f"F={F_}: acc {a:.4f}" for F_, a in construct.items()), flush=True)

    # ---- report only: trained one-layer tensor vs matrix attention on Match3 and Match2 --------------------------
    # DEVIATION: the paper trains nothing (docstring 1); this is the card's CPU-scale illustration of Sanford et al.
    attn_fn, results, history = resolve_attention(args), {}, []
    gen = torch.Generator().manual_seed(TEST_SEED + 2)
    tests = {order: {"test": make_match(args.n_test, args.n_train, args.modulus, order, gen),
                     "heldout": make_match(args.n_test, args.n_heldout, args.modulus, order, gen)} for order in (3, 2)}
    for name, tensor in (("tensor", True), ("matrix", False)):
        results[name], t0 = {}, time.perf_counter()
        for order, steps in ((3, args.steps), (2, args.match2_steps)):
            shared.seed_everything(args.seed)  # same init stream for every model: none depends on another having run
            model = OneLayer(args, attn_fn, tensor).to(device)
            history += train(model, args, order, steps, tests[order], device, f"{name} Match{order}")
            for split, (x, y) in tests[order].items():
                for metric, v in evaluate(model, x, y, device).items():
                    results[name][f"match{order}_{split}_{metric}"] = v
        results[name]["train_s"] = time.perf_counter() - t0
    results["majority"] = {f"match{o}_{s}_{m}": (max(y.mean().item(), 1 - y.mean().item()) if m == "acc" else 0.5)
                           for o in (3, 2) for s, (_, y) in tests[o].items() for m in ("acc", "bal_acc")}
    results["majority"] |= {f"match{o}_{s}_positive_rate": tests[o][s][1].mean().item() for o in (3, 2)
                            for s in ("test", "heldout")}
    results["poly_approx"] = {f"max_rel_err_B{b:g}_g{g}": e for (b, g), e in errs.items()}
    results["poly_approx"] |= {f"ms_per_call_n{n}": t for n, t in zip(timing["n"], timing["poly_ms"])}
    results["exact"] = {f"ms_per_call_n{n}": t for n, t in zip(timing["n"], timing["exact_ms"])}
    results["constructive"] = {f"match3_heldout_acc_F{F_}": a for F_, a in construct.items()}

    checks = {
        "(a) error monotone increasing in B at every g": monotone,
        f"(b) g={min(args.degrees)}, B <= 1: error <= 1e-4 (max {max(small, default=float('nan')):.1e})":
            bool(small) and max(small) <= 1e-4,
        f"(c) B={big_b:g}: every g <= 12 gives error >= 1e-2 (min "
        f"{min(errs[(big_b, g)] for g in args.degrees if g <= 12):.1e})":
            all(errs[(big_b, g)] >= 1e-2 for g in args.degrees if g <= 12),
        f"(d1) exact/poly time ratio grows >= 5x from n={timing['n'][0]} to {timing['n'][-1]} ({ratio_growth:.1f}x)":
            ratio_growth >= 5,
        f"(d2) exact log-log slope n={timing['n'][-2]}->{timing['n'][-1]} >= 2.3 ({slope:.2f}; poly {poly_slope:.2f})":
            slope >= 2.3,
        f"(e) hand-set tensor head solves Match3 at n={args.n_heldout}, F={args.construct_freq}: acc = 1 "
        f"({construct[args.construct_freq]:.4f})": construct[args.construct_freq] == 1.0,
    }
    claim = {"text": "the polynomial method approximates tensor attention well only below the cuberoot(log n) entry "
                     "bound, runs near-linearly while the exact path is cubic, and one tensor head solves Match3 "
                     "(checks (a)-(e); trained tensor vs matrix is report-only)",
             "passed": bool(all(checks.values())), "checks": checks}

    # ---- tables ------------------------------------------------------------------------------------------------
    card = {(0.5, 4): "4e-9", (1.0, 4): "1.6e-5", (1.5, 4): "2.6e-3", (2.0, 4): "0.37", (2.5, 4): "0.52",
            (1.0, 8): "4e-10", (1.5, 8): "3e-6", (2.0, 8): "1.8e-2", (2.5, 8): "0.14", (1.5, 12): "3e-9",
            (2.0, 12): "1.8e-5", (2.5, 12): "4e-2"}
    print(f"\nMax relative error of the polynomial method vs exact tensor attention, n={args.approx_n}, "
          f"d={args.approx_d}; cuberoot(ln n) = {wall:.2f} (card's calibration in brackets)")
    shared.print_table(["B", "B^3"] + [f"g={g} (r={n_monomials(args.approx_d, g)})" for g in args.degrees],
                       [[f"{b:g}", f"{b ** 3:.3g}"] + [f"{errs[(b, g)]:.2e}" + (f" [{card[(b, g)]}]" if (b, g) in card
                                                       else "") for g in args.degrees] for b in args.bounds])
    print("\nRuntime (ms, min over repeats), exact n^3 pair-SDPA vs polynomial; paper: n^3 vs n^{1+o(1)}")
    shared.print_table(["n", "exact ms", f"poly g={args.time_degree} ms", "exact / poly", "poly max rel err"],
                       [[n, e, p, e / p, f"{err:.1e}"] for n, e, p, err in
                        zip(timing["n"], timing["exact_ms"], timing["poly_ms"], timing["poly_err"])])
    print(f"\nMatch3 / Match2, one layer, D={args.width}, {args.n_heads} heads, M={args.modulus}, "
          f"train n={args.n_train}"
          f" ({args.steps} / {args.match2_steps} steps), held-out n={args.n_heldout}; report only")
    rows = [[f"match{o} {s} {m}", results["tensor"][f"match{o}_{s}_{m}"], results["matrix"][f"match{o}_{s}_{m}"],
             results["majority"][f"match{o}_{s}_{m}"], paper_row(o, s, m, construct, args)]
            for o in (3, 2) for s in ("test", "heldout") for m in ("acc", "bal_acc")]
    rates = [results["majority"][f"match3_{s}_positive_rate"] for s in ("test", "heldout")]
    rows.append(["Match3 positive rate test / held-out", "", "", f"{rates[0]:.3f} / {rates[1]:.3f}", "card: 0.56 / 0.76"])
    shared.print_table(["metric", "tensor (method)", "matrix (baseline)", "majority", "paper / card"], rows, claim)
    for check, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {check}")

    plot(args, errs, timing, history, wall, results)
    key = {"metric": "match3_heldout_bal_acc", "method": "tensor", "baseline": "matrix", "higher_is_better": True}
    paper_numbers = {"upper_bound": "n^{1+o(1)} time, 1/poly(n) error, if d = O(log n), B = o(cuberoot(log n))",
                     "lower_bound": "no n^{3-Omega(1)} algorithm if B = Theta(cuberoot(log n)) (SETH)",
                     "order_k_threshold": "(log n)^{1/k}",
                     "card_calibrated_errors_n64_d4": {f"B{b:g}_g{g}": v for (b, g), v in card.items()},
                     "card_trained_match3_acc": {"1500 steps": {"tensor": 0.653, "matrix": 0.646, "majority": 0.556},
                                                 "4000 steps": {"tensor": 0.663, "matrix": 0.660, "majority": 0.55}}}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=paper_numbers, history=history, timing=timing,
                               wall_s=time.perf_counter() - t_start)


def paper_row(order: int, split: str, metric: str, construct: dict, args: Args) -> str:
    """What the paper / card says for one row of the Match table."""
    if order == 3 and split == "heldout" and metric == "acc":
        return f"hand-set tensor head: {construct[args.construct_freq]:.3f}"
    if order == 3 and split == "test" and metric == "acc":
        return "card 1500/4000 st: tensor .653/.663, matrix .646/.660"
    if order == 3:
        return "1 matrix layer cannot (Sanford+23)"
    return "both solvable (control)"


def plot(args: Args, errs: dict, timing: dict, history: list[dict], wall: float, results: dict) -> None:
    """The paper's message as three panels: error vs B (the wall), time vs n (cubic vs near-linear), Match3 curves."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for g in args.degrees:
        axes[0].semilogy(args.bounds, [min(max(errs[(b, g)], 1e-17), 1e3) for b in args.bounds], "o-", label=f"g={g}")
    axes[0].axvline(wall, color="grey", ls="--", label=f"cuberoot(ln n) = {wall:.2f}")
    axes[0].set(xlabel="entry bound B", ylabel="max relative error", title=f"polynomial method, n={args.approx_n}, "
                f"d={args.approx_d}")
    axes[0].legend(fontsize=8)
    ns = np.array(timing["n"], dtype=float)
    axes[1].loglog(ns, timing["exact_ms"], "o-", label="exact (SDPA over n^2 pairs)")
    axes[1].loglog(ns, timing["poly_ms"], "s-", label=f"polynomial g={args.time_degree}")
    axes[1].loglog(ns, timing["exact_ms"][-1] * (ns / ns[-1]) ** 3, ":", color="grey", label="~ n^3")
    axes[1].set(xlabel="n", ylabel="ms", title="runtime, B = 1")
    axes[1].legend(fontsize=8)
    for i, name in enumerate(("tensor", "matrix")):
        for order, ls in ((3, "-"), (2, "--")):
            h = [r for r in history if r["model"] == f"{name} Match{order}"]
            axes[2].plot([r["step"] for r in h], [r["eval/bal_acc"] for r in h], ls, color=f"C{i}",
                         label=f"{name} Match{order}")
    axes[2].axhline(0.5, color="grey", ls=":", label="majority (bal. acc 0.5)")
    axes[2].set(xlabel="step", ylabel="balanced accuracy (test, n=%d)" % args.n_train, title="trained one layer")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(shared.run_path(args, SLUG, ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
