"""LoRA adapters at run time: a request parameter like the seed (DESIGN.md, "Adapters and control").

`sdrt lora add` (export/lora.py) stores each adapter as ``loras/NAME.safetensors``: per initializer of a graph,
``GRAPH/INITIALIZER.down`` [r, in(, k, k)], ``.up`` [out, r(, 1, 1)] (PyTorch layout, float32) and ``.scale``
(alpha / rank folded in). For a set of adapters {name: s_i} the weights of a graph are always recomputed from the
exported base, W = W0 + sum_i s_i * scale_i * up_i @ down_i, never from the current state: any sequence of adapter
sets gives exactly what a fresh load gives. `Adapters.apply` hands each backend only the graphs whose set changed;
the backend writes the new values its own way (`Backend.set_weights`: ONNX Runtime initializer overrides, torch
in-place copies into the same parameters).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import check_files

LORA_DIR = "loras"
BASE_FILE = f"{LORA_DIR}/base.safetensors"  # the exported value of every initializer some adapter changes
NAME_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
Active = tuple[tuple[str, float], ...]  # (name, scale), sorted by name, no zero scales


class Update(NamedTuple):
    """One weight's new value, as the sum of its adapters' deltas (float32, the PyTorch parameter's layout)."""

    initializer: str  # its name in the ONNX graph
    param: str  # its name in the torch program
    transposed: bool  # whether the initializer holds the parameter transposed
    delta: torch.Tensor

    def applied_to(self, w0: torch.Tensor) -> torch.Tensor:
        """W0 + delta in the initializer's layout and dtype; ``w0`` is the exported initializer, exactly as
        ``loras/base.safetensors`` holds it (the backends that write initializers: ONNX Runtime, TensorRT)."""
        return (w0.float() + (self.delta.t() if self.transposed else self.delta)).to(w0.dtype)


def graph_weights(root: Path, manifest: dict[str, Any], graph: str) -> dict[str, Any]:
    """The graph's weights file (export/weights.py): {"prefix", "weights": {parameter: {initializer, shape, ...}}}."""
    return json.loads((root / manifest["graphs"][graph]["weights"]).read_text())


def check_loras(manifest: dict[str, Any], loras: Mapping[str, float] | None) -> Active:
    """``{name: scale}`` of a request, checked against the engine's adapters; one-line errors about ``loras``."""
    if not loras:
        return ()
    if not isinstance(loras, Mapping):
        raise SdrtError(f"loras must map adapter names to scales, got {loras!r}", field="loras")
    known = manifest.get("loras", {})
    out = []
    for name, scale in loras.items():
        if name not in known:
            have = ", ".join(sorted(known)) or "none"
            raise SdrtError(
                f"unknown LoRA adapter {name!r} (this engine has: {have}); add it with `sdrt lora add DIR FILE`",
                field="loras",
            )
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise SdrtError(f"LoRA scale of {name!r} must be a finite number, got {scale!r}", field="loras")
        if scale != 0:  # W0 + 0 * delta is W0 exactly: the same as leaving the adapter out
            out.append((name, float(scale)))
    return tuple(sorted(out))


def check_loras_with_controlnet(manifest: dict[str, Any], active: Active) -> None:
    """An adapter imported before the directory had ControlNets changes the U-Net but not ``unet_controlnet``, which
    ControlNet requests run: refused, naming the fix, rather than applied to half the model."""
    for name, _ in active:
        graphs = manifest["loras"][name]["weights"]
        if "unet" in graphs and "unet_controlnet" not in graphs:
            raise SdrtError(
                f"LoRA adapter {name!r} was added before this directory's ControlNets; add it again with "
                f"`sdrt lora add DIR FILE --name {name} --force` to use it with ControlNet",
                field="loras",
            )


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:SCALE`` (the command line's --lora)."""
    name, _, scale = arg.rpartition(":") if ":" in arg else (arg, "", "1")
    try:
        return name, float(scale)
    except ValueError:
        raise SdrtError(f"--lora {arg}: give NAME or NAME:SCALE with a number as SCALE", field="loras") from None


class Adapters:
    """The engine's adapters, each file read and checked against its SHA-256 once, and the set each graph has."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self.current: dict[str, Active] = {}  # graph -> the set its backend holds now (absent: none)
        self._factors: dict[str, dict[str, torch.Tensor]] = {}
        self._maps: dict[str, dict[str, tuple[str, bool]]] = {}

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._factors:
            from safetensors.torch import load_file

            entry = self.manifest["loras"][name]
            problems = check_files(self.root, self.manifest, [entry["file"], BASE_FILE])
            if problems:
                raise SdrtError(
                    f"LoRA {name}: {'; '.join(problems)}; re-add it with `sdrt lora add --force`", field="loras"
                )
            self._factors[name] = load_file(str(self.root / entry["file"]))
        return self._factors[name]

    def _map(self, graph: str) -> dict[str, tuple[str, bool]]:
        """initializer -> (torch parameter name, transposed)."""
        if graph not in self._maps:
            w = graph_weights(self.root, self.manifest, graph)
            self._maps[graph] = {
                e["initializer"]: (w["prefix"] + fqn, e["transposed"]) for fqn, e in w["weights"].items()
            }
        return self._maps[graph]

    def for_graph(self, graph: str, active: Active) -> Active:
        return tuple((n, s) for n, s in active if graph in self.manifest["loras"][n]["weights"])

    def updates(self, graph: str, active: Active) -> list[Update]:
        """Each changed weight of ``graph`` under ``active``: sum_i s_i * scale_i * up_i @ down_i, in name order."""
        deltas: dict[str, torch.Tensor] = {}
        for name, s in active:  # sorted by name: the same set always sums in the same order
            factors = self._load(name)
            for key in sorted(k for k in factors if k.startswith(graph + "/") and k.endswith(".down")):
                stem = key.removesuffix(".down")
                down, up = factors[key], factors[stem + ".up"]
                d = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
                d = d * (s * float(factors[stem + ".scale"]))
                init = stem.split("/", 1)[1]
                deltas[init] = deltas[init] + d if init in deltas else d
        weights = self._map(graph)
        return [Update(init, *weights[init], d) for init, d in sorted(deltas.items())]

    def apply(self, backend, active: Active) -> None:
        """Bring every graph of ``backend`` to the adapter set ``active``; graphs already there are left alone."""
        for graph in self.manifest["graphs"]:
            mine = self.for_graph(graph, active)
            if self.current.get(graph, ()) != mine:
                backend.set_weights(graph, self.updates(graph, mine))
                self.current[graph] = mine
