"""Sampler names as clients send them -> sdrt samplers (`sampler_name`): sdrt's own (`SAMPLERS`), the web UI's
(``DPM++ 2M``, and the k-diffusion aliases older clients send) and the web UI's separate ``scheduler`` field
(Karras). `WEBUI_NAMES` is the way back, for ``GET /sdapi/v1/samplers`` and the web UI's ``info``."""

from __future__ import annotations

from sdrt.runtime.params import SAMPLERS
from sdrt.serve.inputs import bad_request

# web-UI sampler names (and the k-diffusion aliases older clients send) -> sdrt samplers
WEBUI_SAMPLERS = {
    "euler a": "euler_a",
    "k_euler_a": "euler_a",
    "euler": "euler",
    "k_euler": "euler",
    "ddim": "ddim",
    "heun": "heun",
    "k_heun": "heun",
    "dpm2": "dpm2",
    "k_dpm_2": "dpm2",
    "dpm2 a": "dpm2_a",
    "k_dpm_2_a": "dpm2_a",
    "dpm++ sde": "dpmpp_sde",
    "k_dpmpp_sde": "dpmpp_sde",
    "dpm++ sde karras": "dpmpp_sde_karras",
    "dpm++ 2m": "dpmpp_2m",
    "k_dpmpp_2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpm++ 2m sde karras": "dpmpp_2m_sde_karras",
    "lcm": "lcm",
    "plms": "pndm",
    "pndm": "pndm",
    "unipc": "unipc",
    "deis": "deis",
}
WEBUI_NAMES = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "lcm": "LCM",
    "pndm": "PLMS",
    "unipc": "UniPC",
    "deis": "DEIS",
}
# the web UI's scheduler: Karras
KARRAS = {"dpmpp_sde": "dpmpp_sde_karras", "dpmpp_2m": "dpmpp_2m_karras", "dpmpp_2m_sde": "dpmpp_2m_sde_karras"}


def sampler_name(name: str | None, scheduler: str | None, field: str) -> str | None:
    """An sdrt sampler for an sdrt or web-UI sampler name (and the web UI's separate ``scheduler`` field)."""
    if scheduler not in (None, "", "Automatic", "automatic"):
        plain = sampler_name(name, None, field)
        if scheduler.lower() != "karras" or plain not in (*KARRAS, *KARRAS.values()):
            raise bad_request(
                "scheduler",
                f"scheduler {scheduler!r} is only supported as Karras with DPM++ SDE, DPM++ 2M and DPM++ 2M SDE",
            )
        return KARRAS.get(plain, plain)
    if name is None or name in SAMPLERS:
        return name
    if name.lower() in WEBUI_SAMPLERS:
        return WEBUI_SAMPLERS[name.lower()]
    known = ", ".join([*WEBUI_NAMES.values(), *SAMPLERS])
    raise bad_request(field, f"unknown sampler {name!r}; samplers are: {known}")
