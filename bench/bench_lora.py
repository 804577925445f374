#!/usr/bin/env python
"""LoRA vs full fine-tuning: peak memory and step time of train_spin.py's SPIN step, one run, same model and data.

    python bench/bench_lora.py                      # CPU: SD-1.5's UNet layout at --width 0.5, 128x128 images
    python bench/bench_lora.py --width 1 --resolution 512 --mixed_precision bf16 \
        --extra "--gradient_checkpointing --use_8bit_adam"   # GPU

Each variant is a separate train_spin.py process on the same cached data; peak memory is the process's peak RSS
(CPU) or torch.cuda.max_memory_allocated (GPU, read from the process's own report), step time the median over the
steps after the first. Full fine-tuning holds the UNet, its gradients, AdamW's two moments and a frozen reference
copy; LoRA holds one UNet (its reference is the same UNet with the adapter off) plus the small adapter and its state.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


# Runs a script as __main__ and prints its own peak RSS at exit (also after sys.exit).
PEAK = (
    "import atexit, resource, runpy, sys; atexit.register(lambda: print('PEAK_KB', "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def build(out, width, resolution):
    """SD-1.5's pipeline layout (configs in bench/sd15) with the UNet's channels scaled by `width`, random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tiny

    torch.manual_seed(0)
    cfg = dict(UNet2DConditionModel.load_config(HERE / "sd15" / "unet"))
    cfg["block_out_channels"] = [int(c * width) // 32 * 32 for c in cfg["block_out_channels"]]
    cfg["sample_size"] = resolution // 8
    unet = UNet2DConditionModel.from_config(cfg)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(HERE / "sd15" / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(HERE / "sd15" / "text_encoder"))
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(HERE / "sd15" / "scheduler"))
    tokenizer = tiny.build_clip_tokenizer(out / "_tok")
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(out))
    return sum(p.numel() for p in unet.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, default=0.5, help="UNet channel scale against SD-1.5 (1 = the real size)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lora_rank", type=int, default=4)
    ap.add_argument("--mixed_precision", default="no")
    ap.add_argument("--extra", default="", help="more train_spin.py flags for every variant")
    args = ap.parse_args()

    import test_train
    import torch

    import tiny

    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    params = build(work / "pipe", args.width, args.resolution)
    data = tiny.build_pickapic_parquet(
        work / "data.parquet", n_rows=8, size=args.resolution, tie_rows=(), corrupt_rows=()
    )
    synth = test_train.make_synthetic_dir(
        work / "synth", work / "pipe", shape=(4, args.resolution // 8, args.resolution // 8), vae_scale=8
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    print(
        f"UNet: {params / 1e6:.0f}M parameters (SD-1.5 layout x{args.width}), {args.resolution}px, batch {args.batch}, "
        f"{args.mixed_precision}, device {'cuda' if torch.cuda.is_available() else 'cpu'} {args.extra}",
        flush=True,
    )
    rows = []
    for name, flags in (
        ("full fine-tuning", []),
        (f"LoRA rank {args.lora_rank}", ["--lora_rank", str(args.lora_rank)]),
    ):
        out = work / name.split()[0]
        cmd = [
            sys.executable,
            str(HERE.parent / "train_spin.py"),
            "--pretrained_model_name_or_path",
            str(work / "pipe"),
            "--dataset",
            str(data),
            "--synthetic_dir",
            str(synth),
            "--output_dir",
            str(out),
            "--cache_dir",
            str(work / "cache"),
            "--resolution",
            str(args.resolution),
            "--train_batch_size",
            str(args.batch),
            "--max_train_steps",
            str(args.steps),
            "--lr_warmup_steps",
            "0",
            "--mixed_precision",
            args.mixed_precision,
            *flags,
            *args.extra.split(),
        ]
        p = subprocess.run([cmd[0], "-c", PEAK, *cmd[1:]], capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        peak = int(p.stdout.rsplit("PEAK_KB", 1)[1].split()[0])  # the process's own peak RSS, KB
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(args.batch / r["pairs_per_s"] for r in lines[1:])
        rows.append((name, peak / 2**20, step_s, lines[0]["loss"]))
        print(
            f"{name:20s} peak RSS {rows[-1][1]:.2f} GiB   step {step_s:.2f} s   first loss {lines[0]['loss']:.6f}",
            flush=True,
        )
    print(f"LoRA / full: memory {rows[1][1] / rows[0][1]:.2f}x, step time {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
