"""BatchFormer: Learning to Explore Sample Relationships for Robust Representation Learning
(Zhi Hou, Baosheng Yu, Dacheng Tao, CVPR 2022)
arXiv:2203.01522  https://arxiv.org/abs/2203.01522
Official code: zhihou7/BatchFormer (long-tailed: RIDE / PaCo / Balanced Softmax folders; DG, CZSL, MoCo)

The method in a few lines
    A one-layer transformer encoder is inserted between the backbone and the classifier and run ALONG THE BATCH
    DIMENSION: the N features of a mini-batch are the N tokens of one sequence, so every sample attends to every
    other sample (no mask, no positions). One shared classifier is trained on the original features AND on the
    BatchFormer features (labels duplicated), so the classifier works without the module and BatchFormer is simply
    removed at test time: inference costs nothing extra and does not depend on the batch.

Reproduces (the attempt): on a procedural long-tailed image set (10 shape classes, imbalance ratio rho = 100,
300 ... 3 training images per class, balanced test set), add BatchFormer to cross-entropy (CE) and to Balanced Softmax
(BS) training of the same small ResNet and compare Many / Medium / Few / All accuracy (means over 3 training runs).
The mechanism reproduces exactly (the module is removed at test: eval logits == the no-BF path bit for bit; the
fused and literal attention over the batch agree). The accuracy claim holds only partly: with Balanced Softmax,
BatchFormer raises Few accuracy by +2.4 points and All by +0.7 on average over 9 training runs (seeds 1 and 2
pass the card's check, seed 0 does not); with plain CE it does not help Few (-0.9 on average). See Expected.

Run:
    python methods/batchformer.py                                 # default preset (CPU; 4 models x 3 runs)
    python methods/batchformer.py --preset smoke                  # seconds, same code path
    python methods/batchformer.py --preset paper --device cuda --data-dir cifar-100-python   # CIFAR-100-LT, ResNet-32
    python methods/batchformer.py --attn reference                # literal softmax(QK^T/sqrt(d))V over the batch
    python methods/batchformer.py --bench                         # attention reference vs SDPA, eager vs compile
    python methods/batchformer.py --data-dir cifar-10-batches-py  # CIFAR-10 python pickles, made long-tailed
    python methods/batchformer.py --help

Expected (default preset, seed 0: 90 s on a quiet 2-core CPU, 2 threads; means over the 3 training runs of the seed;
seeds 1 and 2 below ran with 1 thread each, which moves the last digits):
    | metric       | CE + BF (method) | CE (baseline) | BS + BF | BS    | paper RIDE RN-10 ImNet-LT base -> +BF |
    |--------------|------------------|---------------|---------|-------|---------------------------------------|
    | All acc %    | 57.93            | 58            | 71.63   | 72.43 | 44.7 -> 45.7                          |
    | Many acc %   | 99.33            | 98.89         | 89.33   | 91.33 | 57.0 -> 56.3                          |
    | Medium acc % | 80.78            | 79.22         | 75.89   | 76.56 | 40.3 -> 42.1                          |
    | Few acc %    | 9.75             | 11.42         | 55.17   | 55.17 | 25.5 -> 28.3                          |

    CLAIM DOES NOT HOLD: adding BatchFormer raises Few-class accuracy by >= 2 points for CE or Balanced Softmax and
    costs at most 0.5 point overall for both, with the module removed at test time
      [ ] Few(+BF) - Few(base) >= +2.0 points for CE or BS
      [x] All(CE + BF) >= All(CE) - 0.5 points
      [ ] All(BS + BF) >= All(BS) - 0.5 points
      [x] eval logits of the BF models == the no-BF path (exactly)
      [x] BatchFormer fused == reference at dropout 0 (max err <= 1e-5)
    Few CE -1.7, BS 0.0; All CE -0.1, BS -0.8. Per training run (Few %, CE / CE + BF / BS / BS + BF): 13.0 / 9.5 /
    55.0 / 59.5, 9.8 / 9.5 / 50.0 / 51.0, 11.5 / 10.2 / 60.5 / 55.0: the sign of the BS difference flips between runs;
    the spread is larger than the effect.
    Seeds 1 and 2 (same code): the claim HOLDS for both. Few CE / CE + BF / BS / BS + BF = 9.1 / 10.1 / 51.8 / 56.1
    and 12.3 / 10.3 / 54.9 / 58.1; All = 57.4 / 57.7 / 70.9 / 72.9 and 59.6 / 59.6 / 73.6 / 74.6.
    Over all 9 training runs, BS -> BS + BF: Few 54.0 -> 56.4 (+2.4, up in 8 of 9 runs, sd of the difference 3.5),
    All 72.4 -> 73.0 (+0.7); CE -> CE + BF: Few 10.9 -> 10.1 (-0.9), All +0.1. So: a Balanced-Softmax tail gain of
    the paper's size, but with a run-to-run spread as large as the gain; no gain on top of plain CE.
    What was tried: with PyTorch's default nn.Linear init of W_q, W_k, W_v (before matching the official
    nn.MultiheadAttention init) the seed-0 default gave Few CE 11.5 -> 11.4, BS 55.4 -> 56.6 and All CE 58.1 -> 58.8,
    BS 72.6 -> 72.2: also no reliable gain. 60 epochs instead of 30 (that init, one run): Few CE 22.0 -> 19.2.
    Balanced Softmax itself behaves as in the literature (Few 11 -> 55, Many 99 -> 91).

Implementation details:
    1. Data: 32x32 RGB images of 10 shapes (disk, square, triangle, cross, ring, star, bar, L, chevron, diamond).
       Each class has a palette pair (two colours, the shape is shaded between them); classes c and c + 5 share a
       palette, so colour alone never decides the class. Position +-6 px, scale 0.6-1.1, rotation +-25 deg (not
       more: a square turned by 45 deg is a diamond), a background of smooth random waves in a random hue, a 10 %
       chance of a half-size distractor shape of another class, pixel noise sigma = 0.05.
    2. Long tail (as in the LT benchmarks): n_c = round(n_max * rho^(-c/(K-1))), n_max = 300, rho = 100 ->
       300, 180, 108, 65, 39, 23, 14, 8, 5, 3. Test: 100 per class, drawn from a fixed seed (same for every run).
       Splits by training count: Many > 100, Medium 20-100, Few < 20 (the ImageNet-LT convention).
    3. Backbone: stride-2 stem conv 3->32 (32x32 -> 16x16), two basic residual blocks 32->64->128 (stride 2 each), global average pool,
       C = 128 features; a linear classifier g. BatchFormer = one post-LN encoder layer (d_model = C, 4 heads,
       FFN width C, ReLU, dropout 0.5 on the attention weights and in the residual branches), exactly the layer
       nn.TransformerEncoderLayer(C, 4, C, 0.5) of the official README, written out with its initialisation
       (tested equal to it).
    4. Training (card's CPU recipe): SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine decay, 30 epochs, batch
       128 with drop_last (a batch always has context for BatchFormer), random horizontal flips (our choice). Every model of a run starts from
       the same seed, so CE, CE + BF, BS and BS + BF differ only in the loss and the module.
    5. Balanced Softmax (Ren et al., NeurIPS 2020): CE on logits + log pi_c, pi_c = n_c / n the training prior;
       the prior is the same for the duplicated BatchFormer half.
    6. `repeats` training runs per model (seeds seed * repeats + r: each run draws its own long-tailed training
       set and init); the table shows their means, as the card's criteria are seed means.

Deviations from the paper:
    1. Scale: procedural 32x32 images (745 training images) and a 3-block ResNet with a stride-2 stem instead of
       ImageNet-LT / iNaturalist / CIFAR-100-LT with ResNet-10/32/50, 30 epochs (150 SGD steps); absolute
       accuracies are not comparable, only the with/without-BatchFormer differences. The paper preset uses the
       stride-1 ResNet-32 recipe of the CIFAR-LT papers.
    2. Base methods: plain CE and Balanced Softmax only (the paper's headline long-tailed rows add BF to RIDE and
       PaCo; the official repository also has a Balanced Softmax folder). No RIDE experts, no PaCo, no DG / CZSL / MoCo experiments.
    3. Equation numbers are not cited: the paper writes the module as pseudo-code (its Alg. 1 / Fig. 2) rather than
       numbered equations; comments cite "Sec. 3" and Alg. 1, and the encoder layer follows the official code.
"""

from __future__ import annotations

import colorsys
import math
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "batchformer"
PAPER = "BatchFormer: Learning to Explore Sample Relationships for Robust Representation Learning"
ARXIV = "2203.01522"
TEST_SEED = 2022  # the balanced test set is the same for every training seed
# DEVIATION 2: base losses CE and Balanced Softmax only (no RIDE experts, no PaCo)
MODELS = ("CE", "CE + BF", "BS", "BS + BF")  # (loss, BatchFormer on?) read from the name


@dataclass
class Args:
    """BatchFormer (a transformer over the batch, training only) vs CE and Balanced Softmax on long-tailed images."""

    preset: str = "default"
    """name of the preset these values came from (set by --preset; it names the output files)"""
    seed: int = 0
    """seed of this run; training run r of each model uses seed * repeats + r (data draw, init, batch order)"""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu or cuda"""
    compile: bool = False
    """wrap the model in torch.compile for training (tens of seconds of compilation first)"""
    bench: bool = False
    """only time reference vs fused batch attention (and eager vs compiled training steps) and write the bench JSON"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    attn: Literal["fused", "reference"] = "fused"
    """attention over the batch: "reference" = literal softmax(QK^T/sqrt(d))V, "fused" = F.scaled_dot_product_attention"""
    data_dir: Optional[str] = None
    """folder of the CIFAR python pickles (cifar-10-batches-py: data_batch_1..5 + test_batch; cifar-100-python:
    train + test), made long-tailed with the same profile; default: the procedural images"""
    imbalance: float = 100.0
    """imbalance ratio rho = n_max / n_min of the long-tailed training set"""
    n_max: int = 300
    """training images of the largest class"""
    n_test: int = 100
    """test images per class (procedural data; CIFAR uses its whole balanced test set)"""
    many_above: int = 100
    """a class is Many-shot when it has more than this many training images"""
    few_below: int = 20
    """a class is Few-shot when it has fewer than this many training images (Medium in between)"""
    widths: tuple[int, ...] = (32, 64, 128)
    """channel widths of the ResNet stages (the last one is the feature size C)"""
    blocks: tuple[int, ...] = (0, 1, 1)
    """basic residual blocks per stage (stage 0 runs at the stem's resolution; later stages halve it)"""
    # DEVIATION: a stride-2 stem (32x32 -> 16x16) keeps the CPU default near 3 minutes; the paper preset uses 1
    stem_stride: int = 2
    """stride of the stem convolution (1 = the CIFAR ResNets of the paper)"""
    heads: int = 4
    """attention heads of the BatchFormer layer"""
    bf_dropout: float = 0.5
    """dropout of the BatchFormer layer (attention weights and both residual branches), 0.5 in the paper"""
    # DEVIATION 1: 30 epochs on 745 procedural images (the card's CPU recipe), not the paper's benchmarks
    epochs: int = 30
    """training epochs per model"""
    batch: int = 128
    """mini-batch size (also BatchFormer's sequence length); the last partial batch is dropped"""
    lr: float = 0.05
    """SGD learning rate"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """SGD weight decay"""
    schedule: Literal["cosine", "step"] = "cosine"
    """learning-rate decay: cosine to 0, or x0.1 at 80 % and 90 % of the epochs (the CIFAR-LT recipe)"""
    warmup_epochs: int = 0
    """linear warm-up epochs"""
    repeats: int = 3
    """training runs per model; the table reports their mean"""


PRESETS = {
    "smoke": Args(preset="smoke", n_max=40, imbalance=10.0, n_test=10, many_above=20, few_below=8, widths=(8, 16, 32),
                  epochs=2, batch=32, repeats=1),
    "paper": Args(preset="paper", n_max=500, widths=(16, 32, 64), blocks=(5, 5, 5), epochs=200, lr=0.1,
                  stem_stride=1, schedule="step", warmup_epochs=5, repeats=1),
}


def validate(args: Args) -> None:
    if args.imbalance < 1 or args.n_max < 2:
        raise shared.UsageError("--imbalance must be >= 1 and --n-max >= 2.")
    if args.n_max / args.imbalance < 1:
        raise shared.UsageError(f"--n-max {args.n_max} / --imbalance {args.imbalance:g} is below 1: the rarest class "
                                "would have no training image.")
    if args.batch < 2:
        raise shared.UsageError("--batch must be at least 2: BatchFormer needs other samples to attend to.")
    if len(args.widths) != len(args.blocks) or min(args.widths) < 1 or any(b < 1 for b in args.blocks[1:]):
        raise shared.UsageError("--widths and --blocks need one entry per stage, and every stage after the first "
                                "needs at least one block.")
    if args.widths[-1] % args.heads != 0:
        raise shared.UsageError(f"--heads {args.heads} must divide the feature size C = --widths[-1] = "
                                f"{args.widths[-1]}.")
    if args.stem_stride not in (1, 2):
        raise shared.UsageError("--stem-stride must be 1 or 2.")
    if not 0 <= args.bf_dropout < 1:
        raise shared.UsageError("--bf-dropout must lie in [0, 1).")
    if min(args.epochs, args.repeats, args.n_test) < 1 or args.lr <= 0 or args.warmup_epochs >= args.epochs:
        raise shared.UsageError("epochs, repeats, n-test and the learning rate must be positive, and warmup-epochs "
                                "below epochs.")
    if args.few_below > args.many_above:
        raise shared.UsageError("--few-below must not exceed --many-above.")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: procedural long-tailed shapes (or CIFAR pickles), the long-tail profile
# ---------------------------------------------------------------------------------------------------------------------
SHAPES = ("disk", "square", "triangle", "cross", "ring", "star", "bar", "L", "chevron", "diamond")
PALETTES = [((0.9, 0.2, 0.2), (0.95, 0.8, 0.2)), ((0.2, 0.5, 0.95), (0.3, 0.9, 0.9)),
            ((0.25, 0.8, 0.3), (0.9, 0.95, 0.4)), ((0.7, 0.3, 0.9), (0.95, 0.5, 0.7)),
            ((0.95, 0.55, 0.1), (0.4, 0.2, 0.1))]  # class c uses PALETTES[c % 5]: classes c and c + 5 share one


def long_tail_counts(n_max: int, rho: float, n_classes: int) -> list[int]:
    """n_c = round(n_max * rho^(-c / (K - 1))): class 0 has n_max images, class K-1 has n_max / rho."""
    return [int(round(n_max * rho ** (-c / max(n_classes - 1, 1)))) for c in range(n_classes)]


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape `shape` in canonical coordinates (u, v in about [-1, 1], v pointing down)."""
    r, a = np.hypot(u, v), np.arctan2(v, u)
    name = SHAPES[shape]
    if name == "disk":
        return r < 0.8
    if name == "square":
        return np.maximum(abs(u), abs(v)) < 0.65
    if name == "triangle":
        return (v < 0.6) & (v > -0.8 + 2.3 * abs(u))
    if name == "cross":
        return ((abs(u) < 0.25) & (abs(v) < 0.85)) | ((abs(v) < 0.25) & (abs(u) < 0.85))
    if name == "ring":
        return (r > 0.5) & (r < 0.85)
    if name == "star":
        return r < 0.5 + 0.35 * np.cos(5 * a)
    if name == "bar":
        return (abs(u) < 0.9) & (abs(v) < 0.25)
    if name == "L":
        return ((u > -0.7) & (u < -0.25) & (abs(v) < 0.8)) | ((u > -0.7) & (u < 0.7) & (v > 0.35) & (v < 0.8))
    if name == "chevron":
        return (abs(v - (0.9 * abs(u) - 0.45)) < 0.22) & (abs(u) < 0.85)
    return abs(u) + abs(v) < 0.9  # diamond


def render(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Images (n, 3, size, size) in [0, 1] of the shape classes in `labels`."""
    py, px = np.mgrid[0:size, 0:size].astype(np.float64)  # (S, S) pixel rows, columns
    out = np.empty((len(labels), 3, size, size), dtype=np.float32)
    for i, c in enumerate(labels):
        # background: a few random low-frequency waves, tinted with a random hue
        wave = sum(np.sin(rng.uniform(0.1, 0.45) * (np.cos(t) * px + np.sin(t) * py) + rng.uniform(0, 2 * np.pi))
                   for t in rng.uniform(0, np.pi, 3)) / 6 + 0.5  # (S, S) in [0, 1]
        hue = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.65)))
        img = hue[:, None, None] * (0.6 + 0.8 * wave)[None]  # (3, S, S)
        objects = [(int(c), 1.0)]
        if rng.random() < 0.1:  # a half-size distractor of another class, drawn first (the main shape may cover it)
            objects.insert(0, (int((c + rng.integers(1, 10)) % 10), 0.5))
        for k, rel in objects:
            cx, cy = size / 2 - 0.5 + rng.uniform(-6, 6, 2) * (1 if rel == 1 else 2)
            radius, theta = 11 * rng.uniform(0.6, 1.1) * rel, np.deg2rad(rng.uniform(-25, 25))
            u = ((px - cx) * np.cos(theta) + (py - cy) * np.sin(theta)) / radius  # canonical coordinates
            v = (-(px - cx) * np.sin(theta) + (py - cy) * np.cos(theta)) / radius
            c1, c2 = (np.clip(np.array(p) + rng.uniform(-0.08, 0.08, 3), 0, 1) for p in PALETTES[k % 5])
            # shading direction, from a child generator (equivalent to rng.uniform; kept so Expected stays exact)
            g = np.random.default_rng(rng.integers(1 << 31)).uniform(0, 2 * np.pi)
            t = np.clip(0.5 + 0.5 * (u * np.cos(g) + v * np.sin(g)), 0, 1)[None]  # (1, S, S)
            mask = shape_mask(k, u, v)[None]  # (1, S, S)
            img = np.where(mask, (1 - t) * c1[:, None, None] + t * c2[:, None, None], img)
        out[i] = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
    return out


def make_procedural(args: Args, seed: int) -> dict:
    """Long-tailed training set drawn with `seed`; balanced test set drawn with TEST_SEED."""
    counts = long_tail_counts(args.n_max, args.imbalance, len(SHAPES))
    rng = np.random.default_rng(seed)
    y_train = np.repeat(np.arange(len(SHAPES)), counts)
    y_test = np.repeat(np.arange(len(SHAPES)), args.n_test)
    return {"x_train": render(y_train, rng), "y_train": y_train,
            "x_test": render(y_test, np.random.default_rng(TEST_SEED)), "y_test": y_test}


def read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle -> uint8 images (n, 3, 32, 32) and int labels; any problem names the file."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise shared.UsageError(f"missing file {path} in --data-dir.") from None
    except Exception as e:
        raise shared.UsageError(f"cannot read {path} as a CIFAR python pickle ({type(e).__name__}).") from None
    if not isinstance(d, dict):
        raise shared.UsageError(f"{path} does not hold a dict with b'data' and b'labels' (or b'fine_labels').")
    x, y = d.get(b"data"), d.get(b"labels", d.get(b"fine_labels"))
    if x is None or y is None:
        raise shared.UsageError(f"{path} has no b'data' or no b'labels' / b'fine_labels' entry.")
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise shared.UsageError(f"{path}: b'data' must be uint8 of shape (n, 3072) with n labels, got {x.dtype} "
                                f"{x.shape} and {len(y)} labels.")
    if y.dtype.kind not in "iu" or y.min() < 0:
        raise shared.UsageError(f"{path}: labels must be non-negative integers.")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar_lt(args: Args, seed: int) -> dict:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) from --data-dir; the training set is cut
    to the long-tail profile (a seeded choice of images per class), the test set stays balanced."""
    root = Path(args.data_dir)
    if not root.is_dir():
        raise shared.UsageError(f"--data-dir {root} is not a folder.")
    if (root / "train").exists():
        parts, test = [root / "train"], root / "test"
    else:
        parts, test = [root / f"data_batch_{i}" for i in range(1, 6)], root / "test_batch"
    xs, ys = zip(*(read_cifar_pickle(p) for p in parts))
    x, y = np.concatenate(xs), np.concatenate(ys)
    x_test, y_test = read_cifar_pickle(test)
    n_classes = int(max(y.max(), y_test.max())) + 1
    counts = long_tail_counts(args.n_max, args.imbalance, n_classes)
    rng, keep = np.random.default_rng(seed), []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(y == c)
        if len(idx) < n_c:
            raise shared.UsageError(f"class {c} has {len(idx)} training images in {root} but the long-tail profile "
                                    f"asks for {n_c} (lower --n-max).")
        keep.append(rng.permutation(idx)[:n_c])
    keep = np.concatenate(keep)
    return {"x_train": x[keep].astype(np.float32) / 255, "y_train": y[keep],
            "x_test": x_test.astype(np.float32) / 255, "y_test": y_test}


# ---------------------------------------------------------------------------------------------------------------------
# 2. Attention over the batch: the tokens are the N samples of the mini-batch
# ---------------------------------------------------------------------------------------------------------------------
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Sec. 3 (the encoder's multi-head self-attention, no mask): A = softmax(Q K^T / sqrt(d_h)) of shape (N, N),
    output A V, written out. q, k, v: (1, H, N, d_h), N = the mini-batch. dropout_p drops attention weights."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (1, H, N, N): sample i vs sample j
    weights = scores.softmax(dim=-1)  # (1, H, N, N), each row sums to 1 over the batch
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)  # attention dropout (0.5 in the paper)
    return weights @ v  # (1, H, N, d_h)


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """The same function through PyTorch's fused kernel. With dropout_p > 0 the random mask differs from the
    reference's (a different random stream), the distribution is the same; at dropout 0 the outputs agree."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (1, H, N, d_h)


ATTENTION = {"fused": attention_fused, "reference": attention_reference}


# ---------------------------------------------------------------------------------------------------------------------
# 3. Model: small ResNet backbone f, BatchFormer (training only), shared classifier g
# ---------------------------------------------------------------------------------------------------------------------
class BatchFormerLayer(nn.Module):
    """One post-LN transformer encoder layer over the batch, the layer of nn.TransformerEncoderLayer(C, heads, C,
    dropout) written out: X1 = LN(X + Drop(MHA(X))), X' = LN(X1 + Drop(W2 Drop(ReLU(W1 X1))))."""

    def __init__(self, dim: int, heads: int, dropout: float, attn_fn: Callable):
        super().__init__()
        self.heads, self.dropout, self.attn_fn = heads, dropout, attn_fn
        self.in_proj = nn.Linear(dim, 3 * dim)  # W_q, W_k, W_v stacked (as in nn.MultiheadAttention)
        self.out_proj = nn.Linear(dim, dim)  # W_o
        self.linear1, self.linear2 = nn.Linear(dim, dim), nn.Linear(dim, dim)  # FFN of width C (= dim_feedforward)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # OFFICIAL CODE: nn.MultiheadAttention's init (xavier-uniform W_q, W_k, W_v; zero in/out biases)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C), N = samples in the mini-batch
        n, c = x.shape
        p = self.dropout if self.training else 0.0
        # NOTE: the official code runs encoder(x.unsqueeze(1)) with batch_first=False, i.e. (seq = N, batch = 1, C):
        # the mini-batch IS the sequence. Here: one "sequence" of N tokens, H heads of size C / H.
        q, k, v = self.in_proj(x).view(n, 3, self.heads, c // self.heads).permute(1, 2, 0, 3).unsqueeze(1)
        a = self.attn_fn(q, k, v, p)  # (1, H, N, d_h): sample i = sum_j A_ij v_j, j over the whole batch
        a = self.out_proj(a.squeeze(0).permute(1, 0, 2).reshape(n, c))  # (N, C): heads concatenated, W_o
        x = self.norm1(x + F.dropout(a, p, self.training))  # (N, C) post-LN residual
        ffn = self.linear2(F.dropout(F.relu(self.linear1(x)), p, self.training))  # (N, C)
        return self.norm2(x + F.dropout(ffn, p, self.training))  # (N, C) = X'


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1 conv) shortcut, then ReLU (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class Net(nn.Module):
    """Backbone f -> features X (N, C); in training with BatchFormer: X_cat = [X; BF(X)], y_cat = [y; y];
    the shared classifier g scores X_cat. In eval the module is bypassed: logits = g(f(x))."""

    def __init__(self, args: Args, n_classes: int, use_bf: bool, attn_fn: Callable):
        super().__init__()
        layers, cin = [nn.Conv2d(3, args.widths[0], 3, args.stem_stride, 1, bias=False), nn.BatchNorm2d(args.widths[0]),
                       nn.ReLU()], args.widths[0]
        for s, (w, nb) in enumerate(zip(args.widths, args.blocks)):
            for b in range(nb):
                layers.append(BasicBlock(cin, w, 2 if (s > 0 and b == 0) else 1))
                cin = w
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # f: (N, 3, H, W) -> (N, C)
        self.bf = BatchFormerLayer(cin, args.heads, args.bf_dropout, attn_fn) if use_bf else None
        self.classifier = nn.Linear(cin, n_classes)  # g, shared by X and X'

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone((x - 0.5) / 0.25)  # (N, C)
        if self.training and self.bf is not None:  # Alg. 1: `if not is_training: return x, y`
            feats = torch.cat([feats, self.bf(feats)], dim=0)  # (2N, C): [X; X'], gradients of both reach f
            y = torch.cat([y, y], dim=0)  # (2N,) labels duplicated for the BatchFormer half
        return self.classifier(feats), y  # (N or 2N, K): ONE classifier for both halves


# ---------------------------------------------------------------------------------------------------------------------
# 4. Losses and training
# ---------------------------------------------------------------------------------------------------------------------
def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax (Ren et al., 2020): -log( pi_y e^{z_y} / sum_j pi_j e^{z_j} ) = CE(z + log pi, y)."""
    return F.cross_entropy(logits + log_prior, y)  # log_prior: (K,), broadcast over the (N or 2N) rows


def lr_at(step: int, total: int, per_epoch: int, args: Args) -> float:
    """Linear warm-up, then cosine to 0 or steps x0.1 at 80 % and 90 % of training."""
    warm = args.warmup_epochs * per_epoch
    if step < warm:
        return args.lr * (step + 1) / warm
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    return args.lr * (0.1 ** ((step >= 0.8 * total) + (step >= 0.9 * total)))


def train(model: Net, data: dict, loss_name: str, args: Args, seed: int, name: str) -> list[dict]:
    x, y = data["x_train"], data["y_train"]  # (n, 3, 32, 32), (n,) on the device
    counts = torch.bincount(y, minlength=data["n_classes"]).float()
    log_prior = torch.log(counts.clamp(min=1) / counts.sum())  # (K,) log pi_c; used by Balanced Softmax only
    bs = min(args.batch, len(y))
    per_epoch, gen = len(y) // bs, torch.Generator().manual_seed(seed)
    total = args.epochs * per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    fwd = model
    if args.compile:
        print("compiling the model (tens of seconds)...", flush=True)
        fwd = torch.compile(model)
    model.train()
    progress, history, step = shared.Progress(name, total), [], 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y), generator=gen).to(y.device)
        for i in range(per_epoch):  # drop_last: every batch has bs samples of context
            idx = perm[i * bs:(i + 1) * bs]
            xb = x[idx]  # (B, 3, 32, 32)
            flip = (torch.rand(bs, generator=gen) < 0.5).to(xb.device)
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)  # random horizontal flip
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, per_epoch, args)
            logits, yy = fwd(xb, y[idx])  # (B or 2B, K), (B or 2B,)
            loss = balanced_softmax_loss(logits, yy, log_prior) if loss_name == "BS" else F.cross_entropy(logits, yy)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            progress.update(step, loss=loss.item())
        history.append({"model": name, "epoch": epoch + 1, "train/loss": float(loss.item())})
    return history


# ---------------------------------------------------------------------------------------------------------------------
# 5. Evaluation: overall and Many / Medium / Few accuracy on the balanced test set
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: Net, x: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    model.eval()  # BatchFormer bypassed: predictions never depend on the other test images
    return torch.cat([model(x[i:i + chunk])[0].argmax(-1) for i in range(0, len(x), chunk)])


def split_of(counts: list[int], args: Args) -> list[str]:
    return ["many" if n > args.many_above else "few" if n < args.few_below else "medium" for n in counts]


def evaluate(model: Net, data: dict, args: Args) -> tuple[dict, list[float]]:
    pred, y = predict(model, data["x_test"]).cpu().numpy(), data["y_test"].cpu().numpy()
    per_class = [float((pred[y == c] == c).mean()) for c in range(data["n_classes"])]
    splits = np.array(split_of(data["counts"], args))
    out = {"acc_all": float((pred == y).mean())}
    for s in ("many", "medium", "few"):  # split accuracy = mean of the per-class accuracies (balanced test set)
        out[f"acc_{s}"] = float(np.mean(np.array(per_class)[splits == s])) if (splits == s).any() else float("nan")
    return out, per_class


@torch.no_grad()
def mechanism_checks(model: Net, x: torch.Tensor) -> dict:
    """Card's checks on a trained BF model: (a) in eval, logits == g(f(x)) exactly (the module is removed);
    (b) with dropout 0, the reference and fused attention give the same BatchFormer output (within 1e-5)."""
    model.eval()
    logits = model(x)[0]
    feats = model.backbone((x - 0.5) / 0.25)  # (N, C)
    direct = model.classifier(feats)  # (N, K): g(f(x)), no BatchFormer anywhere
    outs = []
    for fn in (attention_reference, attention_fused):
        model.bf.attn_fn = fn
        outs.append(model.bf(feats))  # eval mode: dropout 0 inside the layer
    return {"eval_equals_no_bf": bool(torch.equal(logits, direct)),
            "fused_vs_reference_max_err": float((outs[0] - outs[1]).abs().max())}


# ---------------------------------------------------------------------------------------------------------------------
# 6. Benchmark: reference vs fused attention over the batch, eager vs compiled training step
# ---------------------------------------------------------------------------------------------------------------------
def bench(args: Args, device: torch.device) -> dict:
    # ImageNet-LT / ResNet-10 shapes of the paper: C = 512 features, 4 heads, a mini-batch of 256 samples
    N, H, dh = 256, 4, 512 // 4
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, N, dh, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3))
    ref32 = attention_reference(q.float(), k.float(), v.float())
    err = (attention_fused(q, k, v).float() - ref32).abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    if err > tol:
        raise RuntimeError(f"fused attention differs from the reference by {err:.2e} (> {tol}) at the bench shapes")
    shape = f"N={N} H={H} d_h={dh} {str(dtype)[6:]}"
    rows = []
    for what, fn_of in [("batch attention fwd", lambda f: lambda: f(q, k, v)),
                        ("batch attention fwd+bwd", lambda f: lambda: f(q, k, v).sum().backward())]:
        rows.append({"what": f"{what} ({shape})", "reference_ms": shared.benchmark(fn_of(attention_reference), device),
                     "fused_ms": shared.benchmark(fn_of(attention_fused), device)})
    xb = torch.rand(args.batch, 3, 32, 32, generator=gen).to(device)
    yb = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    step_ms = []
    for compiled in (False, True):  # one CE + BF training step of this run's network
        shared.seed_everything(0)
        model = Net(args, 10, True, ATTENTION[args.attn]).to(device).train()
        opt, fwd = torch.optim.SGD(model.parameters(), lr=0.01), (torch.compile(model) if compiled else model)

        def step():
            logits, yy = fwd(xb, yb)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits, yy).backward()
            opt.step()

        if compiled:
            print("compiling the model (tens of seconds)...", flush=True)
        step_ms.append(shared.benchmark(step, device, warmup=3, repeats=10))
    rows.append({"what": f"train step eager vs compile (widths {args.widths}, B={args.batch}, attn={args.attn})",
                 "reference_ms": step_ms[0], "fused_ms": step_ms[1]})
    return shared.save_bench(args, SLUG, device, rows, max_abs_err=err)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Main
# ---------------------------------------------------------------------------------------------------------------------
PAPER_NUMBERS = {  # official README / paper tables: (base, base + BatchFormer)
    "ImageNet-LT RIDE ResNet-10": {"All": (44.7, 45.7), "Many": (57.0, 56.3), "Medium": (40.3, 42.1),
                                   "Few": (25.5, 28.3)},
    "ImageNet-LT PaCo ResNet-50": {"All": (57.0, 57.4), "Many": (64.8, 62.7), "Medium": (55.9, 56.7),
                                   "Few": (39.1, 42.1)},
}


def build_data(args: Args, seed: int, device: torch.device) -> dict:
    d = load_cifar_lt(args, seed) if args.data_dir else make_procedural(args, seed)
    n_classes = int(d["y_test"].max()) + 1
    counts = np.bincount(d["y_train"], minlength=n_classes).tolist()
    return {"x_train": torch.from_numpy(d["x_train"]).to(device), "y_train": torch.from_numpy(d["y_train"]).to(device),
            "x_test": torch.from_numpy(d["x_test"]).to(device), "y_test": torch.from_numpy(d["y_test"]).to(device),
            "n_classes": n_classes, "counts": counts}


def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    torch.set_flush_denormal(True)  # NOTE: weight decay can push weights into float32 denormals (slow on x86)
    if args.bench:
        return shared.seed_everything(args.seed) or bench(args, device)
    t_start, attn_fn = time.perf_counter(), ATTENTION[args.attn]
    runs = {name: [] for name in MODELS}  # per training run: (metrics, per-class accuracy)
    history, checks_bf, counts = [], [], None
    for r in range(args.repeats):
        run_seed = args.seed * args.repeats + r
        data = build_data(args, run_seed, device)
        counts = data["counts"]
        print(f"run {r + 1}/{args.repeats} (seed {run_seed}): train counts per class {counts}", flush=True)
        for name in MODELS:
            shared.seed_everything(run_seed)  # the same init and batch order for all four models of this run
            model = Net(args, data["n_classes"], use_bf=name.endswith("BF"), attn_fn=attn_fn).to(device)
            history += train(model, data, name.split()[0], args, run_seed, f"{name} run {r + 1}")
            runs[name].append(evaluate(model, data, args))
            print(f"  {name} run {r + 1}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in runs[name][-1][0].items()),
                  flush=True)
            if model.bf is not None:
                checks_bf.append(mechanism_checks(model, data["x_test"][:64]))
                model.bf.attn_fn = attn_fn

    results, per_class = {}, {}
    for name, rs in runs.items():
        results[name] = {m: float(np.mean([x[0][m] for x in rs])) for m in rs[0][0]}
        results[name] |= {f"{m}_std": float(np.std([x[0][m] for x in rs])) for m in ("acc_all", "acc_few")}
        per_class[name] = np.mean([x[1] for x in rs], axis=0).tolist()

    # ---- the claim (card's pass criteria, seed means) -------------------------------------------------------------
    pts = lambda a, b, m: 100 * (results[a][m] - results[b][m])  # noqa: E731  difference in accuracy points
    checks = {
        "Few(+BF) - Few(base) >= +2.0 points for CE or BS": max(pts("CE + BF", "CE", "acc_few"),
                                                                pts("BS + BF", "BS", "acc_few")) >= 2.0,
        "All(CE + BF) >= All(CE) - 0.5 points": pts("CE + BF", "CE", "acc_all") >= -0.5,
        "All(BS + BF) >= All(BS) - 0.5 points": pts("BS + BF", "BS", "acc_all") >= -0.5,
        "eval logits of the BF models == the no-BF path (exactly)": all(c["eval_equals_no_bf"] for c in checks_bf),
        "BatchFormer fused == reference at dropout 0 (max err <= 1e-5)":
            max(c["fused_vs_reference_max_err"] for c in checks_bf) <= 1e-5,
    }
    claim = {"text": "adding BatchFormer raises Few-class accuracy by >= 2 points for CE or Balanced Softmax and "
                     "costs at most 0.5 point overall for both, with the module removed at test time",
             "passed": bool(all(checks.values())), "checks": {k: bool(v) for k, v in checks.items()}}

    # ---- the table ------------------------------------------------------------------------------------------------
    header = ["metric", "CE + BF (method)", "CE (baseline)", "BS + BF", "BS", "paper RIDE RN-10 ImNet-LT base -> +BF"]
    rows = []
    for m, label in (("acc_all", "All"), ("acc_many", "Many"), ("acc_medium", "Medium"), ("acc_few", "Few")):
        paper = "{} -> {}".format(*PAPER_NUMBERS["ImageNet-LT RIDE ResNet-10"][label])
        rows.append([f"{label} acc %"] + [100 * results[n][m] for n in ("CE + BF", "CE", "BS + BF", "BS")] + [paper])
    print(f"\nmeans over {args.repeats} training run(s); train counts per class of the last run: {counts}")
    shared.print_table(header, rows, claim)
    for check, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {check}")

    plot(per_class, results, counts, args)
    key = {"metric": "acc_few", "method": "CE + BF", "baseline": "CE", "higher_is_better": True}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=PAPER_NUMBERS, history=history, per_class=per_class, counts=counts,
                               mechanism=checks_bf, wall_s=time.perf_counter() - t_start)


def plot(per_class: dict, results: dict, counts: list[int], args: Args) -> None:
    """Per-class test accuracy against the class's training count, and Many / Medium / Few / All bars."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    ax, classes = axes[0], np.arange(len(counts))
    for name, style in zip(MODELS, ("C0--", "C0-", "C3--", "C3-")):
        ax.plot(classes, 100 * np.array(per_class[name]), style, marker="o", label=name)
    ax.set(xlabel="class (sorted by training images)", ylabel="test accuracy %", title="per-class accuracy")
    twin = ax.twinx()
    twin.bar(classes, counts, color="grey", alpha=0.2)
    twin.set(ylabel="training images", yscale="log")
    ax.legend(fontsize=8)
    groups, width = ("acc_all", "acc_many", "acc_medium", "acc_few"), 0.2
    for j, name in enumerate(MODELS):
        axes[1].bar(np.arange(4) + (j - 1.5) * width, [100 * results[name][g] for g in groups], width, label=name)
    axes[1].set(xticks=range(4), xticklabels=["All", "Many", "Medium", "Few"], ylabel="test accuracy %",
                title=f"long-tailed accuracy (rho = {args.imbalance:g}, mean of {args.repeats} runs)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(shared.run_path(args, SLUG, ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
