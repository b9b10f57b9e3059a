"""The INT8 U-Net on the CPU (`sdrt quantize`, `--cpu-int8`) against OpenVINO f32: speed of a U-Net call, and what
it costs the picture.

For each mode DIR's own INT8 U-Net is used where it has one of that mode; otherwise a copy of DIR (files hard-linked
where the filesystem allows: `sdrt quantize` only adds files and replaces manifest.json by rename, so DIR is never
written) is quantized with the calibration settings given, and the time it took is reported. Then, in one process:
- the request (--prompt, --seed, --steps, --size, guidance 7.5, the checkpoint's sampler) on ONNX Runtime fp32, on
  OpenVINO f32 and with each INT8 U-Net (the other graphs f32): each picture's PSNR against the two f32 ones;
- one U-Net call with guidance (batch 2) on the inputs of a real call of that request (its middle step), median of
  --runs after --warmup calls each, the contenders interleaved within each round.
JSON and markdown go to --out, named by date, model and size, with the machine, the versions and this command.

    python -m sdrt.benchmarks.cpu_int8 DIR [--size PX] [--steps 20] [--modes hybrid weights] [--runs 10]
        [--warmup 2] [--calib-prompts 4] [--calib-steps 10] [--calib-size PX (default: --size)] [--work DIR]
        [--keep] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.benchmarks.measure import psnr
from sdrt.export.quantize import QuantizeOptions, quantize_directory
from sdrt.runtime.int8 import ENTRY, MODES
from sdrt.runtime.manifest import read_manifest
from sdrt.runtime.model import Model
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def linked_copy(src: Path, dest: Path) -> None:
    """DIR's files hard-linked into ``dest`` (copied across filesystems); manifest.json always copied."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link, ignore=shutil.ignore_patterns("manifest.json", ".*"))
    shutil.copy2(src / "manifest.json", dest / "manifest.json")


def int8_dirs(root: Path, args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """{mode: {"dir", "entry", "made_s"}}: DIR itself where its INT8 U-Net is of that mode, else a quantized copy."""
    own = read_manifest(root).get(ENTRY)
    out = {}
    for mode in args.modes:
        if own is not None and own["mode"] == mode:
            out[mode] = {"dir": root, "entry": own, "made_s": None}
            continue
        dest = work / mode
        linked_copy(root, dest)
        opts = QuantizeOptions(mode, args.calib_prompts, args.calib_steps, args.calib_size or args.size, force=True)
        entry = quantize_directory(dest, opts)
        made = {"calibration": entry.pop("calibration_s"), "quantization": entry.pop("quantize_s")}
        out[mode] = {"dir": dest, "entry": entry, "made_s": made}
        print(f"{mode}: quantized in {sum(made.values()):.0f} s", file=sys.stderr)
    return out


def picture(pipe: Pipeline, params: Params, record: bool = False) -> tuple[np.ndarray, dict | None]:
    """The request's uint8 picture; with ``record``, also the U-Net's inputs at its middle call."""
    calls: list[dict[str, torch.Tensor]] = []
    run = pipe.backend.run
    if record:

        def recorded(graph: str, feeds: dict) -> tuple:
            if graph == "unet":
                calls.append({k: v.clone() for k, v in feeds.items()})
            return run(graph, feeds)

        pipe.backend.run = recorded
    try:
        pixels = pipe.generate(pipe.request(params)).numpy()
    finally:
        pipe.backend.run = run
    return pixels, (calls[len(calls) // 2] if calls else None)


def time_unet(pipes: dict[str, Pipeline], feeds: dict, runs: int, warmup: int) -> dict[str, dict[str, float]]:
    """Milliseconds of one U-Net call per contender: median, min and max of ``runs`` rounds, interleaved."""
    for pipe in pipes.values():
        for _ in range(warmup):
            pipe.backend.run("unet", feeds)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(runs):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.backend.run("unet", feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: {"p50": statistics.median(t), "min": min(t), "max": max(t)} for n, t in times.items()}


def machine() -> dict[str, Any]:
    """The CPU as lscpu names it, the INT8 / bf16 instruction sets it has, and what OpenVINO reports."""
    import openvino

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    caps = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {
        "cpu": fields.get("Model name", "?").strip(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "flags": {f: f in flags for f in CPU_FLAGS},
        "openvino_capabilities": list(caps),
        "load_average": os.getloadavg()[0],
    }


def versions() -> dict[str, str]:
    import nncf
    import onnxruntime
    import openvino

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    return {
        "sdrt": commit or "?",
        "openvino": openvino.__version__,
        "nncf": nncf.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def measure(root: Path, args: argparse.Namespace, made: dict[str, dict]) -> dict[str, Any]:
    """The pictures (ONNX Runtime fp32, OpenVINO f32, each INT8 U-Net) and the interleaved U-Net call timings."""
    params = Params(prompt=args.prompt, steps=args.steps, height=args.size, width=args.size, seed=args.seed)
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as ort:
        reference, _ = picture(ort, params)
        sampler = ort.request(params).sampler
    pipes = {"f32": Pipeline.load(root, backend="openvino", device="cpu", cpu_precision="f32")}
    for mode, m in made.items():
        pipes[f"int8-{mode}"] = Pipeline.load(
            m["dir"], backend="openvino", device="cpu", cpu_precision="f32", cpu_int8=True
        )
    try:
        f32, feeds = picture(pipes["f32"], params, record=True)
        rows = {}
        for name, pipe in pipes.items():
            pixels = f32 if name == "f32" else picture(pipe, params)[0]
            rows[name] = {
                "precision": pipe.backend.inference_precision,
                "psnr_vs_onnxruntime_fp32": psnr(pixels, reference),
                "psnr_vs_openvino_f32": None if name == "f32" else psnr(pixels, f32),
            }
        timing = time_unet(pipes, feeds, args.runs, args.warmup)
    finally:
        for pipe in pipes.values():
            pipe.close()
    for name, row in rows.items():
        row.update(unet_ms=timing[name], speedup=timing["f32"]["p50"] / timing[name]["p50"])
    request = {
        "prompt": params.prompt,
        "steps": params.steps,
        "size": args.size,
        "seed": params.seed,
        "guidance": params.guidance,
        "sampler": sampler,
    }
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    return {"request": request, "unet_inputs": shapes, "contenders": rows}


def markdown(result: dict[str, Any]) -> str:
    m, r = result["machine"], result["request"]
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in m["flags"].items())
    lines = [
        f"# INT8 U-Net on the CPU: {result['model']} at {r['size']} px",
        "",
        f"    {result['command']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; {flags}; OpenVINO capabilities "
        f"{', '.join(m['openvino_capabilities'])}; 1-min load average {m['load_average']:.2f} at the start, "
        f"{result['load_average_end']:.2f} at the end.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        f"Request: {r['prompt']!r}, {r['steps']} steps ({r['sampler']}), guidance {r['guidance']:g}, seed "
        f"{r['seed']}; U-Net call inputs {result['unet_inputs']}, median of {result['runs']} interleaved rounds after "
        f"{result['warmup']} warm-up calls each.",
        "",
        "| contender | precision | U-Net call p50 ms | min | max | speed-up vs f32 | PSNR vs OpenVINO f32 | "
        "PSNR vs ONNX Runtime fp32 | made in |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in result["contenders"].items():
        t, made = c["unet_ms"], result["int8"].get(name.removeprefix("int8-"), {}).get("made_s")
        how = f"{made['calibration']:.0f} s calibration + {made['quantization']:.0f} s quantization" if made else "-"
        lines.append(
            f"| {name} | {c['precision']} | {t['p50']:.0f} | {t['min']:.0f} | {t['max']:.0f} | "
            f"{c['speedup']:.2f}x | {_db(c['psnr_vs_openvino_f32'])} | "
            f"{_db(c['psnr_vs_onnxruntime_fp32'])} | {how} |"
        )
    for mode, q in result["int8"].items():
        e = q["entry"]
        calib = f"{e['samples']} U-Net calls ({e['prompts']} prompts x {e['steps']} steps at {e['size']} px)"
        lines.append(f"\n{mode}: {calib if e['samples'] else 'data-free'}, NNCF {e['nncf']}.")
    return "\n".join(lines) + "\n"


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} dB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.cpu_int8", description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="an fp32 engine directory (never written)")
    ap.add_argument("--size", type=int, help="px, square (default: the model's default size)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt", default="a photograph of a red fox in a snowy forest, detailed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calib-prompts", type=int, default=QuantizeOptions.prompts)
    ap.add_argument("--calib-steps", type=int, default=QuantizeOptions.steps)
    ap.add_argument("--calib-size", type=int, help="calibration size, px (default: --size)")
    ap.add_argument("--work", type=Path, help="where the quantized copies go (default: a hidden folder beside DIR)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized copies")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    root = args.dir
    manifest = read_manifest(root)
    args.size = args.size or Model.from_manifest(manifest).default_px
    started = {"machine": machine(), "versions": versions()}
    work = args.work or Path(tempfile.mkdtemp(prefix=f".{root.name}-int8-", dir=root.parent))
    command = shlex.join(["python", "-m", "sdrt.benchmarks.cpu_int8", *(sys.argv[1:] if argv is None else argv)])
    try:
        made = int8_dirs(root, args, work)
        name = Model.from_manifest(manifest).name
        result = {
            "model": name,
            "command": command,
            **started,
            **measure(root, args, made),
            "runs": args.runs,
            "warmup": args.warmup,
            "load_average_end": os.getloadavg()[0],
            "int8": {mode: {**m, "dir": str(m["dir"])} for mode, m in made.items()},
        }
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    stem = f"{datetime.date.today()}_cpu_int8_{result['model']}-{args.size}px"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
