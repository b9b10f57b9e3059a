"""LoRA adapters beyond SD 1.x on ONNX Runtime: SD 2.x- and SDXL-shaped models (added, and fused at export), and the
torch backend.

SDXL's kohya files are written as sd-scripts writes them: `lora_te1_` / `lora_te2_` for its two text encoders (the
second a CLIPTextModelWithProjection) and the original (SGM) U-Net's block names, `input_blocks.I.J` /
`middle_block.J` / `output_blocks.I.J`, which diffusers maps back with the U-Net's layers_per_block. The reference
is diffusers' own pipeline of the family with the same file loaded (tests/helpers/lora.py's reference).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, psnr, sdrt_images
from tests.helpers.lora import FUSE_ARGS, KW, UNET_TARGETS, kohya_key, kohya_lora, kohya_parts, peft_lora, reference

pytestmark = pytest.mark.xdist_group("lora-families")
PIPELINES = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# LoCon: the resnets' convolutions and shortcuts, and the down- and upsamplers' convolutions
LOCON_TARGETS = (*UNET_TARGETS, "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_name(unet, name: str) -> str:
    """The original (SGM) U-Net's name of a diffusers U-Net module, as sd-scripts names SDXL's: the down blocks'
    layers and downsamplers are numbered on through `input_blocks`, the up blocks' through `output_blocks`."""
    n = unet.config.layers_per_block + 1  # input / output blocks per diffusers block: its resnets and a sampler
    part, *rest = name.split(".")
    if part == "mid_block":
        kind, j, *tail = rest
        where = f"middle_block.{1 if kind == 'attentions' else 2 * int(j)}"
    elif part == "down_blocks":
        b, kind, j, *tail = rest
        block = 1 + int(b) * n + (n - 1 if kind == "downsamplers" else int(j))  # input_blocks.0 is conv_in
        where = f"input_blocks.{block}.{int(kind == 'attentions')}"
        tail = ["op"] if kind == "downsamplers" else tail
    else:
        b, kind, j, *tail = rest
        inner = {"resnets": 0, "attentions": 1, "upsamplers": 1 + hasattr(unet.up_blocks[int(b)], "attentions")}
        where = f"output_blocks.{int(b) * n + (n - 1 if kind == 'upsamplers' else int(j))}.{inner[kind]}"
    if kind == "resnets":
        tail = [RESNET_SGM[tail[0]]]
    return ".".join([where, *tail])


def family_key(kind: str, unet):
    """kohya_lora's ``key`` for the kind: SDXL's U-Net keys under the original (SGM) block names, as sd-scripts
    writes them; SD 1.x / 2.x's and every text encoder's under diffusers' module names."""

    def key(prefix: str, name: str) -> str:
        return kohya_key(prefix, sgm_name(unet, name) if kind == "sdxl" and prefix == "lora_unet_" else name)

    return key


def family_files(kind: str, pipe, root: Path) -> dict[str, Path]:
    """{adapter name: file}: kohya U-Net only (every LoCon convolution), text encoder(s) only, both, and PEFT."""
    key = family_key(kind, pipe.unet)
    unet = [("lora_unet_", pipe.unet, LOCON_TARGETS)]
    return {
        "unet": kohya_lora(root / "unet.safetensors", pipe, 11, parts=unet, key=key),
        "te": kohya_lora(root / "te.safetensors", pipe, 12, parts=kohya_parts(pipe, unet=False), key=key),
        "both": kohya_lora(root / "both.safetensors", pipe, 13, rank=8, alpha=4.0, key=key),
        "peft": peft_lora(root / "peft.safetensors", pipe, 14),
    }


@dataclass
class Family:
    kind: str
    folder: Path
    files: dict[str, Path]
    pipe: Pipeline
    plain: np.ndarray  # sdrt's picture without adapters


@pytest.fixture(scope="module")
def family(request, folders, exports, tmp_path_factory):
    """One engine per kind (the session's fp32 export, copied) with the four adapters added under their names."""
    import diffusers

    from sdrt.cli import main

    kind = request.param
    tmp = tmp_path_factory.mktemp(f"lora-{kind}")
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(folders[kind], local_files_only=True)
    files = family_files(kind, pipe, tmp)
    root = tmp / "engine"
    shutil.copytree(exports.get(kind, "fp32"), root)
    for name, file in files.items():
        assert main(["lora", "add", str(root), str(file), "--name", name]) == 0
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as p:
        yield Family(kind, folders[kind], files, p, sdrt_images(p, **KW))


TEXT = {"sd2": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}
SCALES = {  # (kind, adapter) -> the scale it is compared at: 0.5 and 1.0 over each kind's four files
    ("sd2", "unet"): 1.0, ("sd2", "te"): 0.5, ("sd2", "both"): 0.5, ("sd2", "peft"): 1.0,
    ("sdxl", "unet"): 0.5, ("sdxl", "te"): 1.0, ("sdxl", "both"): 1.0, ("sdxl", "peft"): 0.5,
}  # fmt: skip


# two parametrize marks, not one over (kind, adapter, scale) rows: pytest keys a module fixture's cache by the
# parameter's index in its own list, so rows would set the engine up once per test instead of once per kind
@pytest.mark.parametrize("adapter", ["unet", "te", "both", "peft"])
@pytest.mark.parametrize("family", ["sd2", "sdxl"], indirect=True)
def test_adapter_matches_diffusers(family, adapter, record_property):
    scale = SCALES[family.kind, adapter]
    graphs = {"unet": {"unet"}, "te": TEXT[family.kind]}.get(adapter, {"unet", *TEXT[family.kind]})
    assert set(family.pipe.manifest["loras"][adapter]["weights"]) == graphs  # e.g. both of SDXL's text encoders
    ref = reference(family.folder, {family.files[adapter]: scale}, pipeline=PIPELINES[family.kind])
    db = check(sdrt_images(family.pipe, loras={adapter: scale}, **KW), ref)
    plain = psnr(family.plain, ref)
    record_property(f"{family.kind}_{adapter}_{scale}_psnr_db", round(db, 1))
    print(f"{family.kind} {adapter} at {scale}: PSNR {db:.1f} dB against diffusers; without it {plain:.1f} dB")
    assert plain < db - 10, "the adapter barely changes the picture: the comparison would say nothing"


def test_export_fuses_sdxl_loras_as_diffusers_weighs_them(folders, tmp_path, record_property):
    """`sdrt export --lora` of an SDXL-shaped model: a kohya file as sd-scripts writes SDXL's (`lora_te1_` /
    `lora_te2_`, the SGM U-Net's block names, every LoCon convolution) at 0.8 and a PEFT file at 0.5, fused into
    the fp32 graphs, against diffusers' SDXL pipeline with the same two files as weighted (unfused) adapters."""
    import json

    import diffusers

    from sdrt.cli import main

    folder, xl = folders["sdxl"], PIPELINES["sdxl"]
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    parts = [("lora_unet_", pipe.unet, LOCON_TARGETS), *kohya_parts(pipe, unet=False)]
    kohya = kohya_lora(tmp_path / "xl.safetensors", pipe, 15, parts=parts, key=family_key("sdxl", pipe.unet))
    peft = peft_lora(tmp_path / "peft.safetensors", pipe, 16)
    root = tmp_path / "fused"
    assert main(["export", str(folder), str(root), *FUSE_ARGS, "--lora", f"{kohya}:0.8", "--lora", f"{peft}:0.5"]) == 0
    ref = reference(folder, {kohya: 0.8, peft: 0.5}, pipeline=xl)
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as p:
        ours = sdrt_images(p, **KW)
    db = check(ours, ref)
    plain = psnr(ours, reference(folder, {}, pipeline=xl))
    assert plain < db - 10, "the fused adapters barely change the picture"
    source = json.loads((root / "manifest.json").read_text())["source"]
    assert [(Path(e["path"]).name, e["scale"]) for e in source["loras"]] == [
        ("xl.safetensors", 0.8),
        ("peft.safetensors", 0.5),
    ]
    assert main(["verify", str(root)]) == 0
    record_property("sdxl_export_kohya_0.8_peft_0.5_psnr_db", round(db, 1))
    print(f"sdxl export --lora kohya:0.8 --lora peft:0.5: PSNR {db:.1f} dB against diffusers' weighted adapters; "
          f"without them {plain:.1f} dB")  # fmt: skip


# -- the torch backend ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_engine(folders, exports, tmp_path_factory):
    """The session's sd1 fp16 export, which carries torch programs (conftest.TORCH_PROGRAMS), with a kohya and a
    PEFT adapter; the files, the loaded pipeline and its first picture, drawn before any adapter was applied."""
    import diffusers

    from sdrt.cli import main
    from sdrt.runtime.backends import has_torch_programs

    tmp = tmp_path_factory.mktemp("lora-torch")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd1"], local_files_only=True)
    files = {"kohya": kohya_lora(tmp / "kohya.safetensors", pipe, 1), "p": peft_lora(tmp / "p.safetensors", pipe, 2)}
    root = tmp / "engine"
    shutil.copytree(exports.get("sd1", "fp16"), root)
    for name, file in files.items():
        assert main(["lora", "add", str(root), str(file), "--name", name]) == 0
    with Pipeline.load(root, backend="torch", device="cpu") as p:
        assert p.backend.name == "torch" and has_torch_programs(p.manifest)
        yield root, files, p, sdrt_images(p, **KW)


def test_torch_backend_adapter_matches_diffusers(torch_engine, folders, record_property):
    """fp16 programs (half precision on the CPU) against diffusers' fp32: held at 30 dB, as test_torch_backend
    holds the same programs without adapters."""
    _, files, pipe, plain = torch_engine
    ref = reference(folders["sd1"], {files["kohya"]: 0.8})
    db = check(sdrt_images(pipe, loras={"kohya": 0.8}, **KW), ref, min_db=30.0)
    plain = psnr(plain, ref)
    record_property("torch_fp16_kohya_0.8_psnr_db", round(db, 1))
    print(f"torch backend, fp16 programs, kohya at 0.8: PSNR {db:.1f} dB against diffusers; without it {plain:.1f}")
    assert plain < db - 10, "the adapter barely changes the picture: the comparison would say nothing"


def test_torch_backend_switching_is_exact(torch_engine):
    """A -> B -> A -> none in place on one set of programs gives byte for byte what fresh loads give (none: the
    pipeline's own picture before its first adapter)."""
    root, _, pipe, plain = torch_engine
    sets = [{"kohya": 1.0}, {"p": 0.8, "kohya": 0.3}, {"kohya": 1.0}, None]
    fresh = {"None": plain}
    for s in sets[:2]:
        with Pipeline.load(root, backend="torch", device="cpu") as p:
            fresh[str(s)] = sdrt_images(p, loras=s, **KW)
    for s in sets:
        assert np.array_equal(sdrt_images(pipe, loras=s, **KW), fresh[str(s)]), s
    assert not np.array_equal(fresh["None"], fresh[str(sets[0])])
