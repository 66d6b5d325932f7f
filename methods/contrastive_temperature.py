"""Understanding the Behaviour of Contrastive Loss (Feng Wang, Huaping Liu, CVPR 2021)
arXiv:2012.09740  https://arxiv.org/abs/2012.09740  (cited by section, see Implementation details 1)
Official code: none released (the uniformity metric is Wang & Isola 2020's, SsnL/align_uniform).

The paper in a few lines: the softmax contrastive loss is hardness-aware (each negative's gradient is its softmax
weight), and tau sets how sharply it focuses on the nearest negatives. Small tau: uniform embeddings that push
similar instances apart (low tolerance); large tau: tolerant but not uniform; accuracy peaks in between (the
uniformity-tolerance dilemma). Explicit hard negatives remove the dilemma, and rescue even a linear "simple" loss.

Reproduces: on scikit-learn's 8x8 digits (1297 train / 500 test, labels used only for evaluation), instance
discrimination with a memory bank at tau in {1.0, 0.5, 0.2, 0.07}: uniformity rises and tolerance falls as tau
falls; kNN accuracy at tau = 1.0 is clearly below tau = 0.2/0.5; the hard contrastive loss at tau = 1.0 recovers
accuracy and uniformity; the simple loss fails and its hard variant closes most of the gap (card criteria 1-5).

Run:
  python methods/contrastive_temperature.py                        # default: CPU, about 20 s on 2 cores
  python methods/contrastive_temperature.py --preset smoke         # seconds, same code path
  python methods/contrastive_temperature.py --preset paper --device cuda --data-dir cifar-10-batches-py
  python methods/contrastive_temperature.py --bench                # literal vs fused bank loss; eager vs compile
  python methods/contrastive_temperature.py --negatives inbatch    # SimCLR-style in-batch negatives, no bank
  python methods/contrastive_temperature.py --help

Expected (default preset, seed 0, 2 threads: 22 s on a quiet 2-core CPU):
  | run             | kNN acc % | probe acc % | U     | T      | H(r)  | paper (qualitative)  |
  |-----------------|-----------|-------------|-------|--------|-------|----------------------|
  | infonce_tau1    | 92.8      | 98.2        | 2.466 | 0.7084 | 7.069 | acc drops at 0.7-1.0 |
  | infonce_tau0.5  | 95.4      | 98.6        | 2.702 | 0.6588 | 6.83  |                      |
  | infonce_tau0.2  | 97.4      | 98.6        | 3.075 | 0.4831 | 5.819 | peak near 0.2-0.3    |
  | infonce_tau0.07 | 98.2      | 97.8        | 3.109 | 0.4078 | 3.449 | U high, T low        |
  | hard_tau1       | 97.8      | 97.6        | 3.033 | 0.547  | 7.116 | less tau-sensitive   |
  | simple          | 83.4      | 98.2        | 1.847 | 0.7141 | -     | far worse            |
  | hard_simple     | 98.2      | 97.4        | 2.929 | 0.6056 | -     | competitive          |
  | random_init     | 95.4      | 98          | 0.496 | 0.9211 | -     | floor                |
  | supervised      | 98.4      | 99.2        | 2.635 | 0.7671 | -     | ceiling              |
  CLAIM HOLDS (criteria 1-5 all pass); report only: kNN at tau=0.07 below the best ordinary tau: False.
  Seeds 1 and 2 (1 thread each; the thread count moves the numbers slightly) also pass all five: kNN at tau 1.0 / 0.5
  / 0.2 / 0.07 = 94.8 / 96.2 / 98.2 / 98.0 and 93.4 / 96.2 / 98.0 / 97.6; U 2.46 -> 2.68 -> 3.03 -> 3.09 and 2.44 ->
  2.67 -> 3.07 -> 3.09; T 0.73 -> 0.68 -> 0.50 -> 0.43 and 0.70 -> 0.66 -> 0.48 -> 0.42; hard tau=1.0 98.2 and 97.6 (U
  3.01, 3.00); simple 87.0 and 84.6, hard simple 98.2 and 98.0. On both, tau = 0.07 is just below tau = 0.2 (the
  paper's non-monotone peak).
  What this shows and what it does not:
    - Holds: U rises and T falls as tau falls; accuracy drops at large tau; the hard loss at tau = 1.0 gets
      small-tau uniformity with more tolerance (T 0.55 vs 0.41-0.43 at tau 0.07) and the best accuracy; the simple
      loss trails by 11-15 points and its hard variant recovers fully.
    - Weak here: the drop at SMALL tau (0.07 vs 0.2) is at most 0.4 points, because 8x8 digits are nearly
      separable in pixel space (raw-pixel kNN: 97.8%, the untrained encoder: 95.4%). The linear probe on the
      backbone saturates at 98-99% for every run and separates nothing; kNN on f is the informative score.
    - Without BatchNorm in the MLP the hard losses were fragile: hard_frac 0.1 collapsed (U 0.02, T 0.998, seed 0)
      and 0.25 failed criterion 4 on seed 1 (kNN 80 vs 85). With BatchNorm (as in the paper's ResNets) 0.1 and 0.25
      both work (seed 0, hard tau = 1.0 at 0.1: kNN 97.6, U 3.19, T 0.40).

Implementation details:
  1. Symbols as in the paper (Sec. 3): f = encoder on the unit sphere, g = memory bank, s_ij = f(x_i)^T g(x_j).
     Equation and section numbers could not be checked against the paper's text; formulas are cited by section as
     recalled: loss, P_ij, gradients, r_i, limits, simple loss (Sec. 3); U and T (Sec. 4); the hard loss (Sec. 5).
  2. NPID instance discrimination: each step draws one augmented view of a batch; the anchor's positive is its own
     memory-bank entry, s_ii = f(x_i) . v_i, and its negatives are all the other entries (1296 per anchor). The bank
     holds one 64-d unit vector per training image, initialised at random on the sphere and updated after each step
     as v_i <- normalise(0.5 v_i + 0.5 f(x_i)). `--negatives inbatch` instead uses two views and the batch (SimCLR).
  3. Hard losses select, per anchor and without gradient, the K = hard_frac * #negatives most similar negatives
     (the anchor's own entry never among them) and sum only over those.
  4. The simple loss is -s_ii + lambda * sum_k s_ik with lambda = 1 / (number of negatives in the sum): the mean
     negative similarity, for both the plain and the hard variant.
  5. Metrics on the 500 test images: uniformity U = -log mean_{x != y} exp(-2 ||f(x) - f(y)||^2) (computed as a
     logsumexp), tolerance T = mean cosine over same-class pairs x != y (the conditional mean), weighted kNN
     accuracy (k = 20, votes exp(s/0.07), NPID) against the training images, all on the normalised 64-d output f;
     the linear probe (softmax regression, L-BFGS) on the 256-d backbone features; H(r) = mean entropy of the
     relative penalty r_i of test anchors over the training images at the run's tau.
  6. Every run restarts from the same seed: same initial weights, bank and batch order for every loss and tau.
     Floor: the untrained encoder. Ceiling: the same encoder trained with labels (cross-entropy, a linear layer on
     f, logits x 10).
  7. Encoder: Linear 64-256, BatchNorm, ReLU, Linear 256-256, BatchNorm, ReLU (the backbone, 256-d, for the probe),
     then Linear 256-64 and L2 normalisation (f). Adam, lr 1e-3, batch 128, 60 epochs (600 steps) for every run.
  8. K = 0.25 x 1296 = 324 hard negatives: the paper's informative interval was about 4096 of a 16384 bank (card,
     unverified); the card's CPU target said 0.1, which also passes (see above).

Deviations from the paper:
  1. Data and scale: sklearn digits and an MLP 64-256-256 -> 64-d encoder instead of CIFAR/SVHN/ImageNet-100 and a
     ResNet-18 with a 128-d output; 60 epochs with Adam instead of 200 with SGD. `--data-dir` + `--preset paper`
     read CIFAR-10's python pickles and use a CIFAR-stem ResNet-18.
  2. Only the NPID memory bank (and SimCLR's in-batch negatives); the paper also trains with a MoCo-style momentum
     encoder and queue. The bank holds the 1297 training images (the paper's bank: 16384 entries).
  3. The kNN accuracy is the main score at CPU scale (the paper reports linear accuracy); both are printed.
  4. Augmentations adapted to 8x8 digits: +-1 px shift, +-10 degree rotation, intensity x[0.8, 1.2], Gaussian noise
     0.05, a 2x2 erase with p = 0.25 (the paper uses crops, flips, colour jitter and grayscale).
  5. Tolerance is the conditional mean over same-class pairs (the paper's formula reads as an unconditional mean
     with an indicator; its plotted values behave like the conditional one).
  6. `--preset paper` keeps Adam and this file's augmentations (scaled to 32x32) instead of the paper's SGD recipe,
     and uses CIFAR-10 only (no CIFAR-100 / SVHN / ImageNet-100 loaders).
"""

from __future__ import annotations

import math
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "contrastive_temperature"
PAPER = "Understanding the Behaviour of Contrastive Loss"
ARXIV = "2012.09740"


# ---- 0. Arguments ----------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """Contrastive loss at several temperatures, its hard-negative variant and the simple loss: uniformity, tolerance,
    kNN and linear-probe accuracy."""

    preset: str = "default"
    """name of the preset (set by --preset); names the output files"""
    seed: int = 0
    """seed of the weights, the memory bank, the batch order and the augmentations (the split is fixed)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    compile: bool = False
    """wrap the encoder and the loss in torch.compile (slow to start on CPU)"""
    bench: bool = False
    """only time the literal bank similarity + loss against the fused one, and a train step eager vs compiled"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    data_dir: Optional[str] = None
    """folder with CIFAR-10's python pickles (data_batch_1..5, test_batch); default: sklearn's digits"""
    taus: tuple[float, ...] = (1.0, 0.5, 0.2, 0.07)
    """temperatures of the ordinary contrastive loss (the criteria read 1.0, 0.5, 0.2 and 0.07)"""
    hard_taus: tuple[float, ...] = (1.0,)
    """temperatures of the hard contrastive loss (top-K negatives only)"""
    simple: bool = True
    """also train the simple loss and the hard simple loss"""
    baselines: bool = True
    """also evaluate the untrained encoder (floor) and a supervised cross-entropy encoder (ceiling)"""
    negatives: str = "bank"
    """bank (NPID memory bank of all training images) or inbatch (the other images of the batch, SimCLR)"""
    bank_momentum: float = 0.5
    """memory-bank update v_i <- normalise(m v_i + (1 - m) f(x_i))"""
    hard_frac: float = 0.25
    """K = hard_frac * (number of negatives per anchor) for the hard losses (about 4096 of the paper's 16384)"""
    arch: str = "mlp"
    """encoder: mlp (64-256-256, digits) or resnet18 (CIFAR stem, for --data-dir)"""
    hidden: int = 256
    """width of the MLP backbone (its output feeds the linear probe)"""
    dim: int = 64
    """dimension of the normalised embedding f (the paper: 128)"""
    epochs: int = 60
    """training epochs per run (the same for every loss and tau)"""
    batch_size: int = 128
    """anchors per step"""
    lr: float = 1e-3
    """Adam learning rate"""
    knn_k: int = 20
    """neighbours of the weighted kNN classifier"""
    probe_iters: int = 100
    """L-BFGS iterations of the linear probe"""
    max_train: int = 0
    """use only the first max_train training images (0 = all; smoke runs)"""


PRESETS = {
    "smoke": Args(preset="smoke", epochs=1, max_train=256, batch_size=64, probe_iters=5),
    # DEVIATION: CIFAR-10 with a ResNet-18 and 128-d output, but Adam and the same code path as the CPU default.
    "paper": Args(preset="paper", taus=(1.0, 0.7, 0.3, 0.2, 0.07), hard_taus=(0.2, 1.0), arch="resnet18", dim=128,
                  epochs=200, batch_size=256, lr=3e-4, knn_k=200, probe_iters=300),
}


def validate(args: Args) -> None:
    """Stop with one sentence on a bad argument (shared.run turns it into `error: ...` and exit status 2)."""
    if not args.taus or min(args.taus + args.hard_taus) <= 0:
        raise shared.UsageError("every temperature in --taus and --hard-taus must be positive (and --taus non-empty).")
    if args.negatives not in ("bank", "inbatch"):
        raise shared.UsageError(f"unknown --negatives {args.negatives!r}; choose bank or inbatch.")
    if args.arch not in ("mlp", "resnet18"):
        raise shared.UsageError(f"unknown --arch {args.arch!r}; choose mlp or resnet18.")
    if not 0 <= args.bank_momentum < 1:
        raise shared.UsageError("--bank-momentum must lie in [0, 1).")
    if not 0 < args.hard_frac <= 1:
        raise shared.UsageError("--hard-frac must lie in (0, 1].")
    if min(args.epochs, args.batch_size, args.dim, args.hidden, args.knn_k, args.probe_iters) < 1:
        raise shared.UsageError("--epochs, --batch-size, --dim, --hidden, --knn-k and --probe-iters must be >= 1.")
    if args.batch_size < 2 or args.max_train < 0 or 0 < args.max_train < 2 * args.batch_size:
        raise shared.UsageError("--batch-size must be >= 2 and --max-train 0 or at least two batches.")
    if args.lr <= 0:
        raise shared.UsageError("--lr must be positive.")


# ---- 1. Data: sklearn digits (fixed stratified split) or CIFAR-10 pickles, and the two-view augmentation -------------
def load_digits_split() -> tuple:
    """1297 train / 500 test, stratified, from a fixed seed (independent of --seed). Pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    x, y = load_digits(return_X_y=True)  # (1797, 64) in [0, 16]
    rng = np.random.default_rng(2021)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: 50] for c in range(10)])  # 50 per class
    train = np.setdiff1d(np.arange(len(y)), test)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8)
    labels = torch.tensor(y)
    return images[train], labels[train], images[test], labels[test]


def load_cifar10(folder: str) -> tuple:
    """CIFAR-10's python version: data_batch_1..5 and test_batch, each a pickle {b'data': (n, 3072) uint8,
    b'labels': n ints}. Returns float images (n, 3, 32, 32) in [0, 1] and labels."""
    parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    out = []
    for names in parts.values():
        xs, ys = [], []
        for name in names:
            path = Path(folder) / name
            if not path.is_file():
                raise shared.UsageError(f"missing file {path}; --data-dir expects CIFAR-10's python pickles.")
            try:
                with open(path, "rb") as fh:
                    batch = pickle.load(fh, encoding="bytes")
                data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
            except Exception as e:  # not a pickle, or a pickle without the two keys
                raise shared.UsageError(f"cannot read {path} as a CIFAR-10 pickle ({type(e).__name__}).") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise shared.UsageError(f"{path} must hold b'data' of shape (n, 3072) and n b'labels', "
                                        f"got {data.shape} and {labels.shape}.")
            if labels.min() < 0 or labels.max() > 9:
                raise shared.UsageError(f"{path} has labels outside 0..9.")
            xs.append(torch.tensor(data, dtype=torch.float32).reshape(-1, 3, 32, 32) / 255.0)
            ys.append(torch.tensor(labels, dtype=torch.long))
        out += [torch.cat(xs), torch.cat(ys)]
    return tuple(out)


def augment(x: torch.Tensor) -> torch.Tensor:
    """One random view per image: shift (pad + random crop), rotation +-10 deg, intensity, noise, a random erase.
    x (B, C, S, S) in [0, 1]; randomness from the global torch generator (seeded per run)."""
    B, S, dev = x.shape[0], x.shape[-1], x.device
    shift_px = max(1, S // 8)  # +-1 px on 8x8 digits, +-4 px on 32x32 CIFAR
    # DEVIATION: digits-sized augmentations (docstring deviation 4); shift + rotation as one affine resampling.
    angle = (torch.rand(B, device=dev) * 2 - 1) * math.radians(10)  # (B,)
    shift = torch.randint(-shift_px, shift_px + 1, (B, 2), device=dev).float() * 2 / S  # (B, 2) in grid units
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, S, S, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, S, S)
    x = x * (0.8 + 0.4 * torch.rand(B, 1, 1, 1, device=dev))  # intensity x U[0.8, 1.2]
    x = x + 0.05 * torch.randn_like(x)  # Gaussian noise, sigma 0.05
    e = max(2, S // 4)  # erase a 2x2 patch (8x8) / 8x8 patch (32x32) with probability 0.25
    top, left = (torch.randint(0, S - e + 1, (B, 1, 1), device=dev) for _ in range(2))
    rows, cols = torch.arange(S, device=dev)[None, :, None], torch.arange(S, device=dev)[None, None, :]
    patch = (rows >= top) & (rows < top + e) & (cols >= left) & (cols < left + e)  # (B, S, S)
    patch = patch & (torch.rand(B, 1, 1, device=dev) < 0.25)
    return (x * (~patch)[:, None]).clamp(0, 1)


# ---- 2. Encoder: backbone (for the linear probe) + linear head on the unit sphere (f) --------------------------------
class Encoder(nn.Module):
    """x -> (h, f): h the backbone features (linear probe), f = normalise(W h) on the unit sphere (all the metrics)."""

    def __init__(self, in_shape: tuple, arch: str, hidden: int, dim: int):
        super().__init__()
        if arch == "mlp":  # DEVIATION: an MLP on 8x8 digits instead of a ResNet-18 (docstring deviation 1)
            # BatchNorm as in the paper's ResNet backbones
            self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.BatchNorm1d(hidden),
                                          nn.ReLU(), nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
            width = hidden
        else:
            self.backbone, width = resnet18_cifar(in_shape[0]), 512
        self.head = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> tuple:
        h = self.backbone(x)  # (B, hidden)
        return h, F.normalize(self.head(h), dim=-1)  # (B, hidden), (B, dim) with ||f|| = 1


def resnet18_cifar(channels: int) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), global average pooling -> 512-d."""

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))

    layers, cin = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ---- 3. The losses: literal reference and fused path (same signature) ------------------------------------------------
# Inputs of both paths: z (B, d) the anchors f(x_i), bank (N, d) the candidates g(x_k), idx (B,) the bank row of each
# anchor's own image: g(x_i) = bank[idx_i] is its positive, every other row a negative (NPID). For SimCLR-style
# in-batch negatives, bank = f(second views) (B, d) and idx = arange(B). kind: "contrastive" or "simple";
# k: None (all negatives) or the K of the hard variant.
def loss_reference(z, bank, idx, tau: float, kind: str, k: Optional[int] = None) -> torch.Tensor:
    """The paper's formulas written out literally, one anchor at a time."""
    losses = []
    for i in range(z.shape[0]):
        s_i = bank @ z[i]  # (N,): s_ik = f(x_i)^T g(x_k)
        s_ii = s_i[idx[i]]  # the positive
        s_neg = s_i[torch.arange(bank.shape[0], device=bank.device) != idx[i]]  # (N-1,): the negatives k != i
        if k is not None:  # Sec. 5: the informative interval = the K largest s_ik, chosen without gradient
            order = torch.sort(s_neg.detach(), descending=True).indices
            s_neg = s_neg[order[:k]]  # (K,)
        if kind == "contrastive":
            # Sec. 3.1: L(x_i) = -log[ exp(s_ii/tau) / ( exp(s_ii/tau) + sum_{k != i} exp(s_ik/tau) ) ]
            pos = torch.exp(s_ii / tau)
            losses.append(-torch.log(pos / (pos + torch.exp(s_neg / tau).sum())))
        else:
            # Sec. 3.1 (simple loss): L_simple(x_i) = -s_ii + lambda * sum_{k != i} s_ik, lambda = 1/#negatives
            losses.append(-s_ii + s_neg.sum() / len(s_neg))
    return torch.stack(losses).mean()


def hard_mask(s_all: torch.Tensor, neg_mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: True at the K negatives with the largest similarity, per row; no gradient flows through it."""
    scores = s_all.detach().masked_fill(~neg_mask, float("-inf"))  # the positive's own entry can never be picked
    top = scores.topk(k, dim=1).indices  # (B, K)
    return torch.zeros_like(neg_mask).scatter(1, top, True)


def loss_from_sims(s_pos: torch.Tensor, s_all: torch.Tensor, neg_mask: torch.Tensor, tau: float, kind: str,
                   k: Optional[int] = None) -> torch.Tensor:
    """The losses on precomputed similarities: s_pos (B,), s_all (B, N), neg_mask (B, N) True = negative."""
    mask = neg_mask if k is None else hard_mask(s_all, neg_mask, k)  # (B, N)
    if kind == "contrastive":
        # L = -s_ii/tau + log( exp(s_ii/tau) + sum_k exp(s_ik/tau) ), as one logsumexp (no overflow at small tau)
        logits = torch.cat([s_pos[:, None], s_all.masked_fill(~mask, float("-inf"))], 1) / tau  # (B, 1 + N)
        return (torch.logsumexp(logits, 1) - s_pos / tau).mean()
    lam = 1.0 / mask.sum(1).to(s_all.dtype)  # (B,): lambda = 1 / (number of negatives in the sum)
    return (-s_pos + lam * torch.where(mask, s_all, torch.zeros_like(s_all)).sum(1)).mean()


def loss_fused(z, bank, idx, tau: float, kind: str, k: Optional[int] = None) -> torch.Tensor:
    """Same maths as loss_reference, batched: one matmul for all s_ik, masks instead of per-row gathers."""
    s_all = z @ bank.T  # (B, N)
    s_pos = s_all.gather(1, idx[:, None]).squeeze(1)  # (B,)
    neg_mask = torch.ones_like(s_all, dtype=torch.bool).scatter(1, idx[:, None], False)  # (B, N)
    return loss_from_sims(s_pos, s_all, neg_mask, tau, kind, k)


LOSS = {"fused": loss_fused, "reference": loss_reference}


# ---- 4. The analysis quantities: relative penalty, its entropy, uniformity, tolerance --------------------------------
def relative_penalty(s_neg: torch.Tensor, tau: float) -> torch.Tensor:
    """Sec. 3.1: r_i(s_ij) = exp(s_ij/tau) / sum_{k != i} exp(s_ik/tau), a Boltzmann distribution over the
    negatives. s_neg (B, M) -> r (B, M), rows sum to 1."""
    return torch.softmax(s_neg / tau, dim=-1)


def penalty_entropy(s_neg: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors of the entropy of r_i (nats): log M for uniform weights, 0 for one negative."""
    logr = torch.log_softmax(s_neg / tau, dim=-1)  # (B, M)
    return -(logr.exp() * logr).sum(-1).mean()


def uniformity(f: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Sec. 4 (Wang & Isola): U = -log E_{x != y} exp(-t ||f(x) - f(y)||^2), in log space. f (n, d) unit rows."""
    n = f.shape[0]
    d2 = (2 - 2 * f @ f.T).clamp_min(0)  # (n, n): ||a - b||^2 = 2 - 2 a.b on the sphere
    off = ~torch.eye(n, dtype=torch.bool, device=f.device)
    # NOTE: logsumexp(-t D2) - log(#pairs) == log mean exp(-t D2), without exp underflow for large t.
    return -(torch.logsumexp(-t * d2[off], 0) - math.log(n * (n - 1)))


def uniformity_direct(f: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """The same formula computed naively (exp, mean, log): the reference for the log-space version."""
    n = f.shape[0]
    d2 = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)  # (n, n)
    off = ~torch.eye(n, dtype=torch.bool, device=f.device)
    return -torch.exp(-t * d2[off]).mean().log()


def tolerance(f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sec. 4: T = E[ f(x)^T f(y) | l(x) = l(y), x != y ], the mean cosine over same-class pairs."""
    # DEVIATION: the paper writes E[(f(x)^T f(y)) 1{l(x)=l(y)}]; its plotted values behave like this conditional mean.
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=f.device)
    return (f @ f.T)[same].mean()


# ---- 5. Training -----------------------------------------------------------------------------------------------------
def train_contrastive(name: str, data: dict, args: Args, device: torch.device, tau: float, kind: str,
                      hard: bool) -> tuple:
    """Instance discrimination with one loss; returns the encoder and its history."""
    shared.seed_everything(args.seed)  # the same initial weights, bank and batch order for every run
    xtr = data["xtr"]
    n = len(xtr)
    model = Encoder(tuple(xtr.shape[1:]), args.arch, args.hidden, args.dim).to(device)
    bank = F.normalize(torch.randn(n, args.dim, device=device), dim=-1)  # (N, d): NPID's random initial memory
    n_neg = (n if args.negatives == "bank" else args.batch_size) - 1
    k = max(1, round(args.hard_frac * n_neg)) if hard else None
    # DEVIATION: Adam at a fixed lr for a fixed step budget (the paper: SGD, about 200 epochs).
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    encode, loss_fn = model, loss_fused
    if args.compile:
        print("compiling the encoder and the loss with torch.compile (this takes a while) ...", flush=True)
        encode, loss_fn = torch.compile(model), torch.compile(loss_fused)
    steps_per_epoch = n // args.batch_size  # drop the last partial batch: every step has B anchors
    progress, history, step = shared.Progress(name, args.epochs * steps_per_epoch), [], 0
    for epoch in range(args.epochs):
        perm = torch.randperm(n, device=device)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]  # (B,)
            if args.negatives == "bank":  # NPID: one view; its positive is its own memory entry
                _, z = encode(augment(xtr[idx]))  # (B, d)
                loss = loss_fn(z, bank, idx, tau, kind, k)
            else:  # SimCLR: two views; the other images' second views are the negatives
                _, z = encode(augment(xtr[idx]))  # (B, d)
                _, z2 = encode(augment(xtr[idx]))  # (B, d)
                loss = loss_fn(z, z2, torch.arange(len(idx), device=device), tau, kind, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.negatives == "bank":
                with torch.no_grad():  # NPID memory update: v_i <- normalise(m v_i + (1 - m) f(x_i))
                    m = args.bank_momentum
                    bank[idx] = F.normalize(m * bank[idx] + (1 - m) * z.detach(), dim=-1)
            step += 1
            progress.update(step, loss=loss.item())
        history.append({"run": name, "epoch": epoch + 1, "step": step, "train/loss": loss.item()})
    return model, history


def train_supervised(data: dict, args: Args, device: torch.device) -> tuple:
    """Ceiling: the same encoder trained with labels (cross-entropy on a linear classifier over f's logits)."""
    shared.seed_everything(args.seed)
    xtr, ytr = data["xtr"], data["ytr"]
    model = Encoder(tuple(xtr.shape[1:]), args.arch, args.hidden, args.dim).to(device)
    classifier = nn.Linear(args.dim, int(ytr.max()) + 1).to(device)
    opt = torch.optim.Adam([*model.parameters(), *classifier.parameters()], lr=args.lr)
    steps_per_epoch, history, step = len(xtr) // args.batch_size, [], 0
    progress = shared.Progress("supervised", args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), device=device)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            _, f = model(augment(xtr[idx]))
            loss = F.cross_entropy(classifier(f) * 10, ytr[idx])  # x10: a unit-norm f needs a scale to be confident
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            progress.update(step, loss=loss.item())
        history.append({"run": "supervised", "epoch": epoch + 1, "step": step, "train/loss": loss.item()})
    return model, history


# ---- 6. Evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(model: Encoder, x: torch.Tensor, chunk: int = 1024) -> tuple:
    model.eval()
    outs = [model(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    model.train()
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])  # (n, hidden), (n, d)


def knn_accuracy(ftr, ytr, fte, yte, k: int, sigma: float = 0.07) -> float:
    """Weighted kNN (NPID): the k most similar training embeddings vote for their class with weight exp(s/sigma)."""
    sims = fte @ ftr.T  # (n_test, n_train)
    top, nn_idx = sims.topk(min(k, len(ftr)), dim=1)  # (n_test, k)
    votes = torch.zeros(len(fte), int(ytr.max()) + 1, device=fte.device)
    votes.scatter_add_(1, ytr[nn_idx], (top / sigma).exp())
    return (votes.argmax(1) == yte).float().mean().item()


def linear_probe(htr, ytr, hte, yte, iters: int) -> float:
    """Softmax regression on standardised frozen backbone features, full-batch L-BFGS, small L2 penalty."""
    mu, sd = htr.mean(0), htr.std(0) + 1e-6
    a, b = (htr - mu) / sd, (hte - mu) / sd  # (n, hidden)
    W = torch.zeros(a.shape[1], int(ytr.max()) + 1, device=a.device, requires_grad=True)
    c = torch.zeros(W.shape[1], device=a.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, c], lr=1, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ W + c, ytr) + 1e-3 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # evaluate() runs under no_grad
        opt.step(closure)
    return ((b @ W + c).argmax(1) == yte).float().mean().item()


@torch.no_grad()
def evaluate(model: Encoder, data: dict, args: Args, tau: Optional[float]) -> tuple:
    """Uniformity, tolerance, kNN and probe accuracy; H(r) and the penalty curve r vs s at the run's tau."""
    htr, ftr = embed(model, data["xtr"])
    hte, fte = embed(model, data["xte"])
    out = {"knn_acc": knn_accuracy(ftr, data["ytr"], fte, data["yte"], args.knn_k),
           "probe_acc": linear_probe(htr, data["ytr"], hte, data["yte"], args.probe_iters),
           "uniformity": uniformity(fte).item(), "tolerance": tolerance(fte, data["yte"]).item()}
    curve = None
    if tau is not None:
        # NOTE: at most 1000 test anchors (all 500 on digits) keep the (anchors, n_train) tensors small on CIFAR.
        s_neg = fte[:1000] @ ftr.T  # (n_anchor, n_train): every training image is a negative of a test anchor
        out["entropy_r"] = penalty_entropy(s_neg, tau).item()
        # the relative penalty vs similarity: mean of M * r_i(s) in similarity bins (1 = the uniform weight)
        r = relative_penalty(s_neg, tau) * s_neg.shape[1]
        edges = torch.linspace(-1, 1, 21, device=s_neg.device)
        bins = torch.bucketize(s_neg.clamp(-1, 1 - 1e-6), edges[1:])  # (n_test, n_train) in 0..19
        tot = torch.zeros(20, device=s_neg.device).scatter_add_(0, bins.flatten(), r.flatten())
        cnt = torch.zeros(20, device=s_neg.device).scatter_add_(0, bins.flatten(), torch.ones_like(r).flatten())
        curve = {"s": ((edges[1:] + edges[:-1]) / 2).tolist(),
                 "r": [float(t / c) if c > 0 else float("nan") for t, c in zip(tot.tolist(), cnt.tolist())]}
    return out, curve


# ---- 7. Benchmark: literal vs fused bank loss, eager vs compiled train step ------------------------------------------
def run_bench(args: Args, device: torch.device) -> list[dict]:
    """At the paper's bank shape (16384 x 128; B = 256 on GPU, 128 on CPU): check, then time both loss paths."""
    B, N, d = (256 if device.type == "cuda" else 128), 16384, 128
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    z, bank = (F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device) for shape in ((B, d), (N, d)))
    idx = torch.randperm(N, generator=g)[:B].to(device)
    z.requires_grad_(True)
    rows = []
    for kind, k, tau in (("contrastive", None, 0.2), ("contrastive", round(0.25 * (N - 1)), 1.0)):
        label = f"{'hard ' if k else ''}contrastive loss over the bank (B={B}, N={N}, d={d})"
        ref, fused = (fn(z, bank, idx, tau, kind, k) for fn in (loss_reference, loss_fused))
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
        g_ref, g_fused = (torch.autograd.grad(v, z)[0] for v in (ref, fused))
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-3, atol=1e-7)
        print(f"checked: literal == fused for the {label} (loss and gradient)")
        fwd = lambda fn, a=(bank, idx, tau, kind, k): (lambda: fn(z.detach(), *a))  # noqa: E731
        both = lambda fn, a=(bank, idx, tau, kind, k): (lambda: torch.autograd.grad(fn(z, *a), z))  # noqa: E731
        t = lambda fn: shared.benchmark(fn, device, warmup=1, repeats=5)  # noqa: E731
        rows += [{"what": f"{label}: forward", "reference_ms": t(fwd(loss_reference)), "fused_ms": t(fwd(loss_fused))},
                 {"what": f"{label}: forward+backward", "reference_ms": t(both(loss_reference)),
                  "fused_ms": t(both(loss_fused))}]
    # one training step of the default model (augment, encode, bank loss, backward), eager vs torch.compile
    data = make_data(args, device)
    shared.seed_everything(args.seed)
    model = Encoder(tuple(data["xtr"].shape[1:]), args.arch, args.hidden, args.dim).to(device)
    mbank = F.normalize(torch.randn(len(data["xtr"]), args.dim, device=device), dim=-1)  # (n_train, dim)
    bidx = torch.arange(min(args.batch_size, len(data["xtr"])), device=device)  # (B,)
    xa = augment(data["xtr"][bidx])  # (B, C, S, S)

    def step(enc, lossf):
        def run():
            loss = lossf(enc(xa)[1], mbank, bidx, 0.2, "contrastive", None)
            return torch.autograd.grad(loss, list(model.parameters()))
        return run

    print("compiling the encoder and the loss with torch.compile (this takes a while) ...", flush=True)
    cenc, closs = torch.compile(model), torch.compile(loss_fused)
    for a, b in zip(step(cenc, closs)(), step(model, loss_fused)()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    rows.append({"what": "train step eager vs compile",
                 "reference_ms": shared.benchmark(step(model, loss_fused), device),
                 "fused_ms": shared.benchmark(step(cenc, closs), device)})
    return rows


# ---- 8. Figure: the uniformity-tolerance dilemma and the relative penalty vs similarity ------------------------------
def plot(path: Path, results: dict, curves: dict, args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ords = [(tau, results[f"infonce_tau{tau:g}"]) for tau in sorted(args.taus)]
    ax, taus = axes[0], [t for t, _ in ords]  # (a) U and T against tau, with kNN accuracy
    ax.plot(taus, [r["uniformity"] for _, r in ords], "o-", color="C0", label="uniformity U (ordinary)")
    ax.plot(taus, [r["tolerance"] for _, r in ords], "s-", color="C3", label="tolerance T (ordinary)")
    for tau in args.hard_taus:
        r = results[f"hard_tau{tau:g}"]
        ax.plot([tau], [r["uniformity"]], "*", ms=13, color="C0", label=f"U hard tau={tau:g}")
        ax.plot([tau], [r["tolerance"]], "*", ms=13, color="C3", label=f"T hard tau={tau:g}")
    ax.set(xscale="log", xlabel="temperature tau", ylabel="U / T", title="uniformity and tolerance vs tau")
    ax2 = ax.twinx()
    ax2.plot(taus, [100 * r["knn_acc"] for _, r in ords], "^--", color="C2", label="kNN acc (%)")
    ax2.set_ylabel("kNN accuracy (%)", color="C2")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]  # (b) the dilemma: every run as a point in the (T, U) plane, labelled with its accuracy
    for name, r in results.items():
        marker = "o" if name.startswith("infonce") else "*" if name.startswith("hard_tau") else "D"
        ax.scatter(r["tolerance"], r["uniformity"], marker=marker, s=60)
        ax.annotate(f"{name}\n{100 * r['knn_acc']:.1f}%", (r["tolerance"], r["uniformity"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.plot([r["tolerance"] for _, r in ords], [r["uniformity"] for _, r in ords], "-", color="grey", lw=0.8)
    ax.set(xlabel="tolerance T (same-class mean cosine)", ylabel="uniformity U", title="the dilemma (kNN acc)")
    ax = axes[2]  # (c) hardness-awareness: relative penalty (x #negatives) vs similarity, per tau
    for i, tau in enumerate(sorted(args.taus)):
        c = curves[f"infonce_tau{tau:g}"]
        ax.plot(c["s"], c["r"], "o-", ms=3, color=f"C{i}", label=f"tau={tau:g}")
    ax.set(yscale="log", xlabel="similarity s_ij to a negative", ylabel="M * r_i(s_ij)  (1 = uniform)",
           title="relative penalty on negatives vs similarity")
    ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


# ---- 9. Main: data, runs, the card's criteria, table, figure ---------------------------------------------------------
def make_data(args: Args, device: torch.device) -> dict:
    xtr, ytr, xte, yte = load_cifar10(args.data_dir) if args.data_dir else load_digits_split()
    xtr, ytr = (xtr[: args.max_train], ytr[: args.max_train]) if args.max_train else (xtr, ytr)
    if len(xtr) < 2 * args.batch_size:
        raise shared.UsageError(f"{len(xtr)} training images are fewer than two batches of --batch-size.")
    return {"xtr": xtr.to(device), "ytr": ytr.to(device), "xte": xte.to(device), "yte": yte.to(device)}


def judge(results: dict, args: Args) -> dict:
    """The card's pass criteria (1)-(5), on this run's numbers."""
    # DEVIATION: accuracy = weighted kNN on f (the paper's tables report linear accuracy; the probe is printed too).
    o = {tau: results.get(f"infonce_tau{tau:g}") for tau in (1.0, 0.5, 0.2, 0.07)}
    if any(v is None for v in o.values()):
        return {"text": "needs --taus to include 1.0, 0.5, 0.2 and 0.07", "passed": False, "checks": {}}
    path = [o[t] for t in (1.0, 0.5, 0.2, 0.07)]
    acc = {t: 100 * r["knn_acc"] for t, r in o.items()}
    best = max(100 * r["knn_acc"] for n, r in results.items() if n.startswith("infonce"))
    hard, simple, hsimple = results.get("hard_tau1"), results.get("simple"), results.get("hard_simple")
    checks = {
        "1. U strictly increases as tau goes 1.0 -> 0.5 -> 0.2 -> 0.07":
            all(a["uniformity"] < b["uniformity"] for a, b in zip(path, path[1:])),
        "2. T strictly decreases along the same path":
            all(a["tolerance"] > b["tolerance"] for a, b in zip(path, path[1:])),
        f"3. kNN(tau=1.0) {acc[1.0]:.1f} <= max(kNN(0.2), kNN(0.5)) {max(acc[0.2], acc[0.5]):.1f} - 2":
            acc[1.0] <= max(acc[0.2], acc[0.5]) - 2,
        "4. hard tau=1.0: kNN >= ordinary tau=1.0 + 3 and U(hard) > U(ordinary)" + (
            f" ({100 * hard['knn_acc']:.1f} vs {acc[1.0]:.1f})" if hard else " (not run)"):
            hard is not None and 100 * hard["knn_acc"] >= acc[1.0] + 3 and hard["uniformity"] > o[1.0]["uniformity"],
    }
    if simple and hsimple:
        s, h = 100 * simple["knn_acc"], 100 * hsimple["knn_acc"]
        checks[f"5. simple {s:.1f} <= best ordinary {best:.1f} - 5, hard simple {h:.1f} closes >= half the gap"] = (
            s <= best - 5 and h >= s + 0.5 * (best - s))
    else:
        checks["5. simple and hard simple losses (not run)"] = False
    text = ("as tau falls, uniformity rises and tolerance falls; accuracy at tau=1.0 trails tau=0.2/0.5; the hard "
            "contrastive loss fixes tau=1.0; the simple loss fails and its hard variant recovers (criteria 1-5)")
    report = f"kNN at tau=0.07 below the best ordinary tau (non-monotone peak): {acc[0.07] < best}"
    return {"text": text, "passed": all(checks.values()), "checks": checks, "report_only": report}


def main(args: Args) -> dict:
    validate(args)
    # NOTE: tiny gradients under Adam can leave float32 denormals that slow x86 CPUs down ~10x; flush them to zero.
    torch.set_flush_denormal(True)
    device = shared.pick_device(args.device)
    if args.bench:
        return shared.save_bench(args, SLUG, device, run_bench(args, device))
    t0 = time.perf_counter()
    data = make_data(args, device)
    runs = [(f"infonce_tau{t:g}", t, "contrastive", False) for t in args.taus]
    runs += [(f"hard_tau{t:g}", t, "contrastive", True) for t in args.hard_taus]
    if args.simple:
        runs += [("simple", None, "simple", False), ("hard_simple", None, "simple", True)]
    results, curves, history = {}, {}, []
    for name, tau, kind, hard in runs:
        model, hist = train_contrastive(name, data, args, device, 1.0 if tau is None else tau, kind, hard)
        results[name], curves[name] = evaluate(model, data, args, tau)
        history += hist
        print(f"  {name}: " + " | ".join(f"{k} {v:.4g}" for k, v in results[name].items()), flush=True)
    if args.baselines:
        shared.seed_everything(args.seed)
        floor = Encoder(tuple(data["xtr"].shape[1:]), args.arch, args.hidden, args.dim).to(device)
        results["random_init"], _ = evaluate(floor, data, args, None)
        sup, hist = train_supervised(data, args, device)
        results["supervised"], _ = evaluate(sup, data, args, None)
        history += hist

    claim = judge(results, args)
    paper = {"infonce_tau1": "acc drops at 0.7-1.0", "infonce_tau0.5": "", "infonce_tau0.2": "peak near 0.2-0.3",
             "infonce_tau0.07": "U high, T low", "hard_tau1": "less tau-sensitive", "simple": "far worse",
             "hard_simple": "competitive", "random_init": "floor", "supervised": "ceiling"}
    rows = [[name, 100 * r["knn_acc"], 100 * r["probe_acc"], r["uniformity"], r["tolerance"],
             r.get("entropy_r", "-"), paper.get(name, "")] for name, r in results.items()]
    shared.print_table(["run", "kNN acc %", "probe acc %", "U", "T", "H(r)", "paper (qualitative)"], rows, claim)
    for check, ok in claim["checks"].items():
        print(f"  [{'x' if ok else ' '}] {check}")
    print(f"  report only: {claim.get('report_only', '-')}")
    plot(shared.run_path(args, SLUG, ".png"), results, curves, args)
    key = {"metric": "knn_acc", "method": f"hard_tau{args.hard_taus[0]:g}" if args.hard_taus else runs[0][0],
           "baseline": f"infonce_tau{args.taus[0]:g}", "higher_is_better": True}
    paper_numbers = {"note": "unverified recollection (card): CIFAR-10 linear acc ~80% at tau=0.07, ~83-84% at the "
                             "peak tau=0.2-0.3, lower at 0.7-1.0; the hard loss is flat in tau (Table 2)"}
    results = {n: {k: float(v) for k, v in r.items()} for n, r in results.items()}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=paper_numbers, history=history, wall_s=time.perf_counter() - t0,
                               curves=curves)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
