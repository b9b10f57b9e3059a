"""`sdrt export --vae`: a VAE folder instead of the model's own. An AutoencoderTiny (TAESD, the decoder of fast
previews) is exported as both VAE graphs, and its pictures are diffusers' pipeline's with ``pipe.vae`` set to it;
other VAE classes, and a TAESD of another latent space, are refused in one line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from sdrt.cli import main
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, init_and_mask, sdrt_images
from tests.helpers.models import SIZES, build_pipeline
from tests.helpers.reference import NEGATIVE, PROMPT, diffusers_images

pytestmark = pytest.mark.xdist_group("vae")
H, W = 64, 128  # non-square


def tiny_autoencoder(folder, latent_channels: int = 4) -> None:
    """A small AutoencoderTiny with seeded random weights, saved as diffusers saves TAESD. Its scaling factor is
    not TAESD's 1.0, so that the division and multiplication diffusers does are seen."""
    import diffusers

    torch.manual_seed(3)
    vae = diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=latent_channels,
        scaling_factor=0.7,
    )  # fmt: skip
    vae.save_pretrained(folder)


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """(diffusers folder of the sd1 test pipeline, TAESD folder, sdrt pipeline of the folder exported with it)."""
    root = tmp_path_factory.mktemp("taesd")
    folder, vae, out = root / "sd1", root / "taesd", root / "sd1-taesd-fp32"
    build_pipeline("sd1").save_pretrained(folder)
    tiny_autoencoder(vae)
    assert main(["export", str(folder), str(out), "--precision", "fp32", "--vae", str(vae), *SIZES]) == 0
    with Pipeline.load(out, backend="onnxruntime", device="cpu") as pipe:
        yield folder, vae, out, pipe


def reference(folder, vae, sampler: str, **kw):
    """diffusers' pipeline on ``folder`` with ``pipe.vae`` the AutoencoderTiny of ``vae``."""
    import diffusers

    tiny = diffusers.AutoencoderTiny.from_pretrained(vae, local_files_only=True, use_safetensors=True)
    return diffusers_images(folder, sampler, load={"vae": tiny}, **kw)


def test_taesd_export_records_its_class_and_gives_latents(taesd):
    folder, vae, out, _ = taesd
    m = json.loads((out / "manifest.json").read_text())
    assert m["latent"]["vae_class"] == "AutoencoderTiny" and m["latent"]["scaling_factor"] == 0.7
    assert list(m["graphs"]["vae_encoder"]["outputs"]) == ["latents"]
    assert m["source"]["vae"]["path"] == str(vae.resolve())
    assert main(["verify", str(out)]) == 0  # rebuilt from the recorded folders, TAESD included


def test_taesd_txt2img_matches_diffusers(taesd):
    folder, vae, _, pipe = taesd
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0, height=H,
              width=W, seed=1234)  # fmt: skip
    check(sdrt_images(pipe, sampler="dpmpp_2m", **kw), reference(folder, vae, "dpmpp_2m", **kw))


def test_taesd_img2img_and_inpainting_draw_no_posterior_noise(taesd):
    """retrieve_latents takes TAESD's encode(...).latents as they are: no noise is drawn for the init or the
    masked image, so the seed's first draw is the initial noise (an ancestral sampler sees every later draw)."""
    folder, vae, _, pipe = taesd
    image, mask = init_and_mask()
    kw = dict(prompt=PROMPT, image=image, num_inference_steps=6, guidance_scale=5.0, seed=99)
    check(sdrt_images(pipe, sampler="euler_a", strength=0.6, **kw),
          reference(folder, vae, "euler_a", img2img=True, strength=0.6, **kw))  # fmt: skip
    inpaint = dict(kw, mask_image=mask, strength=0.7)
    check(sdrt_images(pipe, sampler="euler_a", **inpaint),
          reference(folder, vae, "euler_a", pipeline="StableDiffusionInpaintPipeline", height=H, width=W,
                    **inpaint))  # fmt: skip


def _refused(capsys, tmp_path, vae) -> str:
    out = tmp_path / "out"
    rc = main(["export", "tiny-sd1", str(out), "--precision", "fp32", "--vae", str(vae), *SIZES])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdrt: error")]
    assert rc == 2 and len(err) == 1 and not out.exists()
    assert not list(tmp_path.glob(".out*")), "a half-written export was left behind"
    return err[0]


def test_other_vae_classes_are_refused_in_one_line(capsys, tmp_path):
    import diffusers

    vae = tmp_path / "temporal"
    diffusers.AutoencoderKLTemporalDecoder(block_out_channels=(32,), layers_per_block=1).save_pretrained(vae)
    msg = _refused(capsys, tmp_path, vae)
    assert "AutoencoderKLTemporalDecoder" in msg and "AutoencoderKL and AutoencoderTiny" in msg
    config = json.loads((vae / "config.json").read_text())
    del config["_class_name"]
    (vae / "config.json").write_text(json.dumps(config))
    assert "no _class_name" in _refused(capsys, tmp_path, vae)


def test_a_taesd_of_another_latent_space_is_refused(capsys, tmp_path):
    """TAESD3 / TAEF1 make 16-channel latents: no picture of a 4-channel U-Net."""
    tiny_autoencoder(tmp_path / "taesd16", latent_channels=16)
    msg = _refused(capsys, tmp_path, tmp_path / "taesd16")
    assert "--vae" in msg and "16-channel" in msg and "the U-Net denoises 4" in msg
