"""The stages' boundaries: a runtime-only install (no extras) runs `sdrt --help`, `presets` and `generate`, and every
other command names the extra it needs in one line; the runtime never imports the export or serving stage.

The install without extras is reproduced in a subprocess whose imports of the extras' packages fail as they do
where those packages are absent (a real `pip install -e .` in a fresh environment was checked the same way by hand).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    from sdrt.runtime.cli import main
    rc = main(sys.argv[2:])
    loaded = sorted(m for m in sys.modules if m.startswith(("sdrt.export.", "sdrt.serve.")) and not m.endswith(".cli"))
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
    assert loaded(r) == []  # neither sdrt.export.* nor sdrt.serve.* beyond the commands' parsers


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
