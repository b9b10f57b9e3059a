"""The four graphs of DESIGN.md as traceable modules, with their I/O names and the shapes they accept.

Shapes are written with symbols: ``B`` rows, ``h``/``w`` latent height and width (a multiple of 8, so the
U-Net's three 2x downsamplings stay exact), ``H``/``W`` = 8h/8w pixels. `Dims` gives each symbol its range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdrt.export.load import Components
from sdrt.export.presets import MAX_IMAGES

LATENT_MULTIPLE = 8  # latent sizes are multiples of 8 -> image sizes are multiples of 64
VAE_FACTOR = 8


@dataclass(frozen=True)
class Dims:
    """Declared ranges: images per prompt (``max_images``) and pixel sizes (``min_px``..``max_px``)."""

    min_px: int
    max_px: int
    max_images: int = MAX_IMAGES

    def rows(self, graph: str) -> tuple[int, int]:
        # text encoder and U-Net see conditional + unconditional rows under classifier-free guidance
        return (1, 2 * self.max_images) if graph in ("text_encoder", "text_encoder_2", "unet") else (1, self.max_images)

    def latent(self) -> tuple[int, int]:
        return self.min_px // VAE_FACTOR, self.max_px // VAE_FACTOR

    def as_json(self) -> dict[str, Any]:
        step = LATENT_MULTIPLE * VAE_FACTOR
        return {"min_px": self.min_px, "max_px": self.max_px, "px_multiple": step, "max_images": self.max_images}


@dataclass
class Graph:
    """One graph to export: a module whose forward takes the named inputs in order."""

    name: str
    module: torch.nn.Module | None
    inputs: dict[str, tuple[tuple[int | str, ...], torch.dtype]]  # name -> (shape with symbols, dtype)
    outputs: tuple[str, ...]
    output_shapes: tuple[tuple[int | str, ...], ...]  # per output, with the same symbols as the inputs
    precision_fp16: bool = True  # False: stays float32 even in an fp16 export (SDXL's VAE)
    keep_fp32_inputs: tuple[str, ...] = ()  # float inputs that stay float32 in fp16 graphs
    upcast_attention: bool = False  # attention logits in float32 too (SD 2.x U-Nets)
    vocab_size: int = 0  # text encoders: token ids are drawn below this

    def release(self) -> None:
        """Drop the module (and, once no other graph holds it, its weights): export frees each as it goes."""
        self.module = None


class TextEncoder(torch.nn.Module):
    """input_ids [B,77] -> text_embeddings [B,77,D] (+ pooled_embeddings [B,P] for the pooled encoder)."""

    def __init__(self, model: torch.nn.Module, penultimate: bool, pooled: bool):
        super().__init__()
        self.model, self.penultimate, self.pooled = model, penultimate, pooled

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, output_hidden_states=self.penultimate, return_dict=True)
        states = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (states, out.text_embeds) if self.pooled else states


class UNet(torch.nn.Module):
    """(sample, timestep[, text_embeds, time_ids]) -> noise_pred; the U-Net's output, whatever it predicts."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """latent (as the sampler leaves it) -> images in [-1, 1]; the decode path itself, without slicing branches."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent):
        z = latent / self.scaling_factor
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)


class VaeEncoder(torch.nn.Module):
    """images in [-1, 1] -> (latent_mean, latent_logvar), the posterior's parameters (unscaled)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        h = self.vae.encoder(images)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution


def graphs_for(c: Components) -> list[Graph]:
    """The graphs of one pipeline, in export order."""
    fam, f32, i32 = c.family, torch.float32, torch.int32
    out: list[Graph] = []
    for name, model in c.text_encoders.items():
        pooled = name == fam.pooled_from
        outputs = ("text_embeddings", "pooled_embeddings") if pooled else ("text_embeddings",)
        module = TextEncoder(model, fam.penultimate_hidden_states, pooled)
        states = ("B", 77, model.config.hidden_size)
        shapes = (states, ("B", model.config.projection_dim)) if pooled else (states,)
        vocab = model.config.vocab_size
        out.append(Graph(name, module, {"input_ids": (("B", 77), i32)}, outputs, shapes, vocab_size=vocab))
    ctx = c.unet.config.cross_attention_dim
    ch = c.unet.config.in_channels
    unet_in = {
        "sample": (("B", ch, "h", "w"), f32),
        "timestep": (("B",), f32),
        "encoder_hidden_states": (("B", 77, ctx), f32),
    }
    keep = ("timestep",)
    if c.unet.config.addition_embed_type == "text_time":
        pooled_dim = c.text_encoders[fam.pooled_from].config.projection_dim
        unet_in.update(text_embeds=(("B", pooled_dim), f32), time_ids=(("B", 6), f32))
        keep = ("timestep", "time_ids")
    upcast = bool(getattr(c.unet.config, "upcast_attention", False))
    noise = (("B", c.unet.config.out_channels, "h", "w"),)
    out.append(
        Graph("unet", UNet(c.unet), unet_in, ("noise_pred",), noise, keep_fp32_inputs=keep, upcast_attention=upcast)
    )
    lat = c.vae.config.latent_channels
    vae_fp16 = fam.vae_fp16 if c.vae_fp16 is None else c.vae_fp16
    latent, images = ("B", lat, "h", "w"), ("B", 3, "H", "W")
    out.append(
        Graph(
            "vae_decoder",
            VaeDecoder(c.vae),
            {"latent": (latent, f32)},
            ("images",),
            (images,),
            precision_fp16=vae_fp16,
        )
    )
    out.append(
        Graph(
            "vae_encoder",
            VaeEncoder(c.vae),
            {"images": (images, f32)},
            ("latent_mean", "latent_logvar"),
            (latent, latent),
            precision_fp16=vae_fp16,
        )
    )
    for g in out:
        g.module.eval()
    return out


def concrete(shape: tuple[int | str, ...], rows: int, h: int, w: int) -> tuple[int, ...]:
    """A symbolic shape at rows ``B`` and latent size ``h`` x ``w``."""
    values = {"B": rows, "h": h, "w": w, "H": h * VAE_FACTOR, "W": w * VAE_FACTOR}
    return tuple(values[d] if isinstance(d, str) else d for d in shape)


def sample_inputs(g: Graph, rows: int, h: int, w: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random inputs of the right meaning: token ids in the vocabulary, timesteps in [0, 1000), images in [-1, 1]."""
    out = {}
    for name, (shape, dtype) in g.inputs.items():
        s = concrete(shape, rows, h, w)
        if dtype == torch.int32:
            out[name] = torch.randint(0, g.vocab_size, s, generator=generator, dtype=torch.int32)
        elif name == "timestep":
            out[name] = torch.randint(0, 1000, s, generator=generator).float()
        elif name == "time_ids":  # (orig h, orig w, crop top, crop left, target h, target w)
            out[name] = torch.tensor([h * 8, w * 8, 0, 0, h * 8, w * 8], dtype=torch.float32).repeat(rows, 1)
        elif name == "images":
            out[name] = torch.rand(s, generator=generator) * 2 - 1
        else:
            out[name] = torch.randn(s, generator=generator)
    return out


# The trace example: 2 rows, latent 16x24. torch.export specialises any symbol whose example value is 0 or 1 and
# may unify symbols with equal examples, so every symbol gets its own example >= 2; the symbol ranges always
# include it. The graph is valid for all sizes; the declared range (manifest "shapes") is what profiles use.
TRACE_ROWS, TRACE_HK, TRACE_WK = 2, 2, 3


def dynamic_shapes(g: Graph, dims: Dims) -> dict[str, dict[int, Any]]:
    """torch.export dimension objects for every symbolic axis, sharing one object per symbol."""
    Dim = torch.export.Dim
    rows = Dim("B", min=1, max=max(dims.rows(g.name)[1], TRACE_ROWS))
    hi = max(dims.latent()[1] // LATENT_MULTIPLE, TRACE_WK)
    hk, wk = Dim("hk", min=1, max=hi), Dim("wk", min=1, max=hi)
    sym = {
        "B": rows,
        "h": LATENT_MULTIPLE * hk,
        "w": LATENT_MULTIPLE * wk,
        "H": LATENT_MULTIPLE * VAE_FACTOR * hk,
        "W": LATENT_MULTIPLE * VAE_FACTOR * wk,
    }
    return {n: {i: sym[d] for i, d in enumerate(shape) if isinstance(d, str)} for n, (shape, _) in g.inputs.items()}
