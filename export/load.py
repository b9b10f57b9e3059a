"""Checkpoint → diffusers/transformers modules, offline: a preset, a diffusers folder, or one .safetensors file.

Loading is diffusers' own (`from_pretrained`, `from_single_file`); this module only decides which source a
string names, refuses pickle files unless asked, and records where the weights came from.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdrt.export.presets import PRESETS, Family, Preset, family_of_index, family_of_pipeline, get_preset
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import sha256_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_PICKLE_HINT = "pickle files can run arbitrary code; convert it to .safetensors, or pass --allow-pickle if you trust it"


@dataclass
class Components:
    """The modules of one Stable Diffusion pipeline, in fp32 eval mode, plus where they came from."""

    family: Family
    unet: Any
    vae: Any
    text_encoders: dict[str, Any]  # "text_encoder"(, "text_encoder_2") -> CLIPTextModel(WithProjection)
    tokenizers: dict[str, Any]  # "tokenizer"(, "tokenizer_2") -> CLIPTokenizer
    scheduler: Any
    source: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # model_index.json's pipeline options (SDXL's zeroing)
    vae_fp16: bool | None = None  # None: the family's rule; True for a VAE the user says is fp16-safe (--vae)
    # load_model(defer=True): the U-Net and VAE are weightless placeholders until this is called
    deferred: Callable[[], None] | None = None

    def to_diffusers(self) -> Any:
        """The matching diffusers pipeline over the same modules (for saving, and as the reference)."""
        import diffusers

        name = self.family.pipeline_classes[0]
        parts: dict[str, Any] = dict(self.text_encoders, **self.tokenizers)
        if self.family.name == "sd":
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            parts.update(force_zeros_for_empty_prompt=self.zero_negatives)
            if "text_encoder" not in self.text_encoders:  # the refiner
                parts.update(text_encoder=None, tokenizer=None, requires_aesthetics_score=self.aesthetics)
        return getattr(diffusers, name)(unet=self.unet, vae=self.vae, scheduler=self.scheduler, **parts)

    @property
    def zero_negatives(self) -> bool:
        """SDXL's force_zeros_for_empty_prompt: an unset negative prompt conditions on zeros (diffusers' default)."""
        return self.family.pooled_from is not None and bool(self.options.get("force_zeros_for_empty_prompt", True))

    @property
    def aesthetics(self) -> bool:
        """SDXL img2img's requires_aesthetics_score (the refiner's): time ids end in an aesthetic score."""
        return bool(self.options.get("requires_aesthetics_score", False))


def load_model(
    model: str,
    *,
    allow_pickle: bool = False,
    config: str | None = None,
    seed: int | None = None,
    vae: str | None = None,
    defer: bool = False,
) -> Components:
    """Dispatch on what ``model`` names: a preset, a diffusers folder, or a single checkpoint file; ``vae``
    replaces its VAE with a diffusers VAE folder (`VAE_CLASSES`) the user vouches for in fp16.

    ``defer``: load only the text encoders now; the U-Net and VAE are weightless (meta-device) placeholders with
    their real configs until ``deferred()`` loads their weights into them, so an export can trace and free the
    text encoders before the U-Net exists (SDXL: 3.3 GB + 10.6 GB float32 never at once). Single files load at once.
    """
    check_model_arg(model)
    if vae is not None:
        vae_config(Path(vae))  # refused before the model loads
    if model in PRESETS:
        preset = get_preset(model)
        c = components_from_preset(preset, preset.seed if seed is None else seed, defer=defer)
    elif Path(model).is_dir():
        c = components_from_folder(Path(model), allow_pickle=allow_pickle, defer=defer)
    else:
        c = components_from_single_file(Path(model), config=config, allow_pickle=allow_pickle)
    return with_vae(c, Path(vae)) if vae is not None else c


# --vae: the VAE classes diffusers' Stable Diffusion pipelines drive, and what sdrt exports of each
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")  # AutoencoderTiny: TAESD, encode(...).latents, no distribution


def vae_config(folder: Path) -> dict[str, Any]:
    """The config.json of a --vae folder, refused in one line unless its `_class_name` is in `VAE_CLASSES`."""
    path = folder / "config.json"
    if not path.is_file():
        raise SdrtError(f"--vae {folder}: not a diffusers VAE folder (config.json and .safetensors weights)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SdrtError(f"--vae {path} is damaged ({err})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in VAE_CLASSES:
        said = f"is a {name}" if isinstance(name, str) else "names no _class_name in its config.json"
        raise SdrtError(f"--vae {folder} {said}; sdrt exports {' and '.join(VAE_CLASSES)} (TAESD) VAE folders")
    return config


def with_vae(c: Components, folder: Path) -> Components:
    """``c`` with the VAE from ``folder`` (an fp16-safe SDXL VAE, or TAESD), exported in fp16 like the rest."""
    import diffusers

    config = vae_config(folder)
    if not any(folder.glob("*.safetensors")):
        raise SdrtError(f"--vae {folder} has no .safetensors weights; convert them, pickle files are not loaded")
    channels, unet = config.get("latent_channels", 4), c.unet.config.out_channels
    if channels != unet:
        raise SdrtError(
            f"--vae {folder} makes {channels}-channel latents, the U-Net denoises {unet}: "
            "give a VAE made for this model's latent space"
        )
    if config["_class_name"] == "AutoencoderTiny":
        _check_tiny_scales(folder, config)
    cls = getattr(diffusers, config["_class_name"])
    try:
        c.vae = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise SdrtError(f"--vae {folder}: cannot load the VAE ({str(err).splitlines()[0]})") from None
    c.vae.float().eval()
    c.vae_fp16 = True
    c.source = {**c.source, "vae": {"path": str(folder.resolve()), "sha256": _folder_hashes(folder)}}
    return c


def _check_tiny_scales(folder: Path, config: dict[str, Any]) -> None:
    """A TAESD whose encoder, decoder and diffusers' vae_scale_factor (2 ** (decoder blocks - 1)) agree on the
    pixels per latent, so that its images have the size the pipeline asks for."""
    enc, dec = (len(config.get(f"{k}_block_out_channels", (64,) * 4)) for k in ("encoder", "decoder"))
    scales = {2 ** (enc - 1), config.get("upsampling_scaling_factor", 2) ** (dec - 1), 2 ** (dec - 1)}
    if len(scales) > 1:
        raise SdrtError(
            f"--vae {folder}: this AutoencoderTiny's encoder and decoder scale images differently "
            f"({sorted(scales)} pixels per latent); diffusers' pipelines assume one factor"
        )


class SourceMissing(SdrtError):
    """The checkpoint an engine directory was exported from is not on this machine."""


def components_from_source(source: dict[str, Any]) -> Components:
    """Rebuild the modules an engine directory came from (its manifest's "source"), checking that every file
    still hashes as it did at export; SourceMissing where the files are gone."""
    kind = source.get("kind")
    if kind == "preset":
        c = components_from_preset(get_preset(source["name"]), int(source["seed"]))
    elif kind in ("diffusers", "single_file"):
        path = Path(source["path"])
        if not path.exists():
            raise SourceMissing(f"source {path} is not available")
        c = (
            components_from_folder(path)
            if kind == "diffusers"
            else components_from_single_file(path, config=source.get("config"))
        )
        if c.source.get("sha256") != source.get("sha256"):
            raise SdrtError(
                f"source {path} has changed since the export (SHA-256 differs); re-run `sdrt export ... --force`"
            )
    else:
        raise SdrtError(f"the manifest's source kind {kind!r} is unknown")
    if "vae" in source:
        folder = Path(source["vae"]["path"])
        if not folder.exists():
            raise SourceMissing(f"source VAE {folder} is not available")
        c = with_vae(c, folder)
        if c.source["vae"]["sha256"] != source["vae"]["sha256"]:
            raise SdrtError(f"source VAE {folder} has changed since the export (SHA-256 differs); re-export")
    if source.get("loras"):  # adapters fused at export (`sdrt export --lora`): fused again, from the same files
        from sdrt.export.lora import fuse_loras

        for entry in source["loras"]:
            file = Path(entry["path"])
            if not file.is_file():
                raise SourceMissing(f"fused LoRA {file} is not available")
            if sha256_file(file) != entry["sha256"]:
                raise SdrtError(f"fused LoRA {file} has changed since the export (SHA-256 differs); re-export")
        c = fuse_loras(c, [(entry["path"], entry["scale"]) for entry in source["loras"]])
    return c


def check_model_arg(model: str) -> None:
    """Fail fast, before anything slow starts, when ``model`` names nothing."""
    if model not in PRESETS and not Path(model).exists():
        raise SdrtError(
            f"{model}: no such preset, folder or file; presets are {', '.join(PRESETS)}, "
            "or give a diffusers folder or a .safetensors file"
        )


# -- presets -----------------------------------------------------------------------------------------------


def byte_level_clip_tokenizer(pad_token: str) -> Any:
    """A CLIP tokenizer whose vocabulary is CLIP's 512 byte-level symbols and its two special tokens.

    It splits text exactly as CLIP's pre-tokenizer does but has no merges (CLIP's 48,894 merges cannot be
    downloaded here); a real checkpoint always brings its own tokenizer.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def components_from_preset(preset: Preset, seed: int, defer: bool = False) -> Components:
    """Build the preset's modules with weights drawn from ``torch.manual_seed(seed)``, in a fixed order (text
    encoders, U-Net, VAE; ``defer``: the U-Net and VAE later, from the generator's state after the encoders)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoders, tokenizers = {}, {}
    for i, spec in enumerate(preset.text_encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        tok = byte_level_clip_tokenizer(spec.pad_token)
        cfg = CLIPTextConfig(
            **spec.config,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
        text_encoders["text_encoder" + suffix] = cls(cfg).eval()
        tokenizers["tokenizer" + suffix] = tok
    state = torch.get_rng_state()

    def build() -> tuple[Any, Any]:
        torch.set_rng_state(state)
        return diffusers.UNet2DConditionModel(**preset.unet).eval(), diffusers.AutoencoderKL(**preset.vae).eval()

    (unet, vae), deferred = _maybe_deferred(build, build, defer)
    sched_cls, sched_cfg = preset.scheduler
    scheduler = getattr(diffusers, sched_cls).from_config(sched_cfg)  # keeps keys other schedulers read
    source = {"kind": "preset", "name": preset.name, "seed": seed}
    return Components(preset.family, unet, vae, text_encoders, tokenizers, scheduler, source, deferred=deferred)


def _maybe_deferred(
    shapes: Callable[[], tuple[Any, ...]], weights: Callable[[], tuple[Any, ...]], defer: bool
) -> tuple[tuple[Any, ...], Callable[[], None] | None]:
    """The modules ``weights`` builds; or, deferred, weightless placeholders ``shapes`` builds on the meta device
    and the function that later gives them ``weights``' tensors (in place: whatever wraps a placeholder sees them)."""
    if not defer:
        return weights(), None
    with torch.device("meta"):
        placeholders = shapes()

    def load() -> None:
        for placeholder, real in zip(placeholders, weights(), strict=True):
            name = type(real).__name__
            a, b = ({k: v for k, v in m.config.items() if not k.startswith("_")} for m in (placeholder, real))
            changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))  # added or dropped keys too
            if changed:  # sizes and graphs were decided from the placeholder's config
                raise SdrtError(
                    f"{name}: loading changes its config ({changed[0]}), so sdrt cannot load it in stages; "
                    "please report this with the model's config.json"
                )
            placeholder.load_state_dict(real.state_dict(), strict=True, assign=True)
            left = [n for n, t in (*placeholder.named_parameters(), *placeholder.named_buffers()) if t.is_meta]
            if left:
                raise SdrtError(f"{name}: {left[0]} has no value after loading in stages; please report this")
            del real

    return placeholders, load


# -- diffusers folders --------------------------------------------------------------------------------------


def _read_model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise SdrtError(
            f"{folder} is not a Stable Diffusion pipeline folder (no model_index.json); "
            "give a diffusers folder, a .safetensors file or a preset name"
        )
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise SdrtError(f"{index} is damaged ({err})") from None


def _weights_format(folder: Path, component: str, allow_pickle: bool) -> bool:
    """True to load safetensors; refuses a component stored only as a pickle unless allowed."""
    sub = folder / component
    if not sub.is_dir():
        raise SdrtError(f"{folder} has no {component}/ folder; the pipeline folder is incomplete")
    if any(sub.glob("*.safetensors")):
        return True
    if any(sub.glob("*.bin")) or any(sub.glob("*.ckpt")):
        if allow_pickle:
            return False
        raise SdrtError(f"{sub} holds only pickle weights (.bin); {_PICKLE_HINT}")
    raise SdrtError(f"{sub} has no weights (.safetensors); the pipeline folder is incomplete")


def _folder_hashes(folder: Path) -> dict[str, str]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".safetensors", ".bin")]
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(files)}


def components_from_folder(folder: Path, *, allow_pickle: bool = False, defer: bool = False) -> Components:
    import diffusers
    import transformers

    index = _read_model_index(folder)
    family = family_of_index(index)
    kw = dict(local_files_only=True)
    safe = {c: _weights_format(folder, c, allow_pickle) for c in ("unet", "vae", *family.text_encoders)}
    classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}

    def shapes() -> tuple[Any, ...]:
        return tuple(cls.from_config(cls.load_config(folder, subfolder=n, **kw)) for n, cls in classes.items())

    def weights() -> tuple[Any, ...]:
        with _load_errors(folder):
            loaded = [
                cls.from_pretrained(folder, subfolder=n, use_safetensors=safe[n], **kw) for n, cls in classes.items()
            ]
        return tuple(m.float().eval() for m in loaded)

    with _load_errors(folder):
        (unet, vae), deferred = _maybe_deferred(shapes, weights, defer)
        text_encoders, tokenizers = {}, {}
        for name in family.text_encoders:
            cls = getattr(transformers, index[name][1])  # e.g. ["transformers", "CLIPTextModel"]
            text_encoders[name] = cls.from_pretrained(folder, subfolder=name, use_safetensors=safe[name], **kw)
            tok = name.replace("text_encoder", "tokenizer")
            tokenizers[tok] = transformers.CLIPTokenizer.from_pretrained(folder, subfolder=tok, **kw)
        sched_cls = getattr(diffusers, index["scheduler"][1])
        scheduler = sched_cls.from_pretrained(folder, subfolder="scheduler", **kw)
    for m in (unet, vae, *text_encoders.values()):
        m.float().eval()
    source = {"kind": "diffusers", "path": str(folder.resolve()), "sha256": _folder_hashes(folder)}
    return Components(
        family, unet, vae, text_encoders, tokenizers, scheduler, source, _options(index), deferred=deferred
    )


@contextlib.contextmanager
def _load_errors(folder: Path):
    """diffusers' and transformers' loading errors as one line naming the folder."""
    try:
        yield
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise SdrtError(f"{folder}: cannot load the pipeline ({str(err).splitlines()[0]})") from None


def _options(index: dict[str, Any]) -> dict[str, Any]:
    return {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in index}


# -- single checkpoint files ----------------------------------------------------------------------------------


def _single_file_family(path: Path, config: str | None) -> Family:
    if config is not None:
        return family_of_pipeline(_read_model_index(Path(config)).get("_class_name", "?"))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise SdrtError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return family_of_pipeline("StableDiffusionXLPipeline")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):  # OpenCLIP alone: SDXL's refiner
        raise SdrtError(
            f"{path} is an SDXL refiner checkpoint, which sdrt reads as a diffusers folder only; convert it "
            "(StableDiffusionXLImg2ImgPipeline.from_single_file(...).save_pretrained(DIR)) and export DIR"
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return family_of_pipeline("StableDiffusionPipeline")
    raise SdrtError(f"{path} does not look like a Stable Diffusion checkpoint (no model.diffusion_model.* keys)")


def components_from_single_file(path: Path, *, config: str | None = None, allow_pickle: bool = False) -> Components:
    """Load one original-layout checkpoint through diffusers' single-file loader.

    The file holds weights only: the pipeline's configs and tokenizer come from ``config`` (a diffusers folder of
    the same architecture) or, without it, from the Hugging Face cache, never from the network.
    """
    import diffusers

    pickle = path.suffix in PICKLE_SUFFIXES
    if pickle and not allow_pickle:
        raise SdrtError(f"{path} is a pickle checkpoint; {_PICKLE_HINT}")
    if not pickle and path.suffix != ".safetensors":
        raise SdrtError(f"{path}: unknown checkpoint format; give a .safetensors file or a diffusers folder")
    family = _single_file_family(path, config) if not pickle else family_of_pipeline("StableDiffusionPipeline")
    cls = getattr(diffusers, family.pipeline_classes[0])
    extra = (
        dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) if family.name == "sd" else {}
    )
    try:
        pipe = cls.from_single_file(str(path), config=config, local_files_only=True, **extra)
    except Exception as err:  # diffusers raises many types here; all mean "cannot load this file"
        hint = (
            ""
            if config
            else "; pass --config DIR (a diffusers folder of the same architecture, for its configs and tokenizer)"
        )
        raise SdrtError(f"{path}: cannot load as a single-file checkpoint ({str(err).splitlines()[0]}){hint}") from None
    for m in (pipe.unet, pipe.vae, *(getattr(pipe, n) for n in family.text_encoders)):
        m.float().eval()
    source = {"kind": "single_file", "path": str(path.resolve()), "sha256": sha256_file(path), "config": config}
    return Components(
        family,
        pipe.unet,
        pipe.vae,
        {n: getattr(pipe, n) for n in family.text_encoders},
        {
            n.replace("text_encoder", "tokenizer"): getattr(pipe, n.replace("text_encoder", "tokenizer"))
            for n in family.text_encoders
        },
        pipe.scheduler,
        source,
        _options(_read_model_index(Path(config))) if config else {},
    )
