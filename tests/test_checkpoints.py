"""The checkpoints users bring, as diffusers writes them (random weights, a few MB): a folder whose own scheduler
has no sampler in sdrt, distilled (LCM) U-Nets. Each is exported through the CLI and held against diffusers' own
pipeline on the same folder, seed, size and steps."""

from __future__ import annotations

import pytest
from conftest import SIZES, build_pipeline

from sdrt.runtime.cli import main
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline
from tests.test_pipeline import check, diffusers_images, sdrt_images

pytestmark = pytest.mark.xdist_group("checkpoints")
KW = dict(prompt="a watercolor fox in the snow", negative_prompt="blurry", num_inference_steps=4, height=64,
          width=64, seed=21)  # fmt: skip


def _export(pipe, tmp_path, name: str, capfd) -> tuple:
    """Save ``pipe`` as a diffusers folder and export it fp32; returns (folder, engine directory, export log)."""
    folder, out = tmp_path / name, tmp_path / f"{name}-fp32"
    pipe.save_pretrained(folder)
    capfd.readouterr()
    assert main(["export", str(folder), str(out), "--precision", "fp32", *SIZES]) == 0
    return folder, out, capfd.readouterr().err


def test_a_scheduler_without_its_own_sampler_is_no_dead_end(tmp_path, capfd):
    """A folder whose scheduler (here DDPMScheduler) has no sampler in sdrt: the export says so in one line and
    succeeds; generating without --sampler is one line naming the samplers that run on this schedule; with one,
    the picture is diffusers' with that scheduler made from the folder's config."""
    import diffusers

    pipe = build_pipeline("sd1")
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    folder, out, log = _export(pipe, tmp_path, "ddpm", capfd)
    notes = [line for line in log.splitlines() if "note:" in line]
    assert len(notes) == 1 and "DDPMScheduler has no matching sampler" in notes[0] and "--sampler: ddim" in notes[0]
    with Pipeline.load(out, backend="onnxruntime", device="cpu") as sdrt:
        with pytest.raises(SdrtError, match="choose one with --sampler: ddim, euler, euler_a") as err:
            sdrt("a fox", num_inference_steps=2, height=64, width=64)
        assert err.value.field == "sampler"
        ours = sdrt_images(sdrt, sampler="dpmpp_2m", **KW)
    check(ours, diffusers_images(folder, "dpmpp_2m", **KW))
    capfd.readouterr()
    assert main(["generate", str(out), "a fox", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "--sampler" in err and not (tmp_path / "x.png").exists()
    assert main(["generate", str(out), "a fox", "--steps", "2", "--sampler", "euler", "--height", "64", "--width",
                 "64", "--out", str(tmp_path / "x.png")]) == 0  # fmt: skip
    assert (tmp_path / "x.png").is_file()
