"""The four graphs of DESIGN.md as traceable modules, with their I/O names and the shapes they accept.

Shapes are written with symbols: ``B`` rows, ``h``/``w`` latent height and width (any size: the U-Net always
upsamples to its skip connections' sizes, as diffusers does for sizes its downsamplings do not divide), ``H``/``W``
= f·h / f·w pixels, f the VAE's scale factor. `Dims` gives each symbol its range.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from sdrt.export.load import Components
from sdrt.export.presets import MAX_IMAGES, MAX_PROMPT_CHUNKS, geometry_of
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import Geometry, concrete_shape


@dataclass(frozen=True)
class Dims:
    """Declared ranges: images per prompt (``max_images``) and pixel sizes (``min_px``..``max_px``); with the
    model's `Geometry` (set by `for_model` at export), the latent sizes they mean."""

    min_px: int
    max_px: int
    max_images: int = MAX_IMAGES
    geometry: Geometry | None = None
    max_prompt_chunks: int = MAX_PROMPT_CHUNKS  # the U-Net's text axis takes 77 x 1..this tokens (web-UI chunks)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Dims:
        """The ranges an engine directory was exported with (directories without chunk ranges take one chunk)."""
        d = manifest["shapes"]
        chunks = int(d.get("max_prompt_chunks", 1))
        return cls(d["min_px"], d["max_px"], d["max_images"], Geometry.from_manifest(manifest), chunks)

    def for_model(self, geometry: Geometry) -> Dims:
        """These ranges for a model of ``geometry``; a range it cannot take is a one-line error naming the fix."""
        m, lo = geometry.px_multiple, geometry.smallest_px
        if self.min_px % m or self.max_px % m or not self.min_px <= self.max_px or self.max_images < 1:
            raise SdrtError(
                f"bad shape range {self.min_px}..{self.max_px} px: sizes are multiples of {m} for this model "
                "(its VAE scale factor and diffusers' multiple of 8), min <= max"
            )
        if not isinstance(self.max_prompt_chunks, int) or not 1 <= self.max_prompt_chunks <= 16:
            raise SdrtError(f"--max-prompt-chunks {self.max_prompt_chunks!r}: give 1 to 16 (75 prompt tokens each)")
        if self.min_px < lo:
            raise SdrtError(
                f"--min-size {self.min_px} is below this model's smallest size, {lo} px (the U-Net's deepest feature "
                f"map must be at least 2x2); use --min-size {lo} or more"
            )
        return dataclasses.replace(self, geometry=geometry)

    @property
    def factor(self) -> int:
        if self.geometry is None:
            raise ValueError("Dims.for_model(geometry) first: latent sizes depend on the model")
        return self.geometry.vae_scale_factor

    def rows(self, graph: str) -> tuple[int, int]:
        # text encoder and U-Net see conditional + unconditional rows under classifier-free guidance
        guided = graph in ("text_encoder", "text_encoder_2", "unet", "unet_controlnet") or graph.startswith(
            "controlnet_"
        )
        return (1, 2 * self.max_images) if guided else (1, self.max_images)

    def latent(self) -> tuple[int, int]:
        return self.min_px // self.factor, self.max_px // self.factor

    def as_json(self) -> dict[str, Any]:
        m = self.geometry.px_multiple if self.geometry else None
        return {
            "min_px": self.min_px,
            "max_px": self.max_px,
            "px_multiple": m,
            "max_images": self.max_images,
            "max_prompt_chunks": self.max_prompt_chunks,
        }


def geometry(c: Components) -> Geometry:
    """The loaded model's own sizes (VAE scale factor, U-Net downsampling, native latent size)."""
    return geometry_of(c.unet.config, c.vae.config)


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
    clip_skips: int = 0  # text encoders: clip_skip takes 0..clip_skips - 1

    def release(self) -> None:
        """Drop the module (and, once no other graph holds it, its weights): export frees each as it goes."""
        self.module = None


class TextEncoder(torch.nn.Module):
    """(input_ids [B,77], clip_skip [1], embeddings [B,77,D]) -> text_embeddings [B,77,D] (+ pooled_embeddings [B,P]
    for the pooled encoder).

    ``clip_skip`` is diffusers' (0: none): the states of layer ``-(1 + clip_skip)`` through the final layer norm
    (SD 1.x / 2.x), or of layer ``-(2 + clip_skip)`` without it (SDXL's penultimate states), as diffusers'
    ``encode_prompt`` selects them. An input, not a constant, so one graph serves every clip skip.

    ``embeddings``: textual-inversion vectors. Where an id is the vocabulary size or above, the token embedding
    there is the vector at the same place in ``embeddings`` (the rest of it is never read), and the encoder sees
    token 0 there, as the web UI's placeholder: the pooled state stays at the prompt's end token. The vectors are
    data, so embeddings are added to an engine directory without a new graph."""

    def __init__(self, model: torch.nn.Module, penultimate: bool, pooled: bool):
        super().__init__()
        self.model, self.penultimate, self.pooled = model, penultimate, pooled
        self.vocab = int(model.config.vocab_size)
        self._swap: tuple[torch.Tensor, torch.Tensor] | None = None  # (where, vectors) during forward
        tokens = getattr(model, "text_model", model).embeddings.token_embedding  # transformers 4 or 5
        tokens.register_forward_hook(self._swapped)

    def _swapped(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self._swap is None:
            return out
        where, vectors = self._swap
        return torch.where(where[..., None], vectors.to(out.dtype), out)

    @staticmethod
    def skips(model: torch.nn.Module, penultimate: bool) -> int:
        """How many clip skips the encoder has: its hidden states (the embeddings' and each layer's output) up to
        the one read without skipping."""
        return int(model.config.num_hidden_layers) + 1 - int(penultimate)

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor, embeddings: torch.Tensor):
        where = input_ids >= self.vocab
        self._swap = (where, embeddings)
        try:
            out = self.model(torch.where(where, 0, input_ids), output_hidden_states=True, return_dict=True)
        finally:
            self._swap = None
        layers = torch.stack(out.hidden_states)  # [L + 1, B, 77, D]: the embeddings, each layer's output
        last = layers.shape[0] - 1 - int(self.penultimate)  # the layer diffusers reads without clip skip
        states = layers.index_select(0, last - clip_skip.long()).squeeze(0)  # [B, 77, D]
        if not self.penultimate:
            states = getattr(self.model, "text_model", self.model).final_layer_norm(states)  # transformers 5 or 4
        return (states, out.text_embeds) if self.pooled else states


class _SkipSizes:
    """The size entering each U-Net down block, recorded as the U-Net runs (a forward pre-hook on each): the size
    the up block that feeds its skip connection must upsample to."""

    def __init__(self) -> None:
        self.sizes: list[Any] = []

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.sizes.append(x.shape[-2:])


class _UpsampleTo(torch.nn.Module):
    """diffusers' Upsample2D (nearest, then its conv) always given the skip connection's size, as diffusers' U-Net
    forward does when the latent is not a multiple of its downsampling; for multiples, nearest at twice the size
    is the same picture. The conv keeps its module path, so the weights keep their names."""

    def __init__(self, up: torch.nn.Module, skip: _SkipSizes, index: int):
        super().__init__()
        self.conv, self.skip, self.index = up.conv, skip, index

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        size = self.skip.sizes[self.index]
        return self.conv(torch.nn.functional.interpolate(hidden_states, size=size, mode="nearest"))


def _plain_upsampler(up: Any) -> bool:
    return (
        type(up).__name__ == "Upsample2D"
        and up.use_conv
        and up.interpolate
        and up.name == "conv"
        and up.norm is None
        and not up.use_conv_transpose
    )


class UNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, timestep_cond]) -> noise_pred; the
    U-Net's output, whatever it predicts. ``timestep_cond``: a distilled U-Net's guidance embedding (LCM: its
    config's time_cond_proj_dim), which diffusers computes from the guidance scale.

    diffusers' forward checks whether the latent divides by 2 ** (upsamplers) and only then forwards the skip
    connections' sizes to the upsamplers; a traced graph cannot branch on a dynamic size, so this module always
    takes that path: each upsampler reaches the recorded size of its skip connection, and the U-Net's divisibility
    check is turned off (num_upsamplers = 0) so that it never forwards sizes of its own."""

    def __init__(self, unet: torch.nn.Module, conds: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.skip, self.conds = unet, _SkipSizes(), conds
        ups = unet.up_blocks
        for j, block in enumerate(ups[:-1]):
            samplers = getattr(block, "upsamplers", None)
            if samplers is None or len(samplers) != 1 or not _plain_upsampler(samplers[0]):
                raise SdrtError(f"unsupported U-Net: up block {j} ({type(block).__name__}) has no plain Upsample2D")
            samplers[0] = _UpsampleTo(samplers[0], self.skip, len(ups) - 2 - j)  # down block len-2-j's input size
        if len(unet.down_blocks) != len(ups) or getattr(ups[-1], "upsamplers", None) is not None:
            raise SdrtError("unsupported U-Net: down and up blocks do not pair up as UNet2DConditionModel's do")
        for block in unet.down_blocks:
            block.register_forward_pre_hook(self.skip.record, with_kwargs=True)
        unet.num_upsamplers = 0

    def forward(self, sample, timestep, encoder_hidden_states, *conds):
        return call_unet(self, sample, timestep, encoder_hidden_states, conds)


def call_unet(m: torch.nn.Module, sample, timestep, encoder_hidden_states, conds: tuple, **more) -> torch.Tensor:
    """The diffusers U-Net ``m.unet`` of a U-Net graph's module ``m`` (`UNet`, or ControlNet's `UNetResiduals`) on
    the graph's inputs; ``conds``: the values of the inputs ``m.conds`` names, in order."""
    named = dict(zip(m.conds, conds, strict=True))
    added = {k: named[k] for k in ("text_embeds", "time_ids")} if "text_embeds" in named else None
    m.skip.sizes.clear()
    try:
        return m.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            timestep_cond=named.get("timestep_cond"),
            return_dict=False,
            **more,
        )[0]
    finally:  # no trace's symbolic sizes left on the module: torch 2.11 cannot deepcopy them (fp16 programs)
        m.skip.sizes.clear()


class VaeDecoder(torch.nn.Module):
    """latent (as the sampler leaves it) -> images in [-1, 1]; the decode path itself, without slicing branches.
    AutoencoderKL and AutoencoderTiny alike: diffusers' pipelines divide by the scaling factor for both."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent):
        z = latent / self.scaling_factor
        if getattr(self.vae, "post_quant_conv", None) is not None:  # AutoencoderTiny has none
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)


class VaeEncoder(torch.nn.Module):
    """images in [-1, 1] -> (latent_mean, latent_logvar), the posterior's parameters (unscaled)."""

    outputs = ("latent_mean", "latent_logvar")

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        h = self.vae.encoder(images)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution


class TinyVaeEncoder(VaeEncoder):
    """images in [-1, 1] -> latents (unscaled): AutoencoderTiny's (TAESD's) encoder has no distribution, and
    diffusers' retrieve_latents takes its ``encode(...).latents`` as they are, drawing no noise."""

    outputs = ("latents",)

    def forward(self, images):
        return self.vae.encoder(images)


def time_ids_width(c: Components, pooled_dim: int) -> int:
    """SDXL's size conditioning: 6 time ids (original size, crop top-left, target size), or 5 where the pipeline
    has requires_aesthetics_score (original size, crop top-left, aesthetic score: the refiner), as the U-Net's
    added-embedding width says; a pipeline option that disagrees with the U-Net is refused (diffusers raises)."""
    cfg = c.unet.config
    width, rest = divmod(cfg.projection_class_embeddings_input_dim - pooled_dim, cfg.addition_time_embed_dim)
    if rest or width != (5 if c.aesthetics else 6):
        raise SdrtError(
            f"the U-Net's added embedding takes {cfg.projection_class_embeddings_input_dim - pooled_dim} time-id "
            f"features, but requires_aesthetics_score={c.aesthetics} in model_index.json means "
            f"{5 if c.aesthetics else 6} x {cfg.addition_time_embed_dim}; set requires_aesthetics_score to match the "
            "U-Net (True for an SDXL refiner)"
        )
    return width


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
        inputs = {"input_ids": (("B", 77), i32), "clip_skip": ((1,), i32), "embeddings": (states, f32)}
        skips = TextEncoder.skips(model, fam.penultimate_hidden_states)
        out.append(Graph(name, module, inputs, outputs, shapes, vocab_size=model.config.vocab_size, clip_skips=skips))
    ctx = c.unet.config.cross_attention_dim
    ch = c.unet.config.in_channels
    unet_in = {
        "sample": (("B", ch, "h", "w"), f32),
        "timestep": (("B",), f32),
        "encoder_hidden_states": (("B", "T", ctx), f32),  # T: 77 x prompt chunks
    }
    keep = ("timestep",)
    if c.unet.config.addition_embed_type == "text_time":
        pooled_dim = c.text_encoders[fam.pooled_from].config.projection_dim
        unet_in.update(text_embeds=(("B", pooled_dim), f32), time_ids=(("B", time_ids_width(c, pooled_dim)), f32))
        keep = ("timestep", "time_ids")
    if c.unet.config.time_cond_proj_dim is not None:  # a distilled U-Net: the guidance scale as an embedding
        unet_in["timestep_cond"] = (("B", int(c.unet.config.time_cond_proj_dim)), f32)
    upcast = bool(getattr(c.unet.config, "upcast_attention", False))
    noise = (("B", c.unet.config.out_channels, "h", "w"),)
    module = UNet(c.unet, tuple(unet_in)[3:])
    out.append(Graph("unet", module, unet_in, ("noise_pred",), noise, keep_fp32_inputs=keep, upcast_attention=upcast))
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
    encoder = TinyVaeEncoder if type(c.vae).__name__ == "AutoencoderTiny" else VaeEncoder
    out.append(
        Graph(
            "vae_encoder",
            encoder(c.vae),
            {"images": (images, f32)},
            encoder.outputs,
            (latent,) * len(encoder.outputs),
            precision_fp16=vae_fp16,
        )
    )
    for g in out:
        g.module.eval()
    return out


def sample_inputs(
    g: Graph, dims: Dims, rows: int, h: int, w: int, generator: torch.Generator, chunks: int | None = None
) -> dict[str, torch.Tensor]:
    """Random inputs of the right meaning: token ids in the vocabulary, timesteps in [0, 1000), images in [-1, 1],
    text states of ``chunks`` x 77 tokens (default: the trace's, `trace_chunks`)."""
    out, f = {}, dims.factor
    tokens = 77 * (trace_chunks(dims) if chunks is None else chunks)
    for name, (shape, dtype) in g.inputs.items():
        s = concrete_shape(shape, rows, h, w, f, tokens)
        if name == "clip_skip":
            out[name] = torch.randint(0, g.clip_skips, s, generator=generator, dtype=torch.int32)
        elif dtype == torch.int32:  # token ids; a few at the vocabulary size read `embeddings` there
            out[name] = torch.randint(0, g.vocab_size, s, generator=generator, dtype=torch.int32)
            out[name][:, 2:5] = g.vocab_size
        elif name == "timestep":
            out[name] = torch.randint(0, 1000, s, generator=generator).float()
        elif name == "time_ids":  # (orig h, orig w, crop top, crop left, target h, target w or aesthetic score)
            ids = [h * f, w * f, 0, 0] + ([h * f, w * f] if s[1] == 6 else [6.0])
            out[name] = torch.tensor(ids, dtype=torch.float32).repeat(rows, 1)
        elif name == "images":
            out[name] = torch.rand(s, generator=generator) * 2 - 1
        elif name in ("controlnet_cond", "conditioning_scale"):  # a control image in [0, 1]; scales around 1
            out[name] = torch.rand(s, generator=generator) + (0.5 if name == "conditioning_scale" else 0.0)
        else:
            out[name] = torch.randn(s, generator=generator)
    return out


# The trace example: 2 rows, a latent just above the smallest the U-Net takes, odd (not a multiple of its
# downsampling) and non-square. torch.export specialises any symbol whose example value is 0 or 1 and may unify
# symbols with equal examples, so every symbol gets its own example >= 2; the symbol ranges always include it.
# The graph is valid for all sizes in them; the declared range (manifest "shapes") is what profiles use.
TRACE_ROWS = 2


def trace_latent(dims: Dims) -> tuple[int, int]:
    lo = dims.geometry.min_latent
    return lo + 1, lo + 3


def trace_chunks(dims: Dims) -> int:
    """Prompt chunks of the trace example: 2 where the range has them (1 would specialise the text axis)."""
    return min(2, dims.max_prompt_chunks)


def dynamic_shapes(g: Graph, dims: Dims) -> dict[str, dict[int, Any]] | tuple:
    """torch.export dimension objects for every symbolic axis, sharing one object per symbol."""
    Dim = torch.export.Dim
    rows = Dim("B", min=1, max=max(dims.rows(g.name)[1], TRACE_ROWS))
    lo, hi = dims.geometry.min_latent, max(dims.latent()[1], *trace_latent(dims))
    h, w = Dim("h", min=lo, max=hi), Dim("w", min=lo, max=hi)
    sym = {"B": rows, "h": h, "w": w, "H": dims.factor * h, "W": dims.factor * w}
    if dims.max_prompt_chunks > 1:  # the text axis: 77 tokens a chunk; one chunk is a static 77
        sym["T"] = 77 * Dim("chunks", min=1, max=dims.max_prompt_chunks)
    # "h/4" (ControlNet residuals): ceil(h / 4) is no affine function of h; torch.export derives it (Dim.AUTO)
    out = {
        n: {i: sym.get(d, Dim.AUTO) for i, d in enumerate(shape) if isinstance(d, str) and d != "T" or d in sym}
        for n, (shape, _) in g.inputs.items()
    }
    params = inspect.signature(g.module.forward).parameters.values()
    if not any(p.kind is p.VAR_POSITIONAL for p in params):
        return out
    # forward(a, b, *rest) (U-Net and ControlNet graphs): positional, the inputs after the named ones as one tuple
    n, per_input = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params), list(out.values())
    rest = tuple(per_input[n:])  # none (an SD U-Net without added inputs): torch.export sees only the named ones
    return (*per_input[:n], rest) if rest else tuple(per_input)
