"""The CPU peers of `sdrt bench`, in their own interpreter: optimum-intel's ``OVDiffusionPipeline`` or OpenVINO
GenAI's ``Text2ImagePipeline`` over one OpenVINO IR folder (``optimum-cli export openvino``).

optimum-intel pins an older transformers than sdrt's, so the peers live in a venv of their own (`make cpu-peers`)
and this file is run by that venv's Python, by path: it imports neither sdrt nor anything outside that venv.

Protocol: one JSON command per line on stdin, one JSON answer per line on the original stdout (anything the
libraries print goes to stderr). Every answer has ``ok``; a failed command answers ``{"ok": false, "error": ...}``.

    {"cmd": "load", "kind": "optimum-intel" | "optimum-intel-int8" | "openvino-genai", "ir_dir": PATH}
                                                                                     -> {"ok", "describe"}
    {"cmd": "prepare", "prompt", "negative", "steps", "guidance", "height", "width", "n", "seed", "sampler",
     "scheduler": diffusers class, "config": its whole config}                       -> {"ok", "describe"}
    {"cmd": "run"}                       -> {"ok", "ms": the worker's own wall time, "path": .npy of uint8 [B,H,W,3]}
    {"cmd": "close"}                     -> {"ok"}, then exit

``python peer_worker.py --probe`` prints the installed kinds and versions as one JSON line and exits;
``python peer_worker.py --quantize IR DEST --prompts FILE --samples N`` writes to DEST the IR's pipeline with
optimum-intel's INT8 hybrid quantization (the U-Net's MatMul weights INT8 and its Convolutions fully INT8,
calibrated on N U-Net calls of its own pipeline over the JSON list of prompts in FILE; the other models' weights
INT8), what `optimum-intel-int8` loads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS = {  # kind -> distribution it needs
    "optimum-intel": "optimum-intel",
    "optimum-intel-int8": "optimum-intel",  # the same pipeline over its own INT8 (hybrid) IR
    "openvino-genai": "openvino-genai",
}
VERSIONS = (
    "optimum-intel",
    "optimum",
    "openvino",
    "openvino-genai",
    "openvino-tokenizers",
    "nncf",
    "diffusers",
    "transformers",
    "torch",
)
# diffusers scheduler class -> OpenVINO GenAI's Scheduler.Type, for the classes GenAI implements (with no options
# beyond the checkpoint's config: a sampler with fixed options, Karras sigmas say, has no GenAI equivalent)
GENAI_SCHEDULERS = {
    "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "EULER_DISCRETE",
    "EulerAncestralDiscreteScheduler": "EULER_ANCESTRAL_DISCRETE",
    "LCMScheduler": "LCM",
    "PNDMScheduler": "PNDM",
}
# options GenAI 2026.4's schedulers refuse when set (at the first run, "Parameter '...' is not supported")
GENAI_REFUSES = (
    "clip_sample",
    "thresholding",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_dynamic_shifting",
)


def genai_refusal(scheduler: str, config: dict[str, Any]) -> str | None:
    """Why OpenVINO GenAI cannot run diffusers' ``scheduler`` with ``config`` as diffusers would, or None."""
    if scheduler not in GENAI_SCHEDULERS:
        return f"OpenVINO GenAI has no {scheduler}"
    unsupported = [f"{key}=True" for key in GENAI_REFUSES if config.get(key)]
    if unsupported:
        return f"OpenVINO GenAI's {GENAI_SCHEDULERS[scheduler]} scheduler does not implement {', '.join(unsupported)}"
    return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def probe() -> dict[str, Any]:
    found = versions()
    return {"kinds": [k for k, dist in KINDS.items() if found[dist]], "versions": found}


def prop(value: Any) -> str:
    """An OpenVINO property as text: an element type as OpenVINO spells it (f32, bf16), an enum by its name."""
    if hasattr(value, "to_string"):
        return value.to_string()
    return str(getattr(value, "name", value))


def to_uint8(images: Any) -> np.ndarray:
    """[B, H, W, 3] floats in [0, 1] -> uint8, as diffusers' ``numpy_to_pil`` rounds."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


class OptimumIntel:
    """optimum-intel's pipeline; the scheduler is diffusers' own class, as the bench's baseline sets it."""

    def __init__(self, ir_dir: str):
        from optimum.intel import OVDiffusionPipeline

        self.pipe = OVDiffusionPipeline.from_pretrained(ir_dir, device="CPU", compile=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.kw: dict[str, Any] = {}
        self.seed = 0

    def describe(self) -> dict[str, Any]:
        unet = getattr(self.pipe, "unet", None) or self.pipe.transformer
        out = {"pipeline": type(self.pipe).__name__, "scheduler": type(self.pipe.scheduler).__name__}
        if unet.request is not None:  # compiled: what the CPU plugin computes in
            out["inference_precision"] = prop(unet.request.get_property("INFERENCE_PRECISION_HINT"))
            out["performance_hint"] = prop(unet.request.get_property("PERFORMANCE_HINT"))
        return out

    def prepare(self, c: dict[str, Any]) -> None:
        import diffusers

        pipe = self.pipe
        pipe.scheduler = getattr(diffusers, c["scheduler"]).from_config(c["config"])
        if c["guidance"] > 1:  # optimum-intel's static U-Net batch assumes classifier-free guidance
            pipe.reshape(batch_size=1, height=c["height"], width=c["width"], num_images_per_prompt=c["n"])
        pipe.compile()
        self.seed = c["seed"]
        self.kw = dict(
            prompt=c["prompt"],
            negative_prompt=c["negative"],
            num_inference_steps=c["steps"],
            guidance_scale=c["guidance"],
            height=c["height"],
            width=c["width"],
            num_images_per_prompt=c["n"],
            output_type="np",
        )

    def run(self) -> np.ndarray:
        import torch

        out = self.pipe(**self.kw, generator=torch.Generator("cpu").manual_seed(self.seed))
        return to_uint8(out.images)


class GenAI:
    """OpenVINO GenAI's C++ pipeline; its own scheduler of the same type, from the same config, and its
    ``TorchGenerator``, which draws as torch's CPU generator does."""

    def __init__(self, ir_dir: str):
        import openvino_genai

        self.pipe = openvino_genai.Text2ImagePipeline(ir_dir)
        self.kw: dict[str, Any] = {}
        self.seed = 0
        self.scheduler = ""

    def describe(self) -> dict[str, Any]:
        import openvino

        core = openvino.Core()  # GenAI compiles with the CPU plugin's defaults: ask the plugin
        return {
            "pipeline": "Text2ImagePipeline",
            "scheduler": self.scheduler or None,
            "inference_precision": prop(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "performance_hint": prop(core.get_property("CPU", "PERFORMANCE_HINT")),
        }

    def prepare(self, c: dict[str, Any]) -> None:
        import openvino_genai

        refusal = genai_refusal(c["scheduler"], c["config"])
        if refusal:  # never another scheduler in its place
            raise ValueError(f"sampler {c['sampler']!r}: {refusal}")
        path = Path(c["tmp"]) / "scheduler_config.json"  # GenAI reads a scheduler's config from a file only
        path.write_text(json.dumps({"_class_name": c["scheduler"], **c["config"]}))
        kind = getattr(openvino_genai.Scheduler.Type, GENAI_SCHEDULERS[c["scheduler"]])
        self.pipe.set_scheduler(openvino_genai.Scheduler.from_config(str(path), kind))
        self.scheduler = GENAI_SCHEDULERS[c["scheduler"]]
        self.pipe.reshape(c["n"], c["height"], c["width"], c["guidance"])
        self.pipe.compile("CPU")
        self.seed = c["seed"]
        self.kw = dict(
            num_inference_steps=c["steps"],
            guidance_scale=c["guidance"],
            height=c["height"],
            width=c["width"],
            num_images_per_prompt=c["n"],
        )
        if c["negative"] is not None:  # not given: the pipeline's own default, as diffusers' (SDXL: zeros)
            self.kw["negative_prompt"] = c["negative"]
        self.prompt = c["prompt"]

    def run(self) -> np.ndarray:
        import openvino_genai

        tensor = self.pipe.generate(self.prompt, **self.kw, generator=openvino_genai.TorchGenerator(self.seed))
        return np.array(tensor.data, dtype=np.uint8)  # [B, H, W, 3], GenAI's own conversion


class OptimumIntelInt8(OptimumIntel):
    """optimum-intel over its own INT8 IR (``--quantize``): the precision it reports names the INT8 parts."""

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if "inference_precision" in out:
            out["inference_precision"] += ", U-Net int8 (hybrid), other weights int8"
        return out


PEERS = {"optimum-intel": OptimumIntel, "optimum-intel-int8": OptimumIntelInt8, "openvino-genai": GenAI}


def quantize(ir_dir: Path, dest: Path, prompts: list[str], samples: int) -> None:
    """optimum-intel's own INT8 for a diffusion pipeline (module docstring), written to ``dest``."""
    from optimum.intel import OVDiffusionPipeline, OVWeightQuantizationConfig

    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=prompts, num_samples=samples)
    pipe = OVDiffusionPipeline.from_pretrained(ir_dir, device="CPU", compile=False, quantization_config=config)
    pipe.save_pretrained(dest)


def serve(out_dir: Path, answer) -> None:
    """Read commands until ``close`` or the end of stdin."""
    peer, runs = None, 0
    for line in sys.stdin:
        c = json.loads(line)
        try:
            if c["cmd"] == "load":
                peer = PEERS[c["kind"]](c["ir_dir"])
                answer({"ok": True, "describe": peer.describe()})
            elif c["cmd"] == "prepare":
                peer.prepare({**c, "tmp": str(out_dir)})
                answer({"ok": True, "describe": peer.describe()})
            elif c["cmd"] == "run":
                t0 = time.perf_counter()
                images = peer.run()
                ms = (time.perf_counter() - t0) * 1e3
                runs += 1
                path = out_dir / "images.npy"
                np.save(path, images)
                answer({"ok": True, "ms": ms, "path": str(path), "runs": runs})
            elif c["cmd"] == "close":
                answer({"ok": True})
                return
            else:
                answer({"ok": False, "error": f"unknown command {c['cmd']!r}"})
        except Exception as err:  # noqa: BLE001 - every failure goes back to the bench, which decides
            answer({"ok": False, "error": f"{type(err).__name__}: {err}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", action="store_true", help="print the installed kinds and versions, then exit")
    ap.add_argument("--out", type=Path, help="folder for the images (.npy)")
    ap.add_argument("--quantize", nargs=2, type=Path, metavar=("IR", "DEST"), help="write IR's INT8 pipeline to DEST")
    ap.add_argument("--prompts", type=Path, help="--quantize: a JSON list of calibration prompts")
    ap.add_argument("--samples", type=int, help="--quantize: U-Net calls calibrated on (default: optimum-intel's)")
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe()), flush=True)
        return
    if args.quantize:
        quantize(*args.quantize, json.loads(args.prompts.read_text()), args.samples)
        return
    proto = os.fdopen(os.dup(1), "w")  # the answers; the libraries' own prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    serve(args.out, answer)


if __name__ == "__main__":
    main()
