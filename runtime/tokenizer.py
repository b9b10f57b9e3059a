"""Prompts -> token ids, with the `tokenizers` library alone (the same Rust tokenizer transformers wraps)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdrt.runtime.prompts import Chunks, chunk_tokens, is_break, parse_attention

if TYPE_CHECKING:
    from sdrt.runtime.embeddings import Embeddings

log = logging.getLogger("sdrt")


class PromptTokenizer:
    """CLIP tokenization as diffusers does it: bos + text + eos, truncated to 77 and padded with the pad token."""

    def __init__(self, root: Path, entry: dict[str, Any]):
        from tokenizers import Tokenizer

        self.max_length = int(entry["max_length"])
        self.tok = Tokenizer.from_file(str(root / entry["file"]))
        self.tok.enable_truncation(self.max_length)
        self.tok.enable_padding(length=self.max_length, pad_id=int(entry["pad_token_id"]))
        self.fragments = Tokenizer.from_file(str(root / entry["file"]))  # web-UI fragments: no cut, no padding
        self.fragments.no_truncation()
        self.fragments.no_padding()
        self.special = int(entry["bos_token_id"]), int(entry["eos_token_id"]), int(entry["pad_token_id"])
        self.comma = self.fragments.token_to_id(",</w>")  # the web UI's comma token (None: no such token)
        self.triggers: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}  # embeddings (`use`)

    def use(self, embeddings: Embeddings, j: int) -> None:
        """Read the names of ``embeddings`` in prompts, as text encoder ``j``'s vector ids."""
        self.triggers = embeddings.triggers(lambda name: self.fragments.encode(name, add_special_tokens=False).ids, j)

    def _with_embeddings(self, ids: list[int]) -> list[int | tuple[int, ...]]:
        """``ids`` with each spelled embedding name replaced by the tuple of its vector ids (the web UI's lookup:
        at each token, the longest name starting there)."""
        if not self.triggers:
            return ids
        out: list[int | tuple[int, ...]] = []
        i = 0
        while i < len(ids):
            match = next((o for o in self.triggers.get(ids[i], ()) if tuple(ids[i : i + len(o[0])]) == o[0]), None)
            out.append(ids[i] if match is None else match[1])
            i += 1 if match is None else len(match[0])
        return out

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """input_ids [len(prompts), 77] int32. Longer prompts are cut, with the warning diffusers gives."""
        encodings = self.tok.encode_batch(prompts)
        for prompt, enc in zip(prompts, encodings, strict=True):
            if enc.overflowing:
                cut = self.tok.decode(enc.overflowing[0].ids)
                log.warning(
                    "prompt truncated: CLIP reads at most %d tokens; this part was dropped: %r (%.40s...)",
                    self.max_length,
                    cut,
                    prompt,
                )
        return np.array([e.ids for e in encodings], dtype=np.int32)

    def plain(self, text: str) -> Chunks:
        """diffusers' reading: one chunk, every weight 1; an embedding's name becomes its vectors (as diffusers'
        load_textual_inversion expands its token), then the text is cut at 77."""
        tokens = self._with_embeddings(self.fragments.encode(text, add_special_tokens=False).ids)
        if not any(isinstance(t, tuple) for t in tokens):
            ids = self([text])
        else:
            flat = [i for t in tokens for i in (t if isinstance(t, tuple) else (t,))]
            room = self.max_length - 2
            if len(flat) > room:
                log.warning(
                    "prompt truncated: CLIP reads at most %d tokens; %d were dropped (%.40s...)",
                    self.max_length,
                    len(flat) - room,
                    text,
                )
            bos, eos, pad = self.special
            row = [bos, *flat[:room], eos]
            ids = np.array([row + [pad] * (self.max_length - len(row))], dtype=np.int32)
        return Chunks(ids, np.ones(ids.shape, dtype=np.float32))

    def webui(self, text: str, emphasis: str = "original", field: str = "prompt") -> Chunks:
        """The web UI's reading (runtime/prompts.py): emphasis and BREAK parsed (emphasis "none": the text as it
        is), each fragment tokenized alone, 75-token chunks; "ignore" keeps the parse and drops the weights."""
        parsed = parse_attention(text, field) if emphasis != "none" else [(text, 1.0)]
        texts = [t for t, w in parsed if not is_break(t, w)]
        encoded = iter(self.fragments.encode_batch(texts, add_special_tokens=False) if texts else [])
        pieces = [
            (None, 1.0)
            if is_break(t, w)
            else (self._with_embeddings(next(encoded).ids), 1.0 if emphasis == "ignore" else w)
            for t, w in parsed
        ]
        return chunk_tokens(pieces, *self.special, comma=self.comma)
