"""Load on a running `sdrt serve`: concurrent clients, mixed sizes and seeds, every request counted.

    python -m sdrt.benchmarks.serve_load URL --clients 16 --requests 96 --sizes 64x64,128x64 --steps 4 --check DIR

Each client sends `/v1/images` requests one after another (distinct seeds, sizes in turn). Reported: latency
p50/p99, throughput, the engine batches the server formed (from its /metrics), and whether every request got
exactly one answer with its own seed. With ``--check DIR`` each image is then compared, byte for byte, with the
same request run alone on a Pipeline loaded here (after the timed run, so the check does not load the server).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def request_bodies(count: int, sizes: list[tuple[int, int]], steps: int, sampler: str, seed0: int) -> list[dict]:
    return [
        {
            "prompt": f"a lighthouse at dusk, study {i}",
            "steps": steps,
            "seed": seed0 + i,
            "height": h,
            "width": w,
            "sampler": sampler,
            "n": 1,
        }
        for i, (h, w) in ((i, sizes[i % len(sizes)]) for i in range(count))
    ]


async def run_load(url: str, bodies: list[dict], clients: int, timeout_s: float) -> tuple[list[dict], float]:
    """Send every body once from ``clients`` concurrent connections; per request: latency, status, answer."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        todo.put_nowait(i)
    results: list[dict] = [{} for _ in bodies]

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:
            while not todo.empty():
                i = todo.get_nowait()
                t = time.perf_counter()
                try:
                    r = await http.post("/v1/images", json=bodies[i])
                    results[i] = {"status": r.status_code, "answer": r.json() if r.status_code == 200 else r.text}
                except httpx.HTTPError as err:
                    results[i] = {"status": None, "answer": repr(err)}
                results[i]["latency_s"] = time.perf_counter() - t

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - t0


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def batches_formed(before: dict, after: dict) -> dict:
    """Engine batches formed during the run: how many, images per batch (mean and histogram)."""

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    count, images = delta("sdrt_batch_images_count"), delta("sdrt_batch_images_sum")
    cumulative = {k[1][0][1]: after[k] - before.get(k, 0.0) for k in after if k[0] == "sdrt_batch_images_bucket"}
    histogram, below = {}, 0.0
    for le in sorted(cumulative, key=float):
        if cumulative[le] - below:
            histogram[le] = int(cumulative[le] - below)
        below = cumulative[le]
    return {
        "batches": int(count),
        "mean_images": images / count if count else 0.0,
        "images_per_batch": histogram,
        "answered_200": int(delta("sdrt_responses_total", endpoint="/v1/images", status="200")),
    }


def check_images(root: str, bodies: list[dict], results: list[dict]) -> list[int]:
    """Seeds whose served image differs from `Pipeline.generate` of the same request alone."""
    from sdrt.runtime.params import Params
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(root)  # the backend and device `sdrt serve` picks by default
    wrong = []
    for b, r in zip(bodies, results, strict=True):
        if r["status"] != 200:
            continue
        req = pipe.request(
            Params(
                prompt=b["prompt"],
                steps=b["steps"],
                height=b["height"],
                width=b["width"],
                seed=b["seed"],
                sampler=b["sampler"],
            )
        )
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["answer"]["images"][0]))))
        if not np.array_equal(served, pipe.generate(req).numpy()[0]):
            wrong.append(b["seed"])
    pipe.close()
    return wrong


def summary(bodies: list[dict], results: list[dict], wall_s: float, batches: dict) -> dict:
    ok = [r for r in results if r["status"] == 200]
    latency = np.array([r["latency_s"] for r in results])
    seeds_back = sorted(r["answer"]["parameters"]["seed"] for r in ok)
    return {
        "requests": len(bodies), "answered_200": len(ok),
        "failed": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results} - {200}},
        "each_seed_answered_once": seeds_back == sorted(b["seed"] for b in bodies),
        "wall_s": round(wall_s, 2), "requests_per_s": round(len(ok) / wall_s, 2),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latency, 99)), 3), **batches,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int, default=96, help="requests in all (default 96)")
    p.add_argument("--sizes", default="64x64,128x64", help="HxW sizes, taken in turn (default 64x64,128x64)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    p.add_argument("--sampler", default="euler", help="sampler (default euler)")
    p.add_argument("--seed", type=int, default=1000, help="first seed; request i has seed + i (default 1000)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request (default 300)")
    p.add_argument("--check", metavar="DIR", help="compare every image with the request run alone on DIR")
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    bodies = request_bodies(args.requests, sizes, args.steps, args.sampler, args.seed)
    before = scrape(args.url)
    results, wall_s = asyncio.run(run_load(args.url, bodies, args.clients, args.timeout_s))
    out = summary(bodies, results, wall_s, batches_formed(before, scrape(args.url)))
    if args.check:
        out["images_differing_from_alone"] = check_images(args.check, bodies, results)
    print(json.dumps(out, indent=2))
    good = out["each_seed_answered_once"] and not out.get("images_differing_from_alone")
    return 0 if good and out["answered_200"] == len(bodies) else 1


if __name__ == "__main__":
    sys.exit(main())
