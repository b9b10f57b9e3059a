"""ControlNet graphs (`sdrt export --controlnet PATH[=NAME]`): each ControlNet as its own graph
``controlnet_NAME``, and the U-Net a second time with the residual inputs, ``unet_controlnet`` (DESIGN.md).

A residual's size is the U-Net's down path at that depth: every Downsample2D (3x3, stride 2, padding 1) gives
ceil(side / 2), so the k-th level is ceil(h / 2**k), written ``h/2**k`` in shapes (`concrete_shape` reads it).
The U-Net's graph takes such inputs with sizes torch.export derives from ``h`` and ``w`` (Dim.AUTO).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt.export import graphs as G
from sdrt.export.load import Components, SourceMissing
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import sha256_file
from sdrt.runtime.progress import Progress

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class LoadedControlNet:
    name: str
    model: Any  # diffusers ControlNetModel, fp32 eval
    source: dict[str, Any]


def parse_controlnet_arg(text: str) -> tuple[str, str]:
    """``PATH[=NAME]`` -> (path, name); the name defaults to the folder's name (a file's: without .safetensors)."""
    path, _, name = text.partition("=")
    name = name or (Path(path).stem if path.endswith(".safetensors") else Path(path.rstrip("/")).name)
    if not _NAME.match(name):
        raise SdrtError(f"--controlnet {text}: the name {name!r} must be letters, digits, '.', '_' or '-'")
    return path, name


def load_controlnet(path: str, name: str, unet_config: Any = None) -> LoadedControlNet:
    """A diffusers ControlNetModel folder with .safetensors weights, or a single .safetensors file in the original
    layout (``control_model.*`` or bare ``input_blocks``/``zero_convs``/``input_hint_block``) read with diffusers'
    own converter against a config derived from the model's U-Net (``unet_config``). Pickle is never loaded."""
    target = Path(path)
    if target.is_file():
        return _single_file(target, name, unet_config)
    config = target / "config.json"
    try:
        cls = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        cls = None
    if cls != "ControlNetModel":
        raise SdrtError(
            f"--controlnet {path}: not a diffusers ControlNet folder (config.json of ControlNetModel) "
            "nor a ControlNet .safetensors file"
        )
    weights = sorted(target.glob("*.safetensors"))
    if not weights:
        raise SdrtError(f"--controlnet {path} has no .safetensors weights; convert them, pickle files are not loaded")
    import diffusers

    model = diffusers.ControlNetModel.from_pretrained(target, local_files_only=True, use_safetensors=True)
    model.eval().float()
    files = {str(p.relative_to(target)): sha256_file(p) for p in [config, *weights]}
    return LoadedControlNet(name, model, {"path": str(target.resolve()), "files": files})


def _single_file(file: Path, name: str, unet_config: Any) -> LoadedControlNet:
    """An original-layout ControlNet checkpoint: its config is the model U-Net's, with the conditioning embedding's
    channels read from the file's shapes (``input_hint_block`` 0, 4, 8, 12: conv_in and each stride-2 conv) and its
    input channels from its first convolution's."""
    import inspect
    import tempfile

    import diffusers
    from safetensors import safe_open

    if file.suffix != ".safetensors":
        raise SdrtError(
            f"--controlnet {file}: only .safetensors ControlNet files are read "
            "(pickle files can run code); convert it first"
        )
    try:
        with safe_open(str(file), "pt") as f:
            keys = set(f.keys())
            prefix = "control_model." if any(k.startswith("control_model.") for k in keys) else ""
            hint = [f"{prefix}input_hint_block.{i}.weight" for i in (0, 4, 8, 12, 14)] + [
                f"{prefix}input_blocks.0.0.weight"
            ]
            shapes = [f.get_slice(k).get_shape() for k in hint if k in keys]
    except Exception as err:  # safetensors' own errors for a damaged header
        raise SdrtError(f"--controlnet {file}: cannot read it as safetensors: {str(err).splitlines()[0]}") from None
    if len(shapes) != len(hint):
        raise SdrtError(f"--controlnet {file}: not a ControlNet checkpoint (no {hint[0]} ... {hint[4]})")
    known = set(inspect.signature(diffusers.ControlNetModel.__init__).parameters)
    config = {k: v for k, v in dict(unet_config).items() if k in known}
    config.update(in_channels=shapes[5][1], conditioning_embedding_out_channels=[s[0] for s in shapes[:4]])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
        try:
            model = diffusers.ControlNetModel.from_single_file(str(file), config=tmp, local_files_only=True)
        except Exception as err:  # diffusers' converter raises KeyError, RuntimeError (shapes), ValueError ...
            raise SdrtError(
                f"--controlnet {file}: diffusers cannot read it as a ControlNet of this model: "
                f"{str(err).splitlines()[0]}"
            ) from None
    model.eval().float()
    return LoadedControlNet(name, model, {"path": str(file.resolve()), "files": {file.name: sha256_file(file)}})


def load_controlnets(args: list[tuple[str, str]], c: Components, dims: G.Dims, p: Progress) -> list:
    """Each ControlNet loaded and checked against the model before anything is written."""
    names = [name for _, name in args]
    if len(set(names)) != len(names):
        raise SdrtError(f"--controlnet names must differ: {', '.join(names)}")
    out = []
    for path, name in args:
        with p.step(f"load ControlNet {name} from {path}"):
            cn = load_controlnet(path, name, c.unet.config)
        check_fits(cn, c, dims.geometry.vae_scale_factor)
        out.append(cn)
    return out


def check_fits(cn: LoadedControlNet, c: Components, vae_scale_factor: int) -> None:
    """A ControlNet fits the model when its inputs and residuals are the U-Net's: name the first thing that differs."""
    a, u = cn.model.config, c.unet.config
    pairs = [
        ("cross-attention width", a.cross_attention_dim, u.cross_attention_dim),
        ("family (added conditioning)", a.addition_embed_type, u.addition_embed_type),
        ("latent channels", a.in_channels, c.vae.config.latent_channels),  # a 9-channel U-Net: still 4
        ("block channels", tuple(a.block_out_channels), tuple(u.block_out_channels)),
        ("down blocks", tuple(a.down_block_types), tuple(u.down_block_types)),
        ("layers per block", a.layers_per_block, u.layers_per_block),
    ]
    for what, theirs, ours in pairs:
        if theirs != ours:
            raise SdrtError(f"--controlnet {cn.name}: its {what} is {theirs}, the model's U-Net has {ours}")
    down = 2 ** (len(a.conditioning_embedding_out_channels) - 1)
    if down != vae_scale_factor:
        raise SdrtError(
            f"--controlnet {cn.name}: its control image is downsampled {down}x, the model's VAE {vae_scale_factor}x"
        )


def residual_shapes(cn: torch.nn.Module) -> tuple[list[tuple], tuple]:
    """Shapes (with symbols) of the down-block residuals and of the mid-block residual, from the module's blocks."""
    ch, level, levels = cn.config.block_out_channels, 1, [(cn.config.block_out_channels[0], 1)]
    for i, block in enumerate(cn.down_blocks):
        levels += [(ch[i], level)] * len(block.resnets)
        if getattr(block, "downsamplers", None) is not None:
            level *= 2
            levels.append((ch[i], level))
    if len(levels) != len(cn.controlnet_down_blocks):
        raise SdrtError(f"unsupported ControlNet: {len(cn.controlnet_down_blocks)} residuals, {len(levels)} expected")

    def shape(channels: int, f: int) -> tuple:
        return ("B", channels, "h" if f == 1 else f"h/{f}", "w" if f == 1 else f"w/{f}")

    return [shape(c, f) for c, f in levels], shape(ch[-1], level)


class ControlNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids], controlnet_cond, conditioning_scale)
    -> (down residuals..., mid residual), each scaled per row as diffusers' ``conditioning_scale`` scales them."""

    def __init__(self, model: torch.nn.Module, added: bool):
        super().__init__()
        self.model, self.added = model, added

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        text_embeds, time_ids, cond, scale = rest if self.added else (None, None, *rest)
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        down, mid = self.model(
            sample, timestep, encoder_hidden_states, cond, 1.0, added_cond_kwargs=added, return_dict=False
        )
        s = scale.view(-1, 1, 1, 1)  # [B] -> per row
        return (*[d * s for d in down], mid * s)


class UNetResiduals(torch.nn.Module):
    """The U-Net graph's module (`graphs.UNet`) with the ControlNet residuals added: diffusers'
    down_block_additional_residuals and mid_block_additional_residual, after the U-Net's own inputs."""

    def __init__(self, unet: G.UNet):
        super().__init__()
        # the diffusers U-Net under the same attribute as in `graphs.UNet`, so that its weights keep their names
        # (`sdrt lora add` maps an adapter onto both U-Net graphs by them)
        self.unet, self.skip, self.conds = unet.unet, unet.skip, unet.conds

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        n = len(self.conds)
        residuals = rest[n:]
        return G.call_unet(
            self,
            sample,
            timestep,
            encoder_hidden_states,
            rest[:n],
            down_block_additional_residuals=tuple(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
        )


def _names(down: list) -> tuple[str, ...]:
    return (*[f"down_residual_{i}" for i in range(len(down))], "mid_residual")


def controlnet_graphs(graphs: list[G.Graph], cns: list[LoadedControlNet]) -> list[G.Graph]:
    """``unet_controlnet`` (sharing the ``unet`` graph's module) and one ``controlnet_NAME`` per ControlNet."""
    if not cns:
        return []
    unet = next(g for g in graphs if g.name == "unet")
    f32, added = torch.float32, "text_embeds" in unet.inputs
    down, mid = residual_shapes(cns[0].model)
    res = {n: (s, f32) for n, s in zip(_names(down), [*down, mid], strict=True)}
    out = [
        G.Graph(
            "unet_controlnet",
            UNetResiduals(unet.module).eval(),
            {**unet.inputs, **res},
            unet.outputs,
            unet.output_shapes,
            keep_fp32_inputs=unet.keep_fp32_inputs,
            upcast_attention=unet.upcast_attention,
        )
    ]
    # sample, timestep, states(, text_embeds, time_ids): diffusers gives a ControlNet no guidance embedding
    base = {k: v for k, v in unet.inputs.items() if k != "timestep_cond"}
    sample = base["sample"][0]
    for cn in cns:
        cn_in = {**base, "controlnet_cond": (("B", 3, "H", "W"), f32), "conditioning_scale": (("B",), f32)}
        cn_in["sample"] = (("B", cn.model.config.in_channels, *sample[2:]), f32)
        module = ControlNet(cn.model, added).eval()
        out.append(
            G.Graph(
                f"controlnet_{cn.name}",
                module,
                cn_in,
                _names(down),
                (*down, mid),
                keep_fp32_inputs=(*unet.keep_fp32_inputs, "conditioning_scale"),
                upcast_attention=bool(getattr(cn.model.config, "upcast_attention", False)),
            )
        )
    return out


def manifest_entry(cns: list[LoadedControlNet]) -> dict[str, Any]:
    return {cn.name: {"graph": f"controlnet_{cn.name}", "source": cn.source} for cn in cns}


def controlnets_from_manifest(manifest: dict[str, Any], unet_config: Any) -> list[LoadedControlNet]:
    """The ControlNets an engine directory was exported with, loaded again from their folders or files, each file
    checked against its SHA-256 at export; SourceMissing where one is gone (`sdrt verify`)."""
    out = []
    for name, entry in manifest.get("controlnets", {}).items():
        folder = Path(entry["source"]["path"])
        if not folder.exists():
            raise SourceMissing(f"ControlNet {name}'s source {folder} is not available")
        cn = load_controlnet(str(folder), name, unet_config)
        if cn.source["files"] != entry["source"]["files"]:
            raise SdrtError(
                f"ControlNet {name}'s folder {folder} has changed since the export (SHA-256 differs); re-export it"
            )
        out.append(cn)
    return out


def add_controlnets(root: str | Path, controlnets: list[tuple[str, str]], progress=None) -> dict[str, Any]:
    """`sdrt controlnet add DIR CN[=NAME]...`: export (folder, name) ControlNets into the existing engine directory
    ``root`` at its own sizes, precision and torch-program choice, with ``unet_controlnet`` where it has none yet.
    The model is rebuilt from the manifest's source (its files must hash as at export). The new graphs are traced
    and verified in a staging directory and moved in only then; the manifest is rewritten last, so a failure leaves
    ``root`` as it was. Returns the new manifest."""
    from sdrt.export.directory import export_graph, stage_dir
    from sdrt.export.load import components_from_source
    from sdrt.runtime.manifest import hash_files, read_manifest, write_manifest

    root, p = Path(root), progress or Progress()
    manifest = read_manifest(root)
    have = manifest.get("controlnets", {})
    if taken := [name for _, name in controlnets if name in have]:
        raise SdrtError(f"{root} already has a ControlNet {taken[0]!r}; give this one another name with PATH=NAME")
    with p.step("load the source modules"):
        c = components_from_source(manifest["source"])
    dims = G.Dims.from_manifest(manifest)
    cns = load_controlnets(controlnets, c, dims, p)
    entry = manifest_entry(cns)
    graphs = [g for g in controlnet_graphs(G.graphs_for(c), cns) if g.name not in manifest["graphs"]]
    c = cns = None  # the graphs hold the only references: each is freed after its trace
    programs = any(e.get("torch_program") for e in manifest["graphs"].values())
    stage = stage_dir(root)
    try:
        entries = {}
        while graphs:
            g = graphs.pop(0)
            entries[g.name] = export_graph(g, stage, dims, manifest["precision"], p, programs)
            del g
        names = sorted(str(f.relative_to(stage)) for f in stage.rglob("*") if f.is_file())
        files = hash_files(stage, names)
        for name in names:
            os.replace(stage / name, root / name)
        manifest["graphs"].update(entries)
        manifest["controlnets"] = {**have, **entry}
        manifest["files"] = {**manifest["files"], **files}
        write_manifest(root, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    p.say(f"added to {root}: " + ", ".join(f"ControlNet {n} (graph controlnet_{n})" for n in entry))
    if manifest.get("loras"):
        p.say(
            f"LoRA adapters {', '.join(manifest['loras'])} change the plain U-Net only: to use one with ControlNet, "
            "add it again with `sdrt lora add DIR FILE --name NAME --force`"
        )
    return manifest
