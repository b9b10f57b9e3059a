"""The web UI's LoRA tags in a prompt, ``<lora:NAME:SCALE>``, read as its Lora extension reads them
(`prompt_loras`): how ``/sdapi`` clients ask for the adapters that ``/v1/images`` takes as ``loras``."""

from __future__ import annotations

import re
from collections import Counter

from sdrt.serve.inputs import bad_request

# the web UI's extra-network tags, <KIND:ARG:ARG...> (its modules/extra_networks.py, re_extra_net); its Lora
# extension answers to "lora" and to the alias "lyco"
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


def prompt_loras(prompt: str) -> tuple[str, dict[str, float]]:
    """The web UI's LoRA tags, ``<lora:NAME>`` (scale 1) or ``<lora:NAME:SCALE>``, anywhere in a prompt -> the
    prompt without them and ``{NAME: scale}``. As in the web UI, each tag is replaced by nothing (CLIP's tokenizer
    drops the spaces left behind) and different adapters add up; only the prompt is parsed, a tag in the negative
    prompt is text (the web UI's `parse_extra_network_prompts` reads the prompts alone).

    The same name twice does what it does in the web UI (extensions-builtin/Lora/networks.py, `load_networks`):
    both tags get the one network object, whose multiplier ends as the last tag's, and that network is applied once
    per tag, so ``<lora:a:0.2> <lora:a:0.3>`` is ``a`` at 2 x 0.3 = 0.6 (equal scales simply add up).

    What sdrt cannot honour is a 400 naming ``prompt``: another kind of extra network (``<hypernet:...>``),
    separate text-encoder and U-Net scales (``<lora:a:0.5:0.8>``, ``te=``, ``unet=``, ``dyn=``), a scale that is
    not a number. Names and scales are then checked by the engine (`check_loras`: ``loras``, i.e. ``prompt`` here).
    """
    tags: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind not in LORA_KINDS:
            raise bad_request(
                "prompt", f"prompt tag {m.group(0)!r}: sdrt applies LoRA adapters only, as <lora:NAME:SCALE>"
            )
        if len(args) > 2 or any("=" in a for a in args):
            raise bad_request(
                "prompt",
                f"prompt tag {m.group(0)!r}: give <lora:NAME> or <lora:NAME:SCALE>, one "
                "scale for text encoder and U-Net (te=, unet=, dyn= are not supported)",
            )
        try:
            tags.append((args[0], float(args[1]) if len(args) > 1 else 1.0))
        except ValueError:
            raise bad_request("prompt", f"prompt tag {m.group(0)!r}: the scale {args[1]!r} is not a number") from None
        return ""

    text = EXTRA_NETWORK_TAG.sub(take, prompt)
    last, count = dict(tags), Counter(name for name, _ in tags)
    return text, {name: count[name] * scale for name, scale in last.items()}
