"""benchmarks/gpu_check.sh's plumbing, on the CPU: wheels installed into a fresh site folder, the probe, the GPU
tests' collection, a stage that fails, a stage that times out, a spent budget, and the summary. The full dry run
(export and benchmarks of tiny-sd1) is `make gpu-rehearsal`; this keeps the script from rotting between GPU runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in tests/<stage>/)
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """sdrt's own wheel, built as `make gpu-wheels` builds it (its other wheels are this environment's packages)."""
    out = tmp_path_factory.mktemp("whl")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path_factory.mktemp("build"))
    return out


def check(tmp_path: Path, wheels: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    run_env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
                   GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "site"),
                   GPU_CHECK_ENGINES=str(tmp_path / "engines"))  # fmt: skip
    run_env.update(env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=run_env, capture_output=True, text=True, timeout=300)
    summary = tmp_path / "out" / "summary.tsv"
    rows = list(csv.DictReader(summary.open(), delimiter="\t")) if summary.exists() else []
    return proc, rows


def test_stages_run_in_order_and_a_failed_stage_does_not_stop_the_next(tmp_path, wheels):
    """No export stage: `bench` fails (nothing to bench), `bench_b4` still runs, the script exits non-zero, and
    the summary names every stage with its status."""
    proc, rows = check(tmp_path, wheels, GPU_CHECK_STAGES="install,probe,tests,bench,bench_b4")
    out = tmp_path / "out"
    assert [r["stage"] for r in rows] == ["install", "probe", "tests", "bench", "bench_b4"], proc.stdout + proc.stderr
    status = {r["stage"]: r["status"] for r in rows}
    assert status["install"] == status["probe"] == status["tests"] == "ok", proc.stdout
    assert status["bench"] == status["bench_b4"] == "failed rc=3"
    assert "no export at" in (out / "bench_b4.log").read_text()
    assert proc.returncode == 1
    # the wheel went into the fresh site folder, and that is the sdrt the stages imported
    assert list((tmp_path / "site").glob("sdrt-*.dist-info"))
    probe = json.loads((out / "probe.json").read_text())
    assert probe["torch"] == torch.__version__ and probe["cuda_available"] is False
    assert probe["packages"]["sdrt"] == "0.1.0" and "missing" in probe["packages"]["tensorrt"]
    # the GPU tests were collected and skipped on the CPU, their junit XML written where the device run keeps it
    suite = ET.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 5 and int(suite.get("skipped")) == int(suite.get("tests"))
    summary = (out / "summary.md").read_text()
    assert "| bench | failed rc=3 |" in summary and proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert json.loads((out / "summary.json").read_text())["stages"] == rows


def test_a_stage_past_its_budget_is_killed_and_a_spent_total_skips_the_rest(tmp_path, wheels):
    proc, rows = check(tmp_path, wheels, GPU_CHECK_STAGES="install,probe", GPU_CHECK_BUDGET_probe="1")
    assert {r["stage"]: r["status"] for r in rows} == {"install": "ok", "probe": "timeout"}, proc.stdout
    assert proc.returncode == 1

    proc, rows = check(tmp_path, wheels, GPU_CHECK_STAGES="install,probe", GPU_CHECK_BUDGET_S="5")
    assert [r["status"] for r in rows] == ["skipped (total budget spent)"] * 2, proc.stdout


def test_a_python_without_the_prerequisites_fails_install_in_one_line_and_skips_the_rest(tmp_path, wheels):
    """A GPU machine whose Python is not the recorded image's (here a bare venv: no torch, no huggingface_hub):
    install fails naming every missing package in one line, no stage after it runs (each would only fail to
    import), and the summary's last line is that first failure."""
    bare = tmp_path / "bare"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    proc, rows = check(tmp_path, wheels, PYTHON=str(bare / "bin" / "python"))
    status = {r["stage"]: r["status"] for r in rows}
    assert status == {"install": "failed rc=4", "probe": "skipped (install failed)", "tests": "skipped (install "
                      "failed)", "export": "skipped (install failed)", "bench": "skipped (install failed)",
                      "bench_b4": "skipped (install failed)"}, proc.stdout  # fmt: skip
    line = (tmp_path / "out" / "install.log").read_text().strip()
    assert "\n" not in line and "lacks torch, numpy" in line and "huggingface_hub" in line and "PYTHON" in line
    last = proc.stdout.rstrip().splitlines()[-1]
    assert last.startswith("first failure: install failed rc=4: ") and "lacks torch" in last
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["first_failure"]["stage"] == "install"
    assert proc.returncode == 1 and not (tmp_path / "site").exists()
