"""Prompts -> token ids, with the `tokenizers` library alone (the same Rust tokenizer transformers wraps)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.runtime.prompts import Chunks, chunk_tokens, is_break, parse_attention

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
        """diffusers' reading: one chunk, every weight 1."""
        ids = self([text])
        return Chunks(ids, np.ones(ids.shape, dtype=np.float32))

    def webui(self, text: str, emphasis: str = "original", field: str = "prompt") -> Chunks:
        """The web UI's reading (runtime/prompts.py): emphasis and BREAK parsed (emphasis "none": the text as it
        is), each fragment tokenized alone, 75-token chunks; "ignore" keeps the parse and drops the weights."""
        parsed = parse_attention(text, field) if emphasis != "none" else [(text, 1.0)]
        texts = [t for t, w in parsed if not is_break(t, w)]
        encoded = iter(self.fragments.encode_batch(texts, add_special_tokens=False) if texts else [])
        pieces = [(None, 1.0) if is_break(t, w) else (next(encoded).ids, 1.0 if emphasis == "ignore" else w)
                  for t, w in parsed]  # fmt: skip
        return chunk_tokens(pieces, *self.special, comma=self.comma)
