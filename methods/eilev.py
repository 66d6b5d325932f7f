"""EILEV: Efficient In-Context Learning in Vision-Language Models for Egocentric Videos
(Yu, Zhang, Hu, Storks, Chai, arXiv 2023; v4 retitled "Eliciting In-Context Learning in Vision-Language Models for
Videos Through Curated Data Distributional Properties", EMNLP 2024)
arXiv:2311.17041 (the method has no numbered equations; references are to v4's method description, its Fig. 1 and
the official code)  https://arxiv.org/abs/2311.17041
Official code: https://github.com/yukw777/EILEV (eilev/model/v2.py, eilev/data/frame.py, scripts/general/train_v2.py)

The method in a few lines
    A BLIP-2-style video-language model (frozen vision encoder -> trainable Q-Former -> linear projection -> causal LM)
    reads interleaved sequences "[clip_1] prompt narration_1 [clip_2] prompt narration_2 ... [clip_q] prompt" and is
    trained to write the query narration only. In-context learning (ICL) is not asked for by any loss term: it is
    elicited by the distribution of the training sequences (Fig. 1): (a) burstiness -- the context examples share the
    query's verb or noun, (b) a skewed (Zipfian) marginal over actions with a long tail, (c) dynamic meaning --
    synonyms and homonyms, so the right word can only be read from the context. Evaluated on rare, held-out verb-noun
    pairs, accuracy rises with the number of shots, while the same model trained on random contexts (no burstiness)
    or without contexts (the fine-tuned "FT" baseline, VideoBLIP) does not gain from them.

Reproduces: at CPU scale on generated "EgoShapes" clips (12 motion verbs x 36 shape/colour nouns, Zipf-split into
114 common training pairs and 318 rare test pairs, one synonym per class drawn per sequence): EILEV's strict action
accuracy on rare pairs rises from 0 at 0 shots to 0.50-0.58 at 8 shots (seeds 0-2), while the bursty ablation
(random contexts) and FT (no contexts) stay at 0 for every number of shots -- the card's criteria hold. Its ROUGE-L
curve has the paper's shape (EILEV 0.25-0.29 -> 0.83-0.86, FT flat ~0.5). BUT the in-context skill is not visually
grounded here: with the query clip swapped for another test clip EILEV keeps the same accuracy (0.550 vs 0.562,
seed 0), i.e. it writes the verb and noun words that recur in the bucket-sampled context, and no model recognises
the classes of rare pairs from the clip (class-level accuracy of the baselines <= 0.02). The "query clip used"
check is printed and stored (claim["query_clip_used"]) but not counted, as the card's criteria do not ask it.

Run:
    python methods/eilev.py                                  # default preset: 3 models, CPU, see Expected
    python methods/eilev.py --preset smoke                   # seconds, same code path
    python methods/eilev.py --preset paper --device cuda     # k=16, bigger Q-Former and LM, 20k steps
    python methods/eilev.py --attn reference                 # the literal softmax(QK^T/sqrt(d) + mask) path
    python methods/eilev.py --bench                          # reference vs SDPA attention, eager vs compiled step
    python methods/eilev.py --data-dir DIR                   # Ego4D-style CSVs + per-clip feature .npy files
    python methods/eilev.py --help

Expected (default preset, seed 0; 181 s on a quiet 2-core CPU, 2 threads; seeds 1 and 2 below ran with 1 thread
each, side by side on a busy box):
    | metric                              | EILEV (method) | random ctx (ablation) | FT (no ctx) | paper                                     |
    |-------------------------------------|----------------|-----------------------|-------------|-------------------------------------------|
    | strict acc, k=0                     | 0              | 0                     | 0           | EILEV 0.33, random 0.49, FT 0.53 (STS-BE) |
    | strict acc, k=1                     | 0.006          | 0                     | 0           | EILEV 0.55, FT 0.54 (STS-BE)              |
    | strict acc, k=2                     | 0.216          | 0                     | 0           |                                           |
    | strict acc, k=4                     | 0.43           | 0                     | 0.002       | EILEV 0.63, FT 0.53 (STS-BE)              |
    | strict acc, k=8                     | 0.562          | 0                     | 0           | EILEV 0.67, FT 0.53 (STS-BE)              |
    | class acc, k=0                      | 0              | 0                     | 0.006       |                                           |
    | class acc, k=1                      | 0.012          | 0.002                 | 0.004       |                                           |
    | class acc, k=2                      | 0.226          | 0.004                 | 0.008       |                                           |
    | class acc, k=4                      | 0.44           | 0.006                 | 0.018       |                                           |
    | class acc, k=8                      | 0.566          | 0.004                 | 0.016       |                                           |
    | token F1, k=0                       | 0.2886         | 0.5285                | 0.539       |                                           |
    | token F1, k=1                       | 0.6989         | 0.5155                | 0.5322      |                                           |
    | token F1, k=2                       | 0.7226         | 0.5165                | 0.5059      |                                           |
    | token F1, k=4                       | 0.8112         | 0.5205                | 0.5078      |                                           |
    | token F1, k=8                       | 0.8616         | 0.5205                | 0.4615      |                                           |
    | ROUGE-L, k=0                        | 0.2886         | 0.5285                | 0.539       | EILEV 0.23, FT ~0.5 flat                  |
    | ROUGE-L, k=1                        | 0.6989         | 0.5155                | 0.5322      |                                           |
    | ROUGE-L, k=2                        | 0.7226         | 0.5165                | 0.5059      |                                           |
    | ROUGE-L, k=4                        | 0.8112         | 0.5205                | 0.5078      |                                           |
    | ROUGE-L, k=8                        | 0.8616         | 0.5205                | 0.4615      | EILEV 0.63 at k=16                        |
    | strict acc, k=8, query clip swapped | 0.55           | 0                     | 0           | diagnostic                                |

    CLAIM HOLDS: EILEV's strict accuracy on rare pairs rises with shots (+0.30 from 0 to 8); random contexts
      give at most half that gain and FT stays 0.25 below (all checks below). CAVEAT: not visually grounded:
      with the query clip swapped EILEV still scores 0.550 at k=8, so it copies the words that recur in the
      context
      [x] 1a. EILEV acc(k=8) >= acc(k=0) + 0.30 (gain 0.562)
      [x] 1b. EILEV acc non-decreasing in k within 0.03
      [x] 2a. random-context gain <= half of EILEV's (0.000 vs 0.562)
      [x] 2b. EILEV(k=8) >= random ctx(k=8) + 0.15
      [x] 3. max_k FT <= EILEV(k=8) - 0.25 (0.002 vs 0.562)
      (not counted) EILEV reads the query clip: strict acc at k=8 drops by >= 0.10 when the query clip is
      swapped (0.550 vs 0.562): False
    Seeds 1 and 2 (run at the same time): EILEV strict acc k=0/2/4/8 = 0/0.248/0.398/0.502 and 0/0.218/0.458/0.580,
    the ablation and FT 0 at every k, claim HOLDS for both; swapped-query accuracy 0.498 and 0.582 (not grounded).

Implementation details
    1. Sequence layout (eilev/model/v2.py, eilev/data/frame.py): <bos> then per example K visual placeholder tokens,
       "\\n", a prompt (one of 3 templates), the narration and "\\n"; the query example ends after its prompt and its
       target is "narration \\n <eos>". The placeholders' embeddings are overwritten, clip by clip in sequence order,
       by the projected Q-Former outputs (BLIP-2 style prefix embeddings spliced into the token stream).
    2. Loss (train_v2.py): next-token cross-entropy on the query narration, its "\\n" and <eos> only; every context
       token and every placeholder carries no label.
    3. In-context sampler (FrameInterleavedDataset): verb bucket = train items with the query's verb and another noun,
       noun bucket = items with the query's noun and another verb; floor(k r) from the verb bucket (r = 0.5), the rest
       from the noun bucket, re-balanced when one runs dry, filled from the remaining pool (never the same verb-noun
       pair, never the query), then shuffled.
    4. Skew split (split_held_out_verb_noun_train_val_test.py): sort pairs by frequency, the shortest prefix covering
       80% of the mass is "common" (training), the rest "rare" (test). Test contexts come from the training pool and
       are presampled once (query -> nested context lists and word choices) and shared by every model and shot.
    5. Vision encoder: a small per-frame CNN, pre-trained on a generic per-frame task (centroid, size, brightness,
       shape, colour -- no verb labels), then frozen and its 4 tokens per frame cached for every clip (the paper's
       frozen EVA ViT; its 257 tokens per frame become 4 here); the cached tokens are standardised per dimension.
    6. Q-Former: K learned queries; each layer = self-attention over the queries, cross-attention to the clip's
       8 x 4 frame tokens, MLP. Only the query tokens of a clip see that clip (clips are encoded separately).
    7. AdamW, linear warm-up then cosine decay, weight decay 0.05, batch 32 sequences, greedy decoding at test time.
    8. Metrics: strict accuracy (the generated narration equals the gold one, i.e. the verb and noun words are the
       ones this sequence chose), class-level accuracy (the words belong to the right verb and noun classes),
       token F1 and ROUGE-L (the paper's lexical metric; its STS metrics need sentence encoders we cannot download).

Deviations from the paper
    1. Scale and data: generated 16x16 clips and 4-token narrations, K=2 query tokens, a 2-layer d=96 Q-Former and a
       2-layer d=96 LM trained from scratch, k=8 train shots, 600 steps of 32 sequences; the paper trains BLIP-2's Q-Former
       (12 layers, 32 queries) on Ego4D with a frozen OPT-2.7B, k=16, 5 epochs.
    2. The LM is trained jointly with the Q-Former (no pretrained LM exists at this scale); the paper freezes it.
    3. The frozen vision encoder is a 3-layer CNN with coordinate channels pre-trained on a per-frame task, not EVA ViT;
       the Q-Former sees one learned embedding per (frame, patch) token.
    4. Pre-LayerNorm blocks in the Q-Former and the LM (BERT and OPT differ in details that do not matter here).
    5. Dynamic meaning is simulated: each class has synonyms plus homonym words shared by two classes, and one word
       per class is drawn per sequence; narrations are "C <verb> <noun> ." The dynamic-meaning and T-k skew ablations
       of the paper are not run (the card lists them as optional); only the bursty ablation and FT are.
    6. No KV cache in greedy decoding (sequences are ~100 tokens long).
    7. Optimisation for a from-scratch model: AdamW lr 1e-3 with 100 warm-up steps and gradient-norm clipping at 1.0
       (the official run: lr 1e-5, no warm-up, no clipping mentioned, on a pretrained Q-Former).
"""

from __future__ import annotations

import csv
import math
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

SLUG = "eilev"
PAPER = "EILEV: Efficient In-Context Learning in Vision-Language Models for Egocentric Videos"
ARXIV = "2311.17041"


@dataclass
class Args:
    """EILEV: in-context learning elicited by bursty, skewed, polysemous interleaved video-narration training data."""

    preset: str = "default"
    """name of the preset these values came from (set by --preset; it names the output files)"""
    seed: int = 0
    """seed for model initialisation and the training sequences (the dataset uses --data-seed)"""
    data_seed: int = 1234
    """seed of the generated clips, the Zipf split and the presampled test contexts (fixed across --seed)"""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu or cuda"""
    compile: bool = False
    """wrap the model in torch.compile (slow to start on CPU)"""
    bench: bool = False
    """only time reference vs fused attention (and eager vs compiled training steps) and write the bench JSON"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    attn: Literal["fused", "reference"] = "fused"
    """attention path: "reference" = literal masked softmax, "fused" = F.scaled_dot_product_attention"""
    data_dir: Optional[str] = None
    """real data: a folder with train.csv and test.csv (Ego4D narrated-action columns) and <frame_path>.npy features"""
    # DEVIATION: CPU scale (generated clips, K=2 queries, 2+2 layers of width 96, k=8, 600 steps); see PRESETS["paper"]
    n_train: int = 6000
    """clips in the training pool (common verb-noun pairs)"""
    n_test: int = 1000
    """clips in the test pool (rare verb-noun pairs)"""
    n_eval: int = 500
    """test queries evaluated at every number of shots"""
    zipf_alpha: float = 1.0
    """exponent of the Zipf law over the 432 verb-noun pairs"""
    common_mass: float = 0.8
    """the most frequent pairs covering this share of the mass are "common" (train); the rest are "rare" (test)"""
    k_train: int = 8
    """in-context examples per training sequence (EILEV and the bursty ablation)"""
    shots: tuple[int, ...] = (0, 1, 2, 4, 8)
    """numbers of in-context examples at evaluation"""
    verb_noun_ratio: float = 0.5
    """share r of the context drawn from the verb bucket (the rest from the noun bucket)"""
    n_queries: int = 2
    """K: learned Q-Former query tokens, i.e. visual tokens per clip in the LM"""
    qformer_layers: int = 2
    """Q-Former layers (self-attention, cross-attention, MLP)"""
    lm_layers: int = 2
    """decoder layers of the causal LM"""
    width: int = 96
    """hidden size of the Q-Former and the LM"""
    n_heads: int = 4
    """attention heads (must divide --width)"""
    max_len: int = 192
    """learned positions of the LM (must cover the longest evaluation sequence)"""
    steps: int = 600
    """optimizer steps per model"""
    batch_size: int = 32
    """sequences per step"""
    lr: float = 1e-3
    """peak AdamW learning rate"""
    warmup: int = 100
    """linear warm-up steps before the cosine decay"""
    weight_decay: float = 0.05
    """AdamW weight decay"""
    cnn_steps: int = 300
    """pre-training steps of the frozen per-frame CNN (generic frame task, no verb labels)"""


PRESETS = {
    "smoke": Args(preset="smoke", n_train=600, n_test=200, n_eval=40, steps=4, cnn_steps=3, batch_size=8,
                  width=32, shots=(0, 2, 8)),
    "paper": Args(preset="paper", k_train=16, shots=(0, 1, 2, 4, 8, 16), n_queries=8, qformer_layers=4, lm_layers=6,
                  width=256, n_heads=8, max_len=512, steps=20_000, lr=3e-4, warmup=1000, batch_size=64,
                  n_train=20_000, n_test=2000, cnn_steps=2000),
}


def validate(args: Args) -> None:
    if args.width % args.n_heads != 0:
        raise shared.UsageError(f"--n-heads {args.n_heads} must divide --width {args.width}.")
    if min(args.steps, args.batch_size, args.n_queries, args.qformer_layers, args.lm_layers, args.n_eval) < 1:
        raise shared.UsageError("steps, batch size, queries, layers and --n-eval must all be positive.")
    if args.k_train < 1 or not args.shots or min(args.shots) < 0:
        raise shared.UsageError("--k-train must be >= 1 and --shots non-negative numbers of in-context examples.")
    if not 0.0 <= args.verb_noun_ratio <= 1.0:
        raise shared.UsageError(f"--verb-noun-ratio {args.verb_noun_ratio} must lie in [0, 1].")
    if not 0.0 < args.common_mass < 1.0 or args.zipf_alpha <= 0:
        raise shared.UsageError("--common-mass must lie strictly between 0 and 1 and --zipf-alpha be positive.")
    if args.n_train < 50 or args.n_test < args.n_eval:
        raise shared.UsageError("--n-train must be >= 50 and --n-test at least --n-eval.")
    longest = 1 + (max(max(args.shots), args.k_train) + 1) * (args.n_queries + 1 + 3 + 14 + 1) + 2
    if args.max_len < longest:
        raise shared.UsageError(f"--max-len {args.max_len} is shorter than the longest sequence ({longest} tokens).")
    if args.lr <= 0 or args.warmup < 0 or args.cnn_steps < 0:
        raise shared.UsageError("--lr must be positive and --warmup, --cnn-steps non-negative.")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: EgoShapes clips, a Zipf split into common (train) and rare (test) actions, synonyms and homonyms
# ---------------------------------------------------------------------------------------------------------------------
VERBS = ["slide-left", "slide-right", "slide-up", "slide-down", "grow", "shrink", "blink", "shake",
         "bounce-horizontal", "bounce-vertical", "fade-in", "fade-out"]
VERB_SYNONYMS = [["slides-left", "drifts-left", "glides-west"], ["slides-right", "drifts-right", "glides-east"],
                 ["rises", "climbs", "ascends"], ["sinks", "drops", "descends"], ["grows", "expands", "swells"],
                 ["shrinks", "contracts", "dwindles"], ["blinks", "flashes", "flickers"],
                 ["shakes", "jitters", "trembles"], ["sways", "rocks", "wobbles-sideways"],
                 ["bounces", "hops", "bobs"], ["appears", "emerges", "brightens"], ["vanishes", "fades", "dims"]]
VERB_HOMONYMS = {"moves": (0, 1), "goes": (2, 3), "changes": (4, 5)}  # one word, two verb classes
SHAPES, COLOURS = ["square", "disk", "triangle", "cross", "diamond", "bar"], ["red", "green", "blue", "yellow",
                                                                              "magenta", "cyan"]
RGB = np.array([[1, 0, 0], [0, 1, 0], [0, 0.3, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float32)
NOUN_HOMONYMS = ["thing", "item", "object", "stuff", "piece", "gadget"]  # each shared by two noun classes
PROMPTS = [["<q>"], ["what", "doing", "?"], ["describe", "?"]]  # InstructBLIP-style templates, shortened
SPECIALS = ["<pad>", "<bos>", "<eos>", "<vis>", "\n", "C", "."]
PAD, BOS, EOS, VIS, NL = range(5)


# DEVIATION: dynamic meaning is simulated by synonyms + homonyms with one word per class drawn per sequence (Ego4D's
# free-form narrations have it naturally)
def make_vocab(rng: np.random.Generator) -> dict:
    """Word lists per class: verb class -> 3 synonyms (+ 1 homonym for 6 classes), noun class -> 2 arbitrary object
    names (+ 1 homonym for 12 classes). Returns the vocabulary and, per class, the token ids of its words."""
    syllables = ["ba", "ko", "ri", "tu", "me", "sa", "lo", "vi", "da", "pe", "zu", "ni"]
    noun_names = [[f"{syllables[c % 12]}{syllables[(c // 12 * 5 + j * 7 + c) % 12]}{'xq'[j]}" for j in range(2)]
                  for c in range(36)]  # arbitrary object names, two per shape-colour class
    verb_words = [list(w) for w in VERB_SYNONYMS]
    for word, classes in VERB_HOMONYMS.items():
        for c in classes:
            verb_words[c].append(word)
    pairs = rng.permutation(36).reshape(-1, 2)[: len(NOUN_HOMONYMS)]  # 6 random pairs of noun classes
    for word, (a, b) in zip(NOUN_HOMONYMS, pairs):
        noun_names[a].append(word)
        noun_names[b].append(word)
    words = SPECIALS + [w for p in PROMPTS for w in p if w not in SPECIALS]
    words += sorted({w for ws in verb_words + noun_names for w in ws})
    words = list(dict.fromkeys(words))
    stoi = {w: i for i, w in enumerate(words)}
    return {"words": words, "stoi": stoi, "verb_words": [[stoi[w] for w in ws] for ws in verb_words],
            "noun_words": [[stoi[w] for w in ws] for ws in noun_names],
            "prompts": [[stoi[w] for w in p] for p in PROMPTS]}


def zipf_split(rng: np.random.Generator, alpha: float, mass: float, n_verbs: int = 12, n_nouns: int = 36):
    """The official split script on generated counts: Zipf(alpha) probabilities over a random ordering of the
    verb-noun pairs; the most frequent pairs covering `mass` are common (train), the rest rare (test). Re-drawn until
    every verb and noun has a common pair (rare pairs are then compositions of seen words)."""
    n_pairs = n_verbs * n_nouns
    p = 1.0 / np.arange(1, n_pairs + 1) ** alpha
    p /= p.sum()
    n_common = int(np.searchsorted(np.cumsum(p), mass) + 1)  # shortest prefix covering `mass`
    for _ in range(10_000):
        order = rng.permutation(n_pairs)  # order[rank] = pair id = verb * n_nouns + noun
        common = order[:n_common]
        if len(set(common // n_nouns)) == n_verbs and len(set(common % n_nouns)) == n_nouns:
            return order, p, n_common
    raise RuntimeError("no Zipf permutation covers every verb and noun; lower --zipf-alpha or raise --common-mass")


def render_clips(verb: np.ndarray, noun: np.ndarray, rng: np.random.Generator, T: int = 8, H: int = 16):
    """Draw each clip's object with its motion program (the verb) and shape x colour (the noun).
    Returns clips (N, T, 3, H, H) float32 and per-frame targets (N, T, 4): centroid x, y, size, brightness."""
    N = len(verb)
    u = np.linspace(0, 1, T)[None]  # (1, T)
    cx, cy = rng.uniform(6, 10, (N, 1)) + 0 * u, rng.uniform(6, 10, (N, 1)) + 0 * u  # (N, T)
    r = rng.uniform(2.5, 3.5, (N, 1)) + 0 * u
    a = rng.uniform(0.8, 1.0, (N, 1)) + 0 * u
    d = rng.uniform(5, 7, (N, 1))  # slide distance
    s = rng.choice([-1.0, 1.0], (N, 1))  # bounce phase
    t = np.arange(T)[None]
    for v, upd in enumerate([lambda i: ("cx", cx[i] + d[i] * (0.5 - u)), lambda i: ("cx", cx[i] - d[i] * (0.5 - u)),
                             lambda i: ("cy", cy[i] + d[i] * (0.5 - u)), lambda i: ("cy", cy[i] - d[i] * (0.5 - u)),
                             lambda i: ("r", 1.5 + 2.5 * u + 0 * r[i]), lambda i: ("r", 4.0 - 2.5 * u + 0 * r[i]),
                             lambda i: ("a", a[i] * np.where(t % 2 == 0, 1.0, 0.15)),
                             lambda i: ("cx", cx[i] + rng.uniform(-1.5, 1.5, cx[i].shape)),
                             lambda i: ("cx", cx[i] + 3 * s[i] * np.sin(np.pi * t / 2)),
                             lambda i: ("cy", cy[i] + 3 * s[i] * np.sin(np.pi * t / 2)),
                             lambda i: ("a", 0.1 + 0.9 * u + 0 * a[i]), lambda i: ("a", 1.0 - 0.9 * u + 0 * a[i])]):
        i = verb == v
        name, val = upd(i)
        {"cx": cx, "cy": cy, "r": r, "a": a}[name][i] = val
    if (i := verb == 7).any():  # shake jitters y as well
        cy[i] += rng.uniform(-1.5, 1.5, cy[i].shape)
    g = np.arange(H, dtype=np.float32) + 0.5
    dx = g[None, None, None, :] - cx[..., None, None]  # (N, T, 1, H)
    dy = g[None, None, :, None] - cy[..., None, None]  # (N, T, H, 1)
    rr = r[..., None, None]
    shape = (noun // 6)[:, None, None, None]
    masks = [np.maximum(abs(dx), abs(dy)) <= rr * 0.85, dx**2 + dy**2 <= rr**2,  # square, disk
             (dy >= -rr) & (dy <= rr * 0.8) & (abs(dx) <= (dy + rr) / 2),  # triangle (apex up)
             ((abs(dx) <= rr / 3) & (abs(dy) <= rr)) | ((abs(dy) <= rr / 3) & (abs(dx) <= rr)),  # cross
             abs(dx) + abs(dy) <= rr, (abs(dx) <= rr) & (abs(dy) <= rr / 3)]  # diamond, bar
    mask = np.select([shape == j for j in range(6)], [np.broadcast_to(m, (N, T, H, H)) for m in masks], False)
    alpha = (mask * a[..., None, None]).astype(np.float32)[:, :, None]  # (N, T, 1, H, H)
    bg = rng.uniform(0, 0.3, (N, 1, 1, 1, 1)).astype(np.float32)
    colour = RGB[noun % 6][:, None, :, None, None]  # (N, 1, 3, 1, 1)
    clips = bg * (1 - alpha) + colour * alpha + rng.normal(0, 0.05, (N, T, 3, H, H)).astype(np.float32)
    return clips.astype(np.float32), np.stack([cx, cy, r, a], -1).astype(np.float32)


# DEVIATION: a small CNN with coordinate channels stands in for the frozen EVA ViT-g (257 tokens per frame -> 4)
class FrameCNN(nn.Module):
    """Frozen vision encoder: (.., 3, 16, 16) frame -> 4 tokens of 64 (a 2x2 grid). Coordinate channels let the
    pooled tokens carry the object's position inside each quadrant."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Conv2d(32, dim, 1))
        self.head = nn.Linear(4 * dim, 4 + 6 + 6)  # pre-training head only: x, y, size, brightness | shape | colour
        g = torch.linspace(-1, 1, 16)
        self.register_buffer("coords", torch.stack(torch.meshgrid(g, g, indexing="xy")))  # (2, 16, 16)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # frames: (F, 3, 16, 16)
        x = torch.cat([frames, self.coords.expand(len(frames), -1, -1, -1)], 1)  # (F, 5, 16, 16)
        return self.conv(x).flatten(2).transpose(1, 2)  # (F, 4, 64)


def encode_clips(clips: np.ndarray, targets: np.ndarray, noun: np.ndarray, train_idx: np.ndarray, args: Args,
                 device: torch.device) -> torch.Tensor:
    """Pre-train the CNN on single frames of training clips (generic targets, no verb labels), freeze it, and cache the
    8 x 4 tokens of every clip: (N, 32, 64)."""
    shared.seed_everything(args.data_seed)
    cnn = FrameCNN().to(device)
    opt = torch.optim.Adam(cnn.parameters(), lr=2e-3)
    gen = np.random.default_rng(args.data_seed + 1)
    progress = shared.Progress("frame CNN pre-training", max(args.cnn_steps, 1))
    for step in range(1, args.cnn_steps + 1):
        ci, ti = gen.choice(train_idx, 256), gen.integers(0, clips.shape[1], 256)
        x = torch.from_numpy(clips[ci, ti]).to(device)  # (256, 3, 16, 16)
        y = torch.from_numpy(targets[ci, ti] / np.array([16, 16, 4, 1], np.float32)).to(device)  # (256, 4)
        out = cnn.head(cnn(x).flatten(1))  # (256, 16)
        shp, col = torch.from_numpy(noun[ci] // 6).to(device), torch.from_numpy(noun[ci] % 6).to(device)
        loss = F.mse_loss(out[:, :4], y) + F.cross_entropy(out[:, 4:10], shp) + F.cross_entropy(out[:, 10:], col)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, loss=loss.item())
    cnn.eval()
    with torch.no_grad():
        feats = [cnn(torch.from_numpy(clips[i : i + 500]).flatten(0, 1).to(device)).reshape(-1, clips.shape[1] * 4, 64)
                 for i in range(0, len(clips), 500)]
    return torch.cat(feats)  # (N, 32, 64): 8 frames x 4 tokens, frames concatenated as in v2.py


def make_data(args: Args, device: torch.device) -> dict:
    """The whole dataset: cached clip tokens, verb/noun classes, train pool (common pairs), test pool (rare pairs)."""
    rng = np.random.default_rng(args.data_seed)
    vocab = make_vocab(rng)
    order, p, n_common = zipf_split(rng, args.zipf_alpha, args.common_mass)
    common, rare = order[:n_common], order[n_common:]
    pair_train = rng.choice(common, args.n_train, p=p[:n_common] / p[:n_common].sum())  # Zipf within the head
    pair_test = rng.choice(rare, args.n_test, p=p[n_common:] / p[n_common:].sum())  # and within the tail
    pair = np.concatenate([pair_train, pair_test])
    verb, noun = pair // 36, pair % 36
    clips, targets = render_clips(verb, noun, rng)
    train_idx, test_idx = np.arange(args.n_train), np.arange(args.n_train, args.n_train + args.n_test)
    feats = encode_clips(clips, targets, noun, train_idx, args, device)
    return dict(vocab, feats=feats, verb=verb, noun=noun, train_idx=train_idx, test_idx=test_idx, synthetic=True,
                n_common=n_common, n_rare=len(rare), narr=None)


def load_ego4d(args: Args, device: torch.device) -> dict:
    """--data-dir: train.csv / test.csv with the official columns (frame_path, video_uid, clip_index,
    narration_timestamp_sec, narration_text, structured_verb, structured_noun) and <data_dir>/<frame_path>.npy
    frame features of shape (8, P, D) per clip (the frozen ViT's output; no ViT weights can be downloaded here)."""
    root, rows = Path(args.data_dir), {}
    need = ["frame_path", "narration_text", "structured_verb", "structured_noun"]
    for split in ("train", "test"):
        path = root / f"{split}.csv"
        if not path.is_file():
            raise shared.UsageError(f"missing file {path}; --data-dir expects train.csv and test.csv.")
        with open(path, newline="") as f:
            rows[split] = list(csv.DictReader(f))
        if not rows[split] or any(c not in rows[split][0] for c in need):
            raise shared.UsageError(f"{path} must be a non-empty CSV with the columns {', '.join(need)}.")
    items = rows["train"] + rows["test"]
    feats = []
    for r in items:
        fpath = root / f"{r['frame_path']}.npy"
        try:
            arr = np.load(fpath)
        except (OSError, ValueError):
            raise shared.UsageError(f"cannot read the feature file {fpath} as a .npy array.") from None
        if arr.ndim != 3 or (feats and arr.shape != feats[0].shape) or not np.isfinite(arr).all():
            raise shared.UsageError(f"{fpath} must hold finite (frames, patches, dim) features like the first clip.")
        feats.append(arr.astype(np.float32))
    words = [clean_narration(r["narration_text"]) for r in items]
    vocab = SPECIALS + [w for p in PROMPTS for w in p if w not in SPECIALS]
    vocab = list(dict.fromkeys(vocab + sorted({w for ws in words for w in ws})))
    stoi = {w: i for i, w in enumerate(vocab)}
    narr = [[stoi[w] for w in ws] for ws in words]
    verbs, nouns = sorted({r["structured_verb"] for r in items}), sorted({r["structured_noun"] for r in items})
    n_tr = len(rows["train"])
    return dict(words=vocab, stoi=stoi, prompts=[[stoi[w] for w in p] for p in PROMPTS], verb_words=None,
                noun_words=None, feats=torch.from_numpy(np.stack(feats).reshape(len(items), -1, feats[0].shape[-1])),
                verb=np.array([verbs.index(r["structured_verb"]) for r in items]),
                noun=np.array([nouns.index(r["structured_noun"]) for r in items]),
                train_idx=np.arange(n_tr), test_idx=np.arange(n_tr, len(items)), synthetic=False, narr=narr)


def clean_narration(text: str) -> list[str]:
    """eilev/data/utils.py cleaning, word level: '#C C' -> 'the camera wearer', drop '#unsure', end with '.'."""
    text = text.replace("#C C", "the camera wearer").replace("#C", "the camera wearer").replace("#unsure", "")
    return [w for w in text.lower().replace(".", " ").split() if w][:12] + ["."]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Interleaved sequences: the in-context sampler, word choice per sequence, the official token layout
# ---------------------------------------------------------------------------------------------------------------------
class ContextSampler:
    """FrameInterleavedDataset's sampler over the training pool, with per-pair buckets precomputed."""

    def __init__(self, data: dict):
        self.pool = data["train_idx"]
        self.verb, self.noun = data["verb"], data["noun"]
        pv, pn = self.verb[self.pool], self.noun[self.pool]
        self.buckets = {}
        for v, n in {(int(a), int(b)) for a, b in zip(data["verb"], data["noun"])}:
            self.buckets[v, n] = (self.pool[(pv == v) & (pn != n)],  # verb bucket: same verb, another noun
                                  self.pool[(pn == n) & (pv != v)],  # noun bucket: same noun, another verb
                                  self.pool[(pv != v) | (pn != n)])  # the rest: never the same pair (nor the query)

    def bursty(self, query: int, k: int, r: float, rng: np.random.Generator) -> tuple[list, list]:
        """floor(k r) examples from the verb bucket and the rest from the noun bucket, re-balanced when one runs dry,
        topped up from the rest of the pool. Returned separately (verb part, noun + fill part), unshuffled."""
        vb, nb, rest = self.buckets[int(self.verb[query]), int(self.noun[query])]
        n_v = min(int(math.floor(k * r)), len(vb))
        n_n = min(k - n_v, len(nb))
        n_v = min(k - n_n, len(vb))  # re-balance: the verb bucket takes what the noun bucket could not
        vs = list(rng.choice(vb, n_v, replace=False)) if n_v else []
        ns = list(rng.choice(nb, n_n, replace=False)) if n_n else []
        if len(vs) + len(ns) < k:  # both buckets dry: fill from the rest (same pair still excluded)
            left = np.setdiff1d(rest, vs + ns)
            ns += list(rng.choice(left, k - len(vs) - len(ns), replace=False))
        return vs, ns

    def random(self, query: int, k: int, rng: np.random.Generator) -> list:
        """Bursty ablation (random_in_context_examples=True): uniform over the pool, only the query excluded."""
        ctx = rng.choice(self.pool, k + 1, replace=False)
        return [c for c in ctx if c != query][:k]


def choose_words(data: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic meaning: one word per verb class and per noun class for this sequence (used in every narration)."""
    if not data["synthetic"]:
        return None, None
    return (rng.integers(0, [len(w) for w in data["verb_words"]]),  # (12,) index into each verb class's words
            rng.integers(0, [len(w) for w in data["noun_words"]]))  # (36,)


def narration(data: dict, item: int, words: tuple) -> list[int]:
    """'C <verb> <noun> .' with this sequence's word choice (synthetic), or the item's cleaned narration (real)."""
    if not data["synthetic"]:
        return data["narr"][item]
    v, n = int(data["verb"][item]), int(data["noun"][item])
    return [data["stoi"]["C"], data["verb_words"][v][words[0][v]], data["noun_words"][n][words[1][n]],
            data["stoi"]["."]]


def build_sequence(data: dict, context: list, query: int, words: tuple, rng: np.random.Generator,
                   K: int, with_target: bool) -> tuple[list, list, list]:
    """Token ids, clip ids in splice order, and the target flags of one interleaved sequence (v2.py, frame.py):
    <bos> ([vis]*K \\n prompt narration \\n)*k [vis]*K \\n prompt [narration \\n <eos>]."""
    ids, clips, target = [BOS], [], [False]
    for j, item in enumerate(list(context) + [query]):
        prompt = data["prompts"][rng.integers(len(data["prompts"]))]  # a random template per example
        part = [VIS] * K + [NL] + prompt
        if j < len(context):
            part += narration(data, item, words) + [NL]  # context narrations are inputs only (no label)
        ids += part
        target += [False] * len(part)
        clips.append(int(item))
    if with_target:
        tgt = narration(data, query, words) + [NL, EOS]
        ids += tgt
        target += [True] * len(tgt)  # only the query narration, its newline and <eos> are supervised
    return ids, clips, target


def collate(seqs: list, device: torch.device, left: bool = False) -> tuple:
    """Pad a list of (ids, clips, target) to one batch: right padding for training, left padding for generation.
    Returns ids (B, S), target (B, S) bool, keep (B, S) bool (False on pads) and the clip ids in splice order."""
    S = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), S), PAD, dtype=torch.long)
    target = torch.zeros(len(seqs), S, dtype=torch.bool)
    for b, (i, _, t) in enumerate(seqs):
        sl = slice(S - len(i), S) if left else slice(0, len(i))
        ids[b, sl], target[b, sl] = torch.tensor(i), torch.tensor(t)
    clips = torch.tensor([c for s in seqs for c in s[1]])  # row-major: batch, then position = splice order
    return ids.to(device), target.to(device), (ids != PAD).to(device), clips.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Attention: the literal masked softmax and the same function through SDPA
# ---------------------------------------------------------------------------------------------------------------------
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h) + M) V with M = -inf where mask is False (mask True = attend; None = attend to all).
    q: (B, H, Sq, d_h), k, v: (B, H, Sk, d_h), mask broadcastable to (B, H, Sq, Sk) -> (B, H, Sq, d_h)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # a row never empties: every query may see itself
    return scores.softmax(dim=-1) @ v  # (B, H, Sq, d_h)


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same function through PyTorch's fused kernel (the boolean attn_mask has the same True = attend meaning)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Sq, d_h)


ATTENTION = {"fused": attention_fused, "reference": attention_reference}


def lm_mask(keep: torch.Tensor) -> torch.Tensor:
    """Causal AND key-not-pad, plus the diagonal so a left pad's row is never empty: (B, 1, S, S) bool."""
    S = keep.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=keep.device).tril()  # (S, S)
    eye = torch.eye(S, dtype=torch.bool, device=keep.device)
    return ((causal & keep[:, None, :]) | eye)[:, None]  # (B, 1, S, S)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Model: Q-Former-lite -> projection -> spliced into a causal LM
# ---------------------------------------------------------------------------------------------------------------------
class MHA(nn.Module):
    def __init__(self, width: int, n_heads: int, attn_fn: Callable):
        super().__init__()
        self.h, self.attn_fn = n_heads, attn_fn
        self.q, self.kv, self.o = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S, W = x.shape
        split = lambda t: t.view(B, t.shape[1], self.h, W // self.h).transpose(1, 2)  # noqa: E731  (B, H, S, d_h)
        k, v = self.kv(ctx).chunk(2, dim=-1)  # 2 x (B, Sk, W)
        out = self.attn_fn(split(self.q(x)), split(k), split(v), mask)  # (B, H, S, d_h)
        return self.o(out.transpose(1, 2).reshape(B, S, W))  # (B, S, W)


# DEVIATION: pre-LayerNorm blocks in the Q-Former and the LM (BERT and OPT differ in details; docstring 4)
class QFormerLayer(nn.Module):
    """Self-attention over the learned queries, cross-attention to the clip's frame tokens, MLP (pre-LN)."""

    def __init__(self, width: int, n_heads: int, attn_fn: Callable):
        super().__init__()
        self.ln1, self.ln2, self.ln3, self.ln_kv = (nn.LayerNorm(width) for _ in range(4))
        self.self_attn, self.cross_attn = MHA(width, n_heads, attn_fn), MHA(width, n_heads, attn_fn)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:  # q: (V, K, W), frames: (V, T, W)
        h = self.ln1(q)
        q = q + self.self_attn(h, h)  # bidirectional, no mask
        q = q + self.cross_attn(self.ln2(q), self.ln_kv(frames))  # each clip sees only its own frames
        return q + self.mlp(self.ln3(q))


class DecoderLayer(nn.Module):
    def __init__(self, width: int, n_heads: int, attn_fn: Callable):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = MHA(width, n_heads, attn_fn)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x: (B, S, W)
        h = self.ln1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.ln2(x))


class VideoLM(nn.Module):
    """BLIP-2 for interleaved video: cached frame tokens -> Q-Former -> Linear -> LM input embeddings at <vis>."""

    def __init__(self, vocab: int, feat_dim: int, n_frame_tokens: int, args: Args, attn_fn: Callable):
        super().__init__()
        W = args.width
        self.frame_in = nn.Linear(feat_dim, W)
        self.frame_pos = nn.Parameter(torch.randn(n_frame_tokens, W) * 0.02)  # one per (frame, patch) token
        self.queries = nn.Parameter(torch.randn(args.n_queries, W) * 0.02)  # K learned query tokens
        self.qformer = nn.ModuleList(QFormerLayer(W, args.n_heads, attn_fn) for _ in range(args.qformer_layers))
        self.ln_q, self.proj = nn.LayerNorm(W), nn.Linear(W, W)  # language projection to the LM width
        # DEVIATION: the LM is small, trained from scratch and jointly with the Q-Former (the paper freezes OPT-2.7B);
        # all blocks are pre-LayerNorm
        self.tok = nn.Embedding(vocab, W)
        self.pos = nn.Parameter(torch.randn(args.max_len, W) * 0.02)  # learned absolute positions
        self.layers = nn.ModuleList(DecoderLayer(W, args.n_heads, attn_fn) for _ in range(args.lm_layers))
        self.ln_f = nn.LayerNorm(W)
        nn.init.normal_(self.tok.weight, std=0.02)

    def encode_clips(self, frames: torch.Tensor) -> torch.Tensor:  # frames: (V, T, D) cached frozen-encoder tokens
        f = self.frame_in(frames) + self.frame_pos  # (V, T, W)
        q = self.queries.expand(len(frames), -1, -1)  # (V, K, W)
        for layer in self.qformer:
            q = layer(q, f)
        return self.proj(self.ln_q(q))  # (V, K, W)

    def forward(self, ids: torch.Tensor, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)  # (B, S, W)
        vis = self.encode_clips(frames)  # (V, K, W), V = clips in splice order
        # inputs_embeds[video_input_mask] = video_features: row-major order = clip after clip, K tokens each
        x = x.masked_scatter((ids == VIS)[..., None], vis.reshape(-1, x.shape[-1]))  # (B, S, W)
        pos = (keep.long().cumsum(1) - 1).clamp_min(0)  # (B, S): positions skip left pads
        x = x + self.pos[pos]
        mask = lm_mask(keep)  # (B, 1, S, S)
        for layer in self.layers:
            x = layer(x, mask)
        return self.ln_f(x) @ self.tok.weight.T  # (B, S, vocab): tied embeddings


# ---------------------------------------------------------------------------------------------------------------------
# 5. Training: a plain loop over freshly sampled interleaved sequences
# ---------------------------------------------------------------------------------------------------------------------
def lr_at(step: int, args: Args) -> float:
    """Linear warm-up to args.lr, then cosine decay to 0."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))


def training_batch(data: dict, sampler: ContextSampler, mode: str, args: Args, rng: np.random.Generator,
                   device: torch.device) -> tuple:
    """mode: "bursty" (EILEV), "random" (bursty ablation) or "none" (FT: single clips, no context)."""
    seqs = []
    for query in rng.choice(data["train_idx"], args.batch_size):  # the pool itself follows the Zipf law
        if mode == "bursty":
            vs, ns = sampler.bursty(query, args.k_train, args.verb_noun_ratio, rng)
            context = list(rng.permutation(vs + ns))  # shuffle the context order; the query goes last
        elif mode == "random":
            context = sampler.random(query, args.k_train, rng)
        else:
            context = []
        seqs.append(build_sequence(data, context, query, choose_words(data, rng), rng, args.n_queries, True))
    return collate(seqs, device)


def train(model: VideoLM, data: dict, mode: str, args: Args, device: torch.device, name: str) -> list[dict]:
    rng = np.random.default_rng(args.seed)  # training sequences: a stream fixed by the seed, the same for every model
    sampler, feats = ContextSampler(data), data["feats"].to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos" not in n and n != "queries"]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos" not in n and n != "queries")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    if args.compile:
        print(f"[{name}] torch.compile: the first steps compile the model (tens of seconds)...", flush=True)
    fwd = torch.compile(model, dynamic=True) if args.compile else model
    progress, history, t0 = shared.Progress(name, args.steps), [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        ids, target, keep, clips = training_batch(data, sampler, mode, args, rng, device)
        logits = fwd(ids, feats[clips], keep)  # (B, S, vocab)
        sup = target[:, 1:]  # token t+1 is predicted at position t; only the query narration is supervised
        loss = F.cross_entropy(logits[:, :-1][sup], ids[:, 1:][sup])
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # DEVIATION: clipping (docstring 7)
        opt.step()
        progress.update(step, loss=loss.item())
        if step % max(1, args.steps // 40) == 0 or step == args.steps:
            history.append({"model": name, "step": step, "train/loss": loss.item(),
                            "time_s": round(time.perf_counter() - t0, 2)})
    return history


# ---------------------------------------------------------------------------------------------------------------------
# 6. Evaluation: presampled contexts from the training pool, greedy narration of rare-pair test clips
# ---------------------------------------------------------------------------------------------------------------------
def presample_eval(data: dict, args: Args) -> list[dict]:
    """For each test query, once for all models and shots: a verb-bucket and a noun-bucket list of training items, the
    sequence's word choice, and an rng seed for the prompts and the context order. Contexts for k shots are nested."""
    rng, sampler = np.random.default_rng(args.data_seed + 7), ContextSampler(data)
    out = []
    for query in data["test_idx"][: args.n_eval]:
        vs, ns = sampler.bursty(query, max(args.shots), args.verb_noun_ratio, rng)
        out.append({"query": int(query), "verb_ctx": vs, "noun_ctx": ns, "words": choose_words(data, rng),
                    "seed": int(rng.integers(2**31))})
    return out


def context_for(entry: dict, k: int, r: float, rng: np.random.Generator) -> list:
    """The k-shot context: floor(k r) from the verb list, the rest from the noun list (nested in k), shuffled."""
    vs, ns = entry["verb_ctx"], entry["noun_ctx"]
    n_v = min(int(math.floor(k * r)), len(vs))
    n_v = max(n_v, k - len(ns))  # re-balance if the noun list is short
    return list(rng.permutation(vs[:n_v] + ns[: k - n_v]))


def rouge_l(a: list, b: list) -> float:
    """ROUGE-L F-measure from the longest common subsequence of two token lists."""
    if not a or not b:
        return float(a == b)
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    lcs = dp[-1][-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def token_f1(a: list, b: list) -> float:
    common = sum(min(a.count(t), b.count(t)) for t in set(a))
    return 0.0 if common == 0 else 2 * common / (len(a) + len(b))


@torch.no_grad()
def generate(model: VideoLM, data: dict, seqs: list, n_new: int, device: torch.device) -> list[list[int]]:
    """Greedy decoding of a left-padded batch (the LM mask hides pads); stops each row at "\\n" or <eos>."""
    ids, _, keep, clips = collate(seqs, device, left=True)
    # DEVIATION: no KV cache; each new token re-runs the (short, ~100-token) prefix
    frames = data["feats"][clips.cpu()].to(device)  # (V, T, D)
    for _ in range(n_new):
        nxt = model(ids, frames, keep)[:, -1].argmax(-1)  # (B,)
        ids, keep = torch.cat([ids, nxt[:, None]], 1), F.pad(keep, (0, 1), value=True)
    outs = []
    for row in ids[:, -n_new:].tolist():
        cut = [i for i, t in enumerate(row) if t in (NL, EOS)]
        outs.append(row[: cut[0]] if cut else row)
    return outs


def evaluate(model: VideoLM, data: dict, plan: list[dict], args: Args, device: torch.device) -> dict:
    """Strict / class-level accuracy, token F1 and ROUGE-L of the generated narration at every number of shots.
    "swap" = the largest k again with each query clip replaced by another test query's clip (same context, same gold):
    a model that reads the query clip loses accuracy; one that only counts words in the context does not."""
    model.eval()
    n_new = 5 if data["synthetic"] else max(len(n) for n in data["narr"]) + 1
    res = {}
    for k in list(args.shots) + ["swap"]:
        seqs, golds = [], []
        for i, e in enumerate(plan):
            rng = np.random.default_rng(e["seed"])  # the same prompts and order for every model
            ctx = context_for(e, max(args.shots) if k == "swap" else k, args.verb_noun_ratio, rng)
            seqs.append(build_sequence(data, ctx, e["query"], e["words"], rng, args.n_queries, False))
            golds.append(narration(data, e["query"], e["words"]))
            if k == "swap":
                seqs[-1][1][-1] = plan[(i + 1) % len(plan)]["query"]  # the query's clip id (spliced last)
        gens = [g for i in range(0, len(seqs), 250) for g in generate(model, data, seqs[i : i + 250], n_new, device)]
        strict = [float(g == t) for g, t in zip(gens, golds)]
        res[f"strict_k{k}"] = float(np.mean(strict))
        res[f"f1_k{k}"] = float(np.mean([token_f1(g, t) for g, t in zip(gens, golds)]))
        res[f"rougeL_k{k}"] = float(np.mean([rouge_l(g, t) for g, t in zip(gens, golds)]))
        if data["synthetic"]:  # the right classes, whatever synonym: verb word in the class's list, noun word too
            ok = [len(g) >= 3 and g[1] in data["verb_words"][data["verb"][e["query"]]]
                  and g[2] in data["noun_words"][data["noun"][e["query"]]] for g, e in zip(gens, plan)]
            res[f"class_k{k}"] = float(np.mean(ok))
        if k == max(args.shots):
            res["examples"] = [" ".join(data["words"][t] for t in g) + "  | gold: " +
                               " ".join(data["words"][t] for t in gold) for g, gold in zip(gens[:3], golds[:3])]
    model.train()
    return res


# ---------------------------------------------------------------------------------------------------------------------
# 7. Benchmark: reference vs fused attention (LM causal, Q-Former cross) and eager vs compiled training step
# ---------------------------------------------------------------------------------------------------------------------
def bench(args: Args, device: torch.device) -> dict:
    size = PRESETS["paper"] if device.type == "cuda" else args
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, dh = size.n_heads, size.width // size.n_heads
    S = 1 + (size.k_train + 1) * (size.n_queries + 1 + 3 + 4 + 1)  # longest training sequence (3-token prompts)
    V = size.batch_size * (size.k_train + 1)  # clips per batch
    keep = torch.ones(size.batch_size, S, dtype=torch.bool, device=device)
    keep[: size.batch_size // 2, : S // 4] = False  # half the rows left-padded, as in generation
    shapes = {"LM causal+pad": ((size.batch_size, H, S, dh), (size.batch_size, H, S, dh), lm_mask(keep)),
              "Q-Former cross": ((V, H, size.n_queries, dh), (V, H, 32, dh), None)}
    rows, worst = [], 0.0
    for name, (qs, ks, mask) in shapes.items():
        q = torch.randn(*qs, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(*ks, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        err = (attention_fused(q, k, v, mask).float() - attention_reference(q.float(), k.float(), v.float(), mask))
        worst = max(worst, err.abs().max().item())
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        if worst > tol:
            raise RuntimeError(f"fused attention differs from the reference by {worst:.2e} (> {tol}) on {name}")
        tag = f"{name} {tuple(qs)} x {ks[2]} keys {str(dtype)[6:]}"
        for what, fn_of in [("fwd", lambda f: lambda: f(q, k, v, mask)),
                            ("fwd+bwd", lambda f: lambda: f(q, k, v, mask).sum().backward())]:
            rows.append({"what": f"{tag} {what}", "reference_ms": shared.benchmark(fn_of(attention_reference), device),
                         "fused_ms": shared.benchmark(fn_of(attention_fused), device)})
    # one training step of the whole model on random cached features, eager vs torch.compile
    n_vocab, T = 160, 32
    gen = np.random.default_rng(0)
    fake = dict(synthetic=True, stoi={"C": 5, ".": 6}, prompts=[[7], [8, 9, 10], [11, 10]], verb=gen.integers(0, 12, 400),
                noun=gen.integers(0, 36, 400), verb_words=[[20 + c] for c in range(12)],
                noun_words=[[40 + c] for c in range(36)], train_idx=np.arange(400))
    seqs = [build_sequence(fake, list(gen.choice(400, size.k_train)), int(gen.integers(400)),
                           (np.zeros(12, int), np.zeros(36, int)), gen, size.n_queries, True)
            for _ in range(size.batch_size)]
    ids, target, keep, clips = collate(seqs, device)
    frames = torch.randn(len(clips), T, 64, device=device)
    step_ms = []
    for compiled in (False, True):
        shared.seed_everything(0)
        model = VideoLM(n_vocab, 64, T, size, ATTENTION[args.attn]).to(device)
        opt, fwd = torch.optim.AdamW(model.parameters()), (torch.compile(model) if compiled else model)

        def step():
            logits = fwd(ids, frames, keep)
            loss = F.cross_entropy(logits[:, :-1][target[:, 1:]], ids[:, 1:][target[:, 1:]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if compiled:
            print("compiling the model (tens of seconds)...", flush=True)
        step_ms.append(shared.benchmark(step, device, warmup=3, repeats=10))
    rows.append({"what": f"train step eager vs compile (B={size.batch_size}, k={size.k_train}, width {size.width}, "
                         f"attn={args.attn})", "reference_ms": step_ms[0], "fused_ms": step_ms[1]})
    return shared.save_bench(args, SLUG, device, rows, max_abs_err=worst)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Main: EILEV, the bursty ablation (random contexts) and FT (no contexts), same data, same steps
# ---------------------------------------------------------------------------------------------------------------------
MODELS = {"EILEV": "bursty", "random ctx (ablation)": "random", "FT (no ctx)": "none"}
PAPER_STS_BE = {"EILEV": {0: 0.33, 1: 0.55, 4: 0.63, 8: 0.67, 16: 0.69}, "FT (no ctx)": {0: 0.53, 1: 0.54, 4: 0.53,
                8: 0.53, 16: 0.55}, "random ctx (ablation)": {0: 0.49, 16: 0.53}}

PAPER_ROUGE_L = {0: "EILEV 0.23, FT ~0.5 flat", 8: "EILEV 0.63 at k=16"}


def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return shared.seed_everything(args.seed) or bench(args, device)
    t_start = time.perf_counter()
    data = load_ego4d(args, device) if args.data_dir else make_data(args, device)
    if data["feats"].shape[1] > 512:
        raise shared.UsageError("the frame features have more than 512 tokens per clip; pool them first.")
    train_feats = data["feats"][data["train_idx"]].flatten(0, 1)  # (N_train * T, D)
    # NOTE: cached frozen features are standardised per dimension with training-pool statistics
    data["feats"] = (data["feats"] - train_feats.mean(0)) / (train_feats.std(0) + 1e-6)  # (N, T, D)
    plan = presample_eval(data, args)
    if data["synthetic"]:
        print(f"data: {data['n_common']} common (train) and {data['n_rare']} rare (test) verb-noun pairs, "
              f"{len(data['train_idx'])} train clips, {len(plan)} rare-pair test queries, vocab {len(data['words'])}")
    results, history, examples = {}, [], {}
    for name, mode in MODELS.items():
        shared.seed_everything(args.seed)  # same init for every model: none depends on another having run
        model = VideoLM(len(data["words"]), data["feats"].shape[-1], data["feats"].shape[1], args,
                        ATTENTION[args.attn]).to(device)
        t0 = time.perf_counter()
        history += train(model, data, mode, args, device, name)
        results[name] = evaluate(model, data, plan, args, device)
        examples[name] = results[name].pop("examples")
        results[name]["train_s"] = round(time.perf_counter() - t0, 1)
        results[name]["final_loss"] = float(history[-1]["train/loss"])
        print(f"[{name}] strict accuracy by shots: " +
              ", ".join(f"k={k}: {results[name][f'strict_k{k}']:.3f}" for k in args.shots), flush=True)

    # ---- the checks (card's pass criteria, rare-pair test set, strict accuracy) ------------------------------------
    k0, kmax = min(args.shots), max(args.shots)
    acc = {n: [results[n][f"strict_k{k}"] for k in args.shots] for n in MODELS}
    e, r, f = "EILEV", "random ctx (ablation)", "FT (no ctx)"
    gain = {n: acc[n][-1] - acc[n][0] for n in MODELS}
    checks = {
        f"1a. EILEV acc(k={kmax}) >= acc(k={k0}) + 0.30 (gain {gain[e]:.3f})": gain[e] >= 0.30,
        "1b. EILEV acc non-decreasing in k within 0.03": all(b >= a - 0.03 for a, b in zip(acc[e], acc[e][1:])),
        f"2a. random-context gain <= half of EILEV's ({gain[r]:.3f} vs {gain[e]:.3f})": gain[r] <= 0.5 * gain[e],
        f"2b. EILEV(k={kmax}) >= random ctx(k={kmax}) + 0.15": acc[e][-1] >= acc[r][-1] + 0.15,
        f"3. max_k FT <= EILEV(k={kmax}) - 0.25 ({max(acc[f]):.3f} vs {acc[e][-1]:.3f})": max(acc[f]) <= acc[e][-1] - 0.25,
    }
    claim = {"text": f"EILEV's strict accuracy on rare pairs rises with shots (+0.30 from {k0} to {kmax}); random "
                     "contexts give at most half that gain and FT stays 0.25 below (all checks below)",
             "passed": bool(all(checks.values())), "checks": checks}
    # not counted (the card's criteria do not ask it): does EILEV read the query clip, or only the context's words?
    claim["query_clip_used"] = bool(results[e]["strict_kswap"] <= acc[e][-1] - 0.10)
    if not claim["query_clip_used"]:
        claim["text"] += (f". CAVEAT: not visually grounded: with the query clip swapped EILEV still scores "
                          f"{results[e]['strict_kswap']:.3f} at k={kmax}, so it copies the words that recur in the context")
    metrics = [("strict acc", "strict")] + ([("class acc", "class")] if data["synthetic"] else []) + \
              [("token F1", "f1"), ("ROUGE-L", "rougeL")]
    rows = []
    for label, key in metrics:
        for k in args.shots:
            paper = ", ".join(f"{n.split()[0]} {PAPER_STS_BE[n][k]}" for n in MODELS if k in PAPER_STS_BE[n])
            paper = (paper + " (STS-BE)") if key == "strict" and paper else PAPER_ROUGE_L.get(k, "") * (key == "rougeL")
            rows.append([f"{label}, k={k}", *(results[n][f"{key}_k{k}"] for n in MODELS), paper])
    rows.append([f"strict acc, k={kmax}, query clip swapped", *(results[n]["strict_kswap"] for n in MODELS),
                 "diagnostic"])
    print(f"\nRare (held-out) verb-noun pairs, {len(plan)} test queries, contexts from the training pool:")
    shared.print_table(["metric", "EILEV (method)", "random ctx (ablation)", "FT (no ctx)", "paper"], rows, claim)
    for check, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {check}")
    print(f"  (not counted) EILEV reads the query clip: strict acc at k={kmax} drops by >= 0.10 when the query clip is "
          f"swapped ({results[e]['strict_kswap']:.3f} vs {acc[e][-1]:.3f}): {claim['query_clip_used']}")
    for name, ex in examples.items():
        print(f"  {name}, k={kmax}: " + " || ".join(ex))
    plot(results, args)
    key = {"metric": f"strict_k{kmax}", "method": e, "baseline": f, "higher_is_better": True}
    paper_numbers = {"sts_be_held_out_ego4d_opt2.7b": PAPER_STS_BE,
                     "rouge_l_eilev": "0.23 at 0 shots -> 0.63 at 16 shots",
                     "novel_rare_pairs_eilev_sts_be": "0.37 -> 0.75 at 16 shots"}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=paper_numbers, history=history, examples=examples,
                               wall_s=time.perf_counter() - t_start)


def plot(results: dict, args: Args) -> None:
    """The paper's ICL figure re-drawn: accuracy vs number of in-context examples, one line per model."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("strict", "strict action accuracy"), ("class", "class-level action accuracy"), ("rougeL", "ROUGE-L")]
    keys = [(k, t) for k, t in keys if f"{k}_k0" in next(iter(results.values())) or f"{k}_k{args.shots[0]}" in
            next(iter(results.values()))]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, (k, title) in zip(np.atleast_1d(axes), keys):
        for name in MODELS:
            ax.plot(args.shots, [results[name][f"{k}_k{s}"] for s in args.shots], marker="o", label=name)
        ax.set(title=f"{title} (rare pairs)", xlabel="in-context examples k", ylim=(0, 1.02), xticks=args.shots)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(shared.run_path(args, SLUG, ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
