"""Host time the runtime itself spends per step and per image, measured with a null backend.

The null backend returns preallocated outputs of the right shapes at once, so what remains is sdrt's own work:
request validation, tokenizer, the seed's noise draws, the sampler's tensor arithmetic, guidance, conversion to
uint8. On a GPU with a captured graph this host work happens once per request, before the launch; this measures
its size on the CPU, where it is most visible.

    python -m sdrt.benchmarks.host_overhead ENGINE_DIR [--steps 50] [--runs 20] [--sampler euler] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sdrt.runtime.backends import Backend, resolve_shape
from sdrt.runtime.manifest import read_manifest
from sdrt.runtime.model import Model
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline


class NullBackend(Backend):
    """Answers every graph instantly with zeros of the declared output shapes (allocated once per shape)."""

    name = "null"

    def __init__(self, root: Path, manifest: dict, device: torch.device):
        super().__init__(root, manifest, device)
        self.factor = Model.from_manifest(manifest).geometry.vae_scale_factor  # pixels per latent
        self.cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        entry = self.manifest["graphs"][graph]
        key = (graph, *(tuple(v.shape) for v in feeds.values()))
        if key not in self.cache:
            self.cache[key] = tuple(
                torch.zeros(resolve_shape(o["shape"], feeds, entry["inputs"], self.factor), dtype=torch.float32)
                for o in entry["outputs"].values()
            )
        return self.cache[key]


def measure(root: Path, steps: int, runs: int, sampler: str, px: int | None) -> dict:
    manifest = read_manifest(root)
    pipe = Pipeline(root, manifest, NullBackend(root, manifest, torch.device("cpu")), cuda_graph=False)
    kw = dict(num_inference_steps=steps, sampler=sampler, height=px, width=px, seed=0)
    pipe("warm-up", **kw)
    times, stages = [], {}
    for i in range(runs):
        t = time.perf_counter()
        prompt = f"a photograph of an astronaut riding a horse {i}"
        req = pipe.request(Params(prompt=prompt, steps=steps, sampler=sampler, height=px, width=px, seed=0))
        stages = pipe.generate_batch([req]).timings_ms
        times.append((time.perf_counter() - t) * 1e3)
    p50 = statistics.median(times)
    return {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "engine": str(root),
        "model": Model.from_manifest(manifest).name,
        "height": req.height,
        "steps": steps,
        "sampler": sampler,
        "runs": runs,
        "request_ms": {"p50": p50, "min": min(times), "max": max(times)},
        "per_step_ms_p50": p50 / steps,
        "last_stage_ms": stages,
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--size", type=int, help="px (default: the engine's native size)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    result = measure(args.dir, args.steps, args.runs, args.sampler, args.size)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
