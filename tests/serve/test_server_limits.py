"""`sdrt serve` survives hostile and careless clients: an over-limit body, a body of millions of tiny JSON values,
a decompression-bomb image and a megabyte prompt each get their 4xx within 2 s, the server's memory barely
moves, and the next normal request gets the same image as before.

The server is the real command (`sdrt serve`, through `sdrt.cli.main`) in a subprocess, so that its
resident memory (/proc/<pid>/status VmRSS) is its own; PIL's DecompressionBombWarning is an error in it, so a
bomb that reached ``Image.open`` would answer 500, not 400.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdrt.serve.inputs import ApiError, decode_image
from sdrt.serve.limits import MB, check_prompts

pytestmark = pytest.mark.xdist_group("server")

ANSWER_S = 2.0  # a hostile request's 4xx must come within this
RSS_GROWTH_MB = 200  # and the whole sequence may grow the server by less than this
BODY_MB = 300  # the hostile body, streamed: never held in the test process
PROMPT = "a red fox"
# `sdrt serve` with PIL's bomb warning an error (``-W`` cannot name a category outside the builtins)
SERVE = """import sys, warnings
from PIL import Image
warnings.simplefilter("error", Image.DecompressionBombWarning)
from sdrt.cli import main
sys.exit(main(sys.argv[1:]))"""


class Served:
    """`sdrt serve DIR` in a subprocess on 127.0.0.1 and a free port, ready when constructed."""

    def __init__(self, root, log, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-c", SERVE, "serve", str(root), "--port", str(port), "--backend", "onnxruntime",
               "--device", "cpu", "--warmup-steps", "1", *flags]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self._ready():
            assert self.proc.poll() is None, f"sdrt serve exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "sdrt serve did not become ready in 120 s"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def metric(self, name: str, **labels) -> float:
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics").text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def served(exports, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")  # noqa: SIM115 - closed below
    s = Served(exports.get("sd1", "fp32"), log)
    yield s
    s.stop()
    log.close()


def body(seed: int = 3, **kw) -> dict:
    return {"prompt": PROMPT, "steps": 2, "seed": seed, "height": 64, "width": 64, "sampler": "euler", **kw}


def zeros(total: int, chunk: int = MB) -> Iterator[bytes]:
    """``total`` bytes in ``chunk``-byte pieces, made as they are sent."""
    piece = b"0" * chunk
    for _ in range(total // chunk):
        yield piece


def bomb_png(side: int = 12000) -> str:
    """A base64 PNG of side x side pixels: a few kB of file, 144 M pixels to decode."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hostile() -> dict[str, tuple[str, dict, int, str]]:
    """What -> (path, `httpx.post` keywords, status, field) of each hostile request in the sequence."""
    stream = {"content-type": "application/json"}
    declared = {**stream, "content-length": str(BODY_MB * MB)}
    bomb, words = bomb_png(), "fox " * 2_000_000  # 8 MB, 2 million words
    values = json.dumps(body(prompt=["ab"] * 5_000_000)).encode()  # 29 MB: 5 million strings of 2 characters
    return {
        "declared 300 MB body": ("/v1/images", {"content": zeros(BODY_MB * MB), "headers": declared}, 413, "body"),
        "chunked 300 MB body": ("/v1/images", {"content": zeros(BODY_MB * MB), "headers": stream}, 413, "body"),
        "5 million prompts": ("/v1/images", {"content": values, "headers": stream}, 413, "body"),
        "12000x12000 image": ("/v1/images", {"json": body(image=bomb)}, 400, "image"),
        "12000x12000 mask": ("/v1/images", {"json": body(image=bomb_png(64), mask=bomb)}, 400, "mask"),
        "12000x12000 init_images.0": ("/sdapi/v1/img2img", {"json": {"prompt": PROMPT, "init_images": [bomb]}}, 400,
                                      "init_images.0"),
        "8 MB prompt": ("/v1/images", {"json": body(prompt=words)}, 400, "prompt"),
        "8 MB negative_prompt": ("/sdapi/v1/txt2img", {"json": {"prompt": PROMPT, "negative_prompt": words}}, 400,
                                 "negative_prompt"),
    }  # fmt: skip


def test_hostile_requests_get_4xx_fast_and_cost_no_memory(served):
    before = httpx.post(served.url + "/v1/images", json=body(), timeout=60)
    assert before.status_code == 200, before.text
    rss0, answers = served.rss_mb(), {}
    for what, (path, kw, status, field) in hostile().items():
        t = time.monotonic()
        r = httpx.post(served.url + path, timeout=30, **kw)
        answers[what] = (r, time.monotonic() - t, status, field)
        print(f"{what}: {r.status_code} in {answers[what][1]:.2f} s: {r.text[:150]}")
    rss1 = served.rss_mb()
    print(f"server VmRSS {rss0:.0f} MB -> {rss1:.0f} MB across the hostile requests")
    after = httpx.post(served.url + "/v1/images", json=body(), timeout=60)
    for what, (r, seconds, status, field) in answers.items():
        assert (r.status_code, r.json()["field"]) == (status, field), f"{what}: {r.text[:300]}"
        assert seconds < ANSWER_S, f"{what}: answered after {seconds:.2f} s"
    assert answers["declared 300 MB body"][0].headers["connection"] == "close"
    assert rss1 - rss0 < RSS_GROWTH_MB, f"server grew from {rss0:.0f} to {rss1:.0f} MB"
    assert after.status_code == 200 and after.json()["images"] == before.json()["images"]
    assert served.metric("sdrt_errors_total", kind="too_large", reason="body") == 2
    assert served.metric("sdrt_errors_total", kind="too_large", reason="json_values") == 1
    assert served.metric("sdrt_errors_total", kind="bad_request", reason="image_size") == 3
    assert served.metric("sdrt_errors_total", kind="bad_request", reason="prompt_length") == 2


def test_bodies_within_the_limit_are_served_streamed_or_not(served):
    """The count does not break normal requests: the same body, chunked without Content-Length, gets the same
    image; a long prompt under the limit is served and echoed whole."""
    url = served.url + "/v1/images"
    plain = httpx.post(url, json=body(seed=4), timeout=60)
    chunked = httpx.post(url, content=iter([json.dumps(body(seed=4)).encode()]), timeout=60,
                         headers={"content-type": "application/json"})  # fmt: skip
    assert plain.status_code == chunked.status_code == 200, chunked.text
    assert plain.json()["images"] == chunked.json()["images"]
    long = " ".join(["fox"] * 1000)  # 3999 characters, far past CLIP's 75 tokens: truncated, as before
    r = httpx.post(url, json=body(prompt=long), timeout=60)
    assert r.status_code == 200 and r.json()["parameters"]["prompt"] == long


def test_an_image_is_sized_from_its_header_and_never_reaches_the_bomb_check():
    """The header alone refuses a bomb: with PIL's warning an error, no warning is raised, and a 400 names the
    field. (``Image.open`` on the same bytes warns: the check this replaces.)"""
    bomb = bomb_png()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ApiError) as err:
            decode_image(bomb, "mask", 768 * 768)
        assert (err.value.status, err.value.field, err.value.reason) == (400, "mask", "image_size")
        with pytest.raises(Image.DecompressionBombWarning):
            Image.open(io.BytesIO(base64.b64decode(bomb)))
    for data, reason in (("R0lGODlhAQABAAAAACw=", "image_format"), ("not base64!", "image_data")):
        with pytest.raises(ApiError) as err:
            decode_image(data, "image", 768 * 768)
        assert err.value.reason == reason and err.value.field == "image"
    small = io.BytesIO()
    Image.new("RGB", (768, 768), (1, 2, 3)).save(small, format="JPEG")
    img = decode_image("data:image/jpeg;base64," + base64.b64encode(small.getvalue()).decode(), "image", 768 * 768)
    assert img.size == (768, 768) and img.format == "JPEG"


def test_bad_limit_flags_fail_before_loading(exports):
    root = exports.get("sd1", "fp32")
    for flag, value in (("--max-body-mb", "0"), ("--max-prompt-chars", "0"), ("--max-json-values", "1")):
        r = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", str(root), flag, value],
                           capture_output=True, text=True, timeout=60, env={**os.environ})  # fmt: skip
        assert r.returncode == 2 and flag in r.stderr, r.stderr


def test_a_deadline_that_passes_while_preparing_drops_the_request_there(served):
    """Decoding and resizing run in a thread before the queue; a deadline that passes meanwhile answers 504 and the
    request never reaches the engine."""
    dropped = served.metric("sdrt_dropped_total", reason="deadline", stage="preparing")
    batches = served.metric("sdrt_batch_requests_count")
    r = httpx.post(served.url + "/v1/images", json=body(timeout_s=1e-6), timeout=30)
    assert r.status_code == 504 and r.json()["error"] == "deadline", r.text
    assert served.metric("sdrt_dropped_total", reason="deadline", stage="preparing") == dropped + 1
    assert served.metric("sdrt_batch_requests_count") == batches


def test_help_names_the_limit_flags():
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    for flag in ("--max-body-mb", "--max-prompt-chars", "--max-json-values"):
        assert r.returncode == 0 and flag in r.stdout, r.stdout


def test_a_long_prompt_in_a_list_is_named_by_its_index():
    check_prompts({"prompt": ["a red fox", "fox " * 3], "negative_prompt": None}, 12)  # 12 characters pass
    with pytest.raises(ApiError) as err:
        check_prompts({"prompt": ["a red fox", "fox " * 4], "negative_prompt": None}, 12)
    assert (err.value.status, err.value.field, err.value.reason) == (400, "prompt.1", "prompt_length")
    assert "16 characters" in err.value.message and "--max-prompt-chars" in err.value.message
