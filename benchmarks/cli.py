"""`sdrt bench`'s command line. Only argparse at import; the benchmark (diffusers, matplotlib) loads when it runs."""

from __future__ import annotations

import argparse

from sdrt.runtime.errors import needs_extra


def cmd_bench(args: argparse.Namespace) -> int:
    with needs_extra("sdrt bench", "bench"):  # checked before any engine loads: a run takes minutes
        import matplotlib  # noqa: F401  (the chart)

        if not args.no_baseline or args.peers:
            import diffusers  # noqa: F401  (the baseline; the source the peers' IR is exported from)
        from sdrt.benchmarks.bench import main as bench_main
    return bench_main(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """bench on the `sdrt` command's subparsers."""
    bn = sub.add_parser(
        "bench",
        help="latency of sdrt's backends against eager diffusers -> benchmarks/results/",
        description="Run the same request with sdrt on every available backend (CUDA graph on and off) and with "
        "diffusers' own pipeline built from the source DIR was exported from (fp16 eager on a GPU, fp32 on the "
        "CPU), in one process and interleaved; write JSON, a markdown table and a PNG chart named by date, device "
        "and model, with FLOPs per stage, the lower bound they imply, and the PSNR of each image against the "
        "baseline's. Defaults: on a GPU the model's native size and 50 steps; on the CPU the engine's smallest "
        "size and 10 steps.",
    )
    bn.add_argument("dir", metavar="DIR", help="an engine directory from `sdrt export` (and `sdrt build`)")
    bn.add_argument("--steps", type=int, help="sampler steps (default: 50 on a GPU, 10 on the CPU)")
    bn.add_argument("--height", type=int, help="px (default: native size on a GPU, the engine's smallest on the CPU)")
    bn.add_argument("--width", type=int, help="px (default: as --height)")
    bn.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    bn.add_argument("--sampler", help="as `sdrt generate --sampler` (default: the checkpoint's own scheduler)")
    bn.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    bn.add_argument("--prompt", default="a photograph of an astronaut riding a horse", help="the prompt")
    bn.add_argument("--seed", type=int, default=0, help="seed of torch.Generator('cpu') (default 0)")
    bn.add_argument("--runs", type=int, default=10, metavar="N", help="timed runs per contender (default 10)")
    bn.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs first (default 2; reported)")
    bn.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where available")
    bn.add_argument("--backends", metavar="A,B", help="sdrt backends to run (default: every available one)")
    bn.add_argument("--no-baseline", action="store_true", help="skip diffusers (FLOPs still counted if it loads)")
    bn.add_argument("--baseline-compile", action="store_true", help="also diffusers with torch.compile(unet)")
    bn.add_argument(
        "--baseline-bf16",
        action="store_true",
        help='CPU: also diffusers under torch.autocast("cpu", dtype=torch.bfloat16) (diffusers-eager-bf16)',
    )
    bn.add_argument(
        "--cpu-int8",
        action="store_true",
        help="CPU: also sdrt's OpenVINO backend with DIR's INT8 U-Net from `sdrt quantize` (sdrt-openvino-int8)",
    )
    bn.add_argument(
        "--peers",
        metavar="A,B",
        help="CPU: also optimum-intel, optimum-intel-int8 and/or openvino-genai (OpenVINO pipelines, in the "
        "peers' own venv from `make cpu-peers`), or all (those installed; optimum-intel-int8 with --cpu-int8); "
        "their OpenVINO IR is exported once from the source DIR was exported from, at fp32 weights, into "
        ".bench-peers/ beside DIR, and reused; optimum-intel-int8's is that IR quantized by optimum-intel "
        "(hybrid INT8, 44 calibration U-Net calls over sdrt quantize's prompts), also made once",
    )
    bn.add_argument(
        "--peers-python",
        metavar="PATH",
        help="the peers' Python (default: $SDRT_PEERS_PYTHON, else .peers-venv/bin/python in the checkout)",
    )
    bn.add_argument("--out-dir", default="benchmarks/results", help="where the files go (default benchmarks/results)")
    bn.set_defaults(func=cmd_bench)
