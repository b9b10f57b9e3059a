"""`sdrt quantize` and `--cpu-int8`: the tiny sd1 fp32 export quantized by NNCF in each mode (2 prompts of 2 steps),
its manifest entry, the INT8 picture against diffusers' fp32 one, and the refusals.

Each test works on copies of the shared export (tmp folders of this module): the export itself is never written.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from sdrt.cli import main
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.int8 import BIN, XML
from sdrt.runtime.manifest import read_manifest, sha256_file
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import psnr

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'sdrt[openvino]'")
nncf = pytest.importorskip("nncf", reason="NNCF is not installed: pip install 'sdrt[openvino]'")

MODES = ("hybrid", "full", "weights")
KW = dict(prompt="a watercolor fox in the snow, detailed", negative_prompt="blurry, low quality", guidance_scale=6.0,
          num_inference_steps=5, height=64, width=128, seed=21)  # fmt: skip
# What INT8 costs the tiny random-weight sd1's picture, measured with NNCF 3.4 and OpenVINO 2026.4 on an AVX2 CPU:
# against diffusers' fp32 in this request hybrid 37.3 dB, weights 56.0 dB; against ONNX Runtime fp32 (diffusers'
# picture to ~91 dB) over 6 seeds x 2 sizes at 10 steps hybrid 36.7-38.0 dB, weights 56.0-57.2 dB, where f32
# OpenVINO gives 89-95 dB, the same request one step shorter 35 dB and another seed 14 dB. The bounds sit ~3 dB
# (hybrid) and ~6 dB (weights) under the lowest measured, for another CPU's INT8 kernels (VNNI, AMX) and rounding: a
# model quantized wrongly (a missed input, a bad range) falls far below them. full (MatMul activations INT8 too),
# measured on an AVX512 VNNI + bf16 CPU, where the same request gave hybrid 41.9 dB and weights 52.0 dB: 40.6 dB,
# and against ONNX Runtime fp32 over the same 6 seeds x 2 sizes (tiny-sd1 preset) 38.4-40.9 dB; its bound sits
# ~6 dB under the lowest, as much as hybrid moved between the two CPUs and ~2 dB more. What INT8 costs a real
# model's picture is the benchmark's to measure (benchmarks/cpu_int8.py).
MIN_DB = {"hybrid": 34.0, "full": 32.0, "weights": 50.0}

from sdrt.runtime.openvino import cpu_precisions  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDRT_CACHE", str(tmp_path_factory.mktemp("openvino-cache")))
        yield


@pytest.fixture(scope="module")
def quantized(exports, tmp_path_factory) -> dict:
    """{mode: a copy of the sd1 fp32 export with its INT8 U-Net}, made through the command line."""
    out = {}
    for mode in MODES:
        out[mode] = tmp_path_factory.mktemp("int8") / mode
        shutil.copytree(exports.get("sd1", "fp32"), out[mode])
        args = ["quantize", str(out[mode]), "--mode", mode, "--prompts", "2", "--steps", "2", "--size", "64"]
        assert main(args) == 0
    return out


def reference(folder) -> np.ndarray:
    """diffusers' own fp32 pipeline with the Euler scheduler, as sdrt's `euler` sampler agrees with it."""
    import diffusers

    load = dict(safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, **load)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(KW)
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def load(root, **kw) -> Pipeline:
    return Pipeline.load(root, backend="openvino", device="cpu", cpu_precision="f32", **kw)


def test_quantize_records_the_files_and_what_they_were_made_from(quantized):
    for mode, root in quantized.items():
        manifest = read_manifest(root)
        entry = manifest["cpu_int8"]
        assert entry["mode"] == mode and entry["files"] == [BIN, XML]
        for name in entry["files"]:
            assert manifest["files"][name] == sha256_file(root / name)
        assert entry["unet_sha256"] == {"unet.onnx": sha256_file(root / "unet.onnx")}
        assert entry["nncf"] == nncf.__version__ and entry["openvino"]
        calibration = [entry[k] for k in ("prompts", "steps", "size", "seed")]
        # pndm: 2 steps are 3 U-Net calls per prompt
        assert calibration == ([2, 2, 64, 0] if mode != "weights" else [None] * 4)
        assert entry["samples"] == (6 if mode != "weights" else 0)
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "a staging folder was left"


@pytest.mark.parametrize("mode", MODES)
def test_int8_picture_against_diffusers_fp32(mode, quantized, folders, record_property):
    with load(quantized[mode], cpu_int8=True) as pipe:
        assert pipe.backend.inference_precision == f"f32, U-Net int8 ({mode})"
        assert pipe.backend.graph_key("unet") != pipe.backend.graph_key("vae_decoder")
        ours = np.stack([np.asarray(im) for im in pipe(sampler="euler", **KW)])
    db = psnr(ours, reference(folders["sd1"]))
    record_property(f"openvino_int8_{mode}_psnr_db", db)
    print(f"sd1 OpenVINO f32 + U-Net int8 ({mode}) vs diffusers fp32: PSNR {db:.1f} dB")
    assert db >= MIN_DB[mode], f"{mode}: {db:.1f} dB"


@pytest.mark.parametrize("mode", MODES)
def test_the_int8_weights_stay_int8_at_a_static_shape(mode, quantized):
    """The INT8 U-Net compiled for a call's shape keeps every 8-bit constant NNCF wrote: folding them into f32 (as the
    exported graphs' shape arithmetic is folded) would compile a float U-Net under the INT8 name."""
    from sdrt.runtime.manifest import read_manifest
    from sdrt.runtime.openvino import OpenVinoBackend

    def eight_bit(model) -> int:
        types = (ov.Type.i8, ov.Type.u8)
        return sum(op.get_type_name() == "Constant" and op.get_element_type() in types for op in model.get_ops())

    root = quantized[mode]
    written = eight_bit(ov.Core().read_model(str(root / XML)))
    assert written > 0
    backend = OpenVinoBackend(root, read_manifest(root), torch.device("cpu"), "f32", cache=False, cpu_int8=True)
    assert (
        eight_bit(
            backend._model("unet", {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)})
        )
        == written
    )


def test_the_cache_key_follows_the_int8_file(quantized):
    with load(quantized["hybrid"], cpu_int8=True) as a, load(quantized["weights"], cpu_int8=True) as b:
        assert a.backend.graph_key("unet") != b.backend.graph_key("unet")
        assert a.backend.graph_key("text_encoder") == b.backend.graph_key("text_encoder")
    with load(quantized["hybrid"]) as plain:
        assert plain.backend.graph_key("unet") != a.backend.graph_key("unet")
        assert plain.backend.inference_precision == "f32"


def test_refusals_are_one_line(exports, quantized, tmp_path, capsys):
    plain = exports.get("sd1", "fp32")
    with pytest.raises(SdrtError, match=f"{plain} has no INT8 U-Net; make one with `sdrt quantize {plain}`"):
        load(plain, cpu_int8=True)
    with pytest.raises(SdrtError, match="--cpu-int8 is OpenVINO's; add --backend openvino") as err:
        Pipeline.load(quantized["hybrid"], backend="onnxruntime", device="cpu", cpu_int8=True)
    assert err.value.field == "cpu_int8"
    assert main(["generate", str(quantized["hybrid"]), "a fox", "--backend", "onnxruntime", "--cpu-int8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with load(quantized["hybrid"], cpu_int8=True) as pipe:  # its weights are not the exported base W0 + delta needs
        pipe.manifest.setdefault("loras", {})["ink"] = {"weights": {"unet": 1}}
        with pytest.raises(SdrtError, match="INT8 U-Net no longer holds; leave out --cpu-int8"):
            pipe.request(Params(prompt="a fox", loras={"ink": 1.0}))
    assert main(["quantize", str(quantized["hybrid"]), "--mode", "weights"]) == 2  # already there: needs --force
    assert "already has an INT8 U-Net (hybrid); pass --force" in capsys.readouterr().err


def test_quantize_without_nncf_names_the_extra(quantized, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf raises ImportError
    assert main(["quantize", str(quantized["hybrid"]), "--force"]) == 2
    err = capsys.readouterr().err
    assert "needs OpenVINO and NNCF (nncf is missing): pip install 'sdrt[openvino]'" in err and err.count("\n") == 1


def test_a_changed_unet_refuses_its_int8_model(quantized, tmp_path):
    import onnx
    from onnx import numpy_helper

    root = tmp_path / "changed"
    shutil.copytree(quantized["weights"], root)
    model = onnx.load(str(root / "unet.onnx"))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) + 1, first.name))
    onnx.save(model, str(root / "unet.onnx"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["unet.onnx"] = sha256_file(root / "unet.onnx")  # as a tool that rewrites the graph would
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SdrtError, match=f"made from another unet.onnx .* `sdrt quantize {root} --force`"):
        load(root, cpu_int8=True)
    load(root).close()  # the f32 U-Net is the directory's own


def test_a_failed_quantize_leaves_the_directory_as_it_was(quantized, tmp_path, monkeypatch, capsys):
    root = tmp_path / "failed"
    shutil.copytree(quantized["weights"], root)
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}

    def fails(*args, **kw):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(nncf, "compress_weights", fails)
    assert main(["quantize", str(root), "--mode", "weights", "--force"]) == 2
    err = capsys.readouterr().err
    assert "cannot quantize" in err and "(out of memory)" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["tokenizer"]
    load(root, cpu_int8=True).close()  # the INT8 U-Net it had is still whole


def test_bench_times_the_int8_unet_beside_f32(quantized, tmp_path):
    """`sdrt bench --cpu-int8`: sdrt-openvino-int8 runs in the same rounds as sdrt-openvino, named by its U-Net."""
    out = tmp_path / "results"
    args = ["bench", str(quantized["weights"]), "--device", "cpu", "--backends", "openvino", "--cpu-int8"]
    args += ["--height", "64", "--width", "64", "--steps", "2", "--runs", "1", "--warmup", "0", "--out-dir", str(out)]
    assert main(args) == 0
    (path,) = out.glob("*.json")
    r = json.loads(path.read_text())
    assert [x["name"] for x in r["results"]] == ["sdrt-openvino", "sdrt-openvino-int8", "diffusers-eager"]
    default = "bf16" if "bf16" in cpu_precisions(ov.Core()) else "f32"  # OpenVINO's own default on this CPU
    assert r["results"][0]["inference_precision"] == default
    assert r["results"][1]["inference_precision"] == f"{default}, U-Net int8 (weights)" and "--cpu-int8" in r["command"]
    assert r["results"][1]["psnr_db"] >= MIN_DB["weights"] - 10  # 2 steps of a random model, not the test above


def test_bench_without_an_int8_unet_is_one_line(exports, tmp_path, capsys):
    plain = exports.get("sd1", "fp32")
    assert main(["bench", str(plain), "--device", "cpu", "--cpu-int8", "--out-dir", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"has no INT8 U-Net; make one with `sdrt quantize {plain}`" in line and not (tmp_path / "out").exists()
