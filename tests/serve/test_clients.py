"""Real clients against `sdrt serve` on a real port: the official ``openai`` package on ``/v1/images/generations``
and ``webuiapi`` (the Python client written for the AUTOMATIC1111 web UI's API) on ``/sdapi/v1``. Every image they
decode is byte-identical to `Pipeline.generate` of the same request run alone, and every refusal reaches the caller
as the client's own exception, naming the field.

The server is `tests.helpers.server.LiveServer` (uvicorn in a thread on an ephemeral port) over the module's
pipeline, which also computes the references.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from openai.types import ImagesResponse
from PIL import Image

from sdrt.runtime.pipeline import Pipeline
from tests.helpers.server import LiveServer, alone

pytestmark = pytest.mark.xdist_group("clients")  # one server for the module: keep it in one process

STEPS = 3


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


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # sdrt checks no key, but the client insists on one; no retries: each answer is the server's first
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def webui(server) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=STEPS)


def request(seed: int, **kw) -> dict:
    """A request in `Pipeline.request`'s names, for `test_server.alone`."""
    return {"prompt": "a red fox", "steps": STEPS, "seed": seed, "height": 64, "width": 64, "sampler": "euler", **kw}


def decoded(b64png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))))


def noise_image(seed: int, mode: str = "RGB") -> Image.Image:
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


# -- openai ----------------------------------------------------------------------------------------------------------


def test_openai_images_are_the_pipelines(client, server, pipe):
    """n images from one seed (as /v1/images), sdrt's own fields in extra_body, OpenAI's answer shape."""
    extra = {"seed": 3, "steps": STEPS, "sampler": "euler", "negative_prompt": "blurry", "guidance": 6.0}
    t0 = int(time.time())
    resp = client.images.generate(model="sdrt", prompt="a red fox", n=2, size="64x64", response_format="b64_json",
                                  extra_body=extra)  # fmt: skip
    assert isinstance(resp, ImagesResponse) and len(resp.data) == 2
    ref = alone(pipe, request(3, n=2, negative_prompt="blurry", guidance=6.0))
    assert [decoded(d.b64_json).tobytes() for d in resp.data] == [a.tobytes() for a in ref]
    assert t0 <= resp.created <= time.time() and (resp.size, resp.output_format) == ("64x64", "png")
    assert resp.model_extra["parameters"]["seed"] == 3 and resp.data[0].url is None
    assert server.metric("sdrt_responses_total", endpoint="/v1/images/generations", status="200") >= 1


def test_openai_size_is_width_by_height_and_absent_is_the_models_own(client, pipe):
    """``128x64`` is landscape; a web-UI sampler name works; any model name is accepted; without a seed one is
    drawn and echoed, and it gives the same image."""
    resp = client.images.generate(model="dall-e-3", prompt="a lighthouse", size="128x64",
                                  extra_body={"steps": STEPS, "sampler": "Euler a"})  # fmt: skip
    seed = resp.model_extra["parameters"]["seed"]
    image = decoded(resp.data[0].b64_json)
    assert image.shape == (64, 128, 3) and resp.size == "128x64"
    ref = alone(pipe, request(seed, prompt="a lighthouse", width=128, sampler="euler_a"))[0]
    assert np.array_equal(image, ref)
    resp = client.images.generate(prompt="a lighthouse", extra_body={"steps": STEPS, "seed": 5})
    height, width = pipe.default_size()
    assert resp.size == f"{width}x{height}" and len(resp.data) == 1
    ref = alone(pipe, request(5, prompt="a lighthouse", height=height, width=width, sampler=None))[0]
    assert np.array_equal(decoded(resp.data[0].b64_json), ref)


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"size": "64by64"}, "size"),
        ({"size": "76x64"}, "size"),  # the engine's sizes step by 8
        ({"size": "64x256"}, "size"),  # and stop at 192
        ({"response_format": "url"}, "response_format"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"n": 3}, "n"),  # the engine's batch is 2
        ({"extra_body": {"stepz": 4}}, "stepz"),
        ({"extra_body": {"sampler": "dpm_fast"}}, "sampler"),
        ({"extra_body": {"seed": -1}}, "seed"),
        ({"extra_body": {"steps": "many"}}, "steps"),
    ],
)
def test_openai_bad_request_raises_bad_request_error_naming_the_param(client, kw, param):
    kw = {"size": "64x64", **kw, "extra_body": {"steps": STEPS, "seed": 1, **kw.get("extra_body", {})}}
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a red fox", **kw)
    assert err.value.param == param, err.value.body
    assert err.value.body == {"message": err.value.body["message"], "type": "invalid_request_error", "param": param,
                              "code": "bad_request"}  # fmt: skip
    if param == "response_format":
        assert "b64_json" in err.value.message


def test_openai_requests_keep_the_servers_limits(client, server):
    """A prompt over --max-prompt-chars is a 400 naming it; a body over --max-json-values a 413 in OpenAI's shape
    (the body middleware answers it before the app parses anything)."""
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="fox " * 2100, extra_body={"steps": STEPS})  # 8400 characters
    assert err.value.param == "prompt" and "--max-prompt-chars" in err.value.message
    before = server.metric("sdrt_errors_total", kind="too_large", reason="json_values")
    with pytest.raises(openai.APIStatusError) as err:
        client.images.generate(prompt="," * 70_000, extra_body={"steps": STEPS})
    assert err.value.status_code == 413 and (err.value.param, err.value.code) == ("body", "too_large")
    assert err.value.type == "invalid_request_error" and "--max-json-values" in err.value.message
    assert server.metric("sdrt_errors_total", kind="too_large", reason="json_values") == before + 1


def test_a_wrong_method_or_path_answers_in_the_endpoints_error_shape(server):
    """405 (with Allow) on the OpenAI path in OpenAI's shape, so its client reads it; 404 elsewhere in sdrt's."""
    r = httpx.get(server.url + "/v1/images/generations")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"] | {"message": None} == {"message": None, "type": "invalid_request_error", "param": None,
                                                      "code": "bad_request"}  # fmt: skip
    r = httpx.post(server.url + "/v1/images/edits", json={})
    assert r.status_code == 404 and r.json() == {"error": "not_found", "field": None, "detail": "Not Found"}


def test_serve_help_names_the_openai_endpoint():
    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0 and "/v1/images/generations" in r.stdout, r.stdout


# -- webuiapi --------------------------------------------------------------------------------------------------------


def test_webuiapi_txt2img_and_a_batch(webui, pipe):
    """Image i of a web-UI batch has seed + i; the Karras schedule comes as the web UI's separate scheduler."""
    r = webui.txt2img(prompt="a red fox", negative_prompt="blurry", seed=40, cfg_scale=6.0, width=64, height=64)
    assert np.array_equal(np.asarray(r.image), alone(pipe, request(40, negative_prompt="blurry", guidance=6.0))[0])
    r = webui.txt2img(prompt="a red fox", seed=50, batch_size=2, cfg_scale=7.5, width=64, height=64,
                      sampler_name="DPM++ 2M", scheduler="Karras")  # fmt: skip
    assert r.info["all_seeds"] == [50, 51] and r.info["sampler_name"] == "DPM++ 2M Karras" and len(r.images) == 2
    for i, image in enumerate(r.images):
        assert np.array_equal(np.asarray(image), alone(pipe, request(50 + i, sampler="dpmpp_2m_karras"))[0]), i
    r = webui.txt2img(prompt="a red fox", seed=60, cfg_scale=7.5, width=64, height=64, sampler_name="DPM++ 2M SDE",
                      scheduler="Karras")  # fmt: skip
    assert r.info["sampler_name"] == "DPM++ 2M SDE Karras"
    assert np.array_equal(np.asarray(r.image), alone(pipe, request(60, sampler="dpmpp_2m_sde_karras", eta=1.0))[0])


def test_webuiapi_img2img_and_inpainting_batch(webui, pipe):
    init = noise_image(0)
    r = webui.img2img(images=[init], prompt="a red fox", seed=7, denoising_strength=0.5, cfg_scale=7.5,
                      sampler_name="DDIM", steps=4, width=64, height=64)  # fmt: skip
    ref = alone(pipe, request(7, steps=4, sampler="ddim", strength=0.5, eta=1.0), image=init)[0]  # webuiapi's eta
    assert np.array_equal(np.asarray(r.image), ref) and r.info["denoising_strength"] == 0.5
    mask = Image.fromarray(np.where(np.arange(64)[:, None] < 32, 255, 0).astype(np.uint8).repeat(64, 1))
    r = webui.img2img(images=[init], mask_image=mask, prompt="a red fox", seed=9, batch_size=2,
                      denoising_strength=0.9, cfg_scale=7.5, width=64, height=64)  # fmt: skip
    assert r.info["all_seeds"] == [9, 10]
    for i, image in enumerate(r.images):
        ref = alone(pipe, request(9 + i, strength=0.9), image=init, mask=mask)[0]
        assert np.array_equal(np.asarray(image), ref), i


def test_webuiapi_hires_fix(webui, pipe):
    """enable_hr with a latent upscaler, its own steps, strength and sampler: the pipeline's two-pass picture
    (test_hires holds that against diffusers' pieces), and the web UI's hires entries in the parameters."""
    from sdrt.runtime.params import Hires

    r = webui.txt2img(prompt="a red fox", seed=21, cfg_scale=7.5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                      hr_upscaler="Latent (nearest-exact)", hr_second_pass_steps=3, denoising_strength=0.6,
                      hr_sampler_name="DPM++ 2M")  # fmt: skip
    hires = Hires(scale=1.5, upscaler="Latent (nearest-exact)", steps=3, strength=0.6, sampler="dpmpp_2m")
    ref = alone(pipe, request(21, prompt_syntax="webui", hires=hires))[0]
    assert np.asarray(r.image).shape == (96, 96, 3) and np.array_equal(np.asarray(r.image), ref)
    text = r.info["infotexts"][0]
    assert "Size: 64x64" in text and "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 3, " \
        "Hires upscaler: Latent (nearest-exact), Hires sampler: dpmpp_2m" in text  # fmt: skip


def test_webuiapi_refusals_and_samplers(webui):
    with pytest.raises(RuntimeError) as err:  # what webuiapi raises for any status but 200: (status, body text)
        webui.txt2img(prompt="a red fox", enable_hr=True, hr_upscaler="R-ESRGAN 4x+", width=64, height=64)
    assert err.value.args[0] == 400 and '"field":"hr_upscaler"' in err.value.args[1]
    with pytest.raises(RuntimeError) as err:
        webui.txt2img(prompt="a red fox", enable_hr=True, hr_scale=4, width=64, height=64)
    assert err.value.args[0] == 400 and '"field":"hr_scale"' in err.value.args[1]
    with pytest.raises(RuntimeError) as err:
        webui.txt2img(prompt="a red fox", sampler_name="DPM adaptive", width=64, height=64)
    assert err.value.args[0] == 400 and '"field":"sampler_name"' in err.value.args[1]
    names = {s["name"] for s in webui.get_samplers()}
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ SDE", "DPM++ SDE Karras"} <= names


# -- what web-UI clients send: prompts in its syntax, its settings ------------------------------------------------


def test_webuiapi_prompts_and_settings_mean_what_they_mean_in_the_web_ui(webui, pipe):
    """Emphasis and BREAK in the prompt, a long negative, clip skip 2 and "No norm" emphasis in override_settings,
    and the DDIM eta webuiapi sends: the pipeline's picture for the web-UI reading of the same request
    (test_prompts holds that reading against float64 states and diffusers)."""
    prompt, negative = "a (red:1.4) fox [sitting] BREAK in the snow", "(blurry:1.2) " * 20
    r = webui.txt2img(prompt=prompt, negative_prompt=negative, seed=11, cfg_scale=7.0, width=64, height=64,
                      override_settings={"CLIP_stop_at_last_layers": 2, "emphasis": "No norm"})  # fmt: skip
    ref = alone(pipe, request(11, prompt=prompt, negative_prompt=negative, guidance=7.0, prompt_syntax="webui",
                              webui_clip_skip=2, emphasis="no_norm"))[0]  # fmt: skip
    assert np.array_equal(np.asarray(r.image), ref)
    plain = alone(pipe, request(11, prompt=prompt, negative_prompt=negative, guidance=7.0))[0]
    assert np.abs(plain.astype(int) - ref).mean() > 1  # the reading changes the picture
    r = webui.txt2img(prompt="a red fox", seed=12, sampler_name="DDIM", width=64, height=64, eta=0.5,
                      override_settings={"pad_cond_uncond": True})  # fmt: skip
    assert np.array_equal(np.asarray(r.image), alone(pipe, request(12, sampler="ddim", eta=0.5, guidance=7.0,
                          prompt_syntax="webui", pad_chunks=True))[0])  # fmt: skip


def _refused(server, body: dict) -> dict:
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "a red fox", "steps": STEPS, "width": 64,
                                                           "height": 64, **body}, timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    return r.json()


def _changed(value):
    """A value other than ``value`` of its kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 0.5 if value not in (0, 1) else value + 2
    if isinstance(value, list):
        return ["a style"]
    return "something else"


def test_every_field_and_setting_that_would_change_the_picture_is_refused_naming_it(server):
    from sdrt.serve.webui import AT_DEFAULT, FIELDS_AT_DEFAULT

    for name, allowed in FIELDS_AT_DEFAULT.items():
        err = _refused(server, {name: _changed(next(a for a in allowed if a is not None))})
        assert err["field"] == name, (name, err)
    for key, allowed in AT_DEFAULT.items():
        err = _refused(server, {"override_settings": {key: _changed(next(a for a in allowed if a is not None))}})
        assert err["field"] == f"override_settings.{key}", (key, err)
    for body, field in (
        ({"prompt": "a [fox:cat:2]"}, "prompt"), ({"negative_prompt": "a AND b"}, "negative_prompt"),
        ({"prompt": "a (fox:1.2.3)"}, "prompt"), ({"prompt": " BREAK ".join(["fox"] * 4)}, "prompt"),
        ({"override_settings": {"randn_source": "GPU"}}, "override_settings.randn_source"),
        ({"override_settings": {"sd_model_checkpoint": "other.ckpt"}}, "override_settings.sd_model_checkpoint"),
        ({"override_settings": {"emphasis": "Loud"}}, "override_settings.emphasis"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 9}}, "override_settings.CLIP_stop_at_last_layers"),
        ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
        ({"sampler_name": "Euler a", "override_settings": {"eta_ancestral": 0.5}}, "override_settings.eta_ancestral"),
        ({"sampler_name": "DPM++ 2M SDE", "eta": 0.5}, "eta"),
    ):  # fmt: skip
        err = _refused(server, body)
        assert err["field"] == field and "\n" not in err["detail"], (body, err)


def test_settings_that_do_not_change_the_picture_are_ignored(server, pipe):
    """The web UI's saving, preview and speed options, the model served by name, extra networks disabled."""
    body = {"prompt": "a red fox <lora:none_such:1>", "steps": STEPS, "width": 64, "height": 64, "seed": 21,
            "sampler_name": "Euler", "cfg_scale": 7.5, "disable_extra_networks": True, "save_images": True,
            "override_settings": {"samples_save": False, "cross_attention_optimization": "Doggettx",
                                  "sd_model_checkpoint": pipe.model.name + ".safetensors [0123abcd]",
                                  "randn_source": "CPU", "CLIP_stop_at_last_layers": 1}}  # fmt: skip
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert np.array_equal(decoded(r.json()["images"][0]), alone(pipe, request(21, guidance=7.5))[0])
