"""`sdrt serve` on loopback: every served image is byte-identical to `Pipeline.generate` of the same request run
alone; requests join batches; and the failure answers (400, 503, 504, 500, disconnect, shutdown) hold.

One pipeline is loaded for the module; each server is uvicorn in a thread on an ephemeral port. Holding the
pipeline's lock from the test stalls the batch worker at a known point, which makes queueing deterministic.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdrt.runtime.pipeline import Pipeline
from tests.helpers.server import STEPS, LiveServer, alone, body, pixels, png_b64

pytestmark = pytest.mark.xdist_group("server")  # its fixtures are made once per process: keep it in one


@pytest.fixture(scope="module")
def pipe(exports):
    p = Pipeline.load(exports.get("sd1", "fp32"), backend="onnxruntime", device="cpu")
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(pipe):
    s = LiveServer(pipe)
    yield s
    s.stop()


def test_health_ready_and_metrics(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["ready"] is True
    text = httpx.get(server.url + "/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("sdrt_request_seconds", "sdrt_queue_depth", "sdrt_batch_images", "sdrt_images_generated",
                 "sdrt_errors", "sdrt_dropped"):  # fmt: skip
        assert name in names


def test_v1_images_match_generate_alone(server, pipe):
    b = body(11, n=2, negative_prompt="blurry", guidance=6.0)
    r = server.post("/v1/images", b)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = alone(pipe, b)
    assert [pixels(s).tobytes() for s in out["images"]] == [a.tobytes() for a in ref]
    assert out["parameters"] | {"model": None} == {**b, "model": None}
    assert {"queue_ms", "denoise_ms", "encode_ms"} <= out["timings_ms"].keys()
    text = Image.open(io.BytesIO(base64.b64decode(out["images"][1]))).text["parameters"]
    assert text == (
        "a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: euler, CFG scale: 6, Seed: 11, Size: 64x64, "
        f"Model: {pipe.model.name}, Batch size: 2, Batch pos: 1"
    )  # the web UI's infotext layout
    raw = server.post("/v1/images", body(11), headers={"Accept": "image/png"})
    assert raw.headers["content-type"] == "image/png" and raw.headers["x-seed"] == "11"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw.content))), alone(pipe, body(11))[0])


def test_concurrent_mixed_requests_join_and_each_gets_its_own_images(server, pipe):
    """Many clients, two sizes, distinct seeds: every request answered once, with its own seed's images."""
    bodies = [body(1000 + i, height=64 if i % 3 else 128) for i in range(24)]
    before = server.metric("sdrt_batch_requests_count"), server.metric("sdrt_batch_requests_sum")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: server.post("/v1/images", b), bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies)
    assert sorted(a.json()["parameters"]["seed"] for a in answers) == [b["seed"] for b in bodies]
    for b, a in zip(bodies, answers, strict=True):
        assert np.array_equal(pixels(a.json()["images"][0]), alone(pipe, b)[0]), f"seed {b['seed']}"
        batch = a.json()["batch"]
        assert batch["images"] <= 2 and batch["requests"] <= 2  # the engine's max_images is 2
    batches = server.metric("sdrt_batch_requests_count") - before[0]
    joined = server.metric("sdrt_batch_requests_sum") - before[1]
    assert joined == len(bodies) and batches < len(bodies), "no two requests shared a batch"


def test_requests_that_wait_together_join_one_batch(server, pipe):
    with ThreadPoolExecutor(3) as pool, pipe.lock:  # the worker stalls on its first batch; two queue behind
        futures = [pool.submit(server.post, "/v1/images", body(1))]
        server.wait_for(0, 1)
        futures += [pool.submit(server.post, "/v1/images", body(s)) for s in (2, 3)]
        server.wait_for(2, 1)
    a, b, c = (f.result().json() for f in futures)
    assert b["batch"]["id"] == c["batch"]["id"] != a["batch"]["id"] and b["batch"]["requests"] == 2
    assert np.array_equal(pixels(c["images"][0]), alone(pipe, body(3))[0])


def test_sdapi_txt2img_and_img2img(server, pipe):
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a red fox", "steps": STEPS, "seed": 40, "batch_size": 2,
                                          "sampler_name": "Euler", "width": 64, "height": 64, "cfg_scale": 7.5,
                                          "restore_faces": False, "override_settings": {}})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    assert json.loads(out["info"])["all_seeds"] == [40, 41] and out["parameters"]["batch_size"] == 2
    for i, s in enumerate(out["images"]):  # image i of a web-UI batch has seed + i
        assert np.array_equal(pixels(s), alone(pipe, body(40 + i))[0])
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    r = server.post("/sdapi/v1/img2img", {"prompt": "a red fox", "steps": 4, "seed": 7, "sampler_name": "DDIM",
                                          "init_images": ["data:image/png;base64," + png_b64(init)],
                                          "denoising_strength": 0.5, "cfg_scale": 7.5})  # fmt: skip
    assert r.status_code == 200, r.text
    ref = alone(pipe, body(7, steps=4, sampler="ddim", strength=0.5), image=init)[0]
    assert np.array_equal(pixels(r.json()["images"][0]), ref)


@pytest.mark.parametrize(
    "path,patch,field",
    [
        ("/v1/images", {"steps": 0}, "steps"),
        ("/v1/images", {"height": 76}, "height"),
        ("/v1/images", {"sampler": "dpm_fast"}, "sampler"),
        ("/v1/images", {"n": 3}, "n"),
        ("/v1/images", {"image": "not base64!"}, "image"),
        ("/v1/images", {"stepz": 4}, "stepz"),
        ("/v1/images", {"prompt": None}, "prompt"),
        ("/sdapi/v1/txt2img", {"cfg_scale": "high"}, "cfg_scale"),
        ("/sdapi/v1/txt2img", {"sampler_name": "DPM fast"}, "sampler_name"),
        ("/sdapi/v1/txt2img", {"width": 100}, "width"),
        ("/sdapi/v1/img2img", {"init_images": ["aGVsbG8="]}, "init_images.0"),
    ],
)
def test_bad_request_is_400_naming_the_field(server, path, patch, field):
    b = body(1) if path == "/v1/images" else {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    r = server.post(path, {**b, **patch})
    assert r.status_code == 400 and r.json()["field"] == field, r.text


def test_bad_timeout_header_and_png_for_several_images(server):
    r = server.post("/v1/images", body(1), headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400 and r.json()["field"] == "X-Request-Timeout"
    r = server.post("/v1/images", body(1, n=2), headers={"Accept": "image/png"})
    assert r.status_code == 406 and r.json()["field"] == "n"


def test_full_queue_is_503_with_retry_after(pipe):
    s = LiveServer(pipe, max_queue=2, max_batch=1)
    try:
        with ThreadPoolExecutor(3) as pool, pipe.lock:
            admitted = [pool.submit(s.post, "/v1/images", body(21))]
            s.wait_for(0, 1)  # the worker holds it, stalled on the lock
            admitted += [pool.submit(s.post, "/v1/images", body(seed)) for seed in (22, 23)]
            s.wait_for(2, 1)
            r = s.post("/v1/images", body(24))
            assert r.status_code == 503 and r.json()["error"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
        assert [f.result().status_code for f in admitted] == [200] * 3
        assert s.metric("sdrt_errors_total", kind="queue_full") == 1
    finally:
        s.stop()


def test_deadline_is_504_and_its_work_is_dropped(server, pipe):
    dropped = server.metric("sdrt_dropped_total", reason="deadline", stage="queued")
    batches = server.metric("sdrt_batch_requests_sum")
    with ThreadPoolExecutor(1) as pool, pipe.lock:
        first = pool.submit(server.post, "/v1/images", body(31))
        server.wait_for(0, 1)
        t = time.monotonic()
        r = server.post("/v1/images", body(32, timeout_s=0.3))
        assert r.status_code == 504 and r.json()["error"] == "deadline"
        assert 0.3 <= time.monotonic() - t < 3
    assert first.result().status_code == 200
    assert server.metric("sdrt_dropped_total", reason="deadline", stage="queued") == dropped + 1
    assert server.metric("sdrt_batch_requests_sum") == batches + 1  # only the first request ran


def test_client_that_disconnects_leaves_no_work(server, pipe):
    dropped = server.metric("sdrt_dropped_total", reason="cancelled", stage="queued")
    batches = server.metric("sdrt_batch_requests_sum")
    with ThreadPoolExecutor(1) as pool, pipe.lock:
        first = pool.submit(server.post, "/v1/images", body(41))
        server.wait_for(0, 1)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            server.post("/v1/images", body(42), timeout=0.5)
        deadline = time.monotonic() + 5
        while server.engine.batcher.depth() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.engine.batcher.depth() == 0, "the disconnected request is still queued"
    assert first.result().status_code == 200
    assert server.metric("sdrt_dropped_total", reason="cancelled", stage="queued") == dropped + 1
    assert server.metric("sdrt_errors_total", kind="disconnected") >= 1
    assert server.metric("sdrt_batch_requests_sum") == batches + 1


def test_internal_failure_is_500_and_the_next_request_is_served(server, pipe, monkeypatch):
    real = pipe.generate_batch
    calls = []

    def fails_once(reqs, *a, **kw):
        calls.append(len(reqs))
        if len(calls) == 1:
            raise RuntimeError("engine fault")
        return real(reqs, *a, **kw)

    monkeypatch.setattr(pipe, "generate_batch", fails_once)
    r = server.post("/v1/images", body(51))
    assert r.status_code == 500 and r.json()["error"] == "internal" and "engine fault" in r.json()["detail"]
    r = server.post("/v1/images", body(52))
    assert r.status_code == 200 and np.array_equal(pixels(r.json()["images"][0]), alone(pipe, body(52))[0])


def test_inpainting_engine_warms_up_and_serves_masked_requests(exports):
    """An inpainting U-Net takes only image + mask requests: the warm-up must be one, and /readyz must turn 200."""
    pipe = Pipeline.load(exports.get("sd1-inpaint", "fp32"), backend="onnxruntime", device="cpu")
    s = LiveServer(pipe)
    try:
        init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        mask = Image.fromarray(np.where(np.arange(64)[:, None] < 32, 255, 0).astype(np.uint8).repeat(64, 1))
        b = body(8)
        r = s.post("/v1/images", {**b, "image": png_b64(init), "mask": png_b64(mask)})
        assert r.status_code == 200, r.text
        assert np.array_equal(pixels(r.json()["images"][0]), alone(pipe, b, init, mask)[0])
        r = s.post("/v1/images", b)
        assert r.status_code == 400 and r.json()["field"] == "image"
    finally:
        s.stop()
        pipe.close()


def test_graceful_shutdown_finishes_requests_in_flight(pipe):
    s = LiveServer(pipe)
    with ThreadPoolExecutor(3) as pool:
        with pipe.lock:
            futures = [pool.submit(s.post, "/v1/images", body(60 + i)) for i in range(3)]
            deadline = time.monotonic() + 10
            while s.metric("sdrt_requests_in_flight") < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            stopping = threading.Thread(target=s.stop)
            stopping.start()
            time.sleep(0.3)  # uvicorn has stopped accepting; the three are still waiting on the stalled worker
            with pytest.raises(httpx.ConnectError):
                httpx.get(s.url + "/healthz")
        answers = [f.result() for f in futures]
    stopping.join(60)
    assert not s.thread.is_alive() and s.engine.batcher.join(0)  # uvicorn ended, then the worker drained
    assert [a.status_code for a in answers] == [200] * 3
    for i, a in enumerate(answers):
        assert np.array_equal(pixels(a.json()["images"][0]), alone(pipe, body(60 + i))[0])
