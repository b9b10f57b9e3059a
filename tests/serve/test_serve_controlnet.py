"""ControlNet over HTTP: ``controlnets`` on ``/v1/images``, the ControlNet extension's units in ``alwayson_scripts``
on ``/sdapi`` (through the real ``webuiapi`` client).

Each served image is byte-identical to the Pipeline called directly with the same ControlNets; requests that
differ only in scales and images share an engine batch, requests with other ControlNets never do; a refused
ControlNet is a one-line 400 naming the field as the client spelt it. The engine is the small sd1 folder with two
ControlNets from tests/helpers/controlnet.py's `make_controlnet`, one named as the web UI lists a model (without its
hash); the live server (uvicorn on loopback) comes from tests/helpers/server.py.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from sdrt.runtime.params import ControlNetArg, Params
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.controlnet import control_image, make_controlnet
from tests.helpers.server import LiveServer, pixels, png_b64

pytestmark = pytest.mark.xdist_group("serve_controlnet")  # one server for the module: keep it in one process

CANNY = "control_v11p_sd15_canny"  # the web UI sends "control_v11p_sd15_canny [d14c016b]"
STEPS = 3
V1 = {"prompt": "a red fox", "steps": STEPS, "guidance": 6.0, "height": 64, "width": 64, "seed": 21,
      "sampler": "euler"}  # fmt: skip
EDGES, DEPTH = control_image(64, 64), control_image(96, 64).transpose(Image.FLIP_LEFT_RIGHT)
INIT = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(folders, tmp_path_factory):
    from sdrt.cli import main

    root = tmp_path_factory.mktemp("serve-controlnet")
    canny = make_controlnet(folders["sd1"] / "unet", root / "canny")
    depth = make_controlnet(folders["sd1"] / "unet", root / "depth", seed=4)
    args = ["--min-size", "64", "--max-size", "128", "--max-batch", "2", "--controlnet", f"{canny}={CANNY}",
            "--controlnet", f"{depth}=depth"]  # fmt: skip
    assert main(["export", str(folders["sd1"]), str(root / "engine"), "--precision", "fp32", *args]) == 0
    with Pipeline.load(root / "engine", backend="onnxruntime", device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def server(pipe):
    s = LiveServer(pipe)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def webui(server) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=STEPS)


def direct(pipe, controlnets, seed: int = V1["seed"], **kw) -> bytes:
    """`V1` (``kw`` over it) with ``controlnets`` straight from the pipeline: what the server must give exactly."""
    b = {**V1, "seed": seed, **kw}
    params = Params(prompt=b["prompt"], negative_prompt=b.get("negative_prompt"), steps=b["steps"],
                    guidance=b["guidance"], height=b["height"], width=b["width"], seed=b["seed"], sampler=b["sampler"],
                    image=b.get("image"), strength=b.get("strength"), controlnets=controlnets)  # fmt: skip
    return pipe.generate(pipe.request(params)).numpy()[0].tobytes()


def served(r: httpx.Response) -> list[bytes]:
    assert r.status_code == 200, r.text
    return [pixels(s).tobytes() for s in r.json()["images"]]


def spec(name: str, image: Image.Image, scale: float = 1.0, start: float = 0.0, end: float = 1.0) -> dict:
    return {"name": name, "image": png_b64(image), "scale": scale, "start": start, "end": end}


def unit(model: str, image: Image.Image, **kw) -> dict:
    """A unit as the ControlNet extension's API documents it (older versions' ``input_image``)."""
    return {"input_image": png_b64(image), "model": model, "module": "none", "weight": 1.0, "guidance_start": 0.0,
            "guidance_end": 1.0, "control_mode": "Balanced", "resize_mode": "Just Resize", "pixel_perfect": False,
            "lowvram": False, "processor_res": 512, "threshold_a": 64, "threshold_b": 64, "guessmode": False,
            **kw}  # fmt: skip


def sdapi(units: list[dict], **kw) -> dict:
    return {"prompt": V1["prompt"], "steps": STEPS, "cfg_scale": V1["guidance"], "width": 64, "height": 64,
            "seed": V1["seed"], "sampler_name": "Euler", "alwayson_scripts": {"controlnet": {"args": units}},
            **kw}  # fmt: skip


def test_v1_images_controlnets_match_the_pipeline(server, pipe):
    """Two ControlNets with their own scales and windows, the second's image resized to the request's size; the
    echo lists them without images. The reference is the diffusers-style call."""
    body = {**V1, "controlnets": [spec(CANNY, EDGES, 0.8), spec("depth", DEPTH, 1.2, 0.25)]}
    r = server.post("/v1/images", body)
    kw = dict(prompt=V1["prompt"], num_inference_steps=STEPS, guidance_scale=6.0, height=64, width=64, seed=21,
              sampler="euler", controlnet=[CANNY, "depth"], control_image=[EDGES, DEPTH],
              controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.25])  # fmt: skip
    ours = np.asarray(pipe(**kw)[0]).tobytes()
    assert served(r) == [ours] and ours != direct(pipe, ())
    assert r.json()["parameters"]["controlnets"] == [
        {"name": CANNY, "scale": 0.8, "start": 0.0, "end": 1.0},
        {"name": "depth", "scale": 1.2, "start": 0.25, "end": 1.0},
    ]
    assert served(server.post("/v1/images", V1)) == [direct(pipe, ())]


def test_webuiapi_txt2img_with_units(webui, pipe):
    """The real client's units: the model as the web UI lists it (with its hash), a disabled unit skipped, the
    client's default "Resize and Fill" on a control image of the request's aspect ratio; image i of a batch has
    seed + i."""
    units = [webuiapi.ControlNetUnit(image=EDGES.resize((32, 32)), model=f"{CANNY} [d14c016b]", weight=0.7,
                                     guidance_start=0.1, guidance_end=0.9),
             webuiapi.ControlNetUnit(image=EDGES, model="depth", enabled=False),
             webuiapi.ControlNetUnit(image=DEPTH, model="depth", weight=1.3, resize_mode="Just Resize")]  # fmt: skip
    # a fresh alwayson_scripts each call: webuiapi writes the units into its default dict, which later calls reuse
    r = webui.txt2img(prompt=V1["prompt"], seed=30, batch_size=2, cfg_scale=6.0, width=64, height=64,
                      controlnet_units=units, alwayson_scripts={})  # fmt: skip
    controls = [ControlNetArg(CANNY, EDGES.resize((32, 32)), 0.7, 0.1, 0.9), ControlNetArg("depth", DEPTH, 1.3)]
    assert r.info["all_seeds"] == [30, 31] and len(r.images) == 2
    for i, image in enumerate(r.images):
        assert np.asarray(image).tobytes() == direct(pipe, controls, seed=30 + i, negative_prompt=""), i
    assert 'ControlNet 1: "Model: depth, Weight: 1.3, Guidance Start: 0, Guidance End: 1"' in r.info["infotexts"][0]


def test_webuiapi_img2img_with_a_unit(webui, pipe):
    unit_ = webuiapi.ControlNetUnit(image=EDGES, model=CANNY, weight=0.9, resize_mode="Crop and Resize")
    r = webui.img2img(images=[INIT], prompt=V1["prompt"], seed=7, denoising_strength=0.6, cfg_scale=6.0, width=64,
                      height=64, controlnet_units=[unit_], alwayson_scripts={})  # fmt: skip
    ours = direct(pipe, [ControlNetArg(CANNY, EDGES, 0.9)], seed=7, image=INIT, strength=0.6, negative_prompt="")
    assert np.asarray(r.image).tobytes() == ours != direct(pipe, (), seed=7, image=INIT, strength=0.6)


def test_sdapi_older_units_and_other_scripts(server, pipe):
    """``input_image`` (older extension versions), the extension's preprocessing keys, another script (ignored,
    as before), no size (the first control image's); the echo leaves the images out."""
    units = [unit(CANNY, EDGES, weight=0.5, resize_mode=1), unit("depth", DEPTH, guidance_end=0.5)]
    body = sdapi(units, width=None, height=None)
    body["alwayson_scripts"]["ADetailer"] = {"args": [True, {"ad_model": "face_yolov8n.pt"}]}
    r = server.post("/sdapi/v1/txt2img", body)
    controls = [ControlNetArg(CANNY, EDGES, 0.5), ControlNetArg("depth", DEPTH, end=0.5)]
    assert served(r) == [direct(pipe, controls, negative_prompt="")]
    echoed = r.json()["parameters"]["alwayson_scripts"]
    assert list(echoed) == ["controlnet"] and echoed["controlnet"]["args"][1]["input_image"] is None
    assert echoed["controlnet"]["args"][1]["guidance_end"] == 0.5


def test_other_scales_join_other_controlnets_do_not(server, pipe):
    """Queued together, same size, steps and sampler: the two with the same ControlNet (other scales, windows and
    images) share a batch, the one with another ControlNet runs alone; each gets the image it gets alone."""
    sets = [("depth", DEPTH, 1.0, 0.0), (CANNY, EDGES, 0.5, 0.0), (CANNY, DEPTH, 1.5, 0.3), ("depth", EDGES, 1.0, 0.0)]
    futures = []
    with ThreadPoolExecutor(4) as pool, pipe.lock:  # the worker stalls on the first; the other three queue behind
        for i, s in enumerate(sets):  # one at a time: the queue's order is the list's
            futures.append(pool.submit(server.post, "/v1/images", {**V1, "seed": 1 + i, "controlnets": [spec(*s)]}))
            server.wait_for(i, 1)
    answers = [f.result() for f in futures]
    for i, (s, r) in enumerate(zip(sets, answers, strict=True)):
        assert served(r) == [direct(pipe, [ControlNetArg(*s)], seed=1 + i)], f"request {i} with {s[0]}"
    batches = [r.json()["batch"] for r in answers]
    assert batches[1]["id"] == batches[2]["id"] and batches[1]["requests"] == 2
    assert len({b["id"] for b in batches}) == 3 and batches[3]["requests"] == 1


ARGS = "alwayson_scripts.controlnet.args"


@pytest.mark.parametrize(
    "path,patch,field,msg",
    [
        ("/v1/images", {"controlnets": [spec("sketch", EDGES)]}, "controlnets.0.name",
         f"no ControlNet 'sketch'; it has {CANNY}, depth"),
        ("/v1/images", {"controlnets": [spec(CANNY, EDGES), {**spec("depth", EDGES), "image": "aGVsbG8="}]},
         "controlnets.1.image", "controlnets.1.image is not a PNG, JPEG or WebP image"),
        ("/v1/images", {"controlnets": [spec(CANNY, EDGES), spec("depth", EDGES, float("nan"))]},
         "controlnets.1.scale", "ControlNet 'depth': control scale must be a finite number"),
        ("/v1/images", {"controlnets": [{**spec(CANNY, EDGES), "weight": 0.5}]}, "controlnets.0.weight",
         "Extra inputs are not permitted"),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES, enabled=False), unit("sketch [0123abcd]", EDGES)]),
         f"{ARGS}.1.model", "no ControlNet 'sketch'"),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES, input_image="bm90IGFuIGltYWdl")]), f"{ARGS}.0.input_image",
         "is not a PNG, JPEG or WebP image"),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES, module="canny")]), f"{ARGS}.0.module",
         'sdrt does not run preprocessors; send the preprocessed control image with module "none"'),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES, control_mode="ControlNet is more important")]),
         f"{ARGS}.0.control_mode", "changes the guidance"),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES, control_mode=1)]), f"{ARGS}.0.control_mode",
         'send control_mode "Balanced"'),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES), unit("depth", DEPTH, resize_mode="Crop and Resize")]),
         f"{ARGS}.1.resize_mode", "would crop or pad the 96x64 control image to 64x64"),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES, guidance_start=0.8, guidance_end=0.2)]),
         f"{ARGS}.0.guidance_end", "0 <= start < end <= 1"),
        ("/sdapi/v1/txt2img", sdapi([unit(CANNY, EDGES, weight="strong")]), f"{ARGS}.0.weight",
         "valid number"),
        ("/sdapi/v1/img2img", {**sdapi([unit("sketch", EDGES)]), "init_images": [png_b64(INIT)]},
         f"{ARGS}.0.model", "no ControlNet 'sketch'"),
    ],
)  # fmt: skip
def test_refusals_are_one_line_400_naming_the_field(server, path, patch, field, msg):
    body = {**V1, **patch} if path == "/v1/images" else patch
    r = httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_request", r.text
    assert r.json()["field"] == field and msg in r.json()["detail"] and "\n" not in r.json()["detail"], r.text


def test_webuiapi_refusal_names_the_unit(webui):
    """What the real client raises for a preprocessor it asks for (``module``), naming the unit's field."""
    units = [webuiapi.ControlNetUnit(image=EDGES, model=CANNY, module="canny")]
    with pytest.raises(RuntimeError) as err:  # webuiapi: (status, body text) for any status but 200
        webui.txt2img(prompt="x", width=64, height=64, controlnet_units=units, alwayson_scripts={})
    assert err.value.args[0] == 400
    assert json.loads(err.value.args[1])["field"] == "alwayson_scripts.ControlNet.args.0.module"
