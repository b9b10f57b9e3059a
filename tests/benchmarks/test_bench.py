"""`sdrt bench` for real on the CPU: the tiny preset exported once, then sdrt (OpenVINO where installed, and ONNX
Runtime) against diffusers at
64x64, 3 steps, 2 timed runs after 1 warm-up. Checks the files, their JSON shape, the interleaving, the agreement
of the images, the FLOP counts against independent ones, and the lower bound against the measurements."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from sdrt.cli import main

pytestmark = pytest.mark.xdist_group("bench")  # its fixtures are made once per process: keep it in one

ARGS = ["--height", "64", "--width", "64", "--steps", "3", "--runs", "2", "--warmup", "1"]
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
SDRT = ["sdrt-openvino"] * HAS_OPENVINO + ["sdrt-onnxruntime"]  # every backend available here, fastest first
STAGES = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def engine(bench_engine):
    return bench_engine  # conftest: exported once, shared with test_bench_peers


@pytest.fixture(scope="module")
def run(engine, tmp_path_factory):
    """(output folder, parsed JSON) of one real `sdrt bench` run.

    torch runs single-threaded here: on a small shared CI machine, OpenMP threads waiting at barriers for a core
    that another process holds make eager diffusers tens of times slower; the test checks no speed."""
    out = tmp_path_factory.mktemp("results")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", str(engine), *ARGS, "--out-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = out.glob("*.json")
    return out, json.loads(path.read_text())


def test_writes_json_markdown_and_chart(run):
    out, report = run
    files = sorted(p.name for p in out.iterdir())
    stem = files[0].rsplit(".", 1)[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_cpu_tiny-sd1", stem)
    assert files == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / f"{stem}.md").read_text()
    assert "| sdrt-onnxruntime | onnxruntime | fp32 | off |" in table and "| diffusers-eager | torch |" in table


def test_report_shape(run):
    _, r = run
    assert r["device"].startswith("cpu (") and r["model"] == "tiny-sd1"
    assert (r["height"], r["width"], r["steps"], r["batch"], r["guidance"]) == (64, 64, 3, 1, 7.5)
    assert r["sampler"] == "pndm" and r["date"][:4].isdigit()
    keys = {"torch", "cuda", "driver", "diffusers", "onnxruntime", "tensorrt", "sdrt", "python"}
    assert keys <= set(r["software"])
    assert r["command"].startswith("sdrt bench ") and "--steps 3" in r["command"]
    assert [x["name"] for x in r["results"]] == [*SDRT, "diffusers-eager"]
    assert [x["kind"] for x in r["results"]] == ["sdrt"] * len(SDRT) + ["baseline"]
    for x in r["results"]:
        e = x["e2e_ms"]
        assert e["n"] == 2 and 0 < e["min"] <= e["p50"] <= e["p90"]
        assert len(x["e2e_runs_ms"]) == 2 and min(x["e2e_runs_ms"]) == e["min"]
        assert x["cuda_graph"] is False and x["peak_mem_mb"] is None  # CPU: no GPU memory to report
        assert len(x["warmup_ms"]) == 1 and x["load_ms"] > 0
        for stage in (*STAGES, "unet_call"):
            assert 0 < x["stages_ms"][stage]["min"] <= x["stages_ms"][stage]["p50"]
        assert x["unet_calls_per_run"] == r["unet_calls"] == 4  # PNDM: steps + 1 U-Net calls
    assert r["results"][-1]["precision"] == "float32" and "fp16 is not a real option" in r["results"][-1]["note"]
    if HAS_OPENVINO:  # the precision OpenVINO computed in, whatever the graphs hold
        assert r["results"][0]["inference_precision"] in ("f32", "bf16")


def test_contenders_run_round_robin(run):
    _, r = run
    assert r["order"] == [*SDRT, "diffusers-eager"] * 2


def test_same_picture_as_the_baseline(run):
    _, r = run
    for ours in r["results"][:-1]:  # OpenVINO computes f32 on a CPU without bf16; bf16 is held at its own bound
        assert ours["repeatable"] and "max_abs_diff" in ours
        bound = 30.0 if ours.get("inference_precision") == "bf16" else 40.0
        assert ours["identical_to_baseline"] or ours["psnr_db"] >= bound, ours


def test_lower_bound_is_below_every_measurement(run):
    _, r = run
    flops, bound = r["flops"], r["lower_bound_ms"]
    assert all(flops[k] > 0 for k in ("text_encoder", "unet_call", "vae_decoder"))
    assert r["matmul_tflops"] == max(r["matmul"]["measured_tflops"]) > 0  # the better of before and after
    assert bound["e2e"] == pytest.approx(sum(bound[s] for s in STAGES))
    assert bound["unet"] == pytest.approx(flops["unet_call"] * 4 / (r["matmul_tflops"] * 1e12) * 1e3)
    for x in r["results"]:
        narrower = x.get("inference_precision", "f32") != "f32"  # OpenVINO's bf16 runs faster than the f32 rate
        assert ("bound_fraction" not in x) == narrower, x["name"]
        if narrower:
            continue
        assert bound["e2e"] <= x["e2e_ms"]["min"]
        assert 0 < x["bound_fraction"]["e2e"] <= 1
        for s in STAGES:
            assert bound[s] <= x["stages_ms"][s]["p50"], s


def test_flops_agree_with_independent_counts(run):
    """The text encoder against the transformer's analytic count; the U-Net and VAE by how they must scale."""
    from sdrt.benchmarks.flops import Shape, stage_flops
    from sdrt.export.load import components_from_preset
    from sdrt.export.presets import get_preset

    pipe = components_from_preset(get_preset("tiny-sd1"), 0).to_diffusers()
    cfg = pipe.text_encoder.config
    t, d, ff, layers = 77, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_row = layers * (4 * 2 * t * d * d + 2 * 2 * t * d * ff + 2 * 2 * t * t * d)  # q,k,v,o; MLP; QK^T and AV
    small = stage_flops(pipe, Shape(1, 64, 64, cfg=True))
    assert small["text_encoder"] == 2 * per_row == run[1]["flops"]["text_encoder"]  # prompt and negative rows
    assert small == {k: v for k, v in run[1]["flops"].items() if k != "unet_calls"}
    large = stage_flops(pipe, Shape(1, 128, 128, cfg=True))
    assert 4.0 < large["unet_call"] / small["unet_call"] < 4.6  # convolutions 4x, self-attention 16x
    assert 4.0 <= large["vae_decoder"] / small["vae_decoder"] < 4.6
    no_cfg = stage_flops(pipe, Shape(1, 64, 64, cfg=False))
    assert no_cfg["unet_call"] * 2 == small["unet_call"] and no_cfg["vae_decoder"] == small["vae_decoder"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["{missing}"], "no such engine directory"),
        (["{engine}", "--backends", "tensorrt"], "backend tensorrt is not available .* available: (openvino, )?onnx"),
        (["{engine}", "--backends", "bogus,onnxruntime"], "backend bogus is not available"),
        (["{engine}", "--runs", "0"], "--runs must be >= 1"),
    ],
)
def test_bad_input_is_one_line(args, message, engine, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "nope", engine=engine) for a in args]
    assert main(["bench", *argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdrt: error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_a_contender_that_fails_is_reported_and_left_out():
    """One broken path (a failed graph capture, say) costs its own figures only: the error is recorded and the
    run goes on; an SdrtError (the request or the directory is wrong for everyone) still stops the run."""
    from sdrt.benchmarks.bench import load_or_fail
    from sdrt.benchmarks.measure import Clock
    from sdrt.runtime.errors import SdrtError

    failed: list[dict[str, str]] = []
    cpu = torch.device("cpu")

    def broken():
        return torch.ones(2, 3) @ torch.ones(2, 3)  # a real shape error, raised by torch

    assert load_or_fail("sdrt-x-graph", broken, cpu, Clock(cpu), None, 1, failed) is None
    assert failed == [{"name": "sdrt-x-graph", "error": failed[0]["error"]}]
    assert failed[0]["error"].startswith("RuntimeError: ") and "shapes cannot be multiplied" in failed[0]["error"]

    def wrong_request():
        raise SdrtError("--batch must be >= 1, got 0")

    with pytest.raises(SdrtError):
        load_or_fail("sdrt-x", wrong_request, cpu, Clock(cpu), None, 1, failed)
    assert len(failed) == 1
