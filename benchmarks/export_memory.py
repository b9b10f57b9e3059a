"""Export footprint: wall time and peak resident memory of `sdrt export`, per model and per stage.

    python -m sdrt.benchmarks.export_memory sd15 small-sdxl [--precision fp16] [--json PATH] [--keep DIR]

Each export runs alone, in its own process, under `/usr/bin/time -v` (the whole process's peak resident memory);
the stage lines are the export's own progress (seconds per stage, peak memory so far) with each stage's
own peak, sampled every 50 ms from outside. MODEL is a preset, a
diffusers folder, or `small-sdxl`: an SDXL-shaped folder of a few MB written here with diffusers' classes whose
U-Net declares SDXL's native 128 latents, so its default range is 512-2048 px; what the export costs must follow
the model, not the range. Nothing here is a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGE = re.compile(r"\] (.+) done in ([\d.]+)s \(peak memory ([\d.]+) GB\)")


def small_sdxl(folder: Path) -> Path:
    """A few-MB SDXL-shaped diffusers folder (two text encoders, text_time conditioning) trained at 128 latents."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdrt.export.load import byte_level_clip_tokenizer

    torch.manual_seed(0)
    clip = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=512,
        eos_token_id=513,
    )
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32 + 64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip, pad_token_id=513)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**dict(clip, hidden_size=64), pad_token_id=0)),
        tokenizer=byte_level_clip_tokenizer("<|endoftext|>"), tokenizer_2=byte_level_clip_tokenizer("!"),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def measure(model: str, precision: str, work: Path, keep: Path | None = None) -> dict:
    """One export in its own process under /usr/bin/time -v: wall, peak RSS, and the export's stage lines, each
    with the stage's own peak (the process's resident size sampled every 50 ms from here while the stage ran)."""
    dest = (keep or work) / f"engine-{Path(model).name}-{precision}"
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "sdrt.cli",
        "export",
        model,
        str(dest),
        "--precision",
        precision,
        "--force",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    own: dict[str, float] = {}  # stage -> its own peak, GB
    seen, peak = 0, 0.0
    while proc.poll() is None:
        peak = max(peak, _rss_gb(proc.pid))
        for line in lines[seen:]:  # a stage's window of samples opens at its start line and closes at its end
            if m := STAGE.search(line):
                own[m[1]] = peak
            elif line.rstrip().endswith(" ..."):
                peak = _rss_gb(proc.pid)
        seen = len(lines)
        time.sleep(0.05)
    reader.join()
    stderr = "".join(lines)
    if proc.returncode:
        raise SystemExit(f"export of {model} failed (rc {proc.returncode}):\n{stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    stages = [
        dict(stage=m[1], seconds=float(m[2]), peak_gb=round(own.get(m[1], 0.0), 2), peak_so_far_gb=float(m[3]))
        for m in STAGE.finditer(stderr)
    ]
    manifest = json.loads((dest / "manifest.json").read_text())
    return dict(
        model=model,
        precision=precision,
        wall_s=round(seconds, 1),
        peak_gb=round(peak_kb * 1024 / 1e9, 2),
        range_px=[manifest["shapes"]["min_px"], manifest["shapes"]["max_px"]],
        stages=stages,
        command=" ".join(cmd[2:]),
    )


def _rss_gb(time_pid: int) -> float:
    """Resident size of the export process (the child of /usr/bin/time), GB; 0 before it starts or after it ends."""
    try:
        kids = Path(f"/proc/{time_pid}/task/{time_pid}/children").read_text().split()
        for line in Path(f"/proc/{kids[0]}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, IndexError):
        pass
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", metavar="MODEL", help="presets, diffusers folders, or small-sdxl")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", type=Path, help="export into this folder and keep the engine directories (to build)")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="sdrt-export-memory-") as tmp:
        work = Path(tmp)
        for model in args.models:
            path = str(small_sdxl(work / "small-sdxl")) if model == "small-sdxl" else model
            r = measure(path, args.precision, work, args.keep)
            r["model"] = model
            results.append(r)
            print(
                f"\n{model} ({args.precision}, default range {r['range_px'][0]}-{r['range_px'][1]} px): "
                f"{r['wall_s']:.0f} s, peak {r['peak_gb']:.2f} GB"
            )
            for s in r["stages"]:
                so_far = s["peak_so_far_gb"]
                print(f"  {s['seconds']:7.1f} s  peak {s['peak_gb']:6.2f} GB (so far {so_far:6.2f})  {s['stage']}")
    machine = dict(
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cores=len(os.sched_getaffinity(0)),
        python=platform.python_version(),
    )
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, results=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
