"""LoRA adapters over HTTP: ``loras`` on ``/v1/images``, the web UI's ``<lora:NAME:SCALE>`` tags on ``/sdapi``.

Each served image is byte-identical to the Pipeline called directly with the same ``Params(loras=...)``; requests
with different adapter sets never share an engine batch; a refused adapter is a 400 naming the field, and leaves the
pipeline as it was. The engine (an sd1 export with the kohya adapter ``kohya`` and the PEFT adapter ``p``) is the one
the runtime's LoRA tests use, the live server (uvicorn on loopback, a real HTTP client) the other HTTP tests' (both
from tests/helpers).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from sdrt.serve.inputs import ApiError
from sdrt.serve.lora_tags import prompt_loras
from tests.helpers.lora import KW, add_adapters, sd1_adapters
from tests.helpers.server import LiveServer, pixels, png_b64

pytestmark = pytest.mark.xdist_group("lora")

V1 = {"prompt": KW["prompt"], "negative_prompt": KW["negative_prompt"], "steps": KW["num_inference_steps"],
      "guidance": KW["guidance_scale"], "height": KW["height"], "width": KW["width"], "seed": KW["seed"],
      "sampler": KW["sampler"]}  # fmt: skip
SDAPI = {"prompt": KW["prompt"], "negative_prompt": KW["negative_prompt"], "steps": KW["num_inference_steps"],
         "cfg_scale": KW["guidance_scale"], "height": KW["height"], "width": KW["width"], "seed": KW["seed"],
         "sampler_name": "Euler"}  # fmt: skip
INIT = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(exports, folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lora")
    engine = add_adapters(exports.get("sd1", "fp32"), sd1_adapters(folders["sd1"], root), root / "sd1")
    with Pipeline.load(engine, backend="onnxruntime", device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def server(pipe):
    s = LiveServer(pipe)
    yield s
    s.stop()


def direct(pipe, loras: dict | None, seed: int = KW["seed"], **kw) -> bytes:
    """The image of `V1` (or ``kw`` over it) straight from the pipeline: what the server must give byte for byte."""
    b = {**V1, "seed": seed, **kw}
    params = Params(prompt=b["prompt"], negative_prompt=b["negative_prompt"], steps=b["steps"], guidance=b["guidance"],
                    height=b["height"], width=b["width"], seed=b["seed"], sampler=b["sampler"], image=b.get("image"),
                    strength=b.get("strength"), loras=loras)  # fmt: skip
    return pipe.generate(pipe.request(params)).numpy()[0].tobytes()


def served(r: httpx.Response) -> list[bytes]:
    assert r.status_code == 200, r.text
    return [pixels(s).tobytes() for s in r.json()["images"]]


@pytest.mark.parametrize("loras", [{"kohya": 0.5}, {"kohya": 0.7, "p": 0.5}])
def test_v1_images_loras_match_the_pipeline(server, pipe, loras):
    r = server.post("/v1/images", {**V1, "loras": loras})
    ours = direct(pipe, loras)
    assert served(r) == [ours] and r.json()["parameters"]["loras"] == loras
    assert ours != direct(pipe, None), "the adapter does not change the picture: the comparison would say nothing"
    assert served(server.post("/v1/images", V1)) == [direct(pipe, None)]  # and nothing stays applied


def test_sdapi_lora_tags_give_the_loras_field_picture(server, pipe):
    """Tags anywhere in the prompt, several adding up (the same name twice too), scale 1 when left out."""
    cases = [
        (f"{KW['prompt']} <lora:kohya:0.5>", {"kohya": 0.5}),
        (f"<lora:kohya:0.25>{KW['prompt']} <lora:p> <lora:kohya:0.25>", {"kohya": 0.5, "p": 1.0}),
    ]
    for prompt, loras in cases:
        r = server.post("/sdapi/v1/txt2img", {**SDAPI, "prompt": prompt})
        assert served(r) == served(server.post("/v1/images", {**V1, "loras": loras})) == [direct(pipe, loras)]
        info = json.loads(r.json()["info"])
        assert info["prompt"] == r.json()["parameters"]["prompt"] == prompt  # echoed as sent, as the web UI does
    assert direct(pipe, cases[0][1]) != direct(pipe, None)


def test_sdapi_img2img_with_a_lora_tag(server, pipe):
    body = {**SDAPI, "init_images": [png_b64(INIT)], "denoising_strength": 0.5}
    r = server.post("/sdapi/v1/img2img", {**body, "prompt": KW["prompt"] + " <lora:p:0.8>"})
    ours = direct(pipe, {"p": 0.8}, image=INIT, strength=0.5)
    assert served(r) == [ours] and ours != direct(pipe, None, image=INIT, strength=0.5)
    assert served(server.post("/sdapi/v1/img2img", body)) == [direct(pipe, None, image=INIT, strength=0.5)]


def test_different_adapter_sets_never_share_a_batch(server, pipe):
    """Queued together, same size, steps and sampler: only the requests with the same adapters join (the oldest
    skips the next in line for the one after it), and each gets the image it gets alone."""
    sets = [None, {"kohya": 0.5}, {"p": 1.0}, {"kohya": 0.5}]
    futures = []
    with ThreadPoolExecutor(4) as pool, pipe.lock:  # the worker stalls on the first; the other three queue behind
        for i, s in enumerate(sets):  # one at a time: the queue's order is the list's
            futures.append(pool.submit(server.post, "/v1/images", {**V1, "seed": 1 + i, "loras": s}))
            server.wait_for(i, 1)
    answers = [f.result() for f in futures]
    for i, (s, r) in enumerate(zip(sets, answers, strict=True)):
        assert served(r) == [direct(pipe, s, seed=1 + i)], f"request {i} with {s}"
    batches = [r.json()["batch"] for r in answers]
    assert batches[1]["id"] == batches[3]["id"] and batches[1]["requests"] == 2
    assert len({b["id"] for b in batches}) == 3 and batches[2]["requests"] == 1


@pytest.mark.parametrize(
    "path,patch,field,msg",
    [
        ("/v1/images", {"loras": {"nope": 1.0}}, "loras", "unknown LoRA adapter 'nope' (this engine has: kohya, p)"),
        ("/v1/images", {"loras": {"kohya": float("nan")}}, "loras", "LoRA scale of 'kohya' must be a finite number"),
        ("/v1/images", {"loras": {"kohya": "1"}}, "loras", "LoRA scale of 'kohya' must be a finite number"),
        ("/v1/images", {"loras": ["kohya"]}, "loras", "loras: Input should be a valid dictionary"),
        ("/sdapi/v1/txt2img", {"prompt": "a fox <lora:nope:0.5>"}, "prompt", "unknown LoRA adapter 'nope'"),
        ("/sdapi/v1/txt2img", {"prompt": "a fox <lora:kohya:inf>"}, "prompt", "must be a finite number, got inf"),
        ("/sdapi/v1/txt2img", {"prompt": "a fox <lora:kohya:lots>"}, "prompt", "the scale 'lots' is not a number"),
        ("/sdapi/v1/txt2img", {"prompt": "<lora:kohya:0.5:1>"}, "prompt", "one scale for text encoder and U-Net"),
        ("/sdapi/v1/txt2img", {"prompt": "<hypernet:kohya:1>"}, "prompt", "sdrt applies LoRA adapters only"),
        ("/sdapi/v1/img2img", {"prompt": "<lora:p> <lora:nope>", "init_images": [png_b64(INIT)]}, "prompt",
         "unknown LoRA adapter 'nope'"),
    ],
)  # fmt: skip
def test_refused_adapters_are_400_and_change_nothing(server, pipe, path, patch, field, msg):
    assert served(server.post("/v1/images", {**V1, "loras": {"p": 1.0}})) == [direct(pipe, {"p": 1.0})]
    held = dict(pipe.adapters.current)
    body = {**(V1 if path == "/v1/images" else SDAPI), **patch}
    r = httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_request", r.text
    assert r.json()["field"] == field and msg in r.json()["detail"] and "\n" not in r.json()["detail"], r.text
    assert pipe.adapters.current == held and held["unet"] == (("p", 1.0),)
    assert served(server.post("/v1/images", V1)) == [direct(pipe, None)]


def test_prompt_loras_reads_tags_as_the_web_ui():
    assert prompt_loras("a fox") == ("a fox", {})
    assert prompt_loras("a fox <lora:kohya:0.5>, snow<lora:p>") == ("a fox , snow", {"kohya": 0.5, "p": 1.0})
    assert prompt_loras("<lyco:p:-0.5>x") == ("x", {"p": -0.5})  # the web UI's alias of lora
    # the same name twice: the web UI applies the one network once per tag, at the last tag's scale
    assert prompt_loras("<lora:kohya:0.1> x <lora:kohya:0.25>") == (" x ", {"kohya": 0.5})
    for bad in ("<lora:a:te=0.5>", "<lora:a:1:0.5>", "<hypernet:a>", "<lora:a:1.0x>"):
        with pytest.raises(ApiError) as err:
            prompt_loras(bad)
        assert err.value.field == "prompt" and repr(bad) in err.value.message
