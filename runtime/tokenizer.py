"""Prompts -> token ids, with the `tokenizers` library alone (the same Rust tokenizer transformers wraps)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("sdrt")


class PromptTokenizer:
    """CLIP tokenization as diffusers does it: bos + text + eos, truncated to 77 and padded with the pad token."""

    def __init__(self, root: Path, entry: dict[str, Any]):
        from tokenizers import Tokenizer

        self.max_length = int(entry["max_length"])
        self.tok = Tokenizer.from_file(str(root / entry["file"]))
        self.tok.enable_truncation(self.max_length)
        self.tok.enable_padding(length=self.max_length, pad_id=int(entry["pad_token_id"]))

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
