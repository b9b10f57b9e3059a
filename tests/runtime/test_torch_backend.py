"""The torch backend (`export --torch-programs`, the CUDA-graph path on a GPU without TensorRT) on the CPU: the
saved programs load and draw diffusers' picture, fp32 and fp16, so the programs a GPU check loads are known good
before any GPU runs them. Step by step only: CUDA-graph capture needs a GPU (tests/runtime/test_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from tests.helpers.hires import SOME

# with test_sizes.py's native96 tests: the worker that makes the native96 export runs every test that reads it
pytestmark = pytest.mark.xdist_group("native96")
KW = dict(prompt="a watercolor fox in the snow, detailed", negative_prompt="blurry", num_inference_steps=5,
          guidance_scale=6.0, height=64, width=128, seed=7)  # fmt: skip


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def engine(request, folders, exports, native96):
    """(precision, engine directory, the diffusers folder it came from): the session's exports with torch programs,
    fp32 from the sd1-native96 folder (the sd1 model trained at 12 latents: the same picture at a given size) and
    fp16 from sd1, both shared with the other test modules."""
    if request.param == "fp32":
        return "fp32", native96, folders["sd1-native96"]
    return "fp16", exports.get("sd1", "fp16"), folders["sd1"]


def test_torch_programs_draw_diffusers_picture(engine):
    from tests.helpers.images import check, sdrt_images
    from tests.helpers.reference import diffusers_images

    precision, root, folder = engine
    pipe = Pipeline.load(root, backend="torch", device="cpu")
    assert pipe.backend.name == "torch" and not pipe.cuda_graph
    ours = sdrt_images(pipe, sampler="euler_a", **KW)
    ref = diffusers_images(folder, "euler_a", **KW)
    # fp16 programs run in half precision (as diffusers does on a GPU) against diffusers' fp32 on the CPU
    check(ours, ref, min_db=40.0 if precision == "fp32" else 30.0)


def test_torch_and_onnxruntime_backends_agree(engine):
    _, root, _ = engine
    a = Pipeline.load(root, backend="torch", device="cpu")
    b = Pipeline.load(root, backend="onnxruntime", device="cpu")
    images = [np.stack([np.asarray(im) for im in p(sampler="dpmpp_2m_karras", **KW)]) for p in (a, b)]
    from tests.helpers.images import psnr

    assert psnr(*images) >= 35.0


def test_torch_programs_read_web_ui_prompts_embeddings_and_clip_skip(native96, folders, tmp_path):
    """The web UI's reading on the torch programs: emphasis, BREAK, a 2-chunk negative, clip skip and a 2-vector
    embedding in the negative, against float64 states of diffusers' text encoder with the same file loaded by its
    own load_textual_inversion (1e-5), and the picture against diffusers' pipeline on those states (>= 40 dB)."""
    import shutil

    from sdrt.cli import main
    from sdrt.runtime.params import Params
    from tests.helpers.embeddings import reference_pipe, write
    from tests.helpers.images import check
    from tests.helpers.prompts import CHUNKED, CHUNKED_PARSED, reference_states, sdrt_states
    from tests.helpers.reference import diffusers_images

    root = tmp_path / "native96"
    shutil.copytree(native96, root)
    path, vs = write(tmp_path / "badthing.safetensors", "sd1", 2, seed=11)
    assert main(["embedding", "add", str(root), str(path)]) == 0
    negative = "(badthing:1.2) " + "low quality " * 8  # 2 vectors + 8 x 10 letter tokens: two chunks
    ref_pipe = reference_pipe(folders["sd1-native96"], "sd1", {"badthing": (path, vs)})
    cond, _ = reference_states(ref_pipe, CHUNKED_PARSED, skip=1)
    low = ("low quality " * 8).rstrip(" ")
    uncond, _ = reference_states(ref_pipe, [("badthing badthing_1", 1.2), (" " + low, 1.0)], skip=1)
    assert uncond.shape[1] == 154
    kw = dict(seed=2, sampler="euler", prompt_syntax="webui", clip_skip=1)
    with Pipeline.load(root, backend="torch", device="cpu") as pipe:
        params = Params(prompt=CHUNKED, negative_prompt=negative, steps=4, height=64, width=64, **kw)
        for ours, ref in zip(sdrt_states(pipe, params), (cond, uncond), strict=True):
            assert ours.shape == ref.shape
            assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-5
        ours = np.stack([np.asarray(im) for im in pipe(CHUNKED, negative, num_inference_steps=4, height=64, width=64,
                                                       guidance_scale=7.0, **kw)])  # fmt: skip
    embeds = dict(prompt_embeds=cond.float(), negative_prompt_embeds=uncond.float())
    ref = diffusers_images(folders["sd1-native96"], "euler", seed=2, num_inference_steps=4, height=64, width=64,
                           guidance_scale=7.0, **embeds)  # fmt: skip
    check(ours, ref)


@pytest.mark.parametrize("upscaler", SOME)
def test_torch_programs_hires_fix(upscaler, native96, folders, record_property):
    """The hires fix (both passes in one body with a latent upscaler; PIL between them with an image one) on the
    fp32 torch programs, against diffusers' pieces."""
    from tests.helpers.hires import ours, reference
    from tests.helpers.images import check

    with Pipeline.load(native96, backend="torch", device="cpu") as pipe:
        mine = ours(pipe, upscaler=upscaler, scale=1.5, steps=4, strength=0.6)
    ref = reference(folders["sd1-native96"], False, upscaler, (144, 96), steps=4, strength=0.6)
    record_property("psnr_db", check(mine, ref))
