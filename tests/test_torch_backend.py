"""The torch backend (`export --torch-programs`, the CUDA-graph path on a GPU without TensorRT) on the CPU: the
saved programs load and draw diffusers' picture, fp32 and fp16, so the programs a GPU check loads are known good
before a GPU is lent. Step by step only: CUDA-graph capture needs a GPU (tests/test_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline

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
    from test_pipeline import check, diffusers_images, sdrt_images

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
    from test_pipeline import psnr

    assert psnr(*images) >= 35.0
