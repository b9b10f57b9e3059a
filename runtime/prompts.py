"""Prompts -> token ids and per-token weights, as diffusers reads them (plain text) or as the web UI does.

The web UI's syntax (its wiki, "Attention/emphasis"; `modules/prompt_parser.py` and `sd_hijack_clip.py`):
- ``(x)`` multiplies the weight of x by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies it by w; nesting
  multiplies; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal; an unclosed bracket applies to the end of the
  prompt;
- ``BREAK`` (upper case, a word of its own) ends the current chunk;
- the text is tokenized fragment by fragment (without special tokens) and cut into chunks of 75 tokens, each read
  as BOS + 75 tokens + EOS (padded with EOS, then with the tokenizer's pad token after the first EOS): a chunk that
  fills up within 20 tokens after a comma moves the words after that comma to the next chunk;
- each chunk is encoded on its own and the chunks are joined along the token axis (77 x k states);
- a textual-inversion embedding's name (runtime/embeddings.py), wherever the tokens spell it, becomes its vectors,
  kept together in one chunk.

A parsed text is `Chunks`: ids and weights [k, 77]. The weights multiply the text encoder's states per token; the
web UI's default emphasis ("Original") then rescales each chunk back to its mean before weighting, its "No norm"
does not. Prompt editing ``[a:b:N]``, alternation ``[a|b]`` and ``AND`` (composable diffusion) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import SdrtError

SYNTAXES = ("plain", "webui")  # plain: diffusers' (one 77-token chunk, the rest cut); webui: as above
EMPHASIS = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None"}  # the web UI's names
CHUNK = 75  # prompt tokens per chunk; with BOS and EOS, the text encoder's 77
COMMA_BACKTRACK = 20  # the web UI's comma_padding_backtrack default

# One token of the emphasis syntax each: escapes, a lone backslash, brackets, ":weight)" closing a round bracket,
# ")", "]", runs of text, ":".
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def is_break(fragment: str, weight: float) -> bool:
    """A BREAK in a parsed prompt: the fragment "BREAK" at weight -1 (inside brackets its weight is scaled, and it
    is then the word BREAK, as in the web UI)."""
    return fragment == "BREAK" and weight == -1


@dataclass(frozen=True)
class Chunks:
    """One text, encoded: token ids [k, 77] (int32) and the weight of each token [k, 77] (float32)."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    def padded(self, empty: Chunks, count: int) -> Chunks:
        """These chunks, then copies of ``empty`` (the empty prompt's chunk) up to ``count``: the web UI's
        pad_cond_uncond."""
        extra = max(count - self.count, 0)
        return Chunks(
            np.concatenate([self.ids, np.repeat(empty.ids, extra, axis=0)]),
            np.concatenate([self.weights, np.repeat(empty.weights, extra, axis=0)]),
        )


def parse_attention(text: str, field: str = "prompt") -> list[tuple[str, float]]:
    """The web UI's emphasis: ``[(fragment, weight)]``, runs of equal weight joined, each BREAK a ``("BREAK", -1)``.
    A weight that is not a number (``(x:1.2.3)``) is a one-line error."""
    out: list[list] = []  # [fragment, weight]
    rounds: list[int] = []  # where each open "(" starts in `out`
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for item in out[start:]:
            item[1] *= by

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(out))
        elif token == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            try:
                value = float(weight)
            except ValueError:
                raise SdrtError(
                    f"{field}: the weight in {token!r} is not a number; write (text:1.2)", field=field
                ) from None
            scale(rounds.pop(), value)
        elif token == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append(["BREAK", -1.0])
                out.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for item in out or [["", 1.0]]:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(list(item))
    return [(t, w) for t, w in merged]


def check_webui(text: str, field: str) -> None:
    """Refuse what the web UI schedules per step, which sdrt does not: prompt editing ``[a:b:N]`` / ``[a:N]``,
    alternation ``[a|b]``, and composable ``AND``."""
    if re.search(r"\bAND\b", text):
        raise SdrtError(
            f"{field}: AND (composable prompts) is not supported; write one prompt, or weight its "
            "parts with (text:1.2)",
            field=field,
        )
    depth: list[int] = []  # positions of open "[" (escaped brackets are text)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth.append(i)
        elif c == "]" and depth:
            inner = _top_level(text[depth.pop() + 1 : i])
            if "|" in inner or re.search(r":\s*[+-]?[\d.]+\s*$", inner) and not inner.startswith(":"):
                raise SdrtError(
                    f"{field}: prompt editing [a:b:N] and alternation [a|b] are not supported; "
                    "write the prompt of one step",
                    field=field,
                )
        i += 1


def _top_level(inner: str) -> str:
    """``inner`` without its bracketed parts (and escapes), so only its own ``:`` and ``|`` remain."""
    out, level, i = [], 0, 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            i += 2
            continue
        level += (c in "([") - (c in ")]")
        if level == 0 and c not in ")]":
            out.append(c)
        i += 1
    return "".join(out)


def chunk_tokens(
    pieces: list[tuple[list[int | tuple[int, ...]] | None, float]], bos: int, eos: int, pad: int, comma: int | None
) -> Chunks:
    """(tokens, weight) of each parsed fragment (a BREAK: tokens None) -> 77-token chunks, as the web UI cuts them.
    A token is an id, or a textual-inversion embedding's vector ids (a tuple): those go into one chunk together,
    the next one when they do not fit in this one."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        fill = CHUNK - len(ids)
        chunks.append(([bos, *ids, *[eos] * fill, eos], [1.0, *weights, *[1.0] * fill, 1.0]))
        ids, weights, last_comma = [], [], -1

    for tokens, weight in pieces:
        if tokens is None:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the words after the comma start the next chunk
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK:
                close()
            vectors = token if isinstance(token, tuple) else (token,)
            if len(ids) + len(vectors) > CHUNK:
                close()
            ids.extend(vectors)
            weights.extend([weight] * len(vectors))
    if ids or not chunks:
        close()
    out = np.array([c[0] for c in chunks], dtype=np.int32)
    if pad != eos:  # padding after the first EOS is the pad token (SD 2.x and SDXL's second tokenizer: 0)
        for row in out:
            row[int(np.argmax(row == eos)) + 1 :] = pad
    return Chunks(out, np.array([c[1] for c in chunks], dtype=np.float32))
