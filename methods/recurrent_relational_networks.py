"""Recurrent Relational Networks (Palm, Paquet, Winther, NeurIPS 2018)
arXiv:1711.08028 (section numbers below follow v3)  https://arxiv.org/abs/1711.08028
Official code: https://github.com/rasmusbergpalm/recurrent-relational-networks (TensorFlow 1.x, tasks/sudoku/rrn.py)

The method: a graph of objects (the cells of a Sudoku, the objects of a scene) runs learned message passing
for many steps. At step t every node j receives m_ij = f(h_i, h_j) from each neighbour i (f an MLP), sums
them, feeds [x_j ; sum] through an MLP g into an LSTM whose hidden state is h_j, and reads out o_j = r(h_j)
(a digit per cell on Sudoku; one answer from r(sum_j h_j) on Pretty-CLEVR).
A loss at EVERY step and weights shared over steps make it a learned, convergent inference procedure: more
steps keep helping, even beyond the number used in training.

Reproduces (CPU scale, 6x6 Sudoku with 2x3 boxes, puzzles generated in the file, every one unique by an exact
solver): the RRN solves ~99% of puzzles with 14-22 givens where a one-step relational network (the same net
with T=1) solves ~1% and an MLP on the one-hot board ~7%; puzzles solved rise with the message-passing step
(<1% at step 1 -> ~99% at T=8) and keep rising past the trained T (harder 10-13-given puzzles, never seen in
training: 69-76% at T=8 -> 85-88% at 2T=16; MLP 0%). Seeds 0, 1, 2, all six card checks hold.
Paper scale (9x9, 17 givens, 96.6% solved) is the `paper` preset on a GPU (not run).
Pretty-CLEVR (accuracy by number of jumps vs the RN and an MLP) runs in the same command but is NOT
reproduced at CPU scale: every model stays at chance (12.5%) within its budget (deviation 4); the paper's
figure needs its 12.8M-question training (`--preset paper`, not run).

Run:  python methods/recurrent_relational_networks.py                          # default: CPU, Pretty-CLEVR + 6x6 Sudoku
      python methods/recurrent_relational_networks.py --task sudoku            # only Sudoku (the gated claim)
      python methods/recurrent_relational_networks.py --task clevr --clevr-updates 6000   # a longer Pretty-CLEVR run
      python methods/recurrent_relational_networks.py --preset smoke           # seconds, same code path
      python methods/recurrent_relational_networks.py --preset paper --device cuda   # 9x9, hidden 96, T=32
      python methods/recurrent_relational_networks.py --preset paper --device cuda --data-dir sudoku-hard
      python methods/recurrent_relational_networks.py --mp reference          # literal per-edge messages
      python methods/recurrent_relational_networks.py --bench                 # per-edge vs per-node, compile
      python methods/recurrent_relational_networks.py --help
(No attention in this paper, so no --attn: --mp picks the message-passing path, the hot function.)
`paper` preset: generated 9x9 puzzles need ~0.2 s of CPU each to reduce to a minimal unique puzzle (minimal
puzzles have ~23-26 givens, so the generated paper preset trains on 24-34 and tests the hard set at 23-24);
the paper's 17-given test needs --data-dir with its sudoku-hard csv files and --train-givens/--hard-givens 17 ...
Its target (card): ~96% solved at 17 givens after full training (days on 4 GPUs in the paper); not run here.

Expected (default preset, seed 0; 195 s on a quiet 2-core CPU, 2 threads: Pretty-CLEVR 36 s, Sudoku 150 s):
  | Pretty-CLEVR accuracy | RRN (step 8) | RN (1 step) | MLP   | paper (figure) |
  |-----------------------|--------------|-------------|-------|----------------|
  | 0 jumps               | 12.4%        | 10.0%       | 10.4% | all ~100%      |
  | 1 jumps               | 11.6%        | 14.4%       | 14.0% | RRN > RN > MLP |
  | 2 jumps               | 9.6%         | 9.6%        | 17.2% | RRN > RN, MLP  |
  | 3 jumps               | 13.2%        | 12.8%       | 9.2%  | RRN > RN, MLP  |
  | 4 jumps               | 10.0%        | 11.6%       | 12.4% | RRN > RN, MLP  |
  | 5 jumps               | 14.0%        | 12.8%       | 10.0% | RRN > RN, MLP  |
  | 6 jumps               | 8.4%         | 14.8%       | 11.6% | RRN drops too  |
  | 7 jumps               | 13.2%        | 14.0%       | 13.6% | RRN drops too  |
  | 2-7 jumps (mean)      | 11.4%        | 12.6%       | 12.3% | RRN best       |

  | metric                                           | RRN (T=8, test 16)           | RN (T=1) / MLP / propagation        | paper                      |
  |--------------------------------------------------|------------------------------|-------------------------------------|----------------------------|
  | 14-22 givens: solved (RRN at step T=8)           | 98.8%                        | RN 1.1% / MLP 6.7% / prop. 100.0%   | RRN 96.6% (9x9, 17 givens) |
  | 14-22 givens: blank-cell acc (step T)            | 99.7%                        | RN 65.7% / MLP 77.5% / prop. 100.0% | -                          |
  | 14-22 givens: RRN solved at steps 1 / 4 / 8 / 16 | 0.9% / 87.7% / 98.8% / 99.5% | -                                   | rises with steps, beyond T |
  | 10-13 givens: solved (RRN at step T=8)           | 73.3%                        | RN 0.0% / MLP 0.0% / prop. 97.9%    | RN 0% (9x9, 17 givens)     |
  | 10-13 givens: blank-cell acc (step T)            | 94.2%                        | RN 43.5% / MLP 60.1% / prop. 98.6%  | -                          |
  | 10-13 givens: RRN solved at steps 1 / 4 / 8 / 16 | 0.0% / 19.1% / 73.3% / 87.7% | -                                   | -                          |

  CLAIM HOLDS: The RRN solves most Sudokus that a one-step RN and an MLP cannot, more steps help and running 2x the
  trained steps does not diverge, and it transfers to harder puzzles (the Sudoku checks below). Pretty-CLEVR
  (reported, not gated): the paper's ordering is not reproduced at this scale.
  [x] RRN solved at T 98.8% >= 45%
  [x] RRN at T 98.8% >= MLP 6.7% + 10 points
  [x] RN (T=1) solved 1.1% <= 5%
  [x] RRN at T 98.8% >= step 1 0.9% + 40 points
  [x] RRN at 2T 99.5% >= at T 98.8% - 3 points
  [x] harder puzzles: RRN at 2T 87.7% >= 4% and >= 3x MLP 0.0%
  [ ] Pretty-CLEVR: all three models >= 90% at 0 jumps (lowest 10.0%)
  [ ] Pretty-CLEVR 2-7 jumps: RRN 11.4% >= RN 12.6% + 10 points and >= MLP 12.3% + 10 points
  (With one thread seed 0 gives Sudoku 99.3%, RN 1.0%, 2T on 10-13 givens 88.0%: thread count moves the last digits.)
  Seeds 1 / 2 (one thread each): RRN solved at T (14-22 givens) 98.7% / 98.8%, RN 1.6% / 0.7%, MLP 7.2% / 6.4%;
  step 1 0.7% / 0.9%; at 2T 99.4% / 99.7%; 10-13 givens at T -> 2T 69.4% -> 85.3% / 75.4% -> 87.5%, MLP 0% / 0%:
  all Sudoku checks hold (numbers unchanged by the Pretty-CLEVR part and the denormal flush). Pretty-CLEVR,
  RRN / RN / MLP: 0 jumps 13.2% / 12.0% / 12.0% and 10.8% / 14.8% / 11.6%; 2-7 jumps 11.9% / 11.9% / 13.2% and
  12.5% / 13.5% / 11.7%: chance, as on seed 0.
  (Sudoku: RRN 1000 updates, RN 1500, MLP 6000. Pretty-CLEVR: RRN 500, RN 1000, MLP 2000.)

Implementation details:
  1. Graph (Sec. 3): one node per cell; edge i -> j iff i != j share a row, a column or a box: 2(N-1) +
     (p-1)(q-1) neighbours per cell (12 on 6x6, 20 on 9x9). Every cell has the same degree, so the graph is
     stored as a (C, deg) neighbour table; the literal path uses the flat edge list (src, dst).
  2. Input (Sec. 3): x_j = MLP([embed(digit_j) ; embed(row_j) ; embed(col_j)]), digit 0 = blank, h^0 = x,
     LSTM cell state 0. Message f = MLP on [h_i ; h_j]; node update g = MLP on [x_j ; m_j] into an LSTM cell;
     readout r = Linear(H -> N+1) (class 0 is never a target, as in the official code).
  3. Loss (Sec. 2, Eq. after (4)): the mean over steps t = 1..T of the mean cross-entropy over all cells;
     L2 1e-4 on weight matrices (Adam weight_decay on those parameters = the official tf.nn.l2_loss * 1e-4).
  4. Fast path (no attention in this paper): the first message layer W [h_i ; h_j] = W_a h_i + W_b h_j is
     computed per NODE and gathered to edges, and the sum over the deg incoming messages is taken BEFORE the
     last linear layer (sum_i (W2 u_i + b2) = W2 sum_i u_i + deg b2). Exact up to float rounding; tested
     against the literal per-edge path (concatenate, MLP, index_add_) on values and gradients; `--mp` picks.
  5. Data: full grids by randomised backtracking (MRV, random digit order); each pool grid is reduced to a
     MINIMAL unique puzzle (blank cells in random order while the solver still finds exactly one solution);
     a puzzle with k givens = that minimal puzzle + random solution cells revealed (the paper's recipe for
     17..34 givens), then a random validity-preserving symmetry (digit relabel, row/band and column/stack
     permutations). Every puzzle is unique, so "solved" = equal to the stored solution. Test sets come from
     their own fixed-seed pool (--test-seed), independent of --seed.
  6. Baselines in the same run, on the same stream: RN = the same network trained and run with T=1 (one round
     of relational messages, Santoro et al.); MLP on the flattened one-hot board; classical constraint
     propagation (naked + hidden singles, no search) as a "how much needs more than propagation" column.
  7. Pretty-CLEVR (Sec. 3.2), as a state description (no images): 8 objects per scene at uniform positions
     (redrawn while two are within --clevr-min-dist), each colour and each shape once. A question names the
     start object by its colour or its shape and a number of jumps n = 0..7, each jump to the closest object not
     visited yet (the official generator's greedy rule); the answer is the other attribute (a shape for a colour
     anchor, and vice versa) of the object reached: 16 classes, chance 1/8. The graph is fully connected (56
     directed edges) with the distance as the edge feature; x_j = MLP([position ; colour ; shape ; question]);
     the answer is read from r(sum_j h_j^t) at every step, with a loss at every step. Baselines as in the
     paper: the RN (the same net, one step) and an MLP on the concatenated objects and question. Accuracy is
     reported per number of jumps on fixed test questions (--clevr-test per jump count, --test-seed scenes).

Deviations from the paper:
  1. 6x6 boards, hidden 48, embeddings 16, one-hidden-layer MLPs (paper: 9x9, hidden 96, 3 hidden layers),
     T = 8 train / 16 test (paper 32 / 64), Adam lr 2e-3 (paper 2e-4), a few thousand updates instead of
     days: full scale does not learn on a CPU in minutes (see the card's calibration). `--preset paper` restores it.
  2. Puzzles are generated (pool of minimal unique puzzles + revealed cells) instead of Royle's 17-clue list;
     `--data-dir` reads the paper's sudoku-hard csv files. No validation-based model selection.
  3. The message MLP gets no edge features (the official code concatenates zeros for Sudoku).
  4. bAbI is not reproduced. Pretty-CLEVR runs as a state description (the paper's images are not rendered;
     the official code's models also read the state), with hidden 48 and one-hidden-layer MLPs, Adam 2e-3,
     batch 128 and 500-2000 updates on a pool of 20,000 scenes (paper: 100,000 scenes = 12.8M questions,
     official code hidden 128, 3-layer MLPs, batch 512, Adam 1e-4, trained for days). At this budget every
     model stays at chance (1/8), so Pretty-CLEVR is reported beside the claim and does not gate it (as the card
     says); `--task clevr` gates on its own two checks. What I measured while calibrating (batch 128): the RN
     learns 0-jump-only questions in ~700 updates, but with n mixed over 0..7 neither the RN (2,500 updates),
     the MLP (10,000) nor the RRN (1,500, also with the start object marked, or with 1,000 0-jump-only warm-up
     updates) left chance. My reading, not tested further: each colour and each shape occurs once per scene, so
     the sum over nodes of anything that depends on one attribute is the same for every scene; a signal reaches
     the readout only once a node encodes the colour x shape x anchor conjunction, and averaging the loss over
     8 steps dilutes the step-1 gradient that the RN gets undiluted. A longer run, `--task clevr --clevr-updates
     4000 --clevr-rn-updates 6000 --clevr-mlp-updates 20000` (~25 min on the shared CPU), also stayed at chance:
     RRN / RN / MLP at 0 jumps 14.8% / 15.2% / 12.8%, over 2-7 jumps 13.2% / 12.3% / 12.1%.
  5. The equation numbers cited in comments are Sec. 2's (1) messages, (2) sum, (3) node update, (4) output,
     as recalled for v3; they were not re-checked against the PDF. Table 2 numbers come from the project card.
  6. 6x6 unique puzzles are shallow: naked + hidden singles alone solve 98-100% of them (the "prop." column),
     so the CPU task tests learned multi-step propagation, not search. The RN and MLP baselines get
     1500 / 6000 updates (cheaper per update than the RRN's 1000; the RN's loss is flat long before).
"""

import functools
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "recurrent_relational_networks"
PAPER = "Recurrent Relational Networks"
ARXIV = "1711.08028"


# ---- 1. Arguments ----------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """Recurrent relational network on Sudoku vs a one-step relational network, an MLP and constraint propagation."""

    preset: str = "default"
    """name of the preset (set by --preset); names the output files"""
    seed: int = 0
    """seed of the weights, the training pool and the training stream (test sets use --test-seed)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    mp: Literal["fused", "reference"] = "fused"
    """message passing: per-node split first layer + fixed-degree sum (fused) or literal per-edge (reference)"""
    compile: bool = False
    """torch.compile each model's loss (slow to start on CPU)"""
    bench: bool = False
    """only time reference vs fused message passing and an eager vs compiled training step"""
    out_dir: str = "runs"
    """where recurrent_relational_networks__<preset>__s<seed>.json and .png are written"""
    data_dir: Optional[str] = None
    """folder with the paper's sudoku-hard train.csv / test.csv (lines `quiz,solution`, 81 digits, 0 = blank);
    needs --box-rows 3 --box-cols 3; replaces the generated puzzles"""
    box_rows: int = 2
    """rows per box p (the board is N x N with N = p * q)"""
    box_cols: int = 3
    """columns per box q"""
    hidden: int = 48
    """node state size H (paper: 96)"""
    embed: int = 16
    """size of each of the digit / row / column embeddings (paper: 16)"""
    mlp_layers: int = 1
    """hidden layers in every MLP (input, message, node update); paper: 3"""
    steps: int = 8
    """message-passing steps T in training (paper: 32); evaluated up to eval_steps"""
    eval_steps: int = 16
    """steps run at test time (paper: 64 = 2T)"""
    batch_size: int = 64
    """puzzles per update (paper: 64)"""
    lr: float = 2e-3
    """Adam learning rate (paper: 2e-4)"""
    weight_decay: float = 1e-4
    """L2 on weight matrices (paper: 1e-4)"""
    rrn_updates: int = 1000
    """training updates of the RRN"""
    rn_updates: int = 1500
    """training updates of the RN (the same net with T=1: ~6x cheaper per update; it saturates early)"""
    mlp_updates: int = 6000
    """training updates of the MLP baseline (~20x cheaper per update than the RRN)"""
    mlp_hidden: int = 512
    """width of the MLP baseline's two hidden layers"""
    train_givens: tuple[int, int] = (14, 22)
    """range of givens of training puzzles (and of the in-distribution test set)"""
    hard_givens: tuple[int, int] = (10, 13)
    """range of givens of the harder, unseen test set"""
    pool: int = 2000
    """full grids (each with its minimal unique puzzle) generated for training; symmetries make each draw new"""
    n_test: int = 1000
    """test puzzles in each of the two test sets"""
    test_seed: int = 1234
    """seed of the test pool, fixed so every training seed is scored on the same puzzles"""
    task: Literal["both", "sudoku", "clevr"] = "both"
    """which of the paper's experiments to run: Sudoku (Sec. 3.3), Pretty-CLEVR (Sec. 3.2), or both"""
    # DEVIATION: Pretty-CLEVR at CPU scale (hidden 48, 1-layer MLPs, Adam 2e-3, batch 128, 500-2000 updates, 20k
    # scenes); the official code used hidden 128, 3-layer MLPs, batch 512, Adam 1e-4, 100k scenes (deviation 4)
    clevr_hidden: int = 48
    """Pretty-CLEVR: node state size (the official Pretty-CLEVR code: 128)"""
    clevr_steps: int = 8
    """Pretty-CLEVR: message-passing steps of the RRN (official: 8; 7 jumps need at least 7)"""
    clevr_batch: int = 128
    """Pretty-CLEVR: questions per update (official: 512)"""
    clevr_lr: float = 2e-3
    """Pretty-CLEVR: Adam learning rate (official: 1e-4)"""
    clevr_updates: int = 500
    """Pretty-CLEVR: training updates of the RRN (far too few to leave chance: see the docstring)"""
    clevr_rn_updates: int = 1000
    """Pretty-CLEVR: training updates of the RN (the same net with one step)"""
    clevr_mlp_updates: int = 2000
    """Pretty-CLEVR: training updates of the MLP on the concatenated objects"""
    clevr_scenes: int = 20000
    """Pretty-CLEVR: training scenes in the pool, 128 questions each (paper: 100,000)"""
    clevr_test: int = 250
    """Pretty-CLEVR: test questions per jump count 0..7, from fixed-seed scenes (--test-seed)"""
    clevr_min_dist: float = 0.1
    """Pretty-CLEVR: a scene is redrawn while two objects are this close or closer"""


# DEVIATION: the CPU default (Args()) is a 6x6 board, hidden 48, 1-hidden-layer MLPs, T=8, Adam 2e-3, ~1000
# updates; the paper's 9x9 / hidden 96 / 3 layers / T=32 / Adam 2e-4 / days of training is the `paper` preset.
PRESETS = {
    "smoke": Args(preset="smoke", hidden=16, embed=4, steps=3, eval_steps=4, batch_size=8, rrn_updates=3,
                  rn_updates=3, mlp_updates=3, mlp_hidden=32, pool=40, n_test=24, clevr_hidden=8, clevr_steps=3,
                  clevr_batch=8, clevr_updates=3, clevr_rn_updates=3, clevr_mlp_updates=3, clevr_scenes=20,
                  clevr_test=4),
    "paper": Args(preset="paper", box_rows=3, box_cols=3, hidden=96, embed=16, mlp_layers=3, steps=32,
                  eval_steps=64, batch_size=64, lr=2e-4, rrn_updates=200_000, rn_updates=50_000,
                  mlp_updates=200_000, mlp_hidden=1024, train_givens=(24, 34), hard_givens=(23, 24), pool=2000,
                  n_test=1000, clevr_hidden=128, clevr_steps=8, clevr_batch=512, clevr_lr=1e-4,
                  clevr_updates=100_000, clevr_rn_updates=100_000, clevr_mlp_updates=100_000, clevr_scenes=100_000,
                  clevr_test=2000),
}


def validate(args: Args) -> None:
    if args.box_rows < 1 or args.box_cols < 1 or args.box_rows * args.box_cols < 2:
        raise shared.UsageError("--box-rows and --box-cols must be positive and give a board of at least 2x2.")
    if min(args.hidden, args.embed, args.batch_size, args.rrn_updates, args.rn_updates, args.mlp_updates,
           args.mlp_hidden,
           args.n_test, args.pool) <= 0 or args.mlp_layers < 0 or args.lr <= 0 or args.weight_decay < 0:
        raise shared.UsageError("sizes, --*-updates, --pool, --n-test and --lr must be positive.")
    if args.steps < 2 or args.eval_steps < args.steps:
        raise shared.UsageError("--steps must be at least 2 and --eval-steps at least --steps.")
    C = (args.box_rows * args.box_cols) ** 2
    for name, (lo, hi) in (("--train-givens", args.train_givens), ("--hard-givens", args.hard_givens)):
        if not 0 <= lo <= hi < C:
            raise shared.UsageError(f"{name} must be a range lo <= hi inside 0..{C - 1} (cells on the board).")
    if min(args.clevr_hidden, args.clevr_steps, args.clevr_batch, args.clevr_updates, args.clevr_rn_updates,
           args.clevr_mlp_updates, args.clevr_scenes, args.clevr_test) <= 0 or args.clevr_lr <= 0:
        raise shared.UsageError("the --clevr-* sizes, updates, scenes, test questions and --clevr-lr must be positive.")
    if not 0 <= args.clevr_min_dist <= 0.25:
        raise shared.UsageError("--clevr-min-dist must be in [0, 0.25] (8 objects must fit in the unit square).")
    if args.data_dir is not None and args.task == "clevr":
        raise shared.UsageError("--data-dir holds Sudoku puzzles; Pretty-CLEVR is always generated (drop --task clevr).")
    if args.data_dir is not None:
        if not Path(args.data_dir).is_dir():
            raise shared.UsageError(f"--data-dir {args.data_dir} is not a folder.")
        if C != 81:
            raise shared.UsageError("--data-dir holds 9x9 puzzles: add --box-rows 3 --box-cols 3.")
        for name in ("train.csv", "test.csv"):
            if not (Path(args.data_dir) / name).is_file():
                raise shared.UsageError(f"--data-dir {args.data_dir} has no {name} (the paper's sudoku-hard split).")


# ---- 2. Data: grids, an exact solver, minimal unique puzzles, symmetries ---------------------------------------------
def box_of(p: int, q: int) -> list[int]:
    """Box index of every cell of an N x N board with p x q boxes (cells numbered row-major)."""
    N = p * q
    return [(i // N) // p * p + (i % N) // q for i in range(N * N)]


@functools.lru_cache
def unit_index(p: int, q: int) -> tuple:
    """Per cell: the index of its row (0..N-1), column (N..2N-1) and box (2N..3N-1) among the 3N units."""
    N = p * q
    return [i // N for i in range(N * N)], [N + i % N for i in range(N * N)], [2 * N + b for b in box_of(p, q)]


def count_solutions(puzzle, p: int, q: int, limit: int = 2, rng: Optional[np.random.Generator] = None):
    """Exact depth-first solver with bitmasks and MRV (the blank with the fewest candidates first). Returns
    (number of solutions, capped at `limit`; the first solution found or None): a puzzle is unique iff the count
    is 1. With `rng`, digits are tried in a random order, so an empty board + limit=1 draws a random full grid."""
    N, (R, K, X) = p * q, unit_index(p, q)
    full, cells = (1 << N) - 1, [int(d) for d in puzzle]
    used = [0] * (3 * N)  # bitmask of the digits already in each unit: rows 0..N-1, columns, boxes
    for i, d in enumerate(cells):
        if d:
            bit = 1 << (d - 1)
            if (used[R[i]] | used[K[i]] | used[X[i]]) & bit:
                return 0, None  # the givens already clash
            used[R[i]] |= bit
            used[K[i]] |= bit
            used[X[i]] |= bit
    found = [0, None]

    def search(todo):
        if not todo:
            found[0] += 1
            found[1] = found[1] or list(cells)
            return found[0] >= limit
        k, most = 0, -1
        for j, i in enumerate(todo):  # MRV: most digits ruled out = fewest candidates
            n = bin(used[R[i]] | used[K[i]] | used[X[i]]).count("1")
            if n > most:
                k, most = j, n
                if n >= N - 1:
                    break
        i, rest = todo[k], todo[:k] + todo[k + 1:]
        r, c, x = R[i], K[i], X[i]
        free = full & ~(used[r] | used[c] | used[x])
        digits = [d for d in range(N) if free >> d & 1]
        for d in (rng.permutation(digits).tolist() if rng is not None else digits):
            bit = 1 << d
            used[r] |= bit
            used[c] |= bit
            used[x] |= bit
            cells[i] = d + 1
            stop = search(rest)
            used[r] ^= bit
            used[c] ^= bit
            used[x] ^= bit
            cells[i] = 0
            if stop:
                return True
        return False  # no candidate left, or every branch exhausted

    search([i for i, d in enumerate(cells) if d == 0])
    return found[0], found[1]


def random_grid(rng: np.random.Generator, p: int, q: int) -> list[int]:
    """A full valid grid by randomised backtracking from the empty board (MRV, digits in a random order)."""
    return count_solutions([0] * (p * q) ** 2, p, q, limit=1, rng=rng)[1]


def minimal_givens(rng: np.random.Generator, grid: list[int], p: int, q: int) -> np.ndarray:
    """Blank cells in a random order, keeping each blank only while the puzzle stays unique -> a minimal unique
    puzzle; returns its givens mask (C,) bool. Revealing any solution cells on top keeps it unique."""
    puzzle = list(grid)
    for i in rng.permutation(len(grid)):
        puzzle[i] = 0
        if count_solutions(puzzle, p, q, limit=2)[0] != 1:
            puzzle[i] = grid[i]
    return np.array(puzzle) > 0


def make_pool(rng: np.random.Generator, n: int, p: int, q: int):
    """n full grids (n, C) and the givens masks (n, C) of their minimal unique puzzles."""
    grids = [random_grid(rng, p, q) for _ in range(n)]
    return np.array(grids), np.stack([minimal_givens(rng, g, p, q) for g in grids])


def line_perm(rng: np.random.Generator, B: int, groups: int, size: int) -> np.ndarray:
    """(B, groups*size) permutations that shuffle the groups and the lines inside each group."""
    order = np.argsort(rng.random((B, groups)), 1)  # (B,groups)
    inside = np.argsort(rng.random((B, groups, size)), 2)  # (B,groups,size)
    return (order[:, :, None] * size + inside).reshape(B, groups * size)


def draw_puzzles(rng, grids, minimal, B: int, givens: tuple[int, int], p: int, q: int, symmetries: bool = True):
    """B puzzles: a pool grid, its minimal puzzle + random solution cells up to k ~ U[givens] givens (never
    fewer than the minimal puzzle has), then a random symmetry. -> puzzles (B,C) with 0 = blank, solutions (B,C)."""
    N, C = p * q, (p * q) ** 2
    idx = rng.integers(len(grids), size=B)
    sol, mask = grids[idx], minimal[idx].copy()  # (B,C)
    k = rng.integers(givens[0], givens[1] + 1, size=B)
    extra = np.maximum(k - mask.sum(1), 0)  # (B,) solution cells to reveal
    score = np.where(mask, np.inf, rng.random((B, C)))  # random order over the blanks
    rank = np.argsort(np.argsort(score, 1), 1)
    mask |= rank < extra[:, None]
    if symmetries:  # validity-preserving: bands of p rows, stacks of q columns, digit relabelling
        rows, cols = line_perm(rng, B, q, p), line_perm(rng, B, p, q)  # (B,N) each
        b = np.arange(B)[:, None, None]
        sol = sol.reshape(B, N, N)[b, rows[:, :, None], cols[:, None, :]].reshape(B, C)
        mask = mask.reshape(B, N, N)[b, rows[:, :, None], cols[:, None, :]].reshape(B, C)
        relabel = np.concatenate([np.zeros((B, 1), int), 1 + np.argsort(rng.random((B, N)), 1)], 1)  # (B,N+1)
        sol = np.take_along_axis(relabel, sol, 1)
    return sol * mask, sol


def make_test_set(grids, minimal, n: int, givens: tuple[int, int], seed, p: int, q: int):
    """n puzzles with an exact number of givens, cycling k over the range; grids whose minimal puzzle has more
    givens than k are skipped (so k below a grid's minimum never silently becomes easier)."""
    rng = np.random.default_rng(seed)
    ks = np.resize(np.arange(givens[0], givens[1] + 1), n)
    puz, sol = np.zeros((n, len(grids[0])), int), np.zeros((n, len(grids[0])), int)
    for k in np.unique(ks):
        ok = np.flatnonzero(minimal.sum(1) <= k)
        if len(ok) == 0:
            raise shared.UsageError(f"no generated grid has a unique puzzle with {k} givens; raise the givens range.")
        where = np.flatnonzero(ks == k)
        puz[where], sol[where] = draw_puzzles(rng, grids[ok], minimal[ok], len(where), (k, k), p, q)
    return puz, sol


def read_csv(path: Path, C: int, N: int):
    """The paper's sudoku-hard format: one puzzle per line `quiz,solution`, C digits each, 0 = blank (a first
    line with a header such as `quizzes,solutions` is skipped). -> quizzes (n,C), solutions (n,C)."""
    lines = path.read_text().splitlines()
    header = bool(lines) and not lines[0].replace(",", "").strip().isdigit()
    quiz, sol = [], []
    for k, line in list(enumerate(lines, 1))[header:]:
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != 2 or any(len(s) != C or not s.isdigit() for s in parts):
            raise shared.UsageError(f"{path} line {k} is not `quiz,solution` with {C} digits each.")
        qz, s = np.array([int(ch) for ch in parts[0]]), np.array([int(ch) for ch in parts[1]])
        if qz.max() > N or s.min() < 1 or s.max() > N or ((qz > 0) & (qz != s)).any():
            raise shared.UsageError(f"{path} line {k}: digits must be 0..{N}, the solution full and the quiz "
                                    f"a subset of it.")
        quiz.append(qz)
        sol.append(s)
    if not quiz:
        raise shared.UsageError(f"{path} holds no puzzles.")
    return np.stack(quiz), np.stack(sol)


def is_solution(grid: np.ndarray, p: int, q: int) -> bool:
    """Every row, column and box of the (C,) grid holds each digit 1..N exactly once."""
    N = p * q
    g = np.asarray(grid).reshape(N, N)
    boxes = g.reshape(q, p, p, q).transpose(0, 2, 1, 3).reshape(N, N)  # (band, stack) -> p*q cells
    return all((np.sort(u, 1) == np.arange(1, N + 1)).all() for u in (g, g.T, boxes))


def propagate(puzzle, p: int, q: int) -> list[int]:
    """Classical baseline: naked singles (a cell with one candidate) and hidden singles (a digit with one place
    in a row/column/box), repeated until nothing changes. No search; returns the filled-in grid (0 = unknown)."""
    N, box = p * q, box_of(p, q)
    cells, full = [int(d) for d in puzzle], (1 << N) - 1
    units = ([[r * N + c for c in range(N)] for r in range(N)] + [[r * N + c for r in range(N)] for c in range(N)]
             + [[i for i in range(N * N) if box[i] == b] for b in range(N)])
    peers = [sorted({j for u in units if i in u for j in u} - {i}) for i in range(N * N)]
    changed = True
    while changed:
        changed = False
        cand = [0 if cells[i] else full & ~sum({1 << (cells[j] - 1) for j in peers[i] if cells[j]})
                for i in range(N * N)]  # bitmask of the digits still possible in each blank cell
        for i, c in enumerate(cand):
            if bin(c).count("1") == 1:  # naked single
                cells[i], changed = c.bit_length(), True
        if changed:
            continue
        for u in units:
            for d in range(N):
                spots = [i for i in u if cand[i] >> d & 1]
                if len(spots) == 1 and all(cells[i] != d + 1 for i in u):  # hidden single
                    cells[spots[0]], changed = d + 1, True
    return cells


# ---- 2b. Data: Pretty-CLEVR scenes and n-jump questions (Sec. 3.2) --------------------------------------------------
N_OBJ = 8  # objects per scene; also the number of colours, of shapes, and of jump counts 0..7
COLOURS = ("blue", "green", "red", "cyan", "magenta", "yellow", "black", "gray")
SHAPES = ("circle", "triangle", "square", "plus", "cross", "diamond", "star", "hexagon")


def clevr_scenes(rng: np.random.Generator, S: int, min_dist: float):
    """S scenes of 8 objects: positions U[0,1]^2, a scene redrawn while two objects are min_dist or closer; every
    colour and every shape appears exactly once per scene (the official generator pairs a colour permutation with
    the shapes), so a colour or a shape names one object. -> pos (S,8,2), colour (S,8), shape (S,8)."""
    # NOTE: the card's minimum distance 0.1; the official generator's test reads `dist_squared(...) > 0.1`
    pos = rng.random((S, N_OBJ, 2))
    while True:
        d = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1) + 9 * np.eye(N_OBJ)  # (S,8,8), self = far
        bad = d.min((1, 2)) <= min_dist
        if not bad.any():
            break
        pos[bad] = rng.random((int(bad.sum()), N_OBJ, 2))
    order = lambda: np.argsort(rng.random((S, N_OBJ)), 1)  # noqa: E731  random permutations of 0..7
    return pos, order(), order()


def greedy_paths(pos: np.ndarray) -> np.ndarray:
    """path (S,8,8): path[s, a, n] = the object reached from start a after n jumps, each jump to the closest object
    not visited yet (the official generator's rule), so n jumps need n sequential relational steps."""
    S = len(pos)
    d = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1)  # (S,8,8)
    cur = np.tile(np.arange(N_OBJ), (S, 1))  # (S,8) where each of the 8 walks stands
    visited = np.tile(np.eye(N_OBJ, dtype=bool), (S, 1, 1))  # (S,start,object)
    path, s, a = np.zeros((S, N_OBJ, N_OBJ), int), np.arange(S)[:, None], np.arange(N_OBJ)[None]
    path[:, :, 0] = cur
    for n in range(1, N_OBJ):
        cur = np.where(visited, np.inf, d[s, cur]).argmin(-1)  # (S,8) closest unvisited object
        path[:, :, n], visited[s, a, cur] = cur, True
    return path


# DEVIATION: state descriptions (position, colour, shape) instead of rendered 128x128 images (deviation 4)
class Scenes:
    """A pool of scenes and its questions. A question = (anchor, n): start at the object whose colour (or shape)
    is the anchor, take n jumps; the answer is the shape (or colour) of the object reached: a colour anchor asks
    for a shape and vice versa. Classes: 0..7 colours, 8..15 shapes. With --data-dir none of this is read."""

    def __init__(self, rng: np.random.Generator, S: int, min_dist: float):
        pos, self.colour, self.shape = clevr_scenes(rng, S, min_dist)
        self.path = greedy_paths(pos)  # (S,8,8)
        eye = np.eye(N_OBJ, dtype=np.float32)
        self.objects = np.concatenate([pos, eye[self.colour], eye[self.shape]], -1).astype(np.float32)  # (S,8,18)
        self.dist = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1).astype(np.float32)  # (S,8,8)

    def questions(self, rng: np.random.Generator, B: int, jumps: Optional[np.ndarray] = None):
        """B random questions (n ~ U{0..7} unless `jumps` (B,) is given) -> objects (B,8,18), dist (B,8,8),
        question (B,24) = [one-hot anchor over the 16 words ; one-hot n], answer (B,), n (B,)."""
        i, start = rng.integers(len(self.path), size=B), rng.integers(N_OBJ, size=B)
        n = rng.integers(N_OBJ, size=B) if jumps is None else np.asarray(jumps)
        by_colour, end = rng.random(B) < 0.5, self.path[i, start, n]
        anchor = np.where(by_colour, self.colour[i, start], N_OBJ + self.shape[i, start])
        answer = np.where(by_colour, N_OBJ + self.shape[i, end], self.colour[i, end])
        eye = np.eye(2 * N_OBJ, dtype=np.float32)
        question = np.concatenate([eye[anchor], eye[n, :N_OBJ]], -1)  # (B,24)
        return self.objects[i], self.dist[i], question, answer, n

    def batch(self, rng: np.random.Generator, B: int):
        return self.questions(rng, B)[:4]


# ---- 3. Model --------------------------------------------------------------------------------------------------------
def neighbour_table(p: int, q: int) -> torch.Tensor:
    """(C, deg) long: the cells that send messages to each cell (same row, column or box, not itself)."""
    N, box = p * q, box_of(p, q)
    return torch.tensor([[i for i in range(N * N) if i != j and (i // N == j // N or i % N == j % N
                                                                 or box[i] == box[j])] for j in range(N * N)])


def mlp(d_in: int, d_hidden: int, d_out: int, layers: int) -> nn.Sequential:
    """`layers` x (Linear + ReLU) then a Linear (the paper's MLPs: 3 hidden layers of 96)."""
    mods, d = [], d_in
    for _ in range(layers):
        mods += [nn.Linear(d, d_hidden), nn.ReLU()]
        d = d_hidden
    return nn.Sequential(*mods, nn.Linear(d, d_out))


def messages_reference(h, f: nn.Sequential, nbr: torch.Tensor, edge=None):
    """Sec. 2, Eq. (1)-(2) literally: m_ij = f(h_i, h_j[, e_ij]) for every edge i -> j, m_j = sum_{i in N(j)} m_ij.
    h (B,C,H); nbr (C,deg) senders of each receiver; edge None or (B,C,deg,D) features of edge nbr[j,k] -> j.
    Returns m (B,C,H)."""
    B, C, H = h.shape
    src, dst = nbr.reshape(-1), torch.arange(C, device=h.device).repeat_interleave(nbr.shape[1])  # (E,) each
    pair = [h[:, src], h[:, dst]] + ([] if edge is None else [edge.reshape(B, src.numel(), -1)])
    m_ij = f(torch.cat(pair, -1))  # (B,E,2H[+D]) -> (B,E,H) one message per edge
    return torch.zeros(B, C, m_ij.shape[-1], dtype=h.dtype, device=h.device).index_add_(1, dst, m_ij)  # (B,C,H)


def messages_fused(h, f: nn.Sequential, nbr: torch.Tensor, edge=None):
    """The same function, fast: W1 [h_i ; h_j ; e_ij] + b1 = (W_a h_i + b1) + W_b h_j + W_e e_ij, the node parts
    computed once per node and gathered to the fixed-degree (C, deg) table, and the sum over senders taken
    before the last Linear."""
    first, H = f[0], h.shape[-1]
    a = F.linear(h, first.weight[:, :H], first.bias)  # (B,C,H') sender part, once per node
    b = F.linear(h, first.weight[:, H:2 * H])  # (B,C,H') receiver part
    u = a[:, nbr] + b[:, :, None]  # (B,C,deg,H') first layer of every message
    if edge is not None:
        u = u + F.linear(edge, first.weight[:, 2 * H:])  # (B,C,deg,H') edge-feature part
    if len(f) == 1:  # f is a single Linear: the sum is already the message sum
        return u.sum(2)
    u = f[1](u)  # ReLU
    for layer in f[2:-1]:
        u = layer(u)  # further hidden layers act per message
    last = f[-1]  # sum_i (W2 u_i + b2) = W2 sum_i u_i + deg * b2
    return F.linear(u.sum(2), last.weight) + nbr.shape[1] * last.bias  # (B,C,H)


MESSAGES = {"fused": messages_fused, "reference": messages_reference}


class RRN(nn.Module):
    """Sec. 3 (Sudoku): embeddings -> x_j; T steps of messages, MLP g on [x_j ; m_j], LSTM; digit logits per step."""

    def __init__(self, p: int, q: int, args: Args, mp_fn):
        super().__init__()
        N, H, E, L = p * q, args.hidden, args.embed, args.mlp_layers
        self.mp_fn, self.N = mp_fn, N
        self.register_buffer("nbr", neighbour_table(p, q), persistent=False)  # (C,deg)
        self.register_buffer("row", torch.arange(N * N) // N, persistent=False)  # (C,)
        self.register_buffer("col", torch.arange(N * N) % N, persistent=False)  # (C,)
        self.digit_emb, self.row_emb, self.col_emb = nn.Embedding(N + 1, E), nn.Embedding(N, E), nn.Embedding(N, E)
        self.inp = mlp(3 * E, H, H, L)  # x_j
        # DEVIATION: no edge features in f (the official Sudoku code concatenates an all-zero edge vector)
        self.f = mlp(2 * H, H, H, L)  # message function on [h_i ; h_j]
        self.g = mlp(2 * H, H, H, L)  # node function on [x_j ; m_j]
        self.lstm = nn.LSTMCell(H, H)
        self.r = nn.Linear(H, N + 1)  # readout: 10 classes on 9x9, class 0 never a target

    def forward(self, puzzle, steps: int):
        """puzzle (B,C) digits, 0 = blank -> logits (steps, B, C, N+1), one readout per message-passing step."""
        B, C = puzzle.shape
        emb = torch.cat([self.digit_emb(puzzle), self.row_emb(self.row).expand(B, C, -1),
                         self.col_emb(self.col).expand(B, C, -1)], -1)  # (B,C,3E)
        x = self.inp(emb)  # (B,C,H) x_j
        h, s = x.reshape(B * C, -1), torch.zeros_like(x).reshape(B * C, -1)  # h^0 = x_j, s^0 = 0
        out = []
        for _ in range(steps):
            m = self.mp_fn(h.reshape(B, C, -1), self.f, self.nbr)  # Eq. (1)-(2): (B,C,H) summed messages
            h, s = self.lstm(self.g(torch.cat([x, m], -1)).reshape(B * C, -1), (h, s))  # Eq. (3): node update
            out.append(self.r(h).reshape(B, C, -1))  # Eq. (4): o_j^t = softmax(r(h_j^t)), as logits
        return torch.stack(out)  # (steps,B,C,N+1)


class BoardMLP(nn.Module):
    """Baseline: one-hot board (C*(N+1)) -> 2 hidden ReLU layers -> per-cell digit logits, a single 'step'."""

    def __init__(self, p: int, q: int, hidden: int):
        super().__init__()
        self.N, C = p * q, (p * q) ** 2
        self.net = nn.Sequential(nn.Linear(C * (self.N + 1), hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, C * (self.N + 1)))

    def forward(self, puzzle, steps: int = 1):
        B, C = puzzle.shape
        return self.net(F.one_hot(puzzle, self.N + 1).float().reshape(B, -1)).reshape(1, B, C, self.N + 1)


class SceneRRN(nn.Module):
    """Sec. 3.2 (Pretty-CLEVR): the 8 objects as a fully connected graph (56 directed edges, the distance between
    the two objects as edge feature), x_j = MLP([position ; colour ; shape ; question]); the same T steps of
    messages, node MLP and LSTM as on Sudoku; the answer read from the SUM of the node states at every step."""

    def __init__(self, args: Args, mp_fn):
        super().__init__()
        H, L = args.clevr_hidden, args.mlp_layers
        self.mp_fn = mp_fn
        self.register_buffer("nbr", torch.tensor([[i for i in range(N_OBJ) if i != j] for j in range(N_OBJ)]),
                             persistent=False)  # (8,7) every other object sends to j
        self.inp = mlp(2 + 2 * N_OBJ + 3 * N_OBJ, H, H, L)  # [pos ; colour ; shape] + question (anchor 16 ; n 8)
        self.f = mlp(2 * H + 1, H, H, L)  # message on [h_i ; h_j ; d_ij]
        self.g = mlp(2 * H, H, H, L)
        self.lstm = nn.LSTMCell(H, H)
        self.r = mlp(H, H, 2 * N_OBJ, L)  # graph readout: 8 colours + 8 shapes

    def forward(self, objects, dist, question, steps: int):
        """objects (B,8,18), dist (B,8,8), question (B,24) -> answer logits (steps, B, 16)."""
        B = objects.shape[0]
        x = self.inp(torch.cat([objects, question[:, None].expand(B, N_OBJ, -1)], -1))  # (B,8,H)
        edge = dist[:, self.nbr, torch.arange(N_OBJ, device=dist.device)[:, None], None]  # (B,8,7,1) d(nbr[j,k], j)
        h, s = x.reshape(B * N_OBJ, -1), torch.zeros_like(x).reshape(B * N_OBJ, -1)
        out = []
        for _ in range(steps):
            m = self.mp_fn(h.reshape(B, N_OBJ, -1), self.f, self.nbr, edge)  # Eq. (1)-(2) with edge features
            h, s = self.lstm(self.g(torch.cat([x, m], -1)).reshape(B * N_OBJ, -1), (h, s))  # Eq. (3)
            out.append(self.r(h.reshape(B, N_OBJ, -1).sum(1)))  # graph-level output: r(sum_j h_j^t)
        return torch.stack(out)  # (steps,B,16)


class SceneMLP(nn.Module):
    """Baseline (Sec. 3.2): an MLP on the concatenated state description of the 8 objects and the question."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_OBJ * (2 + 2 * N_OBJ) + 3 * N_OBJ, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * N_OBJ))

    def forward(self, objects, dist, question, steps: int = 1):
        return self.net(torch.cat([objects.reshape(len(question), -1), question], -1))[None]  # (1,B,16)


def step_loss(logits, solution):
    """Loss at every step (Sec. 2): mean over steps t of the mean cross-entropy over cells. logits (T,B,C,K)."""
    T = logits.shape[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), solution.repeat(T, 1).reshape(-1))


# ---- 4. Training -----------------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, args: Args) -> torch.optim.Adam:
    """Adam; L2 weight decay on weight matrices only (official: tf.nn.l2_loss on the MLP weights * 1e-4)."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "emb" not in n)]
    return torch.optim.Adam([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest}], lr=args.lr)


def train(model: nn.Module, steps: int, updates: int, data, batch_size: int, args: Args, device, name: str):
    """Plain loop: a fresh batch every update (the same stream for every model of a task), loss at every step.
    data.batch(rng, B) returns the model's inputs followed by the targets."""
    rng = np.random.default_rng([args.seed, 1])
    opt = make_optimizer(model, args)
    loss_fn = lambda *b: step_loss(model(*b[:-1], steps), b[-1])  # noqa: E731
    if args.compile:
        print(f"[{name}] torch.compile: the first updates take a while", flush=True)
        loss_fn = torch.compile(loss_fn)
    progress, history, running = shared.Progress(name, updates), [], []
    model.train()
    for u in range(1, updates + 1):
        loss = loss_fn(*(torch.as_tensor(a, device=device) for a in data.batch(rng, batch_size)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if u % 50 == 0 or u == updates:
            history.append({"step": u, "train/loss": float(np.mean(running))})
            running = []
        progress.update(u, loss=running[-1] if running else history[-1]["train/loss"])
    return history


class Puzzles:
    """Training puzzles: the generated pool (minimal unique puzzles + revealed cells + symmetries), or the
    paper's train.csv with --data-dir."""

    def __init__(self, args: Args, p: int, q: int):
        self.args, self.p, self.q = args, p, q
        if args.data_dir is not None:
            self.quiz, self.sol = read_csv(Path(args.data_dir) / "train.csv", (p * q) ** 2, p * q)
        else:  # DEVIATION: a generated pool of minimal unique puzzles, not Royle's 49,151 17-clue puzzles
            self.grids, self.minimal = make_pool(np.random.default_rng([args.seed, 0]), args.pool, p, q)

    def batch(self, rng, B: int):
        if self.args.data_dir is not None:
            i = rng.integers(len(self.quiz), size=B)
            return self.quiz[i], self.sol[i]
        return draw_puzzles(rng, self.grids, self.minimal, B, self.args.train_givens, self.p, self.q)


def make_test_sets(args: Args, p: int, q: int) -> dict:
    """{"in": (puzzles, solutions), "hard": (...)}: from a fixed-seed pool, or test.csv split by givens."""
    C = (p * q) ** 2
    if args.data_dir is not None:
        quiz, sol = read_csv(Path(args.data_dir) / "test.csv", C, p * q)
        out = {}
        for name, (lo, hi) in (("in", args.train_givens), ("hard", args.hard_givens)):
            k = (quiz > 0).sum(1)
            keep = np.flatnonzero((k >= lo) & (k <= hi))[:args.n_test]
            if len(keep) == 0:
                raise shared.UsageError(f"{Path(args.data_dir) / 'test.csv'} has no puzzle with {lo}-{hi} givens.")
            out[name] = (quiz[keep], sol[keep])
        return out
    n_pool = max(args.n_test // 2, 20)  # each test grid serves a few puzzles (different k, symmetries, cells)
    grids, minimal = make_pool(np.random.default_rng([args.test_seed, 0]), n_pool, p, q)
    return {name: make_test_set(grids, minimal, args.n_test, g, [args.test_seed, i + 1], p, q)
            for i, (name, g) in enumerate((("in", args.train_givens), ("hard", args.hard_givens)))}


# ---- 5. Evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, steps: int, puzzles: np.ndarray, solutions: np.ndarray, device, chunk=500) -> dict:
    """Per step t: accuracy on blank cells and fraction of puzzles solved (every cell right); per-puzzle solved
    flags at each step for the by-givens breakdown."""
    model.eval()
    right = []
    for i in range(0, len(puzzles), chunk):
        puz = torch.as_tensor(puzzles[i:i + chunk], device=device)
        pred = model(puz, steps).argmax(-1)  # (steps,b,C)
        right.append((pred == torch.as_tensor(solutions[i:i + chunk], device=device)).cpu().numpy())
    right = np.concatenate(right, 1)  # (steps,n,C)
    blank = puzzles == 0  # (n,C)
    return {"blank_acc": [float((r & blank).sum() / blank.sum()) for r in right],
            "solved": [float(r.all(1).mean()) for r in right], "solved_each": right.all(2)}


def score_model(name, model, steps, trained, report, tests, device, results, curves, by_givens) -> None:
    """Fill results[name]: solved fraction and blank-cell accuracy at the `report` steps (1, T/2, T, 2T for the
    RRN); `<split>_solved` without a step tag is the model's trained step count (T for the RRN)."""
    res = results.setdefault(name, {})
    for split, (puz, sol) in tests.items():
        ev = evaluate(model, steps, puz, sol, device)
        curves[f"{name}/{split}"] = {"blank_acc": ev["blank_acc"], "solved": ev["solved"]}
        k = (puz > 0).sum(1)
        by_givens[f"{name}/{split}"] = {int(g): float(ev["solved_each"][-1][k == g].mean()) for g in np.unique(k)}
        for t in report:
            res[f"{split}_solved_t{t}"], res[f"{split}_blank_acc_t{t}"] = ev["solved"][t - 1], ev["blank_acc"][t - 1]
        res[f"{split}_solved"], res[f"{split}_blank_acc"] = ev["solved"][trained - 1], ev["blank_acc"][trained - 1]


def score_propagation(tests, p: int, q: int, by_givens: dict) -> dict:
    """Constraint propagation only (naked + hidden singles): fraction solved without search, per test set (and
    per number of givens into by_givens)."""
    out = {}
    for split, (puz, sol) in tests.items():
        filled = np.array([propagate(x, p, q) for x in puz])
        solved, k = (filled == sol).all(1), (puz > 0).sum(1)
        out[f"{split}_solved"] = float(solved.mean())
        out[f"{split}_blank_acc"] = float(((filled == sol) & (puz == 0)).sum() / (puz == 0).sum())
        by_givens[f"propagation/{split}"] = {int(g): float(solved[k == g].mean()) for g in np.unique(k)}
    return out


def clevr_test_set(args: Args):
    """args.clevr_test questions for each jump count 0..7 on scenes from a fixed seed (independent of --seed)."""
    rng = np.random.default_rng([args.test_seed, 7])
    scenes = Scenes(rng, max(args.clevr_test, 20), args.clevr_min_dist)
    return scenes.questions(rng, N_OBJ * args.clevr_test, jumps=np.repeat(np.arange(N_OBJ), args.clevr_test))


@torch.no_grad()
def clevr_accuracy(model: nn.Module, steps: int, test, device, chunk: int = 1000) -> np.ndarray:
    """(steps, 8): answer accuracy at every message-passing step, for each number of jumps."""
    model.eval()
    *inputs, answer, n = test
    right = []
    for i in range(0, len(answer), chunk):
        logits = model(*(torch.as_tensor(a[i:i + chunk], device=device) for a in inputs), steps)  # (steps,b,16)
        right.append(logits.argmax(-1).cpu().numpy() == answer[i:i + chunk])
    right = np.concatenate(right, 1)  # (steps,n)
    return np.stack([right[:, n == j].mean(1) for j in range(N_OBJ)], 1)


def run_clevr(args: Args, device, results: dict, history: dict, curves: dict) -> None:
    """Sec. 3.2: train the RRN (T steps), the RN (one step) and the MLP on the same question stream and score
    each on the same fixed test questions, by number of jumps."""
    train_scenes = Scenes(np.random.default_rng([args.seed, 2]), args.clevr_scenes, args.clevr_min_dist)
    test, a = clevr_test_set(args), replace(args, lr=args.clevr_lr)
    models = {"clevr_rrn": (lambda: SceneRRN(args, MESSAGES[args.mp]), args.clevr_steps, args.clevr_updates),
              "clevr_rn": (lambda: SceneRRN(args, MESSAGES[args.mp]), 1, args.clevr_rn_updates),
              "clevr_mlp": (lambda: SceneMLP(args.mlp_hidden), 1, args.clevr_mlp_updates)}
    for name, (build, steps, updates) in models.items():
        shared.seed_everything(args.seed)
        model = build().to(device)
        t1 = time.perf_counter()
        history[name] = train(model, steps, updates, train_scenes, args.clevr_batch, a, device, name)
        acc = clevr_accuracy(model, steps, test, device)  # (steps,8)
        curves[name] = acc.tolist()
        results[name] = {**{f"acc_j{j}": float(acc[-1, j]) for j in range(N_OBJ)}, "acc_mean": float(acc[-1].mean()),
                         "acc_j2plus": float(acc[-1, 2:].mean()), "train_s": time.perf_counter() - t1}


# ---- 6. Benchmark ----------------------------------------------------------------------------------------------------
def bench(args: Args, device: torch.device) -> dict:
    """Literal per-edge messages vs the per-node / fixed-degree path (forward, forward+backward) after checking
    they agree, then one RRN training step eager vs torch.compile. CUDA: the paper's 9x9 shapes."""
    p, q = (3, 3) if device.type == "cuda" else (args.box_rows, args.box_cols)
    H, L, B = (96, 3, 64) if device.type == "cuda" else (args.hidden, args.mlp_layers, args.batch_size)
    C = (p * q) ** 2
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    f, nbr = mlp(2 * H, H, H, L).to(device), neighbour_table(p, q).to(device)
    h = torch.randn(B, C, H, generator=g).to(device)
    torch.testing.assert_close(messages_fused(h, f, nbr), messages_reference(h, f, nbr), rtol=1e-4, atol=1e-4)
    rows = []
    for what, grad in (("forward", False), ("forward+backward", True)):
        ms = []
        for fn in (messages_reference, messages_fused):
            x = h.clone().requires_grad_(grad)

            def run(fn=fn, x=x):
                out = fn(x, f, nbr)
                if grad:
                    out.square().sum().backward()
            ms.append(shared.benchmark(run, device))
        rows.append({"what": f"messages {what} (B={B}, C={C}, deg={nbr.shape[1]}, H={H}, layers={L})",
                     "reference_ms": ms[0], "fused_ms": ms[1]})
    a = Args(**{**vars(args), "box_rows": p, "box_cols": q, "hidden": H, "mlp_layers": L})
    data = draw_puzzles(np.random.default_rng(0), *make_pool(np.random.default_rng(0), 4, p, q), B,
                        (C // 3, C // 2), p, q)
    puz, sol = (torch.as_tensor(x, device=device) for x in data)
    ms = []
    for compiled in (False, True):
        shared.seed_everything(args.seed)
        model = RRN(p, q, a, messages_fused).to(device)
        opt = make_optimizer(model, a)
        loss_fn = (lambda pz, sl: step_loss(model(pz, args.steps), sl))  # noqa: E731
        if compiled:
            print("torch.compile: the first steps take a while", flush=True)
            loss_fn = torch.compile(loss_fn)

        def step(loss_fn=loss_fn, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(puz, sol).backward()
            opt.step()
        ms.append(shared.benchmark(step, device, warmup=2, repeats=5))
    rows.append({"what": f"train step eager vs compile (T={args.steps})", "reference_ms": ms[0], "fused_ms": ms[1]})
    return shared.save_bench(args, SLUG, device, rows)


# ---- 7. Table, claim, figure, main -----------------------------------------------------------------------------------
PAPER_NUMBERS = {  # paper Table 2 (9x9, 17 givens; RRN trained with 32 steps, tested with 64), via the card
    "source": "Table 2 of arXiv:1711.08028 via the project card (96.6% and RN 0% certain, BP rows recalled)",
    "sudoku_17_givens_solved": {"rrn": 0.966, "loopy_bp_modified": 0.925, "loopy_bp_random": 0.617,
                                "loopy_bp_parallel": 0.532, "relational_network": 0.0, "deeply_learned_messages": 0.0},
}


def table(args: Args, results: dict) -> tuple[list, list]:
    r, rn, mp, cp = (results[k] for k in ("rrn", "rn", "mlp", "propagation"))
    T, T2, lo, hi = args.steps, args.eval_steps, args.hard_givens, args.train_givens
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = []
    for split, rng_, paper in (("in", hi, "RRN 96.6% (9x9, 17 givens)"), ("hard", lo, "RN 0% (9x9, 17 givens)")):
        rows.append([f"{rng_[0]}-{rng_[1]} givens: solved (RRN at step T={T})", pct(r[f"{split}_solved"]),
                     f"RN {pct(rn[f'{split}_solved'])} / MLP {pct(mp[f'{split}_solved'])} / prop. "
                     f"{pct(cp[f'{split}_solved'])}", paper])
        rows.append([f"{rng_[0]}-{rng_[1]} givens: blank-cell acc (step T)", pct(r[f"{split}_blank_acc"]),
                     f"RN {pct(rn[f'{split}_blank_acc'])} / MLP {pct(mp[f'{split}_blank_acc'])} / prop. "
                     f"{pct(cp[f'{split}_blank_acc'])}", "-"])
        rows.append([f"{rng_[0]}-{rng_[1]} givens: RRN solved at steps " + " / ".join(
            str(t) for t in report_steps(args)), " / ".join(pct(r[f"{split}_solved_t{t}"]) for t in report_steps(args)),
            "-", "rises with steps, beyond T" if split == "in" else "-"])
    return ["metric", f"RRN (T={T}, test {T2})", "RN (T=1) / MLP / propagation", "paper"], rows


def report_steps(args: Args) -> list[int]:
    return sorted({1, args.steps // 2, args.steps}) + [args.eval_steps] * (args.eval_steps > args.steps)


def sudoku_checks(args: Args, results: dict) -> dict:
    """The card's CPU-scale pass criteria for Sudoku; each check names the number it measured."""
    r, rn, mp = results["rrn"], results["rn"], results["mlp"]
    T, T2 = args.steps, args.eval_steps
    s1, sT, s2T, hard2T = r["in_solved_t1"], r[f"in_solved_t{T}"], r[f"in_solved_t{T2}"], r[f"hard_solved_t{T2}"]
    p = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    return {
        f"RRN solved at T {p(sT)} >= 45%": sT >= 0.45,
        f"RRN at T {p(sT)} >= MLP {p(mp['in_solved'])} + 10 points": sT >= mp["in_solved"] + 0.10,
        f"RN (T=1) solved {p(rn['in_solved'])} <= 5%": rn["in_solved"] <= 0.05,
        f"RRN at T {p(sT)} >= step 1 {p(s1)} + 40 points": sT >= s1 + 0.40,
        f"RRN at 2T {p(s2T)} >= at T {p(sT)} - 3 points": s2T >= sT - 0.03,
        f"harder puzzles: RRN at 2T {p(hard2T)} >= 4% and >= 3x MLP {p(mp['hard_solved'])}":
            hard2T >= 0.04 and hard2T >= 3 * mp["hard_solved"],
    }


def clevr_checks(results: dict) -> dict:
    """The paper's Pretty-CLEVR figure, read qualitatively: every model answers 0-jump questions, and beyond one
    jump the RRN is ahead of the one-step RN and the MLP (chance is 1/8)."""
    r, rn, mp = results["clevr_rrn"], results["clevr_rn"], results["clevr_mlp"]
    p = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    zero = min(r["acc_j0"], rn["acc_j0"], mp["acc_j0"])
    return {
        f"Pretty-CLEVR: all three models >= 90% at 0 jumps (lowest {p(zero)})": zero >= 0.90,
        f"Pretty-CLEVR 2-7 jumps: RRN {p(r['acc_j2plus'])} >= RN {p(rn['acc_j2plus'])} + 10 points and "
        f">= MLP {p(mp['acc_j2plus'])} + 10 points":
            r["acc_j2plus"] >= max(rn["acc_j2plus"], mp["acc_j2plus"]) + 0.10,
    }


# DEVIATION: Pretty-CLEVR does not gate the default claim (the card's CPU target has no Pretty-CLEVR gate)
def judge(args: Args, results: dict) -> dict:
    """Sudoku carries the pass gate (the card's criteria); Pretty-CLEVR's checks are reported beside it and gate
    the claim only when it runs alone (--task clevr), because at CPU scale its models barely leave chance."""
    sudoku = sudoku_checks(args, results) if "rrn" in results else {}
    clevr = clevr_checks(results) if "clevr_rrn" in results else {}
    gate = sudoku if sudoku else clevr
    failed = [k for k, ok in gate.items() if not ok]
    if sudoku:
        text = ("The RRN solves most Sudokus that a one-step RN and an MLP cannot, more steps help and running 2x "
                "the trained steps does not diverge, and it transfers to harder puzzles (the Sudoku checks below).")
    else:
        text = "On Pretty-CLEVR every model answers 0-jump questions and the RRN leads beyond one jump."
    if sudoku and clevr:
        text += (" Pretty-CLEVR (reported, not gated): " + ("the RRN leads beyond one jump." if all(clevr.values())
                 else "the paper's ordering is not reproduced at this scale."))
    return {"text": text + (f" Failed: {'; '.join(failed)}." if failed else ""), "passed": not failed,
            "checks": {k: bool(v) for k, v in {**sudoku, **clevr}.items()}}


CLEVR_PAPER = ["all ~100%", "RRN > RN > MLP", "RRN > RN, MLP", "RRN > RN, MLP", "RRN > RN, MLP", "RRN > RN, MLP",
               "RRN drops too", "RRN drops too"]  # the paper's Pretty-CLEVR figure, read qualitatively (card)


def clevr_table(args: Args, results: dict) -> tuple[list, list]:
    r, rn, mp = (results[k] for k in ("clevr_rrn", "clevr_rn", "clevr_mlp"))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = [[f"{j} jumps", pct(r[f"acc_j{j}"]), pct(rn[f"acc_j{j}"]), pct(mp[f"acc_j{j}"]), CLEVR_PAPER[j]]
            for j in range(N_OBJ)]
    rows.append(["2-7 jumps (mean)", pct(r["acc_j2plus"]), pct(rn["acc_j2plus"]), pct(mp["acc_j2plus"]), "RRN best"])
    return ["Pretty-CLEVR accuracy", f"RRN (step {args.clevr_steps})", "RN (1 step)", "MLP", "paper (figure)"], rows


def plot(path: Path, args: Args, curves: dict, by_givens: dict, history: dict) -> None:
    """Pretty-CLEVR accuracy vs jumps (the paper's figure), Sudoku solved vs givens and vs step, training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clevr, sudoku = "clevr_rrn" in curves, "rrn/in" in curves
    fig, axes = plt.subplots(1, 2 * sudoku + clevr + 1, figsize=(5.3 * (2 * sudoku + clevr + 1), 4.6), squeeze=False)
    ax = list(axes[0])
    if clevr:
        a, steps = ax.pop(0), len(curves["clevr_rrn"])
        for t, acc in enumerate(curves["clevr_rrn"], 1):
            a.plot(range(N_OBJ), [100 * v for v in acc], "o-", color=plt.cm.viridis(t / steps), lw=1 + (t == steps),
                   label=f"RRN step {t}" if t in (1, steps // 2, steps) else None)
        a.plot(range(N_OBJ), [100 * v for v in curves["clevr_rn"][0]], "s--", color="C3", label="RN (1 step)")
        a.plot(range(N_OBJ), [100 * v for v in curves["clevr_mlp"][0]], "^:", color="C1", label="MLP")
        a.axhline(100 / N_OBJ, color="0.6", lw=0.8, label="chance")
        a.set(xlabel="number of jumps", ylabel="% answered", ylim=(0, 101), title="Pretty-CLEVR: accuracy vs jumps")
        a.legend(fontsize=8)
    if sudoku:
        a = ax.pop(0)
        for name, style in (("rrn", "o-"), ("rn", "s--"), ("mlp", "^:"), ("propagation", "x-.")):
            pts = sorted((k, v) for split in ("hard", "in") for k, v in by_givens.get(f"{name}/{split}", {}).items())
            a.plot([k for k, _ in pts], [100 * v for _, v in pts], style,
                   label=name if name != "rrn" else f"rrn ({args.eval_steps} steps)")
        a.axvspan(*args.train_givens, color="0.9", label="trained givens")
        a.set(xlabel="number of givens", ylabel="% puzzles solved", title="Sudoku solved vs number of givens")
        a.legend(fontsize=8)
        a = ax.pop(0)
        for split, color in (("in", "C0"), ("hard", "C3")):
            c, xs = curves[f"rrn/{split}"], np.arange(1, args.eval_steps + 1)
            g = args.train_givens if split == "in" else args.hard_givens
            a.plot(xs, [100 * v for v in c["solved"]], "-", color=color, label=f"puzzles solved, {g[0]}-{g[1]} givens")
            a.plot(xs, [100 * v for v in c["blank_acc"]], "--", color=color, label=f"blank cells right, {g[0]}-{g[1]}")
        a.axvline(args.steps, color="k", lw=0.8, label=f"trained steps T={args.steps}")
        a.set(xlabel="message-passing step t", ylabel="%", ylim=(0, 101), title="Sudoku RRN: accuracy vs step")
        a.legend(fontsize=8)
    a = ax.pop(0)
    for name, hist in history.items():
        a.plot([h["step"] for h in hist], [h["train/loss"] for h in hist], label=name)
    a.set(xlabel="update", ylabel="train loss (mean over steps)", yscale="log", title="training")
    a.legend(fontsize=8)
    N = args.box_rows * args.box_cols
    fig.suptitle("Recurrent Relational Networks: " + " and ".join(
        (["Pretty-CLEVR"] if clevr else []) + ([f"{N}x{N} Sudoku"] if sudoku else [])) + f" (seed {args.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return bench(args, device)
    # NOTE: L2 decay drives the weights of rarely active inputs into float32's denormal range, where x86 CPUs run
    # ~10x slower (the MLP baseline's updates slowed from 5 to 56 ms); flushing denormals to zero removes that.
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    results, history, curves, by_givens = {}, {}, {}, {}
    if args.task in ("both", "clevr"):
        run_clevr(args, device, results, history, curves)
    if args.task in ("both", "sudoku"):
        run_sudoku(args, device, results, history, curves, by_givens)
    claim = judge(args, results)
    if "clevr_rrn" in results:
        shared.print_table(*clevr_table(args, results), None if "rrn" in results else claim)
    if "clevr_rrn" in results and "rrn" in results:
        print()
    if "rrn" in results:
        shared.print_table(*table(args, results), claim)
    for check, ok in claim["checks"].items():
        print(f"  [{'x' if ok else ' '}] {check}")
    plot(shared.run_path(args, SLUG, ".png"), args, curves, by_givens, history)
    key = ({"metric": "in_solved", "method": "rrn", "baseline": "mlp", "higher_is_better": True} if "rrn" in results
           else {"metric": "acc_j2plus", "method": "clevr_rrn", "baseline": "clevr_rn", "higher_is_better": True})
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers={**PAPER_NUMBERS, "pretty_clevr_figure_by_jumps": CLEVR_PAPER},
                               history=history, wall_s=time.perf_counter() - t0,
                               curves=curves, by_givens=by_givens)


def run_sudoku(args: Args, device, results: dict, history: dict, curves: dict, by_givens: dict) -> None:
    """Sec. 3.3: the RRN (T steps, tested to 2T), the RN (T=1) and the board MLP on the same puzzle stream,
    scored on the same fixed test puzzles; constraint propagation as the classical column."""
    t0, p, q = time.perf_counter(), args.box_rows, args.box_cols
    tests = make_test_sets(args, p, q)
    for split, (puz, sol) in tests.items():  # every test puzzle: a valid solution, consistent, and unique
        assert all(is_solution(s, p, q) for s in sol) and ((puz == 0) | (puz == sol)).all()
        if args.data_dir is None:
            assert all(count_solutions(x, p, q)[0] == 1 for x in puz), f"a {split} test puzzle is not unique"
    data = Puzzles(args, p, q)
    print(f"data ready in {time.perf_counter() - t0:.1f} s: {args.pool} training grids, "
          f"{sum(len(v[0]) for v in tests.values())} test puzzles (all unique)", flush=True)
    models = {"rrn": (lambda: RRN(p, q, args, MESSAGES[args.mp]), args.steps, args.rrn_updates),
              "rn": (lambda: RRN(p, q, args, MESSAGES[args.mp]), 1, args.rn_updates),
              "mlp": (lambda: BoardMLP(p, q, args.mlp_hidden), 1, args.mlp_updates)}
    for name, (build, steps, updates) in models.items():
        shared.seed_everything(args.seed)  # before building: no model depends on another having run first
        model = build().to(device)
        t1 = time.perf_counter()
        history[name] = train(model, steps, updates, data, args.batch_size, args, device, name)
        test_steps = args.eval_steps if name == "rrn" else 1  # the RRN runs past its trained T at test time
        score_model(name, model, test_steps, steps, report_steps(args) if name == "rrn" else [1], tests, device,
                    results, curves, by_givens)
        results[name]["train_s"] = time.perf_counter() - t1
    results["propagation"] = score_propagation(tests, p, q, by_givens)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
