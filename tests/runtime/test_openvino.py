"""The OpenVINO backend (`--backend openvino`) against diffusers' own pipelines on the same folders, seeds and sizes.

f32 inference precision is held to the 40 dB of every fp32 backend; bf16 (where the CPU has it) to the bound
measured for it (README, "OpenVINO on the CPU"). Compiled models go to a cache folder of this module's own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, psnr, sdrt_images
from tests.helpers.reference import NEGATIVE, PROMPT, diffusers_images

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'sdrt[openvino]'")

from sdrt.runtime.openvino import OpenVinoBackend, cpu_precisions  # noqa: E402

HAS_BF16 = "bf16" in cpu_precisions(ov.Core())
# what bf16 may cost a picture (README, "OpenVINO on the CPU"): OpenVINO 2026.4 bf16 on an AMD EPYC with avx512_bf16
# measured 49.0 / 41.1 / 48.9 dB (sd1 / sd2 / sdxl) against diffusers fp32 in the test below, diffusers' own bf16
# autocast 48.9 / 42.8 / 47.9 dB: 30 dB leaves ~11 dB for another CPU's bf16 kernels, and still catches a graph that
# computes in the wrong precision or drops a term
BF16_MIN_DB = 30.0
KW = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0, height=64, width=128,
          seed=21)  # fmt: skip
REFERENCE = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("openvino-cache")
        mp.setenv("SDRT_CACHE", str(root))
        yield root / "openvino"


def load(root, precision: str | None = "f32") -> Pipeline:
    return Pipeline.load(root, backend="openvino", device="cpu", cpu_precision=precision)


@pytest.mark.parametrize("kind,sampler", [("sd1", "euler"), ("sd2", "ddim"), ("sdxl", "euler_a")])
def test_f32_matches_diffusers(kind, sampler, exports, folders):
    with load(exports.get(kind, "fp32")) as pipe:
        assert pipe.backend.name == "openvino" and pipe.backend.inference_precision == "f32"
        ours = sdrt_images(pipe, sampler=sampler, **KW)
    check(ours, diffusers_images(folders[kind], sampler, pipeline=REFERENCE[kind], **KW))


def test_img2img_and_inpainting_match_diffusers(exports, folders):
    from tests.helpers.images import init_and_mask

    image, mask = init_and_mask()
    kw = dict(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=6, guidance_scale=5.0, seed=8)
    with load(exports.get("sd1", "fp32")) as pipe:
        check(sdrt_images(pipe, sampler="euler_a", **kw), diffusers_images(folders["sd1"], "euler_a", img2img=True,
                                                                           **kw))  # fmt: skip
    kw = dict(kw, strength=1.0, mask_image=mask)
    with load(exports.get("sd1-inpaint", "fp32")) as pipe:
        ours = sdrt_images(pipe, sampler="dpmpp_2m", **kw)
    ref = diffusers_images(folders["sd1-inpaint"], "dpmpp_2m", pipeline="StableDiffusionInpaintPipeline", height=64,
                           width=128, **kw)  # fmt: skip
    check(ours, ref)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (OpenVINO reports FP32 only)")
@pytest.mark.parametrize("kind,sampler", [("sd1", "euler"), ("sd2", "ddim"), ("sdxl", "euler_a")])
def test_bf16_stays_within_its_bound(kind, sampler, exports, folders, record_property):
    with load(exports.get(kind, "fp32"), None) as pipe:
        assert pipe.backend.inference_precision == "bf16"
        ours = sdrt_images(pipe, sampler=sampler, **KW)
    db = check(ours, diffusers_images(folders[kind], sampler, pipeline=REFERENCE[kind], **KW), BF16_MIN_DB)
    record_property(f"openvino_bf16_psnr_db_{kind}", db)
    print(f"{kind} OpenVINO bf16 vs diffusers fp32: PSNR {db:.1f} dB")


def test_bf16_on_a_cpu_without_it_is_one_line(exports):
    if HAS_BF16:
        with load(exports.get("sd1", "fp32"), "bf16") as pipe:
            assert pipe.backend.inference_precision == "bf16"
        return
    with pytest.raises(SdrtError, match="no native bf16 .* use --cpu-precision f32") as err:
        load(exports.get("sd1", "fp32"), "bf16")
    assert err.value.field == "cpu_precision" and "\n" not in str(err.value)


def test_auto_picks_openvino_on_the_cpu_and_precision_is_openvinos(exports):
    root = exports.get("sd1", "fp32")
    with Pipeline.load(root, device="cpu") as pipe:
        assert pipe.backend.name == "openvino"
    with pytest.raises(SdrtError, match="--cpu-precision is OpenVINO's"):
        Pipeline.load(root, backend="onnxruntime", device="cpu", cpu_precision="f32")
    if torch.cuda.is_available():
        return
    with pytest.raises(SdrtError, match="torch sees no CUDA GPU"):
        Pipeline.load(root, backend="openvino", device="cuda")


def test_openvino_refuses_a_gpu_device(exports):
    from sdrt.runtime.manifest import read_manifest

    root = exports.get("sd1", "fp32")
    with pytest.raises(SdrtError, match="runs on the CPU; use --device cpu"):
        OpenVinoBackend(root, read_manifest(root), torch.device("cuda"))


def test_shapes_are_compiled_once_and_the_few_recent_kept(exports, cache):
    """Each call shape is compiled once (static shapes) and cached on disk under the graph's hash and precision; at
    most three shapes per graph stay compiled; a second load reads the cache instead of writing it again."""
    root = exports.get("sd1", "fp32")
    kw = dict(prompt="a fox", num_inference_steps=2, guidance_scale=5.0, seed=3)
    with load(root) as pipe:
        first = sdrt_images(pipe, sampler="euler", height=64, width=64, **kw)
        for size in ((64, 128), (128, 64), (128, 128)):
            sdrt_images(pipe, sampler="euler", height=size[0], width=size[1], **kw)
        assert len(pipe.backend.compiled["unet"]) == 3
        key = pipe.backend.graph_key("unet")
        assert key.startswith("unet-") and key.endswith("-f32")
    blobs = sorted(p.name for p in (cache / key).iterdir())
    assert len(blobs) >= 4, blobs  # one per U-Net shape
    with load(root) as again:
        assert np.array_equal(sdrt_images(again, sampler="euler", height=64, width=64, **kw), first)
    assert sorted(p.name for p in (cache / key).iterdir()) == blobs, "a cached shape was compiled again"


def test_a_dynamic_model_gives_the_static_models_picture(exports):
    from sdrt.runtime.manifest import read_manifest

    root = exports.get("sd1", "fp32")
    kw = dict(prompt="a fox", num_inference_steps=3, guidance_scale=5.0, seed=3, height=64, width=128)
    with load(root) as pipe:
        static = sdrt_images(pipe, sampler="euler", **kw)
    backend = OpenVinoBackend(root, read_manifest(root), torch.device("cpu"), "f32", cache=False, static=False)
    with Pipeline(root, read_manifest(root), backend) as pipe:
        dynamic = sdrt_images(pipe, sampler="euler", **kw)
        assert list(pipe.backend.compiled["unet"]) == [()]
    assert psnr(static, dynamic) > 60


def test_the_server_batches_openvino_requests_each_as_alone(exports):
    """Concurrent /v1/images requests joined into engine batches on OpenVINO: each gets its own seed's images,
    byte for byte what the request gives alone; the PNG text names the inference precision."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from tests.helpers.server import LiveServer, alone, body, pixels

    with load(exports.get("sd1", "fp32")) as pipe:
        server = LiveServer(pipe)
        try:
            bodies = [body(300 + i) for i in range(4)]
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda b: server.post("/v1/images", b), bodies))
            assert [a.status_code for a in answers] == [200] * 4
            assert any(a.json()["batch"]["requests"] > 1 for a in answers), "no two requests shared a batch"
            for b, a in zip(bodies, answers, strict=True):
                assert np.array_equal(pixels(a.json()["images"][0]), alone(pipe, b)[0]), b["seed"]
            png = server.post("/v1/images", bodies[0], headers={"Accept": "image/png"}).content
            assert "Inference precision: f32" in Image.open(io.BytesIO(png)).text["parameters"]
        finally:
            server.stop()


def test_attention_scales_are_folded_into_the_projections(exports):
    """The q and k scales of torch's ONNX export end in the projections' weights (OpenVINO would otherwise fuse
    them as post-ops onto a slower kernel); the U-Net's output is the unfolded graph's, and ONNX Runtime's."""
    import onnxruntime as ort

    from sdrt.runtime.openvino import fold_scalar_scales

    path = str(exports.get("sd1", "fp32") / "unet.onnx")
    gen = np.random.default_rng(0)
    feeds = {"sample": gen.standard_normal((2, 4, 8, 12), np.float32), "timestep": np.array([500, 20], np.float32),
             "encoder_hidden_states": gen.standard_normal((2, 77, 32), np.float32)}  # fmt: skip
    core, outs = ov.Core(), []
    for fold in (False, True):
        model = core.read_model(path)
        if fold:
            blocks = sum(op.get_type_name() == "Softmax" for op in model.get_ops())
            assert fold_scalar_scales(model) >= 2 * blocks  # q and k of every attention, at least
            assert fold_scalar_scales(model) == 0  # nothing left to fold
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outs.append(compiled.create_infer_request().infer(feeds)[0])
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for out in outs:
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_keys_are_transposed_once_in_a_static_graph(exports):
    """torch's ONNX export transposes each attention's keys as heads-first, a 3-D view, k^T, a 4-D view; in a
    statically shaped model that becomes the one 4-D Transpose it amounts to, every attention once, and the U-Net's
    output is ONNX Runtime's. A dynamic model, whose views cannot be checked, is left as it is."""
    import onnxruntime as ort

    from sdrt.runtime.openvino import fold_constants, merge_key_transposes

    path = str(exports.get("sd1", "fp32") / "unet.onnx")
    gen = np.random.default_rng(1)
    feeds = {"sample": gen.standard_normal((2, 4, 8, 12), np.float32), "timestep": np.array([981.5, 20], np.float32),
             "encoder_hidden_states": gen.standard_normal((2, 77, 32), np.float32)}  # fmt: skip
    core = ov.Core()
    assert merge_key_transposes(core.read_model(path)) == 0  # dynamic: nothing merged
    model = core.read_model(path)
    attentions = sum(op.get_type_name() == "Softmax" for op in model.get_ops())
    model.reshape({name: list(value.shape) for name, value in feeds.items()})
    fold_constants(model)
    assert merge_key_transposes(model) == attentions
    assert merge_key_transposes(model) == 0  # nothing left to merge
    out = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request().infer(feeds)[0]
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_a_transpose_chain_that_is_not_a_head_view_is_left_alone():
    """The same four ops whose 3-D view does not merge batch and heads are not k^T: left as they are."""
    import openvino.opset13 as ops

    from sdrt.runtime.openvino import merge_key_transposes

    def const(values):
        return ops.constant(np.array(values, np.int64))

    x = ops.parameter([2, 8, 4, 6], np.float32, name="x")  # [B, L, H, D]
    heads = ops.transpose(x, const([0, 2, 1, 3]))  # [2, 4, 8, 6]
    view = ops.reshape(heads, const([2, 32, 6]), special_zero=False)  # B x (H*L): not [B*H, L, D]
    back = ops.reshape(ops.transpose(view, const([0, 2, 1])), const([2, 4, 6, 8]), special_zero=False)
    model = ov.Model([ops.result(back)], [x])
    assert merge_key_transposes(model) == 0
    data = np.random.default_rng(2).standard_normal((2, 8, 4, 6)).astype(np.float32)
    out = ov.Core().compile_model(model, "CPU").create_infer_request().infer({"x": data})[0]
    expected = data.transpose(0, 2, 1, 3).reshape(2, 32, 6).transpose(0, 2, 1).reshape(2, 4, 6, 8)  # numpy's own
    assert np.array_equal(out, expected)
