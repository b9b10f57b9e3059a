"""`sdrt export` and `sdrt verify`: write an engine directory (DESIGN.md) and check one.

The directory is assembled in a hidden sibling and renamed into place only when every graph has passed its
check, so a failed or interrupted export never leaves something that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import onnx
import torch

from sdrt.export import graphs as G
from sdrt.export.fp16 import fp16_from_fp32, graph_precision, io_types
from sdrt.export.heap import map_large_buffers, trim_heap
from sdrt.export.load import Components, SourceMissing, check_model_arg, components_from_source, load_model
from sdrt.export.onnx_save import save_onnx
from sdrt.export.presets import get_preset
from sdrt.export.trace import OPSET, export_torch, save_torch_program
from sdrt.export.verify import check_graph_file, compare, reference_cases
from sdrt.export.weights import (
    add_dtypes,
    float_parameters,
    initializer_fingerprints,
    parameter_fingerprints,
    unreached_parameters,
    weight_map,
)
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import (
    FORMAT_VERSION,
    check_files,
    hash_files,
    read_manifest,
    write_manifest,
)
from sdrt.runtime.progress import Progress


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _default_dims(c: Components) -> G.Dims:
    """The preset's declared range, else the one the model's own native size gives (`Geometry.default_range`)."""
    lo, hi = get_preset(c.source["name"]).sizes if c.source["kind"] == "preset" else G.geometry(c).default_range()
    return G.Dims(lo, hi)


def export_graph(g: G.Graph, stage: Path, dims: G.Dims, precision: str, p: Progress, torch_program: bool) -> dict:
    """Reference outputs, trace, free the module, fp16, save, check: one graph, with peak memory kept low."""
    tmp = stage / "_trace"
    tmp.mkdir(exist_ok=True)
    src = tmp / f"{g.name}.onnx"
    graph_precision_name = precision if g.precision_fp16 else "fp32"
    with p.step(f"{g.name}: trace to ONNX"):
        cases = reference_cases(g, dims)
        prefix, named = float_parameters(g.module)
        with ThreadPoolExecutor(1) as pool:  # the weights are hashed on the other cores while torch.onnx traces
            hashing = pool.submit(parameter_fingerprints, named)
            export_torch(g, dims, src)
            params = hashing.result()
        del named
        inits = initializer_fingerprints(src)
        h, w = G.trace_latent(dims)
        example = G.sample_inputs(g, dims, G.TRACE_ROWS, h, w, torch.Generator().manual_seed(0)).values()
        unused = unreached_parameters(g.module, tuple(example), prefix, params, inits)
    if torch_program:
        with p.step(f"{g.name}: save torch program ({graph_precision_name})"):
            save_torch_program(g, dims, stage / f"{g.name}.pt2", fp16=graph_precision_name == "fp16")
    g.release()
    trim_heap()
    with p.step(f"{g.name}: save {graph_precision_name}"):
        weights = weight_map(prefix, params, inits, unused)
        del params, inits
        fp16 = graph_precision_name == "fp16"
        model = fp16_from_fp32(src, g) if fp16 else onnx.load(str(src), load_external_data=False)
        files = save_onnx(model, stage / f"{g.name}.onnx", weights_from=tmp)
        dtypes, io = graph_precision(model), io_types(model)
        weights = add_dtypes(weights, model)
        (stage / f"{g.name}.weights.json").write_text(json.dumps(weights, indent=1) + "\n")
        del model
        shutil.rmtree(tmp)
    with p.step(f"{g.name}: check (ONNX checker, ONNX Runtime vs PyTorch at {len(cases)} shapes)"):
        check_graph_file(stage / f"{g.name}.onnx", g)
        report = compare(stage / f"{g.name}.onnx", g, cases, graph_precision_name)
    errs = ", ".join(f"{k} {v:.2e}" for k, v in report["rel_l2"].items())
    p.say(f"{g.name}: relative L2 error {errs} (limit {report['tolerance']:.0e})")
    if not report["passed"]:
        raise SdrtError(
            f"{g.name} failed verification: relative L2 error {errs} exceeds {report['tolerance']:.0e} "
            f"for {graph_precision_name}; nothing was written"
        )
    return {
        "file": f"{g.name}.onnx",
        "files": files,
        "torch_program": f"{g.name}.pt2" if torch_program else None,
        "weights": f"{g.name}.weights.json",  # PyTorch parameter name -> initializer, layout (sdrt lora add)
        "precision": graph_precision_name,
        "initializer_elements": dtypes,
        "inputs": {n: {"shape": list(shape), "dtype": io[n]} for n, (shape, _) in g.inputs.items()},
        "outputs": {
            n: {"shape": list(shape), "dtype": io[n]} for n, shape in zip(g.outputs, g.output_shapes, strict=True)
        },
        "rows": list(dims.rows(g.name)),
        **({"clip_skips": g.clip_skips} if g.clip_skips else {}),  # text encoders: clip_skip takes 0..this - 1
        **({"vocab_size": g.vocab_size} if g.vocab_size else {}),  # text encoders: ids from here read `embeddings`
        "verify": report,
    }


def _tokenizer_entries(c: Components, stage: Path) -> dict[str, Any]:
    out = {}
    for name, tok in c.tokenizers.items():
        tok.save_pretrained(stage / name)
        out[name] = {
            "file": f"{name}/tokenizer.json",
            "max_length": int(tok.model_max_length),
            "pad_token_id": int(tok.pad_token_id),
            "bos_token_id": int(tok.bos_token_id),
            "eos_token_id": int(tok.eos_token_id),
        }
    return out


def _scheduler_entry(c: Components) -> dict[str, Any]:
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(c.scheduler.config).items()}
    return {"class": type(c.scheduler).__name__, "config": cfg, "betas": [float(b) for b in c.scheduler.betas]}


def _manifest(c: Components, dims: G.Dims, precision: str, tokenizers: dict) -> dict[str, Any]:
    vae = c.vae.config
    return {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": c.source,
        "family": c.family.name,
        "precision": precision,
        "opset": OPSET,
        "tools": _tool_versions(),
        "shapes": dims.as_json(),
        "latent": {
            "channels": vae.latent_channels,
            "scaling_factor": float(vae.scaling_factor),
            "vae_scale_factor": dims.geometry.vae_scale_factor,  # pixels per latent
            # AutoencoderTiny (TAESD): vae_encoder gives the latents themselves, no distribution to sample
            "vae_class": type(c.vae).__name__,
        },
        "unet": {
            "in_channels": c.unet.config.in_channels,
            "sample_size": dims.geometry.sample_size,  # latent side it was trained at: native px = factor x this
            "downsampling": dims.geometry.unet_downsampling,  # 2 ** down blocks that downsample
            "addition_embed_type": c.unet.config.addition_embed_type,
            "time_cond_proj_dim": c.unet.config.time_cond_proj_dim,  # a distilled U-Net's guidance embedding
        },
        # SDXL: an unset negative is zeros; the refiner's time ids end in an aesthetic score
        "pipeline": {"force_zeros_for_empty_prompt": c.zero_negatives, "requires_aesthetics_score": c.aesthetics},
        "scheduler": _scheduler_entry(c),
        "tokenizers": tokenizers,
        "graphs": {},
        "engines": {},
    }


def _note_sampler(manifest: dict[str, Any], p: Progress) -> None:
    """Say in one line, before the long work, when the checkpoint's scheduler has no sampler of its own: the
    directory is still made, and generates with an explicit sampler."""
    from sdrt.runtime.schedule import NoiseSchedule, ScheduleError, default_sampler

    try:
        default_sampler(NoiseSchedule.from_manifest(manifest["scheduler"]))
    except ScheduleError as err:
        p.say(f"note: {err}")


def stage_dir(dest: Path) -> Path:
    stage = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def _commit(stage: Path, dest: Path) -> None:
    """Put the finished directory in place; an existing one (--force) is replaced only now."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(stage, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load(model: str, p: Progress, *, loras: list[tuple[str, float]] | None, defer: bool, **how: Any):
    """The checkpoint loaded (``how``: `load_model`'s options) with ``loras`` fused into its weights. The U-Net and
    VAE load after the text encoders are exported and freed (``defer``), unless adapters or ControlNets, which
    are made from the whole model, need every weight at once."""
    with p.step(f"load {model}" + (" (text encoders; the U-Net and VAE when their graphs come)" if defer else "")):
        c = load_model(model, defer=defer, **how)
    if loras:
        from sdrt.export.lora import fuse_loras

        with p.step("fuse LoRA " + ", ".join(f"{Path(f).name}:{s:g}" for f, s in loras)):
            c = fuse_loras(c, loras)
    return c


def export_model(
    model: str,
    dest: str | os.PathLike,
    *,
    precision: str = "fp16",
    force: bool = False,
    allow_pickle: bool = False,
    config: str | None = None,
    seed: int | None = None,
    dims: G.Dims | None = None,
    progress: Progress | None = None,
    torch_programs: bool = False,
    vae: str | None = None,
    loras: list[tuple[str, float]] | None = None,
    controlnets: list[tuple[str, str]] | None = None,
    max_prompt_chunks: int | None = None,
) -> dict[str, Any]:
    """Export ``model`` (preset, diffusers folder or single file) to the engine directory ``dest``; ``vae``: a
    diffusers VAE folder to use instead of the model's own, exported in fp16 (for an fp16-safe SDXL VAE);
    ``loras``: (LoRA file, scale) pairs fused into the exported weights; ``controlnets``: (ControlNet folder, name)
    pairs, each exported as ``controlnet_NAME`` with the U-Net again as ``unet_controlnet`` (export/controlnet.py);
    ``max_prompt_chunks``: the U-Net takes prompts of up to this many 75-token chunks (default: ``dims``')."""
    if precision not in ("fp16", "fp32"):
        raise SdrtError(f"unknown precision {precision!r}; use fp16 or fp32")
    dest = Path(dest)
    if dest.exists() and not force:
        raise SdrtError(f"{dest} already exists; pass --force to replace it")
    check_model_arg(model)
    map_large_buffers()
    p = progress or Progress()
    defer = not (loras or controlnets)
    c = _load(model, p, loras=loras, defer=defer, allow_pickle=allow_pickle, config=config, seed=seed, vae=vae)
    dims = dims or _default_dims(c)
    if max_prompt_chunks is not None:
        dims = dataclasses.replace(dims, max_prompt_chunks=max_prompt_chunks)
    dims = dims.for_model(G.geometry(c))
    cns = []
    if controlnets:
        from sdrt.export.controlnet import load_controlnets

        cns = load_controlnets(controlnets, c, dims, p)
    stage = stage_dir(dest)
    try:
        manifest = _manifest(c, dims, precision, _tokenizer_entries(c, stage))
        _note_sampler(manifest, p)
        graphs = G.graphs_for(c)
        if cns:
            from sdrt.export.controlnet import controlnet_graphs, manifest_entry

            graphs += controlnet_graphs(graphs, cns)
            manifest["controlnets"] = manifest_entry(cns)
            cns = None
        deferred, c.deferred = c.deferred, None  # it holds the U-Net and VAE too: kept only until it has run
        c.unet = c.vae = c.text_encoders = None  # the graphs hold the only references: each is freed after its trace
        while graphs:
            g = graphs.pop(0)
            if deferred is not None and any(t.is_meta for t in g.module.parameters()):
                with p.step("load the U-Net and VAE"):
                    deferred()
                deferred = None
            manifest["graphs"][g.name] = export_graph(g, stage, dims, precision, p, torch_programs)
            del g
        names = [str(f.relative_to(stage)) for f in stage.rglob("*") if f.is_file()]
        manifest["files"] = hash_files(stage, names)
        write_manifest(stage, manifest)
        _commit(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    p.say(f"wrote {dest} ({precision}, {len(manifest['graphs'])} graphs, {dims.min_px}-{dims.max_px} px)")
    return manifest


def _source_components(source: dict[str, Any]) -> Components | str:
    """Rebuild the modules an engine directory came from, or say why that is not possible."""
    try:
        return components_from_source(source)
    except SourceMissing as err:
        return str(err)


def verify_directory(root: str | os.PathLike, *, progress: Progress | None = None) -> dict[str, Any]:
    """Check every file against its SHA-256, run the ONNX checker, and re-run parity against the source."""
    root, p = Path(root), progress or Progress()
    manifest = read_manifest(root)
    with p.step("check SHA-256 of every file"):
        problems = check_files(root, manifest)
    if problems:
        raise SdrtError(f"{root}: " + "; ".join(problems) + "; re-run `sdrt export ... --force`")
    with p.step("load the source modules"):
        c = _source_components(manifest["source"])
    dims = G.Dims.from_manifest(manifest)
    report: dict[str, Any] = {"files": len(manifest["files"]), "graphs": {}}
    graphs = G.graphs_for(c) if not isinstance(c, str) else []
    if graphs and manifest.get("controlnets"):
        from sdrt.export.controlnet import controlnet_graphs, controlnets_from_manifest

        try:
            with p.step("load the ControlNets"):
                graphs += controlnet_graphs(graphs, controlnets_from_manifest(manifest, c.unet.config))
        except SourceMissing as err:
            report["controlnets_skipped"] = f"parity of the ControlNet graphs not re-run: {err}"
            p.say(report["controlnets_skipped"])
    for g in graphs:
        entry = manifest["graphs"][g.name]
        with p.step(f"{g.name}: check"):
            check_graph_file(root / entry["file"], g)
            r = compare(root / entry["file"], g, reference_cases(g, dims), entry["precision"])
        report["graphs"][g.name] = r
        p.say(f"{g.name}: relative L2 error " + ", ".join(f"{k} {v:.2e}" for k, v in r["rel_l2"].items()))
        if not r["passed"]:
            raise SdrtError(f"{root / entry['file']} no longer matches its source within {r['tolerance']:.0e}")
    if isinstance(c, str):
        for entry in manifest["graphs"].values():
            try:
                onnx.checker.check_model(str(root / entry["file"]))
            except onnx.checker.ValidationError as err:
                raise SdrtError(f"{entry['file']} fails the ONNX checker: {str(err).splitlines()[0]}") from None
        report["skipped"] = f"ONNX checker passed; parity not re-run: {c}"
        p.say(report["skipped"])
    return report
