"""The web UI's request fields and ``override_settings``, each one honoured, ignored because it does not change the
picture, or refused with a 400 that names it: a field sdrt accepted and did not honour would be a wrong picture
with status 200.

Honoured (`sampling_options`): the prompt syntax (always the web UI's on ``/sdapi``), ``eta`` and the settings
``CLIP_stop_at_last_layers``, ``emphasis`` / ``enable_emphasis``, ``pad_cond_uncond``, ``eta_ddim``,
``eta_ancestral``, ``randn_source`` (CPU: sdrt's noise is drawn on the CPU, from the seed, as diffusers draws it),
``sd_model_checkpoint`` (the model served). Refused unless at the web UI's default (`AT_DEFAULT`, `FIELDS_AT_DEFAULT`):
what changes the picture in a way sdrt does not reproduce. Ignored: everything else (saving, paths, previews, UI,
memory and speed options: `IGNORED_FIELDS` lists the body's).
"""

from __future__ import annotations

import math
from typing import Any

from sdrt.runtime import prompts
from sdrt.runtime.params import ANCESTRAL
from sdrt.serve.inputs import bad_request

# settings that change the picture, at the values where they do not (the web UI's defaults)
AT_DEFAULT: dict[str, tuple[Any, ...]] = {
    "comma_padding_backtrack": (20,),
    "sdxl_clip_l_skip": (False,),
    "use_old_emphasis_implementation": (False,),
    "pad_cond_uncond_v0": (False,),
    "s_churn": (0,),
    "s_tmin": (0,),
    "s_tmax": (0, math.inf),
    "s_noise": (1,),
    "s_min_uncond": (0,),
    "s_min_uncond_all": (False,),
    "skip_early_cond": (0,),
    "eta_noise_seed_delta": (0,),
    "always_discard_next_to_last_sigma": (False,),
    "k_sched_type": ("Automatic",),
    "sigma_min": (0,),
    "sigma_max": (0,),
    "rho": (0,),
    "sd_noise_schedule": ("Default",),
    "use_old_karras_scheduler_sigmas": (False,),
    "no_dpmpp_sde_batch_determinism": (False,),
    "use_old_scheduling": (False,),
    "use_downcasted_alpha_bar": (False,),
    "token_merging_ratio": (0,),
    "token_merging_ratio_img2img": (0,),
    "token_merging_ratio_hr": (0,),
    "img2img_extra_noise": (0,),
    "initial_noise_multiplier": (1,),
    "img2img_fix_steps": (False,),
    "img2img_color_correction": (False,),
    "inpainting_mask_weight": (1,),
    "enable_quantization": (False,),
    "tiling": (False,),
    "face_restoration": (False,),
    "sdxl_crop_top": (0,),
    "sdxl_crop_left": (0,),
    "sd_vae": ("Automatic", "None", None),
    "sd_unet": ("Automatic", "None", None),
    "sd_hypernetwork": ("None", None),
    "extra_networks_default_multiplier": (1,),
    "sd_vae_encode_method": ("Full",),
    "sd_vae_decode_method": ("Full",),
    "enable_batch_seeds": (True,),
}
EMPHASIS = {name: mode for mode, name in prompts.EMPHASIS.items()}  # the web UI's name -> sdrt's

# body fields that change the picture, at the values where they do not
FIELDS_AT_DEFAULT: dict[str, tuple[Any, ...]] = {
    "styles": ([], None),
    "subseed_strength": (0, None),
    "seed_resize_from_h": (-1, 0, None),
    "seed_resize_from_w": (-1, 0, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "s_churn": (0, None),
    "s_tmin": (0, None),
    "s_tmax": (0, None, math.inf),
    "s_noise": (1, None),
    "s_min_uncond": (0, None),
    "script_name": (None, ""),
    "firstpass_image": (None, ""),
    "resize_mode": (0, None),
    "latent_mask": (None, ""),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "firstphase_width": (0, None),
    "firstphase_height": (0, None),
    "hr_additional_modules": (None, [], ["Use same choices"]),
}
# body fields that do not change the picture
IGNORED_FIELDS = (
    "send_images",
    "save_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings_restore_afterwards",
    "force_task_id",
    "infotext",
    "comments",
    "include_init_images",
    "subseed",
    "script_args",
    "refiner_switch_at without refiner_checkpoint",
    "image_cfg_scale (instruct-pix2pix models only)",
    "hr_* and denoising_strength of txt2img without enable_hr",
)


def _equal(value: Any, allowed: tuple[Any, ...]) -> bool:
    for a in allowed:
        if value is None or a is None:
            if value is a:
                return True
        elif isinstance(a, bool) or isinstance(value, bool):
            if value is a:
                return True
        elif isinstance(a, (int, float)) and isinstance(value, (int, float)):
            if float(value) == float(a):
                return True
        elif value == a:
            return True
    return False


def check_fields(body: dict[str, Any]) -> None:
    """Refuse the body fields that would change the picture in a way sdrt does not reproduce."""
    for name, allowed in FIELDS_AT_DEFAULT.items():
        if name in body and not _equal(body[name], allowed):
            shown = ", ".join(repr(a) for a in allowed if a is not None)
            raise bad_request(
                name,
                f"{name} {body[name]!r} is not supported (it would change the picture in a way "
                f"sdrt does not reproduce); send {shown} or leave it out",
            )


def sampling_options(settings: dict[str, Any], eta: float | None, sampler: str | None, model: str) -> dict[str, Any]:
    """`Params` fields for the body's ``eta`` and ``override_settings``, as the web UI reads them; a setting that
    would change the picture in a way sdrt does not reproduce is a 400 naming ``override_settings.KEY``."""
    if not isinstance(settings, dict):
        raise bad_request("override_settings", "override_settings must be an object of setting: value")
    for key, allowed in AT_DEFAULT.items():
        if key in settings and not _equal(settings[key], allowed):
            shown = " or ".join(repr(a) for a in allowed if a is not None)
            raise bad_request(
                f"override_settings.{key}",
                f"setting {key} = {settings[key]!r} is not supported (it "
                f"changes the picture in a way sdrt does not reproduce); send {shown} or leave it out",
            )
    out: dict[str, Any] = {"prompt_syntax": "webui"}
    if "CLIP_stop_at_last_layers" in settings:
        out["webui_clip_skip"] = settings["CLIP_stop_at_last_layers"]
    emphasis = settings.get("emphasis", "Original")
    if emphasis not in EMPHASIS:
        raise bad_request("override_settings.emphasis", f"emphasis {emphasis!r}: use one of {', '.join(EMPHASIS)}")
    out["emphasis"] = EMPHASIS[emphasis] if settings.get("enable_emphasis", True) is not False else "none"
    out["pad_chunks"] = settings.get("pad_cond_uncond", False) is True
    source = settings.get("randn_source", "CPU")
    if source != "CPU":
        raise bad_request(
            "override_settings.randn_source",
            f"randn_source {source!r}: sdrt draws its noise on the CPU from the seed, as diffusers does; send CPU",
        )
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint not in (None, "") and model not in str(checkpoint):
        raise bad_request(
            "override_settings.sd_model_checkpoint",
            f"this server serves {model}, not {checkpoint!r}; send that model, or leave the setting out",
        )
    # eta: the body's, else the sampler's own setting (the web UI's eta_ddim, eta_ancestral)
    defaults = {"ddim": settings.get("eta_ddim", 0.0), **dict.fromkeys(ANCESTRAL, settings.get("eta_ancestral", 1.0))}
    out["eta"] = defaults.get(sampler) if eta is None else eta
    if sampler in ANCESTRAL and isinstance(out["eta"], (int, float)) and out["eta"] != 1:
        field = "eta" if eta is not None else "override_settings.eta_ancestral"
        raise bad_request(
            field,
            f"eta {out['eta']!r} with {sampler}: its noise is eta 1 in sdrt (as diffusers' "
            "scheduler draws it); send 1, or DDIM with its eta",
        )
    return out
