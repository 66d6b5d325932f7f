"""More is Better in Modern Machine Learning: when Infinite Overparameterization is Optimal and Overfitting is
Obligatory (Simon, Karkada, Ghosh, Belkin, ICLR 2024)
arXiv:2311.14646 (sections below follow v4; equations are cited by section)  https://arxiv.org/abs/2311.14646
Official code: https://github.com/dkarkada/more-is-better (theory.py: rf_krr_risk_theory, krr_risk_theory;
scripts/rf-gaussian.py, scripts/rf-cifar.py, scripts/opt-ridge.py)

The method in a few lines
    Random-feature (RF) ridge regression: k frozen random features g_j(x), kernel Khat = (1/k) G G^T, predictor
    fhat(x) = Khat(x, X) (Khat(X, X) + delta I_n)^{-1} y (delta is the unnormalised ridge). With kernel eigenvalues
    lambda_i and target eigencoefficients v_i, the paper's "omniscient risk estimate" (the RF eigenframework) predicts
    test and train MSE in closed form from two scalars (gamma, kappa). Every claim follows from it: at the optimal
    ridge, test risk falls monotonically with the number of features k AND of samples n (so infinite width, kernel
    ridge regression, is best); for power-law tasks (lambda_i ~ i^-alpha, v_i^2 ~ i^-beta) the optimal ridge is ~0
    and the train/test ratio at the optimum is << 1 ("overfitting is obligatory").

Reproduces (CPU scale): Gaussian RF on the paper's task alpha=1.2, beta=1.4 (M=2000 modes), grid n in 16..1024 x
k in 16..2048, 14 ridges, 6 draws (more at small n): the optimal-ridge test MSE never rises by > 5% along n or k,
the eigenframework overlays the measurements (median gap <= 10%, max <= 25% away from n = k); kernel regression on
power-law tasks (M = 10^4, n = 512) needs train MSE << test MSE at the optimum: delta* = 0 and R_tr* <= 0.02 at
(1.2, 1.4), R_tr* in [0.03, 0.25] and within 0.05 of theory at (2.0, 1.5), larger with label noise; ReLU RF on
sklearn's 8x8 digits with the exact arc-cosine kernel as theory input: k=4096 beats k=64 at n=256, theory within 20%.

Run:
  python methods/more_is_better.py                                  # default CPU preset (~1 min of CPU)
  python methods/more_is_better.py --preset smoke                   # seconds, same code path
  python methods/more_is_better.py --preset paper --device cuda     # M=10^4, n <= 4096, k <= 8192, 45 draws
  python methods/more_is_better.py --bench                          # per-ridge solves vs one eigh, theory loop
  python methods/more_is_better.py --data-dir cifar-10-batches-py   # real part on binarised CIFAR-10 instead of digits
  python methods/more_is_better.py --help

Expected (default preset, seed 0; 27 s on a quiet 2-core CPU, 2 threads):
  | metric (E* = test MSE at the best ridge)                      | method    | baseline | theory  | gap       | paper            |
  |---------------------------------------------------------------|-----------|----------|---------|-----------|------------------|
  | synth n=64: E*, RF k=2048 vs best k<=n/2                      | 0.2382    | 0.4914   | 0.2311  | 3.1%      | falls with k     |
  | synth n=64: E*, KRR (k=inf)                                   | 0.2299    | -        | 0.2228  | 3.2%      | best of all k    |
  | synth n=256: E*, RF k=2048 vs best k<=n/2                     | 0.1219    | 0.2494   | 0.1168  | 4.3%      | falls with k     |
  | synth n=256: E*, KRR (k=inf)                                  | 0.1053    | -        | 0.1011  | 4.2%      | best of all k    |
  | synth n=1024: E*, RF k=2048 vs best k<=n/2                    | 0.04843   | 0.1004   | 0.04778 | 1.4%      | falls with k     |
  | synth n=1024: E*, KRR (k=inf)                                 | 0.02744   | -        | 0.02701 | 1.6%      | best of all k    |
  | synth: |meas.-theory|/theory, |n-k|>=n/4: median, max         | 0.03822   | 0.1056   | -       | -         | overlays         |
  | KRR (1.2,1.4,0.0): R_tr at d*=0 (th. 0) vs R_tr~1/2           | 2.287e-32 | 0.4561   | 0       | 0.000 abs | << 1             |
  | KRR (1.2,1.4,0.0): E_te at d* vs at R_tr~1/2                  | 0.08941   | 0.1276   | 0.09041 | 1.1%      | lower at delta*  |
  | KRR (2.0,1.5,0.0): R_tr at d*=0.0018 (th. 0.0021) vs R_tr~1/2 | 0.05173   | 0.4724   | 0.0622  | 0.010 abs | card .095 n=1000 |
  | KRR (2.0,1.5,0.0): E_te at d* vs at R_tr~1/2                  | 0.05367   | 0.06484  | 0.05334 | 0.6%      | lower at delta*  |
  | KRR (1.5,1.3,0.0): R_tr at d*=0.032 (th. 0.027) vs R_tr~1/2   | 0.03008   | 0.4783   | 0.02349 | 0.007 abs | card .056 n=1000 |
  | KRR (1.5,1.3,0.0): E_te at d* vs at R_tr~1/2                  | 0.1449    | 0.1726   | 0.1455  | 0.4%      | lower at delta*  |
  | KRR (1.2,1.4,0.05): R_tr at d*=0.18 (th. 0.23) vs R_tr~1/2    | 0.01803   | 0.4486   | 0.02762 | 0.010 abs | << 1             |
  | KRR (1.2,1.4,0.05): E_te at d* vs at R_tr~1/2                 | 0.157     | 0.1815   | 0.1588  | 1.2%      | lower at delta*  |
  | KRR (2.0,1.5,0.05): R_tr at d*=0.018 (th. 0.014) vs R_tr~1/2  | 0.3593    | 0.4632   | 0.3216  | 0.038 abs | << 1             |
  | KRR (2.0,1.5,0.05): E_te at d* vs at R_tr~1/2                 | 0.1222    | 0.1241   | 0.1229  | 0.5%      | lower at delta*  |
  | digits n=64: E*, ReLU RF k=4096 vs best k<=n/2                | 0.4209    | 0.6365   | 0.4161  | 1.2%      | falls with k     |
  | digits n=64: E*, arc-cos KRR (k=inf)                          | 0.4131    | -        | 0.4136  | 0.1%      | best of all k    |
  | digits n=256: E*, ReLU RF k=4096 vs best k<=n/2               | 0.1615    | 0.3087   | 0.1439  | 12.2%     | falls with k     |
  | digits n=256: E*, arc-cos KRR (k=inf)                         | 0.1511    | -        | 0.1369  | 10.4%     | best of all k    |
  | digits KRR n=256: R_tr at d*=0.0001                           | 0.001423  | -        | -       | -         | << 1 (CNTKs)     |
  | digits kernel: fitted alpha, beta (modes 8-255)               | 1.987     | 1.748    | -       | -         | power laws       |

  CLAIM HOLDS: at optimal ridge, RF test risk falls with more features and more data and the eigenframework
    overlays it; on power-law tasks the optimal kernel regressor nearly interpolates (all checks below)
    [x] 1a. optimal-ridge test MSE never rises > 5% along n or k (worst step x1.015)
    [x] 1b. E*(n=256, k=2048) <= 0.6 E*(k=16) (ratio 0.23)
    [x] 1c. eigenframework optimal-ridge curves strictly decreasing in n and in k
    [x] 2. theory gap, |n-k|>=n/4: median 0.038 <= 0.10 and max 0.106 <= 0.25
    [x] 3a. KRR (1.2, 1.4): delta* = smallest ridge, R_tr* <= 0.02 at grid n >= 64 (max 3.3e-32) and for (1.2, 1.4, 0) at n=512
    [x] 3b. (2.0, 1.5): R_tr* in [0.03, 0.25], within 0.05 of theory (0.052 vs theory 0.062)
    [x] 3c. label noise raises R_tr* (0.018 > 0.000, 0.359 > 0.052)
    [x] 4. digits n=256: E*(k=4096) 0.1615 <= E*(k=64) 0.3958; theory gap at opt. delta max 0.152 <= 0.20
  Seeds 1 and 2 (same computation, also CLAIM HOLDS): worst optimal-ridge step x0.995 / x1.032; theory gap median 0.017 /
  0.017, max 0.080 / 0.117; (2.0, 1.5) R_tr* 0.052 / 0.051 vs theory 0.062; digits n=256 E*(k=4096) 0.149 / 0.145
  vs E*(k=64) 0.411 / 0.426, max theory gap 0.153 / 0.157. The same seed in two processes gives identical JSON.

Implementation details:
  1. Eigenframework (Sec. 4, official rf_krr_risk_theory). With L_i = lambda_i/(lambda_i+gamma), z = sum_i L_i,
     q = sum_i L_i^2, the pair (gamma, kappa) solves n = z + delta/kappa and k = z + k kappa/gamma. Eliminating
     kappa = gamma (1 - z/k) leaves one increasing equation gamma (1 - z/k)(n - z) = delta on z < min(n, k), solved
     by bisection on log gamma, vectorised over every (n, k, delta) cell; delta = 0 lands on z = min(n, k).
     E_te = E0 [sum_i ((1-L_i) - kappa k/(k-q) L_i/(lambda_i+gamma)) v_i^2 + sigma^2],
     E0 = 1/(1 - (q (k-2z) + z^2)/(n (k-q))), E_tr = (delta/(n kappa))^2 E_te = (1 - z/n)^2 E_te. k = inf is KRR
     (Sec. 3): gamma = kappa, E0 = n/(n - q), bias (1 - L_i)^2. `rf_theory_reference` is the same, cell by cell
     with scipy's brentq, written as the paper writes it; the tests check both equations and the KRR limit.
  2. Synthetic task (official rf-gaussian.py): x ~ N(0, I_M), lambda_i = i^-alpha, v_i = sqrt(i^-beta)/norm,
     y = x.v + sigma xi; features g = Z diag(sqrt(lambda)) x with Z ~ N(0,1)^{k x M}, scaled by 1/sqrt(k) in the
     kernel. The RF predictor is linear in x, f(x) = x.b, so its test MSE is exact: ||b - v||^2 + sigma^2.
  3. One eigendecomposition of the n x n Gram per (n, k, draw); every ridge then costs a broadcast (the fast path,
     checked against one solve per ridge). delta = 0 is the min-norm (pseudo-inverse) interpolant.
  4. Features are drawn once per draw for the largest k and n; smaller k / n take column / row prefixes. MSEs are
     averaged over draws BEFORE the minimum over ridges is taken. n < 256 gets 6 * 256/n draws (cheap cells whose
     ridgeless risk near n = k is heavy-tailed: with 6 draws one n = 16 cell was 30% off, 300 draws put it at 2%).
  5. Real data: sklearn digits scaled to [0, 1], labels {0,1,7,8,9} -> +1 else -1 (the paper's CIFAR binarisation),
     ReLU RF relu(w.x) with w ~ N(0, 2/d I). Theory input: the exact arc-cosine kernel
     K(x,x') = |x||x'|/(pi d) [sin t + (pi - t) cos t] on the whole pool, lambda_i = eig(K)/N, v_i = u_i.y/sqrt(N).
     Training points are drawn from the pool; test MSE is the average over the WHOLE pool (= the population
     measure the theory describes); the held-out-only MSE is saved too.
  6. Overfitting (Sec. 5): kernel regression (k = inf) on power-law tasks at n = 512 over a fine ridge grid; delta* =
     argmin of the draw-averaged test MSE, R_tr* = E_tr/E_te there. Baseline: the "keep train close to test" ridge,
     the grid ridge whose R_tr is nearest 1/2. Theory optima: log grid, golden section on log delta, and delta = 0.
  7. Equation numbers are not cited: the paper's numbered text could not be retrieved here; sections are cited.

Deviations from the paper:
  1. CPU scale: M = 2000 modes (paper 10^4), n <= 1024, k <= 2048, 6 draws (paper 45), 14 ridges (paper 31);
     `--preset paper` restores M = 10^4, 31 ridges, 45 draws.
  2. Synthetic test MSE is the exact population risk of the linear predictor, not a 1000-point test sample.
  3. Real data: sklearn's 8x8 digits (1797 images) with a one-hidden-layer ReLU RF instead of CIFAR-10 and Myrtle
     CNTKs; `--data-dir` reads the CIFAR-10 python batches (first --pool-size images, default 10000) instead.
  4. Real-data test MSE is the average over the whole pool (training points included), the population measure of
     the theory, instead of the held-out part only; training points are drawn without replacement.
  5. The card asked for delta* = smallest ridge and R_tr* <= 0.02 for RF at k >= 4n. The eigenframework itself
     says otherwise for finite k (n=256, k=1024: delta* = 0.31, R_tr* = 0.063; delta* = 0 only from k ~ 16n on),
     and the measurements agree; the paper's obligatory-overfitting statement (Sec. 5) is about KRR, so check 3a
     is made on KRR (k = inf) at every n >= 64 of the grid and at n = 512.
  6. Overfitting tasks use M = 10^4 modes and n = 512 (card: n = 1000, M unstated). R_tr* depends on the
     truncation: (2.0, 1.5) at n = 512 gives 0.017 (M=2000), 0.062 (M=10^4), 0.086 (M=4*10^4) in theory.
  7. More draws at small n (implementation detail 4); the paper uses 45 draws everywhere.
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

try:  # shared.py (seeding, CLI, tables) sits beside this file when copied, one level up in the repository
    import shared
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shared

SLUG = "more_is_better"
PAPER = ("More is Better in Modern Machine Learning: when Infinite Overparameterization is Optimal and Overfitting "
         "is Obligatory")
ARXIV = "2311.14646"
DT = torch.float64  # everything in float64: ridges down to 1e-6 on Grams with eigenvalues down to 1e-7
POSITIVE = (0, 1, 7, 8, 9)  # the paper's CIFAR-10 binarisation, reused for the digits


# ---- 0. Arguments ----------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """Random-feature ridge regression vs the eigenframework: more features, more data, and obligatory overfitting."""

    preset: str = "default"
    """name of the preset (set by --preset); names the output files"""
    seed: int = 0
    """seed of the data, the random features and the training subsets"""
    device: str = "auto"
    """auto | cpu | cuda"""
    compile: bool = False
    """wrap the vectorised eigenframework solver in torch.compile"""
    bench: bool = False
    """only time per-ridge solves vs one eigh, and the loop vs vectorised eigenframework"""
    out_dir: str = "runs"
    """where the JSON and the figure go"""
    data_dir: Optional[str] = None
    """folder with the CIFAR-10 python batches (data_batch_1..5, test_batch); replaces the digits"""
    # part A: Gaussian RF on a power-law task (official rf-gaussian.py)
    # DEVIATION 1: CPU scale -- M = 2000 modes, n <= 1024, k <= 2048, 14 ridges, 6 draws (paper 10^4, 31, 45)
    modes: int = 2000
    """M, the number of kernel eigenmodes of the synthetic task"""
    alpha: float = 1.2
    """eigenvalue exponent of the grid task: lambda_i = i^-alpha"""
    beta: float = 1.4
    """target exponent of the grid task: v_i^2 ~ i^-beta"""
    noise: float = 0.0
    """label-noise variance sigma^2 of the grid task"""
    ns: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    """training-set sizes n of the grid"""
    ks: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    """numbers of random features k of the grid"""
    ridges: tuple[float, ...] = tuple(float(r) for r in np.logspace(-4, 2, 13))
    """positive ridges delta of the grids (delta = 0, the min-norm interpolant, is always added)"""
    trials: int = 6
    """independent draws of data and features per grid cell (at n >= --trials-boost-n)"""
    # DEVIATION 7: more draws at small n (heavy-tailed ridgeless risk near n = k); the paper uses 45 everywhere
    trials_boost_n: int = 256
    """n below this get trials * trials_boost_n / n draws: small-n cells are cheap and their risk is heavy-tailed"""
    fixed_n: int = 256
    """n of the k-sweep drawn in the figure (one of --ns)"""
    fixed_k: int = 256
    """k of the n-sweep drawn in the figure (one of --ks)"""
    theory_points: int = 60
    """points of each theory curve in the figure"""
    # part B: overfitting on power-law tasks (Sec. 5), kernel regression
    tasks: tuple[str, ...] = ("1.2:1.4:0", "2.0:1.5:0", "1.5:1.3:0", "1.2:1.4:0.05", "2.0:1.5:0.05")
    """power-law tasks alpha:beta:sigma^2 of the overfitting table"""
    sweep_alpha: float = 1.5
    """alpha of the exponent sweep (figure: optimal ridge and R_tr* vs beta)"""
    sweep_betas: tuple[float, ...] = (1.1, 1.3, 1.5, 1.8, 2.2, 3.0)
    """betas of the exponent sweep measured empirically"""
    overfit_n: int = 512
    """training-set size of the overfitting experiments"""
    overfit_trials: int = 8
    """trials of the overfitting experiments"""
    # DEVIATION 6: overfitting tasks at n = 512 with M = 10^4 modes (card: n = 1000, M unstated)
    overfit_modes: int = 10_000
    """M of the overfitting experiments (the target's tail beyond M matters for R_tr*)"""
    fine_ridges: tuple[float, ...] = tuple(float(r) for r in np.logspace(-6, 2, 33))
    """ridge grid of the overfitting experiments (delta = 0 added)"""
    # part C: ReLU RF on real images, exact arc-cosine kernel as theory input
    real: bool = True
    """run the real-data part (digits, or CIFAR-10 with --data-dir)"""
    real_ns: tuple[int, ...] = (64, 256)
    """training-set sizes of the real-data part"""
    real_ks: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    """numbers of ReLU random features of the real-data part"""
    real_trials: int = 6
    """trials (feature draws and training subsets) of the real-data part"""
    pool_size: int = 0
    """images in the pool (0: all 1797 digits, or 10000 CIFAR-10 images with --data-dir)"""


PRESETS = {
    "smoke": Args(preset="smoke", modes=300, ns=(16, 32, 64), ks=(16, 32, 64, 128), ridges=(1e-3, 1e-1, 10.0),
                  trials=1, trials_boost_n=0, fixed_n=32, fixed_k=32, theory_points=10,
                  tasks=("1.2:1.4:0", "2.0:1.5:0.05"), sweep_betas=(1.3, 2.0), overfit_n=64, overfit_trials=2,
                  overfit_modes=400, fine_ridges=(1e-4, 1e-2, 1.0),
                  real_ns=(32,), real_ks=(16, 128), real_trials=1, pool_size=300),
    "paper": Args(preset="paper", modes=10_000, ns=tuple(2**i for i in range(4, 13)),
                  ks=tuple(2**i for i in range(4, 14)), ridges=tuple(float(r) for r in np.logspace(-3, 2, 31)),
                  trials=45, trials_boost_n=0, theory_points=120, overfit_n=4096, overfit_trials=20,
                  overfit_modes=100_000,
                  real_ks=tuple(2**i for i in range(4, 15)), real_trials=15),
}


def parse_task(text: str) -> tuple[float, float, float]:
    """'alpha:beta:sigma2' -> three floats."""
    try:
        a, b, s = (float(p) for p in text.split(":"))
    except ValueError:
        raise shared.UsageError(f"task {text!r} must read alpha:beta:sigma2, e.g. 1.2:1.4:0.") from None
    return a, b, s


def validate(args: Args) -> None:
    """Stop with one sentence on a bad argument (shared.run turns it into `error: ...` and exit status 2)."""
    for name in ("ns", "ks", "real_ns", "real_ks"):
        v = getattr(args, name)
        if not v or min(v) < 2 or list(v) != sorted(set(v)):
            raise shared.UsageError(f"--{name.replace('_', '-')} must be increasing integers >= 2.")
    if args.modes <= max(args.ns) or args.overfit_modes <= args.overfit_n:
        raise shared.UsageError("--modes must exceed every --ns and --overfit-modes must exceed --overfit-n "
                                "(the eigenframework needs n < M).")
    if args.fixed_n not in args.ns or args.fixed_k not in args.ks:
        raise shared.UsageError("--fixed-n must be one of --ns and --fixed-k one of --ks.")
    if min(args.ks) > args.fixed_n // 2 or min(args.real_ks) > max(args.real_ns) // 2:
        raise shared.UsageError("--ks (--real-ks) needs a k <= n/2 for the underparameterised baseline at --fixed-n "
                                "(the largest --real-ns).")
    if min(args.ridges) <= 0 or min(args.fine_ridges) <= 0:
        raise shared.UsageError("--ridges and --fine-ridges must be positive (delta = 0 is always added).")
    if min(args.trials, args.overfit_trials, args.real_trials) < 1 or args.theory_points < 2:
        raise shared.UsageError("--trials, --overfit-trials and --real-trials must be >= 1, --theory-points >= 2.")
    for a, b, s in [(args.alpha, args.beta, args.noise), *map(parse_task, args.tasks),
                    *[(args.sweep_alpha, b, 0.0) for b in args.sweep_betas]]:
        if a <= 1 or b <= 1 or s < 0:
            raise shared.UsageError(f"power-law task ({a}, {b}, {s}) needs alpha > 1, beta > 1 and sigma^2 >= 0.")
    if args.overfit_n < 2 or args.pool_size < 0 or args.trials_boost_n < 0:
        raise shared.UsageError("--overfit-n must be >= 2, --pool-size and --trials-boost-n >= 0.")


# ---- 1. The eigenframework: the paper's omniscient risk estimate (Sec. 4; KRR limit Sec. 3) -----------------------
def power_law(alpha: float, beta: float, M: int, device: torch.device) -> tuple:
    """lambda_i = i^-alpha and v_i^2 = i^-beta / sum_j j^-beta (||v|| = 1, official rf-gaussian.py)."""
    i = torch.arange(1, M + 1, dtype=DT, device=device)  # (M,)
    v2 = i**-beta
    return i**-alpha, v2 / v2.sum()


def _bisect_log(fn, lo: torch.Tensor, hi: torch.Tensor, iters: int) -> torch.Tensor:
    """Root of fn(exp(u)), increasing in u, for every cell at once: plain bisection on u = log(gamma)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        up = fn(mid.exp()) > 0
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    return ((lo + hi) / 2).exp()


def rf_theory(lam, v2, n, k, delta, noise, iters: int = 64) -> dict:
    """Eigenframework test/train MSE of RF ridge regression for every cell (n, k, delta) (all (C,); k = inf is KRR)."""
    lam = lam[None]  # (1, M)
    n, k, delta = n[:, None], k[:, None], delta[:, None]  # (C, 1)

    def z_of(gamma):  # z(gamma) = sum_i lambda_i/(lambda_i + gamma), decreasing in gamma
        return (lam / (lam + gamma)).sum(-1, keepdim=True)  # (C, 1)

    lo = torch.full_like(n, math.log(1e-30))
    hi = torch.full_like(n, math.log(1e15))
    # gamma_0: z(gamma_0) = min(n, k), the boundary of the admissible region (the ridgeless solution)
    gamma0 = _bisect_log(lambda g: torch.minimum(n, k) - z_of(g), lo, hi, iters)
    # n = z + delta/kappa and k = z + k kappa/gamma  =>  kappa = gamma (1 - z/k),  gamma (1 - z/k)(n - z) = delta
    def excess(g):  # increasing in gamma on z < min(n, k); zero at the solution
        z = z_of(g)
        return g * (1 - z / k) * (n - z) - delta

    gamma = _bisect_log(excess, gamma0.log(), hi, iters)  # NOTE: 64 halvings of [1e-30, 1e15] reach float64 precision
    L = lam / (lam + gamma)  # (C, M): the eigenlearnabilities
    z, q = L.sum(-1, keepdim=True), (L * L).sum(-1, keepdim=True)  # (C, 1)
    kappa = gamma * (1 - z / k)
    # E0 = 1 / (1 - (q (k - 2z) + z^2) / (n (k - q))), written with z/k, q/k so that k = inf gives n / (n - q)
    x = (q * (1 - 2 * z / k) + z * z / k) / (n * (1 - q / k))
    e0 = torch.where(1 - x > 1e-12, 1 / (1 - x), torch.full_like(x, math.inf))  # n = k at delta = 0 diverges
    # bias coefficient (1 - L_i) - kappa k/(k - q) L_i/(lambda_i + gamma); k = inf gives (1 - L_i)^2
    bias = (1 - L) - kappa / (1 - q / k) * L / (lam + gamma)  # (C, M)
    v2 = v2 if v2.dim() == 2 else v2[None]  # (C, M) per-cell targets, or (1, M) shared
    test = e0 * ((bias * v2).sum(-1, keepdim=True) + noise)
    ratio = (1 - z / n) ** 2  # E_tr / E_te = (delta / (n kappa))^2 = ((n - z)/n)^2 by the first equation
    return {"test": test[:, 0], "train": (ratio * test)[:, 0], "ratio": ratio[:, 0], "gamma": gamma[:, 0],
            "kappa": kappa[:, 0], "z": z[:, 0]}


def theory_cells(solver, lam, v2, n, k, delta, noise, chunk: int = 4096) -> dict:
    """rf_theory over many cells, in chunks (memory C x M). v2 is (M,) or one row per cell (C, M)."""
    device = lam.device
    n, k, delta = (torch.as_tensor(a, dtype=DT, device=device).flatten() for a in np.broadcast_arrays(n, k, delta))
    rows = (lambda i: v2[i : i + chunk]) if v2.dim() == 2 else (lambda i: v2)  # noqa: E731
    parts = [solver(lam, rows(i), n[i : i + chunk], k[i : i + chunk], delta[i : i + chunk], noise)
             for i in range(0, len(n), chunk)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def theory_optimum(solver, lam, v2, n, k, noise, iters: int = 16) -> dict:
    """min over delta >= 0 of the theory test MSE per (n, k): log-grid, then golden section, then compare delta = 0.
    v2 is (M,) or one target per cell (C, M)."""
    n, k = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(k, dtype=float))
    grid = np.logspace(-8, 4, 25)
    v2_grid = v2.repeat_interleave(len(grid), 0) if v2.dim() == 2 else v2
    t = theory_cells(solver, lam, v2_grid, n[:, None], k[:, None], grid[None], noise)["test"].reshape(len(n), -1)
    best = t.argmin(1).cpu().numpy()
    lo, hi = np.log(grid[np.maximum(best - 1, 0)]), np.log(grid[np.minimum(best + 1, len(grid) - 1)])
    r = (math.sqrt(5) - 1) / 2
    v2_two = torch.cat([v2, v2]) if v2.dim() == 2 else v2
    for _ in range(iters):  # golden-section search on log(delta) inside the bracketing grid cells (0.618^16 ~ 5e-4)
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        t = theory_cells(solver, lam, v2_two, np.r_[n, n], np.r_[k, k], np.exp(np.r_[a, b]), noise)["test"]
        ta, tb = t.cpu().numpy()[: len(n)], t.cpu().numpy()[len(n) :]
        hi, lo = np.where(ta < tb, b, hi), np.where(ta < tb, lo, a)
    d_star = np.exp((lo + hi) / 2)
    pos = theory_cells(solver, lam, v2, n, k, d_star, noise)
    zero = theory_cells(solver, lam, v2, n, k, 0.0, noise)
    use0 = (zero["test"] <= pos["test"]).cpu().numpy()
    pick = lambda key: np.where(use0, zero[key].cpu().numpy(), pos[key].cpu().numpy())  # noqa: E731
    return {"test": pick("test"), "ratio": pick("ratio"), "delta": np.where(use0, 0.0, d_star)}


# ---- 2. Ridge regression for all ridges at once (the fast path) and one solve per ridge (the reference) --------------
def ridge_sweep(K: torch.Tensor, y: torch.Tensor, ridges: torch.Tensor, eig: Optional[tuple] = None) -> tuple:
    """alpha(delta) = (K + delta I)^{-1} y for every delta (0 -> pseudo-inverse) from ONE eigh; and the train MSE.
    `eig` = (e, U) reuses a decomposition of K (several targets on the same inputs)."""
    e, U = torch.linalg.eigh(K) if eig is None else eig  # (n,), (n, n)
    c = U.T @ y  # (n,): y in the eigenbasis of K
    keep = e > e.max() * len(e) * torch.finfo(DT).eps  # numerically non-zero eigenvalues (pinv convention)
    inv0 = torch.where(keep, 1 / torch.where(keep, e, 1.0), 0.0)  # (n,): ridgeless = pseudo-inverse
    g = torch.where(ridges[None] > 0, 1 / (e[:, None] + ridges[None]), inv0[:, None])  # (n, D)
    alpha = U @ (g * c[:, None])  # (n, D)
    train = ((c[:, None] * (1 - e[:, None] * g)) ** 2).mean(0)  # (D,): y - K alpha = U (1 - e g) c
    return alpha, train


def ridge_sweep_reference(K: torch.Tensor, y: torch.Tensor, ridges: torch.Tensor) -> tuple:
    """The formula as written, one linear solve per ridge."""
    n = len(y)
    rtol = n * torch.finfo(DT).eps
    alphas = [torch.linalg.solve(K + d * torch.eye(n, dtype=DT, device=K.device), y) if d > 0
              else torch.linalg.pinv(K, rtol=rtol, hermitian=True) @ y for d in ridges.tolist()]
    alpha = torch.stack(alphas, 1)  # (n, D)
    return alpha, ((K @ alpha - y[:, None]) ** 2).mean(0)


# ---- 3. Part A: Gaussian random features on a power-law task ---------------------------------------------------------
def gaussian_rf_grid(args: Args, device: torch.device, lam, v2, noise: float) -> dict:
    """Trial-averaged train/test MSE over ns x ks x ridges, plus KRR (k = inf) per n. Shapes (N, K, D), (N, D)."""
    M, ns, ks = len(lam), args.ns, args.ks
    ridges = torch.tensor((0.0, *args.ridges), dtype=DT, device=device)  # (D,)
    v = v2.sqrt()  # (M,): the target's eigencoefficients (all positive, as in the official code)
    test = torch.zeros(len(ns), len(ks), len(ridges), dtype=DT, device=device)
    train = torch.zeros_like(test)
    krr_test, krr_train = test.new_zeros(len(ns), len(ridges)), test.new_zeros(len(ns), len(ridges))  # (N, D)
    T = np.array([max(args.trials, round(args.trials * args.trials_boost_n / n)) for n in ns])  # draws per n
    progress, done = shared.Progress("gaussian RF grid", int(T.sum())), 0
    for t in range(int(T.max())):
        rng = np.random.default_rng([args.seed, 1, t])
        n_t = max(n for n, T_n in zip(ns, T) if T_n > t)  # the largest n still drawing at trial t
        X = torch.from_numpy(rng.standard_normal((n_t, M))).to(device)  # (n_t, M): x ~ N(0, I_M)
        Z = torch.from_numpy(rng.standard_normal((max(ks), M))).to(device)  # (k_max, M): feature directions
        y = X @ v + math.sqrt(noise) * torch.from_numpy(rng.standard_normal(n_t)).to(device)  # (n_t,)
        phi = (X * lam.sqrt()) @ Z.T  # (n_t, k_max): g_j(x) = sum_i sqrt(lambda_i) z_ji x_i, unscaled
        for a, n in enumerate(ns):  # NOTE: n and k are prefixes of one draw; the rows and columns are iid
            if T[a] <= t:
                continue
            for b, k in enumerate(ks):
                F = phi[:n, :k]  # (n, k)
                alpha, tr = ridge_sweep(F @ F.T / k, y[:n], ridges)  # Khat = G G^T / k, (n, D)
                # f(x) = Khat(x, X) alpha = x . coef with coef = diag(sqrt(lambda)) Z_k^T F^T alpha / k
                coef = lam.sqrt()[:, None] * (Z[:k].T @ (F.T @ alpha)) / k  # (M, D)
                # DEVIATION 2: exact population test MSE of the linear predictor, not a 1000-point test sample
                test[a, b] += (((coef - v[:, None]) ** 2).sum(0) + noise) / T[a]  # exact population MSE
                train[a, b] += tr / T[a]
            alpha, tr = ridge_sweep((X[:n] * lam) @ X[:n].T, y[:n], ridges)  # KRR: K(x, x') = sum lambda_i x_i x'_i
            coef = lam[:, None] * (X[:n].T @ alpha)  # (M, D)
            krr_test[a] += (((coef - v[:, None]) ** 2).sum(0) + noise) / T[a]
            krr_train[a] += tr / T[a]
            done += 1
            progress.update(done, n=n)
    return {"ridges": ridges, "test": test, "train": train, "krr_test": krr_test, "krr_train": krr_train,
            "draws": T.tolist()}


def power_law_overfit(args: Args, device: torch.device, tasks: list[tuple]) -> list[dict]:
    """Kernel regression (k = inf) on power-law tasks: trial-averaged train/test MSE over the fine ridge grid."""
    ridges = torch.tensor((0.0, *args.fine_ridges), dtype=DT, device=device)  # (D,)
    n, M = args.overfit_n, args.overfit_modes
    out = [{"task": tk, "ridges": ridges, "test": torch.zeros(len(ridges), dtype=DT, device=device),
            "train": torch.zeros(len(ridges), dtype=DT, device=device)} for tk in tasks]
    progress = shared.Progress("power-law KRR", args.overfit_trials)
    for t in range(args.overfit_trials):
        rng = np.random.default_rng([args.seed, 3, t])  # the same x's serve every task (common random numbers)
        X = torch.from_numpy(rng.standard_normal((n, M))).to(device)  # (n, M)
        xi = torch.from_numpy(rng.standard_normal(n)).to(device)  # (n,)
        for alpha in sorted({tk[0] for tk in tasks}):  # the Gram depends on alpha only: one eigh per alpha
            lam = power_law(alpha, 2.0, M, device)[0]
            eig = torch.linalg.eigh((X * lam) @ X.T)  # K(x, x') = sum_i lambda_i x_i x'_i, (n, n)
            for o in (o for o in out if o["task"][0] == alpha):
                _, b, s = o["task"]
                v = power_law(alpha, b, M, device)[1].sqrt()  # (M,)
                alpha_, tr = ridge_sweep(None, X @ v + math.sqrt(s) * xi, ridges, eig)  # (n, D)
                coef = lam[:, None] * (X.T @ alpha_)  # (M, D): f(x) = x . coef
                o["test"] += (((coef - v[:, None]) ** 2).sum(0) + s) / args.overfit_trials  # exact population MSE
                o["train"] += tr / args.overfit_trials
        progress.update(t + 1)
    return out


def summarize_overfit(o: dict) -> dict:
    """delta*, R_tr* = E_tr/E_te at delta*, E_te at delta = 0 and at the ridge whose R_tr is nearest 1/2."""
    te, tr, r = o["test"].cpu().numpy(), o["train"].cpu().numpy(), o["ridges"].cpu().numpy()
    i = int(np.argmin(te))
    half = int(np.argmin(np.abs(np.log(np.maximum(tr / te, 1e-300)) - math.log(0.5))))
    return {"delta": float(r[i]), "ratio": float(tr[i] / te[i]), "test": float(te[i]), "test_delta0": float(te[0]),
            "test_half": float(te[half]), "delta_half": float(r[half]), "ratio_half": float(tr[half] / te[half]),
            "smallest": i <= 1}


# ---- 4. Part C: ReLU random features on real images, exact arc-cosine kernel -----------------------------------------
def arccos_kernel(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """E_w[relu(w.a) relu(w.b)], w ~ N(0, 2/d I): |a||b|/(pi d) [sin t + (pi - t) cos t], t = angle(a, b)."""
    d = A.shape[1]
    na, nb = A.norm(dim=1).clamp_min(1e-12), B.norm(dim=1).clamp_min(1e-12)  # (Na,), (Nb,)
    cos = ((A @ B.T) / (na[:, None] * nb[None])).clamp(-1, 1)  # (Na, Nb)
    t = torch.arccos(cos)
    return na[:, None] * nb[None] / (math.pi * d) * (torch.sin(t) + (math.pi - t) * cos)


# DEVIATION 3: sklearn's digits with a one-layer ReLU RF / arc-cosine kernel instead of CIFAR-10 and Myrtle CNTKs
def load_digits_pool(args: Args, device: torch.device) -> tuple:
    """sklearn's 8x8 digits in [0, 1], labels +-1 by the paper's binarisation; the first --pool-size images."""
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    x, label = load_digits(return_X_y=True)  # (1797, 64) in [0, 16]
    N = args.pool_size or len(x)
    if N > len(x):
        raise shared.UsageError(f"--pool-size {N} exceeds the {len(x)} digits images.")
    y = np.where(np.isin(label, POSITIVE), 1.0, -1.0)
    return torch.tensor(x[:N] / 16.0, dtype=DT, device=device), torch.tensor(y[:N], dtype=DT, device=device)


def load_cifar_pool(args: Args, device: torch.device) -> tuple:
    """CIFAR-10 python batches: first --pool-size images (default 10000), flattened, per-image mean removed, +-1."""
    folder = Path(args.data_dir)
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    files = [f for f in files if f.is_file()]
    if not files:
        raise shared.UsageError(f"no CIFAR-10 batches (data_batch_1..5, test_batch) in {folder}.")
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")  # NOTE: the official format is a pickle; trust your files
            data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        except Exception as e:  # not a pickle, or no b"data" / b"labels"
            raise shared.UsageError(f"cannot read {f} as a CIFAR-10 python batch ({type(e).__name__}).") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or len(data) == 0:
            raise shared.UsageError(f"{f} must hold data (N, 3072) and N labels, got {data.shape}, {labels.shape}.")
        if not (np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() <= 9):
            raise shared.UsageError(f"{f} has labels outside the integers 0..9.")
        xs.append(data.astype(np.float64) / 255.0)
        ys.append(labels)
    x, label = np.concatenate(xs), np.concatenate(ys)
    N = min(args.pool_size or 10_000, len(x))
    x = x[:N] - x[:N].mean(1, keepdims=True)  # per-image mean removed (card)
    y = np.where(np.isin(label[:N], POSITIVE), 1.0, -1.0)
    return torch.tensor(x, dtype=DT, device=device), torch.tensor(y, dtype=DT, device=device)


def eigenstructure(K: torch.Tensor, y: torch.Tensor) -> tuple:
    """Population eigenvalues lambda_i = eig(K)/N and target coefficients v_i = u_i.y/sqrt(N) on the pool measure."""
    N = len(y)
    e, U = torch.linalg.eigh(K)  # ascending
    e, U = e.flip(0).clamp_min(0), U.flip(1)
    return e / N, (U.T @ y) ** 2 / N  # (N,), (N,): sum v_i^2 = mean(y^2)


def real_rf_grid(args: Args, device: torch.device, X: torch.Tensor, y: torch.Tensor, Kpool: torch.Tensor) -> dict:
    """ReLU RF and exact-kernel KRR on training subsets of the pool; MSE over the whole pool and over the rest."""
    N, d = X.shape
    ns, ks = args.real_ns, args.real_ks
    ridges = torch.tensor((0.0, *args.ridges), dtype=DT, device=device)
    shape = (len(ns), len(ks) + 1, len(ridges))  # last k slot: KRR (k = inf)
    acc = {key: torch.zeros(shape, dtype=DT, device=device) for key in ("test", "train", "heldout")}
    progress = shared.Progress("ReLU RF on real data", args.real_trials * len(ns))
    for t in range(args.real_trials):
        rng = np.random.default_rng([args.seed, 2, t])
        W = torch.from_numpy(rng.standard_normal((max(ks), d)) * math.sqrt(2 / d)).to(device)  # (k_max, d)
        feats = torch.relu(X @ W.T)  # (N, k_max)
        for a, n in enumerate(ns):
            idx = torch.from_numpy(rng.choice(N, n, replace=False)).to(device)  # training subset of the pool
            rest = torch.ones(N, dtype=torch.bool, device=device)
            rest[idx] = False
            for b, k in enumerate((*ks, None)):
                if k is None:  # k = inf: the exact arc-cosine kernel
                    alpha, tr = ridge_sweep(Kpool[idx][:, idx], y[idx], ridges)
                    pred = Kpool[:, idx] @ alpha  # (N, D)
                else:
                    F = feats[:, :k]  # (N, k)
                    alpha, tr = ridge_sweep(F[idx] @ F[idx].T / k, y[idx], ridges)  # (n, D)
                    pred = F @ (F[idx].T @ alpha) / k  # (N, D): Khat(pool, X) alpha
                err = (pred - y[:, None]) ** 2  # (N, D)
                # DEVIATION 4: test MSE over the whole pool (the population of the theory); held-out MSE kept beside it
                acc["test"][a, b] += err.mean(0) / args.real_trials
                acc["heldout"][a, b] += err[rest].mean(0) / args.real_trials
                acc["train"][a, b] += tr / args.real_trials
            progress.update(t * len(ns) + a + 1, n=n)
    return {"ridges": ridges, **acc}


def fit_exponents(lam: torch.Tensor, v2: torch.Tensor, lo: int = 8, hi: int = 256) -> tuple:
    """Power-law exponents of an eigenstructure: lambda_i ~ i^-alpha, tail sum_{j>=i} v_j^2 ~ i^-(beta-1)."""
    hi = min(hi, len(lam) // 2)  # small pools: stay clear of the numerically-zero end of the spectrum
    i = torch.arange(lo, hi, dtype=DT, device=lam.device)
    tail = v2.flip(0).cumsum(0).flip(0)  # sum_{j >= i} v_j^2
    slope = lambda f: float(np.polyfit(np.log(i.cpu().numpy()), np.log(f[lo - 1 : hi - 1].cpu().numpy()), 1)[0])  # noqa
    return -slope(lam.clamp_min(1e-300)), 1 - slope(tail.clamp_min(1e-300))


# ---- 5. Reference eigenframework (one cell at a time, scipy root finder) and the benchmark ------------------------
def rf_theory_reference(lam, v2, n, k, delta, noise) -> dict:
    """The eigenframework cell by cell in numpy: brentq on log(gamma), formulas exactly as the paper writes them."""
    from scipy.optimize import brentq

    lam, v2 = lam.cpu().numpy(), v2.cpu().numpy()
    rows = []
    for n_, k_, d_ in zip(*(np.asarray(a, dtype=float).tolist() for a in (n, k, delta))):
        z = lambda g: float(np.sum(lam / (lam + g)))  # noqa: E731
        one_minus = (lambda zz: 1.0) if math.isinf(k_) else (lambda zz: 1 - zz / k_)  # 1 - z/k  # noqa: E731
        lg0 = brentq(lambda u: z(math.exp(u)) - min(n_, k_), math.log(1e-30), math.log(1e15), xtol=1e-15)
        if d_ > 0:
            lg = brentq(lambda u: math.exp(u) * one_minus(z(math.exp(u))) * (n_ - z(math.exp(u))) - d_, lg0,
                        math.log(1e15), xtol=1e-15)
        else:
            lg = lg0
        g = math.exp(lg)
        L = lam / (lam + g)
        zz, q = float(L.sum()), float((L * L).sum())
        if math.isinf(k_):  # KRR: kappa = gamma, E0 = n/(n - q), bias (1 - L)^2
            kappa, e0, bias = g, n_ / (n_ - q), (1 - L) ** 2
        else:
            kappa = g * (1 - zz / k_)
            e0 = 1 / (1 - (q * (k_ - 2 * zz) + zz**2) / (n_ * (k_ - q)))
            bias = (1 - L) - kappa * L / (lam + g) * k_ / (k_ - q)
        test = e0 * (float(bias @ v2) + noise)
        ratio = (d_ / (n_ * kappa)) ** 2 if d_ > 0 else (1 - zz / n_) ** 2
        rows.append((test, ratio * test, ratio, g, kappa, zz))
    cols = np.array(rows).T
    return {key: torch.tensor(c, dtype=DT) for key, c in zip(("test", "train", "ratio", "gamma", "kappa", "z"), cols)}


def run_bench(args: Args, device: torch.device) -> list[dict]:
    """Reference vs fast path at the default's largest shapes, after checking that they agree."""
    rng = np.random.default_rng([args.seed, 9])
    lam, v2 = power_law(args.alpha, args.beta, args.modes, device)
    n, k = max(args.ns), max(args.ks)
    X = torch.from_numpy(rng.standard_normal((n, args.modes))).to(device)
    F = (X * lam.sqrt()) @ torch.from_numpy(rng.standard_normal((k, args.modes))).to(device).T  # (n, k)
    K, y = F @ F.T / k, X @ v2.sqrt()
    ridges = torch.tensor((0.0, *args.ridges), dtype=DT, device=device)
    fast, ref = ridge_sweep(K, y, ridges), ridge_sweep_reference(K, y, ridges)
    gap_a = ((fast[0] - ref[0]).norm(dim=0) / ref[0].norm(dim=0)).max().item()
    gap_t = ((fast[1] - ref[1]).abs().max() / (y * y).mean()).item()  # train MSE is ~0 at delta = 0: absolute
    print(f"checked: ridge sweep eigh-once vs per-ridge solve: max rel. gap alpha {gap_a:.1e}, "
          f"train MSE {gap_t:.1e} (of mean y^2)")
    if gap_a > 1e-6:
        raise RuntimeError(f"ridge sweep disagrees with the per-ridge solve: {gap_a:.2e}")
    cells = np.stack(np.meshgrid(args.ns, args.ks, ridges.cpu().numpy(), indexing="ij"), -1).reshape(-1, 3)
    cells = cells[np.abs(cells[:, 0] - cells[:, 1]) >= 0.25 * cells[:, 0]]
    sub = cells[np.random.default_rng(0).choice(len(cells), min(48, len(cells)), replace=False)]
    th_fast = theory_cells(rf_theory, lam, v2, sub[:, 0], sub[:, 1], sub[:, 2], args.noise)
    th_ref = rf_theory_reference(lam, v2, sub[:, 0], sub[:, 1], sub[:, 2], args.noise)
    gap = ((th_fast["test"].cpu() - th_ref["test"]).abs() / th_ref["test"]).max().item()
    print(f"checked: vectorised eigenframework vs brentq loop on {len(sub)} cells: max rel. gap {gap:.1e}")
    if gap > 1e-8:
        raise RuntimeError(f"vectorised eigenframework disagrees with the reference: {gap:.2e}")
    print("compiling the eigenframework solver with torch.compile (this takes a while) ...", flush=True)
    compiled = torch.compile(rf_theory)
    full = [torch.tensor(c, dtype=DT, device=device) for c in cells.T]
    torch.testing.assert_close(compiled(lam, v2, *full, args.noise)["test"],
                               rf_theory(lam, v2, *full, args.noise)["test"], rtol=1e-9, atol=0)
    t = lambda fn, reps=5: shared.benchmark(fn, device, warmup=1, repeats=reps)  # noqa: E731
    return [
        {"what": f"ridge sweep, {len(ridges)} ridges (n={n}, k={k}): solve per ridge vs eigh once",
         "reference_ms": t(lambda: ridge_sweep_reference(K, y, ridges)),
         "fused_ms": t(lambda: ridge_sweep(K, y, ridges))},
        {"what": f"eigenframework, {len(sub)} cells (M={args.modes}): brentq loop vs vectorised bisection",
         "reference_ms": t(lambda: rf_theory_reference(lam, v2, sub[:, 0], sub[:, 1], sub[:, 2], args.noise), 2),
         "fused_ms": t(lambda: theory_cells(rf_theory, lam, v2, sub[:, 0], sub[:, 1], sub[:, 2], args.noise))},
        {"what": f"eigenframework, {len(cells)} cells: eager vs compile",
         "reference_ms": t(lambda: rf_theory(lam, v2, *full, args.noise)),
         "fused_ms": t(lambda: compiled(lam, v2, *full, args.noise))},
    ]


# ---- 6. Figure: risk vs k and vs n with theory, real data, theory vs measured, and the overfitting panels ------------
def plot(path: Path, args: Args, A: dict, fig_curves: dict, real: Optional[dict], sweep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    r = A["ridges"].cpu().numpy()
    show = [0, len(r) // 2, len(r) - 3]  # three ridges: 0, a middle one, a large one
    for a_, (name, axis, emp, th) in enumerate(fig_curves["sweeps"]):
        p = ax[0, a_]
        for c, j in enumerate(show):
            p.plot(axis, emp[:, j], "o", color=f"C{c}", ms=4, label=f"RF measured, delta={r[j]:.3g}")
            p.plot(th["x"], th["test"][:, j], "-", color=f"C{c}", lw=1)
        p.plot(axis, emp.min(1), "s", color="k", ms=5, label="RF measured, optimal delta")
        p.plot(th["x"], th["opt"], "-", color="k", lw=1.5, label="eigenframework, optimal delta")
        p.axhline(th["krr"], color="k", ls="--", lw=1, label="KRR (k = inf), theory")
        p.set(xscale="log", yscale="log", xlabel=name.split()[-1], ylabel="test MSE (population)", title=name,
              ylim=(min(emp.min(), th["krr"]) * 0.8, 3))
        p.legend(fontsize=7)
    if real is not None:
        p = ax[0, 2]
        for c, (n, emp_opt, th_opt, krr) in enumerate(real["curves"]):
            p.plot(args.real_ks, emp_opt, "o", color=f"C{c}", label=f"ReLU RF measured, n={n}")
            p.plot(args.real_ks, th_opt, "-", color=f"C{c}", lw=1, label=f"eigenframework, n={n}")
            p.axhline(krr, color=f"C{c}", ls="--", lw=1)
        p.set(xscale="log", xlabel="k", ylabel="test MSE (pool), optimal delta", title=f"{real['name']}: ReLU RF")
        p.legend(fontsize=7)
    p = ax[1, 0]
    th, emp = fig_curves["parity"]
    p.loglog(th, emp, ".", ms=3)
    lim = [min(th.min(), emp.min()), max(th.max(), emp.max())]
    p.plot(lim, lim, "k-", lw=1)
    p.set(xlabel="eigenframework test MSE", ylabel="measured test MSE", title="all grid cells, |n - k| >= n/4")
    for p, key, label in ((ax[1, 1], "ratio", "train/test MSE at optimal delta"), (ax[1, 2], "delta", "optimal delta")):
        floor = 1e-7 if key == "delta" else 1e-6
        p.plot(sweep["betas_fine"], np.maximum(sweep["theory"][key], floor), "k-", lw=1.5, label="eigenframework (KRR)")
        p.plot(sweep["betas"], np.maximum(sweep["measured"][key], floor), "o", color="C3", label="KRR measured")
        p.axvline(args.sweep_alpha, color="gray", ls=":", lw=1, label="beta = alpha")
        p.set(yscale="log", xlabel="target exponent beta", ylabel=label + f" (floor {floor:g} = 0)",
              title=f"power law alpha={args.sweep_alpha}, n={args.overfit_n}")
        p.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- 7. Main: run, compare with theory, judge the card's criteria, print, save ---------------------------------------
def main(args: Args) -> dict:
    validate(args)
    device = shared.pick_device(args.device)
    if args.bench:
        return shared.save_bench(args, SLUG, device, run_bench(args, device))
    t0 = time.perf_counter()
    pool = (load_cifar_pool if args.data_dir else load_digits_pool)(args, device) if args.real else None  # fail fast
    solver = rf_theory
    if args.compile:
        print("compiling the eigenframework solver with torch.compile (this takes a while) ...", flush=True)
        solver = torch.compile(rf_theory)
    results, history = {m: {} for m in ("rf_wide", "rf_narrow", "krr", "eigenframework", "interpolating",
                                          "train_close_to_test")}, []

    # Part A: Gaussian RF grid on the power-law task, measured vs the eigenframework
    shared.seed_everything(args.seed)
    lam, v2 = power_law(args.alpha, args.beta, args.modes, device)
    A = gaussian_rf_grid(args, device, lam, v2, args.noise)
    ns, ks, r = np.array(args.ns), np.array(args.ks), A["ridges"].cpu().numpy()
    N, K, D = np.meshgrid(ns, ks, r, indexing="ij")
    th = theory_cells(solver, lam, v2, N, K, D, args.noise)["test"].reshape(N.shape).cpu().numpy()  # (N, K, D)
    th_krr = theory_cells(solver, lam, v2, ns[:, None], np.inf, r[None], args.noise)["test"].reshape(len(ns), -1)
    th_krr = th_krr.cpu().numpy()  # (N, D)
    emp, emp_tr = A["test"].cpu().numpy(), A["train"].cpu().numpy()
    krr, krr_tr = A["krr_test"].cpu().numpy(), A["krr_train"].cpu().numpy()
    far = np.abs(N - K) >= 0.25 * N  # away from the interpolation threshold n = k
    with np.errstate(invalid="ignore", divide="ignore"):  # n = k at delta = 0: theory is inf (never gated)
        gap = np.abs(emp - th) / th
    E, Eth = emp.min(-1), th.min(-1)  # (N, K): optimal ridge over the grid (trial-averaged first)
    for a, n in enumerate(ns):
        for b, k in enumerate(ks):
            history.append({"part": "gaussian_grid", "step": int(n), "k": int(k), "eval/test_opt": float(E[a, b]),
                            "theory/test_opt": float(Eth[a, b]), "eval/delta_opt": float(r[emp[a, b].argmin()])})
    # theory curves for the figure and the strict-monotonicity check (optimal delta, continuous search)
    P = args.theory_points
    kx = np.unique(np.geomspace(ks[0], ks[-1], P).round())
    nx = np.unique(np.geomspace(ns[0], ns[-1], P).round())
    a_n, b_k = list(ns).index(args.fixed_n), list(ks).index(args.fixed_k)
    sweeps = []
    for name, axis, emp_s, x, nn, kk in ((f"n = {args.fixed_n}, varying k", ks, emp[a_n], kx, args.fixed_n, kx),
                                        (f"k = {args.fixed_k}, varying n", ns, emp[:, b_k], nx, nx, args.fixed_k)):
        nn, kk = np.broadcast_arrays(np.asarray(nn, float), np.asarray(kk, float))
        curve = theory_cells(solver, lam, v2, nn[:, None], kk[:, None], r[None], args.noise)["test"]
        opt = theory_optimum(solver, lam, v2, nn, kk, args.noise)["test"]
        krr_th = float(theory_optimum(solver, lam, v2, [args.fixed_n], [np.inf], args.noise)["test"][0])
        sweeps.append((name, axis, emp_s, {"x": x, "test": curve.reshape(len(x), -1).cpu().numpy(), "opt": opt,
                                           "krr": krr_th if "varying k" in name else float("nan")}))
    mono_theory = all(bool(np.all(np.diff(s[3]["opt"]) < 0)) for s in sweeps)
    steps = np.concatenate([(E[:, 1:] / E[:, :-1]).ravel(), (E[1:] / E[:-1]).ravel()])
    worst_step = float(steps.max())
    fixed = E[a_n]
    ratio_k = float(fixed[-1] / fixed[0])

    # Part B: obligatory overfitting for kernel regression on power-law tasks
    tasks = list(dict.fromkeys([parse_task(t) for t in args.tasks] + [(args.sweep_alpha, b, 0.0)
                                                                        for b in args.sweep_betas]))
    emp_b = power_law_overfit(args, device, tasks)
    over = {}
    for o in emp_b:
        a_, b_, s_ = o["task"]
        lam_t, v2_t = power_law(a_, b_, args.overfit_modes, device)
        t_grid = theory_cells(solver, lam_t, v2_t, float(args.overfit_n), np.inf, o["ridges"].cpu().numpy(), s_)
        t_opt = theory_optimum(solver, lam_t, v2_t, [args.overfit_n], [np.inf], s_)
        over[o["task"]] = {"measured": summarize_overfit(o),
                           "theory_grid": summarize_overfit({**o, "test": t_grid["test"], "train": t_grid["train"]}),
                           "theory": {k_: float(v_[0]) for k_, v_ in t_opt.items()}}
    betas_fine = np.linspace(1.05, max(3.2, max(args.sweep_betas) + 0.2), 24)
    lam_s = power_law(args.sweep_alpha, 2.0, args.overfit_modes, device)[0]
    v2_s = torch.stack([power_law(args.sweep_alpha, b, args.overfit_modes, device)[1] for b in betas_fine])  # (B, M)
    sweep_opt = theory_optimum(solver, lam_s, v2_s, np.full(len(betas_fine), float(args.overfit_n)), np.inf, 0.0)
    sweep = {"betas_fine": betas_fine, "betas": np.array(args.sweep_betas),
             "theory": {k_: sweep_opt[k_] for k_ in ("ratio", "delta")},
             "measured": {k_: np.array([over[(args.sweep_alpha, b, 0.0)]["measured"][k_] for b in args.sweep_betas])
                          for k_ in ("ratio", "delta")}}

    # Part C: ReLU random features on real images, theory from the exact arc-cosine kernel
    real = None
    if pool is not None:
        X, y = pool
        Kpool = arccos_kernel(X, X)  # (N, N)
        lam_r, v2_r = eigenstructure(Kpool, y)
        a_fit, b_fit = fit_exponents(lam_r, v2_r)
        R = real_rf_grid(args, device, X, y, Kpool)
        rr = R["ridges"].cpu().numpy()
        kk = np.array([*args.real_ks, np.inf], dtype=float)
        Nr, Kr, Dr = np.meshgrid(np.array(args.real_ns, float), kk, rr, indexing="ij")
        th_r = theory_cells(solver, lam_r, v2_r, Nr, Kr, Dr, 0.0)["test"].reshape(Nr.shape).cpu().numpy()
        emp_r = R["test"].cpu().numpy()
        Er, Er_th = emp_r.min(-1), th_r.min(-1)  # (Nn, K+1)
        far_r = np.abs(Nr[..., 0] - Kr[..., 0]) >= 0.25 * Nr[..., 0]
        gap_r = np.abs(Er - Er_th) / Er_th
        i_krr = emp_r[-1, -1].argmin()
        real = {"name": "CIFAR-10" if args.data_dir else "digits", "alpha": a_fit, "beta": b_fit,
                "curves": [(n, Er[a, :-1], Er_th[a, :-1], Er_th[a, -1]) for a, n in enumerate(args.real_ns)],
                "E": Er, "E_th": Er_th, "gap_max": float(gap_r[far_r].max()),
                "krr_ratio": float(R["train"][-1, -1, i_krr] / emp_r[-1, -1, i_krr]), "krr_delta": float(rr[i_krr]),
                "heldout": R["heldout"].cpu().numpy().min(-1)}
        history += [{"part": "real", "step": int(n), "k": float(k), "eval/test_opt": float(Er[a, b]),
                     "theory/test_opt": float(Er_th[a, b])}
                    for a, n in enumerate(args.real_ns) for b, k in enumerate(kk)]

    claim = judge(args, E, emp, emp_tr, krr, krr_tr, gap, far, worst_step, ratio_k, mono_theory, over, real)
    rows = tabulate(args, results, E, Eth, krr, th_krr, gap, far, over, real)
    header = ["metric (E* = test MSE at the best ridge)", "method", "baseline", "theory", "gap", "paper"]
    shared.print_table(header, rows, claim)
    for check, ok in claim["checks"].items():
        print(f"  [{'x' if ok else ' '}] {check}")
    plot(shared.run_path(args, SLUG, ".png"), args, A, {"sweeps": sweeps, "parity": (th[far], emp[far])}, real, sweep)
    key = {"metric": f"synth/n{args.fixed_n}/test_mse_opt", "method": "rf_wide", "baseline": "rf_narrow",
           "higher_is_better": False}
    paper_numbers = {"note": "the paper reports curves: theory overlays RF experiments (n=256 / k=256 sweeps), the "
                             "optimal-ridge envelope falls in n and k; R_tr* << 1 for measured CNTK exponents",
                     "card_theory_R_tr_star_n1000": {"2.0:1.5:0": 0.095, "1.5:1.3:0": 0.056, "1.5:1.3:0.01": 0.074}}
    return shared.save_metrics(args, slug=SLUG, paper=PAPER, arxiv=ARXIV, results=results, key=key, claim=claim,
                               paper_numbers=paper_numbers, history=history, wall_s=time.perf_counter() - t0,
                               grid={"ns": list(args.ns), "ks": list(args.ks), "ridges": r.tolist(),
                                     "test": emp.tolist(), "theory": th.tolist(), "train": emp_tr.tolist()})


def tabulate(args, results, E, Eth, krr, th_krr, gap, far, over, real) -> list:
    """Fill `results` ({model: {metric: float}}) and return the printed rows."""
    rows, ks = [], np.array(args.ks)
    rel = lambda m, t: f"{abs(m - t) / t:.1%}" if np.isfinite(t) and t > 0 else "-"  # noqa: E731
    for a, n in enumerate(args.ns):
        narrow = ks <= n // 2
        wide, base = float(E[a, -1]), float(E[a, narrow].min()) if narrow.any() else "-"  # "-": no k <= n/2
        tag = f"synth/n{n}/test_mse_opt"
        results["rf_wide"][tag], results["krr"][tag] = wide, float(krr[a].min())
        if narrow.any():
            results["rf_narrow"][tag] = base
        results["eigenframework"][tag] = float(Eth[a, -1])
        results["eigenframework"][f"synth/n{n}/krr_test_mse_opt"] = float(th_krr[a].min())
        if n not in (args.ns[2 if len(args.ns) > 2 else 0], args.fixed_n, args.ns[-1]):
            continue  # every n is in the JSON; three are printed
        rows.append([f"synth n={n}: E*, RF k={ks[-1]} vs best k<=n/2", wide, base,
                     float(Eth[a, -1]), rel(wide, Eth[a, -1]), "falls with k"])
        rows.append([f"synth n={n}: E*, KRR (k=inf)", float(krr[a].min()), "-",
                     float(th_krr[a].min()), rel(krr[a].min(), th_krr[a].min()), "best of all k"])
    med, mx = float(np.median(gap[far])), float(gap[far].max())
    results["eigenframework"].update({"synth/gap_median": med, "synth/gap_max": mx})
    rows.append(["synth: |meas.-theory|/theory, |n-k|>=n/4: median, max", med, mx, "-", "-", "overlays"])
    for (a_, b_, s_), o in over.items():
        m_, t_ = o["measured"], o["theory"]
        tag = f"powerlaw_a{a_}_b{b_}_s{s_}"
        results["interpolating"].update({f"{tag}/R_tr": m_["ratio"], f"{tag}/test_mse": m_["test"],
                                         f"{tag}/delta": m_["delta"]})
        results["train_close_to_test"].update({f"{tag}/R_tr": m_["ratio_half"], f"{tag}/test_mse": m_["test_half"]})
        results["eigenframework"].update({f"{tag}/R_tr": t_["ratio"], f"{tag}/test_mse": t_["test"],
                                          f"{tag}/delta": t_["delta"]})
        if (a_, b_, s_) not in [parse_task(t) for t in args.tasks]:
            continue  # the exponent sweep goes to the figure and the JSON only
        paper = {(2.0, 1.5, 0.0): "card .095 n=1000", (1.5, 1.3, 0.0): "card .056 n=1000"}.get((a_, b_, s_), "<< 1")
        label = f"KRR ({a_},{b_},{s_})"
        rows += [[f"{label}: R_tr at d*={m_['delta']:.2g} (th. {t_['delta']:.2g}) vs R_tr~1/2",
                  m_["ratio"], m_["ratio_half"], t_["ratio"], f"{abs(m_['ratio'] - t_['ratio']):.3f} abs", paper],
                 [f"{label}: E_te at d* vs at R_tr~1/2", m_["test"], m_["test_half"], t_["test"],
                  rel(m_["test"], t_["test"]), "lower at delta*"]]
    if real is not None:
        name, rks = real["name"], np.array(args.real_ks)
        for a, n in enumerate(args.real_ns):
            narrow = rks <= n // 2
            wide, base = float(real["E"][a, -2]), float(real["E"][a, :-1][narrow].min()) if narrow.any() else "-"
            tag = f"{name}/n{n}/test_mse_opt"
            results["rf_wide"][tag] = wide
            if narrow.any():
                results["rf_narrow"][tag] = base
            results["krr"][tag], results["eigenframework"][tag] = float(real["E"][a, -1]), float(real["E_th"][a, -2])
            rows += [[f"{name} n={n}: E*, ReLU RF k={rks[-1]} vs best k<=n/2", wide, base,
                      float(real["E_th"][a, -2]), rel(wide, real["E_th"][a, -2]), "falls with k"],
                     [f"{name} n={n}: E*, arc-cos KRR (k=inf)", float(real["E"][a, -1]), "-",
                      float(real["E_th"][a, -1]), rel(real["E"][a, -1], real["E_th"][a, -1]), "best of all k"]]
        results["krr"].update({f"{name}/R_tr": real["krr_ratio"], f"{name}/delta": real["krr_delta"],
                               f"{name}/alpha_fit": real["alpha"], f"{name}/beta_fit": real["beta"]})
        rows += [[f"{name} KRR n={args.real_ns[-1]}: R_tr at d*={real['krr_delta']:.2g}",
                  real["krr_ratio"], "-", "-", "-", "<< 1 (CNTKs)"],
                 [f"{name} kernel: fitted alpha, beta (modes 8-255)", real["alpha"], real["beta"], "-", "-",
                  "power laws"]]
    return rows


def judge(args, E, emp, emp_tr, krr, krr_tr, gap, far, worst_step, ratio_k, mono_theory, over, real) -> dict:
    """The card's pass criteria (3a moved from RF at k >= 4n to KRR: see Deviations)."""
    med, mx = float(np.median(gap[far])), float(gap[far].max())
    ks = np.array(args.ks)
    i_krr = krr.argmin(-1)
    big = np.array(args.ns) >= 64
    r_krr = np.take_along_axis(krr_tr, i_krr[:, None], 1)[:, 0] / krr.min(-1)
    c3a = bool(big.any() and np.all(i_krr[big] <= 1) and np.all(r_krr[big] <= 0.02))
    t1 = over.get((1.2, 1.4, 0.0))
    c3a = c3a and t1 is not None and t1["measured"]["smallest"] and t1["measured"]["ratio"] <= 0.02
    t2 = over.get((2.0, 1.5, 0.0))
    c3b = t2 is not None and 0.03 <= t2["measured"]["ratio"] <= 0.25 and \
        abs(t2["measured"]["ratio"] - t2["theory"]["ratio"]) <= 0.05
    noisy = [(t, (t[0], t[1], 0.0)) for t in over if t[2] > 0 and (t[0], t[1], 0.0) in over]
    c3c = bool(noisy) and all(over[t]["measured"]["ratio"] > over[c]["measured"]["ratio"] for t, c in noisy)
    checks = {
        f"1a. optimal-ridge test MSE never rises > 5% along n or k (worst step x{worst_step:.3f})": worst_step <= 1.05,
        f"1b. E*(n={args.fixed_n}, k={ks[-1]}) <= 0.6 E*(k={ks[0]}) (ratio {ratio_k:.2f})": ratio_k <= 0.6,
        "1c. eigenframework optimal-ridge curves strictly decreasing in n and in k": mono_theory,
        f"2. theory gap, |n-k|>=n/4: median {med:.3f} <= 0.10 and max {mx:.3f} <= 0.25": med <= 0.10 and mx <= 0.25,
        # DEVIATION 5: check 3a on KRR (k = inf): at finite k the eigenframework itself puts delta* > 0 (docstring)
        f"3a. KRR ({args.alpha}, {args.beta}): delta* = smallest ridge, R_tr* <= 0.02 at grid n >= 64 (max "
        f"{r_krr[big].max() if big.any() else math.nan:.1e}) and for (1.2, 1.4, 0) at n={args.overfit_n}": bool(c3a),
    }
    r2 = "not run" if t2 is None else f"{t2['measured']['ratio']:.3f} vs theory {t2['theory']['ratio']:.3f}"
    checks[f"3b. (2.0, 1.5): R_tr* in [0.03, 0.25], within 0.05 of theory ({r2})"] = bool(c3b)
    got = [f"{over[t]['measured']['ratio']:.3f} > {over[c]['measured']['ratio']:.3f}" for t, c in noisy]
    checks[f"3c. label noise raises R_tr* ({', '.join(got) or 'no noisy task'})"] = bool(c3c)
    if real is not None:
        rks = list(args.real_ks)
        j64 = int(np.argmin(np.abs(np.log(np.array(rks) / 64))))
        E_last = real["E"][-1]
        c4 = E_last[-2] <= E_last[j64] and real["gap_max"] <= 0.20
        checks[f"4. {real['name']} n={args.real_ns[-1]}: E*(k={rks[-1]}) {E_last[-2]:.4f} <= E*(k={rks[j64]}) "
               f"{E_last[j64]:.4f}; theory gap at opt. delta max {real['gap_max']:.3f} <= 0.20"] = bool(c4)
    text = ("at optimal ridge, RF test risk falls with more features and more data and the eigenframework overlays "
            "it; on power-law tasks the optimal kernel regressor nearly interpolates (all checks below)")
    return {"text": text, "passed": bool(all(checks.values())), "checks": checks}


if __name__ == "__main__":
    shared.run(main, Args, PRESETS)
