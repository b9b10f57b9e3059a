"""Session fixtures: small random-weight pipelines saved as diffusers folders, and their exports (cached).

The configurations are written out here with diffusers' and transformers' own classes, not taken from
sdrt's presets, so the references the tests compare against do not come from the code under test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

CLIP = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)
VAE = dict(
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=16,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
)
UNETS = {
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    # SD 2.x: v-prediction (scheduler), linear projections, upcast attention, per-block head counts
    "sd2": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=32 + 64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ),
}
# inpainting checkpoints: the same U-Nets reading 4 latent + 1 mask + 4 masked-image channels
UNETS["sd1-inpaint"] = dict(UNETS["sd1"], in_channels=9)
UNETS["sdxl-inpaint"] = dict(UNETS["sdxl"], in_channels=9)
# VAEs with fewer blocks: diffusers' vae_scale_factor = 2 ** (len(block_out_channels) - 1) is 4 and 2
VAES = {
    "sd1-vae4": dict(
        VAE,
        block_out_channels=(16, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    "sd1-vae2": dict(
        VAE,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ),
}
UNETS.update({kind: UNETS["sd1"] for kind in VAES})
# a U-Net trained at 12 latents: native 96 px, which is neither SD's 512 nor this test set's 64
UNETS["sd1-native96"] = dict(UNETS["sd1"], sample_size=12)
SINGLE_FILE_KINDS = ("sd1", "sd2", "sdxl")
SIZES = ["--min-size", "64", "--max-size", "192", "--max-batch", "2"]  # small ranges keep the checks fast
# exports that also carry torch programs (`--torch-programs`), so the torch backend's tests read the export the
# other modules share instead of tracing the same folder again
TORCH_PROGRAMS = {("sd1", "fp16")}


def tokenizer(pad_token: str):
    """A CLIP tokenizer over CLIP's 512 byte-level symbols (no merges), as transformers builds it."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def biased(*encoders) -> None:
    """Give each text encoder's final layer norm the bias a trained CLIP has (a fresh one has none, so its states
    have a mean of 0 and the web UI's emphasis, which rescales a chunk to its mean, would divide by ~0)."""
    for te in encoders:
        norm = getattr(te, "text_model", te).final_layer_norm
        with torch.no_grad():
            norm.bias.copy_(0.5 + 0.1 * torch.randn(norm.bias.shape))


def build_pipeline(kind: str, seed: int = 0):
    """A diffusers pipeline of the given kind (a key of UNETS) with seeded random weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    ids = dict(bos_token_id=512, eos_token_id=513)
    unet = diffusers.UNet2DConditionModel(**UNETS[kind])
    vae = diffusers.AutoencoderKL(**VAES.get(kind, VAE), scaling_factor=0.13025 if kind.startswith("sdxl") else 0.18215)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind.startswith("sdxl"):
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP, hidden_act="quick_gelu", pad_token_id=513, **ids))
        # diffusers tells SDXL's two encoders apart in single files by their width: they must differ
        wide = dict(CLIP, hidden_size=64)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**wide, hidden_act="gelu", pad_token_id=0, **ids))
        biased(te1, te2)
        cls = (
            diffusers.StableDiffusionXLInpaintPipeline
            if kind.endswith("inpaint")
            else diffusers.StableDiffusionXLPipeline
        )
        return cls(
            vae=vae,
            unet=unet,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer("<|endoftext|>"),
            tokenizer_2=tokenizer("!"),
            scheduler=diffusers.EulerDiscreteScheduler(**betas, timestep_spacing="leading"),
        )
    v2 = kind == "sd2"
    te = CLIPTextModel(CLIPTextConfig(**CLIP, hidden_act="gelu" if v2 else "quick_gelu", pad_token_id=0, **ids))
    biased(te)
    sched = (
        diffusers.DDIMScheduler(**betas, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
        if v2
        else diffusers.PNDMScheduler(**betas, skip_prk_steps=True, set_alpha_to_one=False)
    )
    cls = diffusers.StableDiffusionInpaintPipeline if kind.endswith("inpaint") else diffusers.StableDiffusionPipeline
    return cls(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer("!" if v2 else "<|endoftext|>"),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def shared_root(tmp_path_factory) -> Path:
    """One folder for all pytest-xdist workers of this run (the run's base temp), or the base temp without xdist."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent / "shared" if os.environ.get("PYTEST_XDIST_WORKER") else base / "shared"
    root.mkdir(exist_ok=True)
    return root


@contextmanager
def once(path: Path) -> Iterator[bool]:
    """Hold ``path``'s lock; yields True when ``path`` still has to be made (a worker that waited finds it made)."""
    from filelock import FileLock

    with FileLock(str(path.parent / f".{path.name}.lock")):
        yield not path.exists()


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """{kind: diffusers folder} written with save_pretrained (safetensors), for every kind in UNETS."""
    root = shared_root(tmp_path_factory) / "pipelines"
    root.mkdir(exist_ok=True)
    for kind in UNETS:
        with once(root / kind) as todo:
            if todo:
                build_pipeline(kind).save_pretrained(root / f"{kind}.partial")
                (root / f"{kind}.partial").rename(root / kind)
    return {kind: root / kind for kind in UNETS}


@pytest.fixture(scope="session")
def configs(folders, tmp_path_factory) -> dict[str, Path]:
    """{kind: the diffusers folder without its weights}: what a single file needs beside it (configs, tokenizer).
    Without weights, diffusers cannot quietly fall back to the folder when it fails to read the single file."""
    root = shared_root(tmp_path_factory) / "configs"
    root.mkdir(exist_ok=True)
    for kind, folder in folders.items():
        with once(root / kind) as todo:
            if todo:
                shutil.copytree(folder, root / kind, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return {kind: root / kind for kind in folders}


@pytest.fixture(scope="session")
def single_files(folders, tmp_path_factory) -> dict[str, Path]:
    """{kind: one .safetensors file in the original (LDM) layout} for the same pipelines."""
    import diffusers
    from ldm_checkpoint import save_ldm_checkpoint

    root = shared_root(tmp_path_factory) / "single"
    root.mkdir(exist_ok=True)
    out = {}
    for kind in SINGLE_FILE_KINDS:
        out[kind] = root / f"{kind}.safetensors"
        with once(out[kind]) as todo:
            if todo:
                pipe = diffusers.DiffusionPipeline.from_pretrained(folders[kind], local_files_only=True)
                partial = root / f"{kind}.partial.safetensors"
                te2 = getattr(pipe, "text_encoder_2", None)
                save_ldm_checkpoint(partial, pipe.unet, pipe.vae, pipe.text_encoder, te2)
                partial.rename(out[kind])
    return out


class Exports:
    """Engine directories exported on demand through the CLI, once per test run (tracing is slow), shared by
    the run's pytest-xdist workers."""

    def __init__(self, root: Path, folders: dict[str, Path], fixture):
        self.root, self.folders, self._fixture = root, folders, fixture

    def get(self, kind: str, precision: str, single_file: bool = False) -> Path:
        from sdrt.cli import main

        name = kind + ("-single" if single_file else "")
        dest = self.root / f"{name}-{precision}"
        with once(dest) as todo:
            if todo:
                model = self._fixture("single_files")[kind] if single_file else self.folders[kind]
                extra = ["--config", str(self._fixture("configs")[kind])] if single_file else []
                extra += ["--torch-programs"] if (name, precision) in TORCH_PROGRAMS else []
                rc = main(["export", str(model), str(dest), "--precision", precision, *SIZES, *extra])
                assert rc == 0, f"export of {name} ({precision}) failed"
        return dest


@pytest.fixture(scope="session")
def exports(tmp_path_factory, folders, request) -> Exports:
    root = shared_root(tmp_path_factory) / "exports"
    root.mkdir(exist_ok=True)
    return Exports(root, folders, request.getfixturevalue)


@pytest.fixture(scope="session")
def native96(folders, tmp_path_factory) -> Path:
    """sd1-native96 (the sd1 model trained at 12 latents) exported fp32 with every default (range 48-192 px,
    4 images) and torch programs, under umask 022: test_sizes' defaults and file modes, and the torch backend's
    fp32 programs, read this one export."""
    from sdrt.cli import main

    dest = shared_root(tmp_path_factory) / "exports" / "sd1-native96-defaults-fp32"
    dest.parent.mkdir(exist_ok=True)
    with once(dest) as todo:
        if todo:
            old = os.umask(0o022)
            try:
                args = ["export", str(folders["sd1-native96"]), str(dest), "--precision", "fp32", "--torch-programs"]
                assert main(args) == 0
            finally:
                os.umask(old)
    return dest


@pytest.fixture(scope="session")
def bench_engine(tmp_path_factory) -> Path:
    """The tiny-sd1 preset exported fp32 for 64-128 px, batch 1: the directory `sdrt bench`'s test modules run
    (exported once per test run; its parent also holds the peers' IR cache, .bench-peers/)."""
    from sdrt.export import Dims, export_model

    dest = shared_root(tmp_path_factory) / "exports" / "tiny-sd1-bench"
    dest.parent.mkdir(exist_ok=True)
    with once(dest) as todo:
        if todo:
            export_model("tiny-sd1", dest, precision="fp32", dims=Dims(64, 128, 1))
    return dest


def pytest_configure(config):
    """pytest-xdist workers share the machine's cores: torch's default (a thread per core in every worker) leaves
    OpenMP threads spinning at barriers for cores another worker holds, which makes eager diffusers on these small
    models ~12x slower with 2 workers on 2 cores. Each worker takes its share, and so do the processes it starts."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = max(1, cores // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if "SDRT_CACHE" not in os.environ:  # OpenVINO's compiled models: this run's, not the user's cache
        import tempfile

        os.environ["SDRT_CACHE"] = tempfile.mkdtemp(prefix="sdrt-cache-")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available; elsewhere they are reported as skipped, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
