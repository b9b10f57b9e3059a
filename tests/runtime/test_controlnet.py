"""ControlNet: `sdrt export --controlnet` and generation with one or two ControlNets against diffusers' ControlNet
pipelines (txt2img, img2img, inpainting; SD and SDXL) on the same folder, ControlNets, prompt, seed and control
images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import ControlNetArg, Params
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.controlnet import control_image, make_controlnet
from tests.helpers.images import check, init_and_mask, psnr, sdrt_images
from tests.helpers.reference import NEGATIVE, PROMPT, SCHEDULERS

pytestmark = pytest.mark.xdist_group("controlnet")
SIZES = ["--min-size", "64", "--max-size", "192", "--max-batch", "2"]


@pytest.fixture(scope="module")
def cn_export(folders, tmp_path_factory):
    from sdrt.cli import main

    root = tmp_path_factory.mktemp("controlnet")
    cn = make_controlnet(folders["sd1"] / "unet", root / "canny")
    depth = make_controlnet(folders["sd1"] / "unet", root / "depth_folder", seed=4)
    dest = root / "engine"
    args = ["--controlnet", str(cn), "--controlnet", f"{depth}=depth", "--torch-programs"]
    assert main(["export", str(folders["sd1"]), str(dest), "--precision", "fp32", *SIZES, *args]) == 0
    return dest, cn, depth


@pytest.fixture(scope="module")
def pipe(cn_export):
    with Pipeline.load(cn_export[0], backend="onnxruntime", device="cpu") as p:
        yield p


def reference(folder, cn_folders, sampler: str, pipeline: str = "StableDiffusionControlNetPipeline", lora=None, **kw):
    """diffusers' ``pipeline`` with the ControlNet folder (a list: a MultiControlNetModel of them); ``lora``: a
    (file, scale) fused into the model as diffusers fuses it."""
    import diffusers

    cns = [diffusers.ControlNetModel.from_pretrained(f, local_files_only=True) for f in np.atleast_1d(cn_folders)]
    load = dict(local_files_only=True, controlnet=cns if isinstance(cn_folders, list) else cns[0])
    if "XL" not in pipeline:
        load.update(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, pipeline).from_pretrained(folder, **load)
    name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora[0]))
        pipe.fuse_lora(lora_scale=lora[1])
        pipe.unload_lora_weights()
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="pil")
    return np.stack([np.asarray(im) for im in out.images])


def test_manifest_records_both_graphs_verified(cn_export):
    import json

    m = json.loads((cn_export[0] / "manifest.json").read_text())
    cn, unet = m["graphs"]["controlnet_canny"], m["graphs"]["unet_controlnet"]
    assert m["controlnets"]["canny"]["graph"] == "controlnet_canny" and "controlnet_depth" in m["graphs"]
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


def test_two_controlnets_match_multicontrolnet(pipe, cn_export, folders):
    """Two ControlNets with their own scales and windows add up as diffusers' MultiControlNetModel adds them, on
    ONNX Runtime and on the torch programs."""
    images = [control_image(), control_image(64, 64).transpose(Image.FLIP_LEFT_RIGHT)]
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, height=64, width=96,
              seed=5, controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.25],
              control_guidance_end=[1.0, 1.0])  # fmt: skip
    ours = sdrt_images(pipe, sampler="euler", controlnet=["canny", "depth"], control_image=images, **kw)
    ref = reference(folders["sd1"], [cn_export[1], cn_export[2]], "euler", image=images, **kw)
    db = check(ours, ref)
    one = {**kw, "controlnet_conditioning_scale": 0.8, "control_guidance_start": 0.0, "control_guidance_end": 1.0}
    alone = sdrt_images(pipe, sampler="euler", controlnet="canny", control_image=images[0], **one)
    assert psnr(ours, alone) < db - 10, "the second ControlNet changed nothing"
    print(f"two ControlNets: PSNR {db:.1f} dB, the first alone {psnr(ours, alone):.1f}")
    with Pipeline.load(cn_export[0], backend="torch", device="cpu") as torch_pipe:  # the torch programs
        db_torch = check(sdrt_images(torch_pipe, sampler="euler", controlnet=["canny", "depth"], control_image=images,
                                     **kw), ref)  # fmt: skip
    print(f"two ControlNets, torch backend: PSNR {db_torch:.1f} dB")


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpainting_match_diffusers(pipe, cn_export, folders, mode):
    """StableDiffusionControlNetImg2ImgPipeline / ...InpaintPipeline (a 4-channel U-Net: the kept region blended
    back), strength below 1, the control image resized to the init image's size."""
    init, mask = init_and_mask()
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0, height=64,
              width=128, seed=8, strength=0.7, controlnet_conditioning_scale=0.9)  # fmt: skip
    extra = {"mask_image": mask} if mode == "inpaint" else {}
    ours = sdrt_images(pipe, sampler="dpmpp_2m", image=init, controlnet="canny", control_image=control_image(), **extra,
                       **kw)  # fmt: skip
    name = "StableDiffusionControlNetInpaintPipeline" if extra else "StableDiffusionControlNetImg2ImgPipeline"
    ref = reference(folders["sd1"], cn_export[1], "dpmpp_2m", pipeline=name, image=init, control_image=control_image(),
                    **extra, **kw)  # fmt: skip
    db = check(ours, ref)
    without = sdrt_images(pipe, sampler="dpmpp_2m", image=init, **extra, **kw)
    assert psnr(ours, without) < db - 10
    print(f"{mode}: PSNR {db:.1f} dB, without the ControlNet {psnr(ours, without):.1f}")


@pytest.fixture(scope="module")
def other_exports(folders, tmp_path_factory):
    """An inpainting (9-channel) SD U-Net and an SDXL folder, each exported with one ControlNet."""
    from sdrt.cli import main

    root, out = tmp_path_factory.mktemp("controlnet-other"), {}
    for kind in ("sd1-inpaint", "sdxl"):
        cn = make_controlnet(folders[kind] / "unet", root / f"{kind}-cn", seed=6)
        out[kind] = (root / kind, cn)
        args = [
            "export",
            str(folders[kind]),
            str(root / kind),
            "--precision",
            "fp32",
            *SIZES,
            "--controlnet",
            f"{cn}=c",
        ]
        assert main(args) == 0
    return out


@pytest.mark.parametrize(
    "kind,pipeline,sampler",
    [
        ("sd1-inpaint", "StableDiffusionControlNetInpaintPipeline", "euler"),
        ("sdxl", "StableDiffusionXLControlNetPipeline", "euler_a"),
        ("sdxl", "StableDiffusionXLControlNetImg2ImgPipeline", "euler"),
        ("sdxl", "StableDiffusionXLControlNetInpaintPipeline", "dpmpp_2m"),
    ],
)
def test_inpainting_unet_and_sdxl_match_diffusers(other_exports, folders, kind, pipeline, sampler):
    """A 9-channel U-Net (the ControlNet reads the latents alone) and SDXL's added conditions in the ControlNet,
    txt2img, img2img and inpainting (strength given: diffusers' SDXL inpainting default is 0.9999)."""
    engine, cn = other_exports[kind]
    init, mask = init_and_mask()
    extra = (
        dict(image=init, mask_image=mask)
        if "Inpaint" in pipeline
        else dict(image=init)
        if "Img2Img" in pipeline
        else {}
    )
    if kind == "sdxl" and extra:
        extra["strength"] = 0.7
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, height=64,
              width=128, seed=13, controlnet_conditioning_scale=0.8, control_guidance_end=0.8)  # fmt: skip
    with Pipeline.load(engine, backend="onnxruntime", device="cpu") as p:
        ours = sdrt_images(p, sampler=sampler, controlnet="c", control_image=control_image(), **extra, **kw)
        without = sdrt_images(p, sampler=sampler, **extra, **kw)
    ref_image = {"control_image": control_image(), **extra} if extra else {"image": control_image()}
    db = check(ours, reference(folders[kind], cn, sampler, pipeline=pipeline, **ref_image, **kw))
    assert psnr(ours, without) < db - 10
    print(f"{kind}: PSNR {db:.1f} dB, without the ControlNet {psnr(ours, without):.1f}")


def test_requests_with_other_scales_join_and_match_alone(pipe):
    common = dict(steps=3, height=64, width=64, sampler="euler")
    first, second = ControlNetArg("canny", control_image(), 0.7), ControlNetArg("canny", control_image(32), 1.3, 0.3)
    a = pipe.request(Params(prompt="a fox", seed=1, controlnets=[first], **common))
    b = pipe.request(Params(prompt="a boat", seed=2, controlnets=[second], **common))
    assert a.join_key == b.join_key
    for joined, r in zip(pipe.generate_batch([a, b]).pixels, (a, b), strict=True):
        assert torch.equal(joined, pipe.generate(r))
    plain = pipe.request(Params(prompt="a fox", seed=1, steps=3, height=64, width=64, sampler="euler"))
    assert plain.join_key != a.join_key


@pytest.mark.parametrize(
    "kw,msg,field",
    [
        (dict(controlnet="sketch", control_image=control_image()), "no ControlNet 'sketch'; it has canny, depth",
         "controlnets.0.name"),
        (dict(controlnet=["canny", "sketch"], control_image=[control_image()] * 2), "no ControlNet 'sketch'",
         "controlnets.1.name"),
        (dict(controlnet="canny"), "give control_image", "control_image"),
        (dict(control_image=control_image()), "give controlnet", "controlnet"),
        (dict(controlnet=["canny", "depth"], control_image=control_image()), "2 ControlNet(s) and 1 control image(s)",
         "control_image"),
        (dict(controlnet=["canny", "depth"], control_image=[control_image()] * 2,
              controlnet_conditioning_scale=[1.0] * 3), "3 values of control_scale for 2 ControlNets",
         "control_scale"),
        (dict(controlnet=["canny", "depth"], control_image=[control_image()] * 2,
              controlnet_conditioning_scale=[1.0, float("nan")]), "ControlNet 'depth': control scale must be a finite",
         "controlnets.1.scale"),
        (dict(controlnet="canny", control_image=control_image(), control_guidance_start=0.8, control_guidance_end=0.2),
         "0 <= start < end <= 1", "controlnets.0.end"),
        (dict(controlnet="canny", control_image=control_image(), control_guidance_start=-0.1),
         "0 <= start < end <= 1", "controlnets.0.start"),
        (dict(controlnet="canny", control_image="/nonexistent.png"), "cannot read control image",
         "controlnets.0.image"),
    ],
)  # fmt: skip
def test_bad_control_requests_are_one_line(pipe, kw, msg, field):
    """One line naming the fix; ``field`` names the one ControlNet at fault (the server maps it to its clients'
    spelling), or the diffusers-style argument whose counts do not match."""
    with pytest.raises(SdrtError, match=msg.replace("(", r"\(").replace(")", r"\)")) as err:
        pipe(prompt="x", num_inference_steps=2, **kw)
    assert err.value.field == field


def test_cli_generate_with_controlnet(cn_export, tmp_path):
    from sdrt.cli import main

    control_image().save(tmp_path / "edges.png")
    out = tmp_path / "o.png"
    args = ["generate", str(cn_export[0]), "a fox", "--steps", "2", "--seed", "3", "--out", str(out), "--quiet"]
    assert main([*args, "--controlnet", "canny", "--control-image", str(tmp_path / "edges.png")]) == 0
    img = Image.open(out)
    assert img.size == (96, 64) and 'ControlNet 0: "Model: canny, Weight: 1, ' in img.text["parameters"]


def test_export_refusals_are_one_line(folders, tmp_path, capsys):
    """Nothing is written: not a ControlNet folder, pickle-only weights, a ControlNet of another U-Net."""
    import diffusers

    from sdrt.cli import main

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


def test_fp16_export_and_tensorrt_rtx_build(cn_export, folders, tmp_path):
    """The deployment path: an fp16 export with a ControlNet (its graphs verified in fp16 like the U-Net), then
    TensorRT for RTX's builder (no GPU needed) on every graph, with a dynamic profile whose residual sizes are
    ceil(h / 2^k). The plans themselves run on RTX GPUs only."""
    import io

    pytest.importorskip("tensorrt_rtx")
    from sdrt.cli import main
    from sdrt.runtime.manifest import read_manifest
    from sdrt.runtime.progress import Progress
    from sdrt.trt.build import BuildOptions, build_directory

    root = tmp_path / "e"
    assert main(["export", str(folders["sd1"]), str(root), "--precision", "fp16", *SIZES, "--controlnet",
                 f"{cn_export[1]}=canny"]) == 0  # fmt: skip
    m = read_manifest(root)
    assert all(m["graphs"][g]["precision"] == "fp16" and m["graphs"][g]["verify"]["passed"]
               for g in ("unet_controlnet", "controlnet_canny"))  # fmt: skip
    report = build_directory(root, BuildOptions(backend="tensorrt-rtx", dynamic=True), Progress(io.StringIO()))
    graphs = {"controlnet_canny", "unet_controlnet"}
    assert graphs <= {n for n, r in report["graphs"].items() if r["action"] == "built"}
    assert all((root / read_manifest(root)["engines"][g]["file"]).stat().st_size > 0 for g in graphs)


@pytest.fixture(scope="module")
def lora_file(folders, tmp_path_factory):
    import diffusers

    from tests.helpers.lora import kohya_lora

    sd = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd1"], local_files_only=True)
    return kohya_lora(tmp_path_factory.mktemp("cn-lora") / "k.safetensors", sd, 1)


def test_lora_with_controlnet_matches_diffusers(cn_export, folders, lora_file, tmp_path):
    """An adapter added to a directory with ControlNets changes both U-Net graphs: LoRA and ControlNet together
    match diffusers' ControlNet pipeline with the LoRA fused at the same scale."""
    import shutil

    from sdrt.cli import main

    root = Path(shutil.copytree(cn_export[0], tmp_path / "e"))
    assert main(["lora", "add", str(root), str(lora_file)]) == 0
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, height=64, width=96,
              seed=9, controlnet="canny", control_image=control_image(), controlnet_conditioning_scale=0.8)  # fmt: skip
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as p:
        ours, plain = sdrt_images(p, sampler="euler", loras={"k": 0.7}, **kw), sdrt_images(p, sampler="euler", **kw)
    kw.pop("controlnet")
    ref = reference(folders["sd1"], cn_export[1], "euler", image=kw.pop("control_image"), lora=(lora_file, 0.7), **kw)
    db = check(ours, ref)
    assert psnr(ours, plain) < db - 10
    print(f"LoRA with ControlNet: PSNR {db:.1f} dB, without the adapter {psnr(ours, plain):.1f}")


def test_controlnet_add_then_verify(exports, cn_export, pipe, lora_file, tmp_path, capsys):
    """`sdrt controlnet add` on a directory exported without ControlNets (the session's shared sd1 export, same
    sizes) gives the images of exporting with it; `sdrt verify` re-runs parity for the added graphs; a name the
    directory has is refused in one line with nothing changed; an adapter added before the ControlNets is refused
    with them (it would change only the plain U-Net)."""
    import json
    import shutil

    from sdrt.cli import main
    from sdrt.export.directory import verify_directory

    root = Path(shutil.copytree(exports.get("sd1", "fp32"), tmp_path / "e"))
    assert main(["lora", "add", str(root), str(lora_file)]) == 0
    assert main(["controlnet", "add", str(root), f"{cn_export[1]}=canny"]) == 0
    m = json.loads((root / "manifest.json").read_text())
    assert {"unet_controlnet", "controlnet_canny"} <= set(m["graphs"]) and list(m["controlnets"]) == ["canny"]
    kw = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=96, seed=4, controlnet="canny",
              control_image=control_image())  # fmt: skip
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as added:
        assert np.array_equal(sdrt_images(added, sampler="euler", **kw), sdrt_images(pipe, sampler="euler", **kw))
    report = verify_directory(root)
    assert report["graphs"]["controlnet_canny"]["passed"] and report["graphs"]["unet_controlnet"]["passed"]
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as added:
        with pytest.raises(SdrtError, match="'k' was added before this directory's ControlNets; add it again"):
            added(loras={"k": 1.0}, **kw)

    before = (root / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(["controlnet", "add", str(root), f"{cn_export[2]}=canny"]) == 2
    assert "already has a ControlNet 'canny'" in capsys.readouterr().err
    assert (root / "manifest.json").read_bytes() == before and not list(tmp_path.glob(".e.partial*"))


def test_single_file_controlnet_loads_as_its_folder(cn_export, folders, tmp_path):
    """An original-layout .safetensors ControlNet (``control_model.*``, written from the test's diffusers
    ControlNet) loads through diffusers' converter, with a config derived from the model's U-Net and the file's
    shapes, to exactly the folder's weights; its default name drops .safetensors; a file that is not a ControlNet
    and a pickle file are refused in one line."""
    import diffusers
    from safetensors.torch import save_file

    from sdrt.export.controlnet import load_controlnet, parse_controlnet_arg
    from sdrt.runtime.manifest import sha256_file
    from tests.helpers.ldm_checkpoint import controlnet_ldm_state_dict

    cn = diffusers.ControlNetModel.from_pretrained(cn_export[1], local_files_only=True)
    file = tmp_path / "control_canny.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet_ldm_state_dict(cn).items()}, str(file))
    config = diffusers.UNet2DConditionModel.load_config(folders["sd1"] / "unet")
    loaded = load_controlnet(*parse_controlnet_arg(str(file)), config)
    assert loaded.name == "control_canny" and loaded.source["files"] == {file.name: sha256_file(file)}
    ours, ref = loaded.model.state_dict(), cn.state_dict()
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "c.ckpt").write_bytes(b"not read")
    for bad, msg in (("other.safetensors", "not a ControlNet checkpoint"), ("c.ckpt", "pickle files can run code")):
        with pytest.raises(SdrtError, match=msg):
            load_controlnet(str(tmp_path / bad), "x", config)


def test_openvino_runs_controlnet_requests(cn_export, folders):
    """The ControlNet graph and unet_controlnet on OpenVINO (f32): diffusers' picture (>= 40 dB)."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'sdrt[openvino]'")
    image = control_image()
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, height=64,
              width=96, seed=5, controlnet_conditioning_scale=0.8, control_guidance_start=0.2)  # fmt: skip
    with Pipeline.load(cn_export[0], backend="openvino", device="cpu", cpu_precision="f32") as p:
        ours = sdrt_images(p, sampler="euler", controlnet="canny", control_image=image, **kw)
    db = check(ours, reference(folders["sd1"], cn_export[1], "euler", image=image, **kw))
    print(f"OpenVINO, one ControlNet: PSNR {db:.1f} dB")
