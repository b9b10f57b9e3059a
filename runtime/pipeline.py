"""Engine directory -> images: the whole request as one function of device tensors, replayable as a CUDA graph.

`Pipeline._body` is the request: text encoding, start latents (img2img: VAE encoder and noise), every sampler
step with the U-Net and classifier-free guidance, VAE decode, conversion to uint8. It reads only device
buffers filled before it runs, so on a GPU it is captured once per `Request.key` and replayed; elsewhere (or
with ``cuda_graph=False``) the same function runs step by step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.backends import Backend, open_backend
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import check_files, read_manifest
from sdrt.runtime.samplers import SAMPLERS, Plan, make_plan, sample, start_latents, to_x0
from sdrt.runtime.schedule import NoiseSchedule, default_sampler
from sdrt.runtime.tokenizer import PromptTokenizer

log = logging.getLogger("sdrt")
MAX_CAPTURED = 4  # captured request graphs kept per pipeline (least recently used goes first)


@dataclass(frozen=True)
class Request:
    """One validated call. ``key`` is everything a captured graph depends on."""

    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    steps: int
    guidance: float
    height: int
    width: int
    images_per_prompt: int
    seed: int
    sampler: str
    strength: float  # 1.0 for txt2img
    image: Image.Image | None = None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    @property
    def cfg(self) -> bool:  # diffusers: guidance only when guidance_scale > 1
        return self.guidance > 1.0

    @property
    def key(self) -> tuple:
        # prompts x images per prompt fix the buffers' shapes; the init image adds the VAE encoder to the graph
        shape = (len(self.prompts), self.images_per_prompt, self.height, self.width)
        return (*shape, self.steps, self.sampler, self.strength, self.cfg, self.image is not None)


class Pipeline:
    """``Pipeline.load(DIR)(prompt, ...)`` -> PIL images; arguments named as in diffusers.

    One Pipeline may be called from several threads: calls are serialised by a lock (the engines, their I/O
    buffers and the captured graphs are shared), so each call's result is exactly what it gives alone.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], backend: Backend, cuda_graph: bool = True):
        if manifest["family"] != "sd":
            raise SdrtError(f"{root}: generating with {manifest['family']} engine directories is not supported yet")
        self.root, self.manifest, self.backend, self.device = root, manifest, backend, backend.device
        self.tokenizer = PromptTokenizer(root, manifest["tokenizers"]["tokenizer"])
        self.schedule = NoiseSchedule.from_manifest(manifest["scheduler"])
        self.default_sampler = default_sampler(self.schedule)
        self.shapes = manifest["shapes"]
        self.scaling_factor = float(manifest["latent"]["scaling_factor"])
        self.latent_channels = int(manifest["latent"]["channels"])
        self.cuda_graph = cuda_graph and self.device.type == "cuda" and backend.capturable
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._captured: OrderedDict[tuple, _Captured] = OrderedDict()
        self._plans: dict[tuple, Plan] = {}

    @classmethod
    def load(
        cls, root: str | Path, backend: str = "auto", device: str | None = None, cuda_graph: bool = True
    ) -> Pipeline:
        """Open an engine directory; every file it will read is first checked against the manifest's SHA-256."""
        root = Path(root)
        manifest = read_manifest(root)
        names = [n for g in manifest["graphs"].values() for n in g["files"]]
        names += [t["file"] for t in manifest["tokenizers"].values()]
        problems = check_files(root, manifest, names)
        if problems:
            raise SdrtError(f"{root}: {'; '.join(problems)}; re-export it with `sdrt export ... {root} --force`")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SdrtError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
        return cls(root, manifest, open_backend(root, manifest, backend, torch.device(device)), cuda_graph)

    def close(self) -> None:
        self._captured.clear()
        self.backend.close()

    # -- the public call ---------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        sampler: str | None = None,
        image: Image.Image | str | Path | None = None,
        strength: float = 0.8,
        progress: bool = False,
    ) -> list[Image.Image]:
        req = self.request(
            prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, num_images_per_prompt,
            seed, sampler, image, strength,
        )  # fmt: skip
        with self._lock:
            pixels = self.generate(req, progress=progress)
        return [Image.fromarray(a) for a in pixels.numpy()]

    def request(self, prompt, negative_prompt, steps, guidance, height, width, n, seed, sampler, image, strength):
        """Validate the arguments into a `Request`; every problem is a one-line SdrtError that names the fix."""
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise SdrtError("prompt must be a string or a non-empty list of strings")
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = (negatives,) * len(prompts) if isinstance(negatives, str) else tuple(negatives)
        if len(negatives) != len(prompts):
            raise SdrtError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
        if not isinstance(steps, int) or steps < 1:
            raise SdrtError(f"steps must be a whole number >= 1, got {steps!r}")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise SdrtError(f"guidance must be a finite number, got {guidance!r}")
        if not isinstance(n, int) or n < 1 or len(prompts) * n > self.shapes["max_images"]:
            raise SdrtError(
                f"{len(prompts)} prompt(s) x {n} image(s) is outside the engine's 1-{self.shapes['max_images']} "
                "images per call; lower the batch or re-export with a larger --max-batch"
            )
        if seed is None:
            seed = secrets.randbits(63)
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise SdrtError(f"seed must be a whole number in [0, 2^64), got {seed!r}")
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise SdrtError(f"unknown sampler {sampler!r}; samplers are: {', '.join(SAMPLERS)}")
        init = None
        if image is not None:
            if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
                raise SdrtError(f"strength must be in (0, 1], got {strength!r}")
            init = _open_image(image)
            height, width = height or init.height, width or init.width
        else:
            strength = 1.0
        height, width = self._size("height", height), self._size("width", width)
        req = Request(prompts, negatives, steps, float(guidance), height, width, n, seed, sampler, float(strength))
        if init is not None:
            req = Request(**{**req.__dict__, "image": init.convert("RGB").resize((width, height), Image.LANCZOS)})
        try:
            self.plan(req.sampler, req.steps, req.strength)
        except ValueError as err:
            raise SdrtError(str(err)) from None
        return req

    def plan(self, sampler: str, steps: int, strength: float) -> Plan:
        """The host-side sampler plan, computed once per (sampler, steps, strength)."""
        key = (sampler, steps, strength)
        if key not in self._plans:
            self._plans[key] = make_plan(sampler, self.schedule, steps, strength)
        return self._plans[key]

    def _size(self, what: str, px: int | None) -> int:
        lo, hi, m = self.shapes["min_px"], self.shapes["max_px"], self.shapes["px_multiple"]
        if px is None:  # the size the U-Net was trained at, within the engine's range
            px = min(max(int(self.manifest["unet"].get("sample_size") or 64) * 8, lo), hi) // m * m
        if not isinstance(px, int) or px % 8:
            raise SdrtError(f"{what} {px!r} is not a multiple of 8")
        if px % m or not lo <= px <= hi:
            near = sorted({min(max(round(px / m) * m, lo), hi)})
            raise SdrtError(
                f"{what} {px} is outside this engine's sizes ({lo}-{hi} px in steps of {m}); use {near[0]}, "
                "or re-export with --min-size/--max-size"
            )
        return px

    # -- running one request -------------------------------------------------------------------------------------

    def generate(self, req: Request, progress: bool = False) -> torch.Tensor:
        """uint8 images [B, H, W, 3] on the CPU."""
        t0 = time.perf_counter()
        plan = self.plan(req.sampler, req.steps, req.strength)
        host = self.host_inputs(req, plan)
        self.timings = {"host_prepare_ms": (time.perf_counter() - t0) * 1e3}
        if self.cuda_graph:
            captured = self._captured.pop(req.key, None) or _Captured(self, req, plan.to(self.device), host)
            self._captured[req.key] = captured
            while len(self._captured) > MAX_CAPTURED:
                self._captured.popitem(last=False)
            return captured.replay(host, self.timings)
        buf = {k: v.to(self.device) for k, v in host.items()}
        out = self._body(req, plan.to(self.device), buf, self._stage, _Progress(len(plan.timesteps), progress))
        return out.cpu()

    def host_inputs(self, req: Request, plan: Plan) -> dict[str, torch.Tensor]:
        """Everything a request reads, drawn in diffusers' order from ``torch.Generator("cpu").manual_seed(seed)``:
        img2img's posterior sample, then the initial latents, then each ancestral step's noise."""
        gen = torch.Generator("cpu").manual_seed(req.seed)
        h, w = req.height // 8, req.width // 8
        shape = (req.batch, self.latent_channels, h, w)
        ids = self.tokenizer(list(req.negatives + req.prompts) if req.cfg else list(req.prompts))
        host = {"input_ids": torch.from_numpy(ids), "guidance": torch.tensor(req.guidance, dtype=torch.float32)}
        if req.image is not None:
            pixels = np.asarray(req.image, dtype=np.float32) / 255.0 * 2 - 1  # [-1, 1], as VaeImageProcessor
            host["image"] = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
            host["posterior_noise"] = torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float32)
        host["noise0"] = torch.randn(shape, generator=gen, dtype=torch.float32)
        draws = [torch.randn(shape, generator=gen, dtype=torch.float32) for _ in range(plan.noise_draws)]
        host["noise"] = torch.stack(draws) if draws else torch.zeros((0, *shape))
        return host

    def _body(self, req: Request, plan: Plan, buf: dict[str, torch.Tensor], stage=None, progress=None):
        """The request, from device buffers to uint8 pixels; no host synchronisation anywhere inside."""
        stage = stage or _no_stage
        run, dtype = self.backend.run, self.backend.dtype
        with stage("text_encoder_ms"):
            states = run("text_encoder", {"input_ids": buf["input_ids"]})[0]  # [rows, 77, D], uncond first
            n = req.images_per_prompt
            states = states.repeat_interleave(n, dim=0) if n > 1 else states  # [2B or B, 77, D]
        with stage("start_ms"):
            if req.image is None:
                x = start_latents(plan, buf["noise0"])  # sigma space, [B, 4, h, w]
            else:
                mean, logvar = run("vae_encoder", {"images": buf["image"].to(dtype("vae_encoder", "images"))})
                z = mean.float() + torch.exp(0.5 * logvar.float()) * buf["posterior_noise"]
                z = (z * self.scaling_factor).expand(req.batch, -1, -1, -1)
                x = start_latents(plan, buf["noise0"], z)
        with stage("denoise_ms"):
            denoise = self._denoiser(req, plan, states.to(dtype("unet", "encoder_hidden_states")), buf, progress)
            latents = sample(plan, denoise, x, buf["noise"])
        with stage("vae_decoder_ms"):
            images = run("vae_decoder", {"latent": latents.to(dtype("vae_decoder", "latent"))})[0]
        with stage("to_uint8_ms"):
            # as diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1), then * 255 rounded
            pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            return pixels.permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]

    def _denoiser(self, req: Request, plan: Plan, states: torch.Tensor, buf: dict[str, torch.Tensor], progress):
        """The one denoiser contract: sigma-space x at call i -> x0, with guidance and the prediction type inside."""
        sample_dtype, prediction = self.backend.dtype("unet", "sample"), self.schedule.prediction_type
        guidance = buf["guidance"]
        timesteps = plan.timesteps[:, None].expand(-1, states.shape[0]).contiguous()  # [n_calls, rows]

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            x_in = x * plan.c_in[i]  # diffusers' scale_model_input
            x_in = torch.cat([x_in, x_in]) if req.cfg else x_in  # [2B, 4, h, w]
            feeds = {"sample": x_in.to(sample_dtype), "timestep": timesteps[i], "encoder_hidden_states": states}
            out = self.backend.run("unet", feeds)[0].float()
            if req.cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            if progress is not None:
                progress.step()
            return to_x0(x, out, plan.sigmas[i], prediction)

        return denoise

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Wall time of one stage into self.timings (step-by-step path; on a GPU it synchronises at its ends)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        yield
        sync()
        self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - t) * 1e3


def _no_stage(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


class _Progress:
    """One stderr line per request, updated per step (step-by-step path only; a graph replay has no steps)."""

    def __init__(self, total: int, enabled: bool):
        import sys

        self.total, self.done, self.enabled, self.stream, self.t0 = total, 0, enabled, sys.stderr, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            end = "\n" if self.done == self.total else ""
            print(f"\rsampling {self.done}/{self.total} ({rate:.2f} steps/s)", end=end, file=self.stream, flush=True)


class _Captured:
    """One request shape captured as a CUDA graph: static device buffers in, uint8 pixels out."""

    def __init__(self, pipe: Pipeline, req: Request, plan: Plan, host: dict[str, torch.Tensor]):
        self.buf = {k: torch.empty_like(v, device=pipe.device) for k, v in host.items()}
        self.host = {k: torch.empty_like(v).pin_memory() for k, v in host.items()}
        for k, v in host.items():
            self.buf[k].copy_(v)
        side = torch.cuda.Stream(pipe.device)
        side.wait_stream(torch.cuda.current_stream(pipe.device))
        with torch.cuda.stream(side):  # warm-up: engines allocate, kernels load, outside the capture
            pipe._body(req, plan, self.buf)
        torch.cuda.current_stream(pipe.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = pipe._body(req, plan, self.buf)
        self.plan = plan  # the graph reads its tensors: keep them alive

    def replay(self, host: dict[str, torch.Tensor], timings: dict[str, float]) -> torch.Tensor:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for k, v in host.items():  # pinned staging, then asynchronous copies into the graph's buffers
            self.host[k].copy_(v)
            self.buf[k].copy_(self.host[k], non_blocking=True)
        start.record()
        self.graph.replay()
        end.record()
        pixels = self.out.to("cpu")  # the one synchronisation of the request
        timings["graph_ms"] = start.elapsed_time(end)
        return pixels


def _open_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as err:
        raise SdrtError(f"cannot read init image {image}: {str(err).splitlines()[0]}") from None
