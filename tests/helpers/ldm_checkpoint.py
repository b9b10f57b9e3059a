"""Write diffusers Stable Diffusion components as one LDM ("CompVis") single-file checkpoint.

Model sites distribute Stable Diffusion as a single ``.safetensors`` file in the layout of the original
training code: the U-Net under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the
text encoder(s) under ``cond_stage_model.`` (SD 1.x / 2.x) or ``conditioner.embedders.N.`` (SDXL).
Tests need such files to exercise ``from_single_file`` loading, but no real weights can be downloaded,
so this module builds them from (small, random) diffusers / transformers models.

The mapping is the inverse of the converters in ``diffusers.loaders.single_file_utils``
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``).  Every source tensor is mapped or an error is raised: nothing is
dropped silently.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."
SD_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

TEXT_ENCODER_LAYOUTS = ("auto", "clip", "open_clip")

# diffusers loads at most 23 OpenCLIP blocks from ``cond_stage_model.model.``: it ignores block 23
# (SD 2.x checkpoints hold 24 blocks, the last unused because SD 2 takes the penultimate layer).
_SD2_MAX_OPEN_CLIP_LAYERS = 23

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # class_embed_type "timestep"/"projection" and addition_embed_type "text_time" (SDXL) share label_emb.
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",  # num_class_embeds (nn.Embedding), e.g. the x4 upscaler
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_PARTS = "resnets|attentions|downsamplers|upsamplers"
_UNET_BLOCK = re.compile(rf"(down|up)_blocks\.(\d+)\.({_UNET_PARTS})\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")

_VAE_FIXED = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_PARTS = "resnets|downsamplers|upsamplers"
_VAE_BLOCK = re.compile(rf"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.({_VAE_PARTS})\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")

_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _split_param(rest: str) -> tuple[str, str]:
    """Split ``"a.b.weight"`` into ``("a.b", "weight")``."""
    module, _, param = rest.rpartition(".")
    return module, param


def _unet_resnet_key(rest: str) -> str:
    """Rename a diffusers ResnetBlock2D parameter (``norm1.weight``) to the LDM ResBlock name."""
    module, param = _split_param(rest)
    if module not in _UNET_RESNET:
        raise KeyError(f"unexpected U-Net resnet parameter {rest!r}")
    return f"{_UNET_RESNET[module]}.{param}"


def _unet_block_key(match: re.Match[str], layers_per_block: int, up_with_attention: set[int]) -> str:
    """LDM key of a down/up block parameter matched by ``_UNET_BLOCK``."""
    kind, block, part, index, rest = match.groups()
    block, index = int(block), int(index)
    if part.endswith("samplers") and (index != 0 or not rest.startswith("conv.")):
        raise KeyError(f"only plain-conv down/upsamplers have an LDM equivalent: {match.group(0)!r}")
    if kind == "down":
        last = 1 + block * (layers_per_block + 1) + layers_per_block
        slot = 1 + block * (layers_per_block + 1) + index
        if part == "downsamplers":
            return f"input_blocks.{last}.0.op.{rest.removeprefix('conv.')}"
        outer = "input_blocks"
    else:
        slot = block * (layers_per_block + 1) + index
        if part == "upsamplers":
            last = block * (layers_per_block + 1) + layers_per_block
            return f"output_blocks.{last}.{2 if block in up_with_attention else 1}.{rest}"
        outer = "output_blocks"
    if part == "resnets":
        return f"{outer}.{slot}.0.{_unet_resnet_key(rest)}"
    return f"{outer}.{slot}.1.{rest}"


def _unet_key(key: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    """Map one diffusers ``UNet2DConditionModel`` state-dict key to its LDM name (without prefix)."""
    module, param = _split_param(key)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    if match := _UNET_BLOCK.fullmatch(key):
        return _unet_block_key(match, layers_per_block, up_with_attention)
    if match := _UNET_MID.fullmatch(key):
        part, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if part == "resnets":
            return f"middle_block.{2 * index}.{_unet_resnet_key(rest)}"
        return f"middle_block.{2 * index + 1}.{rest}"
    raise KeyError(f"U-Net parameter {key!r} has no LDM equivalent")


def _check_unet(unet: Any) -> None:
    """Reject U-Net configurations whose LDM layout diffusers' converter cannot read back."""
    config = unet.config
    if not isinstance(config.layers_per_block, int):
        raise ValueError("per-block layers_per_block is not supported by the LDM layout")
    mid_attentions = getattr(unet.mid_block, "attentions", None)
    if unet.mid_block is not None and (mid_attentions is None or len(mid_attentions) != 1):
        raise ValueError("LDM middle_block must be resnet / attention / resnet")
    if config.class_embed_type not in (None, "timestep", "projection"):
        raise ValueError(f"class_embed_type {config.class_embed_type!r} is not supported")
    if config.addition_embed_type not in (None, "text_time"):
        raise ValueError(f"addition_embed_type {config.addition_embed_type!r} is not supported")


def unet_ldm_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """U-Net tensors under ``model.diffusion_model.`` (input/middle/output blocks, time/label embeddings)."""
    _check_unet(unet)
    layers = unet.config.layers_per_block
    up_with_attention = {i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)}
    state = unet.state_dict()
    return {UNET_PREFIX + _unet_key(key, layers, up_with_attention): value for key, value in state.items()}


_CONTROLNET_FIXED = {
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_cond_embedding.conv_out": "input_hint_block.14",
    "controlnet_mid_block": "middle_block_out.0",
}
_CONTROLNET_ZERO_CONV = re.compile(r"controlnet_down_blocks\.(\d+)")
_CONTROLNET_HINT = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)")


def controlnet_ldm_state_dict(cn: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel``'s tensors in the original layout under ``control_model.``: its U-Net half as
    the U-Net's input_blocks / middle_block / time_embed, ``zero_convs.N.0``, ``input_hint_block.K`` (a conv every
    second module: conv_in, the six blocks, conv_out at 14) and ``middle_block_out.0``."""
    _check_unet(cn)
    layers, out = cn.config.layers_per_block, {}
    for key, value in cn.state_dict().items():
        module, param = _split_param(key)
        if module in _CONTROLNET_FIXED:
            name = f"{_CONTROLNET_FIXED[module]}.{param}"
        elif match := _CONTROLNET_ZERO_CONV.fullmatch(module):
            name = f"zero_convs.{match.group(1)}.0.{param}"
        elif match := _CONTROLNET_HINT.fullmatch(module):
            name = f"input_hint_block.{2 * (int(match.group(1)) + 1)}.{param}"
        else:
            name = _unet_key(key, layers, set())
        out["control_model." + name] = value
    return out


def _vae_resnet_key(rest: str) -> str:
    """ResnetBlock2D names match LDM's except ``conv_shortcut`` -> ``nin_shortcut``."""
    module, param = _split_param(rest)
    if module not in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
        raise KeyError(f"unexpected VAE resnet parameter {rest!r}")
    return f"{module.replace('conv_shortcut', 'nin_shortcut')}.{param}"


def _vae_key(key: str, num_up_blocks: int) -> str:
    """Map one diffusers ``AutoencoderKL`` state-dict key to its LDM name (without prefix)."""
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    if match := _VAE_BLOCK.fullmatch(key):
        coder, _, block, part, index, rest = match.groups()
        if coder == "decoder":  # LDM numbers decoder levels from the lowest resolution up
            block = str(num_up_blocks - 1 - int(block))
            level = f"decoder.up.{block}"
        else:
            level = f"encoder.down.{block}"
        if part == "resnets":
            return f"{level}.block.{index}.{_vae_resnet_key(rest)}"
        if index == "0" and rest.startswith("conv."):
            return f"{level}.{part[:-2]}.{rest}"  # downsamplers.0.conv -> downsample.conv
    if match := _VAE_MID.fullmatch(key):
        coder, part, index, rest = match.groups()
        if part == "resnets":
            return f"{coder}.mid.block_{int(index) + 1}.{_vae_resnet_key(rest)}"
        module, param = _split_param(rest)
        if module in _VAE_ATTENTION and index == "0":
            return f"{coder}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
    coder, _, rest = key.partition(".")
    module, param = _split_param(rest)
    if coder in ("encoder", "decoder") and module in _VAE_FIXED:
        return f"{coder}.{_VAE_FIXED[module]}.{param}"
    raise KeyError(f"VAE parameter {key!r} has no LDM equivalent")


def vae_ldm_state_dict(vae: Any) -> dict[str, torch.Tensor]:
    """VAE tensors under ``first_stage_model.``; mid-block attention Linear weights become 1x1 convs."""
    num_up_blocks = len(vae.decoder.up_blocks)
    out = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = _vae_key(key, num_up_blocks)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + ldm_key] = tensor
    return out


def _hf_clip_state_dict(text_encoder: Any) -> dict[str, torch.Tensor]:
    """Text-encoder state dict with ``text_model.`` keys whatever the transformers version.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` prefix); single files and
    ``CLIPTextModelWithProjection`` keep it.  ``text_projection.weight`` stays at the top level.
    """
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):  # a buffer (persistent in old transformers), not a weight
            continue
        keep = key.startswith("text_model.") or key == "text_projection.weight"
        out[key if keep else "text_model." + key] = tensor
    return out


def clip_ldm_state_dict(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP layout as in SD 1.x / SDXL files: ``<prefix>text_model.*``."""
    return {prefix + key: tensor for key, tensor in _hf_clip_state_dict(text_encoder).items()}


def _open_clip_layer(sd: dict[str, torch.Tensor], index: int, prefix: str) -> dict[str, torch.Tensor]:
    """Pop layer ``index`` of an HF CLIP state dict and return it as an OpenCLIP resblock."""
    src, dst = f"text_model.encoder.layers.{index}.", f"{prefix}transformer.resblocks.{index}."
    out = {}
    for param in ("weight", "bias"):
        qkv = [sd.pop(f"{src}self_attn.{name}_proj.{param}") for name in ("q", "k", "v")]
        out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
        for hf_name, ldm_name in _OPEN_CLIP_LAYER.items():
            out[f"{dst}{ldm_name}.{param}"] = sd.pop(f"{src}{hf_name}.{param}")
    return out


def open_clip_ldm_state_dict(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP layout as in SD 2.x / SDXL files: ``<prefix>transformer.resblocks.N.*`` etc.

    q/k/v are concatenated into ``attn.in_proj_*``; ``text_projection`` is stored transposed
    (OpenCLIP computes ``x @ text_projection``); it is only written when the model has one.
    """
    sd = _hf_clip_state_dict(text_encoder)
    num_layers = text_encoder.config.num_hidden_layers
    if prefix == SD_OPEN_CLIP_PREFIX and num_layers > _SD2_MAX_OPEN_CLIP_LAYERS:
        raise ValueError(f"diffusers ignores OpenCLIP block {_SD2_MAX_OPEN_CLIP_LAYERS} under {prefix!r}")
    out = {
        f"{prefix}token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        f"{prefix}positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        f"{prefix}ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        f"{prefix}ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out[f"{prefix}text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    for index in range(num_layers):
        out.update(_open_clip_layer(sd, index, prefix))
    if sd:
        raise KeyError(f"text-encoder parameters with no OpenCLIP equivalent: {sorted(sd)}")
    return out


def resolve_text_encoder_layout(unet: Any, text_encoder: Any, layout: str = "auto") -> str:
    """``"clip"`` (SD 1.x, HF keys) or ``"open_clip"`` (SD 2.x) for a single-text-encoder model.

    ``"auto"`` picks OpenCLIP for SD 2-like models: linear transformer projections, a text encoder
    whose width is the cross-attention width, and plain GELU (SD 1.x's CLIP ViT-L uses quick_gelu).
    """
    if layout not in TEXT_ENCODER_LAYOUTS:
        raise ValueError(f"text_encoder_layout must be one of {TEXT_ENCODER_LAYOUTS}, got {layout!r}")
    if layout != "auto":
        return layout
    config = text_encoder.config
    sd2_like = (
        bool(unet.config.use_linear_projection)
        and unet.config.cross_attention_dim == config.hidden_size
        and config.hidden_act == "gelu"
    )
    return "open_clip" if sd2_like else "clip"


def _merge(into: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> None:
    """Add ``part`` to ``into``; two components mapping to one key is a bug, never an overwrite."""
    clash = into.keys() & part.keys()
    if clash:
        raise KeyError(f"duplicate LDM keys: {sorted(clash)[:5]}")
    into.update(part)


def _sdxl_text_encoders(text_encoder: Any, text_encoder_2: Any, layout: str) -> dict[str, torch.Tensor]:
    """SDXL: CLIP ViT-L in HF layout at embedder 0, OpenCLIP bigG at embedder 1."""
    if layout not in ("auto", "clip"):
        raise ValueError("SDXL keeps text_encoder in the HF CLIP layout: use text_encoder_layout auto/clip")
    if text_encoder.config.hidden_size == text_encoder_2.config.hidden_size:
        # diffusers tells the two encoders apart by the width of their position embeddings only.
        raise ValueError("diffusers cannot load SDXL files whose two text encoders have the same hidden_size")
    out = clip_ldm_state_dict(text_encoder, SDXL_CLIP_PREFIX)
    _merge(out, open_clip_ldm_state_dict(text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    return out


def ldm_state_dict(
    unet: Any,
    vae: Any,
    text_encoder: Any,
    text_encoder_2: Any = None,
    *,
    text_encoder_layout: str = "auto",
) -> dict[str, torch.Tensor]:
    """All components as one flat LDM-layout state dict (tensors are shared with the models).

    Args:
        unet: ``diffusers.UNet2DConditionModel``.
        vae: ``diffusers.AutoencoderKL``.
        text_encoder: ``transformers.CLIPTextModel`` (SD 1.x / 2.x, or SDXL's first encoder).
        text_encoder_2: ``transformers.CLIPTextModelWithProjection`` for SDXL, else ``None``.
        text_encoder_layout: ``"clip"`` (SD 1.x), ``"open_clip"`` (SD 2.x) or ``"auto"``
            (see ``resolve_text_encoder_layout``); SDXL accepts only ``"auto"`` / ``"clip"``.
    """
    out = unet_ldm_state_dict(unet)
    _merge(out, vae_ldm_state_dict(vae))
    if text_encoder_2 is not None:
        _merge(out, _sdxl_text_encoders(text_encoder, text_encoder_2, text_encoder_layout))
    elif resolve_text_encoder_layout(unet, text_encoder, text_encoder_layout) == "open_clip":
        _merge(out, open_clip_ldm_state_dict(text_encoder, SD_OPEN_CLIP_PREFIX))
    else:
        _merge(out, clip_ldm_state_dict(text_encoder, SD_CLIP_PREFIX))
    return out


def save_ldm_checkpoint(
    path: str | os.PathLike[str],
    unet: Any,
    vae: Any,
    text_encoder: Any,
    text_encoder_2: Any = None,
    *,
    text_encoder_layout: str = "auto",
) -> None:
    """Write ``ldm_state_dict(...)`` to ``path`` as one ``.safetensors`` file (dtypes kept)."""
    state = ldm_state_dict(unet, vae, text_encoder, text_encoder_2, text_encoder_layout=text_encoder_layout)
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})
