"""LoRA adapters: `sdrt lora add` and per-request `loras`, against diffusers' own load_lora_weights as reference.

The adapter files are written (tests/helpers/lora.py) in the two formats users meet: kohya / web-UI (`lora_unet_*`,
`lora_te_*`, `lora_down` / `lora_up` / `alpha`, with LoCon convolutions) and diffusers / PEFT (`lora_A` / `lora_B`,
no alpha).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, psnr, sdrt_images
from tests.helpers.lora import FUSE_ARGS, KW, add_adapters, reference, sd1_adapters

pytestmark = pytest.mark.xdist_group("lora")


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
    return sd1_adapters(folders["sd1"], tmp_path_factory.mktemp("lora-files"))


@pytest.fixture(scope="module")
def engine(exports, files, tmp_path_factory):
    return add_adapters(exports.get("sd1", "fp32"), files, tmp_path_factory.mktemp("lora-engine") / "sd1")


@pytest.fixture(scope="module")
def pipe(engine):
    with Pipeline.load(engine, backend="onnxruntime", device="cpu") as p:
        yield p


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_kohya_lora_matches_diffusers(pipe, folders, files, scale, record_property):
    ref = reference(folders["sd1"], {files["kohya"]: scale})
    db = check(sdrt_images(pipe, loras={"kohya": scale}, **KW), ref)
    plain = psnr(sdrt_images(pipe, **KW), ref)
    record_property(f"kohya_{scale}_psnr_db", round(db, 1))
    print(f"kohya LoRA at {scale}: PSNR {db:.1f} dB against diffusers; without the adapter {plain:.1f} dB")
    assert plain < db - 10, "the adapter barely changes the picture: the comparison would say nothing"


def test_peft_lora_and_two_adapters_match_diffusers(pipe, folders, files):
    ref = reference(folders["sd1"], {files["peft"]: 1.0})
    db = check(sdrt_images(pipe, loras={"p": 1.0}, **KW), ref)
    assert psnr(sdrt_images(pipe, **KW), ref) < db - 10
    both = reference(folders["sd1"], {files["kohya"]: 0.7, files["peft"]: 0.5})
    db2 = check(sdrt_images(pipe, loras={"kohya": 0.7, "p": 0.5}, **KW), both)
    print(f"PEFT LoRA: PSNR {db:.1f} dB; kohya 0.7 + PEFT 0.5: {db2:.1f} dB against diffusers")


def test_switching_adapters_is_exact(engine, pipe):
    """A -> B -> A -> none on one pipeline gives byte for byte what fresh loads give: nothing leaves a trace."""
    sets = [{"kohya": 1.0}, {"p": 0.8, "kohya": 0.3}, {"kohya": 1.0}, None, {"kohya": 0.0}]
    fresh = {}
    for s in sets:
        with Pipeline.load(engine, backend="onnxruntime", device="cpu") as p:
            fresh[str(s)] = sdrt_images(p, loras=s, **KW)
    for s in sets:
        assert np.array_equal(sdrt_images(pipe, loras=s, **KW), fresh[str(s)]), s
    assert np.array_equal(fresh["None"], fresh[str({"kohya": 0.0})])
    assert not np.array_equal(fresh["None"], fresh[str(sets[0])])


def test_cli_generate_with_lora(engine, pipe, tmp_path):
    from PIL import Image

    from sdrt.cli import main

    out = tmp_path / "fox.png"
    args = ["generate", str(engine), KW["prompt"], "--negative-prompt", KW["negative_prompt"], "--steps", "4",
            "--guidance", "6", "--height", "64", "--width", "64", "--seed", "21", "--sampler", "euler",
            "--backend", "onnxruntime", "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main([*args, "--lora", "kohya:0.25", "--lora", "p:0.5", "--lora", "kohya:0.25"]) == 0
    assert np.array_equal(np.asarray(Image.open(out))[None], sdrt_images(pipe, loras={"kohya": 0.5, "p": 0.5}, **KW))
    assert Image.open(out).text["parameters"].startswith(f"{KW['prompt']} <lora:kohya:0.5> <lora:p:0.5>\n")


@pytest.mark.parametrize(
    "loras,msg",
    [
        ({"nope": 1.0}, "unknown LoRA adapter 'nope'"),
        ({"kohya": float("nan")}, "must be a finite number"),
        ({"kohya": "1"}, "must be a finite number"),
        (["kohya"], "must map adapter names to scales"),
    ],
)
def test_bad_loras_are_one_line_and_change_nothing(pipe, loras, msg):
    before = sdrt_images(pipe, loras={"p": 1.0}, **KW)
    with pytest.raises(SdrtError, match=msg) as err:
        sdrt_images(pipe, loras=loras, **KW)
    assert err.value.field == "loras" and "\n" not in str(err.value)
    assert np.array_equal(pipe.adapters.current.get("unet"), (("p", 1.0),))
    assert np.array_equal(before, sdrt_images(pipe, loras={"p": 1.0}, **KW))


def _bad_file(tmp_path, kind: str):
    from safetensors.torch import save_file

    r = 4
    keys = {
        # an SDXL adapter: its second text encoder's weights
        "sdxl": {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)},
        "nomatch": {"lora_unet_down_blocks_7_attentions_0_proj_in": (32, 32)},
        "shape": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (48, 32)},
    }[kind]
    sd = {}
    for k, (o, i) in keys.items():
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = torch.ones(r, i), torch.ones(o, r)
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize(
    "kind,msg",
    [
        ("sdxl", "for a text_encoder_2 graph this engine does not have"),
        ("nomatch", "matches no weight of unet"),
        ("shape", "gives a [48, 32] update for"),
        ("pickle", "only .safetensors LoRA files are read"),
        ("old", "exported without a weights map; re-export"),
    ],
)
def test_lora_add_refuses_in_one_line_and_writes_nothing(engine, tmp_path, capsys, kind, msg):
    from sdrt.cli import main

    root = tmp_path / "e"
    shutil.copytree(engine, root)
    if kind == "pickle":
        file = tmp_path / "x.pt"
        torch.save({"a": torch.ones(1)}, file)
    else:
        file = _bad_file(tmp_path, "nomatch" if kind == "old" else kind)
    if kind == "old":
        import json

        m = json.loads((root / "manifest.json").read_text())
        for g in m["graphs"].values():
            del g["weights"]
        (root / "manifest.json").write_text(json.dumps(m))
    before = {p.name: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert main(["lora", "add", str(root), str(file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert before == {p.name: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_fuses_loras_as_diffusers_weighs_them(folders, files, tmp_path):
    """`sdrt export --lora FILE:SCALE` twice: the graphs hold both adapters at their scales, against diffusers with
    the same two files as weighted (unfused) adapters; `sdrt verify` fuses the same files again and agrees."""
    import json

    from sdrt.cli import main

    root = tmp_path / "fused"
    loras = ["--lora", f"{files['kohya']}:0.7", "--lora", f"{files['peft']}:0.5"]
    assert main(["export", str(folders["sd1"]), str(root), *FUSE_ARGS, *loras]) == 0
    ref = reference(folders["sd1"], {files["kohya"]: 0.7, files["peft"]: 0.5})
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as p:
        ours = sdrt_images(p, **KW)
    db = check(ours, ref)
    assert psnr(ours, reference(folders["sd1"], {})) < db - 10, "the fused adapters barely change the picture"
    source = json.loads((root / "manifest.json").read_text())["source"]
    assert [(e["path"].rsplit("/", 1)[1], e["scale"]) for e in source["loras"]] == [
        ("kohya.safetensors", 0.7),
        ("peft.safetensors", 0.5),
    ]
    assert main(["verify", str(root)]) == 0
    print(f"export --lora kohya:0.7 --lora peft:0.5: PSNR {db:.1f} dB against diffusers' weighted adapters")


@pytest.mark.parametrize(
    "kind,msg",
    [
        ("sdxl", "is for a text_encoder_2 this model does not have"),
        ("nomatch", "matches no Linear or Conv2d of the unet"),
        ("shape", "has shape [48, 4], which does not fit"),
        ("missing", "no such file"),
        ("scale", "the scale must be a finite number"),
    ],
)
def test_export_lora_refuses_in_one_line_and_writes_nothing(folders, tmp_path, capsys, kind, msg):
    from sdrt.cli import main

    file = tmp_path / "none.safetensors" if kind == "missing" else _bad_file(tmp_path, "shape")
    if kind not in ("missing", "scale"):
        file = _bad_file(tmp_path, kind)
    arg = f"{file}:nan" if kind == "scale" else f"{file}:0.5"
    dest = tmp_path / "out"
    assert main(["export", str(folders["sd1"]), str(dest), *FUSE_ARGS, "--lora", arg]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdrt: error")]
    assert len(err) == 1 and msg in err[0], err
    assert not dest.exists() and not list(tmp_path.glob(".out.*"))


def test_lora_remove(engine, tmp_path, capsys):
    """`sdrt lora remove`: the adapter's file and entry go, the other adapter gives the same pixels as before; with
    the last one the base values go too; an adapter the directory lacks is refused in one line."""
    from sdrt.cli import main
    from sdrt.runtime.lora import BASE_FILE
    from sdrt.runtime.manifest import read_manifest

    root = Path(shutil.copytree(engine, tmp_path / "e"))
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as p:
        before = sdrt_images(p, loras={"p": 0.8}, **KW)
    assert main(["lora", "remove", str(root), "kohya"]) == 0
    m = read_manifest(root)
    assert list(m["loras"]) == ["p"] and not (root / "loras/kohya.safetensors").exists()
    assert "loras/kohya.safetensors" not in m["files"] and (root / BASE_FILE).is_file()
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as p:  # every listed file still hashes right
        assert np.array_equal(sdrt_images(p, loras={"p": 0.8}, **KW), before)
        with pytest.raises(SdrtError, match="unknown LoRA adapter 'kohya'"):
            p(loras={"kohya": 1.0}, **KW)
    assert main(["lora", "remove", str(root), "p"]) == 0
    assert read_manifest(root)["loras"] == {} and not (root / BASE_FILE).exists()
    capsys.readouterr()
    assert main(["lora", "remove", str(root), "p"]) == 2
    assert "has no LoRA adapter 'p' (it has: none)" in capsys.readouterr().err


def test_openvino_adapters_match_diffusers_and_switch_exactly(engine, folders, files):
    """OpenVINO (f32): the adapters' picture is diffusers' (>= 40 dB), and A -> B -> A -> none on one pipeline
    gives byte for byte what a fresh load with each set gives."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'sdrt[openvino]'")
    sets = [{"kohya": 1.0}, {"p": 0.8, "kohya": 0.3}, {"kohya": 1.0}, None]
    fresh = {}
    for s in sets[:2] + sets[3:]:
        with Pipeline.load(engine, backend="openvino", device="cpu", cpu_precision="f32") as p:
            fresh[str(s)] = sdrt_images(p, loras=s, **KW)
    db = check(fresh[str(sets[0])], reference(folders["sd1"], {files["kohya"]: 1.0}))
    with Pipeline.load(engine, backend="openvino", device="cpu", cpu_precision="f32") as p:
        for s in sets:
            assert np.array_equal(sdrt_images(p, loras=s, **KW), fresh[str(s)]), s
    print(f"OpenVINO, kohya LoRA at 1: PSNR {db:.1f} dB against diffusers")
