"""`sdrt generate`: an engine directory and a prompt -> PNG files that carry their generation parameters."""

from __future__ import annotations

import argparse
import sys

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.hires import UPSCALERS
from sdrt.runtime.infotext import png_parameters, save_png
from sdrt.runtime.params import BACKENDS, DEFAULT_BACKEND, DEFAULT_GUIDANCE, DEFAULT_STEPS, SAMPLERS
from sdrt.runtime.prompts import EMPHASIS


def _out_paths(out: str | None, seed: int, count: int) -> list[str]:
    from pathlib import Path

    if out is None:
        return [f"sdrt-{seed}-{i}.png" for i in range(count)]
    path = Path(out)
    if count == 1:
        return [str(path)]
    return [str(path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")) for i in range(count)]


def _loras(args: list[str] | None) -> dict[str, float] | None:
    from sdrt.runtime.lora import parse_lora_arg

    out: dict[str, float] = {}
    for name, scale in map(parse_lora_arg, args or []):
        out[name] = out.get(name, 0.0) + scale  # the same adapter twice: its scales add up, as adapters do
    return out or None


def _each(values: list[float] | None, default: float) -> float | list[float]:
    """A repeatable --control-* flag: given once (or not at all), it applies to every ControlNet."""
    return default if not values else values[0] if len(values) == 1 else values


def _hires(args: argparse.Namespace):
    """The --hires-* flags as `Hires`, or None when none of the flags that turn it on is given."""
    from sdrt.runtime.params import Hires

    if args.hires_scale is None and not (args.hires_width or args.hires_height) and args.hires_upscaler is None:
        return None
    return Hires(
        scale=2.0 if args.hires_scale is None else args.hires_scale,
        width=args.hires_width,
        height=args.hires_height,
        upscaler=args.hires_upscaler or "Latent",
        steps=args.hires_steps,
        strength=args.hires_strength,
        sampler=args.hires_sampler,
        prompt=args.hires_prompt,
        negative_prompt=args.hires_negative_prompt,
        guidance=args.hires_guidance,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from sdrt.runtime.control import controlnet_args
    from sdrt.runtime.params import Params, load_options
    from sdrt.runtime.pipeline import Pipeline

    if args.init_image is None and (args.strength is not None or args.mask is not None):
        field = "strength" if args.mask is None else "mask"
        raise SdrtError(f"--{field} needs --init-image", field=field)
    params = Params(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        n=args.batch,
        seed=args.seed,
        sampler=args.sampler,
        image=args.init_image,
        strength=args.strength,
        mask=args.mask,
        loras=_loras(args.lora),
        clip_skip=args.clip_skip,
        eta=args.eta,
        guidance_rescale=args.guidance_rescale,
        aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score,
        prompt_syntax=args.prompt_syntax,
        emphasis=args.emphasis,
        hires=_hires(args),
        refiner_switch_at=args.refiner_switch_at,
        controlnets=controlnet_args(
            args.controlnet,
            args.control_image,
            _each(args.control_scale, 1.0),
            _each(args.control_start, 0.0),
            _each(args.control_end, 1.0),
        ),
    )
    t0 = time.perf_counter()
    with Pipeline.load(args.dir, **load_options(args)) as pipe:
        load_ms = (time.perf_counter() - t0) * 1e3
        req = pipe.request(params)
        t1 = time.perf_counter()
        (pixels,), timings = pipe.generate_batch([req], progress=not args.quiet)
        total_ms = (time.perf_counter() - t1) * 1e3
        for i, path in enumerate(_out_paths(args.out, req.seed, req.batch)):
            refiner = pipe.refiner.model.name if pipe.refiner else None
            text = png_parameters(req, pipe.model.name, i, pipe.backend.inference_precision, refiner)
            save_png(pixels[i].numpy(), path, text)
            print(path)
        if args.verbose:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
            print(
                f"backend {pipe.backend.name} on {pipe.device}, cuda graph {'on' if pipe.cuda_graph else 'off'}: "
                f"load {load_ms:.0f} ms, request {total_ms:.1f} ms ({stages})",
                file=sys.stderr,
            )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """generate on the `sdrt` command's subparsers."""
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
    _add_text_and_sampler(g)
    _add_image(g)
    _add_adapters(g)
    _add_hires(g)
    _add_running(g)
    g.set_defaults(func=cmd_generate)


def _add_text_and_sampler(g: argparse.ArgumentParser) -> None:
    """`sdrt generate`'s prompt, guidance, sampler and seed options."""
    g.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="what to steer away from (default: none; SDXL then uses zeros, as diffusers)",
    )
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    g.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g}); <= 1: none",
    )
    known = f"{', '.join(SAMPLERS[:-1])} or {SAMPLERS[-1]}"
    g.add_argument("--sampler", help=f"{known} (default: the checkpoint's own scheduler)")
    g.add_argument("--seed", type=int, help="seed of torch.Generator('cpu'), as in diffusers (default: random)")
    g.add_argument(
        "--prompt-syntax",
        choices=("plain", "webui"),
        default="plain",
        help="plain: the text as diffusers reads it (77 tokens, the rest cut); webui: the web UI's "
        "(word:1.3), [word], BREAK and prompts of any length in 75-token chunks",
    )
    g.add_argument(
        "--emphasis",
        choices=tuple(EMPHASIS),
        default="original",
        help="with --prompt-syntax webui, the web UI's emphasis mode (default original: weighted "
        "chunks keep their mean; no_norm: they do not; ignore: weights dropped; none: brackets are "
        "text)",
    )
    g.add_argument(
        "--clip-skip",
        type=int,
        default=0,
        metavar="N",
        help="condition on the text encoder's states N layers before the usual ones, as diffusers' "
        "clip_skip (the web UI's 'Clip skip' N+1; with --prompt-syntax webui the negative too)",
    )
    g.add_argument("--eta", type=float, help="DDIM's eta in [0, 1] (default 0: deterministic)")
    g.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        metavar="X",
        help="diffusers' guidance_rescale in [0, 1], for zero-SNR / v-prediction models (default 0)",
    )
    g.add_argument(
        "--aesthetic-score",
        type=float,
        default=6.0,
        metavar="X",
        help="SDXL refiner: the aesthetic score it conditions on (default 6, as diffusers)",
    )
    g.add_argument(
        "--negative-aesthetic-score",
        type=float,
        default=2.5,
        metavar="X",
        help="SDXL refiner: the negative side's aesthetic score (default 2.5, as diffusers)",
    )


def _add_image(g: argparse.ArgumentParser) -> None:
    """`sdrt generate`'s size, batch, and the init image and mask of img2img / inpainting."""
    g.add_argument("--height", type=int, help="px (default: the model's native size, or the init image's)")
    g.add_argument("--width", type=int, help="px (default: the model's native size, or the init image's)")
    g.add_argument("--batch", type=int, default=1, help="images for the prompt (default 1)")
    g.add_argument("--init-image", metavar="PATH", help="img2img: start from this image")
    g.add_argument("--mask", metavar="PATH", help="inpainting: white repaints, black keeps (needs --init-image)")
    g.add_argument(
        "--strength",
        type=float,
        help="img2img / inpainting: how much to change the image, in (0, 1] "
        "(default 0.8 for img2img, 1 for inpainting)",
    )


def _add_adapters(g: argparse.ArgumentParser) -> None:
    """`sdrt generate`'s LoRA adapters and ControlNets."""
    g.add_argument(
        "--lora",
        action="append",
        metavar="NAME[:SCALE]",
        help="apply an adapter added with `sdrt lora add` at SCALE (default 1); repeat to add several",
    )
    g.add_argument(
        "--controlnet",
        metavar="NAME",
        action="append",
        help="a ControlNet exported with `sdrt export --controlnet`; repeat (with one --control-image "
        "each) to add several",
    )
    g.add_argument(
        "--control-image",
        metavar="PATH",
        action="append",
        help="the ControlNet's control image, taken as given (an edge map, a depth map, ...); default size "
        "without --init-image: the first control image's",
    )
    for flag, default, what in (
        ("scale", 1, "conditioning scale"),
        ("start", 0, "fraction of steps where it starts"),
        ("end", 1, "fraction of steps where it ends"),
    ):
        g.add_argument(
            f"--control-{flag}",
            type=float,
            action="append",
            metavar="X",
            help=f"ControlNet {what} (default {default}); once for all, or once per --controlnet",
        )


def _add_hires(g: argparse.ArgumentParser) -> None:
    """`sdrt generate`'s the hires fix's second pass."""
    h = g.add_argument_group(
        "hires fix",
        "the web UI's hires fix on txt2img: the picture upscaled, then img2img at "
        "the larger size (given any of --hires-scale, --hires-width, --hires-height, "
        "--hires-upscaler)",
    )
    h.add_argument("--hires-scale", type=float, metavar="X", help="upscale by X (the web UI's hr_scale; default 2)")
    h.add_argument(
        "--hires-width",
        type=int,
        default=0,
        metavar="PX",
        help="upscale to this width instead (hr_resize_x; the height in proportion)",
    )
    h.add_argument(
        "--hires-height",
        type=int,
        default=0,
        metavar="PX",
        help="upscale to this height instead (hr_resize_y; the width in proportion)",
    )
    h.add_argument("--hires-upscaler", metavar="NAME", help=f"one of: {', '.join(UPSCALERS)} (default Latent)")
    h.add_argument(
        "--hires-steps",
        type=int,
        default=0,
        metavar="N",
        help="second-pass steps (default 0: --steps); it runs N x --hires-strength of them",
    )
    h.add_argument(
        "--hires-strength",
        type=float,
        default=0.7,
        metavar="X",
        help="second-pass denoising strength in (0, 1] (default 0.7)",
    )
    h.add_argument("--hires-sampler", help="second-pass sampler (default: --sampler)")
    h.add_argument("--hires-prompt", metavar="TEXT", help="second-pass prompt (default: PROMPT)")
    h.add_argument("--hires-negative-prompt", metavar="TEXT", help="second-pass negative (default: the first's)")
    h.add_argument("--hires-guidance", type=float, metavar="X", help="second-pass guidance (default: --guidance)")


def _add_running(g: argparse.ArgumentParser) -> None:
    """`sdrt generate`'s the refiner, the backend and device, the output."""
    g.add_argument(
        "--refiner",
        metavar="DIR",
        help="SDXL: a refiner's engine directory that takes over the base's latents at --refiner-switch-at",
    )
    g.add_argument(
        "--refiner-switch-at",
        type=float,
        metavar="X",
        help="with --refiner: the fraction of the schedule the base runs, in (0, 1) (diffusers' "
        "denoising_end; the refiner runs the rest)",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="auto: on a GPU TensorRT plans where built (tensorrt or tensorrt-rtx, as "
        "built), else torch programs where exported; on the CPU OpenVINO where installed; else ONNX "
        "Runtime",
    )
    g.add_argument(
        "--cpu-precision",
        choices=("bf16", "f32"),
        help="OpenVINO's inference precision (default: bf16 where the CPU has it, else f32)",
    )
    g.add_argument(
        "--cpu-int8",
        action="store_true",
        help="OpenVINO: run the INT8 U-Net `sdrt quantize DIR` made (the other graphs at --cpu-precision)",
    )
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where available")
    g.add_argument("--no-cuda-graph", action="store_true", help="run step by step instead of one captured graph")
    g.add_argument("--out", metavar="PATH", help="output PNG (with -N suffixes for several; default sdrt-SEED-N.png)")
    g.add_argument("--verbose", action="store_true", help="print per-stage timings")
    g.add_argument("--quiet", action="store_true", help="no progress line")
