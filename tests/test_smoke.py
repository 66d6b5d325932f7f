"""Every method file, run as a user runs it (`--preset smoke`), writes finite results, a claim and a figure."""

import dataclasses
import json
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import shared
from conftest import METHODS, load, run_script

SLUGS = sorted(p.stem for p in METHODS.glob("*.py"))


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """The smoke runs of every slug this session selected, started together, one per core with one thread each.
    Most of a smoke run is single-threaded (starting python, importing torch), so on two cores this halves the
    suite's longest part. Returns {slug: (process, its out dir)}."""
    wanted = sorted({item.callspec.params["slug"] for item in request.session.items
                     if getattr(item, "originalname", "") == "test_smoke_run_writes_results"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(slug):
        out_dir = tmp_path_factory.mktemp(slug)
        try:
            return slug, (run_script(slug, "--preset", "smoke", "--out-dir", out_dir, env=env), out_dir)
        except subprocess.TimeoutExpired as timeout:  # reported by that slug's test, not by the fixture
            return slug, (timeout, out_dir)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(pool.map(one, wanted))


@pytest.mark.parametrize("slug", SLUGS)
def test_smoke_run_writes_results(slug, smoke_runs):
    proc, tmp_path = smoke_runs[slug]
    assert not isinstance(proc, subprocess.TimeoutExpired), f"the smoke run took over {proc.timeout} s"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CLAIM" in proc.stdout  # the closing line says whether the claim holds
    record = json.loads((tmp_path / f"{slug}__smoke__s0.json").read_text())
    for field in ("slug", "paper", "arxiv", "preset", "seed", "device", "torch", "args", "results", "key",
                  "paper_numbers", "claim", "history", "wall_s"):
        assert field in record, field
    key = record["key"]
    for role in ("method", "baseline"):
        value = record["results"][key[role]][key["metric"]]
        assert isinstance(value, float) and math.isfinite(value), (role, value)
    assert isinstance(record["claim"]["passed"], bool) and record["claim"]["text"]
    assert (tmp_path / f"{slug}__smoke__s0.png").stat().st_size > 10_000  # the paper's figure, re-drawn


@pytest.mark.parametrize("slug", SLUGS)
def test_help_lists_every_field(slug, capsys):
    module = load(slug)
    with pytest.raises(SystemExit) as exit_info:
        shared.cli(module.Args, module.PRESETS, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(module.Args):
        assert "--" + field.name.replace("_", "-") in out, field.name


@pytest.mark.parametrize("slug", SLUGS)
def test_presets_apply_with_and_without_other_flags(slug):
    module = load(slug)
    assert shared.cli(module.Args, module.PRESETS, []) == module.Args()
    smoke = shared.cli(module.Args, module.PRESETS, ["--seed", "3", "--preset", "smoke"])
    assert smoke == dataclasses.replace(module.PRESETS["smoke"], seed=3)
    with pytest.raises(SystemExit) as exit_info:
        shared.cli(module.Args, module.PRESETS, ["--preset", "nonsense"])
    assert exit_info.value.code == 2


@pytest.mark.gpu
@pytest.mark.parametrize("slug", SLUGS)
def test_smoke_run_on_cuda(slug, tmp_path):
    """The same smoke run on the GPU: every tensor follows `--device cuda`, and the numbers stay finite."""
    proc = run_script(slug, "--preset", "smoke", "--device", "cuda", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / f"{slug}__smoke__s0.json").read_text())
    assert record["device"].startswith("cuda")
    key = record["key"]
    assert math.isfinite(record["results"][key["method"]][key["metric"]])


@pytest.mark.gpu
@pytest.mark.parametrize("slug", SLUGS)
def test_bench_on_cuda(slug, tmp_path):
    """`--bench --device cuda` checks fused == reference (bf16 tolerance) on the GPU and writes positive timings."""
    proc = run_script(slug, "--preset", "smoke", "--bench", "--device", "cuda", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / f"{slug}__smoke__s0.bench.json").read_text())["rows"]
    assert rows and all(r["reference_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
