"""`sdrt build DIR`: each ONNX graph of an engine directory -> a TensorRT plan beside it (unet.onnx -> unet.plan),
built by TensorRT (on the GPU that will run it) or TensorRT for RTX (ahead of time, with or without a GPU, for
the RTX compute capabilities it targets); `sdrt.trt.targets` chooses.

A plan is rebuilt only when its build key changes: the ONNX files' SHA-256, the graph's precision, the shape
profile, the builder options, the TensorRT family and version, and the GPU (TensorRT: name and compute
capability) or the targets (TensorRT for RTX). The key and the plan's SHA-256 go into manifest["engines"][name];
`sdrt.runtime.plans.check_plan` refuses a plan whose key does not fit the machine. Without either TensorRT the
directory is left exactly as it is: ONNX Runtime runs the graphs (its own graph optimisations at session creation
do what an offline-optimised copy would, so none is written).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.hires import target_size
from sdrt.runtime.manifest import (
    check_files,
    concrete_shape,
    read_manifest,
    sha256_file,
    write_atomic,
    write_manifest,
)
from sdrt.runtime.model import Model
from sdrt.runtime.params import Hires
from sdrt.runtime.progress import Progress
from sdrt.runtime.trt_family import ENV_FIELDS, TrtEnvironment, TrtFamily, import_family
from sdrt.runtime.user_cache import cache_dir, slug
from sdrt.trt.engine import PlanFromOnnx, parse_onnx
from sdrt.trt.ops import LIST_VERSION, OpProblem, check_model
from sdrt.trt.targets import choose, environment, parse_targets

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
INSTALL_HINT = (
    "pip install tensorrt on a machine with an NVIDIA GPU and driver, or pip install 'sdrt[rtx]' "
    "(TensorRT for RTX: builds without a GPU, for RTX GPUs)"
)


@dataclass(frozen=True)
class BuildOptions:
    height: int | None = None  # px; static size (or the dynamic profile's opt); default: the model's native size
    width: int | None = None
    batch: int = 1  # images per prompt; the U-Net and text encoders see 2x as many rows (classifier-free guidance)
    dynamic: bool = False  # one profile over the exported ranges instead of one static shape
    hires: float | None = None  # one profile from the static shape to the hires fix's second pass at this scale
    workspace_gib: float | None = None  # builder workspace limit; None: TensorRT's default (the GPU's memory)
    timing_cache: Path | None = None  # TensorRT only; None: `default_timing_cache(env)`
    backend: str = "auto"  # "auto": the family that suits this machine, or leave DIR for ONNX Runtime
    force: bool = False  # rebuild even when the key matches
    compute_capabilities: str | None = None  # TensorRT for RTX's targets, "8.6,8.9"; None: its defaults


def target_shape(manifest: dict[str, Any], opts: BuildOptions) -> tuple[int, int, int]:
    """(images, height px, width px) of the static profile (or the dynamic one's opt), checked against the export."""
    model = Model.from_manifest(manifest)
    native = model.default_px  # what `sdrt generate` asks for without --height/--width
    h = model.check_size("--height", native if opts.height is None else opts.height)
    w = model.check_size("--width", native if opts.width is None else opts.width)
    if not 1 <= opts.batch <= model.max_images:
        raise SdrtError(
            f"--batch {opts.batch} is outside the 1-{model.max_images} images the graphs were exported for; "
            f"re-export with --max-batch {opts.batch}"
        )
    return opts.batch, h, w


def hires_shape(manifest: dict[str, Any], opts: BuildOptions) -> tuple[int, int, int]:
    """(images, height px, width px) of the hires fix's second pass on the static shape, as the web UI sizes it
    (int(px x scale)), checked against the export."""
    images, h, w = target_shape(manifest, opts)
    if opts.dynamic:
        raise SdrtError("--hires spans the static shape and its second pass; --dynamic spans every size: give one")
    try:  # the runtime's own sizing of the second pass
        big_w, big_h = target_size(w, h, Hires(scale=opts.hires))
    except SdrtError as err:
        raise SdrtError(f"--hires {opts.hires:g}: {err}") from None
    model = Model.from_manifest(manifest)
    model.check_size(f"--hires {opts.hires:g}: the second pass's height", big_h)
    model.check_size(f"--hires {opts.hires:g}: the second pass's width", big_w)
    return images, big_h, big_w


def profile_shapes(manifest: dict[str, Any], name: str, opts: BuildOptions) -> dict[str, dict[str, list[int]]]:
    """{input: {"min", "opt", "max": shape}} for graph ``name``: one static shape, or the export's ranges."""
    model, graph = Model.from_manifest(manifest), manifest["graphs"][name]
    factor = model.geometry.vae_scale_factor
    images, h_px, w_px = target_shape(manifest, opts)
    per_image = graph["rows"][1] // model.max_images  # 2 under classifier-free guidance, else 1
    opt = (per_image * images, h_px // factor, w_px // factor)
    lo = (graph["rows"][0], model.min_px // factor, model.min_px // factor) if opts.dynamic else opt
    hi = (graph["rows"][1], model.max_px // factor, model.max_px // factor) if opts.dynamic else opt
    if opts.hires:  # both passes of the hires fix; the plan is tuned for the second, which costs the most
        _, big_h, big_w = hires_shape(manifest, opts)
        opt = hi = (per_image * images, big_h // factor, big_w // factor)
    # the text axis (T: 77 tokens a prompt chunk) spans every chunk count in both kinds of profile: a longer prompt
    # is a longer attention context, not a new engine
    tokens = {"min": 77, "opt": 77, "max": 77 * model.max_prompt_chunks}
    return {
        n: {
            k: list(concrete_shape(i["shape"], *v, factor, tokens[k]))
            for k, v in (("min", lo), ("opt", opt), ("max", hi))
        }
        for n, i in graph["inputs"].items()
    }


def describe_profile(manifest: dict[str, Any], opts: BuildOptions) -> str:
    images, h, w = target_shape(manifest, opts)
    if opts.hires:
        _, big_h, big_w = hires_shape(manifest, opts)
        return f"hires {images} image(s) {h}x{w} to {big_h}x{big_w}"
    if not opts.dynamic:
        return f"static {images} image(s) {h}x{w}"
    m = Model.from_manifest(manifest)
    return f"dynamic 1-{m.max_images} image(s) {m.min_px}-{m.max_px} px, opt {images} image(s) {h}x{w}"


def build_key(
    manifest: dict[str, Any], name: str, opts: BuildOptions, env: TrtEnvironment, refittable: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Everything a plan depends on. Equal keys (and an intact plan file) mean the plan need not be rebuilt.
    ``refittable``: the initializers the directory's LoRA adapters change (`refittable_weights`)."""
    graph = manifest["graphs"][name]
    key = {
        "onnx": {f: manifest["files"][f] for f in graph["files"]},
        "precision": graph["precision"],
        "profile": describe_profile(manifest, opts),
        "profiles": [profile_shapes(manifest, name, opts)],
        "builder": {"workspace_gib": opts.workspace_gib},
        **env._asdict(),
    }
    if refittable:  # absent without adapters: the keys of plans built before adapters existed stay valid
        key["refittable"] = list(refittable)
    return key


def refittable_weights(root: Path, manifest: dict[str, Any], name: str) -> tuple[str, ...]:
    """The initializers of graph ``name`` that any of the directory's LoRA adapters changes: the keys of
    ``loras/base.safetensors`` (`sdrt lora add` keeps there the exported value of each), in name order."""
    from sdrt.runtime.lora import BASE_FILE

    if not manifest.get("loras") or not (root / BASE_FILE).is_file():
        return ()
    from safetensors import safe_open

    with safe_open(str(root / BASE_FILE), "np") as base:
        return tuple(sorted(k.split("/", 1)[1] for k in base.keys() if k.startswith(name + "/")))


def stale_reasons(entry: dict[str, Any] | None, key: dict[str, Any], plan_sha256: str | None) -> list[str]:
    """Why the plan recorded in ``entry`` cannot be reused for ``key`` (empty: it can). ``plan_sha256``: the plan
    file's hash now, None when it is missing."""
    if not entry:
        return ["no plan yet"]
    old = entry.get("key", {})
    reasons = []
    if old.get("onnx") != key["onnx"]:
        reasons.append("the ONNX graph changed")
    if old.get("refittable", []) != key.get("refittable", []):
        n, m = len(old.get("refittable", [])), len(key.get("refittable", []))
        reasons.append(f"LoRA-refittable weights {n} -> {m} (adapters added or replaced)")
    if old.get("precision") != key["precision"]:
        reasons.append(f"precision {old.get('precision')} -> {key['precision']}")
    if old.get("profiles") != key["profiles"]:
        reasons.append(f"profile {old.get('profile')} -> {key['profile']}")
    ob, nb = old.get("builder", {}), key["builder"]
    reasons += [f"{k} {ob.get(k)} -> {nb.get(k)}" for k in sorted(set(ob) | set(nb)) if ob.get(k) != nb.get(k)]
    reasons += [f"{label} {old.get(f)} -> {key[f]}" for f, label in ENV_FIELDS.items() if old.get(f) != key[f]]
    if not reasons and old != key:
        reasons.append("the build key's format changed")
    if plan_sha256 is None:
        reasons.append(f"{entry.get('file')} is missing")
    elif plan_sha256 != entry.get("sha256"):
        reasons.append(f"{entry.get('file')} differs from its recorded SHA-256")
    return reasons


def default_timing_cache(env: TrtEnvironment) -> Path:
    """~/.cache/sdrt/timing-<TensorRT version>-<GPU>-sm<cc>.cache: tactic timings are valid for one GPU and
    TensorRT only, so each pair has its own cache."""
    cc = env.compute_capability.replace(".", "")
    return cache_dir() / f"timing-trt{env.version}-{slug(env.gpu)}-sm{cc}.cache"


def parse_graphs(trt, root: Path, manifest: dict[str, Any]) -> tuple[list[str], int]:
    """NVIDIA's ONNX parser over every graph, before anything is built: its errors (naming node and reason)."""
    problems = []
    for graph in manifest["graphs"].values():
        problems += parse_onnx(trt, root / graph["file"])
        gc.collect()
    return problems, len(manifest["graphs"])


def check_operators(root: Path, manifest: dict[str, Any]) -> tuple[list[OpProblem], int]:
    """TensorRT operator-list problems of every graph in ``root``, and how many nodes were checked."""
    problems, nodes = [], 0
    for name, graph in manifest["graphs"].items():
        model = onnx.load(str(root / graph["file"]), load_external_data=False)  # the structure, not the weights
        problems += check_model(model, name)
        nodes += len(model.graph.node)
    return problems, nodes


def _family(opts: BuildOptions) -> tuple[TrtFamily | None, Any, TrtEnvironment | None, str]:
    """(family, its module, this machine's build environment) for ``opts.backend``; Nones and why not where
    `auto` finds nothing usable (an error where a family was asked for)."""
    family = choose(opts.backend)
    if family is None:
        return None, None, None, "neither TensorRT nor TensorRT for RTX is installed"
    if not family.portable and opts.compute_capabilities is not None:
        raise SdrtError(
            "--compute-capability is for TensorRT for RTX (--backend tensorrt-rtx); "
            "TensorRT builds for the GPU it runs on"
        )
    targets = parse_targets(opts.compute_capabilities) if family.portable else ()  # always checked
    module, why = import_family(family)
    try:
        if module is None:
            raise SdrtError(f"{why}; {family.install}")
        return family, module, environment(family, targets), ""
    except SdrtError as err:
        if opts.backend != "auto":
            raise SdrtError(f"--backend {opts.backend}: {err}") from None
        return None, None, None, str(err)


def build_directory(root: str | os.PathLike, opts: BuildOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Build (or skip, or rebuild) the plan of every graph in ``root``. Returns the report the CLI prints."""
    if opts.backend not in BACKENDS:
        raise SdrtError(f"unknown backend {opts.backend!r}; use {' or '.join(BACKENDS)}")
    root, p = Path(root), progress or Progress()
    manifest = read_manifest(root)
    profile = describe_profile(manifest, opts)  # checks --height/--width/--batch before anything slow
    family, trt, env, why = _family(opts)
    report: dict[str, Any] = {"profile": profile, "operators": [], "graphs": {}}
    if env is None:  # no TensorRT: the published operator table says what would fail
        problems, nodes = check_operators(root, manifest)
        listed = f"TensorRT {'.'.join(map(str, LIST_VERSION))}'s ONNX operator list"
        report["operators"] = [str(x) for x in problems]
        report["operator_check"] = (
            f"operator check: {len(problems)} of {nodes} nodes would fail ({listed})"
            if problems
            else f"operator check: all {nodes} nodes of {len(manifest['graphs'])} graphs are in {listed}"
        )
        report["skipped"] = f"TensorRT is not available ({why}): no plans built; {root} stays ready for ONNX Runtime"
        report["install"] = f"to build plans, {INSTALL_HINT}"
        return report
    if bad := check_files(root, manifest, [f for g in manifest["graphs"].values() for f in g["files"]]):
        raise SdrtError(f"{root}: " + "; ".join(bad) + "; re-run `sdrt export ... --force`")
    with p.step(f"{family.name} {env.version}: parse every graph (NVIDIA's ONNX parser)"):
        problems, graphs = parse_graphs(trt, root, manifest)
    report["operators"] = problems
    report["operator_check"] = f"operator check: {family.name} {env.version}'s ONNX parser " + (
        f"rejects {len(problems)} node(s)" if problems else f"accepts all {graphs} graphs"
    )
    if problems:
        raise SdrtError(f"{family.name} {env.version} cannot parse " + "; ".join(problems[:3]))
    cache = None
    if family.timing_cache:
        cache = opts.timing_cache or default_timing_cache(env)
        cache.parent.mkdir(parents=True, exist_ok=True)
    refittable = {g: refittable_weights(root, manifest, g) for g in manifest["graphs"]}
    refit = any(refittable.values())
    if refit and family.portable and not env.gpu:
        # TensorRT for RTX 1.7 compiles refittable attention (Myelin) regions with the GPU it builds on: on a machine
        # without one the build fails deep inside, so these engines are built as plain ones
        refit = False
        report["lora"] = (
            f"{family.name} builds LoRA-refittable engines only on an RTX GPU: these plans run without "
            "adapters; build on the RTX GPU that runs them to apply adapters"
        )
        p.say(report["lora"])
    elif refit and family.portable and len(env.compute_capability.split(",")) > 1:
        raise SdrtError(
            f"{family.name} {env.version} builds refittable engines (this directory has LoRA adapters) "
            "for one compute capability at a time; pass --compute-capability with one"
        )
    target = f"on {env.gpu} (sm {env.compute_capability})" if env.gpu else f"for sm {env.compute_capability}"
    p.say(f"{family.name} {env.version} {target}; {profile}" + (f"; timing cache {cache}" if cache else ""))
    for name in manifest["graphs"]:
        weights = refittable[name] if refit else ()
        report["graphs"][name] = _build_one(root, manifest, name, opts, (trt, env), cache, p, weights)
    return report


def _build_one(root, manifest, name, opts, family, cache, p: Progress, refittable: tuple[str, ...]) -> dict[str, Any]:
    trt, env = family
    key = build_key(manifest, name, opts, env, refittable)
    entry = manifest.setdefault("engines", {}).get(name)
    plan = root / f"{name}.plan"
    reasons = stale_reasons(entry, key, sha256_file(plan) if plan.is_file() else None)
    if not reasons and not opts.force:
        p.say(f"{name}: skipped (up to date)")
        return {"action": "skipped", "why": "up to date", "seconds": 0.0}
    why = "--force" if not reasons else "; ".join(reasons)
    t = time.perf_counter()
    with p.step(f"{name}: build {plan.name} ({why})"):
        targets = tuple(env.compute_capability.split(",")) if not env.gpu else ()
        data = PlanFromOnnx(
            trt,
            root / manifest["graphs"][name]["file"],
            key["profiles"],
            opts.workspace_gib,
            cache,
            targets,
            refittable,
        )()
        write_atomic(plan, data)
        del data
        gc.collect()  # the builder, network and parser are gone with the loader's call: free them before the next
    seconds = round(time.perf_counter() - t, 1)
    record_plan(root, manifest, name, key, seconds)  # after each plan: an interrupted build keeps what it finished
    return {"action": "built" if entry is None else "rebuilt", "why": why, "seconds": seconds}


def record_plan(root: Path, manifest: dict[str, Any], name: str, key: dict[str, Any], seconds: float) -> None:
    """Record ``name``.plan, just written, under its build key and SHA-256 and rewrite the manifest atomically."""
    plan = root / f"{name}.plan"
    sha = sha256_file(plan)
    manifest.setdefault("engines", {})[name] = {"file": plan.name, "key": key, "sha256": sha, "build_seconds": seconds}
    manifest.setdefault("files", {})[plan.name] = sha
    write_manifest(root, manifest)
