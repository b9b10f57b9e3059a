"""The TensorRT stage's command: `sdrt build DIR`, an engine directory's ONNX graphs -> TensorRT plans.

Only argparse at import: the build extra (onnx, and TensorRT or TensorRT for RTX) is imported when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdrt.runtime.errors import SdrtError, needs_extra


def cmd_build(args: argparse.Namespace) -> int:
    with needs_extra("sdrt build", "build"):
        from sdrt.trt.build import BuildOptions, build_directory

    if args.workspace is not None and args.workspace <= 0:
        raise SdrtError(f"--workspace {args.workspace} must be a positive number of GiB")
    opts = BuildOptions(
        height=args.height,
        width=args.width,
        batch=args.batch,
        dynamic=args.dynamic,
        hires=args.hires,
        workspace_gib=args.workspace,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        backend=args.backend,
        force=args.force,
        compute_capabilities=args.compute_capability,
    )
    report = build_directory(args.dir, opts)
    if args.json:
        print(json.dumps(report, indent=2))
    print(report["operator_check"])
    for problem in report["operators"]:
        print(f"  {problem}")
    if "skipped" in report:
        print(f"{report['skipped']}; {report['install']}")
        return 0
    for name, r in report["graphs"].items():
        done = f"{r['action']} ({r['why']})" if r["action"] != "built" else "built"
        print(f"{name:15s} {done}" + (f" in {r['seconds']:.1f}s" if r["action"] != "skipped" else ""))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """build on the `sdrt` command's subparsers."""
    b = sub.add_parser(
        "build",
        help="ONNX graphs of DIR -> TensorRT plans",
        description="Build a TensorRT plan beside each ONNX graph of DIR (unet.onnx -> unet.plan) with TensorRT "
        "(on the GPU that will run it) or TensorRT for RTX (ahead of time, no GPU needed, for RTX GPUs), skipping "
        "plans whose build key (ONNX hash, precision, profile, builder options, TensorRT family and version, GPU or "
        "target compute capabilities) matches. NVIDIA's ONNX parser checks every graph first. Without either "
        "TensorRT, DIR is left as it is, ready for ONNX Runtime (TensorRT's published operator list is checked).",
    )
    b.add_argument("dir", metavar="DIR")
    b.add_argument(
        "--backend",
        choices=("auto", "tensorrt", "tensorrt-rtx"),
        default="auto",
        help="auto (default): TensorRT on a data-centre GPU, TensorRT for RTX on an RTX GPU or without a GPU, "
        "whichever is installed; without either, say so and leave DIR for ONNX Runtime. tensorrt / tensorrt-rtx: "
        "require that one",
    )
    b.add_argument(
        "--compute-capability",
        metavar="CC,CC",
        help="TensorRT for RTX: the GPUs' compute capabilities the engines target (default 8.6,8.9,12.0)",
    )
    b.add_argument(
        "--height",
        type=int,
        metavar="PX",
        help="image height of the static profile, px (with --dynamic: its opt size); default: the model's native size",
    )
    b.add_argument("--width", type=int, metavar="PX", help="image width, px; as --height")
    b.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help="images per prompt of the static profile (default 1); the U-Net and text encoders get 2x rows",
    )
    b.add_argument(
        "--dynamic",
        action="store_true",
        help="one profile over the exported size and batch ranges instead of one static shape (slower plans)",
    )
    b.add_argument(
        "--hires",
        type=float,
        metavar="SCALE",
        help="one profile from the static shape to the hires fix's second pass at SCALE (the web UI's "
        "hr_scale), tuned for the second pass: both passes run on the same plans",
    )
    b.add_argument("--workspace", type=float, metavar="GIB", help="builder workspace limit (default: TensorRT's)")
    b.add_argument(
        "--timing-cache",
        metavar="PATH",
        help="TensorRT: tactic timing cache reused across builds (default: ~/.cache/sdrt/, one per version and GPU)",
    )
    b.add_argument("--force", action="store_true", help="rebuild plans even when their build key matches")
    b.add_argument("--json", action="store_true", help="print the full report as JSON")
    b.set_defaults(func=cmd_build)
