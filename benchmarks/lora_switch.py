"""Time to switch LoRA adapter sets on a loaded pipeline, per backend.

A switch is what a request whose ``loras`` differ from the last request's pays before its first step:
`Adapters.apply` recomputes W0 + sum of s_i * scale_i * up_i @ down_i for every weight either set touches and hands
the values to the backend (ONNX Runtime: initializer overrides, then a new session for each changed graph, opened
here as the next step would open it; torch: in-place copies into the same parameters). Reported per backend: the
first application (reads and checks the adapter files, keeps the base values) and the median of N switches
alternating between the two adapters at scale 1.

    python -m sdrt.benchmarks.lora_switch ENGINE_DIR A B [--backends onnxruntime torch] [--switches 10]
        [--device cpu] [--json PATH]

ENGINE_DIR needs the two adapters (`sdrt lora add ENGINE_DIR FILE --name A`), and torch programs for the torch
backend (`sdrt export ... --torch-programs`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sdrt.runtime.backends import Backend
from sdrt.runtime.lora import check_loras
from sdrt.runtime.manifest import read_manifest
from sdrt.runtime.model import Model
from sdrt.runtime.pipeline import Pipeline


def ready(backend: Backend, graphs: list[str]) -> None:
    """What the next step would wait for after a switch: ONNX Runtime's new sessions, a GPU's queued copies."""
    session = getattr(backend, "session", None)
    if session is not None:
        for graph in graphs:
            session(graph)
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)


def measure(root: Path, backend: str, device: str, names: tuple[str, str], switches: int) -> dict:
    with Pipeline.load(root, backend=backend, device=device) as pipe:
        sets = [check_loras(pipe.manifest, {n: 1.0}) for n in names]
        graphs = sorted({g for n in names for g in pipe.manifest["loras"][n]["weights"]})
        ready(pipe.backend, graphs)  # without adapters, as a pipeline is after its first request

        def switch(active) -> float:
            t = time.perf_counter()
            pipe.adapters.apply(pipe.backend, active)
            ready(pipe.backend, graphs)
            return (time.perf_counter() - t) * 1e3

        first = switch(sets[0])
        times = [switch(sets[(i + 1) % 2]) for i in range(switches)]
    return {
        "backend": backend,
        "first_ms": first,
        "switch_ms": {"p50": statistics.median(times), "min": min(times), "max": max(times)},
        "switches": switches,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("adapters", nargs=2, help="two adapter names of the engine directory")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--switches", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    manifest = read_manifest(args.dir)
    names = tuple(args.adapters)
    device = args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()})"
    result = {
        "engine": str(args.dir),
        "model": Model.from_manifest(manifest).name,
        "precision": manifest["precision"],
        "device": f"{device}, {torch.get_num_threads()} threads",
        "adapters": {n: manifest["loras"][n]["weights"] for n in names},  # graph -> weights the adapter changes
        "results": [measure(args.dir, b, args.device, names, args.switches) for b in args.backends],
        "torch": torch.__version__,
    }
    print(f"{result['model']} ({result['precision']}) on {result['device']}: switching {names[0]} <-> {names[1]}")
    print(f"{'backend':<12} {'first ms':>10} {'switch p50 ms':>14} {'min':>8} {'max':>8}")
    for r in result["results"]:
        s = r["switch_ms"]
        print(f"{r['backend']:<12} {r['first_ms']:>10.1f} {s['p50']:>14.1f} {s['min']:>8.1f} {s['max']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
