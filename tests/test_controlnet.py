"""ControlNet: `sdrt export --controlnet` and txt2img with one ControlNet against diffusers'
StableDiffusionControlNetPipeline on the same folder, ControlNet, prompt, seed and control image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import NEGATIVE, PROMPT, SCHEDULERS, check, psnr, sdrt_images

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.xdist_group("controlnet")
SIZES = ["--min-size", "64", "--max-size", "192", "--max-batch", "2"]


def make_controlnet(unet_folder, dest, cross_attention: bool = False):
    """diffusers' ControlNetModel.from_unet, its zero-initialised output convolutions given random weights so that
    it visibly changes the picture."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder, local_files_only=True)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    cn.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def cn_export(folders, tmp_path_factory):
    from sdrt.runtime.cli import main

    root = tmp_path_factory.mktemp("controlnet")
    cn = make_controlnet(folders["sd1"] / "unet", root / "canny")
    dest = root / "engine"
    assert main(["export", str(folders["sd1"]), str(dest), "--precision", "fp32", *SIZES, "--controlnet", str(cn)]) == 0
    return dest, cn


@pytest.fixture(scope="module")
def pipe(cn_export):
    with Pipeline.load(cn_export[0], backend="onnxruntime", device="cpu") as p:
        yield p


def control_image(w: int = 96, h: int = 64) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    edges = ((xx // 8 + yy // 8) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([edges, (xx * 3 % 256).astype(np.uint8), edges[::-1]], -1))


def reference(folder, cn_folder, sampler: str, **kw) -> np.ndarray:
    import diffusers

    cn = diffusers.ControlNetModel.from_pretrained(cn_folder, local_files_only=True)
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=cn, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="pil")
    return np.stack([np.asarray(im) for im in out.images])


def test_manifest_records_both_graphs_verified(cn_export):
    import json

    m = json.loads((cn_export[0] / "manifest.json").read_text())
    cn, unet = m["graphs"]["controlnet_canny"], m["graphs"]["unet_controlnet"]
    assert m["controlnets"]["canny"]["graph"] == "controlnet_canny"
    # sd1's U-Net: conv_in, block 0 (resnet, downsampler), block 1 (resnet); mid at the second level
    assert list(cn["outputs"]) == [f"down_residual_{i}" for i in range(4)] + ["mid_residual"]
    assert cn["outputs"]["down_residual_2"]["shape"] == ["B", 32, "h/2", "w/2"]
    assert list(unet["inputs"])[3:] == list(cn["outputs"]) and cn["inputs"]["controlnet_cond"]["shape"][2] == "H"
    for g in (cn, unet):
        assert g["verify"]["passed"] and g["rows"] == [1, 4]
        assert any(s["latent"][0] % 2 for s in g["verify"]["shapes"]) or any(
            s["latent"][1] % 2 for s in g["verify"]["shapes"]
        )  # a size the down path does not divide
    assert "controlnet_canny" not in m["graphs"]["unet"]["file"]


@pytest.mark.parametrize(
    "sampler,scale,start,end,height,width",
    [("euler", 1.0, 0.0, 1.0, 64, 128), ("ddim", 0.5, 0.2, 0.8, 128, 64), ("dpmpp_2m", 1.0, 0.2, 0.8, 64, 64)],
)
def test_txt2img_matches_diffusers(pipe, cn_export, folders, sampler, scale, start, end, height, width):
    """sdrt against diffusers (>= 40 dB), and the ControlNet visibly changes the picture (< 30 dB without it)."""
    image = control_image()  # 96 x 64: resized to the request's size, as diffusers does
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0, height=height,
              width=width, seed=21)  # fmt: skip
    ours = sdrt_images(pipe, sampler=sampler, controlnet="canny", control_image=image,
                       controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                       **kw)  # fmt: skip
    ref = reference(folders["sd1"], cn_export[1], sampler, image=image, controlnet_conditioning_scale=scale,
                    control_guidance_start=start, control_guidance_end=end, **kw)  # fmt: skip
    db = check(ours, ref)
    without = sdrt_images(pipe, sampler=sampler, **kw)
    assert psnr(ours, without) < db - 10 and psnr(ours, without) < 30
    print(
        f"{sampler} scale {scale} {start}-{end} {height}x{width}: PSNR {db:.1f} dB, without {psnr(ours, without):.1f}"
    )


def test_requests_with_other_scales_join_and_match_alone(pipe):
    common = dict(steps=3, height=64, width=64, sampler="euler", controlnet="canny", control_image=control_image())
    a = pipe.request(Params(prompt="a fox", seed=1, control_scale=0.7, **common))
    b = pipe.request(Params(prompt="a boat", seed=2, control_scale=1.3, control_start=0.3, **common))
    assert a.join_key == b.join_key
    for joined, r in zip(pipe.generate_batch([a, b]).pixels, (a, b), strict=True):
        assert torch.equal(joined, pipe.generate(r))
    plain = pipe.request(Params(prompt="a fox", seed=1, steps=3, height=64, width=64, sampler="euler"))
    assert plain.join_key != a.join_key


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(controlnet="depth", control_image=control_image()), "no ControlNet 'depth'; it has canny"),
        (dict(controlnet="canny"), "give control_image"),
        (dict(control_image=control_image()), "give controlnet (this directory has: canny)"),
        (
            dict(
                controlnet="canny", control_image=control_image(), control_guidance_start=0.8, control_guidance_end=0.2
            ),
            "0 <= start < end <= 1",
        ),  # fmt: skip
        (dict(controlnet="canny", control_image="/nonexistent.png"), "cannot read control image"),
    ],
)
def test_bad_control_requests_are_one_line(pipe, kw, msg):
    with pytest.raises(SdrtError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        pipe(prompt="x", num_inference_steps=2, **kw)


def test_cli_generate_with_controlnet(cn_export, tmp_path):
    from sdrt.runtime.cli import main

    control_image().save(tmp_path / "edges.png")
    out = tmp_path / "o.png"
    args = ["generate", str(cn_export[0]), "a fox", "--steps", "2", "--seed", "3", "--out", str(out), "--quiet"]
    assert main([*args, "--controlnet", "canny", "--control-image", str(tmp_path / "edges.png")]) == 0
    img = Image.open(out)
    assert img.size == (96, 64) and "ControlNet: canny (scale 1" in img.text["parameters"]


def test_export_refusals_are_one_line(folders, tmp_path, capsys):
    """Nothing is written: not a ControlNet folder, pickle-only weights, a ControlNet of another U-Net."""
    import diffusers

    from sdrt.runtime.cli import main

    pickle = tmp_path / "pickled"
    diffusers.ControlNetModel.from_pretrained(make_controlnet(folders["sd1"] / "unet", tmp_path / "c")).save_pretrained(
        pickle, safe_serialization=False
    )
    xl = make_controlnet(folders["sdxl"] / "unet", tmp_path / "xl")
    cases = [
        (folders["sd1"] / "vae", "not a diffusers ControlNet folder"),
        (pickle, "has no .safetensors weights"),
        (xl, "its cross-attention width is 96, the model's U-Net has 32"),
    ]
    for folder, msg in cases:
        dest = tmp_path / "out"
        rc = main(["export", str(folders["sd1"]), str(dest), "--precision", "fp32", "--controlnet", str(folder)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and msg in err[-1] and not dest.exists(), err
        assert not list(tmp_path.glob(".out*"))
