"""`sdrt bench --peers` for real on the CPU: optimum-intel and OpenVINO GenAI, run by the peers' venv (`make
cpu-peers`), beside sdrt (ONNX Runtime), eager diffusers and its bf16-autocast variant, on the tiny preset at 64x64,
2 steps, 1 timed run; and the refusals, each one line before anything is timed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sdrt.benchmarks.peers import INT8_PEER, INT8_SAMPLES, PeerPlan, peers_python, select_peers
from sdrt.cli import main
from sdrt.runtime.manifest import read_manifest

pytestmark = pytest.mark.xdist_group("bench")  # the engine and the IR are made once per process: keep it in one

PEERS_PYTHON = peers_python(None)
needs_peers = pytest.mark.skipif(
    not PEERS_PYTHON.is_file(), reason=f"no peers' venv ({PEERS_PYTHON} missing): `make cpu-peers` creates it"
)
ARGS = ["--backends", "onnxruntime", "--height", "64", "--width", "64", "--steps", "2", "--runs", "1", "--warmup", "0"]
PEERS = ("optimum-intel", "openvino-genai")


@pytest.fixture(scope="module")
def run(bench_engine, tmp_path_factory):
    """(output folder, parsed JSON) of one run with both peers and the bf16 baseline (single-threaded torch, as
    test_bench's run, for the same reason)."""
    out = tmp_path_factory.mktemp("peers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["bench", str(bench_engine), *ARGS, "--peers", ",".join(PEERS), "--baseline-bf16"]
        assert main([*argv, "--out-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = out.glob("*.json")
    return out, json.loads(path.read_text())


@needs_peers
def test_peers_draw_the_baselines_picture(run):
    """Both peers run the checkpoint's PNDM from diffusers' config, from the same seeded latents (optimum-intel: a
    torch generator; GenAI: its TorchGenerator), with f32 graphs (this CPU has no bf16: OpenVINO's default is f32).
    What is left is f32 rounding and the conversion to uint8: GenAI truncates where diffusers rounds, one level on
    about half the pixels (~51 dB). 40 dB holds either well short of a different picture (~15-20 dB here)."""
    results = {r["name"]: r for r in run[1]["results"]}
    for name in PEERS:
        r = results[name]
        print(f"{name} vs diffusers-eager: {r['psnr_db']} dB, max abs diff {r['max_abs_diff']}")
        assert r["repeatable"], r
        if r["inference_precision"] == "f32":
            assert r["identical_to_baseline"] or (r["psnr_db"] >= 40.0 and r["max_abs_diff"] <= 2), r
        else:  # bf16 where the CPU has it: the same picture, at bf16's three significant digits
            assert r["psnr_db"] >= 25.0, r


@needs_peers
def test_peers_are_reported_like_the_other_contenders(run):
    out, r = run
    names = ["sdrt-onnxruntime", "diffusers-eager", "diffusers-eager-bf16", *PEERS]
    assert [x["name"] for x in r["results"]] == names and r["order"] == names
    assert r["skipped"] == [] and r["failed"] == []
    for name in PEERS:
        x = next(x for x in r["results"] if x["name"] == name)
        assert (x["kind"], x["backend"], x["weight_format"], x["cuda_graph"]) == ("peer", "openvino", "fp32", False)
        assert x["inference_precision"] in ("f32", "bf16") and x["performance_hint"]
        assert x["stages_ms"] == {} and "not observable" in x["note"]
        assert x["versions"]["openvino"] and x["versions"]["optimum-intel"]
        t = x["runtime_timings_ms"]  # the worker's own clock, and what the round trip adds (a .npy, a JSON line)
        assert 0 < t["worker_ms"] <= x["e2e_ms"]["min"] and 0 <= t["ipc_ms"] < 1000, t
        assert json.loads((Path(x["ir"]) / "export.json").read_text())["weight_format"] == "fp32"
    assert "--peers optimum-intel,openvino-genai" in r["command"] and "--baseline-bf16" in r["command"]
    table = next(out.glob("*.md")).read_text()
    assert "| optimum-intel | openvino | fp32 (f32 compute) |" in table or "bf16 compute" in table
    assert re.search(r"- openvino-genai: .*\(p50: worker [\d.]+ ms, IPC [\d.]+ ms\)", table)


@needs_peers
def test_bf16_baseline(run):
    """diffusers under bf16 autocast: the same picture at bf16's precision (44.7 dB measured here)."""
    x = next(x for x in run[1]["results"] if x["name"] == "diffusers-eager-bf16")
    print(f"diffusers-eager-bf16 vs diffusers-eager: {x['psnr_db']} dB")
    assert x["precision"] == "bfloat16 autocast" and x["psnr_db"] >= 30.0, x


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--peers", "bogus"],
            r"unknown peer bogus; peers: optimum-intel, optimum-intel-int8, openvino-genai \(or all\)",
        ),
        (["--peers", "optimum-intel", "--peers-python", "{tmp}/none/python"], r"no peers' Python at .*make cpu-peers"),
    ],
)
def test_bad_peers_are_one_line(args, message, bench_engine, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in args]
    assert main(["bench", str(bench_engine), *ARGS, *argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdrt: error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


@needs_peers
@pytest.mark.parametrize(
    "sampler,message",
    [
        ("dpmpp_2m", r"OpenVINO GenAI has no DPMSolverMultistepScheduler\): no GenAI equivalent; .*: euler, euler_a"),
        ("ddim", r"GenAI's DDIM scheduler does not implement clip_sample=True"),  # diffusers' DDIM default
    ],
)
def test_a_sampler_genai_lacks_is_one_line(sampler, message, bench_engine, tmp_path, capsys):
    argv = ["bench", str(bench_engine), *ARGS, "--sampler", sampler, "--peers", "openvino-genai"]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdrt: error: --peers openvino-genai: ") and re.search(message, err[0])


def test_all_leaves_out_what_cannot_run(bench_engine, tmp_path):
    """``--peers all`` runs what is there and notes the rest; without the peers' Python, that is nothing."""
    plan = select_peers(["all"], tmp_path / "python", read_manifest(bench_engine), None)
    assert isinstance(plan, PeerPlan) and plan.names == []
    assert [s["name"] for s in plan.skipped] == list(PEERS)
    assert all("make cpu-peers" in s["reason"] for s in plan.skipped)


@needs_peers
def test_all_runs_the_int8_peer_beside_sdrts_int8(bench_engine):
    manifest = read_manifest(bench_engine)
    assert select_peers(["all"], PEERS_PYTHON, manifest, None, int8=True).names == [*PEERS[:1], INT8_PEER, *PEERS[1:]]
    assert INT8_PEER not in select_peers(["all"], PEERS_PYTHON, manifest, None).names


@needs_peers
def test_int8_peer_is_optimum_intels_own_int8(bench_engine, tmp_path):
    """optimum-intel's hybrid INT8 over the peers' IR, made once beside it: its U-Net holds 8-bit weights, the
    bench reports it as computing INT8 (so no float32 bound), and it draws the baseline's picture at INT8's
    precision (30.9 dB measured here, where a different picture is ~15-20 dB)."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'sdrt[openvino]'")
    assert main(["bench", str(bench_engine), *ARGS, "--peers", INT8_PEER, "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    x = next(x for x in json.loads(path.read_text())["results"] if x["name"] == INT8_PEER)
    ir = Path(x["ir"])
    record = json.loads((ir / "quantize.json").read_text())
    assert (record["mode"], record["samples"], record["from"]) == ("hybrid", INT8_SAMPLES, ir.name.split("-int8")[0])
    unet = ov.Core().read_model(str(ir / "unet" / "openvino_model.xml"))
    types = (ov.Type.i8, ov.Type.u8)
    assert sum(op.get_type_name() == "Constant" and op.get_element_type() in types for op in unet.get_ops()) > 10
    assert x["inference_precision"].endswith(", U-Net int8 (hybrid), other weights int8") and "bound_fraction" not in x
    assert x["repeatable"] and x["psnr_db"] >= 25.0, x


@needs_peers
def test_all_leaves_out_a_peer_without_the_sampler(bench_engine):
    plan = select_peers(["all"], PEERS_PYTHON, read_manifest(bench_engine), "dpmpp_2m")
    assert plan.names == ["optimum-intel"] and [s["name"] for s in plan.skipped] == ["openvino-genai"]
