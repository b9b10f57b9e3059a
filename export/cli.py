"""The export stage's commands: `sdrt export`, `verify`, `quantize`, `lora add|remove`, `embedding add|remove|list`,
`controlnet add`, `presets` (`sdrt build` is the TensorRT stage's, `sdrt.trt.cli`).

Only argparse at import: `sdrt --help` and `sdrt presets` work on a runtime-only install, and each command imports
what it needs when it runs (the export extra for export and verify, the openvino extra for quantize).
"""

from __future__ import annotations

import argparse
import json

from sdrt.runtime.errors import SdrtError, needs_extra
from sdrt.runtime.int8 import MODES

PRECISIONS = ("fp16", "fp32")


def cmd_export(args: argparse.Namespace) -> int:
    with needs_extra("sdrt export", "export"):
        from sdrt.export.directory import export_model
        from sdrt.export.graphs import Dims

    loras = None
    if args.lora:
        from sdrt.export.lora import parse_fuse_arg

        loras = [parse_fuse_arg(text) for text in args.lora]
    controlnets = None
    if args.controlnet:
        from sdrt.export.controlnet import parse_controlnet_arg

        controlnets = [parse_controlnet_arg(text) for text in args.controlnet]
    dims = None
    if args.min_size or args.max_size or args.max_batch:
        c_lo, c_hi = (args.min_size, args.max_size)
        if not (c_lo and c_hi):
            raise SdrtError("give --min-size and --max-size together")
        dims = Dims(c_lo, c_hi, args.max_batch or 4)
    export_model(
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
        loras=loras,
        controlnets=controlnets,
        max_prompt_chunks=args.max_prompt_chunks,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with needs_extra("sdrt verify", "export"):
        from sdrt.export.directory import verify_directory

    report = verify_directory(args.dir)
    if args.json:
        print(json.dumps(report, indent=2))
    print(
        f"{args.dir}: OK ({report['files']} files match their SHA-256"
        + (f", {len(report['graphs'])} graphs match their source)" if report["graphs"] else ")")
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from sdrt.export.quantize import QuantizeOptions, quantize_directory

    opts = QuantizeOptions(args.mode, args.prompts, args.steps, args.size, args.seed, args.force)
    entry = quantize_directory(args.dir, opts)
    how = f"{entry['samples']} U-Net calls at {entry['size']} px" if entry["samples"] else "no calibration"
    print(
        f"{args.dir}: wrote unet.int8.xml ({entry['mode']}, {how}; calibration {entry['calibration_s']:.0f} s, "
        f"quantization {entry['quantize_s']:.0f} s); use it with --backend openvino --cpu-int8"
    )
    return 0


def cmd_lora_add(args: argparse.Namespace) -> int:
    with needs_extra("sdrt lora add", "export"):
        from sdrt.export.lora import add_lora

    entry = add_lora(args.dir, args.file, name=args.name, force=args.force)
    counts = ", ".join(f"{n} {g} weights" for g, n in entry["weights"].items())
    print(f"{args.dir}: added LoRA {entry['name']} ({counts}); use it with --lora {entry['name']}[:SCALE]")
    return 0


def cmd_lora_remove(args: argparse.Namespace) -> int:
    from sdrt.export.lora import remove_lora

    remove_lora(args.dir, args.name)
    print(f"{args.dir}: removed LoRA {args.name}")
    return 0


def cmd_embedding_add(args: argparse.Namespace) -> int:
    from sdrt.runtime.embeddings import add_embedding

    entry = add_embedding(args.dir, args.file, name=args.name, force=args.force)
    print(
        f"{args.dir}: added embedding {entry['name']} ({entry['vectors']} vectors); "
        f"write {entry['name']} in a prompt to use it"
    )
    return 0


def cmd_embedding_remove(args: argparse.Namespace) -> int:
    from sdrt.runtime.embeddings import remove_embedding

    remove_embedding(args.dir, args.name)
    print(f"{args.dir}: removed embedding {args.name}")
    return 0


def cmd_embedding_list(args: argparse.Namespace) -> int:
    from sdrt.runtime.manifest import read_manifest

    for name, e in sorted(read_manifest(args.dir).get("embeddings", {}).items()):
        print(f"{name}\t{e['vectors']} vectors\tfrom {e['source']} (sha256 {e['source_sha256'][:12]})")
    return 0


def cmd_controlnet_add(args: argparse.Namespace) -> int:
    with needs_extra("sdrt controlnet add", "export"):
        from sdrt.export.controlnet import add_controlnets, parse_controlnet_arg

    add_controlnets(args.dir, [parse_controlnet_arg(text) for text in args.controlnet])
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from sdrt.export.presets import PRESETS

    for p in PRESETS.values():
        lo, hi = p.sizes
        print(f"{p.name:10s} {p.family.name:5s} {lo}-{hi} px  {p.description}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """export, verify, quantize, lora, embedding, controlnet and presets on the `sdrt` command's subparsers."""
    _add_export(sub)
    _add_verify(sub)
    _add_quantize(sub)
    lora = _actions(sub, "lora", "LoRA adapters of an engine directory")
    _add_lora_add(lora)
    _add_lora_remove(lora)
    embedding = _actions(sub, "embedding", "textual-inversion embeddings of an engine directory")
    _add_embedding_add(embedding)
    _add_embedding_remove(embedding)
    _add_embedding_list(embedding)
    _add_controlnet_add(_actions(sub, "controlnet", "ControlNets of an engine directory"))
    _add_presets(sub)


def _actions(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A command whose ACTION (add, remove, ...) is its own subcommand, e.g. `sdrt lora add`."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def _add_export(sub: argparse._SubParsersAction) -> None:
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
    _add_export_shapes(e)
    _add_export_extras(e)
    e.set_defaults(func=cmd_export)


def _add_export_shapes(e: argparse.ArgumentParser) -> None:
    """The shapes the exported graphs accept."""
    e.add_argument(
        "--min-size",
        type=int,
        help="smallest image side the graphs accept, px (a multiple of 8 and of the VAE scale factor; default: "
        "half the model's native size)",
    )
    e.add_argument(
        "--max-size",
        type=int,
        help="largest image side the graphs accept, px (as --min-size; default: twice the native size)",
    )
    e.add_argument("--max-batch", type=int, help="most images per prompt the graphs accept (default 4)")
    e.add_argument(
        "--max-prompt-chunks",
        type=int,
        metavar="K",
        help="longest prompt the U-Net takes, in 75-token chunks (web-UI syntax: long prompts, BREAK; default 3)",
    )


def _add_export_extras(e: argparse.ArgumentParser) -> None:
    """What else goes into the export: another VAE, torch programs, fused LoRAs, ControlNets."""
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
    e.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="fuse a LoRA .safetensors file into the exported weights at SCALE (default 1); repeatable, they add up. "
        "For one fixed combination at full speed; `sdrt lora add` keeps adapters switchable per request instead",
    )
    e.add_argument(
        "--controlnet",
        action="append",
        metavar="DIR[=NAME]",
        help="also export this diffusers ControlNet folder or original-layout .safetensors file as graph "
        "controlnet_NAME (default NAME: the folder's or file's name), and the U-Net again with residual inputs "
        "(unet_controlnet); repeatable",
    )


def _add_verify(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "verify",
        help="re-check an engine directory",
        description="Check every file of DIR against its SHA-256 in the manifest, run the ONNX "
        "checker, and re-run ONNX Runtime against the source modules when the source is available.",
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.set_defaults(func=cmd_verify)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "quantize",
        help="DIR's U-Net -> INT8 for OpenVINO on the CPU (--cpu-int8)",
        description="Quantize the U-Net of an fp32 engine directory to INT8 with NNCF for the OpenVINO backend, "
        "written beside it as unet.int8.xml/.bin and recorded in the manifest; `sdrt generate DIR ... --backend "
        "openvino --cpu-int8` runs it. hybrid (default): MatMul weights INT8, Convolutions INT8 in weights and "
        "activations, calibrated on the U-Net's inputs while sdrt's own pipeline runs --prompts built-in prompts "
        "(OpenVINO, f32). full: the MatMuls' activations INT8 too, calibrated the same way. weights: weight-only INT8, "
        "no calibration. Needs pip install 'sdrt[openvino]'.",
    )
    q.add_argument("dir", metavar="DIR")
    q.add_argument(
        "--mode",
        choices=MODES,
        default="hybrid",
        help="hybrid (default): INT8 MatMul weights and fully INT8 Convolutions, calibrated; full: every MatMul "
        "and Convolution INT8 in weights and activations, calibrated (fastest with VNNI or AMX); weights: "
        "weight-only INT8, data-free",
    )
    q.add_argument("--prompts", type=int, default=4, metavar="N", help="calibration requests (default 4)")
    q.add_argument("--steps", type=int, default=10, metavar="S", help="sampler steps of each (default 10)")
    q.add_argument(
        "--size", type=int, metavar="PX", help="calibration image side (default: the model's default size, at most 512)"
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the first calibration request (default 0)")
    q.add_argument("--force", action="store_true", help="replace the INT8 U-Net DIR already has")
    q.set_defaults(func=cmd_quantize)


def _add_lora_add(lora: argparse._SubParsersAction) -> None:
    la = lora.add_parser(
        "add",
        help="import a LoRA file into DIR",
        description="Map a LoRA .safetensors file (kohya / web-UI lora_unet_*, lora_te*_*, LoCon; diffusers / PEFT "
        "lora_A / lora_B) onto the weights of DIR's graphs and store it as low-rank factors beside them, for "
        "`sdrt generate --lora NAME[:SCALE]` and Params(loras={NAME: SCALE}).",
    )
    la.add_argument("dir", metavar="DIR")
    la.add_argument("file", metavar="FILE", help="a LoRA .safetensors file (pickle files are refused)")
    la.add_argument("--name", help="the adapter's name (default: the file's name without .safetensors)")
    la.add_argument("--force", action="store_true", help="replace an adapter of the same name")
    la.set_defaults(func=cmd_lora_add)


def _add_lora_remove(lora: argparse._SubParsersAction) -> None:
    lr = lora.add_parser(
        "remove",
        help="remove an adapter from DIR",
        description="Remove adapter NAME (its file and manifest entry) from DIR. TensorRT plans stay valid while "
        "other adapters remain; after the last one, `sdrt build DIR` rebuilds them without refittable weights.",
    )
    lr.add_argument("dir", metavar="DIR")
    lr.add_argument("name", metavar="NAME")
    lr.set_defaults(func=cmd_lora_remove)


def _add_embedding_add(embedding: argparse._SubParsersAction) -> None:
    ea = embedding.add_parser(
        "add",
        help="import a textual-inversion embedding into DIR",
        description="Store a textual-inversion embedding (.safetensors: diffusers' or the web UI's layout, emb_params, "
        "string_to_param, or SDXL's clip_l + clip_g) in DIR. Its name is its trigger: wherever a prompt spells it, "
        "its vectors replace those tokens, as in the web UI, on every backend, with no new export or build.",
    )
    ea.add_argument("dir", metavar="DIR")
    ea.add_argument("file", metavar="FILE", help="an embedding .safetensors file (pickle files are refused)")
    ea.add_argument("--name", help="the trigger word (default: the file's name without .safetensors, as the web UI)")
    ea.add_argument("--force", action="store_true", help="replace an embedding of the same name")
    ea.set_defaults(func=cmd_embedding_add)


def _add_embedding_remove(embedding: argparse._SubParsersAction) -> None:
    er = embedding.add_parser("remove", help="remove an embedding from DIR")
    er.add_argument("dir", metavar="DIR")
    er.add_argument("name", metavar="NAME")
    er.set_defaults(func=cmd_embedding_remove)


def _add_embedding_list(embedding: argparse._SubParsersAction) -> None:
    el = embedding.add_parser("list", help="list DIR's embeddings")
    el.add_argument("dir", metavar="DIR")
    el.set_defaults(func=cmd_embedding_list)


def _add_controlnet_add(controlnet: argparse._SubParsersAction) -> None:
    ca = controlnet.add_parser(
        "add",
        help="export ControlNets into DIR",
        description="Export diffusers ControlNet folders into the existing engine directory DIR at its sizes and "
        "precision, as `sdrt export --controlnet` would have (graph controlnet_NAME, and unet_controlnet if DIR has "
        "none yet). Needs the checkpoint DIR was exported from, unchanged. Run `sdrt build DIR` afterwards for "
        "TensorRT plans of the new graphs.",
    )
    ca.add_argument("dir", metavar="DIR")
    ca.add_argument(
        "controlnet",
        nargs="+",
        metavar="CN[=NAME]",
        help="a diffusers ControlNet folder or original-layout .safetensors file; NAME defaults to its name",
    )
    ca.set_defaults(func=cmd_controlnet_add)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=cmd_presets)
