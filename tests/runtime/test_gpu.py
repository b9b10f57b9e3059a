"""On a CUDA GPU: graph replay equals the step-by-step path, and the torch backend's image equals diffusers'
fp16 image on the same GPU. Marked `gpu`: skipped (not failed) where torch sees no CUDA device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import psnr

pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu")]  # gpu: skipped without CUDA
PROMPT = "a watercolor fox in the snow, detailed"


@pytest.fixture(scope="module")
def engine(folders, tmp_path_factory):
    """The SD1-like folder exported fp16, with torch programs (the CUDA-graph path without TensorRT), and a
    2-vector textual-inversion embedding, "badthing"."""
    from safetensors.torch import save_file

    from sdrt.export import Dims, export_model
    from sdrt.runtime.embeddings import add_embedding

    out = tmp_path_factory.mktemp("gpu") / "sd1-fp16"
    export_model(str(folders["sd1"]), out, precision="fp16", dims=Dims(64, 256, 2), torch_programs=True)
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 0.5},
              str(out.parent / "badthing.safetensors"))  # fmt: skip
    add_embedding(out, out.parent / "badthing.safetensors")
    return out


def images(pipe: Pipeline, **kw) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe(**kw)])


KW = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=8, guidance_scale=7.0, height=128,
          width=192, seed=11)  # fmt: skip


@pytest.mark.parametrize(
    "sampler", ["euler_a", "heun", "dpm2_a", "dpmpp_sde", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "pndm", "unipc"]
)
def test_graph_replay_equals_step_by_step(engine, sampler, record_property):
    graph = Pipeline.load(engine, backend="torch", device="cuda", cuda_graph=True)
    steps = Pipeline.load(engine, backend="torch", device="cuda", cuda_graph=False)
    assert graph.cuda_graph and not steps.cuda_graph
    a = images(graph, sampler=sampler, **KW)
    a2 = images(graph, sampler=sampler, **KW)  # the second call replays the captured graph
    b = images(steps, sampler=sampler, **KW)
    record_property("graph_vs_steps_psnr_db", psnr(a, b))
    assert np.array_equal(a, a2)
    assert psnr(a, b) >= 50.0


WEBUI = [  # what a captured graph must hold: chunks per side, two U-Net calls a step, DDIM's noise, the rescale
    dict(prompt="a (red:1.4) fox BREAK in the snow", negative_prompt="(blurry:1.2) " * 20, prompt_syntax="webui"),
    dict(prompt="a (red:1.4) fox BREAK in the snow", negative_prompt="blurry", prompt_syntax="webui", clip_skip=1),
    dict(prompt=PROMPT, negative_prompt="(badthing:1.2), blurry", prompt_syntax="webui"),  # an embedding's vectors
    dict(prompt=PROMPT, negative_prompt="blurry", sampler="ddim", eta=0.8, guidance_rescale=0.5),
]


@pytest.mark.parametrize("case", range(len(WEBUI)))
def test_graph_replay_equals_step_by_step_for_web_ui_prompts_and_eta(engine, case, record_property):
    kw = {**KW, "sampler": "euler", **WEBUI[case]}
    graph = Pipeline.load(engine, backend="torch", device="cuda", cuda_graph=True)
    steps = Pipeline.load(engine, backend="torch", device="cuda", cuda_graph=False)
    a, a2, b = images(graph, **kw), images(graph, **kw), images(steps, **kw)
    record_property("graph_vs_steps_psnr_db", psnr(a, b))
    assert np.array_equal(a, a2) and psnr(a, b) >= 50.0


@pytest.mark.parametrize("upscaler", ["Latent (bicubic antialiased)", "Lanczos"])
def test_hires_fix_graph_replay_equals_step_by_step(engine, upscaler, record_property):
    """The hires fix's two passes, each a captured graph (the second at 1.5x the size, from upscaled latents or
    from the upscaled picture re-encoded), against the step-by-step path; a second call replays both graphs."""
    from sdrt.runtime.params import Hires

    kw = {**KW, "sampler": "dpmpp_2m", "height": 128, "width": 128, "num_images_per_prompt": 2,
          "hires": Hires(scale=1.5, upscaler=upscaler, steps=6, strength=0.6, sampler="euler_a")}  # fmt: skip
    graph = Pipeline.load(engine, backend="torch", device="cuda", cuda_graph=True)
    steps = Pipeline.load(engine, backend="torch", device="cuda", cuda_graph=False)
    a, a2, b = images(graph, **kw), images(graph, **kw), images(steps, **kw)
    assert a.shape == (2, 192, 192, 3)
    record_property("graph_vs_steps_psnr_db", psnr(a, b))
    assert np.array_equal(a, a2) and psnr(a, b) >= 50.0


def test_torch_backend_matches_diffusers_fp16_on_the_same_gpu(engine, folders, record_property):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folders["sd1"], torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = {k: v for k, v in KW.items() if k != "seed"}
    ref = pipe(**kw, generator=torch.Generator("cpu").manual_seed(KW["seed"]), output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    ours = images(Pipeline.load(engine, backend="torch", device="cuda"), sampler="euler", **KW)
    db = psnr(ours, ref)
    record_property("torch_vs_diffusers_fp16_psnr_db", db)
    print(f"torch backend vs diffusers fp16 on {torch.cuda.get_device_name()}: PSNR {db:.1f} dB")
    assert db >= 30.0


def test_onnxruntime_cuda_matches_cpu_fp32(engine, exports, record_property):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (onnxruntime-gpu)")
    ours = images(Pipeline.load(engine, backend="onnxruntime", device="cuda"), sampler="euler", **KW)
    ref = images(Pipeline.load(exports.get("sd1", "fp32"), backend="onnxruntime", device="cpu"), sampler="euler", **KW)
    db = psnr(ours, ref)
    record_property("ort_cuda_fp16_vs_cpu_fp32_psnr_db", db)
    assert db >= 30.0


@pytest.fixture(scope="module")
def xl_inpaint_engine(folders, tmp_path_factory):
    """The SDXL-like inpainting folder (9-channel U-Net) exported fp16 with torch programs."""
    from sdrt.export import Dims, export_model

    out = tmp_path_factory.mktemp("gpu") / "sdxl-inpaint-fp16"
    export_model(str(folders["sdxl-inpaint"]), out, precision="fp16", dims=Dims(64, 256, 2), torch_programs=True)
    return out


def test_sdxl_inpainting_and_joined_batches_replay_as_one_graph(xl_inpaint_engine, record_property):
    """SDXL conditioning, the inpainting U-Net's extra channels and a joined batch of two requests inside one
    captured graph: equal to the step-by-step path, and each joined request equal to itself alone (GPU kernels
    may differ by batch size, so bit-equality is recorded and 50 dB asserted)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8))
    mask = np.zeros((128, 192), np.uint8)
    mask[16:96, 32:160] = 255
    mask = Image.fromarray(mask)
    graph = Pipeline.load(xl_inpaint_engine, backend="torch", device="cuda", cuda_graph=True)
    steps = Pipeline.load(xl_inpaint_engine, backend="torch", device="cuda", cuda_graph=False)
    reqs = [
        graph.request(Params(prompt=p, steps=6, guidance=6.0, height=128, width=192, seed=s, sampler="euler_a",
                             image=image, strength=1.0, mask=mask))
        for p, s in (("a", 1), ("b", 2))
    ]  # fmt: skip
    joined = graph.generate_batch(reqs).pixels
    for i, (j, r) in enumerate(zip(joined, reqs, strict=True)):
        alone = graph.generate_batch([r]).pixels[0]  # its own capture, then a replay of it
        record_property(f"joined_{i}_bit_equal_alone", bool(torch.equal(j, alone)))
        assert psnr(j.numpy(), alone.numpy()) >= 50.0
        assert psnr(j.numpy(), steps.generate(r).numpy()) >= 50.0


@pytest.fixture(scope="module")
def lora_engine(engine, folders, tmp_path_factory):
    """The fp16 engine with two adapters added (kohya and PEFT files written by test_lora's helpers)."""
    import shutil

    import diffusers

    from sdrt.cli import main
    from tests.helpers.lora import kohya_lora, peft_lora

    root = tmp_path_factory.mktemp("gpu-lora") / "sd1-fp16"
    shutil.copytree(engine, root)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd1"], local_files_only=True)
    assert main(["lora", "add", str(root), str(kohya_lora(root.parent / "k.safetensors", pipe, 1))]) == 0
    assert main(["lora", "add", str(root), str(peft_lora(root.parent / "p.safetensors", pipe, 2)), "--name", "p"]) == 0
    return root


def _switching_is_exact(root, backend: str) -> None:
    """A -> B -> A -> none through one captured graph, each byte for byte a fresh pipeline's first call."""
    sets = [{"k": 1.0}, {"p": 0.8, "k": 0.3}, {"k": 1.0}, None]
    fresh = {}
    for s in sets:
        with Pipeline.load(root, backend=backend, device="cuda", cuda_graph=True) as p:
            fresh[str(s)] = images(p, sampler="euler", loras=s, **KW)
    with Pipeline.load(root, backend=backend, device="cuda", cuda_graph=True) as p:
        assert p.cuda_graph
        for s in sets:
            assert np.array_equal(images(p, sampler="euler", loras=s, **KW), fresh[str(s)]), s
    assert psnr(fresh[str(sets[0])], fresh["None"]) < 40.0  # the adapter changes the picture


def test_lora_switching_in_a_captured_graph_torch(lora_engine):
    """In-place copies into the torch programs' parameters: the captured graph sees them without recapture."""
    _switching_is_exact(lora_engine, "torch")


@pytest.mark.tensorrt
def test_lora_switching_in_a_captured_graph_tensorrt(lora_engine, tmp_path):
    """TensorRT plans built with the adapters' weights refittable, refitted on the stream between requests."""
    pytest.importorskip("tensorrt")
    import shutil

    from sdrt.cli import main

    root = Path(shutil.copytree(lora_engine, tmp_path / "e"))
    assert main(["build", str(root), "--backend", "tensorrt", "--height", "128", "--width", "192"]) == 0
    _switching_is_exact(root, "tensorrt")


@pytest.fixture(scope="module")
def controlnet_engine(folders, tmp_path_factory):
    """The SD1-like folder exported fp16 with two ControlNets (test_controlnet's) and torch programs."""
    from sdrt.cli import main
    from tests.helpers.controlnet import make_controlnet

    root = tmp_path_factory.mktemp("gpu-controlnet")
    cns = [make_controlnet(folders["sd1"] / "unet", root / name, seed=s) for name, s in (("canny", 3), ("depth", 4))]
    args = [str(folders["sd1"]), str(root / "e"), "--min-size", "64", "--max-size", "256", "--max-batch", "2"]
    assert main(["export", *args, "--torch-programs", *[f"--controlnet={c}" for c in cns]]) == 0
    return root / "e"


def _controlnet_replays(root, backend: str, record_property) -> None:
    """Two ControlNets, their scales and windows as device buffers: one captured graph per layout, replayed for
    other scales; each equals the step-by-step path, and the ControlNets change the picture."""
    from tests.helpers.controlnet import control_image

    cn = dict(controlnet=["canny", "depth"], control_image=[control_image(), control_image(64, 64)])
    kws = [
        dict(controlnet_conditioning_scale=[1.0, 0.5]),
        dict(controlnet_conditioning_scale=[0.4, 1.2], control_guidance_start=0.2, control_guidance_end=0.8),
    ]
    with Pipeline.load(root, backend=backend, device="cuda", cuda_graph=True) as graph:
        with Pipeline.load(root, backend=backend, device="cuda", cuda_graph=False) as steps:
            assert graph.cuda_graph
            for kw in kws:
                a = images(graph, sampler="euler", **cn, **kw, **KW)
                b = images(steps, sampler="euler", **cn, **kw, **KW)
                record_property(f"controlnet_graph_vs_steps_psnr_db_{backend}", psnr(a, b))
                assert psnr(a, b) >= 50.0
            assert psnr(a, images(graph, sampler="euler", **KW)) < 40.0


def test_controlnet_in_a_captured_graph_torch(controlnet_engine, record_property):
    _controlnet_replays(controlnet_engine, "torch", record_property)


@pytest.mark.tensorrt
def test_controlnet_in_a_captured_graph_tensorrt(controlnet_engine, tmp_path, record_property):
    """The ControlNet graphs and unet_controlnet as TensorRT plans, inside the captured loop."""
    pytest.importorskip("tensorrt")
    import shutil

    from sdrt.cli import main

    root = Path(shutil.copytree(controlnet_engine, tmp_path / "e"))
    assert main(["build", str(root), "--backend", "tensorrt", "--height", "128", "--width", "192"]) == 0
    _controlnet_replays(root, "tensorrt", record_property)
