"""What `sdrt bench` writes: the environment it ran in, and the JSON, markdown table and PNG chart of one run,
named ``<date>_<device>_<model>`` under the output folder."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

STAGES = ("text_encoder", "unet", "vae_decoder")
STAGE_LABELS = {"text_encoder": "text encoder", "unet": "U-Net", "vae_decoder": "VAE decode", "other": "other"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software() -> dict[str, str | None]:
    """Versions of everything that decides the numbers (None: not installed)."""
    trt = None
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt

        trt = tensorrt.__version__
    driver = None
    if torch.cuda.is_available():
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.split("\n")[0] or None
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver, "diffusers": _version("diffusers"),
        "transformers": _version("transformers"), "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "tensorrt": trt, "sdrt": _version("sdrt"), "python": platform.python_version(),
    }  # fmt: skip


def write_all(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """``stem``.json, .md and .png in ``out_dir`` (created; files of the same name are replaced)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths[1].write_text(markdown(report))
    chart(report, paths[2])
    return paths


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if x < 10 else f"{x:.0f}" if x >= 1000 else f"{x:.1f}"


def _p50(r: dict[str, Any], stage: str) -> float | None:
    s = r["stages_ms"].get(stage)
    return s["p50"] if s else None


def _round_trip(r: dict[str, Any]) -> str:
    """A peer's p50 split: its worker's own time and the IPC around it."""
    t = r.get("runtime_timings_ms", {})
    if "worker_ms" not in t:
        return ""
    return f" (p50: worker {_ms(t['worker_ms'])} ms, IPC {_ms(t['ipc_ms'])} ms)"


def markdown(report: dict[str, Any]) -> str:
    """The results table, the lower bound beside it, and load / warm-up times, as markdown."""
    s = report["settings"]
    clock = "CUDA events" if report["device_type"] == "cuda" else "wall clock (time.perf_counter)"
    lines = [
        f"# sdrt bench: {report['model']} on {report['device']}",
        "",
        f"{report['date']} · {report['width']}x{report['height']} px · {report['steps']} steps ({report['sampler']}, "
        f"{report['unet_calls']} U-Net calls) · batch {report['batch']} · guidance {report['guidance']:g} · "
        f"seed {s['seed']} · {s['runs']} timed runs after {s['warmup']} warm-up(s), contenders interleaved · "
        f"timing: {clock} · 1-min load average {s['loadavg_1min']['start']:.2f} at start, "
        f"{s['loadavg_1min']['end']:.2f} at end",
        "",
        f"`{report['command']}`",
        "",
        "| contender | backend | precision | CUDA graph | e2e p50 ms | p90 | min | text encoder ms | U-Net ms/call "
        "| VAE ms | other ms | peak GPU MiB | PSNR vs baseline | of bound |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        e = r["e2e_ms"]
        mem = "—" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
        if r["name"] == "diffusers-eager":
            agree = "reference"
        elif r.get("identical_to_baseline"):
            agree = "identical"
        else:
            agree = "—" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f} dB"
        frac = r.get("bound_fraction", {}).get("e2e")
        precision = r["precision"] + (f" ({r['inference_precision']} compute)" if r.get("inference_precision") else "")
        lines.append(
            f"| {r['name']} | {r['backend']} | {precision} | {'on' if r['cuda_graph'] else 'off'} "
            f"| {_ms(e['p50'])} | {_ms(e['p90'])} | {_ms(e['min'])} | {_ms(_p50(r, 'text_encoder'))} "
            f"| {_ms(_p50(r, 'unet_call'))} | {_ms(_p50(r, 'vae_decoder'))} | {_ms(_p50(r, 'other'))} | {mem} "
            f"| {agree} | {'—' if frac is None else f'{frac:.1%}'} |"
        )
    lines.append("")
    notes = [f"- {r['name']}: {r['note']}{_round_trip(r)}" for r in report["results"] if r.get("note")]
    notes += [f"- {f['name']}: **failed**, left out: {f['error']}" for f in report.get("failed", [])]
    notes += [f"- {f['name']}: left out: {f['reason']}" for f in report.get("skipped", [])]
    lines += notes + ([""] if notes else [])
    lb, fl, mm = report.get("lower_bound_ms"), report.get("flops"), report.get("matmul")
    unbounded = [r["name"] for r in report["results"] if "bound_fraction" not in r]
    if lb and fl and mm:
        lines.append(
            f"Lower bound at the measured {mm['dtype']} matmul rate ({report['matmul_tflops']:.3g} TFLOP/s, "
            f"{mm['n']}x{mm['n']} best of {mm['repeats']}, before and after the timed runs): "
            f"text encoder {_ms(lb['text_encoder'])} ms "
            f"({fl['text_encoder'] / 1e9:.3g} GFLOP), U-Net {_ms(lb['unet'])} ms ({fl['unet_calls']} x "
            f"{fl['unet_call'] / 1e9:.3g} GFLOP), VAE {_ms(lb['vae_decoder'])} ms ({fl['vae_decoder'] / 1e9:.3g} "
            f'GFLOP), end to end {_ms(lb["e2e"])} ms. "of bound" = lower bound / measured p50'
            + (
                f"; none for {', '.join(unbounded)}, computing in a narrower type than {mm['dtype']}, which this "
                "rate does not bound."
                if unbounded
                else "."
            )
        )
    else:
        lines.append(f"No lower bound: {report.get('flops_note', 'FLOPs not counted')}.")
    lines += [
        "",
        "Excluded from the timings (engine load; warm-up runs, the first with lazy session creation or graph capture):",
        "",
        "| contender | load ms | warm-up ms |",
        "| --- | ---: | --- |",
    ]
    for r in report["results"]:
        lines.append(f"| {r['name']} | {_ms(r['load_ms'])} | {', '.join(_ms(w) for w in r['warmup_ms']) or '—'} |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """Horizontal bars of p50 end to end per contender, split into stages where they were observed; the lower
    bound as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.6 * len(results)))
    colors = {"text_encoder": "#4c72b0", "unet": "#dd8452", "vae_decoder": "#55a868", "other": "#b0b0b0"}
    for i, r in enumerate(results):
        parts = [(k, _p50(r, k)) for k in (*STAGES, "other")]
        if any(v is None for k, v in parts if k != "other"):
            ax.barh(
                i,
                r["e2e_ms"]["p50"],
                color="#8172b2",
                label="end to end (one CUDA graph)" if r["cuda_graph"] else "end to end",
            )
        else:
            left = 0.0
            for k, v in parts:
                v = max(v or 0.0, 0.0)
                ax.barh(i, v, left=left, color=colors[k], label=STAGE_LABELS[k])
                left += v
        ax.plot([r["e2e_ms"]["min"], r["e2e_ms"]["p90"]], [i, i], color="black", linewidth=1)
    lb = report.get("lower_bound_ms")
    if lb:
        ax.axvline(lb["e2e"], color="black", linestyle="--", linewidth=1, label="lower bound (FLOPs / matmul rate)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_yticks(range(len(results)), [r["name"] for r in results], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per request (p50; whisker: min to p90)")
    ax.set_title(
        f"{report['model']}, {report['width']}x{report['height']}, {report['steps']} steps, batch {report['batch']}"
        f" — {report['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def finite(x: float) -> float | None:
    """JSON has no infinity: None for a non-finite number."""
    return x if math.isfinite(x) else None
