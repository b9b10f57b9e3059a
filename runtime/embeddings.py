"""Textual-inversion embeddings: `sdrt embedding add DIR FILE` and the vectors the text encoders read.

A file is read (``.safetensors`` only: pickle files can run code) in the layouts the web UI and diffusers'
``load_textual_inversion`` read:
- one tensor [n, D] (or [D]) under any key: diffusers' concepts (``{"<token>": ...}``) and ``emb_params`` (the
  web UI's safetensors, e.g. EasyNegative);
- ``string_to_param.*``: the web UI's own embedding layout, flattened into safetensors;
- ``clip_l`` [n, 768] and ``clip_g`` [n, 1280]: an SDXL embedding, one vector set per text encoder.

It is stored as ``embeddings/NAME.safetensors`` (per text encoder graph, its vectors [n, D], float32), recorded in
the manifest with its SHA-256 and the source file's. NAME (the file's stem unless ``--name``) is the trigger: as in
the web UI, wherever a prompt's tokens spell NAME (so a name that is also a word replaces that word, and only as
a whole token sequence: "cat" does not match inside "cats"), its n vectors take the place of those tokens, at the
weight the prompt gives them. The text encoder graphs read the vectors as data (`embeddings` input, export/
graphs.py TextEncoder): adding one needs no new graph, plan or export.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.lora import NAME_RE
from sdrt.runtime.manifest import check_files, read_manifest, replaced_atomically, sha256_file, write_manifest

EMBEDDING_DIR = "embeddings"
MAX_VECTORS = 75  # one prompt chunk: the web UI moves an embedding that does not fit to the next chunk
_SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def _text_encoders(manifest: dict[str, Any]) -> list[str]:
    return [g for g in ("text_encoder", "text_encoder_2") if g in manifest["graphs"]]


def _width(manifest: dict[str, Any], graph: str) -> int:
    return int(manifest["graphs"][graph]["inputs"]["embeddings"]["shape"][-1])


def read_vectors(file: Path) -> dict[str, np.ndarray]:
    """The vectors a file holds, as {"": [n, D]} (one set) or {"clip_l": ..., "clip_g": ...} (SDXL), float32.
    Anything else is a one-line error naming the layouts read."""
    from safetensors import SafetensorError, safe_open

    if file.suffix != ".safetensors":
        raise SdrtError(
            f"{file}: only .safetensors embeddings are read (pickle files can run code); convert it first", field="file"
        )
    try:
        with safe_open(str(file), "pt") as f:  # torch reads bfloat16 too
            keys = list(f.keys())
            data = {
                k: f.get_tensor(k)
                for k in keys
                if k in _SDXL_KEYS.values() or k.startswith("string_to_param.") or len(keys) == 1
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SdrtError(f"{file}: cannot read it as safetensors: {str(err).splitlines()[0]}", field="file") from None
    if set(_SDXL_KEYS.values()) <= set(data):
        out = {k: data[k] for k in _SDXL_KEYS.values()}
    elif params := [k for k in data if k.startswith("string_to_param.")]:
        if len(params) != 1:
            raise SdrtError(f"{file}: {len(params)} string_to_param tensors; an embedding holds one", field="file")
        out = {"": data[params[0]]}
    elif len(keys) == 1:
        out = {"": data[keys[0]]}
    else:
        shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        hint = " (a LoRA? add it with `sdrt lora add`)" if any("lora" in k for k in keys) else ""
        raise SdrtError(
            f"{file} is not a textual-inversion embedding{hint}: its keys are {shown}; an embedding is one "
            "tensor (diffusers, emb_params), string_to_param.* (the web UI) or clip_l + clip_g (SDXL)",
            field="file",
        )
    out = {k: v.float().numpy() for k, v in out.items()}
    out = {k: v[None] if v.ndim == 1 else v for k, v in out.items()}
    for k, v in out.items():
        if v.ndim != 2 or not 1 <= v.shape[0] <= MAX_VECTORS or not np.isfinite(v).all():
            raise SdrtError(
                f"{file}: {k or 'its tensor'} is {list(v.shape)}; an embedding is [vectors, width] with "
                f"1 to {MAX_VECTORS} finite vectors",
                field="file",
            )
    if len({v.shape[0] for v in out.values()}) > 1:
        raise SdrtError(f"{file}: clip_l and clip_g hold different numbers of vectors", field="file")
    return out


def is_embedding(file: Path) -> bool:
    """Whether ``file`` reads as a textual-inversion embedding (for the LoRA commands' one-line refusal)."""
    try:
        read_vectors(file)
    except SdrtError:
        return False
    return True


def _per_graph(manifest: dict[str, Any], vectors: dict[str, np.ndarray], file: Path) -> dict[str, np.ndarray]:
    """The file's vectors per text encoder graph of this directory, their widths checked."""
    graphs = _text_encoders(manifest)
    widths = {g: _width(manifest, g) for g in graphs}
    if "" in vectors and len(graphs) == 1:
        out = {graphs[0]: vectors[""]}
    elif "" not in vectors and len(graphs) == 2:
        out = {g: vectors[_SDXL_KEYS[g]] for g in graphs}
    else:
        given = " + ".join(str(v.shape[1]) for v in vectors.values())
        raise SdrtError(
            f"{file} holds {given}-wide vectors; this model's text encoders take "
            f"{' + '.join(str(w) for w in widths.values())} (an embedding for another model family?)",
            field="file",
        )
    for g, v in out.items():
        if v.shape[1] != widths[g]:
            raise SdrtError(
                f"{file} holds {v.shape[1]}-wide vectors for {g}, which takes {widths[g]}: an embedding "
                "for another model?",
                field="file",
            )
    return out


def add_embedding(
    root: str | os.PathLike, file: str | os.PathLike, name: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Import ``file`` into the engine directory ``root`` as embedding ``name`` (default: the file's stem, the web
    UI's trigger word). Everything is checked before anything is written."""
    from safetensors.numpy import save_file

    root, file = Path(root), Path(file)
    manifest = read_manifest(root)
    name = name or file.stem
    if not re.fullmatch(NAME_RE, name):
        raise SdrtError(f"embedding name {name!r}: use letters, digits, '_', '-' and '.'; pass --name", field="name")
    have = manifest.get("embeddings", {})
    if name in have and not force:
        raise SdrtError(
            f"{root} already has an embedding {name!r}; pass --force to replace it, or --name", field="name"
        )
    if not file.is_file():
        raise SdrtError(f"{file}: no such file", field="file")
    if not all("embeddings" in manifest["graphs"][g]["inputs"] for g in _text_encoders(manifest)):
        raise SdrtError(
            f"{root} was exported before embeddings existed; re-export it with this sdrt "
            f"(`sdrt export ... {root} --force`) to add embeddings"
        )
    vectors = _per_graph(manifest, read_vectors(file), file)
    clash = _same_trigger(root, manifest, name, {n for n in have if n != name})
    if clash:
        raise SdrtError(
            f"{name!r} reads as the same tokens as the embedding {clash!r} already in {root}; pass "
            "another --name, or remove that one",
            field="name",
        )
    (root / EMBEDDING_DIR).mkdir(exist_ok=True)
    rel = f"{EMBEDDING_DIR}/{name}.safetensors"
    with replaced_atomically(root / rel) as tmp:
        save_file(vectors, str(tmp), metadata={"format": "sdrt-embedding-1", "source": file.name})
    manifest.setdefault("embeddings", {})[name] = {
        "file": rel,
        "source": file.name,
        "source_sha256": sha256_file(file),
        "vectors": int(next(iter(vectors.values())).shape[0]),
    }
    manifest["files"][rel] = sha256_file(root / rel)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_manifest(root, manifest)
    return {"name": name, **manifest["embeddings"][name]}


def _same_trigger(root: Path, manifest: dict[str, Any], name: str, others: set[str]) -> str | None:
    """The embedding among ``others`` whose name tokenizes as ``name`` does (the CLIP tokenizer lowercases)."""
    from tokenizers import Tokenizer

    entry = next(iter(manifest["tokenizers"].values()))
    tok = Tokenizer.from_file(str(root / entry["file"]))
    ids = tok.encode(name, add_special_tokens=False).ids
    if not ids:
        raise SdrtError(f"embedding name {name!r} reads as no tokens; pass --name", field="name")
    return next((n for n in sorted(others) if tok.encode(n, add_special_tokens=False).ids == ids), None)


def remove_embedding(root: str | os.PathLike, name: str) -> dict[str, Any]:
    """`sdrt embedding remove DIR NAME`: the manifest is written first, then the file goes."""
    root = Path(root)
    manifest = read_manifest(root)
    have = manifest.get("embeddings", {})
    if name not in have:
        raise SdrtError(f"{root} has no embedding {name!r} (it has: {', '.join(sorted(have)) or 'none'})", field="name")
    entry = have.pop(name)
    manifest["files"].pop(entry["file"], None)
    write_manifest(root, manifest)
    (root / entry["file"]).unlink(missing_ok=True)
    return entry


class Embeddings:
    """A directory's embeddings as the runtime reads them: per text encoder one table of every embedding's
    vectors [E, D] (E >= 1: a zero row when there are none), and per name the rows it occupies. A prompt refers to
    row r of text encoder j's table with the token id ``vocab_j + r`` (the graph reads `embeddings` there)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        from safetensors.numpy import load_file

        graphs = _text_encoders(manifest)
        self.enabled = all("embeddings" in manifest["graphs"][g]["inputs"] for g in graphs)
        entries = manifest.get("embeddings", {}) if self.enabled else {}
        problems = check_files(root, manifest, [e["file"] for e in entries.values()])
        if problems:
            raise SdrtError(f"{root}: {'; '.join(problems)}; add the embedding again with `sdrt embedding add`")
        self.vocab = [int(manifest["graphs"][g].get("vocab_size", 0)) for g in graphs]
        self.rows: dict[str, tuple[int, int]] = {}  # name -> (first row, vectors)
        parts: list[list[np.ndarray]] = [[] for _ in graphs]
        for name in sorted(entries):
            data = load_file(str(root / entries[name]["file"]))
            first = sum(len(p) for p in parts[0])
            for j, g in enumerate(graphs):
                parts[j].append(data[g])
            self.rows[name] = (first, int(data[graphs[0]].shape[0]))
        empty = [np.zeros((1, _width(manifest, g) if self.enabled else 1), np.float32) for g in graphs]
        self.tables = [np.concatenate(p) if p else e for p, e in zip(parts, empty, strict=True)]

    def triggers(self, tokenize, j: int) -> dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
        """For text encoder ``j``, with ``tokenize`` (text -> ids, no special tokens): {first token of a name:
        [(the name's tokens, the ids of its vectors)]}, longest names first, as the web UI looks them up."""
        out: dict[int, list] = {}
        for name, (first, count) in self.rows.items():
            ids = tuple(tokenize(name))
            base = self.vocab[j] + first
            if ids:
                out.setdefault(ids[0], []).append((ids, tuple(range(base, base + count))))
        for options in out.values():
            options.sort(key=lambda o: -len(o[0]))
        return out
