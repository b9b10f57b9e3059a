"""`sdrt build` on a real exported directory (the session's sd1 fp16 export, tiny-sd1's architecture): profiles,
build keys, the runtime's plan check, the operator table, and the path without TensorRT. Real TensorRT for RTX
builds are in test_build_rtx.py; the one TensorRT build (marked `tensorrt`) skips where TensorRT or a GPU is
missing."""

from __future__ import annotations

import copy
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sdrt.cli import main
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import check_files, read_manifest, sha256_file, write_atomic
from sdrt.runtime.plans import check_plan
from sdrt.runtime.progress import Progress
from sdrt.runtime.trt_family import TrtEnvironment
from sdrt.trt.build import (
    BuildOptions,
    build_directory,
    build_key,
    check_operators,
    default_timing_cache,
    describe_profile,
    profile_shapes,
    record_plan,
    stale_reasons,
    target_shape,
)
from sdrt.trt.ops import check_model

pytestmark = pytest.mark.xdist_group("build")  # its fixtures are made once per process: keep it in one

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
# the strings a build key records; no TensorRT involved
ENV = TrtEnvironment("tensorrt", "10.9.0.34", "NVIDIA L4", "8.9")


@pytest.fixture(scope="session")
def tiny(exports) -> Path:
    """The session's sd1 fp16 export (tiny-sd1's architecture, written by diffusers; 64-192 px and 1-2 images, so
    1-4 U-Net rows), shared with the other modules: read only here, `engine_dir` copies it for writing tests."""
    return exports.get("sd1", "fp16")


@pytest.fixture
def engine_dir(tiny, tmp_path) -> Path:
    """A private copy of the session export, for tests that write into it."""
    return Path(shutil.copytree(tiny, tmp_path / "tiny-sd1"))


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# --- shape profiles ---


def test_static_profile_doubles_unet_rows_and_uses_pixels_for_vae_encoder(tiny):
    m = read_manifest(tiny)
    opts = BuildOptions(height=128, width=192, batch=2)
    static = {name: profile_shapes(m, name, opts) for name in m["graphs"]}
    unet = static["unet"]
    assert unet["sample"] == {"min": [4, 4, 16, 24], "opt": [4, 4, 16, 24], "max": [4, 4, 16, 24]}
    assert unet["timestep"]["opt"] == [4] and unet["encoder_hidden_states"]["opt"] == [4, 77, 32]
    # the text axis spans 1..max_prompt_chunks chunks of 77 tokens even in a static profile
    assert unet["encoder_hidden_states"]["min"] == [4, 77, 32] and unet["encoder_hidden_states"]["max"] == [4, 231, 32]
    assert static["text_encoder"]["input_ids"]["max"] == [4, 77]  # cond + uncond rows too
    assert static["vae_decoder"]["latent"]["opt"] == [2, 4, 16, 24]  # images, not rows
    assert static["vae_encoder"]["images"]["opt"] == [2, 3, 128, 192]  # H/W are pixels
    assert describe_profile(m, opts) == "static 2 image(s) 128x192"


def test_dynamic_profile_spans_the_exported_ranges(tiny):
    m = read_manifest(tiny)
    opts = BuildOptions(dynamic=True)
    unet = profile_shapes(m, "unet", opts)["sample"]
    assert unet == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 24, 24]}
    enc = profile_shapes(m, "vae_encoder", opts)["images"]
    assert enc == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [2, 3, 192, 192]}
    dec = profile_shapes(m, "vae_decoder", BuildOptions(dynamic=True, height=128, width=64, batch=2))["latent"]
    assert dec == {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 8], "max": [2, 4, 24, 24]}


def test_hires_profile_spans_both_passes(tiny):
    """--hires 1.5 on the static 64x128: one profile from the first pass to the second's 96x192 (int(px x scale),
    as the web UI sizes it), tuned for the second; a second pass outside the export, or with --dynamic, refused."""
    m = read_manifest(tiny)
    opts = BuildOptions(height=64, width=128, hires=1.5)
    assert profile_shapes(m, "unet", opts)["sample"] == {"min": [2, 4, 8, 16], "opt": [2, 4, 12, 24],
                                                         "max": [2, 4, 12, 24]}  # fmt: skip
    assert profile_shapes(m, "vae_encoder", opts)["images"] == {"min": [1, 3, 64, 128], "opt": [1, 3, 96, 192],
                                                                "max": [1, 3, 96, 192]}  # fmt: skip
    assert describe_profile(m, opts) == "hires 1 image(s) 64x128 to 96x192"
    with pytest.raises(SdrtError, match="second pass's width 256 is outside the 64-192 px"):
        profile_shapes(m, "unet", BuildOptions(height=64, width=128, hires=2))
    with pytest.raises(SdrtError, match="give one"):
        profile_shapes(m, "unet", BuildOptions(hires=2, dynamic=True))


def test_default_static_size_is_the_native_size_within_the_exported_range(tiny):
    m = read_manifest(tiny)
    assert target_shape(m, BuildOptions()) == (1, 64, 64)  # the U-Net's sample_size 8 x the VAE's factor 8
    m["unet"]["sample_size"] = 64  # SD 1.5's: 512 px
    assert target_shape(m, BuildOptions()) == (1, 192, 192)  # clamped to this export's 64-192
    m["shapes"].update(min_px=256, max_px=1024)
    assert target_shape(m, BuildOptions()) == (1, 512, 512)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--height", "100"], "--height 100 is not a multiple of 8; use 96 or 104"),
        (["--width", "256"], "--width 256 is outside the 64-192 px"),
        (["--height", "0"], "--height 0 is outside"),
        (["--batch", "3"], "--batch 3 is outside the 1-2 images"),
        (["--dynamic", "--width", "90"], "--width 90 is not a multiple of 8"),
    ],
)
def test_bad_static_sizes_are_one_line_errors(tiny, capsys, args, expected):
    before = hashes(tiny)
    assert main(["build", str(tiny), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert hashes(tiny) == before


# --- build keys ---

CHANGES = {
    "onnx": (lambda m: m["files"].update({"unet.onnx": "0" * 64}), {}, {}, "the ONNX graph changed"),
    "precision": (lambda m: m["graphs"]["unet"].update(precision="fp32"), {}, {}, "precision fp16 -> fp32"),
    "size": (None, {"height": 128}, {}, "profile static 1 image(s) 64x64 -> static 1 image(s) 128x64"),
    "batch": (None, {"batch": 2}, {}, "-> static 2 image(s) 64x64"),
    "dynamic": (None, {"dynamic": True}, {}, "-> dynamic 1-2 image(s) 64-192 px"),
    "workspace": (None, {"workspace_gib": 4.0}, {}, "workspace_gib None -> 4.0"),
    "version": (None, {}, {"version": "10.10.0.1"}, "version 10.9.0.34 -> 10.10.0.1"),
    "family": (None, {}, {"family": "tensorrt-rtx"}, "TensorRT family tensorrt -> tensorrt-rtx"),
    "gpu_name": (None, {}, {"gpu": "NVIDIA A10"}, "GPU NVIDIA L4 -> NVIDIA A10"),
    "compute_capability": (None, {}, {"compute_capability": "8.6"}, "compute capability 8.9 -> 8.6"),
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_each_key_input_makes_a_plan_stale(tiny, change):
    edit, opt_changes, env_changes, reason = CHANGES[change]
    m = read_manifest(tiny)
    entry = {"file": "unet.plan", "key": build_key(m, "unet", BuildOptions(), ENV), "sha256": "a" * 64}
    assert stale_reasons(entry, build_key(m, "unet", BuildOptions(), ENV), "a" * 64) == []  # identical: skip
    m2 = copy.deepcopy(m)
    if edit:
        edit(m2)
    key = build_key(m2, "unet", BuildOptions(**opt_changes), ENV._replace(**env_changes))
    reasons = stale_reasons(entry, key, "a" * 64)
    assert len(reasons) == 1 and reason in reasons[0], reasons


def test_a_missing_or_changed_plan_file_is_stale(tiny):
    m = read_manifest(tiny)
    key = build_key(m, "vae_decoder", BuildOptions(), ENV)
    entry = {"file": "vae_decoder.plan", "key": key, "sha256": "a" * 64}
    assert stale_reasons(entry, key, None) == ["vae_decoder.plan is missing"]
    assert stale_reasons(entry, key, "b" * 64) == ["vae_decoder.plan differs from its recorded SHA-256"]
    assert stale_reasons(None, key, None) == ["no plan yet"]


def test_key_records_what_the_plan_depends_on(tiny):
    m = read_manifest(tiny)
    key = build_key(m, "unet", BuildOptions(workspace_gib=6.0), ENV)
    assert key["onnx"] == {"unet.onnx": m["files"]["unet.onnx"]}
    assert key["precision"] == "fp16" and key["builder"]["workspace_gib"] == 6.0
    assert (key["family"], key["version"], key["gpu"], key["compute_capability"]) == tuple(ENV)
    assert key["profiles"] == [profile_shapes(m, "unet", BuildOptions())]


def test_timing_cache_is_keyed_by_gpu_and_tensorrt(monkeypatch, tmp_path):
    monkeypatch.delenv("SDRT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_timing_cache(ENV)
    assert path == tmp_path / "sdrt" / "timing-trt10.9.0.34-nvidia-l4-sm89.cache"
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "mine"))
    assert default_timing_cache(ENV) == tmp_path / "mine" / "timing-trt10.9.0.34-nvidia-l4-sm89.cache"
    monkeypatch.delenv("SDRT_CACHE")
    assert default_timing_cache(ENV._replace(version="10.10.0.1")) != path
    assert default_timing_cache(ENV._replace(gpu="NVIDIA A10", compute_capability="8.6")) != path


# --- the runtime's check of a plan against this machine ---


def recorded_plan(root: Path, name: str = "unet") -> dict:
    """The directory as `sdrt build` leaves it after writing ``name``.plan, recorded by the build's own bookkeeping;
    the file's bytes are a stand-in: `check_plan` compares keys and hashes and never deserialises a plan."""
    m = read_manifest(root)
    write_atomic(root / f"{name}.plan", b"stand-in for a serialized TensorRT engine")
    record_plan(root, m, name, build_key(m, name, BuildOptions(), ENV), seconds=1.0)
    return read_manifest(root)


def test_a_recorded_plan_is_skipped_and_verifiable(engine_dir):
    m = recorded_plan(engine_dir)
    entry = m["engines"]["unet"]
    assert m["files"]["unet.plan"] == entry["sha256"] == sha256_file(engine_dir / "unet.plan")
    assert check_files(engine_dir, m) == []  # what `sdrt verify` checks
    key = build_key(m, "unet", BuildOptions(), ENV)
    assert stale_reasons(entry, key, sha256_file(engine_dir / "unet.plan")) == []
    assert not [p for p in engine_dir.iterdir() if "partial" in p.name]


def test_runtime_accepts_a_plan_built_here(engine_dir):
    m = recorded_plan(engine_dir)
    assert check_plan(engine_dir, m, "unet", ENV) == engine_dir / "unet.plan"


@pytest.mark.parametrize(
    "here, names",
    [
        (("tensorrt", "10.10.0.1", "NVIDIA L4", "8.9"), ["version 10.9.0.34 (this machine: 10.10.0.1)"]),
        (("tensorrt", "10.9.0.34", "NVIDIA A10", "8.6"), ["GPU NVIDIA L4 (this machine: NVIDIA A10)", "8.9 (this"]),
    ],
)
def test_runtime_refuses_a_plan_built_for_another_machine(engine_dir, here, names):
    m = recorded_plan(engine_dir)
    with pytest.raises(SdrtError) as err:
        check_plan(engine_dir, m, "unet", TrtEnvironment(*here))
    msg = str(err.value)
    assert "\n" not in msg and f"rebuild it with `sdrt build {engine_dir}`" in msg
    assert all(n in msg for n in names), msg


def test_runtime_refuses_missing_damaged_or_outdated_plans(engine_dir):
    m = recorded_plan(engine_dir)
    with pytest.raises(SdrtError, match=f"no TensorRT plan for vae_decoder; build one with `sdrt build {engine_dir}`"):
        check_plan(engine_dir, m, "vae_decoder", ENV)
    stale = copy.deepcopy(m)
    stale["files"]["unet.onnx"] = "0" * 64  # re-exported since the build
    with pytest.raises(SdrtError, match="built from a different unet.onnx"):
        check_plan(engine_dir, stale, "unet", ENV)
    (engine_dir / "unet.plan").write_bytes(b"truncated")
    with pytest.raises(SdrtError, match="SHA-256 differs"):
        check_plan(engine_dir, m, "unet", ENV)


# --- operator check ---


def test_exported_graphs_pass_the_operator_check(tiny):
    problems, nodes = check_operators(tiny, read_manifest(tiny))
    assert problems == [] and nodes > 500


def small_model(nodes, opset: int = 21) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [4])
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for n in nodes for o in n.output if o]
    graph = helper.make_graph(nodes, "g", [x, i], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.x", 1)])


def test_operator_check_names_each_node_that_would_fail():
    model = small_model(
        [
            helper.make_node("Relu", ["x"], ["ok"], name="fine"),
            helper.make_node("Unique", ["i"], ["u"], name="dedupe"),
            helper.make_node("Resize", ["x", "", "", "i"], ["r"], name="up", mode="cubic"),
            helper.make_node("NonZero", ["i"], ["nz"], name="where_int"),
            helper.make_node("LayerNormalization", ["x", "x"], ["y", "mean", "inv"], name="ln"),
            helper.make_node("FusedThing", ["x"], ["f"], name="custom", domain="com.x"),
        ]
    )
    found = {p.node: str(p) for p in check_model(model, "toy")}
    assert sorted(found) == ["custom", "dedupe", "ln", "up", "where_int"]
    assert found["dedupe"] == "toy: node 'dedupe' (Unique): not supported by TensorRT's ONNX parser"
    assert "mode='cubic' is not supported" in found["up"]
    assert "type INT64 of 'i' is not supported" in found["where_int"]
    assert "only the first output Y" in found["ln"]
    assert "domain 'com.x'" in found["custom"]


def test_operator_check_looks_inside_subgraphs_and_local_functions():
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("DFT", ["x"], ["z"], name="in_then")], "then", [], [out])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"], name="in_else")], "else", [], [out])
    branch = helper.make_node("If", ["c"], ["b"], name="branch", then_branch=then, else_branch=other)
    call = helper.make_node("F", ["x"], ["f"], name="call", domain="com.x")
    model = small_model([branch, call])
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    body = [helper.make_node("Unique", ["a"], ["b"], name="inner")]
    model.functions.append(helper.make_function("com.x", "F", ["a"], ["b"], body, [helper.make_opsetid("", 21)]))
    found = {p.op: p.node for p in check_model(model, "toy")}
    assert found["DFT"] == "in_then" and found["Unique"].startswith("inner")


def test_operator_check_reports_an_opset_outside_the_list():
    problems = check_model(small_model([helper.make_node("Relu", ["x"], ["y"], name="r")], opset=8), "toy")
    assert [p.reason for p in problems] == ["opset 8 is outside 9-24"]


def test_cli_reports_operator_problems_before_any_build(engine_dir, capsys, monkeypatch):
    """Without any TensorRT the published list is the only judge: the problem is reported, nothing is built."""
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # as on a machine where neither is installed
    model = onnx.load(str(engine_dir / "vae_decoder.onnx"))
    model.graph.node.append(helper.make_node("Unique", [model.graph.input[0].name], ["u"], name="odd_one"))
    onnx.save(model, str(engine_dir / "vae_decoder.onnx"))
    rc = main(["build", str(engine_dir)])
    out = capsys.readouterr()
    assert "vae_decoder: node 'odd_one' (Unique): not supported" in out.out + out.err
    assert rc == 0 and "operator check: 1 of" in out.out


# --- without TensorRT ---


def test_without_tensorrt_the_directory_stays_ready_for_onnxruntime(engine_dir, capsys, monkeypatch):
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # as on a machine where neither is installed
    before = hashes(engine_dir)
    assert main(["build", str(engine_dir)]) == 0
    out = capsys.readouterr()
    missing = [line for line in (out.out + out.err).splitlines() if "TensorRT is not available" in line]
    assert len(missing) == 1 and "pip install tensorrt" in missing[0] and "ONNX Runtime" in missing[0]
    assert "sdrt[rtx]" in out.out and "operator check: all" in out.out
    for family in ("tensorrt", "tensorrt-rtx"):
        assert main(["build", str(engine_dir), "--backend", family]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--backend {family}" in err[0] and "pip install" in err[0], err
    assert hashes(engine_dir) == before  # nothing written, nothing renamed


# --- a real build (needs TensorRT, Polygraphy and a GPU) ---


@pytest.mark.tensorrt
def test_build_tiny_plans_and_run_the_unet(engine_dir, tmp_path):
    trt = pytest.importorskip("tensorrt")
    import onnxruntime as ort
    import torch

    from sdrt.runtime.plans import TrtRunner, runtime_environment

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    opts = BuildOptions(height=128, width=128, timing_cache=tmp_path / "timing.cache", backend="tensorrt")
    report = build_directory(engine_dir, opts, Progress(io.StringIO()))
    assert {r["action"] for r in report["graphs"].values()} == {"built"}
    assert (tmp_path / "timing.cache").is_file()
    m = read_manifest(engine_dir)
    assert m["files"]["unet.plan"] == m["engines"]["unet"]["sha256"] == sha256_file(engine_dir / "unet.plan")
    plan = check_plan(engine_dir, m, "unet", runtime_environment("tensorrt"))

    rng = np.random.default_rng(0)
    feed = {
        "sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float16),
        "timestep": np.array([981.0, 981.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float16),
    }
    ref = ort.InferenceSession(str(engine_dir / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with TrtRunner(plan, trt) as unet:
        out = unet.infer({k: torch.from_numpy(v).cuda() for k, v in feed.items()})["noise_pred"]
        torch.cuda.synchronize()
    got = out.float().cpu().numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2

    again = build_directory(engine_dir, opts, Progress(io.StringIO()))
    assert {r["action"] for r in again["graphs"].values()} == {"skipped"}
