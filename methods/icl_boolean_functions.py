"""Understanding In-Context Learning in Transformers and LLMs by Learning to Learn Discrete Functions
(Bhattamishra, Patel, Blunsom, Kanade, ICLR 2024)
arXiv:2310.03016  https://arxiv.org/abs/2310.03016
Official code: satwik77/incontext-bool (PyTorch; tasks in src/bool_tasks.py, baselines in src/baselines.py)

The method in a few lines
    The "learn a function class in context" protocol of Garg et al. (2022), moved to Boolean functions. A prompt is
    x_1, y_1, ..., x_k with x_i in {-1,+1}^n, y_i = f(x_i) in {-1,+1}, and f drawn afresh for every prompt from a
    class (conjunctions, disjunctions, 3-DNF/CNF, majority, thresholds, parities, nearest-neighbour labelling, ...).
    A causal transformer, trained with BCE at every x-token, must predict y_k from the k-1 pairs before it. The
    paper finds that transformers nearly match the optimal learner on "simple" classes (a conjunction needs O(n)
    examples) but stay at chance on parities; that attention-free models are close on most classes (LSTMs lag);
    that a teaching sequence at the start of the prompt makes transformers far more sample-efficient; and that
    frozen LLMs prompted with such data do about as well as nearest-neighbour.

Reproduces (CPU scale: n = 10 bits, N = 24 examples per prompt, 3-layer width-64 transformer, 2,000 test prompts)
    1. Conjunctions are learned in context: transformer accuracy at the last position (23 examples seen) >= 0.90
       and >= 1-NN + 0.08, and its accuracy averaged over positions >= the elimination algorithm's - 0.03
       (elimination = the classical PAC learner for conjunctions, exact once the literals are pruned).
    2. Sparse parities Parity-(10, 2) are not: the same transformer trained on them stays <= 0.60 at every position,
       while Gaussian elimination over GF(2) reaches ~1.0 once the seen x's span the query. (It is not at 0.50
       exactly: it learns the Bayes prediction from the query alone, which ignores the prompt and scores ~0.56.)
    Reported beside the checks, not gated: an LSTM with the same read-in/out (the attention-free comparison), the
    teaching-sequence experiment (accuracy right after the k+1 teaching examples), a frozen-random-body transformer
    (the LLM substitute, Deviation 4), and the baselines (null, 1-NN, 3-NN, averaging, the class-optimal learner)
    on every class of the test-bed.

Run
    python methods/icl_boolean_functions.py                        # default preset: the checks above (~3 min)
    python methods/icl_boolean_functions.py --preset smoke         # seconds, same code path
    python methods/icl_boolean_functions.py --preset paper --device cuda   # n=28, N=40, 12 layers x 256, 15k steps
    python methods/icl_boolean_functions.py --attn reference       # the literal softmax(QK^T/sqrt(d_h)) path
    python methods/icl_boolean_functions.py --extra-tasks majority disjunction   # train on more classes too
    python methods/icl_boolean_functions.py --bench                # reference vs SDPA at the paper's shapes
    python methods/icl_boolean_functions.py --help

Expected (default preset, seed 0; 145 s on a quiet 2-core CPU, 2 threads):
    | metric   | TF     | LSTM   | TF frozen body | elimination | 1-NN   | 3-NN   | averaging | null   | paper                    |
    |----------|--------|--------|----------------|-------------|--------|--------|-----------|--------|--------------------------|
    | acc k=1  | 0.6215 | 0.601  | 0.581          | 0.5515      | 0.55   | 0.55   | 0.613     | 0.549  |                          |
    | acc k=5  | 0.7755 | 0.6885 | 0.628          | 0.6785      | 0.7115 | 0.656  | 0.6905    | 0.5685 |                          |
    | acc k=10 | 0.8545 | 0.728  | 0.653          | 0.854       | 0.7495 | 0.7375 | 0.7285    | 0.5645 |                          |
    | acc k=23 | 0.951  | 0.771  | 0.6875         | 0.9875      | 0.807  | 0.8315 | 0.7525    | 0.5555 |                          |
    | acc mean | 0.8447 | 0.7213 | 0.6521         | 0.8265      | 0.7354 | 0.7265 | 0.712     | 0.5607 | TF ~ optimal; LSTM lower |
    Sparse parity Parity-(10, 2), positions 1 and 23 and the maximum over all 24:
    | metric         | TF     | GF(2) elimination | query-only Bayes | 1-NN   | averaging | null   | paper             |
    |----------------|--------|-------------------|------------------|--------|-----------|--------|-------------------|
    | acc k=1        | 0.5515 | 0.5035            | 0.5515           | 0.4905 | 0.512     | 0.5035 |                   |
    | acc k=23       | 0.5625 | 1                 | 0.5625           | 0.645  | 0.4945    | 0.4985 |                   |
    | acc max over k | 0.5725 | 1                 | 0.5725           | 0.649  | 0.534     | 0.521  | TF ~ 0.5 (chance) |
    Teaching sequences (monotone conjunctions; "right after" = the first example after the k+1 teaching ones):
    | metric                   | TF | TF (trained on conjunction) | elimination | 1-NN   | null   | paper                            |
    |--------------------------|----|-----------------------------|-------------|--------|--------|----------------------------------|
    | acc right after teaching | 1  | 0.639                       | 1           | 1      | 0.4805 | TF ~ 1.0 after the teaching seq. |
    | acc mean                 | 1  | 0.7342                      | 0.9583      | 0.7218 | 0.5182 |                                  |
    (then the test-bed table: null / 1-NN / 3-NN / averaging / optimal learner on all 12 classes)
    CLAIM HOLDS (checks 1a, 1b, 1c, 2). The parity model's predictions equal the query-only Bayes predictor's on
    100.0% of the test queries: it learned the prior, not an in-context algorithm. LSTM mean 0.721 vs TF 0.845;
    frozen-body TF 0.652, below 1-NN. Seeds 1 and 2 (same conditions): TF at k=23 0.9665 / 0.9545, mean 0.8579 /
    0.8506 (elimination 0.8265, 1-NN at k=23 0.807); parity max 0.5725 for both (again 100% = query-only Bayes);
    LSTM mean 0.722 / 0.721; teach TF right after teaching 1.0 / 0.999; the claim holds for both.

Implementation details
    1. Tokens as in Garg et al. and the official code: x-token = x_i in {-1,+1}^n, y-token = (y_i, 0, ..., 0),
       interleaved to (B, 2N, n); a linear read-in to width W plus learned positions; pre-LN GPT-2 blocks with causal
       softmax attention; a linear read-out giving one logit at every x-token.
    2. Loss (Sec. 2): BCE(sigmoid(logit_i), (y_i + 1) / 2) averaged over all N positions and the batch; a fresh batch
       of functions every step. Metric: accuracy of sign(logit_i) at every position i (i = examples seen before the
       query), as in the paper's accuracy-vs-examples plots; tables also give the mean over positions.
    3. Function classes: the official samplers (src/bool_tasks.py), vectorised; each sampler's comment gives its
       distribution. The "balancing" step of conjunctions / disjunctions / DNF / CNF forces 30-35% of the points
       to satisfy (falsify) the target, else the labels would be almost all -1 (+1). Teach-conjunction prompts
       start with the teaching sequence of a monotone conjunction with k relevant bits, in a fixed order: the
       point with the relevant bits +1 and the others -1, then that point with each relevant bit flipped in turn.
    4. Baselines (official src/baselines.py plus the paper's optimal learners), causal, ties -> -1: null, 1-NN and
       3-NN (Hamming distance, earliest first on ties), averaging, the elimination algorithm for conjunctions (and
       by De Morgan for disjunctions), Gaussian elimination over GF(2) for parities, and for sparse parities the
       Bayes prediction from the query alone (no in-context learning at all), which the parity model matches.
    5. Optimiser: Adam, 5% linear warm-up then cosine decay, gradient clipping 1.0, batch 64, lr 2e-3.
    6. Every model on a class sees the same stream of training prompts (a generator seeded by the seed and the
       class); test prompts come from a fixed generator (TEST_SEED), the same for every training seed.

Deviations from the paper
    1. Scale: n = 10, N = 24, 3 layers x 64 x 4 heads, 1.5k steps (conjunction), 1k (parity, teaching), lr 2e-3
       with warm-up, cosine decay and clipping instead of n = 28, N = 40, 12 layers x 256 x 8 heads, 15k-20k steps,
       lr 1e-4 constant (the paper preset has the paper's sizes).
    2. Attention-free models: only an LSTM (1 layer, 64 units, 1k steps); the paper also trains GRU, DSS, RetNet and
       Hyena. Linear layers keep PyTorch's default init (the exemplar icl_learning_algorithm found GPT-2's
       N(0, 0.02) much slower to learn in context at CPU scale).
    3. Baselines: the GD-trained feed-forward network per prefix and the decision-tree / XGBoost learners of the
       official code are not run; the "optimal" learners are the classical ones named above. Parity is compared
       with GF(2) elimination, a learner outside what the paper trains, to show the task is learnable in principle.
    4. The LLM part (Sec. 5, LLaMA-2 / GPT-4 prompted with Boolean vectors as text; frozen pretrained GPT-2 with
       trained read-in/out) cannot run offline. Substitute: (a) the nearest-neighbour baselines, the level the paper
       finds LLMs reach, printed on every class, and (b) a frozen-random-body control (transformer blocks and
       positions frozen at init, only MLP read-in/out trained, like the official `-freeze 2`), which shows that a
       trained body, not the read-in/out, carries the in-context learning.
    5. Teaching sequences: only teach-conjunction is trained; the teach-DNF class and the model trained on a mix of
       prompts with and without teaching sequences (Sec. 4) are not reproduced.
    6. Only the paper's abstract and the official code were reachable offline: Table 1's numbers and the section
       numbers cited here (from the project's paper card) were not re-read, so the `paper` columns state the
       paper's qualitative findings ("near-optimal", "~ chance") rather than numbers.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "icl_boolean_functions"
PAPER = "Understanding In-Context Learning in Transformers and LLMs by Learning to Learn Discrete Functions"
ARXIV = "2310.03016"
TEST_SEED = 2024  # the test prompts are the same for every training seed
TASKS = ("conjunction", "disjunction", "sparse_disjunction", "dnf", "cnf", "majority", "sparse_thres",
         "int_halfspace", "parity", "sparse_parity", "nearest_neighbours", "teach_conjunction")


@dataclass
class Args:
    """Transformers learning Boolean function classes in context, vs classical learners and an LSTM."""

    preset: str = "default"
    """name of the preset these values came from (set by --preset; it names the output files)"""
    seed: int = 0
    """seed for the model initialisation and the training prompts"""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu or cuda"""
    compile: bool = False
    """wrap each model in torch.compile (tens of seconds of compilation first)"""
    bench: bool = False
    """only time reference vs fused attention (and eager vs compiled training steps) and write the bench JSON"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    attn: Literal["fused", "reference"] = "fused"
    """attention path: "reference" = the literal masked softmax, "fused" = F.scaled_dot_product_attention"""
    # DEVIATION: CPU scale (n=10, N=24, 3 layers x 64, 1.5k steps); the paper's values are in PRESETS["paper"]
    n_dims: int = 10
    """n: bits per input x"""
    n_points: int = 24
    """N: (x, y) pairs per prompt; the sequence length is 2N"""
    width: int = 64
    """hidden size W of the transformer (and of the LSTM)"""
    n_layers: int = 3
    """transformer depth"""
    n_heads: int = 4
    """attention heads (must divide width)"""
    steps: int = 1500
    """training steps of the transformer on conjunctions (and on each --extra-tasks class)"""
    parity_steps: int = 1000
    """training steps of the transformer on sparse parities"""
    teach_steps: int = 1000
    """training steps of the transformer on teach-conjunction prompts"""
    lstm_steps: int = 1000
    """training steps of the LSTM on conjunctions"""
    frozen_steps: int = 500
    """training steps of the frozen-random-body transformer (read-in/out only) on conjunctions"""
    batch_size: int = 64
    """prompts per step"""
    lr: float = 2e-3
    """peak Adam learning rate"""
    n_test: int = 2000
    """test prompts per class"""
    nn_start: int = 5
    """nearest_neighbours class: the first nn_start labels are random, later ones copy the nearest earlier x"""
    extra_tasks: tuple[str, ...] = ()
    """further classes to train the transformer on (any of TASKS), reported in the test-bed table"""


PRESETS = {
    "smoke": Args(preset="smoke", n_dims=6, n_points=10, width=32, n_layers=1, steps=20, parity_steps=10,
                  teach_steps=10, lstm_steps=10, frozen_steps=10, n_test=200),
    "paper": Args(preset="paper", n_dims=28, n_points=40, width=256, n_layers=12, n_heads=8, steps=15_000,
                  parity_steps=15_000, teach_steps=15_000, lstm_steps=15_000, frozen_steps=15_000, lr=1e-4,
                  n_test=2000, nn_start=20, extra_tasks=tuple(t for t in TASKS if t not in (
                      "conjunction", "sparse_parity", "teach_conjunction"))),
}


def validate(args: Args) -> None:
    if args.width % args.n_heads != 0:
        raise shared.UsageError(f"--n-heads {args.n_heads} must divide --width {args.width}.")
    if not 2 <= args.n_dims <= 60:
        raise shared.UsageError(f"--n-dims must be in [2, 60] (got {args.n_dims}); GF(2) vectors are 64-bit masks.")
    if args.n_points < args.n_dims + 2:
        raise shared.UsageError(f"--n-points {args.n_points} must be >= n-dims + 2 = {args.n_dims + 2} so that a "
                                "full teaching sequence and one random example fit in a prompt.")
    if min(args.steps, args.parity_steps, args.teach_steps, args.lstm_steps, args.frozen_steps, args.batch_size,
           args.n_test, args.n_layers) < 1 or args.lr <= 0:
        raise shared.UsageError("steps, batch size, test prompts, layers and the learning rate must be positive.")
    if not 1 <= args.nn_start < args.n_points:
        raise shared.UsageError(f"--nn-start must be in [1, n-points) (got {args.nn_start}).")
    bad = [t for t in args.extra_tasks if t not in TASKS]
    if bad:
        raise shared.UsageError(f"unknown --extra-tasks {', '.join(bad)}; choose from: {', '.join(TASKS)}.")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: the Boolean function classes (Sec. 3 and App. of the paper; official src/bool_tasks.py), vectorised
# ---------------------------------------------------------------------------------------------------------------------
def rand_signs(shape, gen: torch.Generator) -> torch.Tensor:
    """Uniform on {-1, +1}^shape."""
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def literal_weights(B: int, n: int, p_zero: float, gen: torch.Generator) -> torch.Tensor:
    """w_j = 0 (variable absent), +1 (literal x_j) or -1 (literal not-x_j) w.p. p_zero, (1-p_zero)/2, (1-p_zero)/2."""
    u = torch.rand(B, n, generator=gen)
    return torch.where(u < p_zero, 0.0, torch.where(u < p_zero + (1 - p_zero) / 2, 1.0, -1.0))  # (B, n)


def force(x: torch.Tensor, w: torch.Tensor, p: float, sign: float, gen: torch.Generator) -> torch.Tensor:
    """Balancing step: with prob. p per point set every literal of w true (sign=+1) or false (sign=-1)."""
    B, N, n = x.shape
    hit = (torch.rand(B, N, generator=gen) < p)[..., None] & (w[:, None] != 0)  # (B, N, n)
    return torch.where(hit, sign * w[:, None].expand(B, N, n), x)


def conj_labels(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Conjunction of the literals in w: x.w equals |w|_1 only when all hold, so sign(x.w - (|w|_1 - 1))."""
    return torch.sign(torch.einsum("bnd,bd->bn", x, w) - (w.abs().sum(-1, keepdim=True) - 1))  # (B, N)


def disj_labels(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Disjunction: x.w equals -|w|_1 only when no literal holds, so sign(x.w + |w|_1 - 1)."""
    return torch.sign(torch.einsum("bnd,bd->bn", x, w) + (w.abs().sum(-1, keepdim=True) - 1))  # (B, N)


def parity_labels(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = +1 iff an odd number of the bits b_j = (x_j + 1) / 2 with j in S are 1 (s = indicator of S)."""
    return (torch.einsum("bnd,bd->bn", (x + 1) / 2, s) % 2) * 2 - 1  # (B, N)


def teaching_block(w: torch.Tensor) -> torch.Tensor:
    """Teaching sequence of the monotone conjunction w in {0,1}^n: row 0 = relevant bits +1, others -1 (positive);
    row r = row 0 with the r-th relevant bit flipped to -1 (negative), r = 1..k. Rows beyond k are unused.
    w: (B, n) -> (B, n + 1, n)."""
    B, n = w.shape
    base = 2 * w - 1  # (B, n)
    rank = torch.cumsum(w, -1) * w  # (B, n): 1-based index of each relevant bit among the relevant ones, 0 if absent
    r = torch.arange(n + 1).view(1, -1, 1)  # (1, n+1, 1)
    flip = (rank[:, None] == r) & (r > 0)  # (B, n+1, n)
    return base[:, None].expand(B, n + 1, n) - 2 * flip.float()


def sample_prompts(task: str, B: int, N: int, n: int, gen: torch.Generator, nn_start: int = 5) -> dict:
    """Returns x (B, N, n) in {-1,+1}, y (B, N) in {-1,+1} and, for teach tasks, n_teach (B,) = k + 1."""
    x = rand_signs((B, N, n), gen)
    out = {}
    if task == "conjunction":
        w = literal_weights(B, n, 0.7, gen)
        x = force(x, w, 0.3, +1.0, gen)
        y = conj_labels(x, w)
    elif task in ("disjunction", "sparse_disjunction"):
        if task == "disjunction":
            w = literal_weights(B, n, 0.7, gen)
        else:  # exactly 4 positive literals
            w = torch.zeros(B, n).scatter_(1, torch.rand(B, n, generator=gen).argsort(-1)[:, :4], 1.0)
        x = force(x, w, 0.3, -1.0, gen)
        y = disj_labels(x, w)
    elif task in ("dnf", "cnf"):  # three terms (DNF: OR of ANDs) or three clauses (CNF: AND of ORs)
        ws = torch.stack([literal_weights(B, n, 0.8, gen) for _ in range(3)], 1)  # (B, 3, n)
        chosen = ws[torch.arange(B), torch.randint(0, 3, (B,), generator=gen)]  # one term per prompt is balanced
        if task == "dnf":
            x = force(x, chosen, 0.35, +1.0, gen)
            y = torch.stack([conj_labels(x, ws[:, t]) for t in range(3)], -1).amax(-1)
        else:
            x = force(x, chosen, 0.3, -1.0, gen)
            y = torch.stack([disj_labels(x, ws[:, t]) for t in range(3)], -1).amin(-1)
    elif task == "majority":
        w = (torch.rand(B, n, generator=gen) < 0.3).float()
        y = torch.sign(torch.einsum("bnd,bd->bn", x, w) - 0.5)
    elif task == "sparse_thres":  # 0-1 threshold: literal weights, threshold uniform in {-3, ..., 2} + 0.5
        w = literal_weights(B, n, 0.7, gen)
        thr = torch.randint(-3, 3, (B, 1), generator=gen).float() + 0.5
        y = torch.sign(torch.einsum("bnd,bd->bn", x, w) - thr)
    elif task == "int_halfspace":
        w = torch.randint(-3, 4, (B, n), generator=gen).float()
        y = torch.sign(torch.einsum("bnd,bd->bn", x, w) - 0.5)
    elif task == "parity":  # NOTE: sample the subset directly (the official code lists all 2^n subsets)
        y = parity_labels(x, torch.randint(0, 2, (B, n), generator=gen).float())
    elif task == "sparse_parity":  # Parity-(n, 2)
        s = torch.zeros(B, n).scatter_(1, torch.rand(B, n, generator=gen).argsort(-1)[:, :2], 1.0)
        y = parity_labels(x, s)
    elif task == "nearest_neighbours":
        y = rand_signs((B, N), gen)
        sim = x @ x.transpose(1, 2)  # (B, N, N): n * cosine similarity, since |x|^2 = n
        for i in range(1, N):  # early points copy only exact duplicates; later ones copy the nearest earlier x
            best = sim[:, i, :i].argmax(-1)  # first maximum = earliest on ties
            copy = torch.ones(B, dtype=torch.bool) if i >= nn_start else sim[:, i, :i].amax(-1) >= n
            y[:, i] = torch.where(copy, y[torch.arange(B), best], y[:, i])
    elif task == "teach_conjunction":
        w = (torch.rand(B, n, generator=gen) < 0.3).float()  # monotone conjunction
        x = force(x, w, 0.4, +1.0, gen)
        k = w.sum(-1).long()  # (B,)
        rows = torch.arange(n + 1)[None, :, None] <= k[:, None, None]  # (B, n+1, 1): rows 0..k are used
        x[:, : n + 1] = torch.where(rows, teaching_block(w), x[:, : n + 1])
        y = conj_labels(x, w)
        out["n_teach"] = k + 1
    else:
        raise ValueError(f"unknown task {task}")
    out.update(x=x, y=y)
    return out


def to_tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Interleave x-tokens x_i and y-tokens (y_i, 0, ..., 0) into one (B, 2N, n) sequence."""
    y_tok = F.pad(y.unsqueeze(-1), (0, x.shape[-1] - 1))  # (B, N, n)
    return torch.stack([x, y_tok], dim=2).flatten(1, 2)  # (B, 2N, n): x_1, y_1, x_2, y_2, ...


# ---------------------------------------------------------------------------------------------------------------------
# 2. Attention: the literal causal softmax and the same function through SDPA
# ---------------------------------------------------------------------------------------------------------------------
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, literally: softmax(Q K^T / sqrt(d_h) + M) V with M = -inf above the diagonal.
    q, k, v: (B, H, T, d_h) -> (B, H, T, d_h)."""
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # True where key j > query i
    scores = scores.masked_fill(future, float("-inf"))  # a query never sees the tokens after it
    return scores.softmax(dim=-1) @ v  # (B, H, T, d_h)


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same function through PyTorch's fused kernel (flash / memory-efficient / math, chosen by PyTorch)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d_h)


ATTENTION = {"fused": attention_fused, "reference": attention_reference}


# ---------------------------------------------------------------------------------------------------------------------
# 3. Models: a pre-LN GPT-2 decoder (optionally with a frozen random body) and an LSTM, same read-in/out
# ---------------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int, n_heads: int, attn_fn: Callable):
        super().__init__()
        self.n_heads, self.attn_fn = n_heads, attn_fn
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: (B, T, W)
        B, T, W = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(W, dim=-1)  # 3 x (B, T, W)
        q, k, v = (t.view(B, T, self.n_heads, W // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, d_h)
        a = self.attn_fn(q, k, v).transpose(1, 2).reshape(B, T, W)  # (B, T, W)
        h = h + self.proj(a)
        return h + self.mlp(self.ln2(h))


def mlp(d_in: int, d_out: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class ICLTransformer(nn.Module):
    """(B, 2N, n) prompt tokens -> (B, N) logits, one per x-token (for the y that follows it).
    frozen_body=True: blocks, positions and final LayerNorm stay at their random init and only MLP read-in/read-out
    train (OFFICIAL CODE: `-freeze 2` in src/models.py swaps the linear read-in/out for 256-unit MLPs)."""

    def __init__(self, n: int, n_points: int, width: int, n_layers: int, n_heads: int, attn_fn: Callable,
                 frozen_body: bool = False):
        super().__init__()
        self.read_in = mlp(n, width) if frozen_body else nn.Linear(n, width)
        # DEVIATION: linear layers keep PyTorch's default init, not GPT-2's N(0, 0.02) (slow to learn ICL at CPU size)
        self.pos = nn.Parameter(0.02 * torch.randn(2 * n_points, width))  # learned absolute positions
        self.blocks = nn.ModuleList(Block(width, n_heads, attn_fn) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        self.read_out = mlp(width, 1) if frozen_body else nn.Linear(width, 1)
        if frozen_body:
            for p in [self.pos, *self.blocks.parameters(), *self.ln_f.parameters()]:
                p.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T, n), T <= 2N
        h = self.read_in(tokens) + self.pos[: tokens.shape[1]]  # (B, T, W)
        for block in self.blocks:
            h = block(h)
        return self.read_out(self.ln_f(h))[:, ::2, 0]  # (B, ceil(T/2)): logits at the x-tokens


# DEVIATION: the LSTM is the only attention-free model here (the paper adds GRU, DSS, RetNet and Hyena)
class ICLLSTM(nn.Module):
    """The attention-free comparison: linear read-in, one LSTM layer, linear read-out at the x-tokens."""

    def __init__(self, n: int, width: int):
        super().__init__()
        self.read_in = nn.Linear(n, width)  # created in this order: read-in, LSTM, read-out (the init stream)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.read_out = nn.Linear(width, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, n) -> (B, ceil(T/2))
        return self.read_out(self.lstm(self.read_in(tokens))[0])[:, ::2, 0]


# ---------------------------------------------------------------------------------------------------------------------
# 4. Training: a plain loop over fresh functions
# ---------------------------------------------------------------------------------------------------------------------
def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(model: nn.Module, task: str, steps: int, args: Args, device: torch.device, name: str) -> list[dict]:
    # the training prompts of a class: one stream per (seed, class), shared by every model trained on that class
    gen = torch.Generator().manual_seed(args.seed * 1000 + TASKS.index(task))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    if args.compile:
        print(f"[{name}] torch.compile: the first steps compile the model (seconds to a minute)...", flush=True)
    fwd = torch.compile(model) if args.compile else model
    progress, history, t0 = shared.Progress(name, steps), [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        p = sample_prompts(task, args.batch_size, args.n_points, args.n_dims, gen, args.nn_start)
        x, y = p["x"].to(device), p["y"].to(device)
        # Sec. 2: BCE between sigmoid(logit_i) and (y_i + 1) / 2 at every position i, averaged
        loss = F.binary_cross_entropy_with_logits(fwd(to_tokens(x, y)), (y + 1) / 2)
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # DEVIATION: clipping (not in the paper) for the high CPU lr
        opt.step()
        progress.update(step, loss=loss.item())
        if step % max(1, steps // 40) == 0 or step == steps:
            history.append({"model": name, "step": step, "train/loss": loss.item(),
                            "time_s": round(time.perf_counter() - t0, 2)})
    return history


# ---------------------------------------------------------------------------------------------------------------------
# 5. Reference learners, causal and batched: prediction at position i uses only (x_j, y_j), j < i. Ties -> -1.
# ---------------------------------------------------------------------------------------------------------------------
def null_predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.ones_like(y)  # (B, N)


def knn_predict(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Majority label of the k earlier points nearest in Hamming distance (earliest first on equal distance)."""
    B, N, n = x.shape
    idx = torch.arange(N)
    dist = (n - x @ x.transpose(1, 2)) / 2 + idx.view(1, 1, N) / (2 * N)  # (B, N, N); + tiny index = earliest first
    dist = dist.masked_fill(idx.view(1, 1, N) >= idx.view(1, N, 1), float("inf"))  # only j < i
    d, nb = dist.topk(min(k, N), dim=-1, largest=False)  # (B, N, k)
    votes = torch.gather(y.unsqueeze(1).expand(B, N, N), 2, nb) * torch.isfinite(d)  # (B, N, k); absent -> 0
    return torch.where(votes.sum(-1) > 0, 1.0, -1.0)


def averaging_predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """w_i = sum_{j<i} y_j x_j (the mean up to a positive factor), yhat_i = sign(x_i . w_i)."""
    w = torch.cumsum(y.unsqueeze(-1) * x, 1) - y.unsqueeze(-1) * x  # (B, N, n): exclusive prefix sums
    return torch.where((x * w).sum(-1) > 0, 1.0, -1.0)


def elimination_predict(x: torch.Tensor, y: torch.Tensor, monotone: bool = False) -> torch.Tensor:
    """Elimination algorithm for conjunctions. Literal x_j survives while no positive example has x_j = -1; literal
    not-x_j survives while no positive example has x_j = +1 (monotone: only the x_j literals exist). Predict +1 iff
    the query satisfies every surviving literal (before any positive example, x_j and not-x_j both survive -> -1)."""
    pos = (y > 0).float().unsqueeze(-1)  # (B, N, 1)
    seen_minus = torch.cumsum(pos * (x < 0), 1) - pos * (x < 0)  # (B, N, n): positives before i with x_j = -1
    seen_plus = torch.cumsum(pos * (x > 0), 1) - pos * (x > 0)
    violated = ((seen_minus == 0) & (x < 0)) | ((seen_plus == 0) & (x > 0) & (not monotone))
    return torch.where(violated.any(-1), -1.0, 1.0)


def disjunction_elimination_predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """De Morgan: f = OR of literals  <=>  -f(x) = AND of the negated literals, a conjunction in x. Learn -y."""
    return -elimination_predict(x, -y)


def gf2_predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gaussian elimination over GF(2) for parities: label bit l = b . s mod 2 with b = (x + 1) / 2 is linear in b, so
    if the query's b is a GF(2) sum of seen b's its label is the XOR of theirs; otherwise predict -1.
    Vectors are bitmasks: bits 0..n-1 hold b, bit n holds the label; basis[:, j] is the row with leading bit j."""
    B, N, n = x.shape
    bits = ((x > 0).long() * (2 ** torch.arange(n))).sum(-1)  # (B, N) int64
    lab = (y > 0).long() << n  # (B, N)
    basis = torch.zeros(B, n, dtype=torch.long)
    preds = torch.empty(B, N)

    def reduce(v: torch.Tensor) -> torch.Tensor:
        for j in range(n - 1, -1, -1):  # from the highest leading bit down, so each step only clears bit j
            use = ((v >> j) & 1).bool() & (basis[:, j] != 0)
            v = torch.where(use, v ^ basis[:, j], v)
        return v

    low = (1 << n) - 1
    for i in range(N):
        r = reduce(bits[:, i])  # the query, label bit 0: if b reduces to 0, bit n is the implied label
        preds[:, i] = torch.where(((r & low) == 0) & (((r >> n) & 1) == 1), 1.0, -1.0)
        v = reduce(bits[:, i] | lab[:, i])  # then the example joins the span
        rest = v & low
        lead = ((rest.unsqueeze(-1) >> torch.arange(n)) > 0).sum(-1) - 1  # (B,) index of the leading bit
        rows = (rest > 0).nonzero().squeeze(-1)
        basis[rows, lead[rows]] = v[rows]
    return preds


def query_only_parity_predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bayes prediction of a Parity-(n, 2) label from the query alone, ignoring every in-context example: with m ones
    among the n bits, P(y = +1) = P(exactly one of the 2 hidden bits is 1) = m (n - m) / C(n, 2)."""
    n = x.shape[-1]
    m = (x > 0).sum(-1).float()  # (B, N)
    return torch.where(m * (n - m) / math.comb(n, 2) > 0.5, 1.0, -1.0)


# DEVIATION: no GD-trained FFN per prefix, decision tree or XGBoost learners (official baselines.py)
def learners_for(task: str) -> dict[str, Callable]:
    """The baselines the paper compares with on a class, plus the class-optimal learner where there is one."""
    out = {"null": null_predict, "1-NN": lambda x, y: knn_predict(x, y, 1), "3-NN": lambda x, y: knn_predict(x, y, 3),
           "averaging": averaging_predict}
    if task == "conjunction":
        out["elimination"] = elimination_predict
    elif task == "teach_conjunction":
        out["elimination"] = lambda x, y: elimination_predict(x, y, monotone=True)
    elif task in ("disjunction", "sparse_disjunction"):
        out["elimination"] = disjunction_elimination_predict
    elif task in ("parity", "sparse_parity"):
        out["GF(2) elimination"] = gf2_predict
    if task == "sparse_parity":
        out["query-only Bayes"] = query_only_parity_predict
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 6. Evaluation: accuracy at every position (examples seen before the query)
# ---------------------------------------------------------------------------------------------------------------------
def test_prompts(task: str, args: Args) -> dict:
    gen = torch.Generator().manual_seed(TEST_SEED + TASKS.index(task))
    return sample_prompts(task, args.n_test, args.n_points, args.n_dims, gen, args.nn_start)


@torch.no_grad()
def model_predict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    logits = torch.cat([model(to_tokens(xb, yb).to(device)).cpu() for xb, yb in zip(x.split(500), y.split(500))])
    return torch.where(logits > 0, 1.0, -1.0)  # (B, N)


def summary(pred: torch.Tensor, data: dict) -> dict:
    """Accuracy per position, its mean, and for teach prompts the accuracy right after the teaching sequence."""
    correct = (pred == data["y"]).float()  # (B, N)
    out = {"curve": correct.mean(0).tolist(), "acc_mean": correct.mean().item()}
    if "n_teach" in data:
        out["acc_after_teaching"] = correct.gather(1, data["n_teach"].unsqueeze(1)).mean().item()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 7. Benchmark: reference vs fused attention at the paper's shapes, eager vs compiled training step
# ---------------------------------------------------------------------------------------------------------------------
def bench(args: Args, device: torch.device) -> dict:
    paper = PRESETS["paper"]
    B, H, T, dh = paper.batch_size, paper.n_heads, 2 * paper.n_points, paper.width // paper.n_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(B, H, T, dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    ref32 = attention_reference(q.float(), k.float(), v.float())
    err = (attention_fused(q, k, v).float() - ref32).abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    if err > tol:
        raise RuntimeError(f"fused attention differs from the reference by {err:.2e} (> {tol}) at the bench shapes")
    shape = f"B={B} H={H} T={T} d_h={dh} {str(dtype)[6:]}"
    rows = []
    for what, fn_of in [("attention fwd", lambda f: lambda: f(q, k, v)),
                        ("attention fwd+bwd", lambda f: lambda: f(q, k, v).sum().backward())]:
        rows.append({"what": f"{what} ({shape})", "reference_ms": shared.benchmark(fn_of(attention_reference), device),
                     "fused_ms": shared.benchmark(fn_of(attention_fused), device)})
    size = paper if device.type == "cuda" else args  # the whole model: the paper's size on a GPU, this run's on CPU
    p = sample_prompts("conjunction", size.batch_size, size.n_points, size.n_dims, torch.Generator().manual_seed(0))
    tokens, target = to_tokens(p["x"], p["y"]).to(device), ((p["y"] + 1) / 2).to(device)
    step_ms = []
    for compiled in (False, True):
        shared.seed_everything(0)
        model = ICLTransformer(size.n_dims, size.n_points, size.width, size.n_layers, size.n_heads,
                               ATTENTION[args.attn]).to(device)
        opt, fwd = torch.optim.Adam(model.parameters()), (torch.compile(model) if compiled else model)

        def step():
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(fwd(tokens), target).backward()
            opt.step()

        if compiled:
            print("compiling the model (tens of seconds)...", flush=True)
        step_ms.append(shared.benchmark(step, device, warmup=3, repeats=10))
    rows.append({"what": f"train step, {size.n_layers}x{size.width}, B={size.batch_size}, attn={args.attn}",
                 "reference_ms": step_ms[0], "fused_ms": step_ms[1]})
    return shared.save_bench(args, SLUG, device, rows, max_abs_err=err)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Main
# ---------------------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return shared.seed_everything(args.seed) or bench(args, device)
    t_start, attn_fn, N = time.perf_counter(), ATTENTION[args.attn], args.n_points

    def transformer(frozen_body: bool = False) -> nn.Module:
        shared.seed_everything(args.seed)  # same init stream for every model: none depends on another having run
        return ICLTransformer(args.n_dims, N, args.width, args.n_layers, args.n_heads, attn_fn, frozen_body).to(device)

    def lstm() -> nn.Module:
        shared.seed_everything(args.seed)
        return ICLLSTM(args.n_dims, args.width).to(device)

    # (name, class, builder, steps): the transformer on the claim's classes and the extras, then the comparisons
    runs = [("TF", "conjunction", transformer, args.steps), ("TF", "sparse_parity", transformer, args.parity_steps),
            ("TF", "teach_conjunction", transformer, args.teach_steps)]
    runs += [("TF", t, transformer, args.steps) for t in args.extra_tasks if t not in ("conjunction", "sparse_parity",
                                                                                        "teach_conjunction")]
    # DEVIATION: no LLM can run offline; the frozen-random-body transformer and the NN baselines stand in for
    # Sec. 5. Teach-DNF and the mixed teaching / no-teaching training are not run.
    runs += [("LSTM", "conjunction", lstm, args.lstm_steps),
             ("TF frozen body", "conjunction", lambda: transformer(frozen_body=True), args.frozen_steps)]
    history, evals, trained = [], {task: {} for task in TASKS}, {}
    for name, task, build, steps in runs:
        model = build()
        history += train(model, task, steps, args, device, f"{name}@{task}")
        trained[(name, task)] = model
    print("evaluating every model and baseline on the test prompts of each class...", flush=True)
    for task in TASKS:
        data = test_prompts(task, args)
        for name, f in learners_for(task).items():
            evals[task][name] = summary(f(data["x"], data["y"]), data)
        for (name, t), model in trained.items():
            if t == task:
                evals[task][name] = summary(model_predict(model, data["x"], data["y"], device), data)
    # the plain-trained transformer on teaching prompts: does it use the teaching sequence without training on it?
    data = test_prompts("teach_conjunction", args)
    evals["teach_conjunction"]["TF (trained on conjunction)"] = summary(
        model_predict(trained[("TF", "conjunction")], data["x"], data["y"], device), data)

    # does the parity model use its prompt at all? compare it with the predictor that reads only the query
    data = test_prompts("sparse_parity", args)
    agree = (model_predict(trained[("TF", "sparse_parity")], data["x"], data["y"], device) ==
             query_only_parity_predict(data["x"], data["y"])).float().mean().item()

    # ---- the checks --------------------------------------------------------------------------------------------
    conj, par, teach = evals["conjunction"], evals["sparse_parity"], evals["teach_conjunction"]
    last = N - 1
    tf_last, nn_last = conj["TF"]["curve"][last], conj["1-NN"]["curve"][last]
    checks = {
        f"1a. conjunction: TF accuracy at the last position ({last} examples) >= 0.90": tf_last >= 0.90,
        "1b. conjunction: TF at the last position >= 1-NN + 0.08": tf_last >= nn_last + 0.08,
        "1c. conjunction: TF mean over positions >= elimination - 0.03":
            conj["TF"]["acc_mean"] >= conj["elimination"]["acc_mean"] - 0.03,
        f"2. sparse parity ({args.n_dims}, 2): TF <= 0.60 at every position": max(par["TF"]["curve"]) <= 0.60,
    }
    claim = {"text": f"transformers learn conjunctions in context about as well as the elimination algorithm "
                     f"(n={args.n_dims}) and stay at chance on sparse parities (all checks below)",
             "passed": bool(all(checks.values())), "checks": checks}

    # ---- the tables --------------------------------------------------------------------------------------------
    show = sorted({k for k in (1, 5, 10, last) if k <= last})
    results = {f"{name}@{task}": {**{f"acc_k{k}": float(e["curve"][k]) for k in show},
                                  "acc_mean": float(e["acc_mean"]), "acc_last": float(e["curve"][last]),
                                  **({"acc_after_teaching": float(e["acc_after_teaching"])}
                                     if "acc_after_teaching" in e else {})}
               for task, models in evals.items() for name, e in models.items()}
    conj_cols = ["TF", "LSTM", "TF frozen body", "elimination", "1-NN", "3-NN", "averaging", "null"]
    print(f"\nConjunctions (n={args.n_dims}, N={N}, {args.n_test} test prompts): accuracy after k in-context examples")
    shared.print_table(["metric"] + conj_cols + ["paper"],
                       [[f"acc k={k}"] + [conj[c]["curve"][k] for c in conj_cols] + [""] for k in show] +
                       [["acc mean"] + [conj[c]["acc_mean"] for c in conj_cols] + ["TF ~ optimal; LSTM lower"]])
    results["TF@sparse_parity"]["agreement_with_query_only_Bayes"] = agree
    par_cols = ["TF", "GF(2) elimination", "query-only Bayes", "1-NN", "averaging", "null"]
    print(f"\nSparse parity Parity-({args.n_dims}, 2): accuracy after k examples (max over k in the last row)")
    shared.print_table(["metric"] + par_cols + ["paper"],
                       [[f"acc k={k}"] + [par[c]["curve"][k] for c in par_cols] + [""] for k in show] +
                       [["acc max over k"] + [max(par[c]["curve"]) for c in par_cols] + ["TF ~ 0.5 (chance)"]])
    teach_cols = ["TF", "TF (trained on conjunction)", "elimination", "1-NN", "null"]
    print("\nTeaching sequences (monotone conjunctions, prompt starts with the k+1 teaching examples)")
    shared.print_table(["metric"] + teach_cols + ["paper"],
                       [["acc right after teaching"] + [teach[c]["acc_after_teaching"] for c in teach_cols] +
                        ["TF ~ 1.0 after the teaching seq."],
                        ["acc mean"] + [teach[c]["acc_mean"] for c in teach_cols] + [""]])
    print("\nThe test-bed: accuracy averaged over positions per class (TF only where trained here; the NN columns "
          "are the level the paper finds LLMs reach, Sec. 5)")
    rows = []
    for task in TASKS:
        e = evals[task]
        opt_name = next((k for k in e if "elimination" in k), None)
        rows.append([task, e["TF"]["acc_mean"] if "TF" in e else "-", e[opt_name]["acc_mean"] if opt_name else "-",
                     e["1-NN"]["acc_mean"], e["3-NN"]["acc_mean"], e["averaging"]["acc_mean"], e["null"]["acc_mean"]])
    shared.print_table(["class", "TF", "optimal (elim.)", "1-NN", "3-NN", "averaging", "null"], rows, claim)
    for check, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {check}")
    print(f"  (reported, not gated) LSTM mean {conj['LSTM']['acc_mean']:.3f} vs TF {conj['TF']['acc_mean']:.3f}; "
          f"frozen-body TF mean {conj['TF frozen body']['acc_mean']:.3f}; teach TF right after teaching "
          f"{teach['TF']['acc_after_teaching']:.3f}; the parity TF's predictions equal the query-only Bayes "
          f"predictor's on {agree:.1%} of the test queries")

    plot(evals, args)
    key = {"metric": "acc_mean", "method": "TF@conjunction", "baseline": "elimination@conjunction",
           "higher_is_better": True}
    # DEVIATION: the paper's findings as stated in its text, not numbers re-read from Table 1
    paper_numbers = {"conjunction": "Transformers near the optimal learner (Table 1, n=28, N=40)",
                     "parity": "all architectures ~ 50% (Table 1)",
                     "teaching": "~100% right after the k+1 teaching examples (Sec. 4)",
                     "LLMs": "LLaMA-2 / GPT-4 ~ nearest-neighbour baselines (Sec. 5)"}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=paper_numbers, history=history,
                               curves={t: {m: e["curve"] for m, e in v.items()} for t, v in evals.items()},
                               wall_s=time.perf_counter() - t_start)


def plot(evals: dict, args: Args) -> None:
    """The paper's accuracy-vs-examples plots (Figs. 2-4), one panel per trained class."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if "TF" in evals[t]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, e in evals[task].items():
            learned = name.startswith(("TF", "LSTM"))
            ax.plot(range(args.n_points), e["curve"], ls="-" if learned else "--", marker="o" if learned else None,
                    ms=3, label=name)
        ax.set(title=task + (" (teaching examples first)" if task.startswith("teach") else ""), ylabel="accuracy",
               xlabel="in-context examples before the query", ylim=(0.0 if task.startswith("teach") else 0.3, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(shared.run_path(args, SLUG, ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
