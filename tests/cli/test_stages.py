"""The stages' boundaries: a runtime-only install (no extras) runs `sdrt --help`, `presets` and `generate`, and every
other command names the extra it needs in one line; the stages import one another only downstream (the runtime
imports no other stage; `sdrt build` imports nothing of the export stage), read off the source.

The install without extras is reproduced in a subprocess whose imports of the extras' packages fail as they do
where those packages are absent (a real `pip install -e .` in a fresh environment was checked the same way by hand).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# what only the extras bring (export, build, serve, bench, rtx); the runtime's own dependencies stay importable
EXTRAS_ONLY = ("diffusers", "transformers", "onnx", "onnxscript", "fastapi", "uvicorn", "prometheus_client", "ray",
               "matplotlib", "tensorrt", "tensorrt_rtx", "polygraphy")  # fmt: skip

RUNNER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = set(sys.argv[1].split(","))

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled())
    from sdrt.cli import main
    rc = main(sys.argv[2:])
    other = ("sdrt.export.", "sdrt.trt.", "sdrt.serve.")
    loaded = sorted(m for m in sys.modules if m.startswith(other) and not m.endswith(".cli"))
    print("LOADED " + json.dumps(loaded))
    sys.exit(rc)
    """
)


def runtime_only(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(EXTRAS_ONLY), *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def loaded(r: subprocess.CompletedProcess) -> list[str]:
    import json

    return json.loads(r.stdout.rsplit("LOADED ", 1)[1])


@pytest.fixture(scope="module")
def engine(exports):
    return exports.get("sd1", "fp32")


def test_help_and_presets_need_no_extra():
    r = runtime_only("--help")
    assert r.returncode == 0, r.stderr
    for command in ("export", "verify", "build", "presets", "generate", "bench", "serve"):
        assert command in r.stdout
    r = runtime_only("presets")
    assert r.returncode == 0, r.stderr
    assert "sd15" in r.stdout and "sdxl" in r.stdout


def test_generate_needs_no_extra_and_no_other_stage(engine, tmp_path):
    out = tmp_path / "x.png"
    r = runtime_only("generate", str(engine), "a red fox", "--steps", "2", "--height", "64", "--width", "64",
                     "--seed", "1", "--out", str(out), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert loaded(r) == []  # no sdrt.export.*, sdrt.trt.* nor sdrt.serve.* beyond the commands' parsers


@pytest.mark.parametrize(
    "command, extra",
    [(["export", "tiny-sd1", "{tmp}/out"], "export"), (["verify", "{engine}"], "export"),
     (["build", "{engine}"], "build"), (["serve", "{engine}"], "serve"), (["bench", "{engine}"], "bench")],
)  # fmt: skip
def test_other_commands_name_their_extra(command, extra, engine, tmp_path):
    r = runtime_only(*[a.format(tmp=tmp_path, engine=engine) for a in command])
    errors = [line for line in r.stderr.splitlines() if line.startswith("sdrt: error")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert f"pip install 'sdrt[{extra}]'" in errors[0] and "is missing" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_build_needs_neither_diffusers_nor_transformers(engine, tmp_path):
    """`sdrt build` on the GPU machine: onnx and a TensorRT family are all it imports."""
    import shutil

    pytest.importorskip("tensorrt_rtx")
    copy = shutil.copytree(engine, tmp_path / "engine")
    blocked = ("diffusers", "transformers", "onnxscript", "fastapi", "ray", "matplotlib")
    r = subprocess.run([sys.executable, "-c", RUNNER, ",".join(blocked), "build", str(copy), "--backend",
                        "tensorrt-rtx"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in copy.glob("*.plan")) == ["text_encoder.plan", "unet.plan", "vae_decoder.plan",
                                                            "vae_encoder.plan"]  # fmt: skip


# Which stages each stage may import (folder -> folders), in the order of the flow; `cli` is the dispatcher.
ALLOWED = {"runtime": set(), "export": {"runtime"}, "trt": {"runtime"}, "serve": {"runtime"},
           "benchmarks": {"runtime", "export"}, "cli": {"runtime"}}  # fmt: skip
# (the dispatcher reaches each stage's command module by the names in sdrt.cli.STAGE_COMMANDS)
ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in tests/<stage>/)


def stage_imports(folder: str) -> dict[str, list[str]]:
    """{other stage: ["file.py:line", ...]} for every import of another stage in ``folder`` (module level, inside
    functions, and `import_module("sdrt....")` with a literal name)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            for name in names:
                parts = name.split(".")
                if parts[0] == "sdrt" and len(parts) > 1 and parts[1] != folder:
                    found.setdefault(parts[1], []).append(f"{path.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_stages_import_only_downstream(folder):
    found = stage_imports(folder)
    assert set(found) <= set(ALLOWED) | {"cli"}, found  # every import names a stage that exists
    extra = {stage: where for stage, where in found.items() if stage not in ALLOWED[folder]}
    assert not extra, f"{folder}/ imports {extra}"


def test_dispatcher_offers_every_stage_command():
    from sdrt.cli import STAGE_COMMANDS

    stages = {folder for folder in ALLOWED if (ROOT / folder / "cli.py").is_file()}
    assert {name.split(".")[1] for name in STAGE_COMMANDS} >= stages - {"runtime"}
