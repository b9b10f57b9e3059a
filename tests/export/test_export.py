"""Exported graphs against diffusers modules loaded by diffusers from the same files, and the manifest."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

TOL = {"fp32": 1e-4, "fp16": 2e-2}
DESIGN_IO = {  # DESIGN.md's graph I/O names
    "text_encoder": (["input_ids", "clip_skip", "embeddings"], ["text_embeddings"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"]),
    "vae_decoder": (["latent"], ["images"]),
    "vae_encoder": (["images"], ["latent_mean", "latent_logvar"]),
}
SDXL_IO = {
    "text_encoder_2": (["input_ids", "clip_skip", "embeddings"], ["text_embeddings", "pooled_embeddings"]),
    "unet": (["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"], ["noise_pred"]),
}
NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def diffusers_modules(folder: Path):
    """The pipeline's modules as diffusers itself loads them from the saved folder."""
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def reference(pipe, graph: str, x: dict[str, torch.Tensor], sdxl: bool) -> list[torch.Tensor]:
    """What each graph must compute, written with diffusers' and transformers' public calls."""
    with torch.no_grad():
        if graph.startswith("text_encoder"):  # diffusers' encode_prompt with clip_skip
            model, skip = getattr(pipe, graph), int(x["clip_skip"][0])
            ids = x["input_ids"].long()
            vocab = model.config.vocab_size
            where = ids >= vocab
            if where.any():  # as diffusers' load_textual_inversion: one new token row per marked place
                model = copy.deepcopy(model)
                model.resize_token_embeddings(vocab + int(where.sum()))
                rows = vocab + torch.arange(int(where.sum()))
                with torch.no_grad():
                    model.get_input_embeddings().weight[rows] = x["embeddings"][where]
                ids = ids.clone()
                ids[where] = rows
            out = model(ids, output_hidden_states=True)
            if sdxl:
                states = out.hidden_states[-(skip + 2)]
            else:  # transformers 5's CLIPTextModel has its final norm at the top level
                states = getattr(model, "text_model", model).final_layer_norm(out.hidden_states[-(skip + 1)])
            return [states, out.text_embeds] if graph == "text_encoder_2" else [states]
        if graph == "unet":
            added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if sdxl else None
            return [pipe.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added).sample]
        if graph == "vae_decoder":
            return [pipe.vae.decode(x["latent"] / pipe.vae.config.scaling_factor).sample]
        dist = pipe.vae.encode(x["images"]).latent_dist
        return [dist.mean, dist.logvar]


def random_inputs(session: ort.InferenceSession, rows: int, h: int, w: int, gen: torch.Generator, skip: int) -> dict:
    """Inputs at ``rows`` (and as many 77-token prompt chunks) and latent h x w; clip skip ``skip``."""
    x = {}
    for i in session.get_inputs():
        if i.name == "clip_skip":
            t = torch.tensor([skip], dtype=torch.int32)
        elif i.name == "encoder_hidden_states":
            t = torch.randn(rows, 77 * rows, i.shape[2], generator=gen)
        elif i.name == "input_ids":  # the prompt's tokens, and textual-inversion places (ids from the vocab size)
            t = torch.randint(0, 514, (rows, 77), generator=gen, dtype=torch.int32)
            t[:, 3:6] = 1000
        elif i.name == "timestep":
            t = torch.tensor([981.0, 3.0][:rows])
        elif i.name == "time_ids":
            t = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * rows, dtype=torch.float32)
        elif i.name == "images":
            t = torch.rand(rows, 3, h * 8, w * 8, generator=gen) * 2 - 1
        elif i.name in ("sample", "latent"):
            t = torch.randn(rows, 4, h, w, generator=gen)
        else:  # encoder_hidden_states, text_embeds: take the non-batch dims from the graph
            t = torch.randn(rows, *i.shape[1:], generator=gen)
        x[i.name] = t
    return x


CASES = [(k, p) for k in ("sd1", "sd2", "sdxl") for p in ("fp32", "fp16")]


@pytest.mark.parametrize("kind,precision", CASES)
def test_graphs_match_diffusers(kind, precision, exports, folders):
    out_dir = exports.get(kind, precision)
    check_against(diffusers_modules(folders[kind]), out_dir, kind, precision)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_single_file_export_matches_the_original_modules(kind, exports, folders, single_files):
    """A single file (original layout, configs from a weightless folder) exports the very same model."""
    out_dir = exports.get(kind, "fp32", single_file=True)
    check_against(diffusers_modules(folders[kind]), out_dir, kind, "fp32")
    source = json.loads((out_dir / "manifest.json").read_text())["source"]
    assert source["kind"] == "single_file"
    assert source["sha256"] == hashlib.sha256(single_files[kind].read_bytes()).hexdigest()


def check_against(pipe, out_dir: Path, kind: str, precision: str) -> None:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    gen = torch.Generator().manual_seed(7)
    # two shapes each: one row square, two rows non-square (latent 8x8 and 16x24 -> 64x64 and 128x192 px)
    for name, entry in manifest["graphs"].items():
        session = ort.InferenceSession(str(out_dir / entry["file"]), providers=["CPUExecutionProvider"])
        for rows, h, w in [(1, 8, 8), (2, 16, 24)]:
            x = random_inputs(session, rows, h, w, gen, skip=min(rows - 1, entry.get("clip_skips", 1) - 1))
            feeds = {i.name: x[i.name].numpy().astype(NP[i.type]) for i in session.get_inputs()}
            outs = session.run(None, feeds)
            refs = reference(pipe, name, x, kind == "sdxl")
            assert len(outs) == len(refs)
            for o, r in zip(outs, refs, strict=True):
                assert o.shape == tuple(r.shape)
                tol = TOL["fp32" if entry["precision"] == "fp32" else precision]
                err = rel_l2(o, r.numpy())
                assert err <= tol, f"{name} at {(rows, h, w)}: rel L2 {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_manifest_describes_the_directory(kind, exports, folders):
    out_dir = exports.get(kind, "fp16")
    m = json.loads((out_dir / "manifest.json").read_text())
    # every file on disk is listed with its real SHA-256, and nothing else is
    on_disk = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    for name, digest in m["files"].items():
        assert hashlib.sha256((out_dir / name).read_bytes()).hexdigest() == digest
    # I/O names as DESIGN.md fixes them
    io = dict(DESIGN_IO, **(SDXL_IO if kind == "sdxl" else {}))
    assert set(m["graphs"]) == set(io)
    for name, entry in m["graphs"].items():
        g = onnx.load(str(out_dir / entry["file"]), load_external_data=False)
        assert ([i.name for i in g.graph.input], [o.name for o in g.graph.output]) == io[name]
        assert all(e <= entry["verify"]["tolerance"] for e in entry["verify"]["rel_l2"].values())
        assert len(entry["verify"]["shapes"]) >= 2
    assert m["shapes"] == {"min_px": 64, "max_px": 192, "px_multiple": 8, "max_images": 2, "max_prompt_chunks": 3}
    assert (m["latent"]["vae_scale_factor"], m["unet"]["downsampling"], m["unet"]["sample_size"]) == (8, 2, 8)
    assert m["source"]["kind"] == "diffusers" and m["precision"] == "fp16"
    assert {"torch", "diffusers", "onnx", "onnxruntime"} <= set(m["tools"])
    # the schedule and latent scaling are the checkpoint's own
    sched = json.loads((folders[kind] / "scheduler" / "scheduler_config.json").read_text())
    assert m["scheduler"]["class"] == sched["_class_name"]
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type"):
        if key in sched:
            assert m["scheduler"]["config"][key] == sched[key]
    vae = json.loads((folders[kind] / "vae" / "config.json").read_text())
    assert m["latent"]["scaling_factor"] == vae["scaling_factor"]


def test_betas_are_diffusers_betas(exports, folders):
    import diffusers

    m = json.loads((exports.get("sd2", "fp16") / "manifest.json").read_text())
    sched = diffusers.DDIMScheduler.from_pretrained(folders["sd2"], subfolder="scheduler")
    np.testing.assert_array_equal(np.array(m["scheduler"]["betas"], np.float32), sched.betas.numpy())
    assert m["scheduler"]["config"]["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_tokenizer_files_tokenize_like_transformers(kind, exports, folders):
    """The runtime reads tokenizer.json with `tokenizers` alone; it must give transformers' ids."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    out_dir = exports.get(kind, "fp16")
    m = json.loads((out_dir / "manifest.json").read_text())
    for name, entry in m["tokenizers"].items():
        ref = CLIPTokenizer.from_pretrained(folders[kind], subfolder=name)
        tok = Tokenizer.from_file(str(out_dir / entry["file"]))
        tok.enable_truncation(entry["max_length"])
        tok.enable_padding(length=entry["max_length"], pad_id=entry["pad_token_id"])
        for text in ["a photo of an astronaut riding a horse, 4k", "", "Ünïcode  spaces\tand ,,punctuation!!"]:
            want = ref(text, padding="max_length", max_length=77, truncation=True).input_ids
            assert tok.encode(text).ids == want


def test_fp16_graphs_keep_fp32_islands(exports):
    """fp16 weights, float32 timestep, normalisation and softmax fed by Casts to float32; SDXL's VAE fp32."""
    out_dir = exports.get("sdxl", "fp16")
    m = json.loads((out_dir / "manifest.json").read_text())
    unet = onnx.load(str(out_dir / "unet.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*unet.graph.input, *unet.graph.output]}
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types == {
        "sample": F16,
        "timestep": F32,
        "encoder_hidden_states": F16,
        "text_embeds": F16,
        "time_ids": F32,
        "noise_pred": F16,
    }
    weights = m["graphs"]["unet"]["initializer_elements"]
    assert weights["float16"] > 50 * weights.get("float", 0)
    producers = {o: n for n in unet.graph.node for o in n.output}
    for node in unet.graph.node:
        if node.op_type in ("GroupNormalization", "LayerNormalization", "Softmax"):
            src = producers[node.input[0]]
            assert src.op_type == "Cast" and src.attribute[0].i == F32, node.name
    for vae in ("vae_decoder", "vae_encoder"):
        assert m["graphs"][vae]["precision"] == "fp32"
        assert "float16" not in m["graphs"][vae]["initializer_elements"]


def test_fp16_unet_embeds_fractional_timesteps_in_float32(exports, folders):
    """Samplers on sigma schedules (Euler, DPM++, Karras) call the U-Net at fractional timesteps, which diffusers
    embeds in float32. Rounded to fp16 on the way (999.25 -> 999, and t * freq to fp16's steps of 0.5 near 700),
    the fp16 U-Net's error against diffusers' fp32 U-Net grew about 8x at high timesteps on this model (relative
    L2 7.5e-3 against 9.4e-4 with float32 carried from the timestep input to the embedding's first MatMul)."""
    session = ort.InferenceSession(str(exports.get("sd1", "fp16") / "unet.onnx"), providers=["CPUExecutionProvider"])
    unet = diffusers_modules(folders["sd1"]).unet
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([999.25, 946.6])
    with torch.no_grad():
        want = unet(sample, t, states).sample
    feeds = {"sample": sample.half().numpy(), "timestep": t.numpy(), "encoder_hidden_states": states.half().numpy()}
    got = session.run(["noise_pred"], feeds)[0]
    assert rel_l2(got, want) < 3e-3


def test_large_graphs_use_external_data(tmp_path, monkeypatch):
    """Past the protobuf limit the weights go to one .data file beside the graph, which ORT and the checker read."""
    from onnx import helper

    from sdrt.export import onnx_save

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    monkeypatch.setattr(onnx_save, "_EXTERNAL_DATA_BYTES", 1000)
    files = onnx_save.save_onnx(model, tmp_path / "g.onnx")
    assert files == ["g.onnx", "g.onnx.data"]
    assert (tmp_path / "g.onnx").stat().st_size < w.nbytes <= (tmp_path / "g.onnx.data").stat().st_size
    onnx.checker.check_model(str(tmp_path / "g.onnx"))
    x = np.ones((1, 64), np.float32)
    y = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5)


@pytest.mark.parametrize("upcast", [False, True])
def test_fp16_conversion_streams_the_weights_as_orts_converter_converts_them(tmp_path, monkeypatch, upcast):
    """The fp16 graph written tensor by tensor from the float32 data file (the export's way, so that no float32
    graph is ever loaded whole) is the graph ORT's converter makes from the fully loaded float32 model: same nodes,
    byte-identical initializers in the same types (ORT's clamping to fp16's range included)."""
    from onnx import numpy_helper

    from sdrt.export import fp16, onnx_save, trace
    from sdrt.export import graphs as G
    from sdrt.export.load import load_model

    c = load_model("tiny-sd2" if upcast else "tiny-sdxl")
    g = next(x for x in G.graphs_for(c) if x.name == "unet")
    assert g.upcast_attention == upcast
    dims = G.Dims(64, 128).for_model(G.geometry(c))
    (tmp_path / "trace").mkdir()
    src = tmp_path / "trace" / "unet.onnx"
    trace.export_torch(g, dims, src)
    loaded = onnx.load(str(src))  # a conv weight with values past fp16's range and below its smallest subnormal
    conv = next(n.input[1] for n in loaded.graph.node if n.op_type == "Conv")
    big = next(t for t in loaded.graph.initializer if t.name == conv)
    arr = numpy_helper.to_array(big).copy()
    arr.flat[:9] = [1e6, 1e-9, -1e6, -1e-9, np.inf, -np.inf, np.nan, 0.0, -0.0]
    big.CopyFrom(numpy_helper.from_array(arr, big.name))
    onnx.save_model(loaded, str(src), save_as_external_data=True, location="unet.onnx.data", size_threshold=0)
    inline = tmp_path / "inline.onnx"
    onnx.save_model(onnx.load(str(src)), str(inline))  # every weight in the model: the converter converts them

    reference = fp16.fp16_from_fp32(inline, g)
    monkeypatch.setattr(onnx_save, "_EXTERNAL_DATA_BYTES", 1000)
    (tmp_path / "out").mkdir()
    files = onnx_save.save_onnx(fp16.fp16_from_fp32(src, g), tmp_path / "out" / "unet.onnx", weights_from=src.parent)
    assert files == ["unet.onnx", "unet.onnx.data"]
    written = onnx.load(str(tmp_path / "out" / "unet.onnx"))
    assert [(n.op_type, list(n.input), list(n.output)) for n in written.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in reference.graph.node
    ]
    want = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert want.keys() == got.keys()
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].tobytes() == a.tobytes(), name
    assert got[big.name].dtype == np.float16 and got[big.name].flat[0] == 65504 and got[big.name].flat[1] > 0
    onnx.checker.check_model(str(tmp_path / "out" / "unet.onnx"))


def test_fp16_safe_vae_replaces_sdxl_vae_in_fp16(folders, tmp_path):
    """--vae: SDXL with a VAE folder the user vouches for exports that VAE in fp16 (SDXL's own stays float32),
    and records its hashes so that `sdrt verify` can rebuild it."""
    from sdrt.cli import main

    out_dir = tmp_path / "sdxl-vae16"
    vae = folders["sdxl"] / "vae"
    args = ["export", str(folders["sdxl"]), str(out_dir), "--precision", "fp16", "--vae", str(vae)]
    assert main([*args, "--min-size", "64", "--max-size", "128", "--max-batch", "1"]) == 0
    m = json.loads((out_dir / "manifest.json").read_text())
    assert m["source"]["vae"]["sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in vae.iterdir()}
    for name in ("vae_decoder", "vae_encoder"):
        g = onnx.load(str(out_dir / m["graphs"][name]["file"]))
        assert m["graphs"][name]["precision"] == "fp16"
        assert {i.data_type for i in g.graph.initializer if len(i.dims) > 1} == {onnx.TensorProto.FLOAT16}
    check_against(diffusers_modules(folders["sdxl"]), out_dir, "sdxl", "fp16")
    assert main(["verify", str(out_dir)]) == 0


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_small_presets_build_with_their_published_scheduler_configs(name):
    """Presets carry the published scheduler configs, including keys only other schedulers read (SDXL's Euler
    config has PNDM's skip_prk_steps, which `--sampler pndm` needs)."""
    from sdrt.export.load import components_from_preset
    from sdrt.export.presets import get_preset

    preset = get_preset(name)
    c = components_from_preset(preset, preset.seed)
    assert type(c.scheduler).__name__ == preset.scheduler[0]
    assert {k: c.scheduler.config[k] for k in preset.scheduler[1]} == preset.scheduler[1]


@pytest.mark.parametrize("source", ["tiny-sdxl", "folder"])
def test_deferred_loading_gives_the_eager_weights(source, folders):
    """An export loads the U-Net and VAE only after the text encoders are done (`load_model(defer=True)`): until
    then they are weightless placeholders with their real configs, and afterwards they hold exactly the weights an
    eager load gives (a preset's random weights come from the same generator states)."""
    from sdrt.export.load import load_model

    model = source if source != "folder" else str(folders["sdxl"])
    eager, lazy = load_model(model), load_model(model, defer=True)
    assert eager.deferred is None and lazy.deferred is not None
    assert all(t.is_meta for m in (lazy.unet, lazy.vae) for t in m.parameters())
    for a, b in ((lazy.unet, eager.unet), (lazy.vae, eager.vae)):
        assert {k: v for k, v in a.config.items() if not k.startswith("_")} == {
            k: v for k, v in b.config.items() if not k.startswith("_")
        }
    for name, te in eager.text_encoders.items():
        want, got = te.state_dict(), lazy.text_encoders[name].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    unet, vae = lazy.unet, lazy.vae
    lazy.deferred()
    assert unet is lazy.unet and vae is lazy.vae  # filled in place: wrappers made before the load see the weights
    for a, b in ((eager.unet, unet), (eager.vae, vae)):
        want, got = a.state_dict(), b.state_dict()
        assert want.keys() == got.keys()
        assert all(got[k].dtype == torch.float32 and torch.equal(want[k], got[k]) for k in want)


def test_export_holds_one_model_at_a_time(tmp_path, monkeypatch):
    """An export's memory is the largest module's, not their sum: while the U-Net's graph is made no text encoder is
    alive, and once the U-Net's graph is done (the VAE's are next) no U-Net is."""
    import gc

    import diffusers
    import transformers

    from sdrt.export import directory
    from sdrt.export.graphs import Dims

    kinds = (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTextModel,
             transformers.CLIPTextModelWithProjection)  # fmt: skip
    alive: dict[str, set[str]] = {}
    export_graph = directory.export_graph

    def watched(g, *args, **kwargs):
        gc.collect()
        alive[g.name] = {type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds)}
        return export_graph(g, *args, **kwargs)

    monkeypatch.setattr(directory, "export_graph", watched)
    directory.export_model("tiny-sdxl", tmp_path / "out", precision="fp32", dims=Dims(64, 64, 1))
    assert alive["text_encoder"] >= {"CLIPTextModel", "CLIPTextModelWithProjection"}
    assert alive["unet"] == {"UNet2DConditionModel", "AutoencoderKL"}
    assert alive["vae_decoder"] == {"AutoencoderKL"}


def test_staged_loading_refuses_a_model_whose_config_changes_on_loading():
    """Sizes and graphs are decided from the placeholder's config: a loaded model whose config differs is refused in
    one line naming the key, before any weight is assigned."""
    import diffusers

    from sdrt.export.load import _maybe_deferred
    from sdrt.runtime.errors import SdrtError

    cfg = dict(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
               norm_num_groups=4, latent_channels=4)  # fmt: skip
    for loaded, key in (
        (dict(cfg, latent_channels=6), "latent_channels"),
        (dict(cfg, force_upcast=False), "force_upcast"),
    ):
        placeholders, load = _maybe_deferred(
            lambda: (diffusers.AutoencoderKL(**cfg),), lambda loaded=loaded: (diffusers.AutoencoderKL(**loaded),), True
        )
        with pytest.raises(SdrtError, match=rf"AutoencoderKL: loading changes its config \({key}\)"):
            load()
        assert all(t.is_meta for t in placeholders[0].parameters())
