"""The contenders of `sdrt bench`: sdrt's Pipeline on one backend (CUDA graph on or off), and diffusers' own
pipeline built from the same source the engine directory was exported from.

A contender is called with a `Spans` and returns the request's uint8 images [B, H, W, 3]; while it runs, the
text encoder(s), every U-Net call and the VAE decode are marked as stages. sdrt's stages are marked around its
backend's graph calls (step-by-step path only: a captured CUDA graph has no observable stages); diffusers' with
forward pre/post hooks on its modules and a wrapper around ``vae.decode``. Neither library is changed.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.benchmarks.measure import Spans, module_hooks, timed_attribute
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline, Request
from sdrt.runtime.schedule import SCHEDULERS

_GRAPH_STAGE = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
    "unet": "unet",
    "vae_decoder": "vae_decoder",
    "vae_encoder": "vae_encoder",
}
GRAPH_NOTE = "one CUDA graph per request: stages are not observable inside it, so end to end only"


class SdrtContender:
    """``Pipeline.load(root, backend, device, cuda_graph)`` running one fixed request."""

    kind = "sdrt"

    def __init__(self, root: Path, backend: str, device: torch.device, cuda_graph: bool, cpu_int8: bool = False):
        self.pipe = Pipeline.load(root, backend=backend, device=str(device), cuda_graph=cuda_graph, cpu_int8=cpu_int8)
        self.backend = backend
        self.cuda_graph = self.pipe.cuda_graph  # True only on a GPU with a capturable backend
        self.name = f"sdrt-{backend}" + ("-graph" if self.cuda_graph else "") + ("-int8" if cpu_int8 else "")
        self.req: Request | None = None
        self.timings: dict[str, float] = {}

    def describe(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "cuda_graph": self.cuda_graph,
            "precision": self.pipe.manifest["precision"],
        }
        if self.pipe.backend.inference_precision:  # OpenVINO: computes in bf16 or f32 whatever the graphs hold
            out["inference_precision"] = self.pipe.backend.inference_precision
        if self.cuda_graph:
            out["note"] = GRAPH_NOTE
        return out

    def prepare(self, req: Request) -> None:
        self.req = req

    def __call__(self, spans: Spans) -> np.ndarray:
        if self.cuda_graph:  # marks inside a capture would be captured too: time the replay as a whole
            (pixels,), self.timings = self.pipe.generate_batch([self.req])
        else:
            with timed_attribute(self.pipe.backend, "run", spans, lambda graph, feeds: _GRAPH_STAGE.get(graph)):
                (pixels,), self.timings = self.pipe.generate_batch([self.req])
        return pixels.numpy()

    def close(self) -> None:
        self.pipe.close()


def source_pipeline(manifest: dict[str, Any]) -> Any:
    """diffusers' pipeline (fp32, CPU) over the modules the engine directory was exported from.

    A preset rebuilds the same seeded weights; a diffusers folder or single file is loaded again and must still
    hash as the manifest recorded (otherwise the baseline would be another model).
    """
    from sdrt.export.load import SourceMissing, components_from_source

    try:
        components = components_from_source(manifest["source"])
    except SourceMissing as err:
        raise SdrtError(f"the baseline needs the checkpoint: {err}; pass --no-baseline") from None
    pipe = components.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_sampler(pipe: Any, sampler: str) -> Any:
    """``pipe`` with its scheduler switched to the diffusers scheduler that ``sampler`` agrees with."""
    import diffusers

    cls, fixed = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **fixed)
    return pipe


class DiffusersContender:
    """diffusers' pipeline, eager (fp16 on a GPU, fp32 on the CPU) with its default attention, or with
    ``torch.compile`` of the U-Net, or (CPU) eager under ``torch.autocast("cpu", torch.bfloat16)`` over the fp32
    modules; ``output_type="np"``, converted to uint8 as diffusers' ``numpy_to_pil``."""

    kind = "baseline"

    def __init__(self, pipe: Any, device: torch.device, compile_unet: bool = False, bf16: bool = False):
        if bf16 and (compile_unet or device.type != "cpu"):
            raise SdrtError("the bf16-autocast baseline is eager and on the CPU (a GPU's baseline is fp16)")
        self.device, self.bf16 = device, bf16
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = quietly(pipe.to, device=device, dtype=self.dtype)  # diffusers warns about casting with to()
        if compile_unet:  # a second pipeline over the same modules; only its U-Net is compiled
            kw = dict(pipe.components)
            if "requires_safety_checker" in inspect.signature(type(pipe)).parameters:
                kw["requires_safety_checker"] = False
            pipe = type(pipe)(**kw)
            pipe.unet = torch.compile(pipe.unet)
            pipe.set_progress_bar_config(disable=True)
        self.pipe, self.compiled = pipe, compile_unet
        self.name = "diffusers-compile" if compile_unet else "diffusers-eager-bf16" if bf16 else "diffusers-eager"
        self.kw: dict[str, Any] = {}
        self.seed = 0
        self.timings: dict[str, float] = {}

    def describe(self) -> dict[str, Any]:
        processor = type(next(iter(self.pipe.unet.attn_processors.values()))).__name__
        out = {
            "name": self.name,
            "kind": self.kind,
            "backend": "torch",
            "cuda_graph": False,
            "precision": str(self.dtype).removeprefix("torch."),
            "compile": self.compiled,
            "pipeline": type(self.pipe).__name__,
            "attention": processor,
            "scheduler": type(self.pipe.scheduler).__name__,
        }
        if self.bf16:
            out["precision"] = "bfloat16 autocast"
            out["note"] = 'fp32 weights, computed under torch.autocast("cpu", dtype=torch.bfloat16)'
        elif self.device.type == "cpu":
            out["note"] = "fp32: fp16 is not a real option on the CPU"
        return out

    def prepare(self, req: Request) -> None:
        """The same request as sdrt's: prompt, empty negative, steps, guidance, size, batch, sampler and seed."""
        if len(req.prompts) != 1 or req.image is not None:
            raise SdrtError("the benchmark runs one text prompt (txt2img)")
        with_sampler(self.pipe, req.sampler)
        self.seed = req.seed
        self.kw = dict(
            prompt=req.prompts[0],
            negative_prompt=req.negatives[0] or None,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            height=req.height,
            width=req.width,
            num_images_per_prompt=req.images_per_prompt,
            output_type="np",
        )

    def __call__(self, spans: Spans) -> np.ndarray:
        pipe = self.pipe
        encoders = [
            ("text_encoder", m) for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None
        ]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)
        with module_hooks([*encoders, ("unet", pipe.unet)], spans), autocast:
            with timed_attribute(pipe.vae, "decode", spans, lambda *args: "vae_decoder"):
                out = pipe(**self.kw, generator=torch.Generator("cpu").manual_seed(self.seed))
        return (np.asarray(out.images) * 255).round().astype(np.uint8)  # [B, H, W, 3]

    def close(self) -> None:
        self.pipe = None


def quietly(fn, *args, **kwargs):
    """``fn(...)`` with diffusers' logger at error level."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        logging.set_verbosity(level)
