"""One U-Net call with classifier-free guidance on the CPU, through sdrt's own backends: ONNX Runtime, and OpenVINO
compiled for the call's static shape or as one dynamic model, at each inference precision the CPU has.

Every contender gets the same inputs (sample [2, C, h, w], the timestep, random text states); each is compiled
and warmed up first (compile time reported, excluded), then the timed calls go round-robin over the contenders so
that drift and other load hit all of them alike. Beside the medians: each output's relative L2 error against ONNX
Runtime's fp32 output. This is what decides whether OpenVINO compiles per shape (`OpenVinoBackend(static=...)`).

    python -m sdrt.benchmarks.cpu_unet DIR [--px 256 512] [--runs 3] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sdrt.benchmarks.report import software
from sdrt.runtime.backends import OnnxRuntimeBackend
from sdrt.runtime.manifest import read_manifest
from sdrt.runtime.model import Model
from sdrt.runtime.openvino import OpenVinoBackend, cpu_precisions, import_openvino


def cpu_model() -> dict[str, Any]:
    """The CPU's name and the flags that decide OpenVINO's precisions and INT8 kernels."""
    name, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return {"name": name, "cores": torch.get_num_threads(), "flags": [f for f in wanted if f in flags]}


def unet_feeds(manifest: dict[str, Any], px: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of one guided call at px x px: every input the U-Net graph declares, rows = 2."""
    gen = torch.Generator().manual_seed(seed)
    latent = px // Model.from_manifest(manifest).geometry.vae_scale_factor
    sizes = {"B": 2, "h": latent, "w": latent, "T": 77}
    feeds = {}
    for name, spec in manifest["graphs"]["unet"]["inputs"].items():
        shape = [sizes[s] if isinstance(s, str) else s for s in spec["shape"]]
        x = torch.full(shape, 500.0) if name == "timestep" else torch.randn(shape, generator=gen)
        feeds[name] = x.to(getattr(torch, spec["dtype"]))
    return feeds


def contenders(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    cpu = torch.device("cpu")
    out = {"onnxruntime": OnnxRuntimeBackend(root, manifest, cpu)}
    for precision in cpu_precisions(import_openvino().Core()):
        for static in (True, False):
            name = f"openvino-{precision}-{'static' if static else 'dynamic'}"
            out[name] = OpenVinoBackend(root, manifest, cpu, precision, cache=False, static=static)
    return out


def measure(root: Path, sizes: list[int], runs: int) -> dict[str, Any]:
    manifest = read_manifest(root)
    backends = contenders(root, manifest)
    results = []
    for px in sizes:
        feeds = unet_feeds(manifest, px)
        row: dict[str, Any] = {"px": px, "sample": list(feeds["sample"].shape), "contenders": {}}
        outs = {}
        for name, backend in backends.items():
            t0 = time.perf_counter()
            outs[name] = backend.run("unet", feeds)[0].float()  # compiles (OpenVINO) and warms up
            row["contenders"][name] = {"first_call_ms": (time.perf_counter() - t0) * 1e3, "ms": []}
        ref = outs["onnxruntime"]
        for name, out in outs.items():
            row["contenders"][name]["rel_l2_vs_onnxruntime"] = float((out - ref).norm() / ref.norm())
        for _ in range(runs):
            for name, backend in backends.items():
                t0 = time.perf_counter()
                backend.run("unet", feeds)
                row["contenders"][name]["ms"].append((time.perf_counter() - t0) * 1e3)
        for entry in row["contenders"].values():
            entry["median_ms"] = statistics.median(entry["ms"])
        results.append(row)
        print(markdown_rows(row), file=sys.stderr)
    return {"model": Model.from_manifest(manifest).name, "precision": manifest["precision"], "sizes": results}


def markdown_rows(row: dict[str, Any]) -> str:
    base = row["contenders"]["onnxruntime"]["median_ms"]
    lines = [
        f"\n{row['px']}x{row['px']} px, sample {row['sample']}:\n",
        "| contender | median ms | runs ms | vs ONNX Runtime | first call ms | rel. L2 vs ONNX Runtime |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, c in row["contenders"].items():
        runs = ", ".join(f"{x:.0f}" for x in c["ms"])
        lines.append(
            f"| {name} | {c['median_ms']:.0f} | {runs} | {base / c['median_ms']:.2f}x | "
            f"{c['first_call_ms']:.0f} | {c['rel_l2_vs_onnxruntime']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.cpu_unet", description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="an engine directory (an fp32 export: the CPU's precision)")
    ap.add_argument("--px", type=int, nargs="+", default=[256, 512], help="square image sides (default 256 512)")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per contender and size (default 3)")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    report = measure(args.dir, args.px, args.runs)
    command = ["python", "-m", "sdrt.benchmarks.cpu_unet", *(argv if argv is not None else sys.argv[1:])]
    report.update(
        cpu=cpu_model(),
        software=software(),
        command=shlex.join(command),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )
    stem = f"{datetime.date.today()}_cpu_unet-call_{report['model']}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# One U-Net call with guidance on the CPU: {report['model']} ({report['precision']} export)\n",
        f"Machine: {report['cpu']['name']}, {report['cpu']['cores']} threads, flags {report['cpu']['flags']}; "
        f"load average after the run {report['load_average']}.",
        f"Command: `{report['command']}`",
        *(markdown_rows(r) for r in report["sizes"]),
    ]
    (args.out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(args.out_dir / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
