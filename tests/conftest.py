"""Helpers every test file uses: import a method file by slug, run a script the way a user does."""

import importlib.util
import math
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "methods"
sys.path.insert(0, str(ROOT))  # method files do `import shared`


def load(slug: str):
    """Import methods/<slug>.py as a module (safe: nothing in a method file runs at import)."""
    spec = importlib.util.spec_from_file_location(slug, METHODS / f"{slug}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[slug] = module  # dataclasses need the module registered while the class body runs
    spec.loader.exec_module(module)
    return module


def run_script(slug: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python methods/<slug>.py ARGS` from the repository root, capturing text output (`env`: the whole
    environment of the child, default the current one)."""
    cmd = [sys.executable, str(METHODS / f"{slug}.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def assert_usage_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A bad argument ends with exit status 2 and one clear `error: ...` line naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(w.lower() in line.lower() for w in words), line


def without_timing(results: dict) -> dict:
    """results[model][metric] without wall-clock entries (training seconds, ms per step): identical runs differ
    only there, so determinism tests compare the rest."""
    clock = lambda name: name.endswith("train_s") or "ms_per" in name  # noqa: E731
    return {k: {mk: v for mk, v in r.items() if not clock(mk)} for k, r in results.items()}


def smoke_determinism(module, tmp_path, **overrides):
    """Run the smoke preset twice and once more with seed 1. Asserts the two same-seed runs agree (timing aside), the
    headline number is a finite float and the claim verdict a bool; returns (first, again, other) for the file's own
    checks that another seed changes the numbers."""
    smoke = replace(module.PRESETS["smoke"], out_dir=str(tmp_path), **overrides)
    first, again = module.main(smoke), module.main(smoke)
    assert without_timing(first["results"]) == without_timing(again["results"])
    key = first["key"]
    value = first["results"][key["method"]][key["metric"]]
    assert isinstance(value, float) and math.isfinite(value)
    assert isinstance(first["claim"]["passed"], bool)
    return first, again, module.main(replace(smoke, seed=1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_causal_attention_paths_agree(module, shape=(2, 3, 17, 8)) -> None:
    """module.attention_fused == module.attention_reference for causal softmax attention (q, k, v) -> out:
    outputs and gradients in float64 on an odd sequence length, at tight tolerances."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert_outputs_and_grads_close(module.attention_fused(q, k, v), module.attention_reference(q, k, v), (q, k, v),
                                   atol=1e-12, rtol=1e-10)


def assert_outputs_and_grads_close(out, ref, inputs, atol: float, rtol: float, grad_tol: float = 1.0) -> None:
    """out == ref, and so are their gradients w.r.t. inputs under one random output gradient, all compared in ref's
    dtype; the gradients with the tolerances times grad_tol."""
    torch.testing.assert_close(out.to(ref.dtype), ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out.to(ref.dtype), inputs, g, retain_graph=True),
                    torch.autograd.grad(ref, inputs, g, retain_graph=True)):
        torch.testing.assert_close(a.to(b.dtype), b, atol=grad_tol * atol, rtol=grad_tol * rtol)


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(folder: Path, n: int = 4, seed: int = 0) -> Path:
    """A tiny CIFAR-10 folder in the official python-pickle layout (data_batch_1..5, test_batch; b'data' uint8
    (n, 3072) as R, G, B planes, b'labels' ints 0-9) holding n random images per file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_pickle(folder / name, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                     b"labels": rng.integers(0, 10, n).tolist()})
    return folder


def spoil(path: Path, obj) -> None:
    """Make a data file malformed: None deletes it, a str replaces it by that text, anything else is pickled."""
    if obj is None:
        path.unlink()
    elif isinstance(obj, str):
        path.write_text(obj)
    else:
        write_pickle(path, obj)
