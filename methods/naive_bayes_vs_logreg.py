"""Revisiting Discriminative vs. Generative Classifiers: Theory and Implications (Zheng, Wu, Bao, Cao, Li, Zhu, ICML 2023)
arXiv:2302.02334  https://arxiv.org/abs/2302.02334
Official code: https://github.com/ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers (sklearn LogisticRegression, a pandas
Gaussian naive Bayes in models/gaussnb.py, the simulation in main_simulation.py + data/generate_data.py)

Multiclass Gaussian naive Bayes (NB, generative) gets within eps of its own asymptotic error after O(log n) samples,
multiclass logistic regression (LR, discriminative, trained on the logistic surrogate) needs O(n): NB estimates each
coordinate's mean and variance on its own, in closed form; LR fits all n directions jointly.
NOTATION (the paper's, swapped from the usual ML habit): n = feature dimension, m = training-set size, K = classes.

Reproduces: on the paper's Gaussian mixture (K=2, "easy"), NB's m_eps stays flat (<= 16) for n = 50..400 while LR's
grows about linearly (m_eps/n in [0.8, 4], x3+ from n=50 to 400) -- holds. On features of a small MLP trained on
sklearn's 8x8 digits, NB converges (within 0.02 of its m=450 error) no later than LR -- holds; NB is at least as good
as LR at m <= 3 per class (the paper's few-shot claim) -- DOES NOT HOLD here (see Expected).

Run:
  python methods/naive_bayes_vs_logreg.py                             # default CPU preset (~30 s)
  python methods/naive_bayes_vs_logreg.py --preset smoke              # seconds, same code path
  python methods/naive_bayes_vs_logreg.py --preset paper --device cuda   # K in {2,3,5,7} x n in {100..1000}
  python methods/naive_bayes_vs_logreg.py --bench                     # loop vs batched fits, eager vs compile
  python methods/naive_bayes_vs_logreg.py --mode hard                 # the paper's correlated covariance
  python methods/naive_bayes_vs_logreg.py --data-dir feats --feature-backbone clip --feature-dataset cifar10 \
      --probe-m 20 50 100 200 500 1000 --probe-c 0.1                  # the paper's CIFAR curves from its extractor
  python methods/naive_bayes_vs_logreg.py --help

Expected (default preset, seed 0, 24 s of run time on a quiet 2-core CPU; identical with 1 or 2 threads):
  | metric                                         | NB (method) | LR (baseline) | paper                |
  |------------------------------------------------|-------------|---------------|----------------------|
  | K=2 n=50: m_eps (eps=0.01)                     | 5           | 73            | NB O(log n), LR O(n) |
  | K=2 n=50: error at m=8                         | 0.002796    | 0.2709        | curves only          |
  | K=2 n=50: asymptotic error                     | 2.212e-07   | 2.212e-07     | Bayes ~ 0            |
  | K=2 n=100: m_eps (eps=0.01)                    | 5           | 142           | NB O(log n), LR O(n) |
  | K=2 n=100: error at m=8                        | 4.42e-06    | 0.3507        | curves only          |
  | K=2 n=100: asymptotic error                    | 5.958e-13   | 5.958e-13     | Bayes ~ 0            |
  | K=2 n=200: m_eps (eps=0.01)                    | 6           | 222           | NB O(log n), LR O(n) |
  | K=2 n=200: error at m=8                        | 3.934e-06   | 0.3983        | curves only          |
  | K=2 n=200: asymptotic error                    | 0           | 0             | Bayes ~ 0            |
  | K=2 n=400: m_eps (eps=0.01)                    | 6           | 434           | NB O(log n), LR O(n) |
  | K=2 n=400: error at m=8                        | 0           | 0.4172        | curves only          |
  | K=2 n=400: asymptotic error                    | 0           | 0             | Bayes ~ 0            |
  | digits: error at m=10                          | 0.1277      | 0.1233        | NB <= LR few-shot    |
  | digits: error at m=20                          | 0.09056     | 0.07031       | NB <= LR few-shot    |
  | digits: error at m=30                          | 0.05696     | 0.05144       | NB <= LR few-shot    |
  | digits: error at m=450                         | 0.03318     | 0.02494       | LR may win late      |
  | digits: m_2% (within 0.02 of m=450)            | 50          | 75            | NB converges faster  |
  | digits 0-4 -> 5-9: error at m=10               | 0.4974      | 0.4842        | NB <= LR few-shot    |
  | digits 0-4 -> 5-9: error at m=450              | 0.3307      | 0.1612        | LR may win late      |
  | digits 0-4 -> 5-9: m_2% (within 0.02 of m=450) | 200         | 450           | NB converges faster  |

  CLAIM DOES NOT HOLD: NB needs O(log n) samples to reach its asymptote and LR O(n) (Gaussian mixtures); on
  network features NB is as good as LR few-shot and converges no later (all checks below)
    [x] 1. m_eps(NB) <= 16 for every n (got [5, 5, 6, 6])
    [x] 2. m_eps(LR)/n in [0.8, 4] and x3 from n=50 to n=400 (got [73, 142, 222, 434])
    [x] 3. at m=8: LR error >= 0.2 for n >= 100, NB error <= 0.01
    [ ] 4. probe: NB error <= LR error at every m <= 3K (few-shot)
    [x] 5. probe: m_2%(NB) <= m_2%(LR) (NB converges no later)
  Seeds 1 and 2 give the same verdicts: criteria 1, 2, 3 and 5 hold, criterion 4 does not (LR beats NB by 0.004-0.02
  at m = 10, 20, 30 on digits features; NB's few-shot advantage is not reproduced at this scale).

Implementation details:
  1. NB is the official `nb_diag`: per-class means mu_k, per-class biased variances v_kj + 1e-9, priors pi_k = m_k/m,
     and predict() POOLS the variance, vbar_j = sum_k pi_k v_kj. With a shared variance the rule is linear in x,
     s_k(x) = x.(mu_k/vbar) - 1/2 sum_j mu_kj^2/vbar_j + log pi_k, so NB and LR live in the same hypothesis class and
     both are stored as (W, b). (sklearn's GaussianNB keeps per-class variances: a quadratic rule, a different model.)
  2. LR is sklearn's: C * sum_i CE_i + 1/2 ||W||^2 (bias not penalised; a SUM, not a mean), K=2 one sigmoid vector,
     K>2 a K-row softmax; divided by C*m as sklearn's lbfgs does (same minimiser), torch.optim.LBFGS (strong Wolfe,
     history 10 as in scipy, max_iter 1000). Fast path (no attention here): NB is one vectorised pass over all
     repeats; LR fits all repeats as ONE L-BFGS problem (the summed objective is separable); `--bench` checks both
     against one-fit-at-a-time; `--compile` wraps the LR objective in torch.compile.
  3. Binary test error is exact, never sampled: a linear rule (w, b) under N(mu_0, Sigma), N(mu_1, Sigma), priors 1/2,
     errs with 1/2 Phi(-(w.mu_1+b)/s) + 1/2 Phi((w.mu_0+b)/s), s = sqrt(w^T Sigma w). K>2 uses a fixed 10^4-point test
     draw whose seed does not depend on --seed (as the official 10^4-point test set).
  4. Asymptotes are exact: NB's is the error of its population rule (true means, pooled variance = diag Sigma);
     LR's is the Bayes error (the Gaussian shared-covariance model is exactly logistic, so LR is well specified).
     m_eps(method) = smallest grid m whose mean error over repeats is <= asymptote(method) + eps.
  5. Digits: an MLP 64-256-128-10 (ReLU, Adam 1e-3, 30 epochs) trains on a fixed half of the 1797 images; the probe
     pool is the 128-d penultimate ReLU features of the other half. Each repeat takes a stratified subset of size m,
     min-max scales it with its own min/max (official `--minmax`), fits NB and LR (C=1) and tests on the rest of the
     pool. The transfer variant pretrains on digits 0-4 and probes digits 5-9.

Deviations from the paper:
  1. CPU scale: n in {50,100,200,400} (paper 100..1000), K=2 only (paper 2,3,5,7), m on a geometric grid (ratio
     1.25) from 4 to 20n (paper: step ceil(ln n) from 2K to 100n). `--preset paper` restores the paper's grid.
  2. Training sets are fresh stratified draws from the Gaussians for every (m, repeat), not random subsets of a
     stored 100n-point pool with a redraw-if-a-class-is-missing loop; the same sets feed NB and LR.
  3. The deep-feature experiment uses a small MLP on sklearn's 8x8 digits instead of 7 pretrained backbones on CIFAR;
     `--data-dir` reads the official extractor's .npy files for the real thing. Probe subsets are stratified (the
     official draws them at random and rejects draws that miss a class, which is impossible at m=10, K=10).
  4. LR is stopped at max|grad| <= 1e-6 (sklearn: 1e-4), so that batched and one-at-a-time fits agree.
  5. `--mode hard`: the official A^T A with a replaced diagonal is not positive semi-definite; numpy's SVD sampler then
     draws from Q|Lambda|Q^T, which we use explicitly (sampling AND exact error). A is our own fixed draw.
  6. `--preset paper` starts every K's grid at m_start=14 (= 2K for the largest K) instead of 2K per K.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "naive_bayes_vs_logreg"
PAPER = "Revisiting Discriminative vs. Generative Classifiers: Theory and Implications"
ARXIV = "2302.02334"
MODELS = ("naive_bayes", "logistic_regression")  # the method, the baseline


# ---- 0. Arguments ----------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """Gaussian naive Bayes vs logistic regression: sample efficiency on Gaussian mixtures and on network features."""

    preset: str = "default"
    """name of the preset (set by --preset); names the output files"""
    seed: int = 0
    """seed of the training-subset draws and of the MLP pretraining"""
    device: str = "auto"
    """auto | cpu | cuda"""
    compile: bool = False
    """wrap the logistic-regression objective (loss + gradient) in torch.compile"""
    bench: bool = False
    """only time one-fit-at-a-time vs batched fits and eager vs compiled LR objective"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    data_dir: Optional[str] = None
    """official extractor layout <data-dir>/<backbone>/<dataset>/{train,val}_features.npy; replaces digits"""
    feature_backbone: str = "clip"
    """backbone sub-folder of --data-dir (official names: clip, resnet, vit, moco_v2, simclr_v2, mae, simmim)"""
    feature_dataset: str = "cifar10"
    """dataset sub-folder of --data-dir (cifar10 or cifar100)"""
    # simulation (part A): the paper's mixture of Gaussians
    mode: str = "easy"
    """covariance of the mixture: easy (diagonal) or hard (A^T A with the easy diagonal)"""
    classes: tuple[int, ...] = (2,)
    """numbers of classes K of the simulation"""
    dims: tuple[int, ...] = (50, 100, 200, 400)
    """feature dimensions n of the simulation"""
    grid: str = "geometric"
    """m grid: geometric (m_start * m_ratio^j) or arithmetic (official: m_start, +ceil(ln n), ...)"""
    m_start: int = 4
    """first training-set size of the grid (at least 2K)"""
    m_ratio: float = 1.25
    """ratio of the geometric m grid"""
    m_max_factor: float = 20.0
    """the grid stops at m_max_factor * n"""
    stop_early: bool = False
    """stop an n's sweep at the first m where both methods are within eps of their asymptotes (official)"""
    repeats: int = 5
    """independent training sets per (n, m)"""
    eps: float = 0.01
    """m_eps = first m whose mean error is within eps of the method's asymptotic error"""
    c: float = 1.0
    """inverse L2 strength of LR in the simulation (sklearn's C; the loss is C * summed CE + ||W||^2 / 2)"""
    lr_max_iter: int = 1000
    """L-BFGS iterations per LR fit (sklearn: max_iter=1000)"""
    lr_tol: float = 1e-6
    """L-BFGS stops when max |gradient| of the (mean-scaled) objective is below this"""
    var_smoothing: float = 1e-9
    """added to every NB variance (official val_epsilon)"""
    # deep features (part B)
    probe: bool = True
    """run the linear-probe part (digits features, or --data-dir features)"""
    transfer: bool = True
    """also run the transfer variant on digits: pretrain on 0-4, probe on 5-9"""
    probe_m: tuple[int, ...] = (10, 20, 30, 50, 75, 100, 150, 200, 300, 450)
    """probe training-set sizes m"""
    probe_repeats: int = 10
    """stratified training subsets per probe m"""
    probe_c: float = 1.0
    """LR's C on features (official per-backbone values are 0.1-1.0)"""
    probe_tol: float = 0.02
    """m_2% = first probe m whose error is within this of the error at the largest m"""
    pretrain_epochs: int = 30
    """epochs of the digits MLP (Adam, lr 1e-3, batch 32)"""


PRESETS = {
    "smoke": Args(preset="smoke", dims=(20, 40), m_max_factor=4.0, m_ratio=1.6, repeats=2, probe_m=(10, 20, 30),
                  probe_repeats=2, transfer=False, pretrain_epochs=2),
    # DEVIATION: the paper preset starts every K's grid at 14 = 2 * 7 (official: 2K for each K).
    "paper": Args(preset="paper", classes=(2, 3, 5, 7), dims=(100, 200, 400, 1000), grid="arithmetic", m_start=14,
                  m_max_factor=100.0, stop_early=True),
}


def validate(args: Args) -> None:
    """Stop with one sentence on a bad argument (shared.run turns it into `error: ...` and exit status 2)."""
    if args.mode not in ("easy", "hard"):
        raise shared.UsageError(f"unknown --mode {args.mode!r}; choose easy or hard.")
    if args.grid not in ("geometric", "arithmetic"):
        raise shared.UsageError(f"unknown --grid {args.grid!r}; choose geometric or arithmetic.")
    if not args.dims or min(args.dims) <= 0:
        raise shared.UsageError("every feature dimension n in --dims must be a positive integer.")
    if not args.classes or min(args.classes) < 2:
        raise shared.UsageError("every number of classes in --classes must be at least 2.")
    if args.m_start < 2 * max(args.classes):
        raise shared.UsageError(f"--m-start {args.m_start} is below 2K = {2 * max(args.classes)}; the m grid must "
                                "start at two samples per class.")
    if args.grid == "geometric" and args.m_ratio <= 1:
        raise shared.UsageError("--m-ratio must be greater than 1 for a geometric grid.")
    if args.m_max_factor * min(args.dims) <= args.m_start:
        raise shared.UsageError("--m-max-factor times the smallest n must exceed --m-start, or the m grid is empty.")
    if args.repeats < 1 or args.probe_repeats < 1:
        raise shared.UsageError("--repeats and --probe-repeats must be at least 1.")
    if not 0 < args.eps < 1 or not 0 < args.probe_tol < 1:
        raise shared.UsageError("--eps and --probe-tol must lie strictly between 0 and 1.")
    if args.c <= 0 or args.probe_c <= 0:
        raise shared.UsageError("--c and --probe-c must be positive.")
    if args.lr_max_iter < 1 or args.lr_tol <= 0 or args.var_smoothing < 0 or args.pretrain_epochs < 1:
        raise shared.UsageError("--lr-max-iter and --pretrain-epochs must be >= 1, --lr-tol > 0, --var-smoothing >= 0.")
    if args.probe and (not args.probe_m or min(args.probe_m) < 2):
        raise shared.UsageError("--probe-m must list training-set sizes of at least 2.")


# ---- 1. Data A: the paper's mixture of Gaussians (official data/generate_data.py) ------------------------------------
def make_mixture(K: int, n: int, mode: str, device: torch.device) -> dict:
    """Class means, shared covariance and a sampling factor of the K-class, n-dimensional simulation."""
    # OFFICIAL CODE: mu_0 = -1 * ones(n), mu_k = 2^(k-1) * ones(n) for k >= 1.
    mu = torch.tensor([-1.0] + [2.0 ** (k - 1) for k in range(1, K)], dtype=torch.float64)[:, None].repeat(1, n)
    # "easy": Sigma = diag(n, ..., n, 1, ..., 1), the first floor(n/2) coordinates noisy, the rest clean.
    diag = torch.tensor([float(n)] * (n // 2) + [1.0] * (n - n // 2), dtype=torch.float64)  # (n,)
    if mode == "easy":
        sigma, factor = torch.diag(diag), None
    else:
        # "hard": A^T A with A ~ U[-1, 1]^{n x n} (our own fixed draw), its diagonal replaced by the easy one.
        a = torch.from_numpy(2 * np.random.default_rng(0).random((n, n)) - 1)  # (n, n)
        raw = a.T @ a - torch.diag(torch.diag(a.T @ a)) + torch.diag(diag)
        lam, q = torch.linalg.eigh(raw)
        # DEVIATION: `raw` has negative eigenvalues; numpy's SVD sampler draws from Q|Lambda|Q^T, so we use that.
        sigma = (q * lam.abs()) @ q.T  # (n, n)
        factor = q * lam.abs().sqrt()  # (n, n): Sigma = factor @ factor^T
    if K > 2:
        # OFFICIAL CODE (data/dataset.py): for K > 2 features become (x - 2^(K-3)) / 2^(K-3).
        c = 2.0 ** (K - 3)
        mu, sigma, diag = (mu - c) / c, sigma / c**2, diag / c**2
        factor = None if factor is None else factor / c
    return dict(K=K, n=n, mu=mu.to(device), sigma=sigma.to(device), std=diag.sqrt().to(device),
                factor=None if factor is None else factor.to(device))


def stratified_counts(m: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """m_k as equal as possible; the m % K leftover samples go to randomly chosen classes."""
    counts = np.full(K, m // K)
    counts[rng.choice(K, m % K, replace=False)] += 1
    return counts


def sample_mixture(mix: dict, counts_per_repeat: list[np.ndarray], rng: np.random.Generator) -> tuple:
    """X (R, m, n) float64 and y (R, m) long, drawn with numpy (identical on every device)."""
    ys = np.stack([np.repeat(np.arange(mix["K"]), c) for c in counts_per_repeat])  # (R, m)
    z = torch.from_numpy(rng.standard_normal((*ys.shape, mix["n"]))).to(mix["mu"].device)  # (R, m, n)
    y = torch.from_numpy(ys).to(mix["mu"].device)
    noise = z * mix["std"] if mix["factor"] is None else z @ mix["factor"].T  # (R, m, n), covariance Sigma
    return mix["mu"][y] + noise, y


def m_grid(args: Args, n: int) -> list[int]:
    """Training-set sizes m for dimension n."""
    top = int(args.m_max_factor * n)
    if args.grid == "arithmetic":  # OFFICIAL CODE: range(2K, 100n, ceil(ln n))
        return list(range(args.m_start, top, math.ceil(math.log(n))))
    # DEVIATION: a geometric grid up to 20n keeps the CPU run short (the paper steps by ceil(ln n) up to 100n).
    count = int(math.log(top / args.m_start) / math.log(args.m_ratio)) + 1
    return sorted({min(top, round(args.m_start * args.m_ratio**j)) for j in range(count + 1)})


# ---- 2. Data B: features of a small network (sklearn digits) and the official --data-dir layout ----------------------
def digits_features(args: Args, device: torch.device, transfer: bool) -> tuple:
    """Pretrain an MLP on one part of the 8x8 digits; return the 128-d penultimate features of the other part."""
    # DEVIATION: a small MLP on sklearn's 8x8 digits stands in for the paper's 7 pretrained backbones on CIFAR.
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    x, y = load_digits(return_X_y=True)  # (1797, 64) in [0, 16], labels 0-9
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    if transfer:  # pretrain on digits 0-4, probe on digits 5-9 (labels shifted to 0-4)
        pre, probe, offset = y < 5, y >= 5, 5
    else:  # a fixed half for pretraining, the other half for probing (fixed split: independent of --seed)
        pre = torch.zeros(len(y), dtype=torch.bool)
        pre[torch.from_numpy(np.random.default_rng(0).permutation(len(y))[: len(y) // 2])] = True
        probe, offset = ~pre, 0
    shared.seed_everything(args.seed)  # the network's init and batch order follow --seed
    n_out = int(y[pre].max()) + 1
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, n_out)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xp, yp = x[pre].to(device), y[pre].to(device)  # (N_pre, 64), (N_pre,)
    progress = shared.Progress(f"pretrain MLP{' (0-4)' * transfer}", args.pretrain_epochs * math.ceil(len(yp) / 32))
    history, step = [], 0
    for _ in range(args.pretrain_epochs):
        for idx in torch.randperm(len(yp)).split(32):
            loss = F.cross_entropy(net(xp[idx]), yp[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            progress.update(step, loss=loss.item())
        history.append({"part": f"pretrain{'_transfer' * transfer}", "step": step, "train/loss": loss.item()})
    with torch.no_grad():
        feats = net[:4](x[probe].to(device)).double()  # (N_probe, 128): penultimate ReLU activations
    return feats, (y[probe] - offset).to(device), history


def load_feature_dir(args: Args, device: torch.device) -> tuple:
    """Official extractor layout: (N, D+1) float arrays, last column the integer label."""
    folder = Path(args.data_dir) / args.feature_backbone / args.feature_dataset
    out = []
    for name in ("train_features.npy", "val_features.npy"):
        path = folder / name
        if not path.is_file():
            raise shared.UsageError(f"missing file {path}; --data-dir expects <data-dir>/<backbone>/<dataset>/{name}.")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # not an .npy file, or an object array
            raise shared.UsageError(f"cannot read {path} as a numeric .npy array ({type(e).__name__}).") from None
        if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.number):
            raise shared.UsageError(f"{path} must be a numeric 2-d array (N, D+1), got shape {arr.shape}.")
        if not np.isfinite(arr).all():
            raise shared.UsageError(f"{path} contains NaN or infinite values.")
        labels = arr[:, -1]
        if (labels != np.round(labels)).any() or labels.min() < 0:
            raise shared.UsageError(f"the last column of {path} must hold non-negative integer labels.")
        out.append((torch.tensor(arr[:, :-1], dtype=torch.float64, device=device),
                    torch.tensor(labels.astype(np.int64), device=device)))
    (xtr, ytr), (xte, yte) = out
    if xtr.shape[1] != xte.shape[1]:
        raise shared.UsageError(f"train and val features in {folder} have different widths ({xtr.shape[1]} vs "
                                f"{xte.shape[1]}).")
    classes = torch.unique(ytr)
    if not torch.isin(yte, classes).all():
        raise shared.UsageError(f"val_features.npy in {folder} has labels that never occur in train_features.npy.")
    return xtr, torch.searchsorted(classes, ytr), xte, torch.searchsorted(classes, yte)


# ---- 3. The method: Gaussian naive Bayes with a pooled (shared) variance ---------------------------------------------
def nb_fit(x: torch.Tensor, y: torch.Tensor, K: int, var_smoothing: float = 1e-9) -> tuple:
    """Fit NB on every repeat at once. x (R, m, n), y (R, m) -> the linear rule W (R, K, n), b (R, K)."""
    onehot = F.one_hot(y, K).to(x.dtype)  # (R, m, K)
    counts = onehot.sum(1)  # (R, K): m_k
    mu = onehot.transpose(1, 2) @ x / counts[..., None]  # (R, K, n): mu_kj = mean of x_ij over y_i = k
    resid = x - torch.gather(mu, 1, y[..., None].expand_as(x))  # (R, m, n): x_i - mu_{y_i}
    var = onehot.transpose(1, 2) @ resid**2 / counts[..., None] + var_smoothing  # (R, K, n): biased v_kj + eps
    prior = counts / x.shape[1]  # (R, K): pi_k = m_k / m
    # OFFICIAL CODE (models/gaussnb.py predict): pool the variances, vbar_j = sum_k pi_k v_kj.
    vbar = (prior[..., None] * var).sum(1, keepdim=True)  # (R, 1, n)
    # s_k(x) = log pi_k - 1/2 sum_j (x_j - mu_kj)^2 / vbar_j; dropping -1/2 sum_j x_j^2/vbar_j (the same for every k)
    # leaves s_k(x) = x . W_k + b_k with W_k = mu_k / vbar and b_k = log pi_k - 1/2 sum_j mu_kj^2 / vbar_j.
    return mu / vbar, prior.log() - 0.5 * (mu**2 / vbar).sum(-1)


def nb_fit_loop(x: torch.Tensor, y: torch.Tensor, K: int, var_smoothing: float = 1e-9) -> tuple:
    """Reference for nb_fit: one repeat and one class at a time, the formulas written out literally."""
    ws, bs = [], []
    for xr, yr in zip(x, y):
        mus = [xr[yr == k].mean(0) for k in range(K)]
        variances = [((xr[yr == k] - mus[k]) ** 2).mean(0) + var_smoothing for k in range(K)]
        priors = [(yr == k).double().mean() for k in range(K)]
        vbar = sum(p * v for p, v in zip(priors, variances))
        ws.append(torch.stack([mu / vbar for mu in mus]))
        bs.append(torch.stack([p.log() - 0.5 * (mu**2 / vbar).sum() for p, mu in zip(priors, mus)]))
    return torch.stack(ws), torch.stack(bs)


# ---- 4. The baseline: multiclass logistic regression, sklearn's objective, L-BFGS in torch ---------------------------
def lr_objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, K: int, C: float) -> torch.Tensor:
    """Sum over repeats of (1/(C m)) * [C * sum_i CE_i + 1/2 ||W||^2]. theta (R, P), x (R, m, n), y (R, m)."""
    R, m, n = x.shape
    if K == 2:  # sklearn's binary LR: one weight vector, p(y=1 | x) = sigmoid(w.x + b)
        w, b = theta[:, :n], theta[:, n]  # (R, n), (R,)
        z = torch.einsum("rmn,rn->rm", x, w) + b[:, None]  # (R, m)
        ce = F.softplus(z) - y.to(z.dtype) * z  # (R, m): -log p(y_i | x_i) = log(1 + e^z) - y z
        sq = (w * w).sum(1)  # (R,)
    else:  # multinomial: K weight rows, softmax cross-entropy
        w, b = theta[:, : K * n].reshape(R, K, n), theta[:, K * n :]  # (R, K, n), (R, K)
        z = torch.einsum("rmn,rkn->rmk", x, w) + b[:, None, :]  # (R, m, K)
        ce = torch.logsumexp(z, -1) - z.gather(-1, y[..., None]).squeeze(-1)  # (R, m)
        sq = (w * w).sum((1, 2))  # (R,)
    # NOTE: sklearn's lbfgs minimises exactly this mean-scaled form (same minimiser as C*sum CE + ||W||^2/2).
    return (ce.mean(1) + sq / (2 * C * m)).sum()


def lr_fit(x: torch.Tensor, y: torch.Tensor, K: int, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-6,
           objective=lr_objective) -> tuple:
    """Fit every repeat as one L-BFGS problem (separable objective). Returns W (R, K, n), b (R, K)."""
    R, m, n = x.shape
    rows = 1 if K == 2 else K
    theta = torch.zeros(R, rows * (n + 1), dtype=x.dtype, device=x.device, requires_grad=True)  # sklearn's init
    # DEVIATION: stop at max|grad| <= tol = 1e-6 (sklearn: 1e-4) so that batched and one-at-a-time fits agree.
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(theta, x, y, K, C)
        loss.backward()
        return loss

    opt.step(closure)
    theta = theta.detach()
    if K == 2:  # write the sigmoid rule as two rows, class 0 scoring 0: the same (W, b) form as NB
        zero = torch.zeros_like(theta)
        return torch.stack([zero[:, :n], theta[:, :n]], 1), torch.stack([zero[:, n], theta[:, n]], 1)
    return theta[:, : K * n].reshape(R, K, n), theta[:, K * n :]


def lr_fit_one_by_one(x, y, K, C=1.0, max_iter=1000, tol=1e-6, objective=lr_objective) -> tuple:
    """Reference for the batched fit: one sklearn-style fit per repeat."""
    fits = [lr_fit(x[r : r + 1], y[r : r + 1], K, C, max_iter, tol, objective) for r in range(x.shape[0])]
    return torch.cat([f[0] for f in fits]), torch.cat([f[1] for f in fits])


# ---- 5. Evaluation: exact Gaussian error, test-set error, asymptotes, m_eps ------------------------------------------
def exact_binary_error(W: torch.Tensor, b: torch.Tensor, mix: dict) -> torch.Tensor:
    """Exact 0-1 error of the rules (W (R, 2, n), b (R, 2)) on N(mu_0, Sigma), N(mu_1, Sigma), priors 1/2 -> (R,)."""
    w, c = W[:, 1] - W[:, 0], b[:, 1] - b[:, 0]  # (R, n), (R,): predict 1 iff w.x + c > 0
    s = ((w @ mix["sigma"]) * w).sum(1).sqrt()  # (R,): std of w.x within a class
    a1, a0 = w @ mix["mu"][1] + c, w @ mix["mu"][0] + c  # (R,): mean score of each class
    # err = 1/2 P(w.x+c <= 0 | y=1) + 1/2 P(w.x+c > 0 | y=0) = 1/2 Phi(-a1/s) + 1/2 Phi(a0/s)
    err = 0.5 * torch.special.ndtr(-a1 / s) + 0.5 * torch.special.ndtr(a0 / s)
    return torch.where(s > 0, err, torch.full_like(err, 0.5))  # w = 0 predicts one class: error 1/2


def test_error(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0-1 error of each repeat's rule on a test set x (N, n) or (R, N, n), y (N,) or (R, N) -> (R,)."""
    scores = x @ W.transpose(1, 2) + b[:, None, :]  # (R, N, K)
    return (scores.argmax(-1) != y).double().mean(-1)


def population_rules(mix: dict) -> dict:
    """m -> infinity limits: NB's rule (true means, pooled variance diag Sigma, priors 1/K) and the Bayes rule."""
    K, mu, sigma = mix["K"], mix["mu"], mix["sigma"]
    logp = torch.full((1, K), -math.log(K), dtype=mu.dtype, device=mu.device)
    v = torch.diagonal(sigma)[None]  # (1, n)
    nb = (mu[None] / v, logp - 0.5 * (mu**2 / v).sum(-1)[None])
    # Bayes rule for shared-covariance Gaussians (= LR's population optimum): W_k = Sigma^-1 mu_k.
    wb = torch.linalg.solve(sigma, mu.T).T  # (K, n)
    bayes = (wb[None], logp - 0.5 * (wb * mu).sum(-1)[None])
    return {"naive_bayes": nb, "logistic_regression": bayes}


def first_m_within(ms: list[int], errs: list[float], target: float) -> Optional[int]:
    """m_eps: the smallest grid m whose mean error is <= target (None if the grid never gets there)."""
    return next((m for m, e in zip(ms, errs) if e <= target), None)


# ---- 6. Experiments --------------------------------------------------------------------------------------------------
def run_simulation(args: Args, device: torch.device, K: int, n: int, fit_lr) -> dict:
    """Error-vs-m curves of NB and LR on one (K, n) mixture, mean over args.repeats training sets per m."""
    mix = make_mixture(K, n, args.mode, device)
    if K == 2:
        error = lambda W, b: exact_binary_error(W, b, mix)  # noqa: E731
    else:  # a fixed 10^4-point test draw, seed independent of --seed
        rng = np.random.default_rng([12345, K, n])
        xt, yt = sample_mixture(mix, [np.full(K, 10_000 // K)], rng)
        error = lambda W, b: test_error(W, b, xt[0], yt[0])  # noqa: E731
    asym = {name: error(*rule).item() for name, rule in population_rules(mix).items()}
    out = dict(K=K, n=n, m=[], naive_bayes=[], logistic_regression=[], asymptote=asym, history=[])
    grid = m_grid(args, n)
    progress = shared.Progress(f"sim K={K} n={n}", len(grid))
    for j, m in enumerate(grid):
        # DEVIATION: fresh stratified draws from the Gaussians (an infinite pool) instead of random subsets of the
        # official 100n-point pool; NB and LR see the same training sets.
        rng = np.random.default_rng([args.seed, K, n, m])
        x, y = sample_mixture(mix, [stratified_counts(m, K, rng) for _ in range(args.repeats)], rng)
        nb = error(*nb_fit(x, y, K, args.var_smoothing)).mean().item()
        lr = error(*fit_lr(x, y, K, args.c)).mean().item()
        for key, value in (("m", m), ("naive_bayes", nb), ("logistic_regression", lr)):
            out[key].append(value)
        out["history"].append({"part": f"sim_K{K}_n{n}", "step": m, "eval/nb_err": nb, "eval/lr_err": lr})
        progress.update(j + 1, nb_err=nb, lr_err=lr)
        if args.stop_early and all(out[k][-1] <= asym[k] + args.eps for k in MODELS):
            break
    # m_eps(method): first m within eps of the method's own asymptote; the few-shot point is the first m >= 4K.
    out["m_eps"] = {k: first_m_within(out["m"], out[k], asym[k] + args.eps) for k in MODELS}
    out["m_few"] = next((m for m in out["m"] if m >= 4 * K), out["m"][-1])
    out["err_few"] = {k: out[k][out["m"].index(out["m_few"])] for k in MODELS}
    return out


def stratified_subsets(y: torch.Tensor, m: int, K: int, repeats: int, rng: np.random.Generator) -> np.ndarray:
    """(repeats, m) indices into the pool, class counts as equal as possible."""
    # DEVIATION: stratified subsets; the official code draws at random and redraws when a class is missing
    # (hopeless at m = K = 10).
    by_class = [np.flatnonzero(y.cpu().numpy() == k) for k in range(K)]
    rows = []
    for _ in range(repeats):
        counts = stratified_counts(m, K, rng)
        if any(c > len(p) for c, p in zip(counts, by_class)):
            raise shared.UsageError(f"probe m={m} needs {max(counts)} samples of a class but the pool has fewer.")
        rows.append(np.concatenate([rng.choice(p, c, replace=False) for p, c in zip(by_class, counts)]))
    return np.stack(rows)


def keep_out(size: int, idx: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the pool without the training indices idx."""
    keep = torch.ones(size, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return keep


def run_probe(args: Args, name: str, pool: tuple, test: Optional[tuple], fit_lr) -> dict:
    """Linear probing curves on frozen features: min-max scaled on each training subset (official --minmax)."""
    xp, yp = pool  # (N, D), (N,)
    K = int(yp.max()) + 1
    if min(args.probe_m) < K or max(args.probe_m) >= len(yp):
        raise shared.UsageError(f"--probe-m values must lie in [K={K}, pool size {len(yp)}) for the {name} probe.")
    out = dict(K=K, m=[], naive_bayes=[], logistic_regression=[], history=[])
    progress = shared.Progress(f"probe {name}", len(args.probe_m))
    for j, m in enumerate(args.probe_m):
        rng = np.random.default_rng([args.seed, 99, m])
        idx = torch.from_numpy(stratified_subsets(yp, m, K, args.probe_repeats, rng)).to(yp.device)  # (R, m)
        x, y = xp[idx], yp[idx]  # (R, m, D), (R, m)
        lo = x.amin(1, keepdim=True)  # (R, 1, D)
        span = x.amax(1, keepdim=True) - lo
        span = torch.where(span > 0, span, torch.ones_like(span))  # sklearn's MinMaxScaler: constant column -> 0
        rules = {"naive_bayes": nb_fit((x - lo) / span, y, K, args.var_smoothing),
                 "logistic_regression": fit_lr((x - lo) / span, y, K, args.probe_c)}
        errs = {k: [] for k in MODELS}
        for r in range(args.probe_repeats):  # test = the given val set, or the pool minus this subset
            xt, yt = test if test is not None else (xp[keep_out(len(yp), idx[r])], yp[keep_out(len(yp), idx[r])])
            for k, (W, b) in rules.items():  # the test set is scaled with the training subset's min and max
                errs[k].append(test_error(W[r : r + 1], b[r : r + 1], (xt - lo[r]) / span[r], yt).item())
        for k in MODELS:
            out[k].append(float(np.mean(errs[k])))
        out["m"].append(m)
        nb, lr = out["naive_bayes"][-1], out["logistic_regression"][-1]
        out["history"].append({"part": f"probe_{name}", "step": m, "eval/nb_err": nb, "eval/lr_err": lr})
        progress.update(j + 1, nb_err=nb, lr_err=lr)
    # m_2%(method): first m whose error is within probe_tol of the same method's error at the largest m.
    out["m_2pct"] = {k: first_m_within(out["m"], out[k], out[k][-1] + args.probe_tol) for k in MODELS}
    return out


# ---- 7. Benchmark: one fit at a time vs batched, eager vs compiled ---------------------------------------------------
def run_bench(args: Args, device: torch.device) -> list[dict]:
    """Time the reference (loop) and fused (batched) fits at the default's largest shape, after checking they agree."""
    K, n = args.classes[0], max(args.dims)
    m = 2 * n if device.type == "cpu" else 10 * n
    mix = make_mixture(K, n, args.mode, device)
    rng = np.random.default_rng([args.seed, 0])
    x, y = sample_mixture(mix, [stratified_counts(m, K, rng) for _ in range(args.repeats)], rng)
    err = (lambda W, b: exact_binary_error(W, b, mix)) if K == 2 else (lambda W, b: test_error(W, b, x[0], y[0]))
    nb_ref, nb_fused = nb_fit_loop(x, y, K), nb_fit(x, y, K)
    torch.testing.assert_close(nb_fused, nb_ref, rtol=1e-9, atol=1e-9)
    kw = dict(C=args.c, max_iter=args.lr_max_iter, tol=args.lr_tol)
    gap = (err(*lr_fit_one_by_one(x, y, K, **kw)) - err(*lr_fit(x, y, K, **kw))).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"batched and one-at-a-time LR fits disagree: max error gap {gap:.2e} > 1e-3")
    print(f"checked: NB loop == vectorised; LR batched vs one at a time: max error gap {gap:.1e} (n={n}, m={m})")
    theta = torch.zeros(x.shape[0], (1 if K == 2 else K) * (n + 1), dtype=x.dtype, device=device, requires_grad=True)

    def step(objective):  # one evaluation of loss and gradient: the unit of work inside L-BFGS
        return lambda: torch.autograd.grad(objective(theta, x, y, K, args.c), theta)

    print("compiling the LR objective with torch.compile (this takes a while) ...", flush=True)
    compiled = torch.compile(lr_objective, dynamic=False)
    torch.testing.assert_close(step(compiled)()[0], step(lr_objective)()[0], rtol=1e-8, atol=1e-10)
    t = lambda fn, reps=10: shared.benchmark(fn, device, warmup=1, repeats=reps)  # noqa: E731
    return [
        {"what": f"NB fit, {args.repeats} repeats (n={n}, m={m}): loop vs vectorised",
         "reference_ms": t(lambda: nb_fit_loop(x, y, K)), "fused_ms": t(lambda: nb_fit(x, y, K))},
        {"what": f"LR L-BFGS fit, {args.repeats} repeats: one at a time vs batched",
         "reference_ms": t(lambda: lr_fit_one_by_one(x, y, K, **kw), 3),
         "fused_ms": t(lambda: lr_fit(x, y, K, **kw), 3)},
        {"what": "train step eager vs compile (LR loss+grad)", "reference_ms": t(step(lr_objective)),
         "fused_ms": t(step(compiled))},
    ]


# ---- 8. Figure: error vs m per n (NB solid, LR dashed), plus the digits panels ---------------------------------------
def plot(path: Path, sims: list[dict], probes: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({s["K"] for s in sims})
    fig, axes = plt.subplots(1, len(ks) + len(probes), figsize=(5.2 * (len(ks) + len(probes)), 4.2), squeeze=False)
    for ax, K in zip(axes[0], ks):
        for i, s in enumerate(s for s in sims if s["K"] == K):
            ax.plot(s["m"], s["naive_bayes"], "-", color=f"C{i}", label=f"NB n={s['n']}")
            ax.plot(s["m"], s["logistic_regression"], "--", color=f"C{i}", label=f"LR n={s['n']}")
        ax.set(xscale="log", xlabel="training set size m", ylabel="test error", title=f"Gaussian mixture, K={K}")
        ax.legend(fontsize=7, ncol=2)
    for ax, (name, p) in zip(axes[0][len(ks) :], probes.items()):
        ax.plot(p["m"], p["naive_bayes"], "o-", color="C0", label="naive Bayes")
        ax.plot(p["m"], p["logistic_regression"], "s--", color="C3", label="logistic regression")
        ax.set(xscale="log", xlabel="training set size m", ylabel="test error", title=f"linear probe: {name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- 9. Main: run, judge the card's criteria, print, save ------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return shared.save_bench(args, SLUG, device, run_bench(args, device))
    t0 = time.perf_counter()
    features = load_feature_dir(args, device) if args.probe and args.data_dir else None  # fail fast on bad files
    objective = lr_objective
    if args.compile:
        print("compiling the LR objective with torch.compile (this takes a while) ...", flush=True)
        objective = torch.compile(lr_objective, dynamic=True)

    def fit_lr(x, y, K, C):
        return lr_fit(x, y, K, C, args.lr_max_iter, args.lr_tol, objective)

    # Part A: the simulation. Both models are deterministic given the training subsets, which are seeded per (K, n, m).
    shared.seed_everything(args.seed)
    sims = [run_simulation(args, device, K, n, fit_lr) for K in args.classes for n in args.dims]
    # Part B: linear probes on frozen features.
    probes, history = {}, [h for s in sims for h in s["history"]]
    if features is not None:
        name = f"{args.feature_backbone}-{args.feature_dataset}"
        probes[name] = run_probe(args, name, features[:2], features[2:], fit_lr)
    elif args.probe:
        for name, transfer in [("digits", False)] + [("digits 0-4 -> 5-9", True)] * args.transfer:
            feats, labels, pre_history = digits_features(args, device, transfer)
            probes[name] = run_probe(args, name, (feats, labels), None, fit_lr)
            history += pre_history
    history += [h for p in probes.values() for h in p["history"]]

    results, rows = tabulate(sims, probes, args)
    claim = judge(sims, probes, args)
    shared.print_table(["metric", "NB (method)", "LR (baseline)", "paper"], rows, claim)
    for check, ok in claim["checks"].items():
        print(f"  [{'x' if ok else ' '}] {check}")
    plot(shared.run_path(args, SLUG, ".png"), sims, probes)
    last = [s for s in sims if s["K"] == args.classes[0]][-1]
    key = {"metric": f"sim_K{last['K']}_n{last['n']}/err_m{last['m_few']}", "method": "naive_bayes",
           "baseline": "logistic_regression", "higher_is_better": False}
    paper_numbers = {"note": "the paper reports curves only: NB flat in n while LR's m_eps grows ~linearly with n; "
                             "NB converges faster on 7 backbones x CIFAR-10/100 and crosses LR on supervised ones"}
    drop = lambda d: {k: v for k, v in d.items() if k != "history"}  # noqa: E731
    curves = {"sims": [drop(s) for s in sims], "probes": {k: drop(v) for k, v in probes.items()}}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=paper_numbers, history=history, wall_s=time.perf_counter() - t0,
                               curves=curves)


def tabulate(sims: list[dict], probes: dict, args: Args) -> tuple:
    """results = {model: {metric: float}} for the JSON, and the printed rows."""
    results, rows = {k: {} for k in MODELS}, []
    for s in sims:
        tag, label = f"sim_K{s['K']}_n{s['n']}", f"K={s['K']} n={s['n']}"
        for k in MODELS:
            if s["m_eps"][k] is not None:  # never reached within the grid: left out (the table says "never")
                results[k][f"{tag}/m_eps"] = float(s["m_eps"][k])
            results[k][f"{tag}/err_m{s['m_few']}"] = float(s["err_few"][k])
            results[k][f"{tag}/err_inf"] = float(s["asymptote"][k])
        rows += [[f"{label}: m_eps (eps={args.eps})", *(str(s["m_eps"][k] or "never") for k in MODELS),
                  "NB O(log n), LR O(n)"],
                 [f"{label}: error at m={s['m_few']}", *(float(s["err_few"][k]) for k in MODELS), "curves only"],
                 [f"{label}: asymptotic error", *(float(s["asymptote"][k]) for k in MODELS), "Bayes ~ 0"]]
    for name, p in probes.items():
        tag = name.replace(" ", "_")
        for k in MODELS:
            results[k].update({f"{tag}/err_m{m}": float(e) for m, e in zip(p["m"], p[k])})
            results[k][f"{tag}/m_2pct"] = float(p["m_2pct"][k])
        rows += [[f"{name}: error at m={m}", float(p["naive_bayes"][j]), float(p["logistic_regression"][j]),
                  "NB <= LR few-shot" if m <= 3 * p["K"] else "LR may win late"]
                 for j, m in enumerate(p["m"]) if m <= 3 * p["K"] or j == len(p["m"]) - 1]
        rows.append([f"{name}: m_2% (within {args.probe_tol} of m={p['m'][-1]})",
                     *(str(p["m_2pct"][k]) for k in MODELS), "NB converges faster"])
    return results, rows


def judge(sims: list[dict], probes: dict, args: Args) -> dict:
    """The card's five pass criteria, on the first K of the run and the first probe (calibrated for K=2, easy)."""
    K = args.classes[0]
    s0 = [s for s in sims if s["K"] == K]
    nb_m, lr_m = ([s["m_eps"][k] for s in s0] for k in MODELS)
    c1 = all(v is not None and v <= 8 * K for v in nb_m)  # NB flat in n
    c2 = (len(s0) > 1 and all(v is not None and 0.8 <= v / s["n"] <= 4 for v, s in zip(lr_m, s0))
          and lr_m[-1] >= 3 * lr_m[0])  # LR about linear in n
    c3 = (all(s["err_few"]["logistic_regression"] >= 0.2 for s in s0 if s["n"] >= 100)
          and all(s["err_few"]["naive_bayes"] <= 0.01 for s in s0))
    p = next(iter(probes.values()), None)
    c4 = p is not None and all(nb <= lr for m, nb, lr in zip(p["m"], p["naive_bayes"], p["logistic_regression"])
                               if m <= 3 * p["K"])  # few-shot: NB at least as good
    c5 = p is not None and p["m_2pct"]["naive_bayes"] <= p["m_2pct"]["logistic_regression"]
    checks = {f"1. m_eps(NB) <= {8 * K} for every n (got {nb_m})": c1,
              f"2. m_eps(LR)/n in [0.8, 4] and x3 from n={s0[0]['n']} to n={s0[-1]['n']} (got {lr_m})": c2,
              f"3. at m={s0[0]['m_few']}: LR error >= 0.2 for n >= 100, NB error <= 0.01": c3,
              "4. probe: NB error <= LR error at every m <= 3K (few-shot)": c4,
              "5. probe: m_2%(NB) <= m_2%(LR) (NB converges no later)": c5}
    text = ("NB needs O(log n) samples to reach its asymptote and LR O(n) (Gaussian mixtures); on network features "
            "NB is as good as LR few-shot and converges no later (all checks below)")
    return {"text": text, "passed": all(checks.values()), "checks": checks}

if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
