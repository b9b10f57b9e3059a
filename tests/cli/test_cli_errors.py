"""Bad input: one line naming the fix, non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdrt.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def one_line_error(capsys, *args: str) -> str:
    rc = main(list(args))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdrt: error")]
    assert rc != 0 and len(err) == 1
    return err[0]


def test_unknown_preset_lists_presets(capsys, tmp_path):
    msg = one_line_error(capsys, "export", "sd99", str(tmp_path / "out"))
    assert "sd15" in msg and "tiny-sd1" in msg
    assert not (tmp_path / "out").exists()


def test_missing_path(capsys, tmp_path):
    msg = one_line_error(capsys, "export", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert "no such preset, folder or file" in msg


def test_folder_that_is_not_a_pipeline(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    msg = one_line_error(capsys, "export", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert "not a Stable Diffusion pipeline folder" in msg


def test_unsupported_architecture_names_the_supported_ones(capsys, tmp_path):
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    msg = one_line_error(capsys, "export", str(tmp_path / "flux"), str(tmp_path / "out"))
    assert "FluxPipeline" in msg and "StableDiffusionPipeline" in msg and "StableDiffusionXLPipeline" in msg


def test_existing_destination_needs_force(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    msg = one_line_error(capsys, "export", "tiny-sd1", str(tmp_path / "out"))
    assert "--force" in msg
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_refiner_single_file_names_the_conversion(capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sd_xl_refiner.safetensors"  # its keys' layout: the OpenCLIP encoder alone, then the U-Net
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(2),
               "model.diffusion_model.out.2.bias": torch.zeros(2)}, path)  # fmt: skip
    msg = one_line_error(capsys, "export", str(path), str(tmp_path / "out"))
    assert "SDXL refiner" in msg and "StableDiffusionXLImg2ImgPipeline.from_single_file" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoint_is_refused(capsys, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, path)
    msg = one_line_error(capsys, "export", str(path), str(tmp_path / "out"))
    assert "pickle" in msg and "safetensors" in msg and "--allow-pickle" in msg


def test_pickle_loads_only_when_allowed(tmp_path, folders, configs, single_files):
    """--allow-pickle loads an original-layout .ckpt through diffusers, with the same weights as the folder."""
    from safetensors.torch import load_file

    from sdrt.export.load import load_model

    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": load_file(single_files["sd1"])}, ckpt)
    c = load_model(str(ckpt), allow_pickle=True, config=str(configs["sd1"]))
    ref = load_model(str(folders["sd1"]))
    for a, b in zip(c.unet.state_dict().values(), ref.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_pickle_only_folder_is_refused(capsys, tmp_path, folders):
    folder = tmp_path / "pickled"
    shutil.copytree(folders["sd1"], folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    msg = one_line_error(capsys, "export", str(folder), str(tmp_path / "out"))
    assert "unet" in msg and "pickle" in msg and "--allow-pickle" in msg


def test_damaged_safetensors_file(capsys, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 100)
    msg = one_line_error(capsys, "export", str(path), str(tmp_path / "out"))
    assert "model.safetensors" in msg


def test_failed_verification_leaves_nothing(capsys, tmp_path, monkeypatch):
    """A graph over its error limit stops the export; neither DIR nor a staging folder is left behind."""
    from sdrt.export import verify

    monkeypatch.setitem(verify.TOLERANCE, "fp32", 1e-12)
    msg = one_line_error(capsys, "export", "tiny-sd1", str(tmp_path / "out"), "--precision", "fp32")
    assert "failed verification" in msg and "text_encoder" in msg
    assert list(tmp_path.iterdir()) == []


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdrt.cli", "export", "nope", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_export_force_replaces_and_verify_detects_damage(capsys, tmp_path):
    """The preset path through the CLI: --force replaces DIR; `sdrt verify` passes, then names a damaged file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["export", "tiny-sd1", str(out), "--force", "--max-size", "128", "--min-size", "64"]) == 0
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old copies left
    rc, _ = run_cli(capsys, "verify", str(out))
    assert rc == 0

    data = bytearray((out / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "unet.onnx").write_bytes(bytes(data))
    msg = one_line_error(capsys, "verify", str(out))
    assert "unet.onnx" in msg and "SHA-256" in msg
    (out / "vae_decoder.onnx").unlink()
    assert "vae_decoder.onnx: missing" in one_line_error(capsys, "verify", str(out))


def test_verify_on_a_folder_that_is_not_an_engine_directory(capsys, tmp_path):
    assert "not an engine directory" in one_line_error(capsys, "verify", str(tmp_path))
    assert "no such engine directory" in one_line_error(capsys, "verify", str(Path(tmp_path) / "x"))


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_backend_is_offered_by_each_command(command):
    """`sdrt generate` and `sdrt serve` offer every backend the runtime loads (serve lacked tensorrt-rtx)."""
    from sdrt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    backend = next(a for a in sub._actions if a.dest == "backend")
    assert tuple(backend.choices) == ("auto", "tensorrt", "tensorrt-rtx", "openvino", "onnxruntime", "torch")
