"""What each sampler's own arithmetic costs per U-Net call, against Euler, at a model's latent shape.

The denoiser is an identity-like stand-in (x0 = 0.9 x), so what is timed is the sampler update: its tensor
arithmetic per call, the plan read from device buffers, the noise of the ancestral / SDE samplers. Set it beside a
U-Net call at the same shape (`sdrt bench`) to see the share of a step it takes. DPM++ SDE's noise is a Brownian
tree's, made on the host once per request before the loop (runtime/noise.py): timed apart, per request.

    python -m sdrt.benchmarks.sampler_cost [--latent 4x64x64] [--batch 1] [--steps 30] [--runs 20]
                                           [--noise-runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from sdrt.runtime.noise import step_noise
from sdrt.runtime.samplers import SAMPLERS, make_plan, sample
from sdrt.runtime.schedule import NoiseSchedule

# SD 1.5's scheduler (PNDM's config; every sampler here reads it as diffusers' from_config does)
_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
SD15 = {
    "class": "PNDMScheduler",
    "betas": _BETAS.tolist(),
    "config": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "num_train_timesteps": 1000,
    },
}


def measure(sampler: str, shape: tuple[int, ...], steps: int, runs: int, noise_runs: int) -> dict:
    plan = make_plan(sampler, NoiseSchedule.from_manifest(SD15), steps)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen) * plan.init_sigma
    noise = torch.randn((plan.noise_draws, *shape), generator=gen)  # (its values do not change the arithmetic)
    host = []
    for r in range(noise_runs if plan.brownian else 0):  # the Brownian tree's draws: host work once per request
        t0 = time.perf_counter()
        step_noise(plan, shape, gen, seed=r)
        host.append(time.perf_counter() - t0)

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        return x * 0.9

    times = []
    for r in range(runs + 2):  # two warm-up runs
        t0 = time.perf_counter()
        sample(plan, denoise, x0, noise)
        if r >= 2:
            times.append(time.perf_counter() - t0)
    calls = len(plan.timesteps)
    median = statistics.median(times)
    return {
        "sampler": sampler,
        "calls": calls,
        "median_ms": median * 1e3,
        "per_call_us": median / calls * 1e6,
        "max_ms": max(times) * 1e3,
        "host_noise_ms": statistics.median(host) * 1e3 if host else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.sampler_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--latent", default="4x64x64", help="C x h x w of the latent (default: SD 1.5 at 512 px)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--noise-runs", type=int, default=5, help="runs of DPM++ SDE's host-side Brownian tree draws")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    shape = (args.batch, *(int(v) for v in args.latent.split("x")))
    rows = [measure(s, shape, args.steps, args.runs, args.noise_runs) for s in SAMPLERS]
    euler = next(r for r in rows if r["sampler"] == "euler")["per_call_us"]
    print(f"sampler update per U-Net call, latent {list(shape)}, {args.steps} steps, median of {args.runs}:")
    for r in rows:
        host = f"  + host noise {r['host_noise_ms']:.0f} ms/request" if r["host_noise_ms"] is not None else ""
        print(
            f"  {r['sampler']:20s} {r['calls']:3d} calls  {r['per_call_us']:8.1f} us/call  "
            f"({r['per_call_us'] / euler:4.2f}x Euler){host}"
        )
    if args.json:
        out = {
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "shape": list(shape),
            "steps": args.steps,
            "runs": args.runs,
            "noise_runs": args.noise_runs,
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
