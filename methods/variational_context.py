"""Grounding Referring Expressions in Images by Variational Context (Zhang, Niu, Chang, CVPR 2018)
arXiv:1712.01892  https://arxiv.org/abs/1712.01892
Official code: yuleiniu/vc (TensorFlow 1.x: vc_model.py, config.py, train.py)

The method in a few lines
    Grounding picks, among the N regions of an image, the one a referring expression L names ("the circle left of
    the red square"). The referent is often only identifiable through a context object, which is not annotated,
    and searching over context subsets is exponential. Variational Context makes the context z a latent variable
    and maximises the variational lower bound
        log p(x | L) >= E_q(z|x,L)[log p(x | z, L)] - KL(q(z | x, L) || p(z | L)).
    The posterior q(z | x_i, L) is a softmax over regions conditioned on the candidate referent x_i (the referent
    "reshapes" where to look for the context), the grounding network p(x | z, L) scores the referent given that
    context (the context "reshapes" the referent's score): the reciprocity. With one deterministic "mean" sample,
    the attention-weighted context feature z~_i, the bound becomes a score S_i = loc_i + prior_i - enc_i and the
    whole model is an end-to-end network trained by cross-entropy over regions. Each sub-network reads its own
    phrase vector from cue-specific word attention over a BiLSTM.

Reproduces: on generated "ShapeRefer" scenes (64x64, 4-7 coloured shapes, ground-truth boxes as regions) with
attribute (T1), relational (T2) and context-only (T3) expressions, where every relational expression comes with a
decoy pair (same referent phrase, a context differing in one attribute, the same relation), VC grounds >= 85 % of
test expressions and >= 80 % of the relational ones, a context-free model stays near chance (~50 %) on relational
expressions while solving attribute ones, and VC is at least on par (-2 points) with the CMN-style pairwise
max-over-context baseline (the paper: +3-5 points over CMN with ground-truth boxes).
Holds on seeds 0, 1, 2 (VC 0.988-0.992 overall, 0.990-0.993 on T2; context-free 0.50 on T2); see Expected for
what the CMN comparison does and does not show at this budget.

Run:
    python methods/variational_context.py                                  # default preset (a few minutes, 2 CPU cores)
    python methods/variational_context.py --preset smoke                   # seconds, same code path
    python methods/variational_context.py --preset paper --device cuda     # paper's sizes and SGD schedule
    python methods/variational_context.py --supervision unsupervised       # the paper's unsupervised setting
    python methods/variational_context.py --attn reference                 # literal masked-softmax attentions
    python methods/variational_context.py --bench                          # reference vs SDPA, eager vs compile
    python methods/variational_context.py --data-dir refcoco/              # refer-toolkit refs + region features
    python methods/variational_context.py --help

Expected (default preset, seed 0; 117 s on a quiet 2-core CPU, 2 threads; train s = seconds per model;
seeds 1 and 2 below ran with 1 thread each, side by side on a busy box):
    | metric         | VC (method) | CMN-MIL (baseline) | context-free | paper                                          |
    |----------------|-------------|--------------------|--------------|------------------------------------------------|
    | acc            | 0.991       | 0.9895             | 0.6335       | VC 78.98 / CMN 75.94 (RefCOCO testA, gt boxes) |
    | acc T1         | 1           | 0.9919             | 0.9627       |                                                |
    | acc T2         | 0.9928      | 0.9898             | 0.5072       | +3-5 pts over CMN                              |
    | acc T3         | 0.9729      | 0.9852             | 0.4384       |                                                |
    | heldout acc    | 0.986       | 0.9875             | 0.609        |                                                |
    | heldout acc T1 | 0.9932      | 0.9846             | 0.9401       |                                                |
    | heldout acc T2 | 0.9864      | 0.9874             | 0.5042       |                                                |
    | heldout acc T3 | 0.9762      | 0.9913             | 0.4069       |                                                |
    | train s        | 38.15       | 34.11              | 30.1         |                                                |
    (paper column: the card's ground-truth-box numbers from the paper / MAttNet's table, not re-checked here)

    CLAIM HOLDS: VC grounds relational expressions through its learned context posterior (overall >= 0.85,
    T2 >= 0.80) where a context-free model is at chance on T2 (<= 0.60, T1 >= 0.90), and matches or beats
    CMN-style pairwise MIL (VC - CMN = +0.002)
      [x] VC overall >= 0.85
      [x] VC on T2 relational >= 0.80
      [x] context-free on T2 <= 0.60
      [x] context-free on T1 >= 0.90
      [x] VC >= CMN-MIL - 0.02 overall

    Seeds 1 and 2 (same conditions): the claim holds, all 5 checks. VC overall 0.992 / 0.990, T2 0.990 / 0.993;
    context-free T2 0.500 / 0.500 (T1 0.989 / 0.948); CMN-MIL overall 0.645 / 0.628, T2 0.509 / 0.494.
    Reading: VC learns the relational and context-only expressions through its context posterior on all three
    seeds (the figure shows q(j | referent, L) ~ 1 on the named context), the context-free model stays at the
    decoy-pair chance level (0.50) on T2 while solving T1. CMN-MIL finds the context on seed 0 (0.990, parity with
    VC) but, within the same 1,000 steps, stays on the context-free plateau on seeds 1 and 2: the +35 points there
    are an optimisation-speed gap at this budget, not the paper's +3-5 point accuracy gap (with 2,500 steps at lr
    2e-3 and PyTorch's default init, an earlier run gave seed 0 VC 0.994 vs CMN 0.987). Failures left are mostly
    "closest to" expressions. The held-out set (8-10 objects, unseen referent-shape/context-colour pairs) moves
    nothing: VC 0.985-0.991.
    --bench (smoke preset, CPU, two contended runs; reference / fused ms): word attention at the paper's shapes
    (d = 4000) fwd 0.8-1.2 / 11-40 and fwd+bwd 21-83 / 58-156 -- SDPA's CPU kernel is slower than the literal masked
    softmax for 5 queries of width 4000; context attention (F = 8197) fwd 10-38 / 2-38, fwd+bwd 25-108 / 24-104;
    a training step eager 66-227 ms vs compiled 61-264 ms. GPU numbers are not measured here.

Implementation details:
    1. Regions: f_i = [v_i; l_i], v_i = a small CNN on the 12x12 resized crop of box i (2 px padding), trained
       jointly (stand-in for the VGG-16 fc7 feature), l_i = [x1/W, y1/H, x2/W, y2/H, w*h/(W*H)] (Sec. 3.3).
    2. Language: word embeddings e_t, a 2-layer BiLSTM; h_t = [layer-1 output; layer-2 output] (4 x hidden).
    3. Cue-specific phrases (Sec. 3.3): for each cue c, a^c_t = softmax_t(w_c . h_t) over the words that are not
       padding, y^c = sum_t a^c_t e_t: word EMBEDDINGS pooled with weights computed from the BiLSTM states. VC has 5
       cues (c1, c2: context single / pairwise; r1, r2: referent single / pairwise; g: prior).
    4. Score primitives (OFFICIAL CODE vc_model.py): single(f, y) = w^T normalize((W f + b) * y) + b', and
       pair(l_a, l_b, y) = w^T normalize(P([l_a; l_b]) * y) + b'; learnable alpha1, alpha2 (init 1) weight single vs
       pairwise inside each module.
    5. Context posterior q ("encoder"): e_ij = alpha1 single_c(f_j, y^c1) + alpha2 pair_c(l_i, l_j, y^c2),
       q(j | i) = softmax_j e_ij (j = i allowed as in the official code; --mask-self removes it), soft context
       z~_i = sum_j q(j | i) f_j, and enc_i = alpha1 single_c(z~_i, y^c1) + alpha2 pair_c(l_i, l~_i, y^c2) with the
       SAME weights (the unnormalised log q of the mean sample).
    6. Grounding ("decoder"): loc_i = alpha1' single_r(f_i, y^r1) + alpha2' pair_r(l_i, l~_i, y^r2) (only the
       spatial part of the soft context enters); prior_i = single_g(f_i, y^g) (OFFICIAL CODE evaluates the prior
       on the candidate; --prior-on-context evaluates it on z~_i); S_i = loc_i - enc_i + prior_i.
    7. Loss: supervised cross-entropy of softmax_i S_i; unsupervised -log max_i softmax(S)_i (clamped at 1e-5);
       + 5e-4 sum ||W||^2 / 2 (tf.nn.l2_loss) over weight matrices only (not biases, alphas or the embedding);
       per-tensor gradient-norm clip 10 (OFFICIAL CODE vc_model.py setup_loss / setup_train_op).
    8. Baselines on the same encoder, features and budget: context-free S_i = single(f_i, y); CMN-style pairwise MIL
       S_i = single_s(f_i, y^s) + max_{j != i} [single_o(f_j, y^o) + pair(l_i, l_j, y^r)] (Hu et al. 2017).
    9. Data: each relational scene holds a target pair (r, c) and a decoy pair (d, c') in the same relation, r and
       d the only objects of the referent's shape, c' = c with one attribute changed; the scene's two expressions
       are the pair and its mirror (the decoy's own expression), so the words of the referent phrase point at r in
       one and at d in the other. Relations: a is "left of" b iff the centre of a lies in the 90-degree cone left of
       b's centre (same for right / above / below), "closest to" = the nearest candidate; every relation holds for
       exactly one candidate with a 2 px margin. A held-out set (8-10 objects; relational expressions whose
       (referent shape, context colour) never occur in training) is reported, not gated.

Deviations from the paper:
    1. Synthetic scenes, ground-truth boxes, a small jointly trained CNN instead of frozen VGG-16 fc7 + visdif
       (visdif is available with --visdif), embeddings learned from scratch (no GloVe), 32-d embeddings, a
       2 x 64 BiLSTM, a 32-d scoring space; Adam (lr 5e-3, x0.1 after 2/3 of training), batches of 32 scenes
       instead of SGD-momentum on one image per step (--optim paper restores SGD 0.95 / 0.01), 4 epochs over
       8,000 scenes (~1,000 steps per model) instead of 180k steps.
    2. The pairwise spatial input is [l_a; l_b; l_b - l_a; |centre_b - centre_a|] through a one-hidden-layer MLP
       instead of one linear map of [l_a; l_b], so that "closest to" and the cone relations are expressible at all;
       VC and CMN share this primitive, so the comparison is unaffected.
    3. Equation numbers are not cited: the arXiv text could not be checked in this session; comments name the
       paper's sections and quantities (the bound, q, p(x|z,L), p(z|L), S_i) and follow the official code.
    4. The journal extension's expression-reconstruction term (arXiv 1907.03609) is not implemented.
    5. The encoder's pairwise term reads [l_i; l_j] (candidate referent first) both in the posterior logits and in
       enc_i; the official code feeds [l_j; l_i] to the posterior (its reshape/transpose swaps the two regions,
       see its comment) and [l_i; l~_i] to enc_i with the same weights. We keep one order so that the weight
       sharing means what the paper says: the same pair(x_i, z) in q and in log q.
"""

from __future__ import annotations

import functools
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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "variational_context"
PAPER = "Grounding Referring Expressions in Images by Variational Context"
ARXIV = "1712.01892"
TEST_SEED = 2018  # the test and held-out scenes are the same for every training seed
IMG, CROP, PAD, MARGIN, REL_MARGIN, MAX_LEN = 64, 12, 2, 2, 2.0, 10
SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
RGB = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 240], [235, 225, 40], [170, 60, 210], [235, 235, 235]])
SIZES, SIZE_WORDS = (6, 11), ("small", "big")
RELATIONS = (("left", "of"), ("right", "of"), ("above",), ("below",), ("closest", "to"))
VOCAB = ("<pad>", "the", "object", *SIZE_WORDS, *COLOURS, *SHAPES, "left", "right", "of", "above", "below",
         "closest", "to")
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
HELDOUT = {(0, 0), (1, 1), (2, 2), (3, 3)}  # (referent shape, context colour) of relational expressions kept out
TYPES = ("T1 attribute", "T2 relational", "T3 context-only")


@dataclass
class Args:
    """Variational Context (VC) vs context-free and CMN-style pairwise grounding on generated ShapeRefer scenes."""

    preset: str = "default"
    """name of the preset these values came from (set by --preset; it names the output files)"""
    seed: int = 0
    """seed of the training scenes, the initialisations and the batch order"""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu or cuda"""
    compile: bool = False
    """wrap each model in torch.compile for training (tens of seconds of compilation first)"""
    bench: bool = False
    """only time reference vs fused attentions (and eager vs compiled training steps) and write the bench JSON"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    attn: Literal["fused", "reference"] = "fused"
    """word and context attention: "reference" = literal masked softmax, "fused" = F.scaled_dot_product_attention"""
    data_dir: Optional[str] = None
    """refer-toolkit folder: refs(unc).p, instances.json, feats/<image_id>.npz, vocabulary.txt, embed_matrix.npy"""
    supervision: Literal["supervised", "unsupervised"] = "supervised"
    """supervised: cross-entropy on the referent; unsupervised: -log max_i softmax(S)_i (no referent labels)"""
    mask_self: bool = False
    """exclude j = i from the context posterior q(j | i) (the official code keeps it)"""
    prior_on_context: bool = False
    """evaluate the prior p(z | L) on the soft context z~_i instead of on the candidate (the official code)"""
    visdif: bool = False
    """append the visual-difference feature (mean over same-shape others of normalize(v_i - v_j)) to v_i"""
    n_train: int = 8000
    """training scenes (two expressions each)"""
    n_test: int = 1000
    """test scenes (fixed seed, same for every training seed)"""
    n_heldout: int = 1000
    """held-out scenes: 8-10 objects, unseen (referent shape, context colour) relational expressions"""
    min_objects: int = 4
    """fewest objects per train/test scene"""
    max_objects: int = 7
    """most objects per train/test scene"""
    mix: tuple[float, float, float] = (0.3, 0.5, 0.2)
    """fractions of attribute (T1), relational (T2) and context-only (T3) scenes"""
    # DEVIATION 1: 32-d embeddings, 2 x 64 BiLSTM, 64-d CNN features (paper: 300, 2 x 1000, 8192)
    emb: int = 32
    """word embedding size D_e (= the scoring space of single / pair, as in the paper)"""
    lstm: int = 64
    """BiLSTM units per direction (two layers)"""
    vis: int = 64
    """CNN region feature size"""
    # DEVIATION 1: 4 epochs of 8,000 scenes (~1,000 steps of 32 scenes) per model
    epochs: int = 4
    """passes over the training scenes per model"""
    batch: int = 32
    """scenes per step (all expressions of a scene share its region tensor)"""
    optim: Literal["adam", "paper"] = "adam"
    """adam (lr --lr) or the paper's SGD momentum 0.95 at lr 0.01"""
    lr: float = 5e-3
    """Adam learning rate (x0.1 after --decay-at of training, like the official 120k-of-180k step)"""
    decay_at: float = 0.667
    """fraction of training steps after which the learning rate drops 10x"""
    weight_decay: float = 5e-4
    """L2 on weight matrices only (OFFICIAL CODE), added to the loss"""
    clip: float = 10.0
    """per-tensor gradient-norm clip (OFFICIAL CODE)"""


PRESETS = {
    "smoke": Args(preset="smoke", n_train=48, n_test=24, n_heldout=16, epochs=1, batch=16, emb=8, lstm=8, vis=8),
    "paper": Args(preset="paper", emb=300, lstm=1000, vis=4096, epochs=22, batch=1, optim="paper", lr=0.01),
}


def validate(args: Args) -> None:
    if min(args.n_train, args.n_test, args.n_heldout, args.epochs, args.batch, args.emb, args.lstm, args.vis) < 1:
        raise shared.UsageError("scene counts, --epochs, --batch and the sizes must be positive.")
    if args.batch > args.n_train:
        raise shared.UsageError(f"--batch {args.batch} must not exceed --n-train {args.n_train}.")
    if not 4 <= args.min_objects <= args.max_objects <= 10:
        raise shared.UsageError("need 4 <= --min-objects <= --max-objects <= 10 (a relational scene holds 4 "
                                "key objects; more do not fit a 64x64 image).")
    if min(args.mix) < 0 or sum(args.mix) <= 0:
        raise shared.UsageError("--mix needs three non-negative fractions with a positive sum.")
    if args.lr <= 0 or not 0 < args.decay_at <= 1 or args.weight_decay < 0 or args.clip <= 0:
        raise shared.UsageError("--lr and --clip must be positive, --decay-at in (0, 1], --weight-decay >= 0.")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise shared.UsageError(f"--data-dir {args.data_dir} is not a folder.")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: ShapeRefer scenes with attribute, relational (with decoy pairs) and context-only expressions
# ---------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def shape_mask(shape: int, s: int) -> np.ndarray:
    """(s, s) bool raster of a square, circle, upward triangle or plus-shaped cross."""
    v, u = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    return [np.ones((s, s), bool), (u - c) ** 2 + (v - c) ** 2 <= (s / 2 - 0.3) ** 2,
            np.abs(u - c) <= (v + 1) / 2,  # upward triangle: half-width grows by 1/2 px per row
            (np.abs(u - c) <= s / 6) | (np.abs(v - c) <= s / 6)][shape]


def relation_value(rel: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """g(a rel b) for centres a and b, (2,) or (K, 2): > 0 where it holds. Cones: a left of b iff (bx - ax) > |by - ay|;
    closest: -distance (the candidate with the largest value is the closest)."""
    dx, dy = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]  # image y grows downwards
    return [dx - np.abs(dy), -dx - np.abs(dy), dy - np.abs(dx), -dy - np.abs(dx), -np.hypot(dx, dy)][rel]


def unique_holder(rel: int, cands: list[int], ctx: int, centres: np.ndarray) -> Optional[int]:
    """The one candidate x with "x rel ctx", clear by REL_MARGIN pixels, or None when none / several / borderline."""
    if len(cands) < 2:
        return None
    g = relation_value(rel, centres[cands], centres[ctx])
    if rel == 4:  # closest: the best must beat the second best by the margin
        order = np.argsort(-g)
        return cands[order[0]] if g[order[0]] - g[order[1]] >= REL_MARGIN else None
    if np.abs(g).min() < REL_MARGIN or (g > 0).sum() != 1:
        return None
    return cands[int(np.argmax(g))]


def context_words(attrs: np.ndarray, c: int) -> Optional[list[str]]:
    """Shortest unique description of the context with its shape: "red square", else "big red square"."""
    for use_size in (False, True):
        same = (attrs[:, 0] == attrs[c, 0]) & (attrs[:, 1] == attrs[c, 1])
        same &= (attrs[:, 2] == attrs[c, 2]) | (not use_size)
        if same.sum() == 1:
            return ([SIZE_WORDS[attrs[c, 2]]] if use_size else []) + [COLOURS[attrs[c, 1]], SHAPES[attrs[c, 0]]]
    return None


def attribute_words(attrs: np.ndarray, r: int) -> Optional[list[str]]:
    """T1: the minimal unique description among attribute subsets (shape / colour / size, then pairs, triple)."""
    for subset in ((0,), (1,), (2,), (1, 0), (2, 0), (2, 1), (2, 1, 0)):
        if ((attrs[:, list(subset)] == attrs[r, list(subset)]).all(1)).sum() == 1:
            words = [SIZE_WORDS[attrs[r, 2]]] if 2 in subset else []
            words += [COLOURS[attrs[r, 1]]] if 1 in subset else []
            return words + [SHAPES[attrs[r, 0]] if 0 in subset else "object"]
    return None


def place(sizes: list[int], rng: np.random.Generator, accept: Callable) -> Optional[np.ndarray]:
    """Top-left corners (N, 2), objects placed one at a time among 64 random proposals that do not overlap the
    placed ones (2 px margin) and pass accept(k, centres (K, 2), placed boxes) -- vectorised rejection sampling."""
    boxes = np.zeros((0, 4))
    for k, s in enumerate(sizes):
        xy = rng.integers(0, IMG - s + 1, (64, 2))
        hit_x = (xy[:, None, 0] < boxes[None, :, 2] + MARGIN) & (boxes[None, :, 0] < xy[:, None, 0] + s + MARGIN)
        hit_y = (xy[:, None, 1] < boxes[None, :, 3] + MARGIN) & (boxes[None, :, 1] < xy[:, None, 1] + s + MARGIN)
        free = ~(hit_x & hit_y).any(1)  # (64,) no overlap with any placed box
        ok = free & accept(k, xy + s / 2, boxes)
        if not ok.any():
            return None
        x, y = xy[np.argmax(ok)]
        boxes = np.vstack([boxes, [x, y, x + s, y + s]])
    return boxes


def make_scene(kind: int, n: int, rng: np.random.Generator, heldout: bool) -> Optional[tuple]:
    """One scene of `kind` (0 = T1, 1 = T2, 2 = T3) with n objects -> (attrs (n, 3), boxes (n, 4), two expressions
    [(words, target)]) or None (the caller retries). attrs columns: shape, colour, size index."""
    attrs = np.stack([rng.integers(0, 4, n), rng.integers(0, 6, n), rng.integers(0, 2, n)], 1)
    if kind == 0:
        boxes = place([SIZES[a] for a in attrs[:, 2]], rng, lambda k, c, b: True)
        cands = [r for r in rng.permutation(n) if attribute_words(attrs, r) is not None][:2]
        if boxes is None or len(cands) < 2:
            return None
        return attrs, boxes, [(["the"] + attribute_words(attrs, r), int(r)) for r in cands]
    # key objects: 0 = context c, 1 = referent r, 2 = decoy context c', 3 = distractor d; the rest are fillers
    rel, S = int(rng.integers(0, 5)), int(rng.integers(0, 4))
    if kind == 1 and heldout:  # the held-out set's relational expressions use only the unseen combinations
        S, col = sorted(HELDOUT)[int(rng.integers(0, len(HELDOUT)))]
        attrs[0, 1] = col
    if kind == 1:  # only r and d have the referent's shape S
        attrs[:, 0] = rng.choice([s for s in range(4) if s != S], n)
        attrs[[1, 3], 0] = S
    which = int(rng.choice([0, 2])) if heldout else int(rng.integers(0, 3))  # held-out: c' keeps c's colour
    attrs[2] = attrs[0]
    while True:  # c' = c with exactly one attribute changed (its shape stays away from S in T2)
        new = int(rng.integers(0, [4, 6, 2][which]))
        if new != attrs[0, which] and not (kind == 1 and which == 0 and new == S):
            attrs[2, which] = new
            break

    def holds(a, b):  # "a rel b" clearly holds (cones), for proposals a (K, 2) or b (K, 2)
        return relation_value(rel, a, b) >= REL_MARGIN

    def fails(a, b):  # "a rel b" clearly does not hold
        return relation_value(rel, a, b) <= -REL_MARGIN

    def dist(a, b):
        return np.hypot(*(np.asarray(a) - np.asarray(b)).T)

    def accept(k, c, b):  # constructive rejection: each object goes where the final check can still pass
        ctr, yes = (b[:, :2] + b[:, 2:]) / 2, np.ones(len(c), bool)
        t3 = kind == 2
        if k == 0:
            return yes
        if rel == 4:  # closest: r nearer to c than d is, d nearer to c' than r is; T3: everyone else farther
            if k == 1:
                return yes
            if k == 2:
                return dist(c, ctr[0]) > dist(ctr[1], ctr[0]) + REL_MARGIN if t3 else yes
            if k == 3:
                return (dist(c, ctr[2]) + REL_MARGIN < dist(ctr[1], ctr[2])) & \
                    (dist(c, ctr[0]) > dist(ctr[1], ctr[0]) + REL_MARGIN)
            return (dist(c, ctr[0]) > dist(ctr[1], ctr[0]) + REL_MARGIN) & \
                (dist(c, ctr[2]) > dist(ctr[3], ctr[2]) + REL_MARGIN) if t3 else yes
        if k == 1:
            return holds(c, ctr[0])
        if k == 2:  # r must not hold for c'; in T3 c' itself is a candidate for c
            return fails(ctr[1], c) & (fails(c, ctr[0]) if t3 else yes)
        if k == 3:
            return holds(c, ctr[2]) & fails(c, ctr[0]) & (fails(ctr[0], ctr[2]) if t3 else yes)
        return (fails(c, ctr[0]) & fails(c, ctr[2])) if t3 else yes

    for _ in range(4):  # a few placements per attribute draw
        boxes = place([SIZES[a] for a in attrs[:, 2]], rng, accept)
        if boxes is not None:
            break
    if boxes is None:
        return None
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    exprs = []
    for tgt, ctx, dec_t, dec_c in ((1, 0, 3, 2), (3, 2, 1, 0)):  # the pair and its mirror (the decoy's expression)
        if kind == 1:
            cands = [x for x in range(n) if attrs[x, 0] == S and x != ctx]
            dcands = [x for x in range(n) if attrs[x, 0] == S and x != dec_c]
            head = ["the", SHAPES[S]]
            if ((int(S), int(attrs[ctx, 1])) in HELDOUT) != heldout:
                return None
        else:
            cands, dcands = [x for x in range(n) if x != ctx], [x for x in range(n) if x != dec_c]
            head = ["the", "object"]
        words = context_words(attrs, ctx)
        if words is None or unique_holder(rel, cands, ctx, centres) != tgt or \
                unique_holder(rel, dcands, dec_c, centres) != dec_t:
            return None
        exprs.append((head + list(RELATIONS[rel]) + ["the"] + words, tgt))
    perm = rng.permutation(n)  # region order carries no information
    inv = np.argsort(perm)
    return attrs[perm], boxes[perm], [(w, int(inv[t])) for w, t in exprs]


def render(attrs: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) uint8: dark noisy background, each object in its colour with a little jitter."""
    img = rng.integers(0, 40, (IMG, IMG, 3))
    for (shape, colour, size), (x, y, _, _) in zip(attrs, boxes.astype(int)):
        s = SIZES[size]
        m = shape_mask(shape, s)
        img[y:y + s, x:x + s][m] = np.clip(RGB[colour] + rng.integers(-20, 21, 3), 0, 255)
    return img.astype(np.uint8)


def crop(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box with 2 px padding, resized to 12x12 by nearest neighbour -> (3, 12, 12) uint8."""
    x1, y1, x2, y2 = int(box[0]) - PAD, int(box[1]) - PAD, int(box[2]) + PAD, int(box[3]) + PAD
    ys = np.clip(np.floor(y1 + (np.arange(CROP) + 0.5) * (y2 - y1) / CROP).astype(int), 0, IMG - 1)
    xs = np.clip(np.floor(x1 + (np.arange(CROP) + 0.5) * (x2 - x1) / CROP).astype(int), 0, IMG - 1)
    return img[ys][:, xs].transpose(2, 0, 1)


def make_split(n_scenes: int, n_range: tuple[int, int], mix, rng: np.random.Generator, heldout: bool = False,
               keep_images: int = 0) -> dict:
    """Scenes -> padded arrays: crops (S, Nmax, 3, 12, 12) uint8, spatial (S, Nmax, 5), rmask, tokens (S, 2, T),
    lens, target, etype (S, 2), cat (S, Nmax) shape ids, boxes; plus the first `keep_images` images."""
    p = np.asarray(mix, float) / np.sum(mix)
    nmax = n_range[1]
    out = dict(crops=np.zeros((n_scenes, nmax, 3, CROP, CROP), np.uint8),
               spatial=np.zeros((n_scenes, nmax, 5), np.float32),
               rmask=np.zeros((n_scenes, nmax), bool), tokens=np.zeros((n_scenes, 2, MAX_LEN), np.int64),
               lens=np.zeros((n_scenes, 2), np.int64), target=np.zeros((n_scenes, 2), np.int64),
               etype=np.zeros((n_scenes, 2), np.int64), cat=np.full((n_scenes, nmax), -1, np.int64),
               boxes=np.zeros((n_scenes, nmax, 4), np.float32), images=[], text=[])
    for s in range(n_scenes):
        kind = int(rng.choice(3, p=p))
        scene = None
        while scene is None:
            scene = make_scene(kind, int(rng.integers(n_range[0], n_range[1] + 1)), rng, heldout)
        attrs, boxes, exprs = scene
        n, img = len(attrs), render(attrs, boxes, rng)
        out["crops"][s, :n] = [crop(img, b) for b in boxes]
        w, h = (boxes[:, 2] - boxes[:, 0]) / IMG, (boxes[:, 3] - boxes[:, 1]) / IMG
        out["spatial"][s, :n] = np.stack([boxes[:, 0] / IMG, boxes[:, 1] / IMG, boxes[:, 2] / IMG, boxes[:, 3] / IMG,
                                          w * h], 1)  # l_i = [x1/W, y1/H, x2/W, y2/H, wh/(WH)]
        out["rmask"][s, :n], out["cat"][s, :n], out["boxes"][s, :n] = True, attrs[:, 0], boxes
        for e, (words, tgt) in enumerate(exprs):
            out["tokens"][s, e, :len(words)] = [WORD_ID[w] for w in words]
            out["lens"][s, e], out["target"][s, e], out["etype"][s, e] = len(words), tgt, kind
        out["text"].append([" ".join(w) for w, _ in exprs])
        if s < keep_images:
            out["images"].append(img)
    out["emask"] = np.ones((n_scenes, 2), bool)
    return out


def load_refer_dir(path: str, split_names=("train", "test")) -> tuple[dict, dict, np.ndarray]:
    """The refer-toolkit layout: refs(unc).p (list of refs: image_id, ann_id, split, sentences[{tokens}]),
    instances.json (unused beyond checking it exists), feats/<image_id>.npz with vis (N, Dv), spatial (N, 5),
    boxes (N, 4) [x1, y1, x2, y2] and ann_ids (N,), vocabulary.txt, embed_matrix.npy (V, D_e).
    -> {split: padded arrays like make_split, with `feats` instead of crops}, the vocabulary, the embedding matrix."""
    root = Path(path)
    need = ["refs(unc).p", "instances.json", "vocabulary.txt", "embed_matrix.npy"]
    for name in need:
        if not (root / name).is_file():
            raise shared.UsageError(f"--data-dir {path} has no {name}.")
    try:
        refs = pickle.loads((root / "refs(unc).p").read_bytes())
        assert isinstance(refs, list) and all({"image_id", "ann_id", "split", "sentences"} <= set(r) for r in refs)
    except Exception:  # noqa: BLE001 -- any failure here is a malformed file
        raise shared.UsageError("refs(unc).p is not a pickled list of refs with image_id, ann_id, split, "
                                "sentences.") from None
    vocab = {w.strip(): i for i, w in enumerate((root / "vocabulary.txt").read_text().splitlines()) if w.strip()}
    try:
        embed = np.load(root / "embed_matrix.npy")
    except Exception:  # noqa: BLE001
        raise shared.UsageError("embed_matrix.npy cannot be read as a numpy array.") from None
    if embed.ndim != 2 or embed.shape[0] != len(vocab):
        raise shared.UsageError(f"embed_matrix.npy has shape {embed.shape}, expected ({len(vocab)}, D) for the "
                                "words of vocabulary.txt.")
    splits = {}
    for name in split_names:
        per_image = {}
        for r in (r for r in refs if r["split"] == name):
            per_image.setdefault(r["image_id"], []).append(r)
        rows = []
        for image_id, rs in per_image.items():
            f = root / "feats" / f"{image_id}.npz"
            try:
                z = dict(np.load(f))
                vis, spa, ann = z["vis"].astype(np.float32), z["spatial"].astype(np.float32), list(z["ann_ids"])
                assert vis.ndim == 2 and spa.shape == (len(vis), 5) and len(ann) == len(vis)
            except Exception:  # noqa: BLE001
                raise shared.UsageError(f"{f.name} is missing or lacks vis (N, D), spatial (N, 5), "
                                        "ann_ids (N,).") from None
            exprs = [([vocab.get(w, vocab.get("<unk>", 0)) for w in s["tokens"]][:MAX_LEN], ann.index(r["ann_id"]))
                     for r in rs if r["ann_id"] in ann for s in r["sentences"]]
            rows.append((vis, spa, exprs))
        splits[name] = pad_refer(rows)
    return splits, vocab, embed


def pad_refer(rows: list) -> dict:
    """[(vis (N, D), spatial (N, 5), [(token ids, target)])] -> padded arrays (images x regions, expressions)."""
    S, nmax, emax = len(rows), max(len(r[0]) for r in rows), max(max(len(r[2]) for r in rows), 1)
    out = dict(feats=np.zeros((S, nmax, rows[0][0].shape[1]), np.float32), spatial=np.zeros((S, nmax, 5), np.float32),
               rmask=np.zeros((S, nmax), bool), tokens=np.zeros((S, emax, MAX_LEN), np.int64),
               lens=np.ones((S, emax), np.int64), target=np.zeros((S, emax), np.int64),
               etype=np.zeros((S, emax), np.int64), emask=np.zeros((S, emax), bool), cat=np.zeros((S, nmax), np.int64))
    for s, (vis, spa, exprs) in enumerate(rows):
        out["feats"][s, :len(vis)], out["spatial"][s, :len(vis)], out["rmask"][s, :len(vis)] = vis, spa, True
        for e, (tok, tgt) in enumerate(exprs):
            out["tokens"][s, e, :len(tok)], out["lens"][s, e] = tok, max(len(tok), 1)
            out["target"][s, e], out["emask"][s, e] = tgt, len(tok) > 0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 2. Attention: word attention (a learned query per cue) and the context posterior over regions
# ---------------------------------------------------------------------------------------------------------------------
# DEVIATION 3: comments cite the paper's sections and quantities, not equation numbers (not checked in this session)
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax_k(q . k + bias, masked) v, scale 1. q: (B, H, Lq, d), k: (B, H, Lk, d), v: (B, H, Lk, dv);
    mask: bool broadcastable to (B, H, Lq, Lk), True = attend (SDPA's convention), never an empty row;
    bias: float (B, H, Lq, Lk) or None. Word attention: q = cue vectors w_c, k = BiLSTM states h_t, v = word
    embeddings e_t (Sec. 3.3, a^c_t = softmax_t(w_c . h_t)). Context posterior: q = k = 0 and bias = e_ij, so the
    output is sum_j q(j | i) f_j with q(j | i) = softmax_j(e_ij) (Sec. 3.2)."""
    scores = q @ k.transpose(-2, -1)  # (B, H, Lq, Lk); scale = 1 as in the paper
    if bias is not None:
        scores = scores + bias
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # padded words / regions get weight 0
    return weights @ v  # (B, H, Lq, dv)


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same function through F.scaled_dot_product_attention (a float attn_mask carries the bias and -inf)."""
    attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)  # (B, H, Lq, dv)


ATTENTION = {"fused": attention_fused, "reference": attention_reference}


# ---------------------------------------------------------------------------------------------------------------------
# 3. Model: region encoder, cue-specific language encoder, VC / CMN-style / context-free scoring
# ---------------------------------------------------------------------------------------------------------------------
class CropCNN(nn.Module):
    """conv(3->16)-pool-conv(16->32)-pool-fc(vis): the region's visual feature v_i (stand-in for VGG fc7)."""

    # DEVIATION 1: a small CNN trained jointly on 12x12 crops instead of frozen VGG-16 fc7 on real images

    def __init__(self, vis: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(32 * (CROP // 4) ** 2, vis), nn.ReLU())

    def forward(self, crops: torch.Tensor, rmask: torch.Tensor) -> torch.Tensor:  # (B, N, 3, 12, 12) uint8
        x = crops[rmask].to(self.net[0].weight.dtype) / 255.0 - 0.5  # (regions, 3, 12, 12): padding skipped
        v = self.net(x)  # (regions, vis)
        return v.new_zeros(*rmask.shape, v.shape[-1]).masked_scatter(rmask[..., None], v)  # (B, N, vis)


class Single(nn.Module):
    """single(f, y) = w^T normalize((W f + b) * y) + b'  (OFFICIAL CODE: elementwise product, L2 norm, linear)."""

    def __init__(self, f_dim: int, d: int):
        super().__init__()
        self.proj, self.out = nn.Linear(f_dim, d), nn.Linear(d, 1)

    def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # f: (M, ..., F), y: (M, D)
        y = y.view(y.shape[0], *([1] * (f.dim() - 2)), -1)  # broadcast over the region axes
        return self.out(F.normalize(self.proj(f) * y, dim=-1)).squeeze(-1)  # (M, ...)


def pair_input(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """[l_a; l_b; l_b - l_a; |centre_b - centre_a|] (16-d). DEVIATION 2: the paper feeds [l_a; l_b] only."""
    la, lb = torch.broadcast_tensors(la, lb)  # (M, N, 1, 5) with (M, 1, N, 5): every (i, j) pair
    ca, cb = (la[..., 0:2] + la[..., 2:4]) / 2, (lb[..., 0:2] + lb[..., 2:4]) / 2
    return torch.cat([la, lb, lb - la, (cb - ca).norm(dim=-1, keepdim=True)], -1)


class Pair(nn.Module):
    """pair(l_a, l_b, y) = w^T normalize(P([l_a; l_b]) * y) + b'; P = a one-hidden-layer MLP (DEVIATION 2)."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(16, d), nn.ReLU(), nn.Linear(d, d))
        self.out = nn.Linear(d, 1)

    def forward(self, la: torch.Tensor, lb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.proj(pair_input(la, lb))  # (M, ..., D)
        y = y.view(y.shape[0], *([1] * (p.dim() - 2)), -1)
        return self.out(F.normalize(p * y, dim=-1)).squeeze(-1)  # (M, ...)


class Grounder(nn.Module):
    """kind "vc" (the method), "cmn" (pairwise max over context) or "free" (no context): scores S (M, N)."""

    N_CUES = {"vc": 5, "cmn": 3, "free": 1}

    def __init__(self, kind: str, args: Args, vocab: int, attn_fn: Callable, feat_dim: Optional[int] = None,
                 embed: Optional[np.ndarray] = None):
        super().__init__()
        self.kind, self.attn_fn, self.args = kind, attn_fn, args
        self.cnn = CropCNN(args.vis) if feat_dim is None else None  # None: --data-dir's precomputed features
        vis = (args.vis if feat_dim is None else feat_dim) * (2 if args.visdif else 1)
        f_dim, D, H = vis + 5, args.emb, args.lstm  # f_i = [v_i; l_i]
        self.embed = nn.Embedding(vocab, D, padding_idx=0)
        if embed is not None:  # the official repo initialises from a given embedding matrix
            self.embed.weight.data.copy_(torch.from_numpy(embed))
        self.lstm1 = nn.LSTM(D, H, batch_first=True, bidirectional=True)
        self.lstm2 = nn.LSTM(2 * H, H, batch_first=True, bidirectional=True)
        self.cues = nn.Parameter(torch.randn(self.N_CUES[kind], 4 * H) / math.sqrt(4 * H))  # w_c, one per cue
        if kind == "free":
            self.single = Single(f_dim, D)
        elif kind == "cmn":
            self.subj, self.obj, self.rel = Single(f_dim, D), Single(f_dim, D), Pair(D)
        else:
            self.single_c, self.pair_c = Single(f_dim, D), Pair(D)  # q(z | x, L): the "encoder"
            self.single_r, self.pair_r = Single(f_dim, D), Pair(D)  # p(x | z, L): the "decoder"
            self.single_g = Single(f_dim, D)  # p(z | L): the prior / regulariser
            self.alpha = nn.Parameter(torch.ones(4))  # alpha1, alpha2 (encoder), alpha1', alpha2' (decoder)
        for mod in self.modules():  # OFFICIAL CODE (util/cnn.py fc_layer): Xavier-uniform weights, zero biases
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)

    def phrases(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Cue-specific phrase vectors y^c = sum_t a^c_t e_t, a^c_t = softmax_t(w_c . h_t) -> (M, C, D)."""
        e = self.embed(tokens)  # (M, T, D)
        T, lens_cpu = tokens.shape[1], lens.cpu()
        pack = lambda x: pack_padded_sequence(x, lens_cpu, batch_first=True, enforce_sorted=False)  # noqa: E731
        h1 = pad_packed_sequence(self.lstm1(pack(e))[0], batch_first=True, total_length=T)[0]  # (M, T, 2H)
        h2 = pad_packed_sequence(self.lstm2(pack(h1))[0], batch_first=True, total_length=T)[0]  # (M, T, 2H)
        h = torch.cat([h1, h2], -1)  # (M, T, 4H): h_t = [layer-1 output; layer-2 output]
        words = torch.arange(T, device=tokens.device)[None] < lens[:, None]  # (M, T) True = a real word
        q = self.cues[None, None].expand(len(e), 1, -1, -1)  # (M, 1, C, 4H)
        # NOTE: the bias b_c of w_c . h_t + b_c is constant over t and cancels in the softmax, so it is dropped.
        # OFFICIAL CODE runs the BiLSTM over the padding and renormalises the softmax over real words; packing here
        # keeps padding out of the backward direction too.
        return self.attn_fn(q, h[:, None], e[:, None], words[:, None, None, :])[:, 0]  # (M, C, D)

    def regions(self, vis: torch.Tensor, spatial: torch.Tensor, rmask: torch.Tensor, cat: torch.Tensor):
        """f_i = [v_i; (visdif_i;) l_i] -> (B, N, F)."""
        v = vis if self.cnn is None else self.cnn(vis, rmask)  # (B, N, V)
        if self.args.visdif:  # Yu et al. 2016: mean over same-category others of normalize(v_i - v_j)
            same = (cat[:, :, None] == cat[:, None, :]) & rmask[:, None, :] & rmask[:, :, None]
            same = same & ~torch.eye(v.shape[1], dtype=torch.bool, device=v.device)  # (B, N, N)
            diff = F.normalize(v[:, :, None] - v[:, None, :], dim=-1) * same[..., None]  # (B, N, N, V)
            v = torch.cat([v, diff.sum(2) / same.sum(2, keepdim=True).clamp(min=1)], -1)
        return torch.cat([v, spatial], -1)

    def forward(self, vis, spatial, rmask, cat, tokens, lens, emask) -> torch.Tensor:
        """Scenes (B, N, ...) and their expressions (B, E, T) -> scores S (M, N) of the M valid expressions."""
        f = self.regions(vis, spatial, rmask, cat)  # (B, N, F)
        B, E, N = tokens.shape[0], tokens.shape[1], f.shape[1]
        sel = emask.flatten()  # expressions of a scene share its region tensor
        f = f[:, None].expand(B, E, N, -1).flatten(0, 1)[sel]  # (M, N, F)
        l = spatial[:, None].expand(B, E, N, 5).flatten(0, 1)[sel]  # (M, N, 5)
        valid = rmask[:, None].expand(B, E, N).flatten(0, 1)[sel]  # (M, N)
        y = self.phrases(tokens.flatten(0, 1)[sel], lens.flatten()[sel])  # (M, C, D)
        if self.kind == "free":
            S = self.single(f, y[:, 0])  # context-free: S_i = single(f_i, y)
        elif self.kind == "cmn":  # S_i = subj(f_i) + max_{j != i} [obj(f_j) + rel(l_i, l_j)]  (Hu et al. 2017)
            pair = self.obj(f, y[:, 1])[:, None, :] + self.rel(l[:, :, None], l[:, None, :], y[:, 2])  # (M, N, N)
            ok = valid[:, None, :] & ~torch.eye(N, dtype=torch.bool, device=f.device)  # j valid and j != i
            S = self.subj(f, y[:, 0]) + pair.masked_fill(~ok, -1e4).amax(-1)  # (M, N)
        else:
            S = self.vc_scores(f, l, valid, y)
        return S.masked_fill(~valid, float("-inf"))  # padded regions are never candidates

    def vc_scores(self, f, l, valid, y) -> torch.Tensor:
        """S_i = loc_i - enc_i + prior_i: the lower bound log p(x_i | z~, L) + log p(z~ | L) - log q(z~ | x_i, L)
        evaluated at the mean context sample z~_i (Sec. 3.2), cues y = [c1, c2, r1, r2, g] (M, 5, D)."""
        a1, a2, b1, b2 = self.alpha
        N = f.shape[1]
        # context posterior q(j | i, L): e_ij = alpha1 single_c(f_j, y^c1) + alpha2 pair_c(l_i, l_j, y^c2)
        # DEVIATION 5: [l_i; l_j] here and [l_i; l~_i] in enc_i (the official posterior reads [l_j; l_i])
        e = a1 * self.single_c(f, y[:, 0])[:, None, :] + a2 * self.pair_c(l[:, :, None], l[:, None, :], y[:, 1])
        keys = valid[:, None, :].expand(-1, N, -1)  # (M, N, N): padded regions are never the context
        if self.args.mask_self:
            keys = keys & ~torch.eye(N, dtype=torch.bool, device=f.device)
        zero = f.new_zeros(f.shape[0], 1, N, 1)
        z = self.attn_fn(zero, zero, f[:, None], keys[:, None], e[:, None])[:, 0]  # (M, N, F): z~_i = sum_j q f_j
        lz = z[..., -5:]  # the spatial part l~_i of the soft context
        # log q(z~_i | x_i, L) (unnormalised), the SAME encoder weights applied to the soft context
        enc = a1 * self.single_c(z, y[:, 0]) + a2 * self.pair_c(l, lz, y[:, 1])  # (M, N)
        # log p(x_i | z~_i, L): the referent given its context (only the context's spatial part enters)
        loc = b1 * self.single_r(f, y[:, 2]) + b2 * self.pair_r(l, lz, y[:, 3])  # (M, N)
        prior = self.single_g(z if self.args.prior_on_context else f, y[:, 4])  # log p(z | L) (OFFICIAL CODE: on f)
        return loc - enc + prior  # (M, N)

    @torch.no_grad()
    def context_posterior(self, batch: dict) -> torch.Tensor:
        """q(j | i, L) (M, N, N) for the figure (VC only)."""
        f = self.regions(batch["vis"], batch["spatial"], batch["rmask"], batch["cat"])
        B, E, N = batch["tokens"].shape[0], batch["tokens"].shape[1], f.shape[1]
        f = f[:, None].expand(B, E, N, -1).flatten(0, 1)
        l = batch["spatial"][:, None].expand(B, E, N, 5).flatten(0, 1)
        valid = batch["rmask"][:, None].expand(B, E, N).flatten(0, 1)
        y = self.phrases(batch["tokens"].flatten(0, 1), batch["lens"].flatten())
        a1, a2 = self.alpha[:2]
        e = a1 * self.single_c(f, y[:, 0])[:, None, :] + a2 * self.pair_c(l[:, :, None], l[:, None, :], y[:, 1])
        keys = valid[:, None, :].expand(-1, N, -1)
        if self.args.mask_self:
            keys = keys & ~torch.eye(N, dtype=torch.bool, device=f.device)
        return e.masked_fill(~keys, float("-inf")).softmax(-1)  # (M, N, N)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Train
# ---------------------------------------------------------------------------------------------------------------------
def to_device(split: dict, idx, device: torch.device) -> dict:
    """One batch of scenes as tensors on `device`."""
    vis = split["crops"] if "crops" in split else split["feats"]
    names = ("spatial", "rmask", "cat", "tokens", "lens", "emask", "target", "etype")
    return {"vis": torch.from_numpy(vis[idx]).to(device),
            **{k: torch.from_numpy(np.ascontiguousarray(split[k][idx])).to(device) for k in names}}


def loss_fn(S: torch.Tensor, target: torch.Tensor, supervision: str) -> torch.Tensor:
    """Supervised: cross-entropy of softmax_i S_i; unsupervised: -log max_i softmax(S)_i clamped at 1e-5."""
    # DEVIATION 4: no expression-reconstruction term (the journal extension's addition)
    if supervision == "supervised":
        return F.cross_entropy(S, target)
    return -S.softmax(-1).amax(-1).clamp(min=1e-5).log().mean()


def train(model: Grounder, data: dict, args: Args, device: torch.device, name: str) -> list[dict]:
    # OFFICIAL CODE: L2 on weight matrices only (not biases, alphas or the embedding), as tf.nn.l2_loss = sum w^2 / 2
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    opt = (torch.optim.Adam(model.parameters(), lr=args.lr) if args.optim == "adam" else
           torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.95))
    S_train = len(data["tokens"])
    steps_per_epoch = S_train // args.batch
    total = steps_per_epoch * args.epochs
    if args.compile:
        print(f"[{name}] torch.compile: the first steps compile the model (tens of seconds)...", flush=True)
    fwd = torch.compile(model) if args.compile else model
    gen, prog, history, step = np.random.default_rng(args.seed + 1), shared.Progress(name, total), [], 0
    model.train()
    for epoch in range(args.epochs):
        order = gen.permutation(S_train)
        for b in range(steps_per_epoch):
            batch = to_device(data, order[b * args.batch:(b + 1) * args.batch], device)
            for g in opt.param_groups:  # x0.1 after decay_at of training (official: 120k of 180k steps)
                g["lr"] = args.lr * (0.1 if step >= args.decay_at * total else 1.0)
            S = fwd(batch["vis"], batch["spatial"], batch["rmask"], batch["cat"], batch["tokens"], batch["lens"],
                    batch["emask"])
            loss = loss_fn(S, batch["target"][batch["emask"]], args.supervision)
            total_loss = loss + args.weight_decay * sum(p.pow(2).sum() for p in decay) / 2
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            for p in model.parameters():  # per-tensor gradient-norm clip (OFFICIAL CODE)
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], args.clip)
            opt.step()
            step += 1
            prog.update(step, loss=loss.item())
            if step % 50 == 0 or step == total:
                history.append({"model": name, "step": step, "train/loss": round(loss.item(), 5)})
    return history


# ---------------------------------------------------------------------------------------------------------------------
# 5. Evaluate
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: Grounder, data: dict, device: torch.device, bs: int = 128) -> dict:
    """Accuracy (argmax_i S_i == the referent; with ground-truth boxes this is IoU >= 0.5) overall and per type."""
    model.eval()
    hits, types, preds = [], [], []
    for s in range(0, len(data["tokens"]), bs):
        batch = to_device(data, np.arange(s, min(s + bs, len(data["tokens"]))), device)
        S = model(batch["vis"], batch["spatial"], batch["rmask"], batch["cat"], batch["tokens"], batch["lens"],
                  batch["emask"])
        pred = S.argmax(-1)
        hits.append((pred == batch["target"][batch["emask"]]).cpu())
        types.append(batch["etype"][batch["emask"]].cpu())
        preds.append(pred.cpu())
    model.train()
    hit, typ = torch.cat(hits).float(), torch.cat(types)
    out = {"acc": float(hit.mean())}
    for t, name in enumerate(TYPES):
        if (typ == t).any():
            out[f"acc {name.split()[0]}"] = float(hit[typ == t].mean())
    return out | {"_pred": torch.cat(preds).numpy()}


# ---------------------------------------------------------------------------------------------------------------------
# 6. Benchmark: reference vs fused attentions at the paper's shapes, eager vs compiled training step
# ---------------------------------------------------------------------------------------------------------------------
def bench(args: Args, device: torch.device) -> dict:
    # paper: 2 x 1000 BiLSTM -> h_t in R^4000, 300-d embeddings, T = 20 words, 5 cues; ~10 regions of 8192 + 5 dims
    M, T, d, De, C, N, Fd = 32, 20, 4000, 300, 5, 10, 8197
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    def rnd(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=gen)).to(device, dtype).requires_grad_(True)

    lens = torch.randint(3, T + 1, (M,), generator=gen)
    word_mask = (torch.arange(T)[None] < lens[:, None])[:, None, None].to(device)  # (M, 1, 1, T)
    q, k, v = rnd(M, 1, C, d, scale=1 / 60), rnd(M, 1, T, d), rnd(M, 1, T, De)
    present = torch.arange(N)[None] < torch.randint(4, N + 1, (M,), generator=gen)[:, None]
    reg_mask = present[:, None, None].expand(M, 1, N, N).to(device)  # (M, 1, N, N)
    zero, f, e = torch.zeros(M, 1, N, 1, device=device, dtype=dtype), rnd(M, 1, N, Fd), rnd(M, 1, N, N)
    cases = {f"word attention (M={M}, C={C}, T={T}, d={d}, D_e={De})": (q, k, v, word_mask, None),
             f"context attention (M={M}, N={N}, F={Fd})": (zero, zero, f, reg_mask, e)}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    rows, errs = [], {}
    for what, inp in cases.items():
        ref32 = attention_reference(*[x.float() if x is not None and x.is_floating_point() else x for x in inp])
        errs[what] = (attention_fused(*inp).float() - ref32).abs().max().item()
        if errs[what] > tol * max(1.0, ref32.abs().max().item()):
            raise RuntimeError(f"fused {what} differs from the reference by {errs[what]:.2e}")
        for tag, fn_of in (("fwd", lambda fn: lambda: fn(*inp)),  # noqa: B023 (called inside this iteration)
                           ("fwd+bwd", lambda fn: lambda: fn(*inp).sum().backward())):  # noqa: B023
            rows.append({"what": f"{what} {tag} {str(dtype)[6:]}",
                         "reference_ms": shared.benchmark(fn_of(attention_reference), device),
                         "fused_ms": shared.benchmark(fn_of(attention_fused), device)})
    data = make_split(args.batch, (args.min_objects, args.max_objects), args.mix, np.random.default_rng(0))
    batch = to_device(data, np.arange(args.batch), device)
    step_ms = []
    for compiled in (False, True):
        shared.seed_everything(0)
        model = Grounder("vc", args, len(VOCAB), ATTENTION[args.attn]).to(device)
        opt, fwd = torch.optim.Adam(model.parameters()), (torch.compile(model) if compiled else model)

        def step():
            S = fwd(batch["vis"], batch["spatial"], batch["rmask"], batch["cat"], batch["tokens"], batch["lens"],
                    batch["emask"])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(S, batch["target"][batch["emask"]]).backward()
            opt.step()

        if compiled:
            print("compiling the model (tens of seconds)...", flush=True)
        step_ms.append(shared.benchmark(step, device, warmup=3, repeats=10))
    rows.append({"what": f"train step eager vs compile (VC, {args.batch} scenes, lstm {args.lstm}, attn={args.attn})",
                 "reference_ms": step_ms[0], "fused_ms": step_ms[1]})
    return shared.save_bench(args, SLUG, device, rows, max_abs_err=errs)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Main
# ---------------------------------------------------------------------------------------------------------------------
PAPER_ACC = {  # ground-truth boxes (the card's numbers, from the paper / MAttNet's comparison table)
    "RefCOCO testA": (78.98, 75.94), "RefCOCO testB": (82.39, 79.57), "RefCOCO+ testA": (62.56, 59.29),
    "RefCOCO+ testB": (62.90, 59.34), "RefCOCOg test": (73.98, 69.30)}
MODELS = {"VC": "vc", "CMN-MIL": "cmn", "context-free": "free"}


def build_data(args: Args) -> tuple[dict, int, Optional[int], Optional[np.ndarray]]:
    """{"train", "test", "heldout"} splits, vocabulary size, precomputed feature size (None = crops), embeddings."""
    if args.data_dir is not None:
        splits, vocab, embed = load_refer_dir(args.data_dir)
        if args.emb != embed.shape[1]:
            raise shared.UsageError(f"--emb {args.emb} must equal the width {embed.shape[1]} of embed_matrix.npy.")
        return splits, len(vocab), splits["train"]["feats"].shape[-1], embed
    print("generating ShapeRefer scenes...", flush=True)
    n_range = (args.min_objects, args.max_objects)
    test_rng = np.random.default_rng(TEST_SEED)
    splits = {"train": make_split(args.n_train, n_range, args.mix, np.random.default_rng(args.seed)),
              "test": make_split(args.n_test, n_range, args.mix, test_rng, keep_images=24),
              "heldout": make_split(args.n_heldout, (8, 10), args.mix, test_rng, heldout=True)}
    return splits, len(VOCAB), None, None


def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        shared.seed_everything(args.seed)
        return bench(args, device)
    t_start = time.perf_counter()
    data, vocab, feat_dim, embed = build_data(args)
    results, history, models, preds = {}, [], {}, {}
    for name, kind in MODELS.items():
        shared.seed_everything(args.seed)  # every model starts from the same seed, whatever ran before
        model = Grounder(kind, args, vocab, ATTENTION[args.attn], feat_dim, embed).to(device)
        t0 = time.perf_counter()
        history += train(model, data["train"], args, device, name)
        train_s = time.perf_counter() - t0
        results[name], models[name] = {}, model
        for split in [s for s in ("test", "heldout") if s in data]:
            ev = evaluate(model, data[split], device)
            preds[(name, split)] = ev.pop("_pred")
            results[name] |= {(k if split == "test" else f"heldout {k}"): v for k, v in ev.items()}
        results[name]["train_s"] = train_s
    vc, cmn, free = results["VC"], results["CMN-MIL"], results["context-free"]
    synthetic = args.data_dir is None
    checks = {"VC overall >= 0.85": vc["acc"] >= 0.85,
              "VC on T2 relational >= 0.80": vc.get("acc T2", 0.0) >= 0.80,
              "context-free on T2 <= 0.60": free.get("acc T2", 1.0) <= 0.60,
              "context-free on T1 >= 0.90": free.get("acc T1", 0.0) >= 0.90,
              "VC >= CMN-MIL - 0.02 overall": vc["acc"] >= cmn["acc"] - 0.02} if synthetic else \
        {"VC >= CMN-MIL - 0.02 overall": vc["acc"] >= cmn["acc"] - 0.02}
    claim = {"text": "VC grounds relational expressions through its learned context posterior (overall >= 0.85, "
                     "T2 >= 0.80) where a context-free model is at chance on T2 (<= 0.60, T1 >= 0.90), and matches "
                     f"or beats CMN-style pairwise MIL (VC - CMN = {vc['acc'] - cmn['acc']:+.3f})",
             "passed": bool(all(checks.values())), "checks": {k: bool(c) for k, c in checks.items()}}

    rows = []
    paper = {"acc": "VC 78.98 / CMN 75.94 (RefCOCO testA, gt boxes)", "acc T2": "+3-5 pts over CMN"}
    metrics = [k for k in vc if k != "train_s"]
    for k in metrics:
        rows.append([k] + [results[n].get(k, "") for n in MODELS] + [paper.get(k, "")])
    rows.append(["train s"] + [results[n]["train_s"] for n in MODELS] + [""])
    shared.print_table(["metric", "VC (method)", "CMN-MIL (baseline)", "context-free", "paper"], rows, claim)
    for check, ok in claim["checks"].items():
        print(f"  [{'x' if ok else ' '}] {check}")
    if synthetic:
        wrong = np.nonzero(preds[("VC", "test")] != data["test"]["target"].flatten())[0]
        for w in wrong[:3]:  # a few failures of the method, as text
            s, e = divmod(int(w), 2)
            print(f"  VC miss: '{data['test']['text'][s][e]}' -> region {preds[('VC', 'test')][w]}, "
                  f"referent {data['test']['target'][s, e]}")
        plot(models["VC"], data["test"], results, preds[("VC", "test")], args, device)
    key = {"metric": "acc", "method": "VC", "baseline": "CMN-MIL", "higher_is_better": True}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers={k: {"VC": a, "CMN": b} for k, (a, b) in PAPER_ACC.items()},
                               history=history, wall_s=time.perf_counter() - t_start)


def plot(model: Grounder, test: dict, results: dict, pred: np.ndarray, args: Args, device: torch.device) -> None:
    """Accuracy per expression type for the three models, and test scenes with VC's referent and its context
    posterior q(j | referent, L) (the paper's qualitative figure: the referent and the context it attends to)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 4.6))
    ax = fig.add_subplot(1, 5, (1, 2))
    cols = [k for k in ("acc T1", "acc T2", "acc T3", "acc", "heldout acc") if k in results["VC"]]
    for i, name in enumerate(MODELS):
        ax.bar(np.arange(len(cols)) + (i - 1) * 0.27, [results[name][c] for c in cols], 0.27, label=name)
    ax.set_xticks(np.arange(len(cols)), [c.replace("acc", "").strip() or "all" for c in cols])
    ax.set(ylim=(0, 1.05), ylabel="grounding accuracy", title="test accuracy per expression type")
    ax.legend(fontsize=8)
    rel = [s for s in range(len(test["images"])) if test["etype"][s, 0] > 0][:3]
    batch = to_device(test, np.array(rel), device)
    q = model.context_posterior(batch).cpu().numpy()  # (3 scenes x 2 expressions, N, N)
    for p, s in enumerate(rel):
        ax = fig.add_subplot(1, 5, 3 + p)
        ax.imshow(test["images"][s])
        i = int(pred[2 * s])  # VC's referent for the scene's first expression
        for j, b in enumerate(test["boxes"][s][test["rmask"][s]]):
            w = q[2 * p, i, j]
            ax.add_patch(patches.Rectangle(b[:2] - 0.5, *(b[2:] - b[:2]), fill=False, lw=0.5 + 3 * w,
                                           ec=(1, 0.6, 0, min(1, 0.2 + w))))
            ax.text(b[0], b[1] - 1, f"{w:.2f}", color="orange", fontsize=6)
        b = test["boxes"][s][i]
        ax.add_patch(patches.Rectangle(b[:2] - 1.5, *(b[2:] - b[:2] + 2), fill=False, lw=2,
                                       ec="lime" if i == test["target"][s, 0] else "red"))
        ax.set_title(test["text"][s][0], fontsize=7)
        ax.axis("off")
    fig.suptitle("VC: referent (green = correct) and context posterior q(j | referent, L) (orange, weights)")
    fig.tight_layout()
    fig.savefig(shared.run_path(args, SLUG, ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
