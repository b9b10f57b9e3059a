"""serve/batch.py's `Batcher` on its own, over a real pipeline (the small sd1 export on ONNX Runtime): which queued
requests join one engine batch and in what order, the window a request waits for company, the bounded queue, the
deadline, cancellation, a failed batch, and shutdown. Every request's images are the pipeline's for it alone.

Holding the pipeline's lock stalls the worker inside its first batch, which makes the queue deterministic (the
HTTP tests in test_server do the same through the app)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Request
from sdrt.serve.batch import Batcher, Closed, Expired, Job, QueueFull
from sdrt.serve.metrics import Metrics


@pytest.fixture(scope="module")
def pipe(exports):
    with Pipeline.load(exports.get("sd1", "fp32"), backend="onnxruntime", device="cpu") as p:
        yield p


def request(pipe: Pipeline, seed: int, width: int = 64) -> Request:
    return pipe.request(Params(prompt="a red fox", steps=2, height=64, width=width, seed=seed, sampler="euler"))


@contextmanager
def batcher(pipe: Pipeline, **options) -> Iterator[Batcher]:
    options = {"max_images": 2, "window_s": 0.05, "max_queue": 8, **options}
    b = Batcher(pipe, metrics=Metrics(), name="t", **options)
    try:
        yield b
    finally:
        b.close()
        assert b.join(60), "the worker did not end"


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def submit(b: Batcher, req: Request, timeout_s: float = 120.0) -> Job:
    (job,) = b.submit([req], timeout_s)
    return job


def dropped(b: Batcher, reason: str, stage: str) -> float:
    return b.metrics.registry.get_sample_value("sdrt_dropped_total", {"reason": reason, "stage": stage}) or 0.0


def batches_run(b: Batcher) -> float:
    return b.metrics.registry.get_sample_value("sdrt_batch_requests_count") or 0.0


def test_the_oldest_request_runs_first_with_the_later_ones_it_can_join(pipe):
    """Queued behind a running batch: 64 px (2), 128 px (3), 64 px (4), 64 px (5). The oldest, 2, runs with 4 (its
    join key; two images fill the engine); then 3, the oldest left, alone; then 5."""

    async def main():
        with batcher(pipe) as b:
            reqs = [request(pipe, 1), request(pipe, 2), request(pipe, 3, width=128), request(pipe, 4), request(pipe, 5)]
            with pipe.lock:
                jobs = [submit(b, reqs[0])]
                await until(lambda: b.running() == 1)
                jobs += [submit(b, r) for r in reqs[1:]]
                assert (b.depth(), b.running()) == (4, 1)
            return reqs, [await j.future for j in jobs]

    reqs, outs = asyncio.run(main())
    assert [o.batch_id for o in outs] == ["t-0", "t-1", "t-2", "t-1", "t-3"]
    assert [(o.batch_requests, o.batch_images) for o in outs] == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    for r, o in zip(reqs, outs, strict=True):
        assert torch.equal(o.pixels, pipe.generate(r)), f"seed {r.seed}"
    assert len({o.pixels.numpy().tobytes() for o in outs}) == 5


def test_a_request_waits_the_window_for_company_unless_the_batch_fills(pipe):
    async def main():
        with batcher(pipe, window_s=0.5) as b:
            alone = await submit(b, request(pipe, 1)).future
        with batcher(pipe, window_s=30.0) as b:
            t = time.monotonic()
            jobs = [submit(b, request(pipe, 2)), submit(b, request(pipe, 3))]
            full = [await j.future for j in jobs]
            return alone, full, time.monotonic() - t

    alone, full, took = asyncio.run(main())
    assert alone.batch_requests == 1 and alone.timings_ms["queue_ms"] >= 500.0 - 1e-6
    assert full[0].batch_id == full[1].batch_id and full[0].batch_images == 2
    assert took < 15.0, "two images fill the engine: the batch need not wait out its 30 s window"


def test_a_full_queue_refuses_all_or_none_of_a_call(pipe):
    """max_queue counts queued images: a call whose requests do not all fit queues none of them."""

    async def main():
        with batcher(pipe, max_queue=2) as b:
            with pipe.lock:
                jobs = [submit(b, request(pipe, 1))]
                await until(lambda: b.running() == 1)
                jobs.append(submit(b, request(pipe, 2)))
                with pytest.raises(QueueFull) as err:
                    b.submit([request(pipe, 3), request(pipe, 4)], 60)
                assert 1 <= err.value.retry_after <= 60 and b.depth() == 1
                jobs.append(submit(b, request(pipe, 3)))
                with pytest.raises(QueueFull):
                    submit(b, request(pipe, 4))
                assert b.depth() == 2
            return [await j.future for j in jobs]

    assert len(asyncio.run(main())) == 3


def test_a_deadline_that_passes_in_the_queue_drops_the_request(pipe):
    """The worker wakes at the deadline (not at the end of the window): `Expired`, and no batch runs."""

    async def main():
        with batcher(pipe, window_s=30.0) as b:
            t = time.monotonic()
            with pytest.raises(Expired):
                await submit(b, request(pipe, 1), timeout_s=0.3).future
            return time.monotonic() - t, dropped(b, "deadline", "queued"), batches_run(b)

    took, n_dropped, n_batches = asyncio.run(main())
    assert 0.3 <= took < 10.0 and n_dropped == 1 and n_batches == 0


def test_cancelled_requests_leave_no_work_and_get_no_images(pipe):
    """A queued request leaves the queue; a running one's images are discarded when its batch ends. Neither
    caller's future is settled; the next request is served."""

    async def main():
        with batcher(pipe) as b:
            with pipe.lock:
                running = submit(b, request(pipe, 1))
                await until(lambda: b.running() == 1)
                queued = submit(b, request(pipe, 2, width=128))
                b.cancel([queued], "cancelled")
                assert b.depth() == 0
                b.cancel([running], "cancelled")
                b.cancel([running, queued], "cancelled")  # cancelling twice counts once
            await until(lambda: b.running() == 0)
            after = await submit(b, request(pipe, 3)).future
            await asyncio.sleep(0.1)  # anything the worker settled has reached the loop
            counts = dropped(b, "cancelled", "queued"), dropped(b, "cancelled", "running"), batches_run(b)
            return running.future.done(), queued.future.done(), after, counts

    running_done, queued_done, after, counts = asyncio.run(main())
    assert not running_done and not queued_done
    assert counts == (1, 1, 2)  # the cancelled running batch and the next one; the queued request never ran
    assert torch.equal(after.pixels, pipe.generate(request(pipe, 3)))


def test_a_failed_batch_fails_each_of_its_requests_and_the_worker_goes_on(pipe, monkeypatch):
    real, calls = pipe.generate_batch, []

    def fails_once(reqs, *args, **kw):
        calls.append(len(reqs))
        if len(calls) == 1:
            raise RuntimeError("engine fault")
        return real(reqs, *args, **kw)

    monkeypatch.setattr(pipe, "generate_batch", fails_once)

    async def main():
        with batcher(pipe) as b:
            jobs = b.submit([request(pipe, 1), request(pipe, 2)], 60)
            errors = []
            for j in jobs:
                with pytest.raises(RuntimeError, match="engine fault") as err:
                    await j.future
                errors.append(err.value)
            return errors, await submit(b, request(pipe, 3)).future

    errors, after = asyncio.run(main())
    assert calls == [2, 1] and errors[0] is errors[1]  # one joined batch failed, as one
    assert torch.equal(after.pixels, real([request(pipe, 3)]).pixels[0])


def test_close_refuses_new_requests_and_finishes_the_queued_ones(pipe):
    async def main():
        b = Batcher(pipe, 2, 0.05, 8, Metrics(), "t")
        with pipe.lock:
            jobs = [submit(b, request(pipe, 1))]
            await until(lambda: b.running() == 1)
            jobs.append(submit(b, request(pipe, 2, width=128)))
            b.close()
            with pytest.raises(Closed):
                submit(b, request(pipe, 3))
            assert not b.join(0.2)  # still working
        outs = [await j.future for j in jobs]
        return outs, await asyncio.to_thread(b.join, 60)

    outs, ended = asyncio.run(main())
    assert [o.batch_id for o in outs] == ["t-0", "t-1"] and ended
