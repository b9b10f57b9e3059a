"""Sizes as the model decides them: VAE scale factors 4 and 2, latents the U-Net's downsampling does not divide,
the native size as every stage's default, export cost that follows the model, and readable files.

References are diffusers' own pipelines on the same folders (tests/helpers/models.py): sdrt must give the picture
diffusers gives at every size diffusers accepts, within the exported range.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, sdrt_images
from tests.helpers.reference import NEGATIVE, PROMPT, diffusers_images

NATIVE96 = pytest.mark.xdist_group("native96")  # with test_torch_backend.py: one worker makes the export both read
SD = "StableDiffusionPipeline"
XL = "StableDiffusionXLPipeline"


def compare(pipe: Pipeline, folder: Path, pipeline: str, height: int, width: int, sampler: str = "euler") -> float:
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0,
              height=height, width=width, seed=31)  # fmt: skip
    ours = sdrt_images(pipe, sampler=sampler, **kw)
    ref = diffusers_images(folder, sampler, pipeline=pipeline, **kw)
    assert ours.shape == (1, height, width, 3)
    return check(ours, ref)


@pytest.fixture(scope="module")
def pipes(exports):
    kinds = ("sd1-vae4", "sd1-vae2", "sd1", "sdxl")
    out = {k: Pipeline.load(exports.get(k, "fp32"), backend="onnxruntime", device="cpu") for k in kinds}
    yield out
    for p in out.values():
        p.close()


@pytest.mark.parametrize(
    "kind,height,width",
    [("sd1-vae4", 64, 128), ("sd1-vae4", 72, 104), ("sd1-vae2", 64, 128), ("sd1-vae2", 88, 72)],
)
def test_vae_scale_factor_is_the_models(kind, height, width, pipes, folders, record_property):
    """A VAE with 3 or 2 blocks (factor 4 or 2): the picture is the size asked for and diffusers' picture."""
    m = pipes[kind].manifest
    assert m["latent"]["vae_scale_factor"] == {"sd1-vae4": 4, "sd1-vae2": 2}[kind]
    assert m["shapes"]["px_multiple"] == 8
    record_property("psnr_db", round(compare(pipes[kind], folders[kind], SD, height, width), 1))


@pytest.mark.parametrize(
    "kind,height,width", [("sd1", 72, 120), ("sd1", 136, 88), ("sdxl", 72, 120), ("sdxl", 96, 184)]
)
def test_latents_the_unet_does_not_divide(kind, height, width, pipes, folders, record_property):
    """Latent 9x15, 17x11, 12x23: diffusers forwards the skip connections' sizes to the upsamplers; so do the
    graphs, for any size."""
    record_property(
        "psnr_db", round(compare(pipes[kind], folders[kind], XL if kind == "sdxl" else SD, height, width), 1)
    )


@pytest.mark.parametrize("kind,height,multiple", [("sd1-vae4", 100, 8), ("sd1-vae2", 68, 8), ("sd1", 65, 8)])
def test_sizes_off_the_multiple_are_one_line_errors(kind, height, multiple, pipes):
    with pytest.raises(SdrtError, match=f"height {height} is not a multiple of {multiple}") as err:
        pipes[kind]("x", num_inference_steps=1, height=height, width=64)
    assert "\n" not in str(err.value)


# -- defaults from the model: a U-Net trained at 12 latents (96 px), exported with the default range -------------
# (the `native96` export is a session fixture in conftest.py: the torch backend's tests read it too)


@NATIVE96
def test_default_range_holds_the_native_size(native96):
    m = json.loads((native96 / "manifest.json").read_text())
    assert m["unet"]["sample_size"] == 12 and m["unet"]["downsampling"] == 2 and m["latent"]["vae_scale_factor"] == 8
    assert m["shapes"] == {
        "min_px": 48,
        "max_px": 192,
        "px_multiple": 8,
        "max_images": 4,
        "max_prompt_chunks": 3,
    }  # native/2 .. 2 x native


@NATIVE96
def test_build_profile_generate_and_diffusers_agree_on_the_default_size(native96, folders):
    """`sdrt build`'s static profile is the size `sdrt generate` asks for without one, which is diffusers'
    default (sample_size x vae_scale_factor), and the picture is diffusers'."""
    from sdrt.runtime.manifest import read_manifest
    from sdrt.trt.build import BuildOptions, target_shape

    pipe = Pipeline.load(native96, backend="onnxruntime", device="cpu")
    assert target_shape(read_manifest(native96), BuildOptions())[1:] == pipe.default_size() == (96, 96)
    kw = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, seed=4)
    check(sdrt_images(pipe, sampler="euler", **kw), diffusers_images(folders["sd1-native96"], "euler", **kw))


@NATIVE96
def test_torch_programs_take_any_size(native96, folders):
    """The torch.export programs take the upsample-to-skip-size path too (latent 9x15)."""
    pipe = Pipeline.load(native96, backend="torch", device="cpu")
    compare(pipe, folders["sd1-native96"], SD, 72, 120)


@NATIVE96
def test_engine_files_are_readable_like_any_file(native96):
    """Every file 0644 and every folder 0755 under umask 022 (ONNX writes its external data 0600 otherwise)."""
    modes = {str(p.relative_to(native96)): p.stat().st_mode & 0o777 for p in native96.rglob("*")}
    assert modes and all(mode == (0o755 if (native96 / p).is_dir() else 0o644) for p, mode in modes.items()), modes


def test_external_data_is_written_with_the_umask(tmp_path, monkeypatch):
    import onnx
    from onnx import helper

    from sdrt.export import onnx_save

    w = np.ones((64, 64), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    monkeypatch.setattr(onnx_save, "_EXTERNAL_DATA_BYTES", 1000)
    old = os.umask(0o022)
    try:
        assert onnx_save.save_onnx(model, tmp_path / "g.onnx") == ["g.onnx", "g.onnx.data"]
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"g.onnx": 0o644, "g.onnx.data": 0o644}


# -- export cost follows the model, not the declared range ---------------------------------------------------------


def test_verification_runs_two_rows_at_the_smallest_size_the_graph_takes():
    """SDXL's default range starts at 512 px; its check runs one row there, and the two-row, non-square case (one
    side not a multiple of the U-Net's downsampling) at the graph's smallest size, 64 x 72 px, not at 512 px."""
    import torch

    from sdrt.export.graphs import Dims, Graph
    from sdrt.export.verify import verify_shapes
    from sdrt.runtime.manifest import Geometry

    dims = Dims(512, 2048).for_model(Geometry(vae_scale_factor=8, unet_downsampling=4, sample_size=128))
    unet, vae = (Graph(name, torch.nn.Identity(), {}, (), ()) for name in ("unet", "vae_decoder"))
    assert verify_shapes(unet, dims) == verify_shapes(vae, dims) == [(1, 64, 64), (2, 8, 9)]
    assert verify_shapes(vae, Dims(512, 2048, max_images=1).for_model(dims.geometry)) == [(1, 64, 64), (1, 8, 9)]


def test_wide_range_export_costs_what_the_model_costs(folders, tmp_path):
    """A few-MB SDXL-like model declared for 64-2048 px: verification runs near the smallest size, so the export
    stays small in memory; the graphs still give diffusers' picture at a size the U-Net does not divide."""
    dest = tmp_path / "wide"
    args = ["export", str(folders["sdxl"]), str(dest), "--precision", "fp32", "--min-size", "64", "--max-size", "2048"]
    code = "import sys; from sdrt.cli import main; sys.exit(main(sys.argv[1:]))"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GiB (Linux)
    assert peak_gib < 3.0 or before / 2**20 >= 3.0, f"peak RSS {peak_gib:.1f} GiB"
    m = json.loads((dest / "manifest.json").read_text())
    assert m["shapes"]["max_px"] == 2048
    for entry in m["graphs"].values():
        assert all(max(s["latent"]) <= 9 for s in entry["verify"]["shapes"])  # 64 px = latent 8, and 9
    pipe = Pipeline.load(dest, backend="onnxruntime", device="cpu")
    compare(pipe, folders["sdxl"], XL, 104, 88)


# -- what sdrt cannot trace is refused at export -------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,msg",
    [
        (dict(sample_size=[8, 12]), "unsupported U-Net sample_size [8, 12]"),
        (dict(down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D"),
              up_block_types=("SimpleCrossAttnUpBlock2D", "UpBlock2D")),
         "unsupported U-Net: up block 0 (SimpleCrossAttnUpBlock2D) has no plain Upsample2D"),
    ],
)  # fmt: skip
def test_unsupported_unets_are_refused_in_one_line(change, msg, tmp_path):
    import diffusers

    from sdrt.export.directory import export_model
    from tests.helpers.models import UNETS, build_pipeline

    pipe = build_pipeline("sd1")
    pipe.unet = diffusers.UNet2DConditionModel(**dict(UNETS["sd1"], **change))
    pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(SdrtError) as err:
        export_model(str(tmp_path / "model"), tmp_path / "engine", precision="fp32")
    assert msg in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left behind
