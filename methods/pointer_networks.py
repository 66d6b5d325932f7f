"""Pointer Networks (Vinyals, Fortunato, Jaitly, NeurIPS 2015)
arXiv:1506.03134 (section numbers below follow v2)  https://arxiv.org/abs/1506.03134
Official code: none released (the authors' generated data files are referred to by --data-dir).

The method: an LSTM encoder reads the points P_1..P_n, an LSTM decoder writes the answer, and the additive
attention scores u_j = v^T tanh(W1 e_j + W2 d_i) over the encoder states ARE the output distribution: the
decoder points at an input position instead of choosing from a fixed vocabulary, so one network serves any n.

Reproduces: Ptr-Net trained on convex hulls of n in 5..10 points still draws valid, near-complete hulls at
n=20, a length it never saw; on planar TSP (n in 5..8, exact targets) greedy Ptr-Net tours are within ~2% of
optimal and beat nearest neighbour. Trained and tested at n=50 (Table 1's head-to-head), seq2seq + attention,
which must name each point from a fixed 50-word vocabulary and reads back the word it emitted (Sec. 2.1), stays
at 0-0.1% exact (91-99% invalid polygons) for all of 8000 steps on seeds 0 and 1, while the Ptr-Net climbs to
21% by 1000 steps and 41-42% by 6000-7000: the 20+ points asked (paper, converged: 72.6% vs 38.9%) hold from
1000 steps on in the longer runs of Expected. The default's 400 steps are too few to show it, and its verdict is
DOES NOT HOLD: the Ptr-Net is itself at 13-15% there, 13-15 points ahead. A baseline that instead reads the
coordinates of the point it named (--s2s-input point, the Ptr-Net's own input; this file's baseline until
2026-11-27) leaves its plateau after ~550 steps and then keeps pace with the Ptr-Net (Deviation 6).
CPU scale, data generated in the file.

Run:  python methods/pointer_networks.py                            # default: CPU, 3-6 min on 2 cores
      python methods/pointer_networks.py --preset smoke             # seconds, same code path
      python methods/pointer_networks.py --preset paper --device cuda   # hidden 512, n in 5..50, 100k steps
      python methods/pointer_networks.py --attn reference           # literal per-step pointer scores
      python methods/pointer_networks.py --bench                    # reference vs fused, eager vs compile
      python methods/pointer_networks.py --data-dir DIR             # test on the authors' files
      python methods/pointer_networks.py --hull-compare-steps 8000 --hull-compare-test-every 1000
                                                                    # the long head-to-head (~1 h, Expected)
      python methods/pointer_networks.py --s2s-input point          # the baseline reads points, not symbols
      python methods/pointer_networks.py --help

Expected (default preset, seed 0, 2 threads: 384 s of run time on a quiet 2-core CPU that ran the previous
version of this file (the point-reading baseline, Deviation 6) in 365 s; earlier 2-core machines ran that version in
173-205 s, so expect 3-6 min. Another thread count moves the numbers by about a seed's spread, and the Ptr-Net
rows of 2-thread runs have differed between machines in the last digit, e.g. 60.1 / 12.9 at n=10 / 50):
  | metric (hull: exact % / area)    | Ptr-Net                      | baselines                             | paper (card, unverified)              |
  |----------------------------------|------------------------------|---------------------------------------|---------------------------------------|
  | hull n=5 (trained 5-10)          | 80.4 / 0.986 (0.8% inv)      | -                                     | 92.0 / 0.996 (trained 5-50)           |
  | hull n=10 (trained 5-10)         | 59.8 / 0.993 (1.2% inv FAIL) | -                                     | 87.0 / 0.998 (trained 5-50)           |
  | hull n=20 (trained 5-10)         | 26.3 / 0.989 (2.6% inv FAIL) | -                                     | -                                     |
  | hull n=30 (trained 5-10)         | 10.3 / 0.983 (5.9% inv FAIL) | -                                     | -                                     |
  | hull n=50 (trained 5-10)         | 1.6 / 0.979 (20.7% inv FAIL) | -                                     | 69.6 / 0.999 (trained 5-50)           |
  | hull n=50 (both trained at n=50) | 12.8 / 0.989 (3.5% inv FAIL) | s2s+attn 0.0 / 0.260 (94.6% inv FAIL) | 72.6 / 0.999 vs s2s+attn 38.9 / 0.997 |
  | tsp n=5: tour (opt / NN / FI)    | 2.137 (+0.6%)                | 2.125 / 2.205 / 2.126                 | 2.12 (opt 2.12)                       |
  | tsp n=8: tour (opt / NN / FI)    | 2.664 (+2.2%)                | 2.606 / 2.832 / 2.616                 | -                                     |
  | tsp n=10: tour (opt / NN / FI)   | 2.992 (+3.8%)                | 2.882 / 3.201 / 2.902                 | 2.88 (opt 2.87)                       |
  CLAIM DOES NOT HOLD: trained and tested at n=50, Ptr-Net beats seq2seq+attn on convex hulls by 20+ points;
  trained on n=5-10, it still draws valid hulls at n=20; its TSP tours are near-optimal (all checks below).
  Failed: n=50 (both trained at n=50) exact acc over seq2seq+attn +12.8 points >= +20. (The other eight checks
  hold: n=10 acc 59.8% >= 40%, area 0.993 >= 0.97; n=50 area 0.989 > seq2seq+attn's 0.260; n=20 valid 97.4%
  >= 95%, area 0.989 >= 0.95; TSP gap 0.6% <= 2% at n=5, 2.2% <= 4% at n=8; shorter than NN.)
  Seeds 1 / 2 (1 thread each, run side by side, 561 / 548 s here): n=50 head-to-head 15.3% vs 0.0% (98.3%
  invalid) / 14.1% vs 0.0% (97.2% invalid); n=10 57.9% / 59.7%; n=20 97.4% / 97.6% valid, area 0.988 / 0.989;
  TSP gap +0.7% / +0.5% (n=5), +2.2% / +2.2% (n=8). The same single check (the +20-point margin) fails on all
  three seeds; every other check holds.
  Longer head-to-head (1 thread; `--hull-compare-steps 8000 --hull-compare-test-every 1000`, or an exact copy of
  its loop with checkpoints, ~1 h per model), exact % at n=50 (seq2seq+attn: 91-99% invalid at every checkpoint):
    step                      1000  2000  3000  4000  5000  6000  7000  8000
    Ptr-Net, seed 0           21.1  27.4  29.4  35.5  35.4  38.5  42.2  40.8   (0.7-1.9% invalid)
    seq2seq+attn, seed 0       0.0   0.0   0.0   0.0   0.0   0.0   0.0   0.0
    Ptr-Net, seed 1              -  24.8     -  37.7     -  41.6     -     -
    seq2seq+attn, seed 1       0.0   0.0   0.0   0.0   0.0   0.0   0.0   0.1
  The baseline's training loss falls slowly (seed 0: 3.41 / 2.92 / 2.26 / 1.89 / 1.70 nats at 1000 / 2000 / 4000 /
  6000 / 8000 steps; the Ptr-Net's is 0.53 at 400): it has learned to emit hull-like sequences of symbols
  (the few valid ones cover 0.85-0.88 of the hull at 6000-7000 steps) but not yet which input each symbol names.
  8000 steps are 1.0M fresh examples, as many as the paper's training set. Where it ends (the paper: 38.9%,
  converged) is beyond a CPU run.
  The baseline of earlier versions, --s2s-input point (the decoder reads P_{C_{i-1}}), seed 0, Adam, same runs:
    step                      1000  2000  3000  4000  5000  6000  7000  8000 | 10000 12000 14000 16000
    seq2seq+attn, point input 13.7  24.1  29.1  32.7  36.1  37.9  39.1  38.0 |  41.8  43.7  47.0  44.2
    Ptr-Net                   (as above)                                      |  40.3  42.9  44.2  43.8
  Its loss sits at 3.3-3.5 nats for ~550 steps and then falls fast. On seed 0 the two are within 4 points from
  2000 steps on; on seed 1 the Ptr-Net leads by 8 at 4000-6000 (24.0 / 29.7 / 33.5 vs 24.8 / 37.7 / 41.6 at
  2000 / 4000 / 6000). Without the used-point mask (--no-mask-used, both models, 6000 steps) both are a little
  lower and still level. With the paper's SGD at lr 1.0 (--optimizer sgd --lr 1.0) its plateau lasts 6000-7000
  steps and the Ptr-Net leads by 7 to 12 points from 12000 steps on (seed 0, 16000 steps: 40.3 vs 28.8; seed 1,
  12000: 27.1 vs 20.1).

Implementation details:
  1. Encoder and decoder are single-layer LSTMs; each point (x, y) enters through one shared linear embedding
     (Deviation 2). The decoder starts from the encoder's final state; its input at step i is the point
     chosen at step i-1, a learned "go" point at step 1 (Sec. 2.3, Fig. 1b). Uniform(-0.08, 0.08) init,
     gradient-norm clip 2.0, batch 128 (Sec. 4).
  2. End of sequence: a learned vector e_0 is prepended to the encoder states; pointing at index 0 ends the
     hull. TSP has a fixed length n and never points at 0.
  3. Canonical targets: hull = Andrew's monotone chain, started at the lowest input index, counter-clockwise;
     TSP = exact tour (brute force n<=7, vectorised Held-Karp n<=12) from city 1, in the direction whose 2nd
     city has the smaller index. Variable n inside a batch: encoder packing + masked (padded) keys.
  4. Loss = mean negative log-likelihood of the target indices under teacher forcing (Sec. 2.1, Eq. 1).
     Indices already emitted are masked out of the softmax in training and in greedy decoding.
  5. Baseline = Sec. 2.2 "content based input attention": same point embedding and encoder, an LSTM decoder
     whose input at step i is a learned embedding of the symbol it emitted at step i-1 (a start symbol at step 1;
     Sec. 2.1: the decoder produces and conditions on output symbols), that feeds [d_i; d'_i] to its next step,
     and a softmax over a FIXED vocabulary {EOS, 1..n_vocab}, n_vocab = --hull-compare-n. Classes above the
     instance's n and already-emitted classes are masked exactly like the pointer's keys (a fair fight); it has
     no class for inputs numbered above n_vocab, so it cannot be run at a longer n at all. It and a second Ptr-Net
     are trained at exactly n = --hull-compare-n (50, as Table 1's "trained 50, tested 50" rows) from the same
     seed and the same example stream, for the same steps.
  6. Metrics: exact-sequence accuracy; area = shoelace area of the predicted polygon / true hull area, averaged
     over valid outputs; an output is invalid if it has < 3 points, repeats one, or self-intersects. Paper's
     rule: > 1% invalid -> FAIL. TSP: mean tour length vs the exact optimum, nearest neighbour (NN) and
     farthest insertion (FI) from city 1 -- stand-ins: the paper's A1/A2/A3 are not specified beyond cost.
  7. The paper column is the project card's recollection of Tables 1-2 (not re-checked against the PDF); its
     hull rows are the Ptr-Net trained on n in 5..50, so they are a ceiling, not a like-for-like number.
  8. With --no-mask-used (the paper's unconstrained hull decoding) seed 0 gave 55.0% vs 52.8% at n=10 (1500
     steps, both trained on n in 5..10, an earlier version of this file): the masking is not what closes the
     gap to the baseline at n=10.
  9. attention_fused scores all teacher-forced steps in one (B,m,N,d) broadcast: one kernel per op instead of
     m on a GPU. On CPU it is NOT faster (--bench, 1 thread, B=32 m=20 N=51 d=128: forward 25 ms vs 5.9 ms,
     forward+backward 26 vs 21 ms; a training step ~15% slower) because the 4-D intermediate leaves the cache;
     torch.compile of it gave no gain either. The pointer scores are a small part of a training step.

Deviations from the paper:
  1. Adam (lr 2e-3) instead of SGD lr 1.0; --optimizer sgd --lr 1.0 gives the paper's recipe.
  2. The LSTMs read a linear embedding of (x, y) (default PyTorch init) instead of the raw coordinates. The
     function class is the same (the LSTM input map is linear), but with raw inputs Adam sat for thousands
     of steps on a TSP plateau that emits the cities in index order.
  3. Fresh generated examples every step instead of a fixed set of 1M; hidden 128 and 2000 / 400 / 1200 steps
     (hull 5..10 / hull head-to-head at n=50 / TSP) instead of 256/512 units trained to convergence; training
     n in 5..10 (hull) / 5..8 (TSP). The head-to-head therefore compares two models early in training, not
     converged ones (see Deviation 6).
  4. Greedy decoding (the paper used beam search) with already-used indices masked for the hull too; the paper
     constrained only TSP decoding (--no-mask-used turns it off for the hull).
  5. Delaunay triangulation (Sec. 4.3) is not reproduced.
  6. The head-to-head with seq2seq + attention is run where the paper ran it, both models trained and tested at
     n=50 (Table 1: LSTM 1.9%, +attention 38.9%, Ptr-Net 72.6%), and not at n=10 as the project card's check asked
     ("Ptr-Net >= seq2seq+attn + 20 points at n=10"): Table 1, as the card recalls it (the PDF's tables could not
     be read here), has no +attention row at n=10; its n=10 baseline is the plain LSTM, 29.9%, FAIL. The card's
     +20-point bar is kept, at n=50. The default's 400 steps cannot meet it whatever the baseline does: the
     Ptr-Net needs ~1000 steps to pass 20% (600 more steps per model, ~5 min more on this 2-core machine).
     What the seq2seq decoders read is not spelled out; Sec. 2.3 says of the Ptr-Net that "to condition on
     C_{i-1} ... we simply copy the corresponding P_{C_{i-1}} as the input" (as a reader's notes quote it; the
     PDF could not be read here), which presents copying the point as part of the Ptr-Net, so the baseline here
     reads its own previous symbol, as the decoders of the paper's refs [1] (Sutskever et al.) and [5]
     (Bahdanau et al.) do. Until 2026-11-27 this file's baseline read P_{C_{i-1}} instead (--s2s-input
     point); that hybrid gets the Ptr-Net's input, not its output layer, and it was a different baseline: at
     n=10 (both trained on n in 5..10, 2000 steps, seeds 0 / 1 / 2) it matched the Ptr-Net, 58.0 / 59.9 / 55.6
     vs 60.1 / 57.8 / 59.6, and at n=50 it reached 44.2% by 16000 steps, above the paper's converged 38.9%
     (Expected). With the paper's SGD its plateau lasted longer and the Ptr-Net stayed 7-12 points ahead.
     The area check is the paper's ordering at n=50 (99.9% vs 99.7%); the symbol-reading baseline's few valid
     polygons cover 0.26 (default) to 0.88 of the hull up to 8000 steps.
"""

import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "pointer_networks"
PAPER = "Pointer Networks"
ARXIV = "1506.03134"


# ----------------------------------------------------------------------------------------------- 1. Args
@dataclass
class Args:
    """Pointer Networks on the planar convex hull and planar TSP, against seq2seq + attention and heuristics."""

    preset: str = "default"
    """name of the preset (set by --preset); names the output files"""
    seed: int = 0
    """seed of the weights and the training stream (test sets use --test-seed)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    attn: Literal["fused", "reference"] = "fused"
    """pointer scores: all decoder steps in one broadcast (fused) or the literal per-step formula (reference)"""
    compile: bool = False
    """torch.compile each model's training loss (slow to start on CPU)"""
    bench: bool = False
    """only time reference vs fused scores and an eager vs compiled training step"""
    out_dir: str = "runs"
    """where pointer_networks__<preset>__s<seed>.json and .png are written"""
    data_dir: Optional[str] = None
    """folder with the authors' files convex_hull_<n>_test.txt / tsp<n>_test.txt / tsp_<n>_test.txt; they
    replace the generated test sets for the n they hold (training stays on generated data)"""
    hidden: int = 128
    """LSTM hidden size (paper: 256 or 512)"""
    batch_size: int = 128
    """examples per step (paper: 128)"""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam, or the paper's plain sgd (use with --lr 1.0)"""
    lr: float = 2e-3
    """learning rate"""
    clip: float = 2.0
    """L2 gradient-norm clipping (paper: 2.0)"""
    hull_steps: int = 2000
    """training steps of the hull Ptr-Net trained on n in hull_n_min..hull_n_max (the length-generalisation run)"""
    hull_compare_n: int = 50
    """head-to-head: Ptr-Net and seq2seq + attention are both trained and tested at this one n (Table 1: 50)"""
    hull_compare_steps: int = 400
    """training steps of each head-to-head model (both get the same steps and the same examples)"""
    hull_compare_test_every: int = 0
    """score both head-to-head models on the n=hull_compare_n test set every this many steps (0: only at the end);
    the scores join the history and the figure, and do not touch the training stream"""
    tsp_steps: int = 1200
    """training steps of the TSP Ptr-Net"""
    hull_n_min: int = 5
    """fewest points in a training hull instance"""
    hull_n_max: int = 10
    """most points in a training hull instance of the length-generalisation run"""
    hull_test_ns: tuple[int, ...] = (5, 10, 20, 30, 50)
    """hull test lengths; must hold hull_n_max and 2*hull_n_max (the claim's two lengths)"""
    tsp_n_min: int = 5
    """fewest cities in a training TSP instance (claim: within 2% of optimal at this n)"""
    tsp_n_max: int = 8
    """most cities in a training TSP instance (claim: within 4% of optimal at this n)"""
    tsp_test_ns: tuple[int, ...] = (5, 8, 10)
    """TSP test sizes (exact optimum by Held-Karp, so at most 12)"""
    n_test: int = 1000
    """test instances per n"""
    test_seed: int = 1234
    """seed of the test sets, fixed so every training seed is scored on the same instances"""
    mask_used: bool = True
    """hull: forbid pointing at an already chosen point (TSP decoding always forbids revisits)"""
    s2s_input: Literal["symbol", "point"] = "symbol"
    """what the seq2seq+attn decoder reads at step i: an embedding of its previous output symbol C_{i-1}
    (Sec. 2.1), or the coordinates of the point P_{C_{i-1}} that symbol names (Sec. 2.3's Ptr-Net device)"""


PRESETS = {
    "smoke": Args(preset="smoke", hidden=16, batch_size=8, hull_steps=3, tsp_steps=3, hull_test_ns=(5, 10, 20),
                  hull_compare_n=10, hull_compare_steps=3, tsp_n_max=6, tsp_test_ns=(5, 6), n_test=12),
    "paper": Args(preset="paper", hidden=512, batch_size=128, hull_steps=100_000, tsp_steps=100_000,
                  hull_compare_steps=100_000, hull_n_max=50, hull_test_ns=(5, 10, 50, 100, 200, 500), tsp_n_max=10,
                  tsp_test_ns=(5, 10)),
}
MAX_EXACT_TSP = 12  # Held-Karp memory grows as 2^n; 12 cities is a few hundred MB per 1000 instances at most


def validate(args: Args) -> None:
    if args.hidden <= 0:
        raise shared.UsageError("--hidden must be a positive number of LSTM units.")
    if min(args.batch_size, args.hull_steps, args.hull_compare_steps, args.tsp_steps, args.n_test) <= 0 or \
            args.lr <= 0 or args.clip <= 0:
        raise shared.UsageError("--batch-size, --*-steps, --n-test, --lr and --clip must be positive.")
    if args.hull_compare_test_every < 0:
        raise shared.UsageError("--hull-compare-test-every must be 0 (off) or a positive number of steps.")
    if args.hull_n_min < 3 or args.tsp_n_min < 3:
        raise shared.UsageError("--hull-n-min and --tsp-n-min must be at least 3 points (a polygon needs 3).")
    if args.hull_n_max < args.hull_n_min or args.tsp_n_max < args.tsp_n_min:
        raise shared.UsageError("the training range is empty: a --*-n-max is below its --*-n-min.")
    if not {args.hull_n_max, 2 * args.hull_n_max} <= set(args.hull_test_ns):
        raise shared.UsageError(f"--hull-test-ns must hold {args.hull_n_max} and {2 * args.hull_n_max}, "
                                "the claim's in-range and longer-than-trained lengths.")
    if args.hull_compare_n not in args.hull_test_ns:
        raise shared.UsageError(f"--hull-test-ns must hold --hull-compare-n {args.hull_compare_n}, the length at "
                                "which Ptr-Net and seq2seq+attn are trained and compared.")
    if not {args.tsp_n_min, args.tsp_n_max} <= set(args.tsp_test_ns):
        raise shared.UsageError("--tsp-test-ns must hold --tsp-n-min and --tsp-n-max (the claim's sizes).")
    if min(args.hull_test_ns) < args.hull_n_min or min(args.tsp_test_ns) < args.tsp_n_min:
        raise shared.UsageError("a test n is below the training minimum n; test lengths must be >= it.")
    if max(args.tsp_test_ns + (args.tsp_n_max,)) > MAX_EXACT_TSP:
        raise shared.UsageError(f"TSP n above {MAX_EXACT_TSP} has no exact optimum here (Held-Karp is capped).")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise shared.UsageError(f"--data-dir {args.data_dir} is not a folder.")


# ----------------------------------------------------------------------------------------------- 2. Data
def convex_hull(pts: np.ndarray) -> list[int]:
    """Andrew's monotone chain: 0-based hull vertex indices, counter-clockwise, starting at the lowest index."""
    xy = pts.tolist()
    order = sorted(range(len(xy)), key=lambda i: xy[i])  # by x, then y

    def chain(seq):  # keep only left turns: cross((b - a), (c - a)) > 0
        out = []
        for i in seq:
            while len(out) >= 2:
                (ax, ay), (bx, by), (cx, cy) = xy[out[-2]], xy[out[-1]], xy[i]
                if (bx - ax) * (cy - ay) - (by - ay) * (cx - ax) > 0:
                    break
                out.pop()
            out.append(i)
        return out[:-1]  # the last point starts the other chain

    hull = chain(order) + chain(order[::-1])  # lower chain left->right, upper chain right->left = CCW
    k = hull.index(min(hull))
    return hull[k:] + hull[:k]


def distances(pts: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pts[:, :, None] - pts[:, None], axis=-1)  # (B,n,2) -> (B,n,n)


def tour_length(pts: np.ndarray, tours: np.ndarray) -> np.ndarray:
    """pts (B,n,2), tours (B,n) 0-based -> closed tour lengths (B,)."""
    p = np.take_along_axis(pts, tours[..., None], 1)  # (B,n,2) in visiting order
    return np.linalg.norm(p - np.roll(p, -1, 1), axis=-1).sum(-1)


def canonical_tours(tours: np.ndarray) -> np.ndarray:
    """Tours start at city 0 already; reverse the rest where the 2nd city has a larger index than the last."""
    flip = tours[:, 1] > tours[:, -1]
    tours[flip, 1:] = tours[flip, 1:][:, ::-1]
    return tours


def tsp_brute_force(pts: np.ndarray) -> np.ndarray:
    """Exact tours by enumerating the (n-1)!/2 tours from city 0 (one direction each). pts (B,n,2) -> (B,n)."""
    n = pts.shape[1]
    perms = np.array([p for p in itertools.permutations(range(1, n)) if p[0] < p[-1]])  # (P,n-1)
    cand = np.concatenate([np.zeros((len(perms), 1), int), perms], 1)  # (P,n)
    D = distances(pts)  # (B,n,n)
    lengths = D[:, cand, np.roll(cand, -1, 1)].sum(-1)  # (B,P)
    return cand[lengths.argmin(1)].copy()


def tsp_held_karp(pts: np.ndarray) -> np.ndarray:
    """Exact tours by the Held-Karp DP over subsets, vectorised over the batch. pts (B,n,2) -> (B,n).
    dp[S, j] = shortest path that leaves city 0, visits exactly the cities in S (bits over 1..n-1), ends at j."""
    B, n, _ = pts.shape
    k, D = n - 1, distances(pts)  # D (B,n,n)
    sub = D[:, 1:, 1:]  # (B,k,k) distances among cities 1..n-1
    dp, parent = np.full((B, 1 << k, k), np.inf), np.zeros((B, 1 << k, k), np.int64)
    for j in range(k):
        dp[:, 1 << j, j] = D[:, 0, j + 1]
    masks = np.arange(1 << k)
    size = np.array([bin(s).count("1") for s in masks])
    for s in range(2, k + 1):
        for j in range(k):
            ms = masks[(size == s) & ((masks >> j) & 1 == 1)]  # sets of size s that end at j
            cand = dp[:, ms ^ (1 << j), :] + sub[:, None, :, j]  # (B,|ms|,k): come from i, then i -> j
            parent[:, ms, j] = cand.argmin(-1)
            dp[:, ms, j] = cand.min(-1)
    rows, S = np.arange(B), np.full(B, (1 << k) - 1)
    j = (dp[:, -1, :] + D[:, 1:, 0]).argmin(-1)  # last city before returning to 0
    back = []
    for _ in range(k):
        back.append(j + 1)
        j, S = parent[rows, S, j], S ^ (1 << j)
    return canonical_tours(np.stack([np.zeros(B, int)] + back[::-1], 1))


def tsp_optimal(pts: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Exact canonical tours: brute force where it is cheaper (n <= 7), else Held-Karp, in chunks."""
    solve = tsp_brute_force if pts.shape[1] <= 7 else tsp_held_karp
    return np.concatenate([solve(pts[i:i + chunk]) for i in range(0, len(pts), chunk)])


def nearest_neighbour(pts: np.ndarray) -> np.ndarray:
    """Greedy tours from city 0: always go to the closest unvisited city. (B,n,2) -> (B,n)."""
    B, n, _ = pts.shape
    D, tour, seen, rows = distances(pts), [np.zeros(B, int)], np.zeros((B, n), bool), np.arange(B)
    seen[:, 0] = True
    for _ in range(n - 1):
        nxt = np.where(seen, np.inf, D[rows, tour[-1]]).argmin(1)
        seen[rows, nxt] = True
        tour.append(nxt)
    return np.stack(tour, 1)


def farthest_insertion(pts: np.ndarray) -> np.ndarray:
    """Farthest insertion from city 0: add the city farthest from the tour where it lengthens the tour least."""
    B, n, _ = pts.shape
    D, rows = distances(pts), np.arange(B)
    tour = np.stack([np.zeros(B, int), D[:, 0].argmax(1)], 1)  # (B,2) city 0 and the city farthest from it
    for _ in range(n - 2):
        inside = np.zeros((B, n), bool)
        inside[rows[:, None], tour] = True
        gap = np.where(inside, -np.inf, D[rows[:, None], :, tour].min(1))  # (B,n) distance to the tour
        c = gap.argmax(1)  # the farthest city
        a, b = tour, np.roll(tour, -1, 1)
        extra = D[rows[:, None], a, c[:, None]] + D[rows[:, None], c[:, None], b] - D[rows[:, None], a, b]
        pos = extra.argmin(1) + 1  # insert after edge (a, b)
        tour = np.stack([np.insert(t, p, cc) for t, p, cc in zip(tour, pos, c)])
    return tour


def make_batch(task: str, rng: np.random.Generator, B: int, n_min: int, n_max: int):
    """Fresh examples: points (B,n_max,2) zero-padded, lengths (B,), targets (B,m) 1-based pointer indices
    (0 = EOS / padding) and tmask (B,m) True on real target steps."""
    ns = rng.integers(n_min, n_max + 1, size=B)
    pts = rng.random((B, n_max, 2)) * (np.arange(n_max)[None, :, None] < ns[:, None, None])
    if task == "hull":
        seqs = [np.array(convex_hull(pts[b, :ns[b]])) + 1 for b in range(B)]
        seqs = [np.append(s, 0) for s in seqs]  # point at e_0 = end of sequence
    else:
        seqs = [None] * B
        for n in np.unique(ns):  # exact tours, one solver call per distinct n
            idx = np.flatnonzero(ns == n)
            for b, tour in zip(idx, tsp_optimal(pts[idx, :n])):
                seqs[b] = tour + 1
    m = max(len(s) for s in seqs)
    targets, tmask = np.zeros((B, m), np.int64), np.zeros((B, m), bool)
    for b, s in enumerate(seqs):
        targets[b, :len(s)], tmask[b, :len(s)] = s, True
    return (torch.tensor(pts, dtype=torch.float32), torch.tensor(ns), torch.tensor(targets), torch.tensor(tmask))


def shoelace(poly: np.ndarray) -> float:
    """Signed area of a polygon (k,2) given in order: 1/2 sum_i (x_i y_{i+1} - x_{i+1} y_i); > 0 when CCW."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def is_simple_polygon(poly: np.ndarray) -> bool:
    """At least 3 vertices, non-zero area, and no two non-adjacent edges cross."""
    k = len(poly)
    if k < 3 or abs(shoelace(poly)) < 1e-12:
        return False
    a, b = poly, np.roll(poly, -1, 0)  # edge i runs a[i] -> b[i]

    def orient(p, q, r):  # sign of the turn p -> q -> r
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

    A, Bq, C, Dq = a[:, None], b[:, None], a[None], b[None]  # all edge pairs (k,k)
    cross = (orient(A, Bq, C) * orient(A, Bq, Dq) < 0) & (orient(C, Dq, A) * orient(C, Dq, Bq) < 0)
    gap = (np.arange(k)[None] - np.arange(k)[:, None]) % k
    return not (cross & (gap > 1) & (gap < k - 1)).any()


def read_authors_file(path: Path, task: str):
    """The authors' text format, one example per line: `x1 y1 ... xn yn output i1 ... ik` with 1-based indices
    (a cycle closed by repeating its first index). -> points (N,n,2), canonical 0-based targets."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise shared.UsageError(f"{path} is empty.")
    points, targets = [], []
    for k, line in enumerate(lines, 1):
        left, sep, right = line.partition("output")
        if not sep:
            raise shared.UsageError(f"{path} line {k} has no 'output' word between coordinates and indices.")
        try:
            xy, idx = [float(t) for t in left.split()], [int(t) for t in right.split()]
        except ValueError:
            raise shared.UsageError(f"{path} line {k} has a coordinate or index that is not a number.") from None
        n, idx = len(xy) // 2, idx[:-1] if len(idx) > 1 and idx[-1] == idx[0] else idx  # drop the closing index
        if len(xy) % 2 or n < 3:
            raise shared.UsageError(f"{path} line {k} needs an even number of coordinates for >= 3 points.")
        if points and n != len(points[0]):
            raise shared.UsageError(f"{path} line {k} has {n} points but line 1 has {len(points[0])}.")
        if not idx or min(idx) < 1 or max(idx) > n or len(set(idx)) != len(idx) or (task == "tsp" and len(idx) != n):
            raise shared.UsageError(f"{path} line {k}: output indices must be distinct, in 1..{n}"
                                    f"{' and visit every city' if task == 'tsp' else ''}.")
        P, t = np.array(xy).reshape(n, 2), [i - 1 for i in idx]
        if task == "hull" and shoelace(P[t]) < 0:  # canonical: counter-clockwise from the lowest index
            t = t[::-1]
        s = t.index(min(t))
        points.append(P)
        targets.append(t[s:] + t[:s] if task == "hull" else canonical_tours(np.array([t[s:] + t[:s]]))[0].tolist())
    return np.stack(points), targets


def make_test_sets(args: Args) -> dict:
    """{"hull": {n: (points, hull targets)}, "tsp": {n: points}}: generated from test_seed or the authors' files."""
    sets = {"hull": {}, "tsp": {}}
    for task, ns in (("hull", args.hull_test_ns), ("tsp", args.tsp_test_ns)):
        for n in ns:
            rng = np.random.default_rng([args.test_seed, n, int(task == "tsp")])
            sets[task][n] = (rng.random((args.n_test, n, 2)), None)
    if args.data_dir is not None:
        d, found = Path(args.data_dir), []
        for task, n in [("hull", n) for n in args.hull_test_ns] + [("tsp", n) for n in args.tsp_test_ns]:
            names = [f"convex_hull_{n}_test.txt"] if task == "hull" else [f"tsp{n}_test.txt", f"tsp_{n}_test.txt"]
            for f in [d / name for name in names if (d / name).is_file()][:1]:
                pts, tgt = read_authors_file(f, task)
                if pts.shape[1] != n:
                    raise shared.UsageError(f"{f} holds {pts.shape[1]}-point examples, not {n}.")
                sets[task][n] = (pts[:args.n_test], tgt[:args.n_test] if task == "hull" else None)
                found.append(f.name)
        if not found:
            raise shared.UsageError(f"--data-dir {d} holds no convex_hull_<n>_test.txt or tsp<n>_test.txt "
                                    "for the test n asked for.")
        print(f"test sets from {d}: {', '.join(found)}")
    sets["hull"] = {n: (p, t or [convex_hull(q) for q in p]) for n, (p, t) in sets["hull"].items()}
    sets["tsp"] = {n: p for n, (p, _) in sets["tsp"].items()}  # tours are re-solved exactly
    return sets


# ----------------------------------------------------------------------------------------------- 3. Model
def attention_reference(w1e, w2d, v, mask):
    """Sec. 2.3: u^i_j = v^T tanh(W1 e_j + W2 d_i);  p(C_i = j | C_<i, P) = softmax_j(u^i_j), literally, one
    decoder step at a time. w1e (B,N,d) = W1 e_j; w2d (B,m,d) = W2 d_i; v (d,); mask (B,m,N) bool, True = may
    point (every row needs one True). Returns log-probabilities (B,m,N)."""
    out = []
    for i in range(w2d.shape[1]):
        u = torch.tanh(w1e + w2d[:, i:i + 1, :]) @ v  # (B,N) u^i_j
        u = u.masked_fill(~mask[:, i], float("-inf"))  # (B,N) padding / used / EOS rules
        out.append(torch.log_softmax(u, dim=-1))  # (B,N)
    return torch.stack(out, 1)  # (B,m,N)


def attention_fused(w1e, w2d, v, mask):
    """The same function for all m decoder steps in one broadcast (teacher forcing knows every d_i at once)."""
    u = torch.tanh(w1e[:, None, :, :] + w2d[:, :, None, :]) @ v  # (B,m,N,d) -> (B,m,N)
    return torch.log_softmax(u.masked_fill(~mask, float("-inf")), dim=-1)  # (B,m,N)


ATTENTION = {"fused": attention_fused, "reference": attention_reference}


def encode(lstm: nn.LSTM, x, lengths):
    """Run the encoder over the first lengths[b] inputs of each row (packing, so padding never enters the
    state). x (B,n,d) -> states (B,n,d) (zeros on padding), final (h, c) each (1,B,d)."""
    if bool((lengths == x.shape[1]).all()):
        return lstm(x)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = lstm(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], state


def allowed_masks(lengths, targets, tmask, N: int, eos: bool, mask_used: bool):
    """(B,m,N) bool, True where step i may point at index j: a real point (1..n_b) or EOS (0, hull only),
    not already emitted (mask_used), and every index on padded steps (never an empty row)."""
    B, m = targets.shape
    j = torch.arange(N, device=targets.device)
    ok = (j >= 1) & (j <= lengths[:, None]) | ((j == 0) & eos)  # (B,N)
    ok = ok[:, None, :].expand(B, m, N)
    if mask_used:
        hit = F.one_hot(targets, N) * tmask[..., None]  # (B,m,N) index emitted at step i
        hit[..., 0] = 0  # EOS is never "used up"
        ok = ok & ((hit.cumsum(1) - hit) == 0)  # used before step i
    return ok | ~tmask[..., None]


def previous_points(points, targets, go):
    """Decoder inputs under teacher forcing: [go, P_{C_1}, ..., P_{C_{m-1}}] -> (B,m,2)."""
    idx = (targets[:, :-1] - 1).clamp(min=0)  # (B,m-1) 0-based; EOS/padding slots are never read by the loss
    prev = torch.gather(points, 1, idx[..., None].expand(-1, -1, 2))  # (B,m-1,2)
    return torch.cat([go.expand(points.shape[0], 1, 2), prev], 1)  # (B,m,2)


def init_uniform(module: nn.Module) -> None:
    for p in module.parameters():  # Sec. 4: "uniform random weights in [-0.08, 0.08]"
        nn.init.uniform_(p, -0.08, 0.08)
    # DEVIATION: the point embedding keeps PyTorch's default init, U(-1/sqrt(2), 1/sqrt(2)). With raw (x, y)
    # in [0, 1] (or an embedding at +-0.08) Adam sat for thousands of steps on a TSP plateau that emits
    # cities in index order; the paper's SGD at lr 1.0 takes far larger steps than Adam does.
    module.embed.reset_parameters()


class PointerNet(nn.Module):
    """Sec. 2.3: LSTM encoder, LSTM decoder, and the pointer distribution over the n (+EOS) inputs."""

    def __init__(self, hidden: int, attn_fn, eos: bool, mask_used: bool = True):
        super().__init__()
        self.attn_fn, self.eos, self.mask_used = attn_fn, eos, mask_used or not eos  # TSP never revisits
        self.embed = nn.Linear(2, hidden)  # DEVIATION: (x, y) -> LSTM input, shared by encoder and decoder
        self.encoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.W1 = nn.Linear(hidden, hidden, bias=False)  # W1 e_j
        self.W2 = nn.Linear(hidden, hidden, bias=False)  # W2 d_i
        self.v = nn.Parameter(torch.empty(hidden))  # v
        self.e0 = nn.Parameter(torch.empty(hidden))  # learned encoder state at index 0 = "end of sequence"
        self.go = nn.Parameter(torch.empty(2))  # decoder input at step 1 (a learned "point")
        init_uniform(self)

    def encode(self, points, lengths):
        e, state = encode(self.encoder, self.embed(points), lengths)  # (B,n,d)
        e = torch.cat([self.e0.expand(len(points), 1, -1), e], 1)  # (B,N=n+1,d), index j = point P_j
        return self.W1(e), state  # W1 e_j once per example, reused by every decoder step

    def forward(self, points, lengths, targets, tmask):
        """Teacher-forced training loss: mean over target steps of -log p(C_i | C_<i, P) (Eq. 1)."""
        w1e, state = self.encode(points, lengths)  # (B,N,d)
        d, _ = self.decoder(self.embed(previous_points(points, targets, self.go)), state)  # (B,m,d) all d_i
        mask = allowed_masks(lengths, targets, tmask, w1e.shape[1], self.eos, self.mask_used)  # (B,m,N)
        logp = self.attn_fn(w1e, self.W2(d), self.v, mask)  # (B,m,N) the pointer distribution
        return -logp.gather(-1, targets[..., None])[..., 0][tmask].mean()

    @torch.no_grad()
    def decode(self, points, lengths):
        w1e, state = self.encode(points, lengths)

        def step(x, prev, ok):  # x (B,2) previous point -> pointer log-probs (B,N) over what `ok` allows
            nonlocal state
            d, state = self.decoder(self.embed(x)[:, None], state)  # (B,1,d)
            return self.attn_fn(w1e, self.W2(d), self.v, ok[:, None])[:, 0]
        return greedy_decode(step, self.go, points, lengths, points.shape[1] + 1, self.eos, self.mask_used)


class Seq2SeqAttention(nn.Module):
    """Sec. 2.2 baseline: u^i_j = v^T tanh(W1 e_j + W2 d_i), a^i = softmax(u^i), d'_i = sum_j a^i_j e_j;
    [d_i; d'_i] predicts from a FIXED vocabulary {EOS, 1..n_vocab} and is fed to the next decoder step.
    Its decoder conditions on C_{i-1} the seq2seq way (Sec. 2.1), through an embedding of the output SYMBOL it
    emitted; copying the point P_{C_{i-1}} in as the input is Sec. 2.3's Ptr-Net device (dec_input="point")."""

    def __init__(self, hidden: int, attn_fn, n_vocab: int, mask_used: bool = True,
                 dec_input: Literal["symbol", "point"] = "symbol"):
        super().__init__()
        self.attn_fn, self.n_vocab, self.mask_used, self.dec_input = attn_fn, n_vocab, mask_used, dec_input
        self.embed = nn.Linear(2, hidden)
        self.encoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.cell = nn.LSTMCell(3 * hidden, hidden)  # input: previous output (embedded) and previous [d; d']
        self.W1 = nn.Linear(hidden, hidden, bias=False)
        self.W2 = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Parameter(torch.empty(hidden))
        self.out = nn.Linear(2 * hidden, n_vocab + 1)  # class 0 = EOS, class j = "input number j"
        self.go = nn.Parameter(torch.empty(2))  # step-1 input point; unused with symbols, kept so both modes init alike
        init_uniform(self)
        self.start_symbol = n_vocab + 1  # Sec. 2.1's "=>"; rows 1..n_vocab of the table are the output symbols
        if dec_input == "symbol":
            self.symbols = nn.Embedding(n_vocab + 2, hidden)
            nn.init.uniform_(self.symbols.weight, -0.08, 0.08)

    def start(self, points, lengths):
        e, (h, c) = encode(self.encoder, self.embed(points), lengths)  # (B,n,d)
        keys = torch.arange(points.shape[1], device=points.device) < lengths[:, None]  # (B,n) real inputs
        return e, self.W1(e), keys[:, None, :], (h[0], c[0]), e.new_zeros(len(e), 2 * e.shape[-1])

    def step(self, inp, feed, state, e, w1e, keys):
        h, c = self.cell(torch.cat([inp, feed], -1), state)  # (B,d) d_i
        a = self.attn_fn(w1e, self.W2(h)[:, None], self.v, keys).exp()  # (B,1,n) a^i
        feed = torch.cat([h, (a @ e)[:, 0]], -1)  # (B,2d) [d_i; d'_i]
        return self.out(feed), feed, (h, c)  # logits (B,V)

    def inputs(self, points, targets):
        """Teacher-forced decoder inputs (B,m,d): the embedded previous symbol, or the embedded previous point."""
        if self.dec_input == "point":
            return self.embed(previous_points(points, targets, self.go))
        start = torch.full_like(targets[:, :1], self.start_symbol)
        return self.symbols(torch.cat([start, targets[:, :-1]], 1))  # EOS/padding inputs are never read

    def forward(self, points, lengths, targets, tmask):
        e, w1e, keys, state, feed = self.start(points, lengths)
        prev = self.inputs(points, targets)  # (B,m,d)
        mask = allowed_masks(lengths, targets, tmask, self.n_vocab + 1, True, self.mask_used)  # (B,m,V)
        nll = []
        for i in range(targets.shape[1]):
            logits, feed, state = self.step(prev[:, i], feed, state, e, w1e, keys)
            logp = torch.log_softmax(logits.masked_fill(~mask[:, i], float("-inf")), -1)  # (B,V)
            nll.append(-logp.gather(-1, targets[:, i:i + 1])[:, 0])
        return torch.stack(nll, 1)[tmask].mean()

    @torch.no_grad()
    def decode(self, points, lengths):
        assert points.shape[1] <= self.n_vocab, "the fixed vocabulary cannot name these inputs"
        e, w1e, keys, state, feed = self.start(points, lengths)

        def step(x, prev, ok):  # previous point (B,2) / symbol (B,) -> vocabulary logits (B,V), masked by `ok`
            nonlocal state, feed
            if self.dec_input == "point":
                inp = self.embed(x)
            else:
                inp = self.symbols(torch.full_like(lengths, self.start_symbol) if prev is None else prev)
            logits, feed, state = self.step(inp, feed, state, e, w1e, keys)
            return logits.masked_fill(~ok, float("-inf"))
        return greedy_decode(step, self.go, points, lengths, self.n_vocab + 1, True, self.mask_used)


def greedy_decode(step, go, points, lengths, n_out: int, eos: bool, mask_used: bool):
    """Greedy decoding shared by both models: step(previous point (B,2), previous index (B,) or None at step 1,
    allowed (B,n_out)) -> scores.
    Returns (B,T) 1-based indices; 0 = EOS (hull) or "nothing left" (TSP rows that are done)."""
    B, n, _ = points.shape
    rows, j = torch.arange(B, device=points.device), torch.arange(n_out, device=points.device)
    ok = (j >= 1) & (j <= lengths[:, None]) | ((j == 0) & eos)  # (B,n_out) what step 1 may emit
    x, prev, done, out = go.expand(B, 2), None, torch.zeros(B, dtype=torch.bool, device=points.device), []
    for _ in range(n + 1 if eos else n):
        ok[:, 0] |= ~ok[:, 1:].any(-1)  # a row with nothing left may only stop
        idx = step(x, prev, ok).argmax(-1).masked_fill(done, 0)  # (B,)
        out.append(idx)
        done |= idx == 0
        if mask_used:  # DEVIATION: greedy, not beam search; the paper constrained only TSP decoding
            ok[rows, idx] &= idx == 0  # never emit the same point twice
        if done.all():
            break
        x, prev = points[rows, (idx - 1).clamp(min=0)], idx  # (B,2) the chosen point, (B,) its index
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------------------------- 4. Train
def train(model: nn.Module, task: str, args: Args, device: torch.device, name: str,
          fixed_n: Optional[int] = None, test=None) -> list[dict]:
    """Teacher-forced training on fresh examples. task "hull" trains on n in hull_n_min..hull_n_max, or on
    exactly fixed_n points for the head-to-head (both head-to-head models then see the same example stream).
    test: None, or a function scoring the model (a dict) that is called every hull_compare_test_every steps."""
    steps = args.hull_steps if task == "hull" else args.tsp_steps
    n_min, n_max = (args.hull_n_min, args.hull_n_max) if task == "hull" else (args.tsp_n_min, args.tsp_n_max)
    stream = {"hull": 0, "tsp": 1}[task]
    if fixed_n is not None:
        steps, n_min, n_max, stream = args.hull_compare_steps, fixed_n, fixed_n, 2
    rng = np.random.default_rng([args.seed, stream])
    # DEVIATION: Adam by default; the paper trained with plain SGD at lr 1.0 (--optimizer sgd --lr 1.0)
    opt = (torch.optim.Adam(model.parameters(), lr=args.lr) if args.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=args.lr))
    loss_fn = model
    if args.compile:
        print(f"[{name}] torch.compile: the first steps take a while")
        loss_fn = torch.compile(model)
    progress, history, running = shared.Progress(name, steps), [], []
    model.train()
    every = args.hull_compare_test_every if test is not None else 0
    for step in range(1, steps + 1):  # DEVIATION: a fresh batch every step, not epochs over 1M fixed examples
        batch = [t.to(device) for t in make_batch(task, rng, args.batch_size, n_min, n_max)]
        loss = loss_fn(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        running.append(loss.item())
        scored = bool(every) and step % every == 0
        if step % 50 == 0 or step == steps or scored:
            history.append({"step": step, "train/loss": float(np.mean(running))})
            running = []
        if scored:  # greedy decoding of the fixed test set: no randomness, the training stream is untouched
            history[-1].update({f"test/{k}": v for k, v in test(model).items()})
            model.train()
        progress.update(step, loss=history[-1]["train/loss"] if history else loss.item())
    return history


# ----------------------------------------------------------------------------------------------- 5. Evaluate
def hull_scores(points: np.ndarray, preds: list, targets: list) -> dict:
    exact, valid, ratio = [], [], []
    for P, p, t in zip(points, preds, targets):
        exact.append(p == t)
        ok = len(set(p)) == len(p) and is_simple_polygon(P[p])
        valid.append(ok)
        if ok:
            ratio.append(abs(shoelace(P[p])) / abs(shoelace(P[t])))
    return {"acc": float(np.mean(exact)), "area": float(np.mean(ratio)) if ratio else 0.0,
            "invalid": float(np.mean(np.logical_not(valid)))}


def predict(model: nn.Module, points: np.ndarray, device: torch.device, chunk: int = 500) -> list[list[int]]:
    """Greedy outputs as 0-based index lists: hull up to EOS, tour of all n cities."""
    model.eval()
    out = []
    for i in range(0, len(points), chunk):
        x = torch.tensor(points[i:i + chunk], dtype=torch.float32, device=device)
        seqs = model.decode(x, torch.full((len(x),), x.shape[1], device=device)).cpu().tolist()
        out += [[j - 1 for j in itertools.takewhile(lambda j: j > 0, s)] for s in seqs]
    return out


# ----------------------------------------------------------------------------------------------- 6. Bench
def bench(args: Args, device: torch.device) -> dict:
    """Reference vs fused pointer scores (forward, forward+backward) after checking that they agree, then one
    training step eager vs torch.compile. CUDA: TSP n=50 shapes with the fused path in bf16; CPU: smaller."""
    B, N, m, d = (128, 51, 50, 512) if device.type == "cuda" else (32, 51, 20, args.hidden)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    w1e, w2d = (torch.randn(s, generator=g).to(device) for s in ((B, N, d), (B, m, d)))
    # v at the model's own init scale, U(-0.08, 0.08): a unit-normal v gives scores of std ~14 at d=512, where bf16
    # rounding alone moves the softmax by more than 0.05 (the first CUDA bench failed that way)
    v = (torch.rand(d, generator=g) * 0.16 - 0.08).to(device)
    mask = ((torch.rand(B, m, N, generator=g) < 0.7) | (torch.arange(N) == 1)).to(device)  # no empty row
    ref = attention_reference(w1e, w2d, v, mask)
    assert torch.allclose(ref.exp(), attention_fused(w1e, w2d, v, mask).exp(), atol=1e-5), "disagree in fp32"
    fus = attention_fused(w1e.to(dt), w2d.to(dt), v.to(dt), mask)
    assert torch.allclose(ref.exp(), fus.float().exp(), atol=5e-2 if dt == torch.bfloat16 else 1e-5), "disagree"
    rows = []
    for what, grad in (("forward", False), ("forward+backward", True)):
        ms = []
        for fn, t in ((attention_reference, torch.float32), (attention_fused, dt)):
            xs = [x.to(t).requires_grad_(grad) for x in (w1e, w2d, v)]

            def run(fn=fn, xs=xs):
                out = fn(*xs, mask)
                if grad:
                    out.masked_fill(~mask, 0).sum().backward()
            ms.append(shared.benchmark(run, device))
        rows.append({"what": f"pointer scores {what} (B={B}, m={m}, N={N}, d={d})", "reference_ms": ms[0],
                     "fused_ms": ms[1]})
    ms, batch = [], [t.to(device) for t in make_batch("hull", np.random.default_rng(0), args.batch_size,
                                                      args.hull_n_max, args.hull_n_max)]
    for compiled in (False, True):
        shared.seed_everything(args.seed)
        model = PointerNet(args.hidden, attention_fused, eos=True).to(device)
        loss_fn, opt = torch.compile(model) if compiled else model, torch.optim.Adam(model.parameters(), args.lr)
        if compiled:
            print("torch.compile: the first steps take a while")

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(*batch).backward()
            opt.step()
        ms.append(shared.benchmark(step, device))
    rows.append({"what": "train step eager vs compile", "reference_ms": ms[0], "fused_ms": ms[1]})
    return shared.save_bench(args, SLUG, device, rows)


# ----------------------------------------------------------------------------------------------- 7. Main
PAPER_NUMBERS = {  # from the paper card (recalled from the arXiv v2 PDF); not re-checked against the PDF
    "source": "paper card, unverified",
    "table1_hull_ptr_net_trained_5-50": {"acc_n5": 0.920, "area_n5": 0.996, "acc_n10": 0.870, "area_n10": 0.998,
                                         "acc_n50": 0.696, "area_n50": 0.999, "acc_n100": 0.503, "area_n100": 0.999,
                                         "acc_n200": 0.221, "area_n200": 0.999, "acc_n500": 0.013, "area_n500": 0.992},
    "table1_hull_trained_and_tested_n50": {"lstm": 0.019, "lstm_attention": 0.389, "ptr_net": 0.726,
                                           "area_lstm_attention": 0.997, "area_ptr_net": 0.999},
    "table2_tsp": {"n5": {"optimal": 2.12, "A1": 2.18, "ptr_net": 2.12},
                   "n10": {"optimal": 2.87, "A1": 3.07, "ptr_net": 2.88}},
}


def hull_cell(res: dict, n: int) -> str:
    """`exact % / area (invalid %)`; the paper's rule marks the area FAIL above 1% invalid outputs."""
    acc, area, bad = (res[f"hull_{k}_n{n}"] for k in ("acc", "area", "invalid"))
    return f"{100 * acc:.1f} / {area:.3f} ({100 * bad:.1f}% inv{' FAIL' if bad > 0.01 else ''})"


def table(args: Args, results: dict) -> tuple[list, list]:
    """metric | Ptr-Net | baselines (seq2seq+attn for the hull head-to-head; optimal / nearest nbr / farthest ins.
    for TSP) | the paper's number."""
    r, c, lo, hi = results["ptr_net"], args.hull_compare_n, args.hull_n_min, args.hull_n_max
    ph, p50, pt = (PAPER_NUMBERS[k] for k in ("table1_hull_ptr_net_trained_5-50", "table1_hull_trained_and_tested_n50",
                                              "table2_tsp"))
    rows = [[f"hull n={n} (trained {lo}-{hi})", hull_cell(r, n), "-",
             f"{100 * ph[f'acc_n{n}']:.1f} / {ph[f'area_n{n}']} (trained 5-50)" if f"acc_n{n}" in ph else "-"]
            for n in args.hull_test_ns]
    rows.append([f"hull n={c} (both trained at n={c})", hull_cell(results["ptr_net_at_n"], c),
                 "s2s+attn " + hull_cell(results["seq2seq_attn"], c),
                 f"{100 * p50['ptr_net']:.1f} / {p50['area_ptr_net']} vs s2s+attn {100 * p50['lstm_attention']:.1f} / "
                 f"{p50['area_lstm_attention']}" if c == 50 else "-"])
    for n in args.tsp_test_ns:
        opt, nn_, fi = (results[k][f"tsp_len_n{n}"] for k in ("optimal", "nearest_neighbour", "farthest_insertion"))
        p = pt.get(f"n{n}")
        rows.append([f"tsp n={n}: tour (opt / NN / FI)", f"{r[f'tsp_len_n{n}']:.3f} ({100 * r[f'tsp_gap_n{n}']:+.1f}%)",
                     f"{opt:.3f} / {nn_:.3f} / {fi:.3f}", f"{p['ptr_net']} (opt {p['optimal']})" if p else "-"])
    return ["metric (hull: exact % / area)", "Ptr-Net", "baselines", "paper (card, unverified)"], rows


def judge(args: Args, results: dict) -> dict:
    """The card's CPU-scale pass criteria, its +20-point head-to-head moved from n=10 to where the paper measured
    it, n=50 (Deviation 6), plus the paper's area ordering there; every check is named with its number."""
    r, nn_ = results["ptr_net"], results["nearest_neighbour"]
    p, s = results["ptr_net_at_n"], results["seq2seq_attn"]
    a, b, c, lo, hi = args.hull_n_max, 2 * args.hull_n_max, args.hull_compare_n, args.tsp_n_min, args.tsp_n_max
    acc, margin = r[f"hull_acc_n{a}"], p[f"hull_acc_n{c}"] - s[f"hull_acc_n{c}"]
    checks = {f"n={a} exact acc {100 * acc:.1f}% >= 40%": acc >= 0.40,
              f"n={a} area {r[f'hull_area_n{a}']:.3f} >= 0.97": r[f"hull_area_n{a}"] >= 0.97,
              # DEVIATION 6: the card asked this margin at n=10; Table 1 has the head-to-head at n=50
              f"n={c} (both trained at n={c}) exact acc over seq2seq+attn {100 * margin:+.1f} points >= +20":
                  margin >= 0.20,
              f"n={c} (both trained at n={c}) area {p[f'hull_area_n{c}']:.3f} > seq2seq+attn's "
              f"{s[f'hull_area_n{c}']:.3f}": p[f"hull_area_n{c}"] > s[f"hull_area_n{c}"],
              f"n={b} valid {100 * (1 - r[f'hull_invalid_n{b}']):.1f}% >= 95%": r[f"hull_invalid_n{b}"] <= 0.05,
              f"n={b} area {r[f'hull_area_n{b}']:.3f} >= 0.95": r[f"hull_area_n{b}"] >= 0.95,
              f"tsp n={lo} gap {100 * r[f'tsp_gap_n{lo}']:.1f}% <= 2%": r[f"tsp_gap_n{lo}"] <= 0.02,
              f"tsp n={hi} gap {100 * r[f'tsp_gap_n{hi}']:.1f}% <= 4%": r[f"tsp_gap_n{hi}"] <= 0.04,
              "tsp shorter than nearest neighbour": all(r[f"tsp_len_n{n}"] < nn_[f"tsp_len_n{n}"] for n in (lo, hi))}
    failed = [k for k, ok in checks.items() if not ok]
    text = (f"trained and tested at n={c}, Ptr-Net beats seq2seq+attn on convex hulls by 20+ points; trained on "
            f"n={args.hull_n_min}-{a}, it still draws valid hulls at n={b}; its TSP tours are near-optimal "
            "(all checks below).")
    return {"text": text + (f" Failed: {'; '.join(failed)}." if failed else ""), "passed": not failed,
            "checks": {k: bool(v) for k, v in checks.items()}}


def plot(path: Path, args: Args, results: dict, examples: dict, history: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 4, figsize=(20, 9.5))
    for a, (title, P, shapes) in zip(list(ax[0, :2]) + list(ax[1, :2]), examples.values()):
        a.scatter(P[:, 0], P[:, 1], s=12, c="k", zorder=3)
        for (seq, style, label) in shapes:
            if len(seq):
                q = P[list(seq) + [seq[0]]]
                a.plot(q[:, 0], q[:, 1], style, lw=2.8 if style.startswith("k") else 1.3, label=label)
        a.set_title(title, fontsize=10), a.set_aspect("equal"), a.legend(fontsize=8, loc="lower right")
    ns, c = args.hull_test_ns, args.hull_compare_n
    ax[0, 2].plot(ns, [results["ptr_net"][f"hull_acc_n{n}"] for n in ns], "o-", label="ptr_net exact acc")
    ax[0, 2].plot(ns, [results["ptr_net"][f"hull_area_n{n}"] for n in ns], "^:", label="ptr_net area coverage")
    for name, style in (("ptr_net_at_n", "r*"), ("seq2seq_attn", "ks")):
        ax[0, 2].plot([c], [results[name][f"hull_acc_n{c}"]], style, ms=11,
                      label=f"{name.replace('_at_n', '')} trained at n={c}: exact acc")
    ax[0, 2].axvspan(args.hull_n_min, args.hull_n_max, color="0.85", label="trained n (the two ptr_net curves)")
    ax[0, 2].set(xscale="log", xlabel="n points", ylim=(0, 1.02), title="convex hull vs input length")
    ax[0, 2].set_xticks(ns, [str(n) for n in ns], minor=False), ax[0, 2].minorticks_off()
    ax[0, 2].legend(fontsize=8)
    tn = args.tsp_test_ns
    for name, style in (("ptr_net", "o-"), ("nearest_neighbour", "s--"), ("farthest_insertion", "^:")):
        ax[1, 2].plot(tn, [100 * (results[name][f"tsp_len_n{n}"] / results["optimal"][f"tsp_len_n{n}"] - 1)
                           for n in tn], style, label=name)
    ax[1, 2].axvspan(args.tsp_n_min, args.tsp_n_max, color="0.85", label="trained n")
    ax[1, 2].set(xlabel="n cities", ylabel="% above optimal tour", title="TSP: greedy Ptr-Net vs heuristics")
    ax[1, 2].legend(fontsize=8)
    c = args.hull_compare_n
    for a, names, title in ((ax[0, 3], ("ptr_net_at_n", "seq2seq_attn"), f"head-to-head, both trained at n={c}"),
                            (ax[1, 3], ("ptr_net", "ptr_net_tsp"), "hull (n=5-10) and TSP Ptr-Nets")):
        for name in names:
            h = history[name]
            a.plot([r["step"] for r in h], [r["train/loss"] for r in h], label=name)
        a.set(xlabel="training step", ylabel="train loss (NLL per output step, nats)", title=title)
        a.legend(fontsize=8, loc="upper center")
    scored = {name: [r for r in history[name] if "test/acc" in r] for name in ("ptr_net_at_n", "seq2seq_attn")}
    if any(scored.values()):  # --hull-compare-test-every: exact accuracy on the n=c test set during training
        b = ax[0, 3].twinx()
        for (name, h), style in zip(scored.items(), ("r*-", "ks-")):
            b.plot([r["step"] for r in h], [r["test/acc"] for r in h], style, ms=6, label=f"{name}: test exact acc")
        b.set(ylabel=f"exact accuracy at n={c}", ylim=(0, 1)), b.legend(fontsize=8, loc="center right")
    fig.suptitle("Pointer Networks: predicted vs true hulls and tours; generalisation in n; training curves", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return bench(args, device)
    t0, attn_fn, c = time.perf_counter(), ATTENTION[args.attn], args.hull_compare_n
    tests = make_test_sets(args)
    results, history, examples = {}, {}, {}
    # ---- convex hull, length generalisation (Table 1, "Ptr-Net 5-50" rows): one Ptr-Net trained on
    # n in hull_n_min..hull_n_max, tested at every n, most of them longer than anything it saw
    shared.seed_everything(args.seed)
    model = PointerNet(args.hidden, attn_fn, eos=True, mask_used=args.mask_used).to(device)
    t1 = time.perf_counter()
    history["ptr_net"] = train(model, "hull", args, device, "ptr_net")
    results["ptr_net"] = {"train_s": time.perf_counter() - t1}
    for n, (P, T) in tests["hull"].items():
        preds = predict(model, P, device)
        results["ptr_net"].update({f"hull_{k}_n{n}": v for k, v in hull_scores(P, preds, T).items()})
        if n in (args.hull_n_max, 2 * args.hull_n_max):
            examples[f"hull{n}"] = (f"hull n={n}: Ptr-Net trained on n={args.hull_n_min}-{args.hull_n_max} (red) "
                                    "vs true (black dashed)", P[0],
                                    [(T[0], "k--", "true"), (preds[0], "r-", "Ptr-Net")])
    # ---- convex hull head-to-head (Table 1, "trained 50, tested 50" rows): Ptr-Net vs seq2seq + attention,
    # both trained at exactly n = hull_compare_n, same steps, same examples, and tested at that n
    builders = {"ptr_net_at_n": lambda: PointerNet(args.hidden, attn_fn, eos=True, mask_used=args.mask_used),
                "seq2seq_attn": lambda: Seq2SeqAttention(args.hidden, attn_fn, c, args.mask_used, args.s2s_input)}
    P, T = tests["hull"][c]
    for name, build in builders.items():
        shared.seed_everything(args.seed)
        model = build().to(device)
        t1 = time.perf_counter()
        history[name] = train(model, "hull", args, device, name, fixed_n=c,
                              test=lambda net: hull_scores(P, predict(net, P, device), T))
        results[name] = {"train_s": time.perf_counter() - t1,
                         **{f"hull_{k}_n{c}": v for k, v in hull_scores(P, predict(model, P, device), T).items()}}
    # ---- TSP: one Ptr-Net trained on exact tours, n in tsp_n_min..tsp_n_max
    # DEVIATION: the Delaunay task (Sec. 4.3) is not run; hull and TSP carry the claim
    shared.seed_everything(args.seed)
    model = PointerNet(args.hidden, attn_fn, eos=False).to(device)
    t1 = time.perf_counter()
    history["ptr_net_tsp"] = train(model, "tsp", args, device, "ptr_net_tsp")
    results["ptr_net"]["tsp_train_s"] = time.perf_counter() - t1
    for key in ("optimal", "nearest_neighbour", "farthest_insertion"):
        results[key] = {}
    for n, P in tests["tsp"].items():
        tours = {"ptr_net": np.array(predict(model, P, device)), "optimal": tsp_optimal(P),
                 "nearest_neighbour": nearest_neighbour(P), "farthest_insertion": farthest_insertion(P)}
        assert all((np.sort(t, 1) == np.arange(n)).all() for t in tours.values()), "a tour skipped a city"
        for key, t in tours.items():
            results[key][f"tsp_len_n{n}"] = float(tour_length(P, t).mean())
        results["ptr_net"][f"tsp_gap_n{n}"] = results["ptr_net"][f"tsp_len_n{n}"] / results["optimal"][
            f"tsp_len_n{n}"] - 1.0
        if n in (args.tsp_n_min, args.tsp_n_max):
            examples[f"tsp{n}"] = (f"TSP n={n}: Ptr-Net (red) vs optimal (black dashed)", P[0],
                                   [(tours["optimal"][0].tolist(), "k--", "optimal"),
                                    (tours["ptr_net"][0].tolist(), "r-", "Ptr-Net")])

    claim, (header, rows) = judge(args, results), table(args, results)
    shared.print_table(header, rows, claim)
    for check, ok in claim["checks"].items():
        print(f"  [{'x' if ok else ' '}] {check}")
    plot(shared.run_path(args, SLUG, ".png"), args, results, examples, history)
    key = {"metric": f"hull_acc_n{c}", "method": "ptr_net_at_n", "baseline": "seq2seq_attn", "higher_is_better": True}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=PAPER_NUMBERS, history=history, wall_s=time.perf_counter() - t0)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
