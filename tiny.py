"""Tiny, offline, random-weight models and datasets in the real formats.

Used by the tests (through conftest.py fixtures), the benchmark and the offline demo. Everything here is
built in seconds on a CPU and saved exactly as the hub versions are laid out, so the scripts load it
through the same code path as `stable-diffusion-v1-5/stable-diffusion-v1-5` or `yuvalkirstain/pickapic_v2`.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def bytes_to_unicode():
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_tokenizer(path):
    """An offline byte-level CLIP tokenizer: 256 byte characters, the same with </w>, then the two specials."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(path), model_max_length=77)
    tok.save_pretrained(str(path))
    return tok


def tiny_unet(seed=0, sample_size=8, cross_attention_dim=32, block_out_channels=(32, 64), prediction_type=None):
    """SD-1.5-shaped UNet (cross-attention down/up blocks, mid block) at toy width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tiny_pipeline(path, seed=0, resolution=32, prediction_type="epsilon"):
    """Save a tiny StableDiffusionPipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    VAE downsamples x4 (two downsamplings... three blocks), so `resolution` 32 gives 8x8 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=resolution,
    )
    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    unet = tiny_unet(seed, sample_size=resolution // 4)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
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
    pipe.save_pretrained(str(path))
    import shutil

    shutil.rmtree(path / "_tokenizer_build")
    return path


def build_tiny_sd2_pipeline(path, seed=0, resolution=32):
    """Save a tiny SD-2.x-shaped folder: the SD-1.5 layout (StableDiffusionPipeline, one CLIP text encoder) with a
    v-prediction scheduler, as stabilityai/stable-diffusion-2-1 is laid out (its 1024-wide OpenCLIP text encoder
    and linear-projection attention are sizes, not a different layout)."""
    return build_tiny_pipeline(path, seed=seed, resolution=resolution, prediction_type="v_prediction")


def build_tiny_sdxl_pipeline(path, seed=0, resolution=32, addition_time_embed_dim=8):
    """Save a tiny StableDiffusionXLPipeline folder in the layout of stabilityai/stable-diffusion-xl-base-1.0:
    unet/ (UNet2DConditionModel with the `text_time` addition embedding), vae/ (AutoencoderKL, force_upcast as
    SDXL's), text_encoder/ (CLIPTextModel), text_encoder_2/ (CLIPTextModelWithProjection), tokenizer/,
    tokenizer_2/ (pad token "!" as SDXL's), scheduler/ (EulerDiscreteScheduler with SDXL's settings).

    As in build_tiny_pipeline the VAE downsamples x4, so `resolution` 32 gives 8x8 latents. cross_attention_dim is
    the two text encoders' hidden sizes concatenated (32 + 32); the time embedding input is 6 size/crop numbers x
    addition_time_embed_dim plus text_encoder_2's projection_dim, exactly SDXL's 2816 = 6 * 256 + 1280."""
    import shutil

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=resolution,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(path / "_tokenizer_build"), model_max_length=77, pad_token="!")
    common = dict(
        vocab_size=len(tokenizer),
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, projection_dim=32, hidden_act="quick_gelu", pad_token_id=tokenizer.pad_token_id, **common
        )
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=32, projection_dim=32, hidden_act="gelu", pad_token_id=tokenizer_2.pad_token_id, **common
        )
    )
    hidden = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_encoder_2.config.projection_dim,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(path))
    shutil.rmtree(path / "_tokenizer_build")
    return path


def build_t5_tokenizer(path):
    """An offline T5 tokenizer (T5TokenizerFast, tokenizer.json only: no sentencepiece model): a character-level
    vocabulary with T5's specials <pad> 0, </s> 1, <unk> 2, and T5's whitespace handling (the Metaspace "▁")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = list("▁abcdefghijklmnopqrstuvwxyz0123456789,.'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    t5.model_max_length = 512
    t5.save_pretrained(str(path))
    return T5TokenizerFast.from_pretrained(str(path))


def tiny_sd3_transformer(seed=0, sample_size=8):
    """SD3.5-shaped SD3Transformer2DModel at toy width: 16 latent channels in 2x2 patches, joint attention over T5's
    64-wide tokens, the two CLIPs' 64-wide pooled projection."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        qk_norm="rms_norm",  # SD3.5's: RMS-normed queries and keys, and a second self-attention in its first layers
        dual_attention_layers=(0,),
    )


def build_tiny_sd3_pipeline(path, seed=0, resolution=32):
    """Save a tiny StableDiffusion3Pipeline folder in the layout of stabilityai/stable-diffusion-3.5-medium:
    transformer/ (SD3Transformer2DModel, patch 2), vae/ (AutoencoderKL with 16 latent channels, SD3's scaling and
    shift factors), text_encoder/ and text_encoder_2/ (CLIPTextModelWithProjection), text_encoder_3/ (T5EncoderModel),
    tokenizer/, tokenizer_2/ (pad token "!" as SD3's), tokenizer_3/ (T5), scheduler/ (FlowMatchEulerDiscreteScheduler,
    shift 3 as SD3's).

    The VAE downsamples x4, so `resolution` 32 gives 16x8x8 latents (4x4 patches). The pooled projection is the two
    CLIP projections side by side (32 + 32), the joint attention width the T5's (64): the two CLIP hidden states side
    by side (64) are padded to it, as the pipeline does with SD3's 768 + 1280 and 4096."""
    import shutil

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=resolution,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )
    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(path / "_tokenizer_build"), model_max_length=77, pad_token="!")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        projection_dim=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_act="quick_gelu", pad_token_id=tokenizer.pad_token_id, **common)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_act="gelu", pad_token_id=tokenizer_2.pad_token_id, **common)
    )
    tokenizer_3 = build_t5_tokenizer(path / "_t5_build")
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=64,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = tiny_sd3_transformer(seed, sample_size=resolution // 4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(str(path))
    shutil.rmtree(path / "_tokenizer_build")
    shutil.rmtree(path / "_t5_build")
    return path


def add_tiny_variant(path, weights_from, variant="fp16"):
    """Give the pipeline folder `path` a weights variant, as hub pipelines carry one: beside each weight file of each
    part a `<name>.<variant>.safetensors` (diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors), holding
    the weights of the same part of `weights_from` (a pipeline folder of the same layout, other weights), so a test
    can tell which file loaded. A variant is its files' name: these keep their float32 values."""
    import shutil

    path, weights_from = Path(path), Path(weights_from)
    for f in sorted(weights_from.glob("*/*.safetensors")):
        shutil.copyfile(f, path / f.parent.name / f"{f.stem}.{variant}{f.suffix}")
    return path


def build_tiny_hub_cache(cache, repo_id, branches):
    """A Hugging Face Hub cache (the HF_HUB_CACHE layout that downloads fill) holding the model repo `repo_id`:
    `branches` {name: pipeline folder} each a snapshot models--org--name/snapshots/<commit>/ with refs/<name> holding
    its commit hash (made up from the name). Offline, huggingface_hub resolves a revision, a branch or a commit, through
    these. Returns {name: commit}."""
    import hashlib
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    commits = {}
    for name, folder in branches.items():
        commits[name] = hashlib.sha1(name.encode()).hexdigest()
        shutil.copytree(folder, repo / "snapshots" / commits[name])
        (repo / "refs" / name).write_text(commits[name])
    return commits


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape, colour, size=32, rng=None):
    """A coloured shape on a light background with position/size/colour jitter."""
    rng = rng or np.random.default_rng(0)
    bg = tuple(int(v) for v in rng.integers(215, 245, size=3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    return img


def jpeg_bytes(img, quality=95):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pickapic_rows(n_rows=12, size=32, seed=0, tie_rows=(3,), corrupt_rows=(5,)):
    """Pick-a-Pic v2 rows: caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1.

    Rows in `tie_rows` are ties (0.5/0.5); rows in `corrupt_rows` have an undecodable preferred image.
    Captions repeat (as in the real data): 4 distinct captions cycle over the rows."""
    rng = np.random.default_rng(seed)
    captions = [
        f"a {c} {s}" for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    ]
    rows = []
    for i in range(n_rows):
        cap = captions[i % len(captions)]
        colour, shape = cap.split()[1:]
        good = jpeg_bytes(draw_shape(shape, colour, size, rng))
        bad = jpeg_bytes(draw_shape(SHAPES[(SHAPES.index(shape) + 1) % 3], colour, size, rng))
        win = i % 2  # the preferred image alternates between jpg_0 and jpg_1
        if i in corrupt_rows:
            good = b"\xff\xd8 this is not a jpeg"
        imgs = [bad, bad]
        imgs[win] = good
        labels = [0.0, 0.0]
        labels[win] = 1.0
        if i in tie_rows:
            labels = [0.5, 0.5]
        rows.append({"caption": cap, "jpg_0": imgs[0], "jpg_1": imgs[1], "label_0": labels[0], "label_1": labels[1]})
    return rows


def build_pickapic_parquet(path, n_rows=12, size=32, seed=0, tie_rows=(3,), corrupt_rows=(5,)):
    """A Pick-a-Pic v2-format parquet file of pickapic_rows(): caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pickapic_rows(n_rows, size, seed, tie_rows, corrupt_rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def build_pickapic_webdataset(
    folder, n_rows=12, size=32, seed=0, tie_rows=(3,), corrupt_rows=(5,), shards=2, prefix=""
):
    """The same rows as build_pickapic_parquet(), as webdataset tar shards laid out like
    sayakpaul/pickapic_v2_webdataset (written there by webdataset's TarWriter from the original parquet): shard files
    00000.tar, 00001.tar, ... (`prefix` + number), consecutive rows per shard, each sample the files
    <key>.original_prompt.txt, <key>.jpg_0.jpg, <key>.jpg_1.jpg, <key>.label_0.txt, <key>.label_1.txt with the labels
    as text (str of the float: "1.0", "0.0", "0.5") and the key the row's index in its shard."""
    import tarfile

    rows = pickapic_rows(n_rows, size, seed, tie_rows, corrupt_rows)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n_rows // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{prefix}{s:05d}.tar", "w") as tar:
            for key, row in enumerate(rows[s * per : (s + 1) * per]):
                for name, data in (
                    ("original_prompt.txt", row["caption"].encode()),
                    ("jpg_0.jpg", row["jpg_0"]),
                    ("jpg_1.jpg", row["jpg_1"]),
                    ("label_0.txt", str(row["label_0"]).encode()),
                    ("label_1.txt", str(row["label_1"]).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return folder


def build_imagefolder(path, n=8, size=32, seed=0, corrupt=(), caption_column="text"):
    """An image folder with metadata.jsonl (file_name + caption), as `datasets` imagefolder reads it."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metadata.jsonl", "w") as f:
        for i in range(n):
            colour, shape = list(COLOURS)[i % 4], SHAPES[i % 3]
            name = f"img_{i:03d}.png"
            if i in corrupt:
                (path / name).write_bytes(b"not a png")
            else:
                draw_shape(shape, colour, size, rng).save(path / name)
            f.write(json.dumps({"file_name": name, caption_column: f"a {colour} {shape}"}) + "\n")
    return path


if __name__ == "__main__":  # python tiny.py OUT_DIR: build everything once, for a look
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    build_tiny_pipeline(out / "pipeline")
    build_tiny_sd2_pipeline(out / "pipeline_sd2")
    build_tiny_sdxl_pipeline(out / "pipeline_sdxl")
    build_pickapic_parquet(out / "pickapic" / "train.parquet")
    build_pickapic_webdataset(out / "pickapic_webdataset")
    build_imagefolder(out / "imagefolder")
    print(os.path.abspath(out))
