"""`sdrt lora add DIR FILE`: a LoRA file -> low-rank factors keyed by the engine directory's own weight names.

diffusers' own converters read the file (kohya / web-UI `lora_unet_*`, `lora_te*_*` with `lora_down` / `lora_up` /
`alpha`, LoCon convolutions, diffusers' and PEFT's `lora_A` / `lora_B`) into PEFT keys per component; each module's
factors are then mapped through the graph's weights file (export/weights.py) onto its ONNX initializer and written
as ``loras/NAME.safetensors``: ``GRAPH/INITIALIZER.down`` [r, in(, k, k)] and ``.up`` [out, r(, 1, 1)] in PyTorch
layout, float32, and ``.scale`` (alpha / rank, 1 without alpha). The base value of every initializer an adapter
touches goes to ``loras/base.safetensors`` (the runtime recomputes W0 + sum of scale_i * up_i @ down_i from it
without reading ONNX). Everything is checked before anything is written: a bad file changes nothing.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from sdrt.runtime.embeddings import is_embedding
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.lora import BASE_FILE, LORA_DIR, NAME_RE, graph_weights
from sdrt.runtime.manifest import read_manifest, replaced_atomically, sha256_file, write_manifest

_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
TWINS = {"unet": ("unet_controlnet",)}  # graphs holding the same module's weights: an adapter changes both alike


def _read(file: Path, family: str, unet_config: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """diffusers' reading of the file: {component.module.lora_A/B.weight: tensor}, {component.module: alpha}.
    ``unet_config`` (its ``layers_per_block``) lets diffusers renumber the original U-Net's blocks (`input_blocks.I.J`,
    as kohya's SDXL files name them) to the diffusers U-Net's, as its own load_lora_weights does."""
    import diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if file.suffix != ".safetensors":
        raise SdrtError(f"{file}: only .safetensors LoRA files are read (pickle files can run code); convert it first")
    if is_embedding(file):
        raise SdrtError(
            f"{file} is a textual-inversion embedding, not a LoRA: add it with `sdrt embedding add DIR "
            f"{file}` and write its name in the prompt"
        )
    try:
        state, alphas = getattr(diffusers, _PIPELINES[family]).lora_state_dict(str(file), unet_config=unet_config)
    except Exception as err:  # diffusers raises ValueError, KeyError, safetensors errors ... for what it cannot read
        raise SdrtError(f"{file}: diffusers cannot read it as a LoRA: {str(err).splitlines()[0]}") from None
    out: dict[str, torch.Tensor] = {}
    alpha_out: dict[str, float] = {}
    for component in sorted({k.split(".", 1)[0] for k in state}):
        part = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(component + ".")}
        # alphas ride through the same key conversion as a fake `down` weight of their module
        fake = {}
        for k, a in (alphas or {}).items():
            if k.startswith(component + "."):
                base = k.split(".", 1)[1].removesuffix(".alpha")
                fake[base if base.endswith("down.weight") else base + ".lora.down.weight"] = torch.tensor(float(a))
        convert = convert_unet_state_dict_to_peft if component == "unet" else _text_encoder_to_peft
        try:
            converted, converted_alphas = convert(part), (convert(fake) if fake else {})
        except ValueError as err:
            raise SdrtError(f"{file}: diffusers cannot convert its {component} keys: {err}") from None
        out.update({f"{component}.{k}": v for k, v in converted.items()})
        for k, a in converted_alphas.items():
            alpha_out[f"{component}.{k.removesuffix('.lora_A.weight')}"] = float(a)
    return out, alpha_out


def _text_encoder_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' text-encoder key conversion, one key at a time: its own guess of a whole dict's format needs an
    `out_proj` key among them, which an adapter of a few layers may not have."""
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, StateDictType, convert_state_dict_to_peft

    out = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            out[k] = v
            continue
        old = any(pattern in k for pattern in DIFFUSERS_OLD_TO_PEFT)
        kind = StateDictType.DIFFUSERS_OLD if old else StateDictType.DIFFUSERS
        out.update(convert_state_dict_to_peft({k: v}, original_type=kind))
    return out


def _factors(
    state: dict[str, torch.Tensor], alphas: dict[str, float], maps: dict[str, dict], file: Path
) -> dict[str, torch.Tensor]:
    """{GRAPH/INITIALIZER.down|up|scale}: every key checked against the graphs' weights, in key order."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        if not key.endswith(_PEFT_SUFFIXES):
            raise SdrtError(f"{file}: {key} is not a plain LoRA factor (DoRA, LoHa, LoKr, biases are not supported)")
        if key.endswith(".lora_B.weight"):
            continue
        graph, module = key.removesuffix(".lora_A.weight").split(".", 1)
        if graph not in maps:
            raise SdrtError(
                f"{file}: {key} is for a {graph} graph this engine does not have: an adapter for another model family?"
            )
        up = state.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            raise SdrtError(f"{file}: {key} has no lora_B / lora_up partner")
        down, up, alpha = state[key].float().contiguous(), up.float().contiguous(), alphas.get(f"{graph}.{module}")
        for g in (graph, *[t for t in TWINS.get(graph, ()) if t in maps]):  # the U-Net taking ControlNet residuals
            entry = _target(maps[g], module, key, g, file)
            if entry is None:  # the graph never reads it (SDXL's first text encoder's last layer): nothing to change
                continue
            shape = list(reversed(entry["shape"])) if entry["transposed"] else entry["shape"]
            rank = down.shape[0]
            if up.shape[1] != rank or [up.shape[0], *down.shape[1:]] != shape or up[0, 0].numel() != 1:
                raise SdrtError(
                    f"{file}: {key} gives a {[up.shape[0], *down.shape[1:]]} update for {module}, which is "
                    f"{shape} in this engine; an adapter for another model?"
                )
            name = f"{g}/{entry['initializer']}"
            out[name + ".down"], out[name + ".up"] = (down, up) if g == graph else (down.clone(), up.clone())
            out[name + ".scale"] = torch.tensor(1.0 if alpha is None else alpha / rank, dtype=torch.float32)
    if not out:
        raise SdrtError(f"{file}: no LoRA weights found in it")
    return out


def _unet_config(maps: dict[str, dict]) -> SimpleNamespace | None:
    """The one setting of the U-Net's config diffusers' block renumbering reads, ``layers_per_block``, counted
    from the resnets of the U-Net graph's first down block."""
    names = set(maps.get("unet", {}).get("weights", ())) | set(maps.get("unet", {}).get("unused", ()))
    layers = {m.group(1) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))}
    return SimpleNamespace(layers_per_block=len(layers)) if layers else None


def _base_values(root: Path, manifest: dict[str, Any], wanted: set[str]) -> dict[str, np.ndarray]:
    """The exported values of ``wanted`` (GRAPH/INITIALIZER), exactly as the graphs hold them."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from sdrt.export.weights import ExternalData

    out = {}
    for graph in sorted({w.split("/", 1)[0] for w in wanted}):
        path = root / manifest["graphs"][graph]["file"]
        with ExternalData(path.parent) as external:
            for t in onnx.load(str(path), load_external_data=False).graph.initializer:
                if f"{graph}/{t.name}" in wanted:
                    value = external.array(t) if uses_external_data(t) else numpy_helper.to_array(t)
                    out[f"{graph}/{t.name}"] = np.ascontiguousarray(value)
    return out


def _target(graph_map: dict[str, Any], module: str, key: str, graph: str, file: Path) -> dict[str, Any] | None:
    """The weights-file entry ``module``'s weight has in ``graph``; None where the graph never reads it."""
    weights, unused = graph_map["weights"], set(graph_map.get("unused", ()))
    fqn = module + ".weight"
    if fqn not in weights and fqn not in unused and fqn.startswith("text_model."):  # flattened CLIPTextModel
        fqn = fqn.removeprefix("text_model.")
    if fqn in unused:
        return None
    entry = weights.get(fqn)
    if entry is None:
        raise SdrtError(f"{file}: {key} matches no weight of {graph}; an adapter for another model?")
    if entry.get("shared"):
        raise SdrtError(
            f"{file}: {key} targets {fqn}, whose values the exported {graph} shares with another "
            "weight; it cannot be changed alone"
        )
    return entry


def add_lora(root: str | os.PathLike, file: str | os.PathLike, name: str | None = None, force: bool = False) -> dict:
    """Import ``file`` into the engine directory ``root`` as adapter ``name`` (default: the file's stem)."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    root, file = Path(root), Path(file)
    manifest = read_manifest(root)
    name = name or file.stem
    if not re.fullmatch(NAME_RE, name) or name == Path(BASE_FILE).stem:
        raise SdrtError(f"adapter name {name!r}: use letters, digits, '_', '-' and '.' (not 'base'); pass --name")
    if name in manifest.get("loras", {}) and not force:
        raise SdrtError(f"{root} already has an adapter {name!r}; pass --force to replace it, or --name")
    if not file.is_file():
        raise SdrtError(f"{file}: no such file")
    if not all(g.get("weights") for g in manifest["graphs"].values()):
        raise SdrtError(
            f"{root} was exported without a weights map; re-export it with this sdrt "
            f"(`sdrt export ... {root} --force`) to add LoRA adapters"
        )
    maps = {g: graph_weights(root, manifest, g) for g in manifest["graphs"]}
    factors = _factors(*_read(file, manifest["family"], _unet_config(maps)), maps, file)
    (root / LORA_DIR).mkdir(exist_ok=True)
    base_path = root / BASE_FILE
    base = load_np(str(base_path)) if base_path.is_file() else {}
    wanted = {k.rsplit(".", 1)[0] for k in factors} - set(base)
    if wanted:
        base.update(_base_values(root, manifest, wanted))
        with replaced_atomically(base_path) as tmp:
            save_np(base, str(tmp))
    rel = f"{LORA_DIR}/{name}.safetensors"
    save_file(factors, str(root / rel), metadata={"format": "sdrt-lora-1", "source": file.name})
    graphs: dict[str, int] = {}
    for k in factors:
        if k.endswith(".down"):
            graphs[k.split("/", 1)[0]] = graphs.get(k.split("/", 1)[0], 0) + 1
    manifest.setdefault("loras", {})[name] = {
        "file": rel,
        "source": file.name,
        "source_sha256": sha256_file(file),
        "weights": graphs,  # graph -> how many of its weights the adapter changes
    }
    manifest["files"][rel] = sha256_file(root / rel)
    manifest["files"][BASE_FILE] = sha256_file(base_path)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_manifest(root, manifest)
    return {"name": name, **manifest["loras"][name]}


def remove_lora(root: str | os.PathLike, name: str) -> dict:
    """`sdrt lora remove DIR NAME`: the adapter's file and manifest entry go. ``loras/base.safetensors`` keeps the
    exported values other adapters may still need (a value no adapter touches is harmless there: its weight stays
    refittable in plans built since); with the last adapter it goes too, and the next `sdrt build` rebuilds plans
    without refittable weights. The manifest is written first: a crash after it leaves an unlisted file, never a
    listed one missing."""
    root = Path(root)
    manifest = read_manifest(root)
    loras = manifest.get("loras", {})
    if name not in loras:
        raise SdrtError(f"{root} has no LoRA adapter {name!r} (it has: {', '.join(sorted(loras)) or 'none'})")
    entry = loras.pop(name)
    manifest["files"].pop(entry["file"], None)
    if not loras:
        manifest["files"].pop(BASE_FILE, None)
    write_manifest(root, manifest)
    for rel in [entry["file"]] + ([] if loras else [BASE_FILE]):
        (root / rel).unlink(missing_ok=True)
    return entry


def parse_fuse_arg(text: str) -> tuple[str, float]:
    """`--lora FILE[:SCALE]` of `sdrt export` -> (file, scale), checked before anything slow starts; the scale
    defaults to 1."""
    file, sep, scale = text.rpartition(":")
    try:
        value = float(scale) if sep and file else None
    except ValueError:
        value = None  # a ':' in the file's name, no scale
    if value is None:
        file, value = text, 1.0
    if not math.isfinite(value):
        raise SdrtError(f"--lora {text}: the scale must be a finite number")
    if not Path(file).is_file():
        raise SdrtError(f"--lora {file}: no such file")
    if Path(file).suffix == ".safetensors" and is_embedding(Path(file)):
        raise SdrtError(
            f"--lora {file} is a textual-inversion embedding, not a LoRA: export without it, then "
            f"`sdrt embedding add DIR {file}` and write its name in the prompt"
        )
    return file, value


def _check_fits(state: dict[str, torch.Tensor], pipe: Any, file: Path) -> None:
    """Every factor of ``state`` (diffusers' PEFT keys) lands on a Linear / Conv2d of the pipeline's modules with
    the shapes of its weight; else one line naming the first key that does not fit."""
    for key in sorted(state):
        if not key.endswith(_PEFT_SUFFIXES):
            raise SdrtError(f"{file}: {key} is not a plain LoRA factor (DoRA, LoHa, LoKr, biases are not supported)")
        component, module = key.rsplit(".lora_", 1)[0].split(".", 1)
        model = getattr(pipe, component, None)
        if model is None:
            raise SdrtError(
                f"{file}: {key} is for a {component} this model does not have: an adapter for another model family?"
            )
        target = None
        for path in dict.fromkeys((module, module.removeprefix("text_model."))):  # flattened CLIPTextModel too
            try:
                target = model.get_submodule(path)
                break
            except AttributeError:
                continue
        weight = getattr(target, "weight", None)
        if weight is None or weight.ndim not in (2, 4):
            raise SdrtError(
                f"{file}: {key} matches no Linear or Conv2d of the {component}; an adapter for another model?"
            )
        factor = state[key]
        fits = factor.shape[1:] == weight.shape[1:] if ".lora_A." in key else factor.shape[0] == weight.shape[0]
        if not fits:
            raise SdrtError(
                f"{file}: {key} has shape {list(factor.shape)}, which does not fit {module}.weight "
                f"{list(weight.shape)}; an adapter for another model?"
            )


def fuse_loras(c: Any, loras: list[tuple[str, float]]) -> Any:
    """Bake adapters into the modules of ``c`` (export/load.py's Components) at their scales, for `sdrt export
    --lora FILE:SCALE`: diffusers loads each file, weights it (`set_adapters`), fuses it into the base weights
    (`fuse_lora`) and removes its layers, so the exported graphs hold W0 + sum of scale_i * dW_i under the model's own
    weight names and run at full speed. Every file is checked against the modules before any is loaded; the source
    records each file's SHA-256 and scale, so `sdrt verify` fuses the same again."""
    pipe = c.to_diffusers()
    files = []
    for text, scale in loras:  # files checked to exist by the callers (parse_fuse_arg, components_from_source)
        file = Path(text)
        _check_fits(_read(file, c.family.name, c.unet.config)[0], pipe, file)
        files.append((file, scale))
    names = [f"fused_{i}" for i in range(len(files))]
    for name, (file, _) in zip(names, files, strict=True):
        pipe.load_lora_weights(str(file), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in files])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    records = [{"path": str(f.resolve()), "sha256": sha256_file(f), "scale": s} for f, s in files]
    c.source = {**c.source, "loras": records}
    return c
