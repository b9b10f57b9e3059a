"""A batch layout captured as one CUDA graph: static device buffers in, uint8 pixels out, replayed per request."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from sdrt.runtime.request import Layout
from sdrt.runtime.samplers import Plan

if TYPE_CHECKING:
    from sdrt.runtime.pipeline import Pipeline

MAX_CAPTURED = 4  # captured request graphs kept per pipeline (least recently used goes first)


class Captured:
    """`Pipeline.body` for one `Layout`, recorded once. The body reads only these buffers, so a replay with new
    host values is the request those values describe."""

    def __init__(self, pipe: Pipeline, layout: Layout, plan: Plan, host: dict[str, torch.Tensor]):
        self.buf = {k: torch.empty_like(v, device=pipe.device) for k, v in host.items()}
        self.host = {k: torch.empty_like(v).pin_memory() for k, v in host.items()}
        for k, v in host.items():
            self.buf[k].copy_(v)
        side = torch.cuda.Stream(pipe.device)
        side.wait_stream(torch.cuda.current_stream(pipe.device))
        with torch.cuda.stream(side):  # warm-up: engines allocate, kernels load, outside the capture
            pipe.body(layout, plan, self.buf)
        torch.cuda.current_stream(pipe.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = pipe.body(layout, plan, self.buf)
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


class CaptureCache:
    """Captured graphs by `Layout.key`, least recently used dropped past MAX_CAPTURED."""

    def __init__(self) -> None:
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()

    def replay(
        self, pipe: Pipeline, layout: Layout, plan: Plan, host: dict[str, torch.Tensor], timings: dict[str, float]
    ) -> torch.Tensor:
        key = layout.key
        captured = self.graphs.pop(key, None) or Captured(pipe, layout, plan, host)
        self.graphs[key] = captured
        while len(self.graphs) > MAX_CAPTURED:
            self.graphs.popitem(last=False)
        return captured.replay(host, timings)

    def clear(self) -> None:
        self.graphs.clear()
