"""runtime/capture.py's decisions, on the CPU: which requests replay one captured CUDA graph (the layout's key), and
which graphs the cache keeps (at most MAX_CAPTURED, the least recently used dropped first).

Recording a CUDA graph needs a GPU, so `Captured` is stood in for by `Recording`, which notes the layout it was made
for; everything else is the real cache and real requests. That a replay draws the step-by-step picture is
test_gpu's (on a GPU)."""

from __future__ import annotations

import pytest
from PIL import Image

from sdrt.runtime import capture
from sdrt.runtime.capture import MAX_CAPTURED, CaptureCache
from sdrt.runtime.control import Control
from sdrt.runtime.request import Layout, Request


class Recording:
    """`Captured` without the GPU: made once per capture, and a replay answers with the capture that served it."""

    def __init__(self, pipe, layout: Layout, plan, host: dict):
        self.key = layout.key

    def replay(self, host: dict, timings: dict) -> Recording:
        return self


@pytest.fixture
def cache(monkeypatch) -> CaptureCache:
    monkeypatch.setattr(capture, "Captured", Recording)
    return CaptureCache()


def request(**kw) -> Request:
    base = dict(prompts=("a red fox",), negatives=(None,), steps=4, guidance=7.5, height=64, width=64,
                images_per_prompt=1, seed=0, sampler="euler", strength=1.0)  # fmt: skip
    return Request(**{**base, **kw})


def replay(cache: CaptureCache, *reqs: Request) -> Recording:
    return cache.replay(None, Layout.of(list(reqs)), None, {}, {})


EDGES = Image.new("RGB", (64, 64), (255, 0, 0))
# requests that differ from request() only in what the captured graph reads as data
SAME_GRAPH = {
    "prompt and negative text": dict(prompts=("a boat at dusk",), negatives=("blurry",)),
    "seed": dict(seed=123),
    "guidance scale": dict(guidance=3.0),
    "LoRA adapters": dict(loras=(("kohya", 0.5), ("p", 1.0))),  # weights change in place, not the graph
}
# requests that change the graph body or its buffers' shapes
OTHER_GRAPH = {
    "size": dict(width=128),
    "steps": dict(steps=5),
    "sampler": dict(sampler="ddim"),
    "no guidance": dict(guidance=1.0),
    "images per prompt": dict(images_per_prompt=2),
    "two prompts": dict(prompts=("a", "b"), negatives=(None, None)),
    "init image": dict(image=Image.new("RGB", (64, 64)), strength=0.5),
    "clip skip": dict(clip_skip=(1, 0)),
    "ControlNet": dict(control=(Control("canny", EDGES, 1.0, 0.0, 1.0),)),
}


@pytest.mark.parametrize("change", SAME_GRAPH)
def test_requests_that_differ_only_in_data_replay_one_capture(cache, change):
    first = replay(cache, request())
    assert replay(cache, request(**SAME_GRAPH[change])) is first
    assert list(cache.graphs) == [first.key]


def test_adapters_join_batches_of_their_own_but_share_the_capture():
    plain, adapted = request(), request(**SAME_GRAPH["LoRA adapters"])
    assert plain.join_key != adapted.join_key  # one adapter set per engine batch
    assert Layout.of([plain]).key == Layout.of([adapted]).key


@pytest.mark.parametrize("change", OTHER_GRAPH)
def test_requests_that_change_the_graph_are_captured_apart(cache, change):
    first = replay(cache, request())
    other = replay(cache, request(**OTHER_GRAPH[change]))
    assert other is not first and len(cache.graphs) == 2
    assert replay(cache, request()) is first  # the first capture is still there


def test_controlnet_scales_and_images_are_data_but_their_names_are_not(cache):
    canny = Control("canny", EDGES, 1.0, 0.0, 1.0)
    first = replay(cache, request(control=(canny,)))
    other_values = canny._replace(image=Image.new("RGB", (64, 64)), scale=0.3, start=0.2, end=0.9)
    assert replay(cache, request(control=(other_values,))) is first
    assert replay(cache, request(control=(canny._replace(name="depth"),))) is not first


def test_joined_requests_are_captured_by_their_row_counts(cache):
    """Two one-image requests joined, and one request of two images, both fill 2 latent rows: the text rows tell
    their graphs apart. Two joined requests are the graph of any two such requests."""
    joined = replay(cache, request(), request(seed=1))
    two_images = replay(cache, request(images_per_prompt=2))
    assert joined is not two_images
    assert replay(cache, request(prompts=("x",), seed=7), request(guidance=5.0)) is joined


def test_the_least_recently_used_capture_goes_first(cache):
    widths = [64 + 8 * i for i in range(MAX_CAPTURED + 1)]
    graphs = [replay(cache, request(width=w)) for w in widths[:MAX_CAPTURED]]
    assert len(cache.graphs) == MAX_CAPTURED
    assert replay(cache, request(width=widths[0])) is graphs[0]  # the oldest is used again: now the newest
    newest = replay(cache, request(width=widths[-1]))  # one too many: the least recently used goes
    assert len(cache.graphs) == MAX_CAPTURED
    assert list(cache.graphs) == [Layout.of([request(width=w)]).key for w in (*widths[2:MAX_CAPTURED], widths[0])] + [
        newest.key
    ]
    assert replay(cache, request(width=widths[1])) is not graphs[1]  # dropped: captured again


def test_clear_drops_every_capture(cache):
    first = replay(cache, request())
    cache.clear()
    assert not cache.graphs
    assert replay(cache, request()) is not first
