#!/usr/bin/env python
"""Save a random-weight Stable Diffusion 1.5-architecture pipeline folder (for benchmarks on machines with no hub).

    python bench/make_sd15.py OUT_DIR

Speed and memory do not depend on weight values, so this measures what the real SD-1.5 would. The tokenizer is
the offline byte-level CLIP tokenizer of tiny.py (token ids < 514, all valid for the 49408-entry embedding).
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def build_sd15(out):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tiny

    out = Path(out)
    cfg = HERE / "sd15"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(cfg / "scheduler"))
    tokenizer = tiny.build_clip_tokenizer(out / "_tok")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    import shutil

    shutil.rmtree(out / "_tok")
    return out


if __name__ == "__main__":
    print(build_sd15(sys.argv[1] if len(sys.argv) > 1 else "sd15_random"))
