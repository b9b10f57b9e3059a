"""Session fixtures: small random-weight pipelines (tests/helpers/models.py) saved as diffusers folders, and their
exports (cached), shared by every test module and by the run's pytest-xdist workers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.helpers.models import SIZES, UNETS, build_pipeline

SINGLE_FILE_KINDS = ("sd1", "sd2", "sdxl")
# exports that also carry torch programs (`--torch-programs`), so the torch backend's tests read the export the
# other modules share instead of tracing the same folder again
TORCH_PROGRAMS = {("sd1", "fp16")}


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

    from tests.helpers.ldm_checkpoint import save_ldm_checkpoint

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
