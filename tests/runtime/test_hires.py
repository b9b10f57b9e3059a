"""The web UI's hires fix against a reference built from diffusers' own pieces, as the web UI composes them
(tests/helpers/hires.py): the txt2img pipeline's latents (``output_type="latent"``) upscaled with
``torch.nn.functional.interpolate`` in the web UI's mode, or its picture resized with PIL's filter, then diffusers'
img2img pipeline on those latents or pictures at the larger size, with a generator seeded afresh for each pass."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Hires
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.hires import IMAGE, KW, LATENT, SOME, ours, reference


@pytest.fixture(scope="module")
def sd1(exports):
    with Pipeline.load(exports.get("sd1", "fp32"), backend="onnxruntime", device="cpu") as pipe:
        yield pipe


@pytest.mark.parametrize("upscaler", [*LATENT, *IMAGE])
def test_each_upscaler_matches_diffusers_pieces(upscaler, sd1, folders, record_property):
    """96x64 -> x1.5 (144x96), 6 then 4 second-pass steps at strength 0.6, Euler."""
    from tests.helpers.images import check

    mine = ours(sd1, upscaler=upscaler, scale=1.5, steps=4, strength=0.6)
    assert mine.shape == (1, 96, 144, 3)
    record_property(
        "psnr_db", check(mine, reference(folders["sd1"], False, upscaler, (144, 96), steps=4, strength=0.6))
    )


def test_second_pass_settings_and_batches_match(sd1, folders, record_property):
    """Two images per prompt through the image upscaler (an init image per row, one posterior draw over them), the
    hires prompt, guidance and another sampler, the size from hr_resize_x alone."""
    from tests.helpers.images import check

    hires = dict(upscaler="Lanczos", width=192, strength=0.75, sampler="dpmpp_2m", prompt="a red fox, oil painting",
                 guidance=4.0)  # fmt: skip
    mine = ours(sd1, n=2, **hires)
    assert mine.shape == (2, 128, 192, 3)
    ref = reference(folders["sd1"], False, "Lanczos", (192, 128), hr_sampler="dpmpp_2m", strength=0.75, n=2,
                    hr_prompt="a red fox, oil painting", hr_cfg=4.0)  # fmt: skip
    record_property("psnr_db", check(mine, ref))


@pytest.mark.parametrize("upscaler", SOME)
def test_sdxl_matches_diffusers_pieces(upscaler, exports, folders, record_property):
    from tests.helpers.images import check

    with Pipeline.load(exports.get("sdxl", "fp32"), backend="onnxruntime", device="cpu") as pipe:
        mine = ours(pipe, upscaler=upscaler, scale=2, steps=3, strength=0.5)
    record_property(
        "psnr_db", check(mine, reference(folders["sdxl"], True, upscaler, (192, 128), steps=3, strength=0.5))
    )


@pytest.mark.parametrize(
    "hires,extra,field,words",
    [
        (dict(scale=4), {}, "hires.scale", "is outside the 64-192 px"),
        (dict(scale=0.5), {}, "hires.scale", "[1, 8]"),
        (dict(upscaler="R-ESRGAN 4x+"), {}, "hires.upscaler", "Latent (bicubic)"),
        (dict(width=128, height=160), {}, "hires.width", "in proportion"),
        (dict(strength=0), {}, "hires.strength", "(0, 1]"),
        (dict(sampler="nope"), {}, "hires.sampler", "unknown sampler"),
        (dict(steps=-1), {}, "hires.steps", ">= 0"),
        (dict(), dict(image=Image.new("RGB", (96, 64))), "hires", "txt2img"),
    ],
)
def test_bad_hires_settings_are_one_line_naming_the_field(hires, extra, field, words, sd1):
    with pytest.raises(SdrtError) as err:
        sd1(**dict(KW, **extra), hires=Hires(**hires))
    assert err.value.field == field and words in str(err.value) and "\n" not in str(err.value)


def test_cli_and_v1_images_give_the_pipelines_picture(sd1, exports, tmp_path):
    """`sdrt generate --hires-*` and ``POST /v1/images`` with ``hires``: the Python call's picture, byte for byte,
    two requests with equal hires settings joined in one server batch, and the PNG's hires parameters."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    from sdrt.cli import main
    from tests.helpers.server import LiveServer

    kw = dict(KW, num_inference_steps=4)
    hires = Hires(scale=2, upscaler="Nearest", steps=3, strength=0.5, guidance=3.0)
    want = {s: np.asarray(sd1(**dict(kw, seed=s), sampler="euler", hires=hires)[0]) for s in (5, 6)}
    out = tmp_path / "hires.png"
    rc = main(["generate", str(exports.get("sd1", "fp32")), kw["prompt"], "--negative-prompt", "blurry", "--steps",
               "4", "--guidance", "6", "--height", "64", "--width", "96", "--seed", "5", "--sampler", "euler",
               "--backend", "onnxruntime", "--device", "cpu", "--hires-scale", "2", "--hires-upscaler", "Nearest",
               "--hires-steps", "3", "--hires-strength", "0.5", "--hires-guidance", "3", "--out", str(out),
               "--quiet"])  # fmt: skip
    assert rc == 0
    with Image.open(out) as png:
        assert np.array_equal(np.asarray(png), want[5])
        text = png.text["parameters"]
    assert "Size: 96x64" in text and "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 3, Hires upscaler: " \
        "Nearest, Hires CFG Scale: 3" in text  # fmt: skip
    server = LiveServer(sd1, window_ms=500.0)
    try:
        body = dict(
            prompt=kw["prompt"],
            negative_prompt="blurry",
            steps=4,
            guidance=6.0,
            height=64,
            width=96,
            sampler="euler",
            hires=dict(scale=2, upscaler="Nearest", steps=3, strength=0.5, guidance=3.0),
        )
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda s: server.post("/v1/images", dict(body, seed=s)), (5, 6)))
        for seed, r in zip((5, 6), answers, strict=True):
            assert r.status_code == 200, r.text
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
            assert np.array_equal(got, want[seed]), seed
        assert {a.json()["batch"]["requests"] for a in answers} == {2}  # one engine batch for both
        r = server.post("/v1/images", dict(body, hires=dict(upscaler="ESRGAN_4x")))
        assert r.status_code == 400 and r.json()["field"] == "hires.upscaler"
    finally:
        server.stop()
