"""runtime/control.py on its own: diffusers' spelling of ControlNet arguments, the one-line refusals naming the
field, and the host buffers a batch reads, against diffusers' ControlNet pipelines (their control image processor,
their ``controlnet_keep``, written out here step by step). The pictures with ControlNets are test_controlnet's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.control import Control, check_controls, control_host, controlnet_args, keep, resized
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import ControlNetArg
from sdrt.runtime.request import Request
from tests.helpers.controlnet import control_image

MANIFEST = {"controlnets": {"canny": {}, "depth": {}}}  # check_controls reads the names only
EDGES, DEPTH = control_image(96, 64), control_image(48, 80)


def diffusers_control_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The ControlNet pipelines' own preprocessing: [1, 3, H, W] in [0, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    return processor.preprocess(image, height=height, width=width).to(torch.float32)


def request(prompts: int, images_per_prompt: int, *control: Control) -> Request:
    return Request(prompts=("a fox",) * prompts, negatives=(None,) * prompts, steps=4, guidance=7.5, height=64,
                   width=96, images_per_prompt=images_per_prompt, seed=0, sampler="euler", strength=1.0,
                   control=control)  # fmt: skip


def test_diffusers_spelling_gives_one_arg_per_controlnet():
    assert controlnet_args(None, None) == ()
    assert controlnet_args("canny", EDGES) == (ControlNetArg("canny", EDGES, 1.0, 0.0, 1.0),)
    # one value for every ControlNet, or one per ControlNet, as for diffusers' MultiControlNetModel
    got = controlnet_args(["canny", "depth"], [EDGES, DEPTH], scale=0.5, start=[0.0, 0.2], end=0.8)
    assert got == (ControlNetArg("canny", EDGES, 0.5, 0.0, 0.8), ControlNetArg("depth", DEPTH, 0.5, 0.2, 0.8))


@pytest.mark.parametrize(
    "args,kw,field",
    [
        ((None, EDGES), {}, "controlnet"),
        (("canny", None), {}, "control_image"),
        ((["canny", "depth"], [EDGES]), {}, "control_image"),
        ((["canny", "depth"], [EDGES, DEPTH]), dict(scale=[1.0]), "control_scale"),
        ((["canny", "depth"], [EDGES, DEPTH]), dict(start=[0.0, 0.1, 0.2]), "control_start"),
        (("canny", EDGES), dict(end=[0.5, 1.0]), "control_end"),
    ],
)
def test_arguments_that_do_not_pair_up_are_one_line_naming_the_argument(args, kw, field):
    with pytest.raises(SdrtError) as err:
        controlnet_args(*args, **kw)
    assert err.value.field == field and "\n" not in str(err.value)


def test_checked_controls_keep_their_values_and_read_their_images(tmp_path):
    path = tmp_path / "depth.png"
    DEPTH.convert("L").save(path)
    args = [ControlNetArg("canny", EDGES, 1, 0, 1), ControlNetArg("depth", str(path), 0.5, 0.25, 0.75)]
    got = check_controls(MANIFEST, args)
    assert [(c.name, c.scale, c.start, c.end) for c in got] == [("canny", 1.0, 0.0, 1.0), ("depth", 0.5, 0.25, 0.75)]
    assert all(type(v) is float for c in got for v in (c.scale, c.start, c.end))
    assert got[0].image.size == (96, 64) and np.array_equal(np.asarray(got[0].image), np.asarray(EDGES))
    # a grey-scale file comes back as RGB, at its own size (resized per request later)
    assert got[1].image.mode == "RGB" and got[1].image.size == DEPTH.size
    assert np.array_equal(np.asarray(got[1].image), np.asarray(DEPTH.convert("L").convert("RGB")))
    assert check_controls(MANIFEST, []) == ()  # no ControlNets


@pytest.mark.parametrize(
    "arg,field,words",
    [
        (ControlNetArg("pose", EDGES), "controlnets.1.name", "no ControlNet 'pose'; it has canny, depth"),
        (ControlNetArg("canny", EDGES, math.nan), "controlnets.1.scale", "finite number"),
        (ControlNetArg("canny", EDGES, True), "controlnets.1.scale", "finite number"),
        (ControlNetArg("canny", EDGES, 1.0, -0.1), "controlnets.1.start", "0 <= start < end <= 1"),
        (ControlNetArg("canny", EDGES, 1.0, 1.0, 1.0), "controlnets.1.start", "0 <= start < end <= 1"),
        (ControlNetArg("canny", EDGES, 1.0, 0.5, 0.5), "controlnets.1.end", "0 <= start < end <= 1"),
        (ControlNetArg("canny", EDGES, 1.0, 0.0, 1.5), "controlnets.1.end", "0 <= start < end <= 1"),
        (ControlNetArg("canny", "/nonexistent.png"), "controlnets.1.image", "cannot read control image"),
        (("canny", EDGES), "controlnets.1", "ControlNetArg(name, image, ...)"),
    ],
)
def test_a_bad_controlnet_is_one_line_naming_its_own_field(arg, field, words):
    """The second of two: the field names which one, so that the server can give its client's spelling."""
    with pytest.raises(SdrtError) as err:
        check_controls(MANIFEST, [ControlNetArg("canny", EDGES), arg])
    assert err.value.field == field and words in str(err.value) and "\n" not in str(err.value)


def test_a_directory_without_controlnets_names_the_export_option():
    with pytest.raises(SdrtError, match=r"no ControlNet 'canny'; re-export it with .*--controlnet DIR=NAME") as err:
        check_controls({}, [ControlNetArg("canny", EDGES)])
    assert err.value.field == "controlnets.0.name"


@pytest.mark.parametrize(
    "calls,start,end,expected",
    [  # diffusers: keep call i of n unless i / n < start or (i + 1) / n > end
        (4, 0.0, 1.0, [1, 1, 1, 1]),
        (10, 0.2, 0.5, [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]),
        (5, 0.0, 0.5, [1, 1, 0, 0, 0]),
        (4, 0.3, 1.0, [0, 0, 1, 1]),  # 1 / 4 < 0.3: the second call is still outside
        (3, 0.0, 0.3, [0, 0, 0]),  # no call ends by 0.3: the ControlNet never acts
    ],
)
def test_keep_is_diffusers_controlnet_keep(calls, start, end, expected):
    assert keep(calls, start, end) == [float(v) for v in expected]


def test_a_control_image_is_resized_as_diffusers_control_image_processor_resizes_it():
    same = Control("canny", EDGES, 1.0, 0.0, 1.0)
    assert resized(same, 96, 64) is same  # at the request's size already: untouched
    other = resized(Control("depth", DEPTH, 1.0, 0.0, 1.0), 96, 64)
    assert other.image.size == (96, 64)
    pixels = control_host([request(1, 1, other)], calls=1)["control_image_0"]
    assert torch.equal(pixels, diffusers_control_image(DEPTH, 96, 64))


def test_host_buffers_give_each_row_its_requests_image_and_scales():
    """Two requests in one batch (2 and 1 image rows), two ControlNets: each row reads its own request's image, and
    control_scale_k [calls, rows] is its scale where diffusers' controlnet_keep keeps the call, else 0."""
    canny_a, canny_b = control_image(96, 64), control_image(96, 64).transpose(Image.FLIP_LEFT_RIGHT)
    depth = resized(Control("depth", DEPTH, 1.0, 0.0, 1.0), 96, 64)
    a = request(1, 2, Control("canny", canny_a, 0.5, 0.25, 1.0), depth)
    b = request(1, 1, Control("canny", canny_b, 2.0, 0.0, 0.5), depth._replace(scale=0.75))
    host = control_host([a, b], calls=4)
    assert sorted(host) == ["control_image_0", "control_image_1", "control_scale_0", "control_scale_1"]
    ref_a, ref_b = diffusers_control_image(canny_a, 96, 64), diffusers_control_image(canny_b, 96, 64)
    assert host["control_image_0"].shape == (3, 3, 64, 96)
    assert torch.equal(host["control_image_0"], torch.cat([ref_a, ref_a, ref_b]))
    assert torch.equal(host["control_image_1"], diffusers_control_image(DEPTH, 96, 64).expand(3, -1, -1, -1))
    expected = [[0.0, 0.0, 2.0], [0.5, 0.5, 2.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]
    assert host["control_scale_0"].tolist() == expected
    assert host["control_scale_1"].tolist() == [[1.0, 1.0, 0.75]] * 4
