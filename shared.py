"""Plumbing shared by every methods/<slug>.py file: seeding, device, CLI with presets, progress line,
result table, atomic JSON, a benchmark timer, and `python shared.py summarize runs/`.

No models and no data live here: copying one method means copying its file plus this one.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch


class UsageError(ValueError):
    """A bad argument or a malformed data file: `run` prints its one sentence and exits with status 2."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when present, else cpu. Asking for cuda without one is a usage error, not a silent fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but torch sees no CUDA device; use --device cpu.")
    return torch.device(name)


def cli(cls, presets: dict, argv: list[str] | None = None):
    """Parse argv into `cls`. `--preset NAME` (anywhere) picks the defaults; every other flag overrides them."""
    import tyro  # imported here so that importing a method file stays cheap

    argv = list(sys.argv[1:] if argv is None else argv)
    default = cls()
    for i, a in enumerate(argv):
        if a == "--preset" or a.startswith("--preset="):
            name = a.partition("=")[2] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if name not in presets:
                print(f"error: unknown preset {name!r}; choose one of: {', '.join(presets)}.", file=sys.stderr)
                sys.exit(2)
            default = presets[name]  # the `--preset NAME` flag stays in argv and fills the `preset` field
            break
    return tyro.cli(cls, default=default, args=argv, description=f"{cls.__doc__} Presets: {', '.join(presets)}.")


def run(main, cls, presets: dict) -> None:
    """Entry point of every script: parse, run main(args), turn a UsageError into one line and exit code 2."""
    try:
        main(cli(cls, presets))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class Progress:
    """Prints `name step s/N | key value ... | it/s | ETA` at most once every `every_s` seconds."""

    def __init__(self, name: str, total: int, every_s: float = 5.0):
        self.name, self.total, self.every_s = name, total, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, **metrics: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and step != self.total:
            return
        self.last = now
        rate = step / max(now - self.t0, 1e-9)
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        eta = (self.total - step) / max(rate, 1e-9)
        print(f"[{self.name}] step {step}/{self.total} | {shown} | {rate:.1f} it/s | ETA {eta:.0f}s", flush=True)


def print_table(header: list[str], rows: list[list], claim: dict | None = None) -> None:
    """A Markdown table (floats to 4 significant digits), then the claim line."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in [header, *rows]]
    width = [max(len(r[j]) for r in cells) for j in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"  # noqa: E731
    print("\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in width) + "|", *map(line, cells[1:])]))
    if claim is not None:
        print(f"\nCLAIM {'HOLDS' if claim['passed'] else 'DOES NOT HOLD'}: {claim['text']}", flush=True)


def run_path(args, slug: str, suffix: str) -> Path:
    """runs/<slug>__<preset>__s<seed><suffix>; the directory is created."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{slug}__{args.preset}__s{args.seed}{suffix}"


def write_json(path: Path, obj: dict) -> None:
    """Atomic: write a temp file beside the target, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def save_metrics(args, *, slug, paper, arxiv, results, key, claim, paper_numbers, history, wall_s, **extra) -> dict:
    """Write runs/<slug>__<preset>__s<seed>.json. `key` = {"metric", "method", "baseline", "higher_is_better"}
    names the headline number that `summarize` shows, read from results[model][metric]."""
    device = str(pick_device(args.device))
    record = dict(slug=slug, paper=paper, arxiv=arxiv, preset=args.preset, seed=args.seed, device=device,
                  torch=torch.__version__, args=asdict(args), results=results, key=key, claim=claim,
                  paper_numbers=paper_numbers, history=history, wall_s=round(wall_s, 2), **extra)
    write_json(run_path(args, slug, ".json"), record)
    return record


def save_bench(args, slug: str, device: torch.device, rows: list[dict], **extra) -> dict:
    """Print and write runs/<slug>__<preset>__s<seed>.bench.json. Each row: {"what", "reference_ms", "fused_ms"}
    (for the whole-model row, reference = eager and fused = torch.compile)."""
    speed_up = [f"{r['reference_ms'] / r['fused_ms']:.2f}x" for r in rows]
    print_table(["what", "reference / eager ms", "fused / compiled ms", "speed-up"],
                [[r["what"], r["reference_ms"], r["fused_ms"], x] for r, x in zip(rows, speed_up)])
    record = dict(slug=slug, device=str(device), torch=torch.__version__, args=asdict(args), rows=rows, **extra)
    write_json(run_path(args, slug, ".bench.json"), record)
    return record


def benchmark(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn() in milliseconds, after warm-up; CUDA is synchronised around every call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[warmup:])


def summarize(runs_dir: str = "runs") -> str:
    """One Markdown table over runs/*.json: key metric as mean ± std over seeds, claim pass count, wall time;
    then the speed table of runs/*.bench.json."""
    groups: dict[tuple, list[dict]] = {}
    for f in sorted(Path(runs_dir).glob("*.json")):
        if not f.name.endswith(".bench.json"):
            r = json.loads(f.read_text())
            groups.setdefault((r["slug"], r["preset"]), []).append(r)

    def mean_std(rs: list[dict], role: str) -> str:
        k = rs[0]["key"]
        xs = [v for r in rs if (v := r["results"][k[role]][k["metric"]]) is not None and math.isfinite(v)]
        return f"{k[role]}: " + (f"{statistics.mean(xs):.4g} ± {statistics.pstdev(xs):.2g}" if xs else "-")

    out = ["| paper | preset | seeds | claim | metric | method | baseline | claim passed | wall s |", "|---" * 9 + "|"]
    for (slug, preset), rs in sorted(groups.items()):
        passed, wall = sum(bool(r["claim"]["passed"]) for r in rs), statistics.mean(r["wall_s"] for r in rs)
        out.append(f"| {slug} | {preset} | {len(rs)} | {rs[0]['claim']['text']} | {rs[0]['key']['metric']} | "
                   f"{mean_std(rs, 'method')} | {mean_std(rs, 'baseline')} | {passed}/{len(rs)} | {wall:.0f} |")
    benches = [json.loads(f.read_text()) for f in sorted(Path(runs_dir).glob("*.bench.json"))]
    if benches:
        out += ["", "| paper | device | what | reference / eager ms | fused / compiled ms | speed-up |",
                "|---" * 6 + "|"]
        out += [f"| {b['slug']} | {b['device']} | {r['what']} | {r['reference_ms']:.3g} | {r['fused_ms']:.3g} | "
                f"{r['reference_ms'] / r['fused_ms']:.2f}x |" for b in benches for r in b["rows"]]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "summarize":
        sys.exit("usage: python shared.py summarize runs/")
    print(summarize(sys.argv[2]))
