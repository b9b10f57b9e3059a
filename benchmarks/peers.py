"""The CPU peers of `sdrt bench --peers`: optimum-intel's ``OVDiffusionPipeline`` and OpenVINO GenAI's
``Text2ImagePipeline``, over an OpenVINO IR exported once from the source the engine directory was exported from;
``optimum-intel-int8`` is optimum-intel over that IR quantized by optimum-intel itself (hybrid INT8, calibrated on
sdrt's own calibration prompts and as many U-Net calls as `sdrt quantize` records by default), the peer of
sdrt's INT8 U-Net: `--peers all` runs it with `--cpu-int8`.

optimum-intel pins a transformers older than sdrt's, so the peers run in their own venv (`make cpu-peers`): each
peer is a `benchmarks/peer_worker.py` process driven over stdin/stdout, and `PeerContender` is its stand-in in the
bench process, following the contender protocol of `contenders.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.benchmarks.contenders import source_pipeline
from sdrt.benchmarks.measure import Spans
from sdrt.benchmarks.peer_worker import KINDS, genai_refusal
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.model import Model
from sdrt.runtime.pipeline import Request
from sdrt.runtime.schedule import SCHEDULERS, NoiseSchedule, ScheduleError, default_sampler, resolve

PEERS = tuple(KINDS)  # optimum-intel, optimum-intel-int8, openvino-genai
INT8_PEER = "optimum-intel-int8"
INT8_SAMPLES = 44  # U-Net calls calibrated on: `sdrt quantize`'s default (4 prompts x 10 PNDM steps)
WORKER = Path(__file__).with_name("peer_worker.py")
DEFAULT_PYTHON = Path(__file__).resolve().parents[1] / ".peers-venv" / "bin" / "python"  # the checkout's
WEIGHT_FORMAT = "fp32"  # optimum-intel would compress a large U-Net's weights to int8: graph against graph instead
PEER_NOTE = (
    "another process: stages are not observable, so end to end on the bench's clock around the round "
    "trip; runtime timings: worker_ms (the worker's own clock), ipc_ms (the rest)"
)
FIX = "run `make cpu-peers`, or pass --peers-python"


@dataclass
class PeerPlan:
    """The peers that will run, the Python that runs them, and the ones left out (name, reason)."""

    names: list[str] = field(default_factory=list)
    python: Path | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def peers_python(path: str | None) -> Path:
    """--peers-python, else $SDRT_PEERS_PYTHON, else the checkout's .peers-venv."""
    return Path(path or os.environ.get("SDRT_PEERS_PYTHON") or DEFAULT_PYTHON)


def probe(python: Path) -> dict[str, Any]:
    """The peer kinds installed beside ``python`` and their versions (`peer_worker.py --probe`)."""
    if not python.is_file():
        raise SdrtError(f"no peers' Python at {python}: {FIX}")
    try:
        done = subprocess.run([str(python), str(WORKER), "--probe"], capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        raise SdrtError(f"the peers' Python {python} does not run peer_worker.py: {FIX}") from None


def scheduler_for(manifest: dict[str, Any], sampler: str | None) -> tuple[str, dict[str, Any]] | None:
    """(diffusers class, config) of the request's sampler on this checkpoint, as the baseline and sdrt use it; None
    where the request itself is wrong (the request's own validation says why)."""
    schedule = NoiseSchedule.from_manifest(manifest["scheduler"])
    try:
        return resolve(schedule, sampler or default_sampler(schedule))
    except (ScheduleError, KeyError):
        return None


def genai_samplers(manifest: dict[str, Any]) -> list[str]:
    """The samplers OpenVINO GenAI runs as diffusers does on this checkpoint."""
    out = []
    for sampler in SCHEDULERS:
        found = scheduler_for(manifest, sampler)
        if found is not None and genai_refusal(*found) is None:
            out.append(sampler)
    return out


def select_peers(
    requested: list[str], python: Path, manifest: dict[str, Any], sampler: str | None, int8: bool = False
) -> PeerPlan:
    """Which peers run. Named explicitly, one that cannot run is a one-line error; with ``all``, it is left out
    with its reason, and the INT8 peer runs only beside sdrt's INT8 U-Net (``int8``)."""
    explicit = requested != ["all"]
    unknown = [p for p in requested if p not in PEERS] if explicit else []
    if unknown or not requested:
        raise SdrtError(f"unknown peer {', '.join(unknown) or '(none)'}; peers: {', '.join(PEERS)} (or all)")
    wanted = requested if explicit else [p for p in PEERS if int8 or p != INT8_PEER]
    plan = PeerPlan(python=python)
    try:
        found = probe(python)
    except SdrtError as err:
        if explicit:
            raise
        plan.skipped = [{"name": p, "reason": str(err)} for p in wanted]
        return plan
    plan.versions = found["versions"]
    scheduler = scheduler_for(manifest, sampler)
    for peer in wanted:
        reason = None
        if peer not in found["kinds"]:
            reason = f"{KINDS[peer]} is not installed beside {python}: {FIX}"
        elif peer == "openvino-genai" and scheduler is not None and genai_refusal(*scheduler):
            usable = ", ".join(genai_samplers(manifest)) or "none for this checkpoint"
            reason = (
                f"sampler {sampler or 'default'} ({genai_refusal(*scheduler)}): no GenAI equivalent; "
                f"--sampler with GenAI: {usable}"
            )
        if reason and explicit:
            raise SdrtError(f"--peers {peer}: {reason}")
        if reason:
            plan.skipped.append({"name": peer, "reason": reason})
        else:
            plan.names.append(peer)
    return plan


def ir_folder(engine_dir: Path, manifest: dict[str, Any], versions: dict[str, str | None]) -> Path:
    """Where the peers' IR for this engine's source is cached: beside DIR, in .bench-peers/<model>-<key>, the key
    hashing the source (preset and seed, or file hashes), the weight format and the exporting tools' versions."""
    key = json.dumps({"source": manifest["source"], "weight_format": WEIGHT_FORMAT, "tools": versions}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return engine_dir.resolve().parent / ".bench-peers" / f"{Model.from_manifest(manifest).name}-{digest}"


def export_ir(engine_dir: Path, manifest: dict[str, Any], plan: PeerPlan) -> Path:
    """The IR both peers load: the source's diffusers folder, then `optimum-cli export openvino` with the peers'
    Python at fp32 weights; reused when present, assembled beside its destination and renamed into place."""
    dest = ir_folder(engine_dir, manifest, plan.versions)
    if (dest / "export.json").is_file():
        return dest
    work = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
    except OSError as err:
        raise SdrtError(f"cannot write the peers' IR beside the engine directory ({err})") from None
    pipe = source_pipeline(manifest)
    save_source(pipe, work / "source")
    cli = [str(plan.python), "-m", "optimum.commands.optimum_cli"]
    cmd = [
        *cli,
        "export",
        "openvino",
        "--model",
        str(work / "source"),
        "--task",
        "text-to-image",
        "--weight-format",
        WEIGHT_FORMAT,
        str(work / "ir"),
    ]
    run_logged(cmd, work / "export.log", "optimum-cli export openvino")
    check_text_encoders(pipe, work / "ir")
    record = {"source": manifest["source"], "weight_format": WEIGHT_FORMAT, "tools": plan.versions, "command": cmd}
    (work / "ir" / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    (work / "ir").rename(dest)
    shutil.rmtree(work)
    return dest


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """Run a command of the peers' Python with its output in ``log``; a failure is one line with its last."""
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_peer_env()).returncode
    if rc != 0:
        last = next((ln for ln in reversed(log.read_text().splitlines()) if ln.strip()), "no output")
        raise SdrtError(f"{what} failed (exit {rc}): {last.strip()[:300]}; log: {log}")


def int8_ir(ir: Path, plan: PeerPlan) -> Path:
    """The INT8 peer's IR: ``ir`` quantized by optimum-intel in the peers' Python (peer_worker.py --quantize),
    beside it; reused when present, assembled beside its destination and renamed into place."""
    from sdrt.export.quantize import PROMPTS

    dest = ir.with_name(f"{ir.name}-int8-hybrid-{INT8_SAMPLES}")
    if (dest / "quantize.json").is_file():
        return dest
    work = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "prompts.json").write_text(json.dumps(list(PROMPTS)))
    cmd = [str(plan.python), str(WORKER), "--quantize", str(ir), str(work / "ir"), "--prompts"]
    cmd += [str(work / "prompts.json"), "--samples", str(INT8_SAMPLES)]
    t0 = time.perf_counter()
    run_logged(cmd, work / "quantize.log", "optimum-intel's INT8 quantization")
    record = {"from": ir.name, "mode": "hybrid", "samples": INT8_SAMPLES, "prompts": len(PROMPTS),
              "seconds": round(time.perf_counter() - t0, 1), "tools": plan.versions, "command": cmd}  # fmt: skip
    (work / "ir" / "quantize.json").write_text(json.dumps(record, indent=2) + "\n")
    (work / "ir").rename(dest)
    shutil.rmtree(work)
    return dest


def save_source(pipe: Any, dest: Path) -> None:
    """``pipe.save_pretrained(dest)`` with every transformers module in its checkpoints' original layout.

    transformers 5.x writes a module built in memory (a preset, a single file) in its new layout, which the older
    transformers beside optimum-intel reads as missing weights and initialises at random, without an error.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # a transformers without layout conversions writes the one layout there is
        get_model_conversion_mapping = None
    for module in pipe.components.values():
        if get_model_conversion_mapping and isinstance(module, PreTrainedModel):
            if getattr(module, "_weight_conversions", None) is None:  # not loaded by from_pretrained
                module._weight_conversions = get_model_conversion_mapping(module, add_legacy=False)
    pipe.save_pretrained(dest)


def check_text_encoders(pipe: Any, ir: Path) -> None:
    """The IR's text encoder(s) against the source's on the tokens of one prompt, computed in f32 (skipped where
    openvino is not importable here): weights the peers' transformers misread would show here, not as a PSNR."""
    try:
        import openvino
    except ImportError:
        return
    core = openvino.Core()
    for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        module, xml = getattr(pipe, name, None), ir / name / "openvino_model.xml"
        if module is None or not xml.is_file():
            continue
        ids = getattr(pipe, tok)("a photograph", padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            want = module(ids).last_hidden_state.numpy()
        compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        if "last_hidden_state" not in {name for out in compiled.outputs for name in out.get_names()}:
            continue  # another export layout: the PSNR still tells
        got = compiled({"input_ids": ids.numpy()})[compiled.output("last_hidden_state")]
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
        if err > 1e-3:
            raise SdrtError(
                f"the exported IR's {name} disagrees with the source (relative error {err:.2g}): "
                f"the peers' transformers read other weights; see {ir.parent / 'export.log'}"
            )


def _peer_env() -> dict[str, str]:
    """This environment without what would point the peers' Python at this venv's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


class PeerContender:
    """One peer in its worker process, running one fixed request; timed around the round trip."""

    kind = "peer"

    def __init__(self, name: str, plan: PeerPlan, ir: Path, manifest: dict[str, Any]):
        self.name, self.ir, self.versions = name, ir, plan.versions
        self.schedule = NoiseSchedule.from_manifest(manifest["scheduler"])
        self.tmp = tempfile.TemporaryDirectory(prefix=f"sdrt-{name}-")
        self.log = Path(self.tmp.name) / "worker.log"
        cmd = [str(plan.python), str(WORKER), "--out", self.tmp.name]
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=_peer_env()
            )
        self.prepare_ms = 0.0
        self.timings: dict[str, float] = {}
        try:
            self.info: dict[str, Any] = self.ask(cmd="load", kind=name, ir_dir=str(ir))["describe"]
        except BaseException:
            self.close()  # the bench never sees a contender that failed to load
            raise

    def ask(self, **command: Any) -> dict[str, Any]:
        """Send one command, read its answer; a failure raises with the worker's own words."""
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            lines = [ln for ln in self.log.read_text().splitlines() if ln.strip()]
            raise RuntimeError(f"{self.name} worker exited ({self.proc.wait()}): {lines[-1] if lines else ''}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"{self.name} {command['cmd']}: {answer['error']}")
        return answer

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "backend": "openvino",
            "cuda_graph": False,
            "precision": WEIGHT_FORMAT,
            "weight_format": WEIGHT_FORMAT,
            **self.info,
            "prepare_ms": self.prepare_ms,
            "ir": str(self.ir),
            "versions": self.versions,
            "note": PEER_NOTE,
        }

    def prepare(self, req: Request) -> None:
        """The same request as the baseline's, with the sampler's diffusers class and its whole config as the
        baseline and sdrt resolve it (a saved folder no longer tells which options were defaults); reshaping to
        the request's static shapes and compiling happen here, outside the timed runs."""
        if len(req.prompts) != 1 or req.image is not None:
            raise SdrtError("the benchmark runs one text prompt (txt2img)")
        cls, config = resolve(self.schedule, req.sampler)
        t0 = time.perf_counter()
        self.info = self.ask(
            cmd="prepare",
            prompt=req.prompts[0],
            negative=req.negatives[0] or None,
            steps=req.steps,
            guidance=req.guidance,
            height=req.height,
            width=req.width,
            n=req.images_per_prompt,
            seed=req.seed,
            sampler=req.sampler,
            scheduler=cls,
            config=config,
        )["describe"]
        self.prepare_ms = (time.perf_counter() - t0) * 1e3

    def __call__(self, spans: Spans) -> np.ndarray:
        t0 = time.perf_counter()
        answer = self.ask(cmd="run")
        images = np.load(answer["path"])  # uint8 [B, H, W, 3]
        round_trip = (time.perf_counter() - t0) * 1e3
        self.timings = {"worker_ms": answer["ms"], "ipc_ms": round_trip - answer["ms"]}
        return images

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(cmd="close")
                self.proc.wait(timeout=30)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()
