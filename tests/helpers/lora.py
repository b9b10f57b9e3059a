"""LoRA adapter files in the two formats users meet, written from a pipeline's own modules with seeded random
factors: kohya / web-UI (`lora_unet_*`, `lora_te_*`, `lora_down` / `lora_up` / `alpha`, with LoCon convolutions)
and diffusers / PEFT (`lora_A` / `lora_B`, no alpha); diffusers' own load_lora_weights as the reference; and the sd1
engine with two adapters that the runtime's and the server's LoRA tests share."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from tests.helpers.reference import SCHEDULERS

KW = dict(prompt="a watercolor fox in the snow", negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0,
          height=64, width=64, seed=21, sampler="euler")  # fmt: skip
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module: torch.nn.Module, suffixes: tuple[str, ...]):
    for name, m in module.named_modules():
        if name.endswith(suffixes) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name, m


def _factors(m: torch.nn.Module, rank: int, gen: torch.Generator, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = m.weight
    down = torch.randn((rank, *w.shape[1:]), generator=gen) * size
    up = torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=gen) * size
    return down, up


def kohya_parts(pipe, unet: bool = True, text: bool = True) -> list:
    """(key prefix, module, target suffixes) of a kohya file: SD 1.x / 2.x's `lora_unet_` and `lora_te_`, or
    SDXL's `lora_te1_` / `lora_te2_` for its two text encoders. kohya names text-encoder layers from `text_model.`
    on, which transformers' flattened CLIPTextModel no longer has (CLIPTextModelWithProjection still has it)."""
    second = getattr(pipe, "text_encoder_2", None)
    te = [("lora_te1_", pipe.text_encoder), ("lora_te2_", second)] if second else [("lora_te_", pipe.text_encoder)]
    return [("lora_unet_", pipe.unet, UNET_TARGETS)] * unet + [(p, m, TE_TARGETS) for p, m in te] * text


def kohya_key(prefix: str, name: str) -> str:
    if prefix.startswith("lora_te"):
        name = "text_model." + name.removeprefix("text_model.")
    return prefix + name.replace(".", "_")


def kohya_lora(path, pipe, seed: int, rank: int = 4, alpha: float = 2.0, size: float = 0.3, parts=None, key=kohya_key):
    """A kohya / web-UI file: every attention projection, feed-forward out, LoCon resnet convs; alpha != rank.
    ``parts``: `kohya_parts` (default: U-Net and text encoder); ``key(prefix, module name)``: the file's key."""
    from safetensors.torch import save_file

    gen, sd = torch.Generator().manual_seed(seed), {}
    for prefix, module, suffixes in kohya_parts(pipe) if parts is None else parts:
        for name, m in _targets(module, suffixes):
            k = key(prefix, name)
            sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = _factors(m, rank, gen, size)
            sd[k + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def peft_lora(path, pipe, seed: int, rank: int = 2, size: float = 0.2):
    """A diffusers / PEFT file: lora_A / lora_B under unet. and text_encoder(_2).text_model., no alpha (scale 1)."""
    from safetensors.torch import save_file

    gen, sd = torch.Generator().manual_seed(seed), {}
    parts = [("unet.", pipe.unet, ("to_q", "to_v", "to_out.0"))]
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            parts.append((f"{component}.text_model.", getattr(pipe, component), ("q_proj", "v_proj", "fc2")))
    for prefix, module, suffixes in parts:
        for name, m in _targets(module, suffixes):
            name = name.removeprefix("text_model.")
            sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = _factors(m, rank, gen, size)
    save_file(sd, str(path))
    return path


def reference(folder, adapters: dict, kw: dict = KW, pipeline: str = "StableDiffusionPipeline") -> np.ndarray:
    """diffusers' ``pipeline`` (a class name) with the LoRA files: one fused at its scale (fuse_lora), or several
    as weighted PEFT adapters."""
    import diffusers

    load = {} if "XL" in pipeline else dict(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, pipeline).from_pretrained(folder, local_files_only=True, **load)
    kw = dict(kw)
    name, extra = SCHEDULERS[kw.pop("sampler")]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(adapters))]
    for n, file in zip(names, adapters, strict=True):
        pipe.load_lora_weights(str(file), adapter_name=n)
    if len(adapters) == 1:
        pipe.fuse_lora(lora_scale=next(iter(adapters.values())))
        pipe.unload_lora_weights()  # the fused weights stay; the (now zero-scaled) PEFT layers go
    elif adapters:
        pipe.set_adapters(names, list(adapters.values()))
    seed = kw.pop("seed")
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return np.stack([np.asarray(im) for im in out.images])


FUSE_ARGS = ["--precision", "fp32", "--min-size", "64", "--max-size", "64", "--max-batch", "1"]


def sd1_adapters(folder: Path, root: Path) -> dict[str, Path]:
    """{"kohya": a kohya file (seed 1), "peft": a PEFT file (seed 2)} for the sd1 folder ``folder``, under ``root``."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    return {"kohya": kohya_lora(root / "kohya.safetensors", pipe, 1), "peft": peft_lora(root / "peft.safetensors",
            pipe, 2)}  # fmt: skip


def add_adapters(export: Path, files: dict[str, Path], dest: Path) -> Path:
    """A copy of the engine directory ``export`` at ``dest`` with `sdrt lora add` of files["kohya"] (as `kohya`) and
    files["peft"] (as `p`)."""
    from sdrt.cli import main

    shutil.copytree(export, dest)
    assert main(["lora", "add", str(dest), str(files["kohya"])]) == 0
    assert main(["lora", "add", str(dest), str(files["peft"]), "--name", "p"]) == 0
    return dest
