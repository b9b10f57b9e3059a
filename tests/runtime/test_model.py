"""`Model`, the engine directory's model read once: its numbers against what diffusers itself reads from the folder
the directory was exported from, the one size check, and a manifest that lacks a number refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.model import Model


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "sd1-inpaint", "sd1-vae4"])
def test_model_numbers_are_diffusers_own(kind, exports, folders):
    import diffusers

    root = exports.get(kind, "fp32")
    ref = diffusers.DiffusionPipeline.from_pretrained(folders[kind], local_files_only=True)
    model = Model.read(root)
    assert model.family == ("sdxl" if kind == "sdxl" else "sd")
    assert model.geometry.vae_scale_factor == ref.vae_scale_factor
    assert model.geometry.sample_size == ref.unet.config.sample_size
    assert model.latent_channels == ref.vae.config.latent_channels
    assert model.scaling_factor == pytest.approx(ref.vae.config.scaling_factor)
    assert model.unet_channels == ref.unet.config.in_channels
    assert model.inpainting == (ref.unet.config.in_channels == 9)
    assert model.text_encoders == (("text_encoder", "text_encoder_2") if kind == "sdxl" else ("text_encoder",))
    assert model.pooled == (kind == "sdxl")
    assert model.zero_negatives == bool(ref.config.get("force_zeros_for_empty_prompt", False))
    assert model.guidance_embedding == 0 and model.posterior  # neither LCM nor TAESD
    # diffusers' default size: unet.sample_size x vae_scale_factor, here within the exported 64-192 px
    assert model.default_px == min(max(ref.unet.config.sample_size * ref.vae_scale_factor, 64), 192)
    assert (model.min_px, model.max_px, model.max_images) == (64, 192, 2)  # conftest.SIZES


def test_one_size_check(exports):
    model = Model.read(exports.get("sd1", "fp32"))  # 64-192 px in steps of 8
    assert model.check_size("height", 128) == 128
    step = r"^height 100 is not a multiple of 8; use 96 or 104 \(this model's size step\)$"
    with pytest.raises(SdrtError, match=step):
        model.check_size("height", 100)
    with pytest.raises(SdrtError, match=r"^width 256 is outside the 64-192 px this engine was exported for") as err:
        model.check_size("width", 256, field="width")
    assert err.value.field == "width" and "use 192" in str(err.value)
    with pytest.raises(SdrtError, match="not a multiple"):
        model.check_size("height", True)


def test_manifest_without_a_number_is_refused_in_one_line(exports, tmp_path):
    root = shutil.copytree(exports.get("sd1", "fp32"), tmp_path / "e")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["unet"]["downsampling"]  # no constant stands in for it
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SdrtError) as err:
        Model.read(root)
    msg = str(err.value)
    assert "\n" not in msg and "'downsampling'" in msg and "sdrt export ... --force" in msg
    manifest["family"] = "flux"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SdrtError, match="flux engine directories are not supported"):
        Model.read(root)
