"""`sdrt bench DIR`: sdrt's backends against eager diffusers, in one process, on one device, for one request.

Every contender runs the same request (prompt, seed, sampler, steps, size, batch, guidance): sdrt on each backend
`available_backends` returns, with the CUDA graph on (where it can be) and off, and diffusers' own pipeline built
from the source DIR was exported from. Each is loaded and warmed up (reported, excluded), then the timed runs go
round-robin over the contenders so that drift (clocks, thermals, other load) hits all of them alike. Beside the
figures: FLOPs per stage, the device's matmul rate, the lower bound they imply, and the PSNR of each contender's
image against the baseline's (a fast path that draws a different picture is not a win). On the CPU, `--peers`
adds the OpenVINO pipelines a CPU user would otherwise pick (benchmarks/peers.py), `--baseline-bf16` diffusers
under bf16 autocast, and `--cpu-int8` sdrt's OpenVINO backend with the directory's INT8 U-Net."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.benchmarks.contenders import DiffusersContender, SdrtContender, quietly, source_pipeline
from sdrt.benchmarks.flops import Shape, lower_bounds, matmul_tflops, stage_flops
from sdrt.benchmarks.measure import Clock, Memory, Spans, psnr, stats
from sdrt.benchmarks.peers import INT8_PEER, PeerContender, PeerPlan, export_ir, int8_ir, peers_python, select_peers
from sdrt.benchmarks.report import STAGES, device_name, device_slug, finite, software, write_all
from sdrt.runtime.backends import available_backends
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.int8 import int8_entry
from sdrt.runtime.manifest import read_manifest
from sdrt.runtime.model import Model
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.samplers import make_plan

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
GPU_STEPS, CPU_STEPS = 50, 10  # CPU: fewer steps and the engine's smallest size, so a run takes seconds


@dataclass
class Options:
    dir: Path
    steps: int | None = None  # None: 50 on a GPU, 10 on the CPU
    height: int | None = None  # None: the model's native size on a GPU, the engine's smallest size on the CPU
    width: int | None = None
    batch: int = 1
    sampler: str | None = None  # None: the checkpoint's own scheduler
    guidance: float = 7.5
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    runs: int = 10
    warmup: int = 2
    device: str | None = None  # None: cuda where torch sees a GPU
    backends: list[str] | None = None  # None: every available one
    baseline: bool = True
    baseline_compile: bool = False
    out_dir: Path = Path("benchmarks/results")
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    baseline_bf16: bool = False  # CPU: also diffusers under torch.autocast("cpu", dtype=torch.bfloat16)
    peers: list[str] = field(default_factory=list)  # optimum-intel, openvino-genai, or ["all"]
    peers_python: str | None = None  # None: $SDRT_PEERS_PYTHON, else the checkout's .peers-venv
    cpu_int8: bool = False  # CPU: also sdrt's OpenVINO backend with DIR's INT8 U-Net (sdrt-openvino-int8)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends is not None else None
        peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
        return cls(
            Path(args.dir),
            args.steps,
            args.height,
            args.width,
            args.batch,
            args.sampler,
            args.guidance,
            args.prompt,
            args.seed,
            args.runs,
            args.warmup,
            args.device,
            backends,
            not args.no_baseline,
            args.baseline_compile,
            Path(args.out_dir),
            baseline_bf16=args.baseline_bf16,
            peers=peers,
            peers_python=args.peers_python,
            cpu_int8=args.cpu_int8,
        )


@dataclass
class Entry:
    """One contender and everything measured about it."""

    contender: Any
    memory: Memory
    load_ms: float = 0.0
    warmup_ms: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    calls: list[dict[str, list[float]]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)


def check_extras() -> None:
    """The baseline needs the export stage (diffusers); the chart needs matplotlib."""
    import importlib.util

    missing = [m for m in ("diffusers", "transformers", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise SdrtError(f"sdrt bench needs {', '.join(missing)}: pip install 'sdrt[bench]'")


def resolve(opts: Options) -> tuple[dict[str, Any], torch.device, list[str], PeerPlan]:
    """Fail fast, before anything loads: the directory, the device, the backends, the options, the peers."""
    manifest = read_manifest(opts.dir)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdrtError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    available = available_backends(manifest, device)
    names = available if opts.backends is None else opts.backends
    unknown = [b for b in names if b not in available]
    if unknown or not names:
        raise SdrtError(
            f"backend {', '.join(unknown) or '(none)'} is not available for {opts.dir} on {device.type}; "
            f"available: {', '.join(available) or 'none'}"
        )
    for what, value, least in (("--runs", opts.runs, 1), ("--warmup", opts.warmup, 0), ("--batch", opts.batch, 1)):
        if value < least:
            raise SdrtError(f"{what} must be >= {least}, got {value}")
    if device.type != "cpu" and (opts.peers or opts.baseline_bf16 or opts.cpu_int8):
        raise SdrtError("--peers, --baseline-bf16 and --cpu-int8 are CPU contenders: use --device cpu")
    if opts.cpu_int8:
        if "openvino" not in available:
            raise SdrtError("--cpu-int8 runs on the OpenVINO backend, not installed here: pip install 'sdrt[openvino]'")
        int8_entry(opts.dir, manifest)  # one line naming `sdrt quantize` where DIR has no (current) INT8 U-Net
    check_extras()
    if not opts.peers:
        return manifest, device, names, PeerPlan()
    plan = select_peers(opts.peers, peers_python(opts.peers_python), manifest, opts.sampler, opts.cpu_int8)
    return manifest, device, names, plan


def run_once(entry: Entry, clock: Clock) -> tuple[float, dict[str, list[float]], np.ndarray]:
    """One request: (end-to-end ms, {stage: [ms per call]}, images)."""
    spans = Spans(clock)
    with entry.memory.run():
        start = clock.mark()
        images = entry.contender(spans)
        end = clock.mark()
        clock.sync()
    return clock.ms(start, end), spans.calls(), images


def load(make: Callable[[], Any], device: torch.device, clock: Clock, request_for, warmup: int) -> Entry:
    """Load one contender (timed), give it the request, and run its warm-ups; all inside its memory account."""
    entry = Entry(None, Memory(device))
    with entry.memory.loading():
        t0 = time.perf_counter()
        entry.contender = make()
        entry.load_ms = (time.perf_counter() - t0) * 1e3
        entry.contender.prepare(request_for(entry.contender))
        entry.warmup_ms = [run_once(entry, clock)[0] for _ in range(warmup)]
    return entry


def load_or_fail(
    name: str,
    make: Callable[[], Any],
    device: torch.device,
    clock: Clock,
    request_for,
    warmup: int,
    failed: list[dict[str, str]],
) -> Entry | None:
    """`load`, except that a contender failing to load or warm up is recorded in ``failed`` (name, error) and left
    out, so one broken path (say, a graph capture) does not cost the figures of the others."""
    try:
        return load(make, device, clock, request_for, warmup)
    except SdrtError:
        raise  # the request or directory is wrong for every contender alike
    except Exception as err:  # noqa: BLE001 - any failure of this contender is its result
        failed.append({"name": name, "error": f"{type(err).__name__}: {err}"[:2000]})
        print(f"sdrt bench: {name} failed: {failed[-1]['error']}", file=sys.stderr)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def make_request(pipe: Pipeline, opts: Options, device: torch.device) -> Request:
    """The one request every contender runs, validated by sdrt (defaults as documented in `Options`)."""
    cuda = device.type == "cuda"
    size = None if cuda else pipe.model.min_px
    steps = opts.steps if opts.steps is not None else (GPU_STEPS if cuda else CPU_STEPS)
    params = Params(
        prompt=opts.prompt,
        steps=steps,
        guidance=opts.guidance,
        height=opts.height or size,
        width=opts.width or size,
        n=opts.batch,
        seed=opts.seed,
        sampler=opts.sampler,
    )
    return pipe.request(params)


def run_bench(opts: Options) -> tuple[dict[str, Any], list[Path]]:
    """Load and warm up every contender, count FLOPs, time the interleaved runs, write the files."""
    manifest, device, backends, plan = resolve(opts)
    irs = peer_irs(opts, manifest, plan)  # exported (once) before anything loads
    clock, entries, requests, failed = Clock(device), [], [], []
    load_before = os.getloadavg()  # CPU figures depend on what else runs: recorded beside them
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def request_for(contender) -> Request:  # the first sdrt pipeline validates the request for all
        if not requests:
            requests.append(make_request(contender.pipe, opts, device))
        return requests[0]

    def add(name: str, make: Callable[[], Any]) -> Any:
        entry = load_or_fail(name, make, device, clock, request_for, opts.warmup, failed)
        if entry is not None:
            entries.append(entry)
        return entry and entry.contender

    try:
        report = measure_all(opts, manifest, device, backends, add, requests, entries, clock, irs, plan)
        report["failed"], report["skipped"] = failed, plan.skipped
    finally:
        for entry in entries:
            entry.contender.close()
    report["date"] = started
    report["settings"]["peers_python"] = str(plan.python) if plan.names else None
    report["settings"]["loadavg_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    stem = f"{report['date'][:10]}_{device_slug(device)}_{report['model']}"
    return report, write_all(report, opts.out_dir, stem)


def peer_irs(opts: Options, manifest: dict[str, Any], plan: PeerPlan) -> dict[str, Path]:
    """{peer: its IR folder}. An export that fails stops the run where the peers were named, and leaves them out
    (noted in ``plan.skipped``) under ``--peers all``."""
    if not plan.names:
        return {}
    try:
        ir = export_ir(opts.dir, manifest, plan)
    except SdrtError as err:
        if opts.peers != ["all"]:
            raise
        plan.skipped += [{"name": p, "reason": str(err)} for p in plan.names]
        plan.names = []
        return {}
    irs = dict.fromkeys(plan.names, ir)
    if INT8_PEER in irs:
        try:
            irs[INT8_PEER] = int8_ir(ir, plan)
        except SdrtError as err:
            if opts.peers != ["all"]:
                raise
            plan.skipped.append({"name": INT8_PEER, "reason": str(err)})
            plan.names.remove(INT8_PEER)
            del irs[INT8_PEER]
    return irs


def measure_all(opts, manifest, device, backends, add, requests, entries, clock, irs, plan) -> dict[str, Any]:
    """Every contender loaded and warmed up in turn, the FLOPs counted, then the timed runs, interleaved."""
    for backend in backends:  # the CUDA graph on where it can be, then off
        graph = add(f"sdrt-{backend}-graph", partial(SdrtContender, opts.dir, backend, device, True))
        if graph.cuda_graph if graph is not None else device.type == "cuda":
            add(f"sdrt-{backend}", partial(SdrtContender, opts.dir, backend, device, False))
    if opts.cpu_int8:
        add("sdrt-openvino-int8", partial(SdrtContender, opts.dir, "openvino", device, False, cpu_int8=True))
    if not entries:
        raise SdrtError(f"no sdrt contender could run the request on {device.type}; see the errors above")
    req, first = requests[0], entries[0].contender.pipe
    unet_calls = len(make_plan(req.sampler, first.schedule, req.steps, req.strength).timesteps)

    flops, flops_note, source = None, None, None
    try:
        t0 = time.perf_counter()
        source = source_pipeline(manifest)
        source_ms = (time.perf_counter() - t0) * 1e3
    except SdrtError as err:
        if opts.baseline:
            raise
        flops_note = f"the source modules could not be built ({err})"
    if source is not None:
        if opts.baseline:
            baseline = add("diffusers-eager", partial(DiffusersContender, source, device))
            if baseline is not None:
                entries[-1].load_ms += source_ms  # building the modules from the source is part of its load
            if opts.baseline_compile:
                add("diffusers-compile", partial(DiffusersContender, source, device, compile_unet=True))
            if opts.baseline_bf16:
                add("diffusers-eager-bf16", partial(DiffusersContender, source, device, bf16=True))
        # the modules whose FLOPs bound every contender (the baseline's own, already moved, when it runs)
        counting = quietly(source.to, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        flops = dict(stage_flops(counting, Shape(req.batch, req.height, req.width, req.cfg)), unet_calls=unet_calls)
        del counting, source
        gc.collect()
    for peer, ir in irs.items():
        add(peer, partial(PeerContender, peer, plan, ir, manifest))
    before = matmul_tflops(device)

    order = []
    for _ in range(opts.runs):  # round-robin: run i of every contender before run i + 1 of any
        for entry in entries:
            e2e, calls, images = run_once(entry, clock)
            entry.e2e.append(e2e)
            entry.calls.append(calls)
            entry.timings.append(dict(entry.contender.timings))
            entry.images.append(images)
            order.append(entry.contender.name)
    # the device's rate: the better of two measurements, before and after the rounds; one alone can meet another
    # process's work (a peer worker releasing its warm-up's memory once took a CPU's rate from 0.19 to 0.109 TFLOP/s)
    after = matmul_tflops(device)
    matmul = dict(max(before, after, key=lambda m: m["tflops"]), measured_tflops=[before["tflops"], after["tflops"]])
    return assemble(opts, manifest, device, req, unet_calls, entries, order, flops, flops_note, matmul)


def bounded(result: dict[str, Any], matmul_dtype: str) -> bool:
    """Whether the matmul rate, measured in ``matmul_dtype``, bounds this contender: not where it computes in a
    narrower type than a float32 rate (OpenVINO's bf16 or INT8 U-Net, torch's bf16 autocast), which runs faster."""
    if matmul_dtype != "float32":
        return True
    compute = result.get("inference_precision") or ("bf16" if "bfloat16" in result["precision"] else "f32")
    return compute == "f32"


def summarise(
    entry: Entry, reference: np.ndarray | None, bounds: dict[str, float] | None, bounds_dtype: str = "float32"
) -> dict[str, Any]:
    """One contender's result: statistics over its timed runs, memory, image agreement, fraction of the bound (where
    the bound's matmul rate bounds it: see `bounded`)."""
    r = entry.contender.describe()
    r["e2e_ms"] = stats(entry.e2e)
    r["e2e_runs_ms"] = list(entry.e2e)  # in run order: drift and a noisy neighbour show here, not in the percentiles
    stages: dict[str, dict[str, float]] = {}
    if all(entry.calls):  # stages observed in every run (not inside a CUDA graph)
        totals = {s: [sum(c.get(s, [])) for c in entry.calls] for s in STAGES}
        stages = {s: stats(v) for s, v in totals.items()}
        stages["unet_call"] = stats([ms for c in entry.calls for ms in c.get("unet", [])])
        stages["other"] = stats([e - sum(totals[s][i] for s in STAGES) for i, e in enumerate(entry.e2e)])
        r["unet_calls_per_run"] = len(entry.calls[0].get("unet", []))
    r["stages_ms"] = stages
    keys = sorted({k for t in entry.timings for k in t})
    if keys:  # sdrt's own Pipeline.timings (graph path: host_prepare_ms and graph_ms only)
        r["runtime_timings_ms"] = {k: stats([t[k] for t in entry.timings if k in t])["p50"] for k in keys}
    r["peak_mem_mb"] = entry.memory.peak_mb()
    r["resident_mem_mb"] = entry.memory.resident_mb if entry.memory.cuda else None
    r["device_mem_mb"] = entry.memory.device_mb
    r["load_ms"], r["warmup_ms"] = entry.load_ms, entry.warmup_ms
    r["repeatable"] = all(np.array_equal(entry.images[0], im) for im in entry.images[1:])
    if reference is not None and entry.images[0] is not reference:
        r["psnr_db"] = finite(psnr(entry.images[0], reference))
        r["max_abs_diff"] = int(np.abs(entry.images[0].astype(np.int16) - reference.astype(np.int16)).max())
        r["identical_to_baseline"] = r["max_abs_diff"] == 0
    if bounds is not None and bounded(r, bounds_dtype):
        r["bound_fraction"] = {"e2e": bounds["e2e"] / r["e2e_ms"]["p50"]}
        for s in STAGES:
            if s in stages and stages[s]["p50"] > 0:
                r["bound_fraction"][s] = bounds[s] / stages[s]["p50"]
    return r


def assemble(opts, manifest, device, req, unet_calls, entries, order, flops, flops_note, matmul) -> dict[str, Any]:
    model = Model.from_manifest(manifest).name
    baseline = next((e for e in entries if e.contender.name == "diffusers-eager"), None)
    reference = baseline.images[0] if baseline else None
    bounds = lower_bounds(flops, flops["unet_calls"], matmul["tflops"]) if flops else None
    command = [
        "sdrt",
        "bench",
        str(opts.dir),
        "--device",
        device.type,
        "--backends",
        ",".join(dict.fromkeys(e.contender.backend for e in entries if e.contender.kind == "sdrt")),
        "--steps",
        str(req.steps),
        "--height",
        str(req.height),
        "--width",
        str(req.width),
        "--batch",
        str(req.batch),
        "--sampler",
        req.sampler,
        "--guidance",
        f"{req.guidance:g}",
        "--prompt",
        req.prompts[0],
        "--seed",
        str(req.seed),
        "--runs",
        str(opts.runs),
        "--warmup",
        str(opts.warmup),
        "--out-dir",
        str(opts.out_dir),
    ]
    command += (["--no-baseline"] if not opts.baseline else []) + (["--baseline-compile"] * opts.baseline_compile)
    command += ["--baseline-bf16"] * opts.baseline_bf16 + (["--peers", ",".join(opts.peers)] if opts.peers else [])
    command += ["--cpu-int8"] * opts.cpu_int8
    return {
        "device": device_name(device),
        "device_type": device.type,
        "model": model,
        "source": manifest["source"],
        "engine_precision": manifest["precision"],
        "height": req.height,
        "width": req.width,
        "steps": req.steps,
        "unet_calls": unet_calls,
        "batch": req.batch,
        "sampler": req.sampler,
        "guidance": req.guidance,
        "date": None,  # when the run started: set by run_bench
        "software": software(),
        "command": shlex.join(command),
        "argv": opts.argv,
        "settings": {
            "prompt": req.prompts[0],
            "negative_prompt": req.negatives[0],
            "seed": req.seed,
            "runs": opts.runs,
            "warmup": opts.warmup,
            "torch_threads": torch.get_num_threads(),
            "timing": "cuda events" if device.type == "cuda" else "perf_counter",
        },
        "order": order,
        "results": [summarise(e, reference, bounds, matmul["dtype"]) for e in entries],
        "flops": flops,
        "flops_note": flops_note,
        "matmul": matmul,
        "matmul_tflops": matmul["tflops"],
        "lower_bound_ms": bounds,
    }


def main(args: argparse.Namespace) -> int:
    """`sdrt bench`: run, write the files, print the markdown table and where the files are."""
    from sdrt.benchmarks.report import markdown

    report, paths = run_bench(Options.from_args(args))
    print(markdown(report))
    for p in paths:
        print(p)
    return 0
