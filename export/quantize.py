"""`sdrt quantize DIR`: the U-Net as an INT8 OpenVINO model for the CPU (`--cpu-int8`), quantized by NNCF.

Three modes, all of the graph OpenVINO reads from unet.onnx:
- ``hybrid`` (default; what optimum-intel does for diffusion U-Nets): the MatMul weights (linear layers, attention
  projections) compressed to INT8 per output channel and dequantized as they are read, their activations left in
  float; the Convolutions quantized fully, weights and activations, with activation ranges from calibration
  (`nncf.quantize`, transformer patterns, SmoothQuant off). The calibration data is the U-Net's inputs at every
  call of sdrt's own pipeline on OpenVINO at f32, over a fixed list of ordinary prompts at one size;
- ``full``: every MatMul and Convolution INT8 in weights and activations, the attention's activation products too
  (`nncf.quantize`, transformer patterns, NNCF's SmoothQuant on the MatMuls), calibrated as hybrid: the fastest on a
  CPU with VNNI or AMX, a little further from the fp32 picture than hybrid;
- ``weights``: every MatMul and Convolution weight compressed to INT8, activations in float (`nncf.compress_weights`;
  no calibration).
The model is written as unet.int8.xml / .bin in a hidden folder inside DIR and renamed into place, then recorded in
the manifest (runtime/int8.py): a failure or an interrupt leaves DIR as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.int8 import BIN, ENTRY, MODES, XML, unet_hashes
from sdrt.runtime.manifest import check_files, hash_files, read_manifest, write_manifest
from sdrt.runtime.model import Model
from sdrt.runtime.params import Params

log = logging.getLogger("sdrt")
# ordinary requests of several kinds (people, animals, places, objects, styles), cycled over --prompts
PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a cozy living room with a fireplace, warm light, interior design",
    "portrait of an old fisherman, weathered face, dramatic lighting",
    "a bowl of ramen with a soft-boiled egg, food photography",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a red sports car on a mountain road at sunset",
    "a cat sleeping on a windowsill, soft morning light",
    "futuristic city skyline at night, neon lights, rain",
    "a medieval castle on a hill, oil painting",
    "a golden retriever puppy playing in the grass",
    "close-up of a dew-covered spider web, macro photography",
    "an astronaut floating above the earth, digital art",
    "a bustling market street in Marrakech, vivid colors",
    "a snowy pine forest under the northern lights",
    "still life of fruit and a wine bottle on a table, classical painting",
    "a young woman reading a book in a cafe, film photo",
    "an isometric illustration of a tiny island with a house",
    "a steam locomotive crossing a stone bridge, black and white photo",
    "a field of sunflowers under a blue sky",
    "a robot chef cooking in a modern kitchen, 3d render",
    "ancient greek temple ruins at dawn",
    "a hummingbird drinking from a red flower, high detail",
    "a pencil sketch of a city street with people",
    "underwater coral reef with tropical fish",
    "a wooden cabin by a lake, autumn colors, reflections",
    "a bowl of colorful macarons on a marble counter",
    "a knight in shining armor, fantasy concept art",
    "a desert landscape with sand dunes and a camel caravan",
    "an owl perched on a branch at night, moonlight",
    "a vintage typewriter on a desk, shallow depth of field",
    "a tall glass skyscraper reflecting clouds",
    "children flying kites on a beach, summer day",
)
NEGATIVE = "blurry, low quality, watermark"  # on every other prompt: both kinds of unguided half are seen


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str = "hybrid"  # "hybrid", "full" or "weights" (MODES)
    # calibration (hybrid) costs ~2.2 U-Net calls per call recorded (the run, then NNCF's statistics pass: measured
    # on tiny-sd1 at 256 px); 4 prompts x 10 steps record 44, an estimated 20-30 min for sd15 at 512 px on 2 AVX2
    # cores (README); prompts count for more than steps (tiny-sd1: 4 x 10 within 0.6 dB of 8 x 20)
    prompts: int = 4  # calibration requests: PROMPTS cycled, seeds seed, seed + 1, ...
    steps: int = 10  # sampler steps of each (the checkpoint's own sampler, guidance 7.5)
    size: int | None = None  # px, square; None: the model's default size, at most 512 (as optimum-intel)
    seed: int = 0
    force: bool = False  # replace an INT8 U-Net the directory already has


def import_nncf() -> tuple[Any, Any]:
    try:
        import nncf
        import openvino
    except ImportError as err:
        raise SdrtError(
            f"sdrt quantize needs OpenVINO and NNCF ({err.name} is missing): pip install 'sdrt[openvino]'"
        ) from None
    nncf.set_log_level(logging.ERROR)  # its per-layer INFO lines; the progress bars stay
    return openvino, nncf


def check_request(root: Path, manifest: dict[str, Any], opts: QuantizeOptions) -> int:
    """Everything that would make the run fail late, refused first; returns the calibration size in px."""
    if opts.mode not in MODES:
        raise SdrtError(f"unknown mode {opts.mode!r}; use {' or '.join(MODES)}")
    if manifest["precision"] != "fp32":
        raise SdrtError(
            f"{root} is a {manifest['precision']} export; quantize the fp32 one, which the CPU runs: "
            f"`sdrt export MODEL DIR --precision fp32`"
        )
    if ENTRY in manifest and not opts.force:
        raise SdrtError(f"{root} already has an INT8 U-Net ({manifest[ENTRY]['mode']}); pass --force to make it again")
    if opts.prompts < 1 or opts.steps < 1:
        raise SdrtError(f"--prompts and --steps must be >= 1, got {opts.prompts} and {opts.steps}")
    problems = check_files(root, manifest, manifest["graphs"]["unet"]["files"])
    if problems:
        raise SdrtError(f"{root}: {'; '.join(problems)}; re-export it with `sdrt export ... {root} --force`")
    model = Model.from_manifest(manifest, root)
    m = model.px_multiple
    return model.check_size("--size", opts.size or max(min(model.default_px, 512 // m * m), model.min_px))


def calibration_params(manifest: dict[str, Any], i: int, opts: QuantizeOptions, px: int) -> Params:
    """Calibration request ``i``: a prompt of the list, its own seed; an inpainting U-Net or an SDXL refiner (which
    take images) starts from a seeded smooth picture, the inpainting one with its centre masked."""
    extra: dict[str, Any] = {}
    model = Model.from_manifest(manifest)
    inpainting = model.inpainting
    if inpainting or model.aesthetics:
        colours = np.random.default_rng(opts.seed + i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        extra["image"] = Image.fromarray(colours).resize((px, px), Image.BICUBIC)
    if inpainting:
        mask = np.zeros((px, px), np.uint8)
        mask[px // 4 : 3 * px // 4, px // 4 : 3 * px // 4] = 255
        extra["mask"] = Image.fromarray(mask)
    return Params(
        prompt=PROMPTS[i % len(PROMPTS)],
        negative_prompt=NEGATIVE if i % 2 else None,
        steps=opts.steps,
        height=px,
        width=px,
        seed=opts.seed + i,
        **extra,
    )


def calibration_inputs(root: Path, manifest: dict[str, Any], opts: QuantizeOptions, px: int) -> list[dict]:
    """The U-Net's inputs at every call of ``opts.prompts`` requests on OpenVINO at f32: {input name: array}."""
    from sdrt.runtime.pipeline import Pipeline

    samples: list[dict[str, np.ndarray]] = []
    with Pipeline.load(root, backend="openvino", device="cpu", cpu_precision="f32") as pipe:
        run = pipe.backend.run

        def recorded(graph: str, feeds: dict) -> tuple:
            if graph == "unet":  # sample, timestep, encoder_hidden_states and whatever else the graph takes
                samples.append({name: x.contiguous().numpy().copy() for name, x in feeds.items()})
            return run(graph, feeds)

        pipe.backend.run = recorded
        for i in range(opts.prompts):
            pipe.generate(pipe.request(calibration_params(manifest, i, opts, px)))
            log.info("calibration: %d/%d requests, %d U-Net calls", i + 1, opts.prompts, len(samples))
    return samples


def weighted_matmuls(model: Any) -> list[str]:
    """The names of the MatMuls that multiply by a constant (a weight, possibly converted, reshaped or transposed)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in range(op.get_input_size()):
            node = op.input_value(port).get_node()
            while node.get_type_name() in ("Convert", "Reshape", "Transpose"):
                node = node.input_value(0).get_node()
            if node.get_type_name() == "Constant":
                names.append(op.get_friendly_name())
                break
    return names


def quantized(nncf: Any, model: Any, mode: str, samples: list[dict]) -> Any:
    """The model quantized by NNCF in ``mode`` (module docstring)."""
    int8 = nncf.CompressWeightsMode.INT8_ASYM
    if mode == "weights":
        return nncf.compress_weights(model, mode=int8)
    if mode == "full":
        transformer = nncf.ModelType.TRANSFORMER
        return nncf.quantize(model, nncf.Dataset(samples), model_type=transformer, subset_size=len(samples))
    matmuls = weighted_matmuls(model)  # named before compression inserts the dequantizing ops
    model = nncf.compress_weights(model, mode=int8, ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    no_smoothing = nncf.AdvancedSmoothQuantParameters(matmul=-1)  # MatMul activations stay float: nothing to smooth
    return nncf.quantize(
        model,
        nncf.Dataset(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(samples),
        ignored_scope=nncf.IgnoredScope(names=matmuls),
        advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alphas=no_smoothing),
    )


def quantize_directory(root: str | os.PathLike, opts: QuantizeOptions) -> dict[str, Any]:
    """Quantize DIR's U-Net and record it; returns the manifest entry and the seconds each phase took."""
    ov, nncf = import_nncf()
    root = Path(root)
    manifest = read_manifest(root)
    px = check_request(root, manifest, opts)
    t0 = time.perf_counter()
    samples = calibration_inputs(root, manifest, opts, px) if opts.mode != "weights" else []
    t1 = time.perf_counter()
    stage = root / f".{ENTRY}.partial-{os.getpid()}"
    try:
        stage.mkdir()
        model = ov.Core().read_model(str(root / manifest["graphs"]["unet"]["file"]))
        try:
            model = quantized(nncf, model, opts.mode, samples)
        except Exception as err:  # NNCF raises its own and OpenVINO's types; the first line says what
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            fix = "try --mode weights" if opts.mode != "weights" else "run the U-Net in f32 (leave out --cpu-int8)"
            raise SdrtError(f"NNCF {nncf.__version__} cannot quantize {root}/unet.onnx ({first}); {fix}") from None
        ov.save_model(model, str(stage / XML), compress_to_fp16=False)
        hashes = hash_files(stage, [XML, BIN])
        versions = {"nncf": nncf.__version__, "openvino": ov.__version__}
        entry = {
            "files": sorted(hashes),
            "mode": opts.mode,
            **_calibration(opts, px, len(samples)),
            **versions,
            "unet_sha256": unet_hashes(manifest),
        }
        _install(root, manifest, stage, hashes, entry)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {**entry, "calibration_s": t1 - t0, "quantize_s": time.perf_counter() - t1}


def _calibration(opts: QuantizeOptions, px: int, samples: int) -> dict[str, Any]:
    if opts.mode == "weights":  # data-free
        return {"prompts": None, "steps": None, "size": None, "seed": None, "samples": 0}
    return {"prompts": opts.prompts, "steps": opts.steps, "size": px, "seed": opts.seed, "samples": samples}


def _install(root: Path, manifest: dict[str, Any], stage: Path, hashes: dict[str, str], entry: dict) -> None:
    """Rename the staged files into DIR and record them. An INT8 U-Net already there is unlisted first: a crash
    in between leaves unlisted files, which nothing reads, never listed ones that differ from their hash."""
    if manifest.pop(ENTRY, None) is not None:
        for name in hashes:
            manifest["files"].pop(name, None)
        write_manifest(root, manifest)
    for name in hashes:
        os.replace(stage / name, root / name)
    manifest[ENTRY] = entry
    manifest["files"] = dict(sorted({**manifest["files"], **hashes}.items()))
    write_manifest(root, manifest)
