"""SDXL and inpainting against diffusers' own pipelines on the same folders, seeds, samplers and sizes.

StableDiffusionXLPipeline / Img2Img / Inpaint and StableDiffusionInpaintPipeline are the references; the folders
(tests/helpers/models.py) are small SDXL-like and inpainting (9-channel U-Net) configurations built with diffusers'
classes, exported in fp32 and run on the CPU with ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, init_and_mask, sdrt_images
from tests.helpers.reference import NEGATIVE, PROMPT, diffusers_images

H, W = 64, 128  # non-square everywhere


@pytest.fixture(scope="module")
def pipes(exports):
    kinds = ("sdxl", "sd1", "sd1-inpaint", "sdxl-inpaint")
    out = {k: Pipeline.load(exports.get(k, "fp32"), backend="onnxruntime", device="cpu") for k in kinds}
    yield out
    for p in out.values():
        p.close()


# -- SDXL ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m_karras", "ddim"])
def test_sdxl_txt2img_matches_diffusers(sampler, pipes, folders):
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0,
              height=H, width=W, seed=21)  # fmt: skip
    check(
        sdrt_images(pipes["sdxl"], sampler=sampler, **kw),
        diffusers_images(folders["sdxl"], pipeline="StableDiffusionXLPipeline", sampler=sampler, **kw),
    )


def test_sdxl_unset_negative_is_zeros_and_batches_match(pipes, folders):
    """No negative prompt: SDXL conditions the unguided half on zeros (force_zeros_for_empty_prompt), which an
    encoded "" would not give; two prompts in one call."""
    kw = dict(prompt=[PROMPT, "a lighthouse"], num_inference_steps=4, guidance_scale=7.0, height=W, width=H, seed=3)
    mine = sdrt_images(pipes["sdxl"], sampler="euler", **kw)
    check(mine, diffusers_images(folders["sdxl"], pipeline="StableDiffusionXLPipeline", sampler="euler", **kw))
    empty = sdrt_images(pipes["sdxl"], sampler="euler", negative_prompt="", **kw)
    assert not np.array_equal(mine, empty)


def test_sdxl_img2img_matches_diffusers(pipes, folders):
    image, _ = init_and_mask()
    kw = dict(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=6, guidance_scale=5.0, seed=8)
    ref = diffusers_images(folders["sdxl"], pipeline="StableDiffusionXLImg2ImgPipeline", sampler="euler_a", **kw)
    check(sdrt_images(pipes["sdxl"], sampler="euler_a", **kw), ref)


# -- inpainting -----------------------------------------------------------------------------------------------------

INPAINT = [  # (kind, diffusers pipeline, sampler, strength)
    ("sd1-inpaint", "StableDiffusionInpaintPipeline", "pndm", 1.0),  # 9-channel U-Net
    ("sd1-inpaint", "StableDiffusionInpaintPipeline", "euler_a", 0.75),
    ("sd1-inpaint", "StableDiffusionInpaintPipeline", "dpmpp_2m", 1.0),
    ("sd1", "StableDiffusionInpaintPipeline", "pndm", 1.0),  # a regular U-Net: latent blend after every step
    ("sd1", "StableDiffusionInpaintPipeline", "euler_a", 0.7),
    ("sd1", "StableDiffusionInpaintPipeline", "ddim", 1.0),
    ("sd1", "StableDiffusionInpaintPipeline", "dpmpp_2m_karras", 0.8),
    ("sd1", "StableDiffusionInpaintPipeline", "lcm", 1.0),
    ("sd1", "StableDiffusionInpaintPipeline", "heun", 0.8),  # two calls a step, the blend after each
    ("sd1", "StableDiffusionInpaintPipeline", "dpmpp_2m_sde", 1.0),
    ("sd1", "StableDiffusionInpaintPipeline", "dpm2_a", 0.8),  # blended to the step's end sigma, not the midpoint
    ("sd1", "StableDiffusionInpaintPipeline", "unipc", 1.0),  # the corrector reads the unblended state
    ("sdxl-inpaint", "StableDiffusionXLInpaintPipeline", "euler", 0.9999),  # SDXL inpainting's default strength
    ("sdxl-inpaint", "StableDiffusionXLInpaintPipeline", "euler_a", 1.0),
    ("sdxl", "StableDiffusionXLInpaintPipeline", "euler", 1.0),
    ("sdxl", "StableDiffusionXLInpaintPipeline", "dpmpp_2m", 0.6),
]


@pytest.mark.parametrize("kind,cls,sampler,strength", INPAINT)
def test_inpainting_matches_diffusers(kind, cls, sampler, strength, pipes, folders):
    image, mask = init_and_mask()
    steps = 4 if sampler == "lcm" else 6
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, strength=strength, num_inference_steps=steps,
              guidance_scale=6.0, seed=77)  # fmt: skip
    mine = sdrt_images(pipes[kind], sampler=sampler, mask_image=mask, **kw)
    ref = diffusers_images(folders[kind], pipeline=cls, sampler=sampler, mask_image=mask, height=H, width=W, **kw)
    check(mine, ref)
    if not pipes[kind].model.inpainting and strength == 1.0:  # the blend keeps the unmasked region close to the init
        kept = np.asarray(mask) < 128
        ours_err = np.abs(mine[0].astype(int) - np.asarray(image).astype(int))[kept].mean()
        assert ours_err < np.abs(mine[0].astype(int) - np.asarray(image).astype(int))[~kept].mean()


def test_inpainting_requests_join_and_stay_themselves(pipes):
    image, mask = init_and_mask()
    pipe = pipes["sd1-inpaint"]
    reqs = [
        pipe.request(Params(prompt=p, steps=4, guidance=6.0, height=H, width=W, seed=s, sampler="euler_a", image=image,
                            strength=1.0, mask=mask))
        for p, s in (("a", 1), ("b", 2))
    ]  # fmt: skip
    assert reqs[0].join_key == reqs[1].join_key
    for joined, req in zip(pipe.generate_batch(reqs).pixels, reqs, strict=True):
        assert torch.equal(joined, pipe.generate(req))


def test_inpainting_bad_input(pipes):
    image, mask = init_and_mask()
    with pytest.raises(SdrtError, match="needs the image it masks"):
        pipes["sd1"]("x", num_inference_steps=2, mask_image=mask)
    with pytest.raises(SdrtError, match="inpainting model"):
        pipes["sd1-inpaint"]("x", num_inference_steps=2, height=H, width=W)
    with pytest.raises(SdrtError, match="cannot read mask"):
        pipes["sd1"]("x", num_inference_steps=2, image=image, mask_image="/nonexistent.png")


def test_sdxl_honours_force_zeros_false(pipes, exports, folders, tmp_path):
    """A checkpoint whose model_index.json turns SDXL's zeroing off encodes "" for an unset negative instead."""
    import json
    import shutil

    root = tmp_path / "engine"
    shutil.copytree(exports.get("sdxl", "fp32"), root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["pipeline"] == {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
    manifest["pipeline"]["force_zeros_for_empty_prompt"] = False
    (root / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(root, backend="onnxruntime", device="cpu")
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.0, height=H, width=W, seed=5)
    mine = sdrt_images(pipe, sampler="euler", **kw)
    load = dict(force_zeros_for_empty_prompt=False)
    check(mine, diffusers_images(folders["sdxl"], "euler", pipeline="StableDiffusionXLPipeline", load=load, **kw))
    assert np.array_equal(mine, sdrt_images(pipes["sdxl"], sampler="euler", negative_prompt="", **kw))


def test_cli_inpainting_writes_pngs(exports, tmp_path, capsys):
    from sdrt.cli import main

    image, mask = init_and_mask()
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["generate", str(exports.get("sd1-inpaint", "fp32")), "a door", "--steps", "2", "--seed", "4", "--quiet"]
    rc = main(
        [*args, "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--out", str(out)]
    )
    assert rc == 0 and Image.open(out).size == (W, H)
    assert "Denoising strength: 1" in Image.open(out).text["parameters"]
    assert main([*args, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--mask needs --init-image" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
