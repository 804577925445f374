#!/usr/bin/env python
"""Save a random-weight SDXL base-architecture pipeline folder (for benchmarks on machines with no hub).

    python bench/make_sdxl.py OUT_DIR

The configs in bench/sdxl/ are those of stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.57B parameters, CLIP ViT-L
and OpenCLIP bigG text encoders, force_upcast VAE, Euler scheduler); the weights are random, which does not change
speed or memory. Tokenizers: the offline byte-level CLIP tokenizer of tiny.py (ids < 514, valid for the
49408-entry embeddings), tokenizer_2 padding with "!" as SDXL's does. Components are built and saved one at a time
(on the GPU when there is one: faster init), so the builder holds at most the UNet (10.3 GB in fp32).
"""

import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def build_sdxl(out):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import tiny

    out, cfg = Path(out), HERE / "sdxl"
    if (out / "model_index.json").is_file():  # written last: a folder that has it is complete
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg / "text_encoder_2")),
    }
    for name, build in builders.items():
        with torch.device(device):
            model = build()
        model.to("cpu").save_pretrained(str(tmp / name), safe_serialization=True)
        del model
    EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(cfg / "scheduler")).save_pretrained(
        str(tmp / "scheduler")
    )
    tiny.build_clip_tokenizer(tmp / "tokenizer")
    CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"), pad_token="!").save_pretrained(str(tmp / "tokenizer_2"))
    shutil.copy(cfg / "model_index.json", tmp / "model_index.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build_sdxl(sys.argv[1] if len(sys.argv) > 1 else "sdxl_random"))
