"""A live `sdrt serve`: `create_app` over a pipeline, served by uvicorn in a thread on a loopback port, and the
request bodies and answers the HTTP tests share (every served image is held against the pipeline run alone)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdrt.runtime.params import DEFAULT_GUIDANCE, Params
from sdrt.runtime.pipeline import Pipeline
from sdrt.serve.app import create_app
from sdrt.serve.engine import EngineOptions, LocalEngine
from sdrt.serve.metrics import Metrics

STEPS = 3


class LiveServer:
    """`create_app` over ``pipe`` served by uvicorn in a thread, on 127.0.0.1 and a port the OS picks."""

    def __init__(self, pipe: Pipeline, timeout_s: float = 60.0, **options):
        import uvicorn

        self.metrics = Metrics()
        options = {"window_ms": 100.0, "warmup_steps": 2, **options}
        self.engine = LocalEngine(pipe, EngineOptions(**options), self.metrics)
        app = create_app(self.engine, self.metrics, timeout_s)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not (self.server.started and httpx.get(self.url + "/readyz").status_code == 200):
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.05)

    def post(self, path: str, body: dict, timeout: float = 60.0, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout, **kw)

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics (0 when absent), read with the Prometheus client's own parser."""
        text = httpx.get(self.url + "/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def wait_for(self, queued: int, running: int) -> None:
        """Until the batcher has ``queued`` requests waiting and ``running`` in the batch it runs."""
        b, deadline = self.engine.batcher, time.monotonic() + 10
        while (b.depth(), b.running()) != (queued, running):
            assert time.monotonic() < deadline, f"(queued, running) = {(b.depth(), b.running())}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True  # what uvicorn's SIGTERM handler does
        self.thread.join(60)


def body(seed: int, **kw) -> dict:
    return {"prompt": "a red fox", "steps": STEPS, "seed": seed, "height": 64, "width": 64, "sampler": "euler",
            **kw}  # fmt: skip


def pixels(b64png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))))


def alone(pipe: Pipeline, b: dict, image=None, mask=None) -> np.ndarray:
    """The request run by itself, straight on the pipeline: what the server must reproduce byte for byte."""
    req = pipe.request(Params(prompt=b["prompt"], negative_prompt=b.get("negative_prompt"), steps=b["steps"],
                              guidance=b.get("guidance", DEFAULT_GUIDANCE), height=b["height"], width=b["width"],
                              n=b.get("n", 1), seed=b["seed"], sampler=b["sampler"], image=image,
                              strength=b.get("strength"), mask=mask,
                              **{k: b[k] for k in OPTIONS if k in b}))  # fmt: skip
    return pipe.generate(req).numpy()


OPTIONS = ("eta", "clip_skip", "webui_clip_skip", "prompt_syntax", "emphasis", "pad_chunks", "guidance_rescale",
           "hires")  # fmt: skip


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
