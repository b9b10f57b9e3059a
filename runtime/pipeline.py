"""Engine directory -> images: a batch of requests as one function of device tensors, replayable as a CUDA graph.

`Pipeline.body` is the whole batch: text encoding, start latents (img2img / inpainting: VAE encoder and noise),
every sampler step with the U-Net and classifier-free guidance, VAE decode, conversion to uint8. It reads only
device buffers filled before it runs, so on a GPU it is captured once per `Layout.key` and replayed (runtime/
capture.py); elsewhere (or with ``cuda_graph=False``) the same function runs step by step. Model families differ
as data (the manifest: one or two text encoders, SDXL's added conditioning, the U-Net's input channels), not as
branches inside the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdrt.runtime.backends import Backend, open_backend
from sdrt.runtime.capture import CaptureCache
from sdrt.runtime.control import Residuals, check_controls, controlnet_args, resized
from sdrt.runtime.embeddings import Embeddings
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.hires import LATENT_UPSCALERS, check_upscaler, target_size, upscale_image, upscale_latents
from sdrt.runtime.lora import Adapters, check_loras, check_loras_with_controlnet
from sdrt.runtime.manifest import check_files, read_manifest
from sdrt.runtime.model import Model
from sdrt.runtime.params import (
    DEFAULT_BACKEND,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    IMG2IMG_STRENGTH,
    Hires,
    ImageArg,
    Params,
)
from sdrt.runtime.planners import check_plan_args
from sdrt.runtime.progress import SamplingBar
from sdrt.runtime.prompts import EMPHASIS, SYNTAXES, check_webui
from sdrt.runtime.request import HiresPass, JoinKey, Layout, Request, Texts, host_inputs, open_image
from sdrt.runtime.samplers import ANCESTRAL, Plan, inpaint_blend, make_plan, sample, start_latents, to_x0
from sdrt.runtime.schedule import NoiseSchedule, ScheduleError, default_sampler
from sdrt.runtime.stages import Batch, Stages, no_stage
from sdrt.runtime.tokenizer import PromptTokenizer

log = logging.getLogger("sdrt")


class Pipeline:
    """``Pipeline.load(DIR)(prompt, ...)`` -> PIL images; arguments named as in diffusers.

    One Pipeline may be called from several threads: calls are serialised by a lock (the engines, their I/O
    buffers and the captured graphs are shared), so each call's result is exactly what it gives alone.
    `generate_batch` runs several requests as one engine batch with that same guarantee.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], backend: Backend, cuda_graph: bool = True):
        self.model = model = Model.from_manifest(manifest, root)
        self.root, self.manifest, self.backend, self.device = root, manifest, backend, backend.device
        self.tokenizers = [PromptTokenizer(root, t) for t in manifest["tokenizers"].values()]
        self.embeddings = Embeddings(root, manifest)  # textual inversion: names in prompts, vectors on the device
        for j, tok in enumerate(self.tokenizers):
            tok.use(self.embeddings, j)
        self._vectors = [
            torch.from_numpy(t).to(self.device, backend.dtype(g, "embeddings"))
            for t, g in zip(self.embeddings.tables, model.text_encoders, strict=True)
            if self.embeddings.enabled
        ]
        self.schedule = NoiseSchedule.from_manifest(manifest["scheduler"])
        try:  # a checkpoint scheduler without a sampler of its own still runs with an explicit one
            self.default_sampler: str | None = default_sampler(self.schedule)
            self._no_default: ScheduleError | None = None
        except ScheduleError as err:
            self.default_sampler, self._no_default = None, err
        self.cuda_graph = cuda_graph and self.device.type == "cuda" and backend.capturable
        probe = getattr(backend, "capturable_on", None)  # TensorRT asks its engines (TensorRT for RTX may refuse)
        if self.cuda_graph and probe is not None and not probe(torch.cuda.Stream(self.device)):
            log.warning("%s: the engines cannot be captured into a CUDA graph here; running step by step", root)
            self.cuda_graph = False
        self.lock = threading.RLock()  # held for each batch; holding it pauses the pipeline
        self._captured = CaptureCache()
        self._plans: dict[tuple, Plan] = {}
        self.adapters = Adapters(root, manifest)
        self.refiner: Pipeline | None = None  # SDXL: a refiner directory that takes over the base's latents

    @classmethod
    def load(
        cls,
        root: str | Path,
        backend: str = DEFAULT_BACKEND,
        device: str | None = None,
        cuda_graph: bool = True,
        cpu_precision: str | None = None,
        cpu_int8: bool = False,
        refiner: str | Path | None = None,
    ) -> Pipeline:
        """Open an engine directory; every file it will read is first checked against the manifest's SHA-256.
        ``cpu_precision``: OpenVINO's inference precision, "bf16" or "f32" (None: bf16 where the CPU has it);
        ``cpu_int8``: OpenVINO runs the INT8 U-Net `sdrt quantize` made. ``refiner``: an SDXL refiner's engine
        directory, loaded beside an SDXL base on the same backend, for requests with ``refiner_switch_at``."""
        if refiner is not None:
            pipe = cls.load(root, backend, device, cuda_graph, cpu_precision, cpu_int8)
            try:
                pipe.attach_refiner(cls.load(refiner, backend, device, cuda_graph, cpu_precision))
            except BaseException:
                pipe.close()
                raise
            return pipe
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
        opened = open_backend(root, manifest, backend, torch.device(device), cpu_precision, cpu_int8)
        return cls(root, manifest, opened, cuda_graph)

    def close(self) -> None:
        self._captured.clear()
        self.backend.close()
        if self.refiner is not None:
            self.refiner.close()

    def attach_refiner(self, refiner: Pipeline) -> None:
        """Hand requests with ``refiner_switch_at`` over to ``refiner`` (an SDXL refiner directory: one text
        encoder, aesthetic-score time ids) on this SDXL base's latents; it is closed with this pipeline."""
        why = None
        if self.model.family != "sdxl" or self.model.aesthetics:
            why = f"{self.root} is not an SDXL base model (a refiner takes over an SDXL base's latents)"
        elif refiner.model.family != "sdxl":
            why = f"{refiner.root} is a {refiner.model.family} model, not an SDXL refiner"
        elif not refiner.model.aesthetics:
            why = (
                f"{refiner.root} has no aesthetic-score conditioning (requires_aesthetics_score): it is not an "
                "SDXL refiner"
            )
        elif (refiner.model.latent_channels, refiner.model.geometry.vae_scale_factor) != (
            self.model.latent_channels,
            self.model.geometry.vae_scale_factor,
        ):
            why = f"{refiner.root}'s latents differ from {self.root}'s (channels or VAE scale)"
        if why:
            refiner.close()
            raise SdrtError(f"{why}; give an SDXL refiner export as the refiner", field="refiner")
        self.refiner = refiner

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the public call ---------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        sampler: str | None = None,
        image: ImageArg | None = None,
        strength: float | None = None,
        mask_image: ImageArg | None = None,
        loras: dict[str, float] | None = None,
        controlnet: str | list[str] | None = None,
        control_image: ImageArg | list[ImageArg] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int = 0,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        prompt_syntax: str = "plain",
        emphasis: str = "original",
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        hires: Hires | None = None,
        refiner_switch_at: float | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """txt2img; img2img with ``image`` (strength 0.8 unless given); inpainting with ``image`` and
        ``mask_image`` (white is repainted; strength 1 unless given); ``loras``: {adapter: scale}, adapters added
        with `sdrt lora add`; ``controlnet`` (a name given at `sdrt export --controlnet`, or a list of names: their
        residuals add up, as diffusers' MultiControlNetModel) with ``control_image`` (one per ControlNet) as
        diffusers' ControlNet pipelines take it; ``clip_skip`` as diffusers' (the prompt's states only; with the
        web-UI syntax the negative's too, as the web UI skips both), ``eta`` (DDIM) and ``guidance_rescale`` as
        diffusers'. Arguments named as diffusers names them. ``prompt_syntax="webui"`` reads the prompts as the
        web UI does (``(word:1.3)``, ``BREAK``, prompts longer than 75 tokens in chunks; runtime/prompts.py), with
        its ``emphasis`` mode. An SDXL refiner directory (img2img only) conditions on ``aesthetic_score`` and
        ``negative_aesthetic_score`` as diffusers' StableDiffusionXLImg2ImgPipeline does. ``hires``: the web UI's
        hires fix on a txt2img call (`Hires`: its upscaler, scale or size, second-pass steps, strength, sampler,
        prompts and guidance); the images are the second pass's. ``refiner_switch_at`` (with a refiner loaded):
        the SDXL base runs that fraction of the schedule (diffusers' ``denoising_end``) and the refiner the rest on
        its latents (``denoising_start``), as diffusers' documented base + refiner pair."""
        params = Params(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=num_inference_steps,
            guidance=guidance_scale,
            height=height,
            width=width,
            n=num_images_per_prompt,
            seed=seed,
            sampler=sampler,
            image=image,
            strength=strength,
            mask=mask_image,
            loras=loras,
            clip_skip=clip_skip,
            eta=eta,
            guidance_rescale=guidance_rescale,
            prompt_syntax=prompt_syntax,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            hires=hires,
            refiner_switch_at=refiner_switch_at,
            emphasis=emphasis,
            controlnets=controlnet_args(
                controlnet, control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end
            ),
        )
        pixels = self.generate(self.request(params), progress=progress)
        return [Image.fromarray(a) for a in pixels.numpy()]

    def request(self, params: Params) -> Request:
        """Check `params` against this engine into a `Request`; every problem is a one-line SdrtError that names
        the fix and, in ``field``, the argument at fault."""
        p = params
        prompts, negatives = _prompts(p.prompt, p.negative_prompt)
        if not isinstance(p.guidance, (int, float)) or not math.isfinite(p.guidance):
            raise SdrtError(f"guidance must be a finite number, got {p.guidance!r}", field="guidance")
        n, seed = self._count(p.n, len(prompts)), _seed(p.seed)
        sampler = p.sampler or self.default_sampler
        if sampler is None:
            raise self._no_default
        check_plan_args(sampler, p.steps)
        init, mask_img = self._images(p.image, p.mask)
        controls = check_controls(self.manifest, p.controlnets)
        height, width, strength = p.height, p.width, 1.0
        if init is not None:
            strength = (1.0 if mask_img is not None else IMG2IMG_STRENGTH) if p.strength is None else p.strength
            check_plan_args(sampler, p.steps, strength)
            height, width = height or init.height, width or init.width
        if controls:  # diffusers' default size without an init image: the control image's, down to the size step
            m, first = self.model.px_multiple, controls[0].image
            height, width = height or first.height // m * m, width or first.width // m * m
        height, width = self._size("height", height), self._size("width", width)
        init = init and init.convert("RGB").resize((width, height), Image.LANCZOS)
        mask_img = mask_img and mask_img.convert("L").resize((width, height), Image.LANCZOS)
        loras = check_loras(self.manifest, p.loras)
        if loras and (refusal := self.backend.lora_refusal()):
            raise SdrtError(refusal, field="loras")
        if controls:
            check_loras_with_controlnet(self.manifest, loras)
        controls = tuple(resized(c, width, height) for c in controls)
        cfg = p.guidance > 1.0 and not self.model.guidance_embedding  # as Request.cfg
        texts = self._texts(p, prompts, negatives, cfg)
        if controls and texts.chunks[0] != texts.chunks[1] and cfg:
            raise SdrtError(
                f"the prompt has {texts.chunks[0]} chunks of 75 tokens and the negative prompt "
                f"{texts.chunks[1]}: with a ControlNet they must have as many (add or remove a BREAK, "
                "or pad them: pad_chunks / pad_cond_uncond)",
                field="negative_prompt",
            )
        rescale = p.guidance_rescale
        if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or not 0 <= rescale <= 1:
            raise SdrtError(f"guidance_rescale must be a number in [0, 1], got {rescale!r}", field="guidance_rescale")
        eta = self._eta(p.eta, sampler)
        req = Request(
            prompts,
            negatives,
            p.steps,
            float(p.guidance),
            height,
            width,
            n,
            seed,
            sampler,
            float(strength),
            init,
            mask_img,
            loras,
            controls,
            self._clip_skip(p),
            texts,
            eta,
            float(rescale),
            bool(self.model.guidance_embedding),
            self._aesthetic(p),
        )
        self.plan(req.sampler, req.steps, req.strength, req.eta)  # what the schedule cannot honour: ScheduleError
        if p.refiner_switch_at is not None:
            return self._handoff(p, req)
        return self._hires(p, req) if p.hires is not None else req

    def _count(self, n: Any, prompts: int) -> int:
        """Images per prompt, within what the engine was exported for."""
        most = self.model.max_images
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or prompts * n > most:
            raise SdrtError(
                f"{prompts} prompt(s) x {n!r} image(s) is outside the engine's 1-{most} images per "
                "call; lower the batch or re-export with a larger --max-batch",
                field="n",
            )
        return n

    def _handoff(self, p: Params, first: Request) -> Request:
        """SDXL base then refiner, as diffusers' documented pair: the base's plan cut at ``refiner_switch_at``
        (``denoising_end``), the refiner's pass begun there (``denoising_start``) on the same latents, with the same
        prompts, seed, sampler, steps and guidance, and the refiner's aesthetic scores."""
        switch = p.refiner_switch_at
        if self.refiner is None:
            raise SdrtError(
                "refiner_switch_at needs a refiner loaded beside the model: Pipeline.load(..., "
                "refiner=DIR) or sdrt serve DIR --refiner DIR",
                field="refiner_switch_at",
            )
        names = (self.refiner.model.name, self.refiner.root.name)
        if p.refiner is not None and p.refiner not in names:
            raise SdrtError(
                f"refiner {p.refiner!r} is not the one loaded beside this model ({names[0]})", field="refiner"
            )
        if not isinstance(switch, (int, float)) or isinstance(switch, bool) or not 0 < switch < 1:
            raise SdrtError(f"refiner_switch_at must be a number in (0, 1), got {switch!r}", field="refiner_switch_at")
        for name, given in (("image", first.image), ("hires", p.hires), ("controlnets", first.control)):
            if given:
                raise SdrtError(f"the refiner hand-off is a txt2img request; it does not take {name}", field=name)
        try:
            self.plan(first.sampler, first.steps, 1.0, first.eta, end=float(switch))
            base = dataclasses.replace(first, end=float(switch))
            placeholder = Image.new("RGB", (first.width, first.height))  # checked as img2img; it starts from latents
            second = self.refiner.request(
                dataclasses.replace(
                    p,
                    image=placeholder,
                    strength=None,
                    loras=None,
                    sampler=first.sampler,
                    seed=first.seed,
                    refiner_switch_at=None,
                    refiner=None,
                )
            )
            second = dataclasses.replace(second, image=None, strength=1.0, begin=float(switch))
            self.refiner.plan(second.sampler, second.steps, 1.0, second.eta, begin=float(switch))
        except ScheduleError as err:
            raise SdrtError(str(err), field=err.field) from None
        return dataclasses.replace(base, refine=second)

    def _hires(self, p: Params, first: Request) -> Request:
        """The web UI's hires fix on a checked txt2img request: its second pass, an img2img `Request` at the
        upscaled size with the hires prompts, guidance, sampler, steps and strength (its init latents or images
        come from the first pass when it runs)."""
        h = p.hires
        if not isinstance(h, Hires):
            raise SdrtError("hires must be a Hires(...) of the hires fix's settings", field="hires")
        if first.image is not None or first.control:
            what = "an init image (img2img, inpainting)" if first.image is not None else "a ControlNet"
            raise SdrtError(
                f"the hires fix is a txt2img second pass; it does not take {what}: leave hires out", field="hires"
            )
        upscaler = check_upscaler(h.upscaler)
        width, height = target_size(first.width, first.height, h)
        field = "hires.scale" if not (h.width or h.height) else "hires.width"
        try:
            height, width = self._size("height", height), self._size("width", width)
        except SdrtError as err:
            raise SdrtError(f"the hires fix's second pass is {width}x{height}: {err}", field=field) from None
        if not isinstance(h.steps, int) or isinstance(h.steps, bool) or h.steps < 0:
            raise SdrtError(
                f"hr_second_pass_steps must be a whole number >= 0 (0: the first pass's steps), got {h.steps!r}",
                field="hires.steps",
            )
        if not isinstance(h.strength, (int, float)) or isinstance(h.strength, bool) or not 0 < h.strength <= 1:
            raise SdrtError(
                f"the hires fix's denoising_strength must be in (0, 1], got {h.strength!r}", field="hires.strength"
            )
        guidance = p.guidance if h.guidance is None else h.guidance
        count = 1 if isinstance(p.prompt, str) else len(p.prompt)  # a hires prompt stands for each prompt
        prompt = p.prompt if h.prompt in (None, "") else h.prompt if count == 1 else [h.prompt] * count
        negative = p.negative_prompt if h.negative_prompt in (None, "") else h.negative_prompt
        second = dataclasses.replace(
            p,
            prompt=prompt,
            negative_prompt=negative,
            steps=h.steps or p.steps,
            guidance=guidance,
            sampler=h.sampler or first.sampler,
            seed=first.seed,
            hires=None,
        )
        try:  # checked as a txt2img at the second pass's size, then made its img2img
            req = self.request(dataclasses.replace(second, height=height, width=width))
        except SdrtError as err:
            hires = ("prompt", "negative_prompt", "sampler", "guidance", "steps")
            raise SdrtError(str(err), field=f"hires.{err.field}" if err.field in hires else err.field) from None
        req = dataclasses.replace(req, strength=float(h.strength))
        try:
            self.plan(req.sampler, req.steps, req.strength, req.eta)
        except ScheduleError as err:
            raise SdrtError(f"the hires fix's second pass: {err}", field="hires.strength") from None
        return dataclasses.replace(first, hires=HiresPass(upscaler, req, h))

    def _texts(self, p: Params, prompts: tuple[str, ...], negatives: tuple, cfg: bool) -> Texts:
        """Tokenize the prompts and negatives as ``p.prompt_syntax`` reads them; every text of one side must have
        as many 75-token chunks, within the engine's range."""
        if p.prompt_syntax not in SYNTAXES:
            raise SdrtError(
                f"unknown prompt syntax {p.prompt_syntax!r}; use {' or '.join(SYNTAXES)}", field="prompt_syntax"
            )
        if p.emphasis not in EMPHASIS:
            raise SdrtError(f"unknown emphasis {p.emphasis!r}; use one of {', '.join(EMPHASIS)}", field="emphasis")
        webui = p.prompt_syntax == "webui"

        def encode(text: str, field: str) -> tuple:
            if not webui:
                return tuple(t.plain(text) for t in self.tokenizers)
            check_webui(text, field)
            return tuple(t.webui(text, p.emphasis, field) for t in self.tokenizers)

        sides = [
            tuple(encode(t, "prompt") for t in prompts),
            tuple(encode(t or "", "negative_prompt") for t in negatives),
        ]
        if webui and p.pad_chunks and cfg:  # the web UI's pad_cond_uncond: empty chunks after the shorter side
            most = max(texts[0][0].count for texts in sides)
            empty = encode("", "prompt")
            sides = [
                tuple(tuple(c.padded(e, most) for c, e in zip(t, empty, strict=True)) for t in texts) for texts in sides
            ]
        most = self.model.max_prompt_chunks
        for texts, field in zip(sides, ("prompt", "negative_prompt"), strict=True):
            counts = {c.count for t in texts for c in t}
            if len(counts) > 1:
                raise SdrtError(
                    f"the {field.replace('_', ' ')}s of one call read as {sorted(counts)} chunks of 75 "
                    "tokens; give them as many chunks (BREAK), or send them as separate calls",
                    field=field,
                )
            if max(counts) > most:
                raise SdrtError(
                    f"the {field.replace('_', ' ')} is {max(counts)} chunks of 75 tokens; this engine "
                    f"takes at most {most}: shorten it, or re-export with --max-prompt-chunks "
                    f"{max(counts)}",
                    field=field,
                )
        return Texts(sides[0], sides[1], p.prompt_syntax, p.emphasis)

    @staticmethod
    def _eta(eta: float | None, sampler: str) -> float:
        """DDIM's eta (default 0); the ancestral samplers (Euler a, DPM++ 2M SDE) take only their own, 1; the other
        samplers have none."""
        if eta is None:
            return 0.0
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta <= 1:
            raise SdrtError(f"eta must be a number in [0, 1], got {eta!r}", field="eta")
        if sampler in ANCESTRAL and eta != 1:
            raise SdrtError(
                f"eta {eta:g} with {sampler}: its noise is eta 1 (as diffusers' scheduler draws it); "
                "use eta 1, or ddim with eta",
                field="eta",
            )
        return float(eta) if sampler == "ddim" else 0.0

    def _aesthetic(self, p: Params) -> tuple[float, float] | None:
        """The refiner's (aesthetic_score, negative_aesthetic_score); None for a U-Net without them, where only
        diffusers' defaults are accepted (a score it cannot read would change nothing)."""
        scores = {"aesthetic_score": p.aesthetic_score, "negative_aesthetic_score": p.negative_aesthetic_score}
        if not self.model.aesthetics:
            if p.refiner_switch_at is not None and self.refiner is not None:
                return None  # the scores are the refiner's
            for name, value in scores.items():
                if value != Params.__dataclass_fields__[name].default:
                    raise SdrtError(
                        f"{name} applies to SDXL refiner directories (requires_aesthetics_score); "
                        f"this model has no aesthetic conditioning: leave it out",
                        field=name,
                    )
            return None
        for name, value in scores.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise SdrtError(f"{name} must be a finite number, got {value!r}", field=name)
        if p.image is None:
            raise SdrtError(
                "this is an SDXL refiner (img2img only, as diffusers' StableDiffusionXLImg2ImgPipeline); "
                "give an init image",
                field="image",
            )
        return float(p.aesthetic_score), float(p.negative_aesthetic_score)

    def _clip_skip(self, p: Params) -> tuple[int, int]:
        """(the prompt's, the negative's) clip skip: diffusers skips layers of the prompt only, the web UI both.
        The web UI's own setting (``webui_clip_skip``, its CLIP_stop_at_last_layers) acts on SD 1.x's CLIP text
        encoder only: its OpenCLIP encoders (SD 2.x) and SDXL's ignore it. sdrt tells them apart as the web UI's
        tokenizers do: OpenCLIP's pads with 0, CLIP's with its end token."""
        skip = p.clip_skip
        if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
            raise SdrtError(f"clip_skip must be a whole number >= 0, got {skip!r}", field="clip_skip")
        if p.webui_clip_skip is not None:
            n = p.webui_clip_skip
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise SdrtError(
                    f"CLIP_stop_at_last_layers must be a whole number >= 1, got {n!r}", field="webui_clip_skip"
                )
            _, eos, pad = self.tokenizers[0].special
            if self.model.family != "sd" or pad != eos:
                n = 1  # the web UI ignores it for this text encoder
            if skip and n > 1:
                raise SdrtError("give clip_skip or the web UI's clip skip setting, not both", field="clip_skip")
            skip = max(skip, n - 1)
        graphs = [self.model.graphs[g] for g in self.model.text_encoders]
        if skip and not all("clip_skip" in g["inputs"] for g in graphs):
            raise SdrtError(
                f"{self.root} was exported before clip skip existed; re-export it to use clip_skip", field="clip_skip"
            )
        most = min((g.get("clip_skips", 1) for g in graphs), default=1) - 1
        if skip > most and p.webui_clip_skip is not None:
            raise SdrtError(
                f"CLIP_stop_at_last_layers {p.webui_clip_skip} is past this text encoder's layers; use 1 to {most + 1}",
                field="webui_clip_skip",
            )
        if skip > most:
            raise SdrtError(f"clip_skip {skip} is past this text encoder's layers; use 0 to {most}", field="clip_skip")
        both = p.prompt_syntax == "webui" or p.webui_clip_skip is not None
        return skip, (skip if both else 0)

    def _images(self, image, mask) -> tuple[Image.Image | None, Image.Image | None]:
        if mask is not None and image is None:
            raise SdrtError("a mask needs the image it masks: give --init-image with --mask", field="mask")
        if self.model.inpainting and mask is None:
            raise SdrtError(
                "this is an inpainting model: give --init-image and --mask (white is repainted)",
                field="image" if image is None else "mask",
            )
        return (open_image(image) if image is not None else None), (open_image(mask, "mask") if mask else None)

    def plan(
        self,
        sampler: str,
        steps: int,
        strength: float,
        eta: float = 0.0,
        end: float | None = None,
        begin: float | None = None,
    ) -> Plan:
        """The host-side sampler plan, computed once per (sampler, steps, strength, eta, end, begin)."""
        key = (sampler, steps, strength, eta, end, begin)
        if key not in self._plans:
            self._plans[key] = make_plan(sampler, self.schedule, steps, strength, eta, end, begin)
        return self._plans[key]

    def default_size(self) -> tuple[int, int]:
        """(height, width) a request without a size gets: the U-Net's native size within the engine's range
        (`Model.default_px`, which `sdrt build` also uses)."""
        return self.model.default_px, self.model.default_px

    def _size(self, what: str, px: int | None) -> int:
        return self.model.check_size(what, self.model.default_px if px is None else px, field=what)

    # -- running requests ----------------------------------------------------------------------------------------

    def generate(self, req: Request, progress: bool = False) -> torch.Tensor:
        """uint8 images [B, H, W, 3] on the CPU."""
        return self.generate_batch([req], progress).pixels[0]

    def generate_batch(self, reqs: list[Request], progress: bool = False) -> Batch:
        """Requests with one `Request.join_key` as one engine batch: uint8 [B_i, H, W, 3] per request, each exactly
        what the request gives alone (its own seed's draws, its own prompts, guidance and init image), with the
        batch's stage timings."""
        layout = Layout.of(reqs)
        if layout.join_key.hires and layout.join_key.hires[0] not in LATENT_UPSCALERS:
            return self._two_passes(reqs, progress)  # an image upscaler: PIL between the passes, on the host
        if layout.images > self.model.max_images:
            raise SdrtError(
                f"{layout.images} images in one batch; this engine takes at most {self.model.max_images}",
                field="n",
            )
        key = layout.join_key
        with self.lock, self.refiner.lock if key.refine else contextlib.nullcontext():
            t0 = time.perf_counter()
            self.adapters.apply(self.backend, key.loras)  # W0 + the request's adapters, from the base every time
            passes = [(self, reqs, key)]  # a second pass (hires fix, refiner) runs in the same body
            if key.hires:
                passes.append((self, [r.hires.second for r in reqs], self._second_key(key)))
            elif key.refine:
                passes.append((self.refiner, [r.refine for r in reqs], self._second_key(key)))
            plans, host = [], {}
            for k, (pipe, rs, pass_key) in enumerate(passes):
                plans.append(
                    pipe.plan(
                        pass_key.sampler, pass_key.steps, pass_key.strength, pass_key.eta, pass_key.end, pass_key.begin
                    )
                )
                latent = (pipe.model.latent_channels, pipe.model.geometry.vae_scale_factor)
                drawn = host_inputs(
                    rs,
                    plans[-1],
                    latent,
                    pipe._encodes_init(pass_key),
                    pipe.model.zero_negatives,
                    pipe.model.guidance_embedding,
                    pipe.model.posterior,
                )
                host.update({f"{'second.' * k}{name}": v for name, v in drawn.items()})
            plan = tuple(p.to(self.device) for p in plans) if len(plans) > 1 else plans[0].to(self.device)
            timings = {"host_prepare_ms": (time.perf_counter() - t0) * 1e3}
            if self.cuda_graph and (not key.refine or self.refiner.cuda_graph):
                pixels = self._captured.replay(self, layout, plan, host, timings)
            else:
                buf = {k: v.to(self.device) for k, v in host.items()}
                work = SamplingBar(sum(len(p.timesteps) for p in plans), progress)
                pixels = self.body(layout, plan, buf, Stages(timings, self.device), work).cpu()
        return Batch(list(pixels.split([r.batch for r in reqs])), timings)

    @staticmethod
    def _second_key(key) -> JoinKey:
        """The join key a second pass runs under, from the first pass's latents: the hires fix's img2img from the
        upscaled latents, or the refiner's pass from the base's."""
        second = key.hires[1] if key.hires else key.refine
        return second._replace(image=True, latents=True)

    def _two_passes(self, reqs: list[Request], progress: bool) -> Batch:
        """The hires fix with an image upscaler: the first passes as one batch, each picture upscaled with PIL on
        the host, then the second passes (img2img at the larger size) as one batch. (With a latent upscaler both
        passes are one body: `body`.) Timings: the second pass's under ``hires_``."""
        upscaler = reqs[0].hires.upscaler
        with self.lock:
            one = self.generate_batch([dataclasses.replace(r, hires=None) for r in reqs], progress)
            seconds = []
            for r, out in zip(reqs, one.pixels, strict=True):
                s = r.hires.second
                images = tuple(upscale_image(Image.fromarray(a), upscaler, s.width, s.height) for a in out.numpy())
                seconds.append(dataclasses.replace(s, image=images[0], images=images))
            two = self.generate_batch(seconds, progress)
        return Batch(two.pixels, {**one.timings_ms, **{f"hires_{k}": v for k, v in two.timings_ms.items()}})

    def _encodes_init(self, key) -> bool:
        """Whether the init image is VAE-encoded: img2img (from an image, not from latents); inpainting at
        strength < 1 or with a 4-channel U-Net."""
        return key.image and not key.latents and (not key.mask or key.strength < 1 or not self.model.inpainting)

    def body(
        self, layout: Layout, plan: Plan | tuple[Plan, Plan], buf: dict[str, torch.Tensor], stage=None, progress=None
    ):
        """The batch, from device buffers to uint8 pixels; no host synchronisation anywhere inside, so that it can
        be captured as one CUDA graph (runtime/capture.py). Structure comes from the layout's join key and the
        engine, never from buffer values. ``stage(name)``: a context around each stage (timing); ``progress``: its
        ``step()`` called per U-Net call. Two-pass requests are two passes here (``plan``: one per pass; the second
        pass's buffers are named ``second.*``), the first ending in latents and the second starting from them on
        the device, so one captured graph holds the whole request: the hires fix with a latent upscaler (the
        latents upscaled between), and the SDXL base then its refiner (the refiner's engines run the second)."""
        stage, key = stage or no_stage, layout.join_key
        if not (key.hires or key.refine):
            return self._pass(key, plan, buf, stage, progress)
        latents = self._pass(key._replace(hires=(), refine=(), to_latents=True), plan[0], buf, stage, progress)
        second, pipe, name = self._second_key(key), self, "hires"
        if key.hires:
            factor = self.model.geometry.vae_scale_factor
            with stage("hires_upscale_ms"):
                latents = upscale_latents(latents, key.hires[0], (second.height // factor, second.width // factor))
        else:
            pipe, name = self.refiner, "refiner"
        feeds = {k.removeprefix("second."): v for k, v in buf.items() if k.startswith("second.")}
        named = stage if stage is no_stage else (lambda s: stage(f"{name}_{s}"))
        return pipe._pass(second, plan[1], {**feeds, "init_latents": latents}, named, progress)

    def _pass(self, key: JoinKey, plan: Plan, buf: dict[str, torch.Tensor], stage, progress) -> torch.Tensor:
        """One pass of `body`: text encoders, start latents, the sampler's loop, then the VAE's pixels (or, with
        ``key.to_latents``, the latents)."""
        with stage("text_encoder_ms"):
            cond = self._conditioning(key.cfg, buf)  # U-Net feeds, [2B or B, ...], uncond rows first
        with stage("start_ms"):
            z = extra = after = None
            if self._encodes_init(key):
                z = self._encode(buf["image"], buf.get("posterior_noise")).index_select(0, buf["image_rows"])
            elif key.latents:  # a second pass: the first pass's latents (upscaled, for the hires fix)
                z = buf["init_latents"]
            if key.begin is not None:  # a refiner's pass: the base's latents as they are, in sigma space
                x = z * plan.in_scale
            else:
                x = start_latents(plan, buf["noise0"], z if key.image and (not key.mask or key.strength < 1) else None)
            if key.mask:
                mask = buf["mask"].index_select(0, buf["image_rows"])  # [B, 1, h, w], 1 = repaint
                if not self.model.inpainting:  # a regular U-Net: blend the kept region back
                    after = inpaint_blend(plan, z, buf["noise0"], mask)
                else:  # an inpainting U-Net reads the mask and the masked image's latents as extra channels
                    masked = self._encode(buf["masked_image"], buf.get("masked_noise"))
                    masked = masked.index_select(0, buf["image_rows"])
                    extra = torch.cat([mask, masked], dim=1)  # [B, 1 + 4, h, w]
                    extra = torch.cat([extra, extra]) if key.cfg else extra
        with stage("denoise_ms"):
            residuals = key.controlnets and Residuals(self.backend, key.controlnets, key.cfg, buf)
            rescale = buf["guidance_rescale"] if key.rescale else None
            if self.model.guidance_embedding:  # a distilled U-Net reads the guidance scale, unguided
                cond = [
                    {**f, "timestep_cond": buf["timestep_cond"].to(self.backend.dtype("unet", "timestep_cond"))}
                    for f in cond
                ]
            denoise = self._denoiser(key.cfg, plan, cond, buf["guidance"], extra, progress, residuals, rescale)
            latents = sample(plan, denoise, x, buf["noise"], after)
        if key.to_latents:
            return latents.float()
        with stage("vae_decoder_ms"):
            images = self.backend.run(
                "vae_decoder", {"latent": latents.to(self.backend.dtype("vae_decoder", "latent"))}
            )
        with stage("to_uint8_ms"):
            # as diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1), then * 255 rounded
            pixels = ((images[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            return pixels.permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]

    def _encode(self, images: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """VAE posterior sample, scaled: (mean + std * noise) * scaling_factor, as diffusers' retrieve_latents;
        without a posterior (TAESD: no noise drawn), the encoder's latents * scaling_factor."""
        out = self.backend.run("vae_encoder", {"images": images.to(self.backend.dtype("vae_encoder", "images"))})
        if not self.model.posterior:
            return out[0].float() * self.model.scaling_factor
        mean, logvar = out
        return (mean.float() + torch.exp(0.5 * logvar.float()) * noise) * self.model.scaling_factor

    def _conditioning(self, cfg: bool, buf: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Text encoders -> the U-Net's conditioning feeds per image row: one feed dict (uncond rows first) when
        prompt and negative have as many chunks, else one per side (negative first), each run as its own U-Net
        call, as the web UI runs them. SDXL: both encoders' states side by side, pooled embedding from the second
        encoder's first chunk, size conditioning in time_ids (the refiner's aesthetic score there differs per side); a
        negative not given is zeros there."""
        dtype, rows = self.backend.dtype, buf["rows"]
        sides = {side: self._encode_text(side, buf) for side in (("negative", "prompt") if cfg else ("prompt",))}
        if cfg and self.model.zero_negatives:  # [P] -> broadcast over each tensor's other axes
            keep = buf["keep_negative"]
            sides["negative"] = [t * keep.view(-1, *[1] * (t.dim() - 1)).to(t.dtype) for t in sides["negative"]]
        per_image = {k: [t.index_select(0, rows) for t in v] for k, v in sides.items()}  # [P, ...] -> [B, ...]
        same = len({v[0].shape[1] for v in per_image.values()}) == 1
        groups = [list(per_image)] if same else [[side] for side in per_image]
        ids = {"prompt": buf["time_ids"], "negative": buf["negative_time_ids"]}  # (they differ for the refiner)
        feeds = []
        for group in groups:
            part = [torch.cat(ts) for ts in zip(*(per_image[side] for side in group), strict=True)]
            f = {"encoder_hidden_states": part[0].to(dtype("unet", "encoder_hidden_states"))}
            if self.model.pooled:
                f["text_embeds"] = part[1].to(dtype("unet", "text_embeds"))
                f["time_ids"] = torch.cat([ids[side] for side in group])
            feeds.append(f)
        return feeds

    def _encode_text(self, side: str, buf: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """[states [P, 77 k, D], (pooled [P, P'])] of one side: each 77-token chunk through each text encoder,
        weighted per token (`emphasised`), joined along the token axis."""
        run, states, pooled = self.backend.run, [], None
        for j, graph in enumerate(self.model.text_encoders):
            suffix = "_2" if j else ""
            ids, weights = buf[f"{side}_ids{suffix}"], buf[f"{side}_weights{suffix}"]  # [k, P, 77], [P, k, 77]
            skip = {"clip_skip": buf[f"{side}_clip_skip"]}
            feeds = skip if graph in self.model.clip_skip else {}
            zs = []
            for c in range(ids.shape[0]):  # the chunk count is part of the join key: fixed for a capture
                if self._vectors:  # where an id is vocab + r, the graph reads row r of the embeddings' table
                    rows = (ids[c].long() - self.embeddings.vocab[j]).clamp(min=0)
                    feeds["embeddings"] = self._vectors[j][rows]  # [P, 77, D]
                out = run(graph, {"input_ids": ids[c], **feeds})
                zs.append(emphasised(out[0].float(), weights[:, c], buf[f"{side}_renorm"]))
                if c == 0 and len(out) > 1:
                    pooled = out[1]
            states.append(torch.cat(zs, dim=1))
        states = torch.cat(states, dim=-1)  # [P, 77 k, D1 + D2]
        return [states, pooled] if self.model.pooled else [states]

    def _denoiser(
        self,
        cfg: bool,
        plan: Plan,
        cond: list[dict[str, torch.Tensor]],
        guidance: torch.Tensor,
        extra,
        progress,
        residuals=None,
        rescale: torch.Tensor | None = None,
    ):
        """The one denoiser contract: sigma-space x at call i -> x0, with guidance and the prediction type inside.
        ``cond``: the conditioning feeds of each U-Net call of a step (`_conditioning`): one call over every row,
        or (prompt and negative of different lengths) the negative's, then the prompt's."""
        sample_dtype, prediction = self.backend.dtype("unet", "sample"), self.schedule.prediction_type
        guidance = guidance.view(-1, 1, 1, 1)  # [B, 1, 1, 1]: each request's own scale
        timesteps = [
            plan.timesteps[:, None].expand(-1, f["encoder_hidden_states"].shape[0]).contiguous() for f in cond
        ]  # [n_calls, rows] per U-Net call
        graph = "unet_controlnet" if residuals else "unet"
        # an inpainting U-Net's extra channels for each call: every row's, or each half's (one side a call)
        extras = [extra] * len(cond) if extra is None or len(cond) == 1 else [extra.chunk(2)[0]] * len(cond)

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            x_in = x * plan.c_in[i]  # diffusers' scale_model_input
            x_in = torch.cat([x_in, x_in]) if cfg and len(cond) == 1 else x_in  # [2B or B, 4, h, w]
            outs = []
            for part, t, more in zip(cond, timesteps, extras, strict=True):
                feeds = {"timestep": t[i], **part}
                if residuals:  # ControlNet: the residuals go to the U-Net graph that takes them
                    feeds.update(residuals(x_in, feeds, i))
                sample_in = torch.cat([x_in, more], dim=1) if more is not None else x_in  # inpainting: 9 channels
                feeds["sample"] = sample_in.to(sample_dtype)
                outs.append(self.backend.run(graph, feeds)[0].float())
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            if cfg:
                uncond, text = out.chunk(2)
                out = uncond + guidance * (text - uncond)
                if rescale is not None:
                    out = rescaled(out, text, rescale)
            if progress is not None:
                progress.step()
            return to_x0(x, out, plan.sigmas[i], prediction)

        return denoise


def _prompts(prompt: Any, negative: Any) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """The prompts as a tuple, and one negative prompt (or None) for each."""
    prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    if not prompts or not all(isinstance(x, str) for x in prompts):
        raise SdrtError("prompt must be a string or a non-empty list of strings", field="prompt")
    negatives = (negative,) * len(prompts) if negative is None or isinstance(negative, str) else tuple(negative)
    if len(negatives) != len(prompts) or not all(isinstance(x, str) for x in negatives if x is not None):
        raise SdrtError(
            f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one string per prompt",
            field="negative_prompt",
        )
    return prompts, negatives


def _seed(seed: Any) -> int:
    """The request's seed, or a random one where none is given."""
    seed = secrets.randbits(63) if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise SdrtError(f"seed must be a whole number in [0, 2^64), got {seed!r}", field="seed")
    return seed


def rescaled(guided: torch.Tensor, text: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """diffusers' rescale_noise_cfg (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", sec. 3.4): the guided prediction [B, C, h, w] scaled to the text prediction's std per row, mixed with
    the plain guided one by ``factor`` [B] (0: unchanged)."""
    dims = list(range(1, guided.dim()))
    std_ratio = text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    f = factor.view(-1, *[1] * (guided.dim() - 1))
    return f * (guided * std_ratio) + (1 - f) * guided


def emphasised(z: torch.Tensor, weights: torch.Tensor, renorm: torch.Tensor) -> torch.Tensor:
    """The web UI's emphasis on one chunk's states z [P, 77, D]: each token's states times its weight [P, 77];
    where renorm [P] is 1 ("Original"), the result rescaled to the mean z had before (all weights 1: z unchanged)."""
    before = z.mean(dim=(1, 2))
    z = z * weights.to(z.dtype)[..., None]
    after = z.mean(dim=(1, 2))
    # a mean of exactly 0 (states normalised without a bias) is left as it is rather than made 0 / 0
    ratio = torch.where((renorm > 0) & (after != 0), before / torch.where(after != 0, after, 1), 1.0)
    return z * ratio.view(-1, 1, 1)
