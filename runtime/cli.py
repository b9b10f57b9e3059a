"""The `sdrt` command. Each subcommand imports its stage only when it runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sdrt.runtime import serve_cli
from sdrt.runtime.errors import SdrtError

PRECISIONS = ("fp16", "fp32")


def _export_stage():
    try:
        import sdrt.export as export
    except ImportError as err:
        raise SdrtError(
            f"the export stage needs its extra dependencies ({err.name} is missing): pip install 'sdrt[export]'"
        ) from None
    return export


def cmd_export(args: argparse.Namespace) -> int:
    export = _export_stage()
    dims = None
    if args.min_size or args.max_size or args.max_batch:
        from sdrt.export.graphs import Dims

        c_lo, c_hi = (args.min_size, args.max_size)
        if not (c_lo and c_hi):
            raise SdrtError("give --min-size and --max-size together")
        dims = Dims(c_lo, c_hi, args.max_batch or 4)
    export.export_model(
        args.model,
        args.dir,
        precision=args.precision,
        force=args.force,
        allow_pickle=args.allow_pickle,
        config=args.config,
        seed=args.seed,
        dims=dims,
        torch_programs=args.torch_programs,
        vae=args.vae,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = _export_stage().verify_directory(args.dir)
    if args.json:
        print(json.dumps(report, indent=2))
    print(
        f"{args.dir}: OK ({report['files']} files match their SHA-256"
        + (f", {len(report['graphs'])} graphs match their source)" if report["graphs"] else ")")
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    _export_stage()
    from pathlib import Path

    from sdrt.export.build import BuildOptions, build_directory

    if args.workspace is not None and args.workspace <= 0:
        raise SdrtError(f"--workspace {args.workspace} must be a positive number of GiB")
    opts = BuildOptions(
        height=args.height,
        width=args.width,
        batch=args.batch,
        dynamic=args.dynamic,
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


def png_parameters(req, model: str, index: int) -> str:
    """The `parameters` text chunk in the format image tools already read (prompt, negative, key: value list)."""
    fields = [
        f"Steps: {req.steps}", f"Sampler: {req.sampler}", f"CFG scale: {req.guidance:g}", f"Seed: {req.seed}",
        f"Size: {req.width}x{req.height}", f"Model: {model}",
    ]  # fmt: skip
    if req.image is not None:
        fields.append(f"Denoising strength: {req.strength:g}")
    if req.batch > 1:
        fields += [f"Batch size: {req.batch}", f"Batch pos: {index}"]
    prompt = req.prompts[index // req.images_per_prompt]
    negative = req.negatives[index // req.images_per_prompt]
    return f"{prompt}\n" + (f"Negative prompt: {negative}\n" if negative else "") + ", ".join(fields)


def _out_paths(out: str | None, seed: int, count: int) -> list[str]:
    from pathlib import Path

    if out is None:
        return [f"sdrt-{seed}-{i}.png" for i in range(count)]
    path = Path(out)
    if count == 1:
        return [str(path)]
    return [str(path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")) for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from PIL import Image, PngImagePlugin

    from sdrt.runtime.pipeline import Pipeline

    if args.init_image is None and (args.strength is not None or args.mask is not None):
        raise SdrtError(f"{'--strength' if args.mask is None else '--mask'} needs --init-image")
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.dir, backend=args.backend, device=args.device, cuda_graph=not args.no_cuda_graph)
    load_ms = (time.perf_counter() - t0) * 1e3
    req = pipe.request(
        args.prompt, args.negative_prompt, args.steps, args.guidance, args.height, args.width, args.batch,
        args.seed, args.sampler, args.init_image, args.strength, args.mask,
    )  # fmt: skip
    t1 = time.perf_counter()
    pixels = pipe.generate(req, progress=not args.quiet)
    total_ms = (time.perf_counter() - t1) * 1e3
    source = pipe.manifest["source"]
    model = source.get("name") or source.get("path", "?")
    for i, path in enumerate(_out_paths(args.out, req.seed, req.batch)):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", png_parameters(req, str(model), i))
        Image.fromarray(pixels[i].numpy()).save(path, pnginfo=info)
        print(path)
    if args.verbose:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in pipe.timings.items())
        print(
            f"backend {pipe.backend.name} on {pipe.device}, cuda graph {'on' if pipe.cuda_graph else 'off'}: "
            f"load {load_ms:.0f} ms, request {total_ms:.1f} ms ({stages})",
            file=sys.stderr,
        )
    pipe.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from sdrt.benchmarks.bench import main as bench_main
    except ImportError as err:
        raise SdrtError(
            f"sdrt bench needs its extra dependencies ({err.name} is missing): pip install 'sdrt[bench]'"
        ) from None
    return bench_main(args)


def cmd_presets(args: argparse.Namespace) -> int:
    from sdrt.export.presets import PRESETS

    for p in PRESETS.values():
        lo, hi = p.sizes
        print(f"{p.name:10s} {p.family.name:5s} {lo}-{hi} px  {p.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrt", description="Stable Diffusion as verified ONNX graphs and fp16 TensorRT engines."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser(
        "export",
        help="checkpoint -> verified ONNX engine directory",
        description="Trace CLIP, U-Net and VAE of MODEL to ONNX in DIR, verify each graph with ONNX "
        "Runtime against PyTorch, and write manifest.json.",
    )
    e.add_argument(
        "model",
        metavar="MODEL",
        help="a preset (see `sdrt presets`), a diffusers folder, or one .safetensors checkpoint",
    )
    e.add_argument("dir", metavar="DIR", help="the engine directory to write")
    e.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp16",
        help="fp16 (default): real fp16 graphs for TensorRT; fp32: for verification and the CPU",
    )
    e.add_argument("--force", action="store_true", help="replace DIR if it exists")
    e.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load .ckpt/.pt/.bin pickle weights (they can run code: only for files you trust)",
    )
    e.add_argument(
        "--config",
        metavar="DIR",
        help="for a single-file checkpoint: a diffusers folder of the same "
        "architecture to take configs and tokenizer from (default: the Hugging Face cache)",
    )
    e.add_argument("--seed", type=int, help="for a preset: the seed of its random weights (default: the preset's)")
    e.add_argument("--min-size", type=int, help="smallest image side the graphs accept, px (a multiple of 8 and of "
                   "the VAE scale factor; default: half the model's native size)")  # fmt: skip
    e.add_argument("--max-size", type=int, help="largest image side the graphs accept, px (as --min-size; default: "
                   "twice the native size)")  # fmt: skip
    e.add_argument("--max-batch", type=int, help="most images per prompt the graphs accept (default 4)")
    e.add_argument(
        "--vae",
        metavar="DIR",
        help="a diffusers VAE folder to use instead of the model's own, exported in fp16 (an fp16-safe SDXL VAE; "
        "SDXL's own VAE stays float32 because it overflows in fp16)",
    )
    e.add_argument(
        "--torch-programs",
        action="store_true",
        help="also save each graph as a torch.export program (*.pt2) for the runtime's torch backend",
    )
    e.set_defaults(func=cmd_export)

    v = sub.add_parser(
        "verify",
        help="re-check an engine directory",
        description="Check every file of DIR against its SHA-256 in the manifest, run the ONNX "
        "checker, and re-run ONNX Runtime against the source modules when the source is available.",
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.set_defaults(func=cmd_verify)

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
    b.add_argument("--workspace", type=float, metavar="GIB", help="builder workspace limit (default: TensorRT's)")
    b.add_argument(
        "--timing-cache",
        metavar="PATH",
        help="TensorRT: tactic timing cache reused across builds (default: ~/.cache/sdrt/, one per version and GPU)",
    )
    b.add_argument("--force", action="store_true", help="rebuild plans even when their build key matches")
    b.add_argument("--json", action="store_true", help="print the full report as JSON")
    b.set_defaults(func=cmd_build)

    g = sub.add_parser(
        "generate",
        help="engine directory + prompt -> PNG images",
        description="Generate images from an engine directory: txt2img, img2img with --init-image, inpainting with "
        "--init-image and --mask (an inpainting checkpoint's 9-channel U-Net, or any checkpoint by blending the kept "
        "region back after every step, as diffusers does). The PNGs carry the generation parameters in their "
        "`parameters` text chunk.",
    )
    g.add_argument("dir", metavar="DIR", help="an engine directory from `sdrt export`")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--negative-prompt", metavar="TEXT",
                   help="what to steer away from (default: none; SDXL then uses zeros, as diffusers)")  # fmt: skip
    g.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off")
    g.add_argument("--sampler", help="ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm or pndm "
                   "(default: the checkpoint's own scheduler)")  # fmt: skip
    g.add_argument("--seed", type=int, help="seed of torch.Generator('cpu'), as in diffusers (default: random)")
    g.add_argument("--height", type=int, help="px (default: the model's native size, or the init image's)")
    g.add_argument("--width", type=int, help="px (default: the model's native size, or the init image's)")
    g.add_argument("--batch", type=int, default=1, help="images for the prompt (default 1)")
    g.add_argument("--init-image", metavar="PATH", help="img2img: start from this image")
    g.add_argument("--mask", metavar="PATH", help="inpainting: white repaints, black keeps (needs --init-image)")
    g.add_argument("--strength", type=float, help="img2img / inpainting: how much to change the image, in (0, 1] "
                   "(default 0.8 for img2img, 1 for inpainting)")  # fmt: skip
    g.add_argument("--backend", choices=("auto", "tensorrt", "tensorrt-rtx", "onnxruntime", "torch"), default="auto",
                   help="auto: on a GPU TensorRT plans where built (tensorrt or tensorrt-rtx, as built), else torch "
                   "programs where exported; else ONNX Runtime")  # fmt: skip
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where available")
    g.add_argument("--no-cuda-graph", action="store_true", help="run step by step instead of one captured graph")
    g.add_argument("--out", metavar="PATH", help="output PNG (with -N suffixes for several; default sdrt-SEED-N.png)")
    g.add_argument("--verbose", action="store_true", help="print per-stage timings")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    g.set_defaults(func=cmd_generate)

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
    bn.add_argument("--out-dir", default="benchmarks/results", help="where the files go (default benchmarks/results)")
    bn.set_defaults(func=cmd_bench)

    serve_cli.add_parser(sub)

    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=cmd_presets)
    return parser


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"sdrt: {record.levelname.lower()}: {record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("sdrt")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except SdrtError as err:
        print(f"sdrt: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
