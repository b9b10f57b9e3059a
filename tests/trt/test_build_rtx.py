"""Real engines on the CPU: TensorRT for RTX's builder needs no GPU, so `sdrt build` runs for real here. The small
SD 1-, SD 2-, SDXL-like and inpainting exports are built with static and dynamic profiles; then what a second
build skips, what a changed graph rebuilds, what the runtime refuses, and the one-line errors. The engines
themselves run on RTX GPUs only: nothing here loads one."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import helper

from sdrt.cli import main
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import read_manifest, sha256_file, write_manifest
from sdrt.runtime.plans import check_plan
from sdrt.runtime.progress import Progress
from sdrt.runtime.trt_family import RTX_DEFAULT_TARGETS, TrtEnvironment
from sdrt.trt.build import BuildOptions, build_directory

trt = pytest.importorskip("tensorrt_rtx")
pytestmark = pytest.mark.xdist_group("build-rtx")  # module-scoped exports: keep them in one worker


@pytest.fixture(scope="module")
def exported(exports) -> dict[str, Path]:
    """The session's fp16 exports (64-192 px, 1-2 images) of the SD1-, SD2-, SDXL-like and SD1-like inpainting
    (9-channel U-Net) folders, shared with the other test modules."""
    return {kind: exports.get(kind, "fp16") for kind in ("sd1", "sd2", "sdxl", "sd1-inpaint")}


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def build(root: Path, **opts) -> dict:
    return build_directory(root, BuildOptions(**opts), Progress(io.StringIO()))


def engine_files(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(root.glob("*.plan"))}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "sd1-inpaint"])
def test_every_graph_builds_static_then_dynamic(exported, kind, tmp_path):
    root = copy_of(exported[kind], tmp_path)
    report = build(root, height=64, width=128)  # auto: no GPU here, so TensorRT for RTX
    graphs = list(read_manifest(root)["graphs"])
    assert len(graphs) == (5 if kind == "sdxl" else 4)  # SDXL: two text encoders
    assert {n: r["action"] for n, r in report["graphs"].items()} == dict.fromkeys(graphs, "built")
    assert f"parser accepts all {len(graphs)} graphs" in report["operator_check"]
    m = read_manifest(root)
    for name in graphs:
        entry = m["engines"][name]
        key = entry["key"]
        assert (key["family"], key["version"]) == ("tensorrt-rtx", trt.__version__)
        assert key["gpu"] == "" and key["compute_capability"] == ",".join(RTX_DEFAULT_TARGETS)
        assert key["onnx"] == {f: m["files"][f] for f in m["graphs"][name]["files"]}
        plan = root / entry["file"]
        assert plan.stat().st_size > 10_000 and entry["sha256"] == m["files"][plan.name] == sha256_file(plan)
    # 1 image: 2 U-Net rows under guidance; an inpainting U-Net reads 9 channels
    assert m["engines"]["unet"]["key"]["profiles"][0]["sample"]["opt"] == [2, 9 if kind == "sd1-inpaint" else 4, 8, 16]
    dynamic = build(root, dynamic=True)
    assert {r["action"] for r in dynamic["graphs"].values()} == {"rebuilt"}
    assert all("-> dynamic 1-2 image(s) 64-192 px" in r["why"] for r in dynamic["graphs"].values())


def test_second_build_skips_and_a_changed_graph_rebuilds_alone(exported, tmp_path):
    root = copy_of(exported["sd1"], tmp_path)
    build(root, compute_capabilities="8.9")
    before = engine_files(root)
    assert {r["action"] for r in build(root, compute_capabilities="8.9")["graphs"].values()} == {"skipped"}
    assert engine_files(root) == before

    # a re-export of the VAE decoder alone: its file and hash change, nothing else does
    path = root / "vae_decoder.onnx"
    model = onnx.load(str(path))
    model.doc_string = "re-exported"
    onnx.save(model, str(path))
    m = read_manifest(root)
    m["files"]["vae_decoder.onnx"] = sha256_file(path)
    write_manifest(root, m)
    report = build(root, compute_capabilities="8.9")
    actions = {n: r["action"] for n, r in report["graphs"].items()}
    assert actions == {"text_encoder": "skipped", "unet": "skipped", "vae_decoder": "rebuilt", "vae_encoder": "skipped"}
    assert report["graphs"]["vae_decoder"]["why"] == "the ONNX graph changed"
    after = engine_files(root)
    assert {k for k in before if before[k] != after[k]} <= {"vae_decoder.plan"}


def test_adapters_make_plans_refittable_only_where_the_builder_can(exported, folders, tmp_path):
    """The weights a directory's adapters change are what `sdrt build` would mark refittable, recorded in the key
    (more of them: a rebuild, saying why). TensorRT for RTX 1.7 cannot compile refittable attention regions without
    a GPU (its Myelin compiler fails inside the build), so here the plans are built plain and the build says so."""
    import diffusers
    from safetensors import safe_open

    from sdrt.trt.build import build_key, refittable_weights, stale_reasons
    from tests.helpers.lora import peft_lora

    root = copy_of(exported["sd1"], tmp_path)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd1"], local_files_only=True)
    assert main(["lora", "add", str(root), str(peft_lora(tmp_path / "p.safetensors", pipe, 2))]) == 0
    with safe_open(str(root / "loras" / "base.safetensors"), "np") as base:
        keys = sorted(base.keys())
    m = read_manifest(root)
    for graph in m["graphs"]:
        mine = tuple(k.split("/", 1)[1] for k in keys if k.startswith(graph + "/"))
        assert refittable_weights(root, m, graph) == mine
    names = refittable_weights(root, m, "unet")
    assert len(names) == 24 and refittable_weights(root, m, "vae_decoder") == ()

    report = build(root, height=64, width=64)
    assert "LoRA-refittable engines only on an RTX GPU" in report["lora"] and "\n" not in report["lora"]
    m = read_manifest(root)
    assert {r["action"] for r in report["graphs"].values()} == {"built"}
    assert not any("refittable" in e["key"] for e in m["engines"].values())

    env = TrtEnvironment(**{f: m["engines"]["unet"]["key"][f] for f in TrtEnvironment._fields})
    opts = BuildOptions(height=64, width=64)
    entry = {"file": "unet.plan", "sha256": "x", "key": build_key(m, "unet", opts, env, names[:10])}
    assert entry["key"]["refittable"] == list(names[:10])
    why = stale_reasons(entry, build_key(m, "unet", opts, env, names), "x")
    assert why == ["LoRA-refittable weights 10 -> 24 (adapters added or replaced)"]
    assert stale_reasons(entry, build_key(m, "unet", opts, env, names[:10]), "x") == []


def test_targets_are_recorded_and_change_the_key(exported, tmp_path, capsys):
    root = copy_of(exported["sd1"], tmp_path)
    assert main(["build", str(root), "--backend", "tensorrt-rtx", "--compute-capability", "8.6,12.0"]) == 0
    assert read_manifest(root)["engines"]["unet"]["key"]["compute_capability"] == "8.6,12.0"
    out = capsys.readouterr().out
    assert "tensorrt-rtx" in out and re.search(r"unet\s+built in", out)
    assert main(["build", str(root), "--compute-capability", "8.9"]) == 0
    assert "compute capability 8.6,12.0 -> 8.9" in capsys.readouterr().out


def rtx_gpu(cc: str, version: str = trt.__version__) -> TrtEnvironment:
    """What the runtime would read on an RTX GPU of compute capability ``cc`` (the check compares strings)."""
    return TrtEnvironment("tensorrt-rtx", version, "NVIDIA GeForce RTX 4090", cc)


def test_runtime_accepts_its_targets_and_refuses_the_rest(exported, tmp_path):
    root = copy_of(exported["sd1"], tmp_path)
    build(root, compute_capabilities="8.6,8.9")
    m = read_manifest(root)
    assert check_plan(root, m, "unet", rtx_gpu("8.9")) == root / "unet.plan"
    assert check_plan(root, m, "unet", rtx_gpu("8.6")) == root / "unet.plan"
    refusals = [
        (rtx_gpu("12.0"), "compute capabilities 8.6,8.9 (this GPU: 12.0)"),
        (rtx_gpu("8.9", "1.8.0.1"), f"version {trt.__version__} (this machine: 1.8.0.1)"),
        (TrtEnvironment("tensorrt", "10.9.0.34", "NVIDIA H200", "9.0"), "TensorRT family tensorrt-rtx"),
    ]
    for here, says in refusals:
        with pytest.raises(SdrtError) as err:
            check_plan(root, m, "unet", here)
        msg = str(err.value)
        assert says in msg and "\n" not in msg and f"sdrt build {root}" in msg, msg
    (root / "unet.plan").write_bytes((root / "unet.plan").read_bytes()[:-1000])  # damaged
    with pytest.raises(SdrtError, match="SHA-256 differs"):
        check_plan(root, m, "unet", rtx_gpu("8.9"))
    assert "differs from its recorded SHA-256" in build(root, compute_capabilities="8.6,8.9")["graphs"]["unet"]["why"]


def test_a_node_the_parser_rejects_stops_the_build_by_name(exported, tmp_path, capsys):
    root = copy_of(exported["sd1"], tmp_path)
    path = root / "vae_decoder.onnx"
    model = onnx.load(str(path))
    latent = model.graph.input[0].name
    model.graph.node.append(helper.make_node("FusedThing", [latent], ["odd"], name="odd_one", domain="com.example"))
    model.graph.output.append(helper.make_tensor_value_info("odd", onnx.TensorProto.FLOAT16, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(path))
    m = read_manifest(root)
    m["files"]["vae_decoder.onnx"] = sha256_file(path)
    write_manifest(root, m)
    assert main(["build", str(root)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdrt: error: ")]
    assert len(errors) == 1 and "vae_decoder.onnx: node 'odd_one' (FusedThing): " in errors[0], errors
    assert "Plugin not found" in errors[0]  # the parser's own reason
    assert not list(root.glob("*.plan")) and not read_manifest(root).get("engines")  # nothing built before the check


@pytest.mark.parametrize(
    "args, says",
    [
        (["--compute-capability", "9.0"], "--compute-capability '9.0': use some of"),
        (["--compute-capability", ","], "--compute-capability ','"),
        (["--backend", "tensorrt"], "--backend tensorrt: "),
    ],
)
def test_bad_build_options_are_one_line(exported, tmp_path, capsys, args, says):
    root = copy_of(exported["sd1"], tmp_path)
    assert main(["build", str(root), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not list(root.glob("*.plan"))


def test_generate_with_rtx_engines_needs_a_gpu(exported, tmp_path, capsys):
    root = copy_of(exported["sd1"], tmp_path)
    build(root)
    assert main(["generate", str(root), "a fox", "--backend", "tensorrt-rtx", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "onnxruntime" in err[0], err
    assert not (tmp_path / "x.png").exists()
    # auto on the CPU runs the ONNX graphs beside the engines
    assert main(["generate", str(root), "a fox", "--steps", "2", "--height", "64", "--width", "64",
                 "--seed", "1", "--out", str(tmp_path / "y.png"), "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "y.png").is_file()
