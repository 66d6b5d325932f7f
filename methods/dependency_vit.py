"""Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention
(Ding, Shen, Fan, Chen, Chen, Luo, Tenenbaum, Gan, CVPR 2023)
arXiv:2304.03282  https://arxiv.org/abs/2304.03282
Official code: dingmyu/DependencyViT (the public snapshot holds only a LICENSE). The details marked (timm-port)
follow the only public code, Fredo Guan's from-scratch timm port (2023, with FIXMEs); the paper's text was not
readable when this file was written, so equations are cited by section / Fig. 2 and by the card, not by number.

The method in a few lines
    Self-attention lets every token *gather* from the others (softmax over senders). DependencyViT reverses it: each
    token is a child that picks its parents with a softmax and *sends* its message to them. The forward attention
    A_F = softmax(q k^T / sqrt(C_h)) (rows = children) is transposed, A_R = A_F^T, so every column of A_R sums to 1
    over the receivers, while a row sum (what token i receives) is large for roots and near 0 for leaves. A head
    selector p (softmax over heads, temperature 0.1) and a cumulative message controller m (sigmoid MLP; a token that
    has sent is switched off later) gate the senders. A_M = sum_h A_R^h p m is a soft dependency mask; the parent of
    token j is argmax_i A_M[i, j]. DependencyViT-Lite prunes the tokens that receive least (leaves) mid-network.

Reproduces (CPU scale, procedural "parts and objects" scenes, 32x32, patch 4 -> 64 tokens, 4 blocks x 64 wide):
the card's three checks, side by side with a plain ViT trained in the same run. AT THIS SCALE THEY DO NOT HOLD
(see Expected below); the file prints them as failing, with the numbers.
    (a) reversed attention costs little: DependencyViT test accuracy >= ViT - 2 points (the card's (a) is on digits
        at 100 epochs, `--dataset digits --patch 2 --epochs 100`; here it is checked on the scenes);
    (b) DependencyViT-Lite (trained pruning 25% of the tokens after block 2 and another 25% after block 3, by
        received-message score) is within 2 points of the unpruned DependencyViT, and its drop is at most half
        the drop of the same Lite model pruning *random* tokens at the same rates;
    (c) the parsed tree follows objects: tree purity (fraction of foreground tokens whose parent lies in the same
        object) >= 1.5x chance and >= the ViT's purity read from its own attention.

Run
    python methods/dependency_vit.py                          # default: scenes, ViT vs DependencyViT vs Lite (~3 min)
    python methods/dependency_vit.py --preset smoke           # seconds, same code path
    python methods/dependency_vit.py --dataset digits --patch 2 --epochs 100   # the card's calibration of (a)
    python methods/dependency_vit.py --data-dir cifar-10-batches-py  # CIFAR-10 python pickles
    python methods/dependency_vit.py --preset paper --device cuda --data-dir DIR  # Tiny (192 x 12 x 12), Lite 2,5,8,11
    python methods/dependency_vit.py --attn reference         # the literal A_F -> transpose -> gate path
    python methods/dependency_vit.py --bench                  # reference vs fused, fwd / fwd+bwd / memory, compile
    python methods/dependency_vit.py --help

Expected (default preset, seed 0, quiet 2-core CPU, 2 threads: 157 s wall (~2.6 min), 275 s CPU):
    | metric                       | ViT    | DependencyViT | DependencyViT-Lite | Lite, random pruning | paper               |
    |------------------------------|--------|---------------|--------------------|----------------------|---------------------|
    | test_acc                     | 0.7055 | 0.624         | 0.4935             | 0.492                | not verified (card) |
    | shift_acc                    | 0.366  | 0.3475        | 0.3055             | 0.289                | -                   |
    | tree_purity                  | 0.3915 | 0.1801        |                    |                      | qualitative         |
    | tree_purity_chance           | 0.1761 | 0.1761        |                    |                      |                     |
    | tokens kept after last block | 64/64  | 64/64         | 32/64              | 32/64                | Lite-T 36%          |
    CLAIM DOES NOT HOLD: reversed attention costs <= 2 points; Lite's score pruning keeps accuracy where random
    pruning loses it; the parsed tree follows objects (checks below)
      [ ] (a) DependencyViT test acc 0.624 >= ViT 0.706 - 0.02
      [ ] (b1) Lite (32/64 tokens) within 2 points of DependencyViT (drop +0.131)
      [ ] (b2) Lite's drop +0.131 <= half the random-pruning drop +0.132
      [ ] (c) tree purity 0.180 >= 1.5 x chance 0.176 and >= ViT's 0.392
    accuracy vs fraction of tokens kept, first 500 test images (score | random):
      Lite          1: 0.484 | 0.484  0.75: 0.492 | 0.490  0.5: 0.486 | 0.488  0.25: 0.476 | 0.474  0.125: 0.402 | 0.476
      DependencyViT 1: 0.636 | 0.636  0.75: 0.294 | 0.606  0.5: 0.182 | 0.542  0.25: 0.196 | 0.492  0.125: 0.178 | 0.416
    Seeds 0, 1, 2 with OMP_NUM_THREADS=1 (296-298 s CPU each; another thread count changes the float reductions and
    so the trajectory): test acc ViT 0.706 / 0.712 / 0.723, DependencyViT 0.643 / 0.670 / 0.602, Lite 0.514 / 0.517 /
    0.572, Lite random 0.458 / 0.493 / 0.570; tree purity DependencyViT 0.297 / 0.048 / 0.404 vs ViT 0.393 / 0.420 /
    0.489 (chance 0.176). Every check fails in every run.
    What the run does show: at 564 steps reversed attention costs 4-12 points against the ViT; Lite,
    trained with score pruning, is 0.2-6 points better than the same model pruning at random (4/4 runs) but loses 3-15
    points to the unpruned DependencyViT; the DependencyViT trained without pruning loses far more when its tokens are
    pruned by received score than at random (score pruning keeps the tokens the card calls roots, which here are
    not the ones its classifier needs); its tree's parents fall inside the child's object more often than chance in
    2 of 4 runs (0.30, 0.40 vs 0.18) but less often than the ViT's attention parents. The card calibrated (a) only
    on digits at 100 epochs and left (b), (c) uncalibrated.
    Tried after the default was fixed (1 thread, not the default): the card's 10 epochs on the scenes (seed 0, 410 s
    of CPU): ViT 0.757, DependencyViT 0.699, Lite 0.637, Lite random 0.621, tree purity 0.091 vs ViT 0.313; every
    check still fails. The card's own setting for (a), `--dataset digits --patch 2 --epochs 100` (200-210 s of CPU
    each), seeds 0 / 1 / 2: DependencyViT 0.980 / 0.963 / 0.980 vs ViT 0.965 / 0.988 / 0.978, so (a) holds on
    seeds 0 and 2 and fails on seed 1 (-2.5 points); Lite at 8 of 16 tokens loses 2.5 / 0.3 / 1.0 points against
    random pruning's 2.5 / 1.5 / 2.5 (reported only, as the card says for digits).

Implementation details
    1. Block (timm-port): pre-norm, x + proj(ReversedAttention(LN x)), then (Lite) token pruning, then x + MLP(LN x),
       MLP 4x with GELU; q, k, v without bias; no CLS token; final LN, tokens multiplied by their cumulative m, global
       average pool, linear head. The ViT baseline is the same network with ordinary softmax attention (SDPA), GAP.
    2. Reversed attention (Fig. 2): A_F = softmax(s q k^T, dim=-1), A_R = A_F^T, out = (A_R * p[:, :, None, :] *
       m[:, None, None, :]) @ v; p and m gate *senders* (columns). p = softmax_heads(W_p x / 0.1) (timm-port, app. D.1).
       m^(l) = m^(l-1) * sigmoid(MLP_{C -> C/2 -> 1}(x)) (timm-port), m^(0) = 1, carried through pruning.
    3. Tree: parent(j) = argmax_{i != j} A_M[i, j] of the last block. Purity counts tokens with >= 50% of their pixels
       in one object; the ViT's parent of j is argmax_{i != j} mean_h A_F[j, i]. Chance = the mean over those tokens of
       (tokens of the same object - 1) / (N - 1), the exact rate of a uniformly random parent.
    4. Lite (timm-port): at block t of the pruning list keep round(N0 (1 - t r)) tokens (r relative to the original N0)
       with the top received-message score s_i = sum_h sum_j A_R^h[i, j] p_hj m_j (`--prune-score received`) or the
       cumulative m_i (`--prune-score controller`); gathered with m and the token positions.
    5. Fused path (no N x N tensor saved): out_i = sum_j exp(s k_i.q_j - L^q_j) u_j with u_j = p_j m_j v_j, i.e.
       attention with k as query and q as key, un-normalised. L^q (row log-sum-exp of s q k^T) and L^k come from a
       chunked log-sum-exp with its own backward (memory O(chunk x N)); one SDPA call does the rest, with values
       u_j exp(c - L^q_j), c = max_j L^q_j, and an extra value column p_j m_j that returns the prune scores.
       q and k get a zero column to match the value width C_h+1 (else CPU SDPA falls back to a kernel that keeps
       N x N). FlexAttention (the card's first choice) runs eager on CPU in torch 2.13 forward-only (its LSE is a
       natural log, checked in the tests); its backward raises NotImplementedError on CPU, so the path uses SDPA.
       `--bench` on the quiet 2-core CPU, 1 thread, B=4 H=12 N=196 C_h=16 fp32: reference vs fused 7.8 vs 9.5 ms
       forward, 19.5 vs 22.4 ms forward+backward, 22.9 vs 5.0 MiB kept for the backward; train step eager 168 ms vs
       compiled 126 ms. On CPU the fused path buys memory, not speed, at these sizes. One H200, `--bench --device
       cuda` (B=32 H=12 N=196 C_h=16 bf16): reference 0.33 vs fused 2.36 ms forward, 1.50 vs 5.14 ms
       forward+backward (the fused path's LSE pass costs more than the small N x N it avoids); train step 12x192,
       B=256, eager 99 ms vs compiled 52 ms.
    6. Optimiser: AdamW lr 2e-3, wd 0.05, batch 64, linear warm-up 10% then cosine to 0 (one-cycle-like), as assumed
       by the card (the paper's recipe was not retrievable; DeiT-style on ImageNet in the paper preset).

Deviations from the paper
    1. Data: procedural 32x32 scenes of 1-2 objects (a body and a part each, 6 classes = (body, part) of the larger
       object) with object/part masks and a held-out shift (3 objects, 1.2x scale) instead of ImageNet; digits and
       CIFAR-10 (--data-dir) as options. Background colours are drawn in [0, 0.45] and object colours in [0.55, 1]
       (the card says only "random"): with colours in [0, 1] a 4-block ViT (and a small CNN) stayed at chance for
       400 steps, so no comparison could be made within the CPU budget.
    2. Scale: dim 64, depth 4, 4 heads, 6 epochs of 6,000 scenes (564 steps) instead of Tiny/Small on ImageNet for
       300 epochs; the card's CPU target was 10 epochs, cut to 6 so the three trainings fit ~3 CPU minutes.
    3. Lite prunes 25% + 25% of the 64 tokens after blocks 2 and 3 of 4 (paper: 16% at blocks 2, 5, 8, 11 of 12).
    4. Message-controller output bias initialised to +3 (sigma ~ 0.95; card calibration, not the paper): with the
       default init m ~ 0.5 per block shrinks pooled features by ~2^-L and slowed training. Its layers have biases
       (the timm port's are bias-free, marked FIXME there).
    5. Criterion (a) is checked on the scenes at the default's epochs (the card's (a) is digits at 100 epochs);
       (b) and (c) were uncalibrated in the card.
    6. No LayerScale (timm-port uses 1e-6), no drop-path or attention dropout, no augmentation: short CPU training.
    7. The tree is read from the last block only, and a token's own entry (i = j) is excluded from the argmax (a token
       is not its own parent); the same rule is used for the ViT and for chance.
    8. The optimiser recipe is assumed (card): the paper's was not retrievable.
    9. The fused path uses SDPA with a chunked log-sum-exp instead of FlexAttention (whose backward is not implemented
       on CPU); on a GPU FlexAttention's return_lse would replace the chunked LSE.
"""

from __future__ import annotations

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

SLUG = "dependency_vit"
PAPER = "Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention"
ARXIV = "2304.03282"
TEST_SEED = 2023  # test and shift scenes come from fixed seeds, independent of the training seed
BODIES, PARTS = ("square", "disc", "triangle"), ("top disc", "bottom bar")
BG_MAX, OBJ_MIN = 0.45, 0.55  # background colours in [0, 0.45], object colours in [0.55, 1]


@dataclass
class Args:
    """ViT vs DependencyViT (reversed attention) vs DependencyViT-Lite (token pruning), tree purity on scenes."""

    preset: str = "default"
    """name of the preset these values came from (set by --preset; it names the output files)"""
    seed: int = 0
    """seed for the training scenes, the initialisation and the batch order"""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu or cuda"""
    compile: bool = False
    """wrap each model in torch.compile (tens of seconds of compilation first)"""
    bench: bool = False
    """only time reference vs fused reversed attention (and eager vs compiled training steps); write the bench JSON"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    attn: Literal["fused", "reference"] = "fused"
    """reversed-attention path: "reference" = A_F, transpose, gate, matmul; "fused" = SDPA with k as query, no N x N"""
    data_dir: Optional[str] = None
    """folder with the CIFAR-10 python pickles (data_batch_1..5, test_batch); replaces --dataset"""
    dataset: Literal["scenes", "digits"] = "scenes"
    """in-file data: procedural parts-and-objects scenes (with masks, tree purity) or sklearn's 8x8 digits"""
    n_train: int = 6000
    """training scenes"""
    n_test: int = 2000
    """test scenes (and as many shifted scenes: 3 objects, 1.2x scale)"""
    patch: int = 4
    """patch size (digits use 2)"""
    dim: int = 64
    """token width C"""
    depth: int = 4
    """number of blocks"""
    heads: int = 4
    """attention heads H (must divide dim)"""
    # DEVIATION: 6 epochs (card: 10) so that the three trainings fit ~3 CPU minutes
    epochs: int = 6
    """training epochs per model"""
    batch: int = 64
    """batch size"""
    lr: float = 2e-3
    """peak AdamW learning rate"""
    weight_decay: float = 0.05
    """AdamW weight decay"""
    tau: float = 0.1
    """head-selector temperature (timm-port, appendix D.1)"""
    controller_bias: float = 3.0
    """initial bias of the message controller's output (not from the paper: sigmoid(3) ~ 0.95 keeps m near 1)"""
    # DEVIATION: 25% + 25% after blocks 2 and 3 of 4 (paper: 16% at blocks 2, 5, 8, 11 of 12; the paper preset)
    prune_blocks: tuple[int, ...] = (2, 3)
    """Lite: prune after these blocks (1-indexed)"""
    prune_ratio: float = 0.25
    """Lite: fraction of the *original* tokens dropped at each pruning block"""
    prune_score: Literal["received", "controller"] = "received"
    """Lite's score: received messages sum_h sum_j A_R p m (timm-port default) or the cumulative controller m"""
    n_tree: int = 500
    """test images used for tree purity and the accuracy-vs-kept-tokens curve"""


PRESETS = {
    "smoke": Args(preset="smoke", n_train=128, n_test=64, dim=32, depth=3, heads=2, epochs=1, batch=32, n_tree=32),
    "paper": Args(preset="paper", dim=192, depth=12, heads=12, epochs=300, batch=256, lr=5e-4,
                  prune_blocks=(2, 5, 8, 11), prune_ratio=0.16, n_train=50_000, n_test=10_000),
}


def validate(args: Args) -> None:
    if args.dim % args.heads != 0:
        raise shared.UsageError(f"--heads {args.heads} must divide --dim {args.dim}.")
    if min(args.n_train, args.n_test, args.epochs, args.batch, args.depth, args.n_tree) < 1 or args.lr <= 0:
        raise shared.UsageError("n-train, n-test, epochs, batch, depth, n-tree and the learning rate must be positive.")
    if any(b < 1 or b > args.depth for b in args.prune_blocks) or len(set(args.prune_blocks)) != len(args.prune_blocks):
        raise shared.UsageError(f"--prune-blocks must be distinct blocks in 1..{args.depth} (--depth).")
    if not 0 < args.prune_ratio * len(args.prune_blocks) < 1:
        raise shared.UsageError("--prune-ratio times the number of pruning blocks must lie in (0, 1).")
    if args.tau <= 0:
        raise shared.UsageError("--tau must be positive.")
    side = 8 if (args.dataset == "digits" and not args.data_dir) else 32
    if side % args.patch != 0:
        raise shared.UsageError(f"--patch {args.patch} must divide the image side {side}.")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: procedural parts-and-objects scenes with masks (or digits, or CIFAR-10 pickles)
# ---------------------------------------------------------------------------------------------------------------------
def shape_mask(kind: str, cx: float, cy: float, size: float, side: int = 32) -> np.ndarray:
    """Boolean (side, side) mask of a body or part, tested at pixel centres."""
    y, x = np.mgrid[0:side, 0:side] + 0.5
    h = size / 2
    if kind == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if kind == "disc":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h**2
    if kind == "triangle":  # apex up: the half-width grows from 0 at the top to size/2 at the bottom
        return (y >= cy - h) & (y <= cy + h) & (np.abs(x - cx) <= (y - (cy - h)) / 2)
    if kind == "top disc":  # a small disc sitting on the body's top edge
        return (x - cx) ** 2 + (y - (cy - h - 0.15 * size)) ** 2 <= (0.25 * size) ** 2
    if kind == "bottom bar":  # a flat bar under the body
        return (np.abs(x - cx) <= 0.45 * size) & (y > cy + h) & (y <= cy + h + 0.25 * size)
    raise ValueError(kind)


def render_scene(rng: np.random.Generator, n_objects: int, scale: float = 1.0, noise: float = 0.05, side: int = 32):
    """One scene: image (3, side, side) in [0, 1]-ish, object-id mask (0 = background, 1.. = objects, the largest has
    the highest id and is drawn last, on top), part-id mask (0 background, 1 body, 2 part), its class, and the
    objects drawn as (body, part, cx, cy, size) tuples."""
    # DEVIATION: the card says only "random colours"; darker backgrounds and brighter objects give every object a
    # positive contrast, without which a 4-block ViT did not leave chance level within the CPU budget.
    c0, c1 = rng.uniform(0, BG_MAX, 3), rng.uniform(0, BG_MAX, 3)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:side, 0:side] / (side - 1)
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())  # (side, side) in [0, 1]
    img = c0[:, None, None] + (c1 - c0)[:, None, None] * t  # (3, side, side) two-colour gradient
    obj_id, part_id = np.zeros((side, side), np.int64), np.zeros((side, side), np.int64)
    sizes = np.sort(rng.uniform(10, 16, n_objects)) * scale  # ascending: the largest object is drawn last
    specs = []
    for o, size in enumerate(sizes, 1):
        body, part = rng.integers(3), rng.integers(2)
        cx = rng.uniform(size / 2, side - size / 2)
        lo, hi = size / 2 + (0.4 * size if part == 0 else 0), side - size / 2 - (0.25 * size if part == 1 else 0)
        cy = rng.uniform(min(lo, hi), max(lo, hi))
        for kind, pid in ((BODIES[body], 1), (PARTS[part], 2)):
            mask = shape_mask(kind, cx, cy, size, side)
            img[:, mask] = rng.uniform(OBJ_MIN, 1, 3)[:, None]  # each body and part in its own colour
            obj_id[mask], part_id[mask] = o, pid
        specs.append((int(body), int(part), cx, cy, size))
    img = img + noise * rng.standard_normal(img.shape)
    return img.astype(np.float32), obj_id, part_id, 2 * specs[-1][0] + specs[-1][1], specs  # class of the largest


def make_scenes(n: int, seed: int, shift: bool = False, side: int = 32) -> dict:
    """n scenes; in distribution 1-2 objects at scale 1, shifted 3 objects at scale 1.2 (clutter and scale)."""
    rng = np.random.default_rng(seed)
    out = [render_scene(rng, 3 if shift else int(rng.integers(1, 3)), 1.2 if shift else 1.0, side=side)
           for _ in range(n)]
    x, obj, part, y = (np.stack(z) for z in list(zip(*out))[:4])
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "obj": torch.from_numpy(obj),
            "part": torch.from_numpy(part)}


def read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python pickle: b'data' uint8 (n, 3072) = 1024 R, 1024 G, 1024 B values, each a row-major 32x32
    plane, and b'labels' (n ints). Returns images (n, 3, 32, 32) and labels; any problem names the file."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise shared.UsageError(f"missing file {path} in --data-dir.") from None
    except Exception as e:
        raise shared.UsageError(f"cannot read {path} as a CIFAR-10 python pickle ({type(e).__name__}).") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise shared.UsageError(f"{path} does not hold a dict with b'data' and b'labels'.")
    x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.ndim != 1 or len(y) != len(x):
        raise shared.UsageError(f"{path}: b'data' must be uint8 of shape (n, 3072) with n labels, got {x.dtype} "
                                f"{x.shape} and {y.size} labels.")
    if len(y) and (y.dtype.kind not in "iu" or y.min() < 0 or y.max() > 9):
        raise shared.UsageError(f"{path}: labels must be integers in 0..9.")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)  # plane layout: channel, then row, then column


def load_data(args: Args) -> dict:
    """{"train", "test"[, "shift"]} dicts of x (n, c, s, s) float, y; scenes also carry obj/part masks."""
    if args.data_dir:
        root = Path(args.data_dir)
        if not root.is_dir():
            raise shared.UsageError(f"--data-dir {root} is not a folder.")
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        xs, ys = zip(*(read_cifar_pickle(root / f"data_batch_{i}") for i in range(1, 6)))
        xt, yt = read_cifar_pickle(root / "test_batch")
        rng = np.random.default_rng(args.seed)  # a seeded subset when --n-train / --n-test are below the files' size
        x, y = np.concatenate(xs), np.concatenate(ys)
        keep, keep_t = rng.permutation(len(x))[: args.n_train], np.arange(len(xt))[: args.n_test]
        norm = lambda a: torch.from_numpy((a.astype(np.float32) / 255 - 0.5) / 0.25)  # noqa: E731
        return {"train": {"x": norm(x[keep]), "y": torch.from_numpy(y[keep])},
                "test": {"x": norm(xt[keep_t]), "y": torch.from_numpy(yt[keep_t])}}
    if args.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
        x, y = (x - 0.5) / 0.25, torch.tensor(d.target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(TEST_SEED))  # fixed split
        tr, te = perm[:1397][: args.n_train], perm[1397:][: args.n_test]
        return {"train": {"x": x[tr], "y": y[tr]}, "test": {"x": x[te], "y": y[te]}}
    data = {"train": make_scenes(args.n_train, args.seed), "test": make_scenes(args.n_test, TEST_SEED),
            "shift": make_scenes(args.n_test, TEST_SEED + 1, shift=True)}
    for d in data.values():
        d["x"] = (d["x"] - 0.5) / 0.25
    return data


# ---------------------------------------------------------------------------------------------------------------------
# 2. Reversed attention: reference (the paper's operator, literally) and fused (no N x N tensor)
# ---------------------------------------------------------------------------------------------------------------------
def reversed_attention_matrix(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Fig. 2: A_F = softmax(q k^T / sqrt(C_h), dim=-1) (row j = child j choosing parents i), A_R = A_F^T: every
    column j of A_R sums to 1 over the receivers i. q, k: (B, H, N, C_h) -> (B, H, N, N)."""
    a_f = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B,H,N,N), softmax over keys
    return a_f.transpose(-2, -1)  # (B,H,N,N)  A_R[i, j] = A_F[j, i]


def attention_reference(q, k, v, p, m):
    """q, k, v: (B, H, N, C_h); p: (B, H, 1, N) head selector; m: (B, 1, 1, N) cumulative controller.
    Returns out (B, H, N, C_h) and the received-message score (B, N) used by Lite."""
    a = reversed_attention_matrix(q, k) * p * m  # (B,H,N,N)  gates multiply senders = columns j
    out = a @ v  # (B,H,N,C_h)  x_i <- sum_j A_R[i,j] p_hj m_j v_j
    score = a.detach().sum(dim=(1, 3))  # (B,N)  s_i = sum_h sum_j A_R^h[i,j] p_hj m_j (timm-port)
    return out, score


class _RowColLogSumExp(torch.autograd.Function):
    """For S = scale q k^T (B, H, Nq, Nk): row LSE L^q_j = log sum_i exp S_ji and column LSE L^k_i = log sum_j exp S_ji,
    computed over chunks of q rows (columns merged with logaddexp) so that no Nq x Nk tensor is kept; the backward
    recomputes each chunk: dL^q_j/dS_ji = softmax over i, dL^k_i/dS_ji = softmax over j."""

    @staticmethod
    def forward(ctx, q, k, scale: float, chunk: int):
        rows, cols = [], None
        for i in range(0, q.shape[2], chunk):
            s = q[:, :, i : i + chunk] @ k.transpose(-2, -1) * scale  # (B,H,c,Nk)  one chunk of scores
            rows.append(torch.logsumexp(s, dim=-1))  # (B,H,c)
            c = torch.logsumexp(s, dim=-2)  # (B,H,Nk)
            cols = c if cols is None else torch.logaddexp(cols, c)
        lse_q = torch.cat(rows, dim=2)  # (B,H,Nq)
        ctx.save_for_backward(q, k, lse_q, cols)
        ctx.scale, ctx.chunk = scale, chunk
        return lse_q, cols

    @staticmethod
    def backward(ctx, g_q, g_k):  # (B,H,Nq), (B,H,Nk)
        q, k, lse_q, lse_k = ctx.saved_tensors
        sc, ch, gq, gk = ctx.scale, ctx.chunk, [], torch.zeros_like(k)
        for i in range(0, q.shape[2], ch):
            q_c = q[:, :, i : i + ch]  # (B,H,c,D)
            s = q_c @ k.transpose(-2, -1) * sc  # (B,H,c,Nk)
            w = torch.exp(s - lse_q[:, :, i : i + ch, None]) * g_q[:, :, i : i + ch, None] \
                + torch.exp(s - lse_k[:, :, None, :]) * g_k[:, :, None, :]  # (B,H,c,Nk)  dLoss/dS
            gq.append(sc * w @ k)  # (B,H,c,D)
            gk = gk + sc * w.transpose(-2, -1) @ q_c  # (B,H,Nk,D)
        return torch.cat(gq, dim=2), gk, None, None


def score_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 64):
    """Natural-log row and column LSE of scale * q k^T, memory O(chunk x N) (checked against torch.logsumexp)."""
    return _RowColLogSumExp.apply(q, k, scale, chunk)


def attention_fused(q, k, v, p, m):
    """The same function as attention_reference without forming A_R (card, "fused path"):
    out_i = sum_j exp(s k_i.q_j - L^q_j) u_j, u_j = p_hj m_j v_j: attention with k as the query and q as the key,
    un-normalised. SDPA returns O_i = sum_j exp(s k_i.q_j - L^k_i) u~_j with u~_j = u_j exp(c - L^q_j), so
    out_i = O_i exp(L^k_i - c). The extra value column p_hj m_j returns the received-message score."""
    # DEVIATION: SDPA + chunked LSE instead of FlexAttention(return_lse=True): flex has no backward on CPU (torch 2.13)
    s = q.shape[-1] ** -0.5
    lse_q, lse_k = score_logsumexp(q, k, s)  # (B,H,N) x 2: L^q_j normalises child j's softmax over parents,
    #                                           L^k_i = log sum_j exp(s k_i.q_j) is SDPA's normaliser for query k_i
    # NOTE: c is a shared shift for stability; the result does not depend on it, so it is detached (exact).
    c = lse_q.detach().amax(dim=-1, keepdim=True)  # (B,H,1)
    gate = (p * m).transpose(-2, -1)  # (B,H,N,1)  per-sender gates p_hj m_j
    u = torch.cat([gate * v, gate], dim=-1) * torch.exp(c - lse_q)[..., None]  # (B,H,N,C_h+1)
    # NOTE: q and k get a zero column so that all three have width C_h+1 (k.q unchanged): with a wider value than
    # query, CPU SDPA falls back to its math kernel, which keeps the N x N probabilities for the backward.
    qp, kp = F.pad(q, (0, 1)), F.pad(k, (0, 1))  # (B,H,N,C_h+1)
    o = F.scaled_dot_product_attention(kp, qp, u, scale=s)  # (B,H,N,C_h+1)  k as query, q as key
    o = o * torch.exp(lse_k - c)[..., None]  # (B,H,N,C_h+1)  undo SDPA's normalisation and the shift
    return o[..., :-1], o[..., -1].detach().sum(dim=1)  # (B,H,N,C_h), (B,N)


ATTENTION = {"fused": attention_fused, "reference": attention_reference}


# ---------------------------------------------------------------------------------------------------------------------
# 3. Model: DependencyViT block (reversed attention, head selector, message controller, pruning) and the ViT baseline
# ---------------------------------------------------------------------------------------------------------------------
def prune_tokens(x, m, pos, score, n_keep: int):
    """Keep the n_keep tokens with the highest score (kept in their original order); gather x, m and positions."""
    idx = score.topk(n_keep, dim=1).indices.sort(dim=1).values  # (B,n_keep)
    x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B,n_keep,C)
    return x, m.gather(3, idx[:, None, None, :]), pos.gather(1, idx)  # m: (B,1,1,n_keep), pos: (B,n_keep)


class Block(nn.Module):
    """Pre-norm transformer block; `reversed=True` is DependencyViT's, False the plain ViT's (SDPA)."""

    # DEVIATION: no LayerScale (timm-port 1e-6), drop-path or attention dropout in this short CPU training

    def __init__(self, dim: int, heads: int, reversed: bool, attn_fn: Callable, tau: float, ctrl_bias: float):
        super().__init__()
        self.heads, self.reversed, self.attn_fn, self.tau = heads, reversed, attn_fn, tau
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)  # no qkv bias (timm-port)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.record: Optional[dict] = None  # set to {} to keep q, k, p, m for the tree
        if reversed:
            self.selector = nn.Linear(dim, heads, bias=False)  # head selector P (timm-port: no bias)
            # message controller M: C -> C/2 -> 1 with GELU; DEVIATION: its output bias starts at +3 (card)
            self.controller = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 1))
            nn.init.constant_(self.controller[2].bias, ctrl_bias)

    def forward(self, x, m, pos, n_keep: Optional[int] = None, prune: str = "received", gen=None):
        B, N, C = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B,H,N,C_h)
        if self.reversed:
            p = torch.softmax(self.selector(h) / self.tau, dim=-1).transpose(1, 2)[:, :, None, :]  # (B,H,1,N)
            m = m * torch.sigmoid(self.controller(h)).view(B, 1, 1, N)  # (B,1,1,N) cumulative over blocks
            out, score = self.attn_fn(q, k, v, p, m)  # (B,H,N,C_h), (B,N)
        else:
            p, score = None, None
            out = F.scaled_dot_product_attention(q, k, v)  # (B,H,N,C_h) ordinary attention (ViT)
        if self.record is not None:
            self.record = {"q": q.detach(), "k": k.detach(), "p": None if p is None else p.detach(),
                           "m": m.detach()}
        x = x + self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B,N,C)
        if n_keep is not None and n_keep < N:  # DependencyViT-Lite: drop leaves after the attention (timm-port)
            if prune == "random":
                score = torch.rand(B, N, generator=gen).to(x.device)
            elif prune == "controller":
                score = m.view(B, N)
            x, m, pos = prune_tokens(x, m, pos, score, n_keep)
        return x + self.mlp(self.norm2(x)), m, pos


class VisionNet(nn.Module):
    """Patch embedding + learned positions, blocks, final LN, (DependencyViT: times cumulative m), GAP, linear."""

    def __init__(self, args: Args, in_ch: int, side: int, n_classes: int, reversed: bool, attn_fn: Callable,
                 keep: Optional[list[int]] = None):
        super().__init__()
        self.n_tokens = (side // args.patch) ** 2
        self.embed = nn.Conv2d(in_ch, args.dim, args.patch, stride=args.patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.n_tokens, args.dim))
        self.blocks = nn.ModuleList(Block(args.dim, args.heads, reversed, attn_fn, args.tau, args.controller_bias)
                                    for _ in range(args.depth))
        self.norm, self.head = nn.LayerNorm(args.dim), nn.Linear(args.dim, n_classes)
        self.keep = keep or [None] * args.depth  # tokens kept after each block (Lite), None = no pruning
        self.prune = args.prune_score

    def forward(self, img, prune: Optional[str] = None, keep: Optional[list] = None, gen=None):
        x = self.embed(img).flatten(2).transpose(1, 2) + self.pos  # (B,N,C)
        B, N, _ = x.shape
        m = torch.ones(B, 1, 1, N, device=x.device)  # (B,1,1,N)  m^(0) = 1
        pos = torch.arange(N, device=x.device).expand(B, N)  # (B,N) original token index, gathered when pruning
        for blk, n_keep in zip(self.blocks, keep or self.keep):
            x, m, pos = blk(x, m, pos, n_keep, prune or self.prune, gen)
        x = self.norm(x) * m.view(B, -1, 1)  # (B,N',C)  tokens weighted by cumulative m (timm-port)
        return self.head(x.mean(dim=1))  # (B,classes)


def keep_schedule(n0: int, depth: int, blocks: tuple, ratio: float) -> list:
    """Tokens kept after each block: N0 (1 - t r) after the t-th pruning block (r relative to the original N0)."""
    keep, t = [None] * depth, 0
    for b in sorted(blocks):
        t += 1
        keep[b - 1] = int(round(n0 * (1 - t * ratio)))
    return keep


# ---------------------------------------------------------------------------------------------------------------------
# 4. Train and evaluate
# ---------------------------------------------------------------------------------------------------------------------
def train(model: nn.Module, data: dict, args: Args, name: str, device) -> list[dict]:
    x, y = data["train"]["x"], data["train"]["y"]
    per_epoch = math.ceil(len(x) / args.batch)
    total, warm = args.epochs * per_epoch, max(1, args.epochs * per_epoch // 10)
    # DEVIATION: recipe assumed by the card (AdamW, wd 0.05, warm-up then cosine); the paper's was not retrievable
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    fwd = model
    if args.compile:
        print("compiling the model (tens of seconds)...", flush=True)
        fwd = torch.compile(model)
    gen, bar, hist, step = torch.Generator().manual_seed(args.seed), shared.Progress(name, total), [], 0
    model.train()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(args.batch):
            lr = args.lr * (step + 1) / warm if step < warm else \
                args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(fwd(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(step, loss=loss.item())
            if step % 50 == 0 or step == total:
                hist.append({"model": name, "step": step, "train/loss": loss.item()})
    model.eval()
    return hist


@torch.no_grad()
def accuracy(model: nn.Module, split: dict, device, prune=None, keep=None, seed: int = 0) -> float:
    gen, hits = torch.Generator().manual_seed(TEST_SEED + seed), 0
    for xb, yb in zip(split["x"].split(500), split["y"].split(500)):
        hits += (model(xb.to(device), prune, keep, gen).argmax(-1).cpu() == yb).sum().item()
    return hits / len(split["y"])


def token_objects(obj: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, S, S) object ids -> (B, N): the object holding >= 50% of a token's pixels, else 0 if the background does,
    else -1 (mixed)."""
    B, S, _ = obj.shape
    t = obj.view(B, S // patch, patch, S // patch, patch).permute(0, 1, 3, 2, 4).reshape(B, -1, patch * patch)
    counts = F.one_hot(t, max(int(obj.max()), 1) + 1).sum(2) * 2  # (B,N,ids) twice the pixel counts
    best = counts[..., 1:].argmax(-1) + 1  # (B,N) the most covering object
    half = patch * patch
    bg = torch.where(counts[..., 0] >= half, 0, -1)  # (B,N)
    return torch.where(counts.gather(-1, best[..., None])[..., 0] >= half, best, bg)


def tree_purity(parent: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """parent, labels: (B, N). Purity = fraction of foreground tokens (label >= 1) whose parent has the same object
    label; chance = mean over them of (same-object tokens - 1) / (N - 1), the rate of a uniform random parent."""
    fg = labels >= 1
    same = labels.gather(1, parent) == labels
    size = (labels[:, :, None] == labels[:, None, :]).sum(-1)  # (B,N) tokens sharing each token's label
    chance = (size - 1).float() / (labels.shape[1] - 1)
    return same[fg].float().mean().item(), chance[fg].mean().item()


@torch.no_grad()
def parents(model: nn.Module, img: torch.Tensor, reversed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Parent of every token from the last block: DependencyViT argmax_{i != j} A_M[i, j] with A_M = sum_h A_R p m;
    ViT argmax_{i != j} mean_h A_F[j, i]. Returns parents (B, N) and the received score sum_j A_M[i, j] (B, N)."""
    last = model.blocks[-1]
    last.record = {}
    model(img, prune="received", keep=[None] * len(model.blocks))
    r, last.record = last.record, None
    if reversed:
        a_m = (reversed_attention_matrix(r["q"], r["k"]) * r["p"] * r["m"]).sum(1)  # (B,N,N) A_M[i (parent), j]
    else:
        a_m = reversed_attention_matrix(r["q"], r["k"]).mean(1)  # (B,N,N) = mean_h A_F^T: [i, j] = A_F[j, i]
    # DEVIATION: a token is not its own parent: the diagonal is excluded (for both models and for chance)
    eye = torch.eye(a_m.shape[-1], dtype=torch.bool, device=a_m.device)
    return a_m.masked_fill(eye, -1.0).argmax(dim=1), a_m.sum(-1)  # (B,N) parent of each j, (B,N) received


# ---------------------------------------------------------------------------------------------------------------------
# 5. Benchmark: reference vs fused at the paper's shapes (Tiny: 12 heads x 16, 196 tokens), eager vs compile
# ---------------------------------------------------------------------------------------------------------------------
def saved_bytes(fn) -> int:
    """Bytes of tensors autograd keeps for the backward of fn() (device-independent activation memory)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench(args: Args, device: torch.device) -> dict:
    B, H, N, ch = (32 if device.type == "cuda" else 4), 12, 196, 16
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, ch, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    p = torch.softmax(torch.randn(B, H, 1, N, generator=gen) / 0.1, dim=1).to(device, dtype).requires_grad_()
    m = torch.rand(B, 1, 1, N, generator=gen).to(device, dtype).requires_grad_()
    ref = attention_reference(*(t.float() for t in (q, k, v, p, m)))
    fus = attention_fused(q, k, v, p, m)
    err = max((a.float() - b).abs().max().item() / b.abs().max().item() for a, b in zip(fus, ref))
    if err > (3e-2 if dtype == torch.bfloat16 else 1e-5):
        raise RuntimeError(f"fused reversed attention differs from the reference by {err:.2e} (relative)")
    shape, rows = f"B={B} H={H} N={N} C_h={ch} {str(dtype)[6:]}", []
    for what, of in [("fwd", lambda f: lambda: f(q, k, v, p, m)),
                     ("fwd+bwd", lambda f: lambda: f(q, k, v, p, m)[0].sum().backward())]:
        rows.append({"what": f"reversed attention {what} ({shape})", "reference_ms":
                     shared.benchmark(of(attention_reference), device), "fused_ms": shared.benchmark(of(
                         attention_fused), device)})
    memory = {f"{n}_saved_for_backward_MiB": saved_bytes(lambda f=f: f(q, k, v, p, m)) / 2**20
              for n, f in ATTENTION.items()}
    print("memory kept for backward (MiB):", {n: round(v_, 3) for n, v_ in memory.items()})
    size = PRESETS["paper"] if device.type == "cuda" else args
    img = torch.randn(size.batch, 3, 32, 32, device=device)
    lab = torch.randint(0, 6, (size.batch,), device=device)
    step_ms = []
    for compiled in (False, True):
        shared.seed_everything(0)
        net = VisionNet(size, 3, 32, 6, True, ATTENTION[args.attn]).to(device)
        opt, fwd = torch.optim.AdamW(net.parameters()), (torch.compile(net) if compiled else net)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(fwd(img), lab).backward()
            opt.step()

        if compiled:
            print("compiling the model (tens of seconds)...", flush=True)
        step_ms.append(shared.benchmark(step, device, warmup=3, repeats=10))
    rows.append({"what": f"train step {size.depth}x{size.dim}, B={size.batch}, attn={args.attn}: eager vs compile",
                 "reference_ms": step_ms[0], "fused_ms": step_ms[1]})
    return shared.save_bench(args, SLUG, device, rows, max_rel_err=err, memory=memory)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Main
# ---------------------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return shared.seed_everything(args.seed) or bench(args, device)
    t0, attn_fn = time.perf_counter(), ATTENTION[args.attn]
    data = load_data(args)
    in_ch, side = data["train"]["x"].shape[1], data["train"]["x"].shape[-1]
    n_classes = int(max(d["y"].max() for d in data.values())) + 1
    n0 = (side // args.patch) ** 2
    keep = keep_schedule(n0, args.depth, args.prune_blocks, args.prune_ratio)
    specs = {"ViT": (False, None), "DependencyViT": (True, None), "DependencyViT-Lite": (True, keep)}
    models, history = {}, []
    for name, (rev, kp) in specs.items():
        shared.seed_everything(args.seed)  # same init stream for every model
        models[name] = VisionNet(args, in_ch, side, n_classes, rev, attn_fn, kp).to(device)
        history += train(models[name], data, args, name, device)
    splits = [s for s in ("test", "shift") if s in data]
    results = {n: {f"{s}_acc": accuracy(mdl, data[s], device) for s in splits} for n, mdl in models.items()}
    lite, dep = models["DependencyViT-Lite"], models["DependencyViT"]
    results["Lite, random pruning"] = {f"{s}_acc": accuracy(lite, data[s], device, prune="random") for s in splits}
    n_end = [n for n in keep if n][-1]  # tokens left after the last pruning block
    kept = f"{n_end}/{n0}"
    for n in results:
        results[n]["tokens_kept_at_end"] = n_end / n0 if "Lite" in n else 1.0
    # accuracy vs kept tokens, score vs random, on the Lite model and the unpruned-trained DependencyViT
    fracs, few = [1.0, 0.75, 0.5, 0.25, 0.125], {k: v[: args.n_tree] for k, v in data["test"].items()}
    curve = {}
    for mname, mdl in (("Lite", lite), ("DependencyViT", dep)):
        for mode in ("received", "random"):
            curve[f"{mname} {mode}"] = [accuracy(mdl, few, device, mode, keep_schedule(
                n0, args.depth, args.prune_blocks, (1 - f) / len(args.prune_blocks))) for f in fracs]
    tree = None
    if "obj" in data["test"]:
        img, obj = data["test"]["x"][: args.n_tree], data["test"]["obj"][: args.n_tree]
        labels = token_objects(obj, args.patch).to(device)
        tree = {n: parents(models[n], img.to(device), n != "ViT") for n in ("ViT", "DependencyViT")}
        for n, (par, _) in tree.items():
            results[n]["tree_purity"], chance = tree_purity(par, labels)
            results[n]["tree_purity_chance"] = chance

    # ---- the checks (card: (a) reversed attention costs <= 2 points, (b) Lite, (c) tree purity) ----------------
    acc = {n: results[n]["test_acc"] for n in results}
    drop_lite, drop_rand = acc["DependencyViT"] - acc["DependencyViT-Lite"], acc["DependencyViT"] - acc[
        "Lite, random pruning"]
    # DEVIATION: (a) is checked on this run's data (the card calibrated it on digits at 100 epochs)
    checks = {f"(a) DependencyViT test acc {acc['DependencyViT']:.3f} >= ViT {acc['ViT']:.3f} - 0.02":
              acc["DependencyViT"] >= acc["ViT"] - 0.02}
    lite_checks = {f"(b1) Lite ({kept} tokens) within 2 points of DependencyViT (drop {drop_lite:+.3f})":
                   drop_lite <= 0.02,
                   f"(b2) Lite's drop {drop_lite:+.3f} <= half the random-pruning drop {drop_rand:+.3f}":
                   drop_lite <= 0.5 * drop_rand}
    reported = {}
    if args.dataset == "digits" and not args.data_dir:  # the card reports (b) on digits, 2x2 patches are not parts
        reported = lite_checks
    else:
        checks |= lite_checks
    if tree:
        pur, pv, ch = results["DependencyViT"]["tree_purity"], results["ViT"]["tree_purity"], results[
            "DependencyViT"]["tree_purity_chance"]
        checks[f"(c) tree purity {pur:.3f} >= 1.5 x chance {ch:.3f} and >= ViT's {pv:.3f}"] = pur >= 1.5 * ch and \
            pur >= pv
    claim = {"text": "reversed attention costs <= 2 points; Lite's score pruning keeps accuracy where random pruning "
                     "loses it; the parsed tree follows objects (checks below)",
             "passed": bool(all(checks.values())), "checks": checks, "reported_not_counted": reported}

    names = ["ViT", "DependencyViT", "DependencyViT-Lite", "Lite, random pruning"]
    paper = {"test_acc": "not verified (card)", "shift_acc": "-", "tree_purity": "qualitative"}
    header = ["metric", *names, "paper"]
    metrics = [f"{s}_acc" for s in splits] + (["tree_purity", "tree_purity_chance"] if tree else [])
    rows = [[mt, *[results[n].get(mt, "") for n in names], paper.get(mt, "")] for mt in metrics]
    rows.append(["tokens kept after last block", *[kept if "Lite" in n else f"{n0}/{n0}" for n in names],
                 "Lite-T 36%"])
    print()
    shared.print_table(header, rows, claim)
    for c, ok in (checks | reported).items():
        print(f"  [{'x' if ok else ' '}] {c}" + (" (reported, not counted)" if c in reported else ""))
    print(f"accuracy vs fraction of tokens kept, first {len(few['y'])} test images (score | random):")
    for mname in ("Lite", "DependencyViT"):
        print(f"  {mname:14s}" + "  ".join(f"{f:.3g}: {a:.3f} | {b:.3f}" for f, a, b in
                                          zip(fracs, curve[f"{mname} received"], curve[f"{mname} random"])))
    plot(args, data, tree, curve, fracs, n0)
    key = {"metric": "test_acc", "method": "DependencyViT", "baseline": "ViT", "higher_is_better": True}
    paper_numbers = {"card_digits_100ep": {"ViT": 0.964, "DependencyViT": 0.958},
                     "card_digits_lite_50pct": {"score": 0.928, "random": 0.922},
                     "imagenet": "DependencyViT-T/S/Lite vs DeiT-T 72.2 / DeiT-S 79.8 (card: not verified)"}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=paper_numbers, history=history, curves={"fracs": fracs, **curve},
                               wall_s=time.perf_counter() - t0)


def plot(args: Args, data: dict, tree, curve: dict, fracs: list, n0: int) -> None:
    """Key figure: the parsed dependency tree (parent arrows) over a test scene with its object mask, the ViT's
    attention parents for contrast, and accuracy vs kept tokens for score vs random pruning."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if tree else 1, figsize=(15 if tree else 5, 4.8), squeeze=False)
    ax = axes[0, -1]
    for name, vals in curve.items():
        ax.plot(fracs, vals, marker="o", ls="-" if "received" in name else "--", label=name.replace("received",
                                                                                                    "score"))
    ax.set(xlabel="fraction of tokens kept after the last pruning block", ylabel="test accuracy",
           title="pruning by received messages vs random")
    ax.legend(fontsize=8)
    if tree:
        g = int(math.isqrt(n0))
        cell = data["test"]["x"].shape[-1] / g
        j = int(torch.argmax((data["test"]["obj"][: args.n_tree].amax((1, 2)) >= 2).int()))  # a scene with 2 objects
        img = (data["test"]["x"][j].permute(1, 2, 0).numpy() * 0.25 + 0.5).clip(0, 1)
        if img.shape[-1] == 1:
            img = img[..., 0]
        for a, name in zip(axes[0, :2], ("DependencyViT", "ViT")):
            par, rec = tree[name]
            a.imshow(img)
            a.imshow(data["test"]["obj"][j].numpy(), alpha=0.25, cmap="tab10", vmin=0, vmax=9)
            ctr = lambda t: ((t % g + 0.5) * cell - 0.5, (t // g + 0.5) * cell - 0.5)  # noqa: E731
            r = rec[j].cpu()
            for t in range(n0):
                (x0, y0), (x1, y1) = ctr(t), ctr(int(par[j, t]))
                a.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", lw=0.6, color="k", alpha=0.7))
            xs, ys = zip(*(ctr(t) for t in range(n0)))
            a.scatter(xs, ys, s=60 * r / r.max(), c="red", zorder=3)
            a.set(title=f"{name}: parent arrows (dots: received)", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(shared.run_path(args, SLUG, ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
