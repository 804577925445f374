#!/usr/bin/env python
"""Score folders of generated images with PickScore, HPS v2/v2.1, ImageReward and the LAION aesthetic predictor.

    python evaluate.py runs/exp/samples --output_dir runs/exp/eval     # every model folder under samples/, all four

Reads the metadata.jsonl of each image folder (the model name is the folder name); writes scores.jsonl, summary.json,
summary.md (the model card's table and win rates) and run_config.json, and fills each trained model's card.
The scorers, the figures and the outputs: docs/evaluate.md.
"""

import argparse
import html
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ---- settings: the metrics, the official weights (the flags' defaults), the preprocessing constants ----
METRICS = ("hps", "aesthetic", "imagereward", "pickscore")  # the model card's row order
METRIC_NAMES = {"hps": "HPS", "aesthetic": "Aesthetic", "imagereward": "ImageReward", "pickscore": "PickScore"}
METRIC_DECIMALS = {"hps": 4, "aesthetic": 3, "imagereward": 3, "pickscore": 3}  # HPS lives around 0.27
CARD_METRICS = {"hps": "HPS", "aesthetic": "Aesthetic", "imagereward": "Image Reward", "pickscore": "Pickapic Score"}
# where the evaluation goes in the model card of train_spin.py --model_card (the same constant in spin_extras.py)
CARD_EVALUATION = "<!-- evaluation: evaluate.py fills this section when it scores this model -->"

PRECISIONS = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the towers
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}  # not comparable: always record which
# The weights flags: their official hub ids and help. Each takes a hub id, a local file or a folder holding the file.
WEIGHT_FLAGS = {
    "--pickscore_model": ("yuvalkirstain/PickScore_v1", "PickScore's CLIPModel"),
    "--pickscore_processor": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore's processor"),
    "--hps_checkpoint": (None, f"HPS .pt (default: {HPS_REPO}'s {' or '.join(HPS_FILES.values())})"),
    "--hps_clip": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "ViT-H-14 CLIP config + tokenizer for the HPS weights"),
    "--imagereward_checkpoint": ("THUDM/ImageReward", "ImageReward.pt"),
    "--imagereward_med_config": (None, "med_config.json (default: beside the checkpoint)"),
    "--imagereward_tokenizer": ("bert-base-uncased", "ImageReward's BERT tokenizer"),
    "--aesthetic_clip": ("openai/clip-vit-large-patch14", "the CLIP under the aesthetic head"),
    "--aesthetic_head": ("trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth"),
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # all four scorers normalise with OpenAI CLIP's mean/std
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224  # ImageReward and the aesthetic predictor; HPS and PickScore take it from their configs (also 224)
CLIP_MAX_LENGTH = 77  # CLIP context length (open_clip pads every prompt to it)
HPS_TOKENIZATION = "open_clip tokenize()"  # recorded in the scoring settings: other ids are not resumed
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward truncates prompts to 35 BERT tokens
IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward standardises the head's raw output with these
IMAGEREWARD_STD = 1.0333394966054072
BLIP_VIT_HEAD_DIM = 64  # BLIP's ViT-B/16 (12 heads) and ViT-L/16 (16 heads) both use 64-wide heads
BLIP_VIT_LN_EPS = 1e-6  # BLIP's ViT uses LayerNorm(eps=1e-6); transformers' default is 1e-5
# the keys of ImageReward's med_config.json (BERT + cross-attention) that shape the text model
MED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MED_CONFIG_KEYS += ("max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
HEAD_LINEARS = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers in both MLP heads (1, 3, 5 are Dropouts)


# ---- flags ----
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through cli(), not usage + traceback
        raise UserError(f"{message} (see python evaluate.py --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("image_dirs_pos", nargs="*", metavar="IMAGE_DIR", help="folders with metadata.jsonl, or a parent")
    p.add_argument("--image_dirs", nargs="+", default=[], help="the same, as a flag")
    p.add_argument("--output_dir", default="eval")
    p.add_argument("--metrics", action="append", help=f"some of {','.join(METRICS)}, comma-separated (default: all)")
    p.add_argument("--hps_version", default="2.0", help="2.0 (as hpsv2.score) or 2.1: not comparable, always recorded")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--mixed_precision", default="no", type=str.lower, choices=PRECISIONS, help="the towers'; no = fp32")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--baseline", help="the model win rates are against (default: the first)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="threads preparing images")
    p.add_argument("--overwrite", action="store_true", help="rescore images already in output_dir/scores.jsonl")
    for flag, (default, text) in WEIGHT_FLAGS.items():
        p.add_argument(flag, default=default, help=text)
    args = p.parse_args(argv)
    args.image_dirs = list(args.image_dirs_pos) + list(args.image_dirs)
    del args.image_dirs_pos
    names = [m.strip().lower() for v in (args.metrics or [",".join(METRICS)]) for m in v.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown or not names:
        raise UserError(f"--metrics {','.join(unknown) or 'is empty'}: choose one or more of {', '.join(METRICS)}")
    args.metrics = [m for m in METRICS if m in names]  # the model card's order
    args.hps_version = args.hps_version.lower().removeprefix("v")  # v2.1 -> 2.1
    if args.hps_version not in HPS_FILES:
        raise UserError(f"--hps_version {args.hps_version}: choose v2.0 or v2.1")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    return args


def pick_device(args):
    """(device, precision word, tower dtype): fp32 unless asked, as the official scorers (docs/evaluate.md)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mp = "no" if args.mixed_precision == "fp32" else args.mixed_precision  # "no": the other scripts' word for fp32
    if mp == "fp16" and device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU: use no or bf16 on a CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    return device, mp, PRECISIONS[mp]


# ---- preprocessing: the originals' torchvision pipelines, with PIL + torch ----
# transformers' CLIPImageProcessor would centre-crop with floor where torchvision rounds: a pixel off on some sizes.
def pil_to_tensor(img):
    """torchvision ToTensor: HWC uint8 -> CHW float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


def normalize(x, mean=CLIP_MEAN, std=CLIP_STD):
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def resize_center_crop(img, size=IMAGE_SIZE):
    """OpenAI CLIP's transform (ImageReward, aesthetic): bicubic Resize of the shorter side, CenterCrop, Normalize."""
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.BICUBIC)  # at that size already: Pillow returns a copy
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return normalize(pil_to_tensor(img))


def resize_longest_pad(img, size=IMAGE_SIZE):
    """HPS v2's ResizeMaxSize: the tensor's longer side bicubic-resized to `size`, zero-padded square, Normalize."""
    x = pil_to_tensor(img)
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return normalize(x)


# ---- HPS prompts: open_clip's tokenize() (docs/evaluate.md: why not the Hugging Face CLIPTokenizer) ----
# open_clip's names of the start and end tokens (recognised inside a prompt too) -> their names in a HF vocab.json
CLIP_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
# open_clip's words: its specials, contractions, runs of letters, single digits, runs of other non-whitespace
OPEN_CLIP_WORD = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def clean_prompt(text):
    """open_clip's cleaning: ftfy.fix_text, HTML unescaped twice, whitespace runs -> one space, lowercased."""
    import ftfy  # only HPS needs it: OpenClipTokenizer says so in one line when it is missing

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()  # str.split() and re's \s agree on what is whitespace


def frame_ids(ids, start, end, length=CLIP_MAX_LENGTH):
    """open_clip's framing: start + ids + end, cut to `length` with the end token last, padded with 0."""
    ids = [start, *ids[: length - 2], end]
    return ids + [0] * (length - len(ids))


class OpenClipTokenizer:
    """open_clip's tokenize() on --hps_clip's vocab.json + merges.txt; the BPE of each word by `tokenizers`."""

    def __init__(self, spec):
        from tokenizers.models import BPE
        from tokenizers.pre_tokenizers import ByteLevel

        try:
            import ftfy  # noqa: F401  (open_clip cleans every prompt with it)
        except ImportError:
            raise UserError("HPS needs ftfy (pip install ftfy): open_clip cleans prompts with it") from None
        files = [resolve_file(spec, name, "--hps_clip") for name in ("vocab.json", "merges.txt")]
        try:
            self.vocab, merges = BPE.read_file(*files)
            self.model = BPE(self.vocab, merges, end_of_word_suffix="</w>")
        except Exception as e:  # tokenizers raises a plain Exception that says why
            raise UserError(
                f"--hps_clip {spec}: cannot read its vocab.json + merges.txt, or merges.txt does not "
                f"match vocab.json ({e})"
            ) from None
        missing = [t for t in CLIP_SPECIALS.values() if t not in self.vocab]
        if missing:
            raise UserError(f"--hps_clip {spec}: vocab.json has no {missing}: not a CLIP tokenizer")
        self.specials = {name: self.vocab[hf_name] for name, hf_name in CLIP_SPECIALS.items()}
        self.start, self.end = self.specials.values()
        self.to_bytes = ByteLevel(add_prefix_space=False, use_regex=False)  # each byte as one printable character

    def word_ids(self, word):
        """One word's ids: an open_clip special, or the word's byte-level BPE (the last token ends in </w>)."""
        if word in self.specials:
            return [self.specials[word]]
        [(chars, _)] = self.to_bytes.pre_tokenize_str(word)
        return [token.id for token in self.model.tokenize(chars)]

    def encode(self, prompt):
        import regex  # \p{L} and \p{N}, which re lacks (transformers needs regex too)

        words = regex.findall(OPEN_CLIP_WORD, clean_prompt(prompt), flags=regex.IGNORECASE)
        return [i for word in words for i in self.word_ids(word)]

    def __call__(self, prompts):
        return torch.tensor([frame_ids(self.encode(p), self.start, self.end) for p in prompts])


# ---- checkpoint key conversion (transformers' own conversion scripts need the original packages) ----
OPEN_CLIP_TOP = {  # open_clip name -> transformers CLIPModel name (".T": stored transposed in open_clip)
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight.T",  # open_clip: x @ P; transformers: Linear(x) = x @ W.T
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",  # no bias on either side
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight.T",
}
OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# In ImageReward.pt but not used by the reward: BLIP's contrastive projections and a position-id buffer.
BLIP_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def strip_module_prefix(sd):
    """(Distributed)DataParallel saves keys as module.<name>."""
    return {k.removeprefix("module."): v for k, v in sd.items()}


def open_clip_to_transformers(sd):
    """open_clip CLIP state dict -> CLIPModel state dict; unknown keys pass through, for load_strict to name."""
    out = {}
    for key, value in strip_module_prefix(sd).items():
        block = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", key)
        layer = block and f"{'vision_model' if block[1] else 'text_model'}.encoder.layers.{block[2]}"
        if block and block[3] == "attn.in_proj":  # q, k, v fused along dim 0 in nn.MultiheadAttention
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{layer}.self_attn.{name}.{block[4]}"] = part.clone()
        elif block and block[3] in OPEN_CLIP_BLOCK:
            out[f"{layer}.{OPEN_CLIP_BLOCK[block[3]]}.{block[4]}"] = value
        elif key in OPEN_CLIP_TOP:
            new = OPEN_CLIP_TOP[key]
            out[new.removesuffix(".T")] = value.t().contiguous() if new.endswith(".T") else value
        else:
            out[key] = value
    return out


def rename_blip_vit_key(key):
    """BLIP's timm-style ViT name -> transformers BlipVisionModel name."""
    key = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(key, key)
    key = re.sub(r"^patch_embed\.proj\.", "embeddings.patch_embedding.", key)
    key = re.sub(r"^norm\.", "post_layernorm.", key)
    key = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", key)
    key = re.sub(r"\.norm([12])\.", r".layer_norm\1.", key)
    return key.replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection.")


def blip_to_transformers(sd):
    """ImageReward state dict -> (BlipVisionModel sd, BlipTextModel sd (unknown keys too, for load_strict), head sd)."""
    vision, text, head = {}, {}, {}
    for key, value in strip_module_prefix(sd).items():
        if key.startswith("blip.visual_encoder."):
            vision[rename_blip_vit_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        elif not key.startswith(BLIP_UNUSED):
            text[key.removeprefix("blip.text_encoder.")] = value
    return vision, text, head


def blip_vision_config(vision_sd):
    """BlipVisionConfig from the ViT's tensor shapes (ViT-L/16 at 224 for ImageReward)."""
    from transformers import BlipVisionConfig  # transformers takes seconds to import: only to build a scorer

    try:
        hidden = vision_sd["embeddings.class_embedding"].shape[-1]
        patch = vision_sd["embeddings.patch_embedding.weight"].shape[-1]
        n_pos = vision_sd["embeddings.position_embedding"].shape[1]
        inter = vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"--imagereward_checkpoint: missing blip.visual_encoder weights ({e.args[0]})") from None
    layers = len({k.split(".")[2] for k in vision_sd if k.startswith("encoder.layers.")})
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // BLIP_VIT_HEAD_DIM),
        patch_size=patch,
        image_size=round((n_pos - 1) ** 0.5) * patch,
        layer_norm_eps=BLIP_VIT_LN_EPS,
    )


def head_layers(sd, in_features, what, device="cpu"):
    """The 5 Linear layers (weight, bias) of an ImageReward / LAION aesthetic MLP head, in float32 on `device`."""
    expected = {f"layers.{i}.{p}" for i in HEAD_LINEARS for p in ("weight", "bias")}
    if set(sd) != expected:
        wrong = key_mismatch(expected - set(sd), set(sd) - expected)
        raise UserError(f"{what}: MLP head keys do not match layers.{{0,2,4,6,7}}: {wrong}")
    layers, width = [], in_features
    for i in HEAD_LINEARS:
        w, b = sd[f"layers.{i}.weight"].float(), sd[f"layers.{i}.bias"].float()
        if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise UserError(f"{what}: layers.{i} has shape {tuple(w.shape)}, expected (*, {width})")
        layers.append((w.to(device), b.to(device)))
        width = w.shape[0]
    if width != 1:
        raise UserError(f"{what}: the MLP head ends in {width} outputs, expected 1")
    return layers


# ---- score formulas (float32) ----
def pickscore_formula(image_emb, text_emb, logit_scale):
    """PickScore = exp(logit_scale) * cos(image, text) (≈21 for SD-1.5; a raw cosine ≈0.2: the scale left out)."""
    return logit_scale.float().exp() * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def linear_head(x, layers):
    """The MLP heads: Linear layers without activations (the originals' ReLUs are commented out), dropout off."""
    x = x.float()
    for w, b in layers:
        x = F.linear(x, w, b)
    return x[:, 0]


def imagereward_formula(raw):
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def aesthetic_formula(image_emb, layers):
    """LAION improved aesthetic predictor: the head on the L2-normalised CLIP ViT-L/14 image embedding."""
    return linear_head(F.normalize(image_emb.float(), dim=-1), layers)


def clip_image_embeds(model, pixel_values):
    # CLIPModel.get_image_features returns this tensor in transformers 4 but an output object in 5
    p = next(model.parameters())
    pooled = model.vision_model(pixel_values=pixel_values.to(p.device, p.dtype)).pooler_output
    return model.visual_projection(pooled).float()


# ---- the four scorers: prepare(image) on CPU workers, then __call__(pixels, prompts) on the device ----
class PickScore:
    """yuvalkirstain/PickScore_v1 (a transformers CLIPModel) with the laion ViT-H-14 processor, as its README."""

    def __init__(self, args, device, dtype):
        from transformers import AutoProcessor, CLIPModel  # a slow import: only to build a scorer

        self.model = from_pretrained(CLIPModel, args.pickscore_model, "--pickscore_model", output_loading_info=True)
        self.logit_scale = self.model.logit_scale.detach().float().clone()  # fp32: exp() of fp16 is off by ~0.2%
        self.model.to(device, dtype).eval()
        self.processor = from_pretrained(AutoProcessor, args.pickscore_processor, "--pickscore_processor")
        self.prep_key = ("pickscore processor",)
        self.weights = {"model": args.pickscore_model, "processor": args.pickscore_processor}

    def prepare(self, image):
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        tok = self.processor(
            text=prompts, padding=True, truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt"
        )
        text = self.model.text_model(**tok.to(self.model.device)).pooler_output
        image = clip_image_embeds(self.model, pixels)
        return pickscore_formula(image, self.model.text_projection(text).float(), self.logit_scale.to(image.device))


class HPS:
    """HPS v2 / v2.1: open_clip ViT-H-14 weights ({"state_dict": ...}) converted onto a transformers CLIPModel."""

    def __init__(self, args, device, dtype):
        version, clip, default = args.hps_version, args.hps_clip, HPS_FILES[args.hps_version]
        path = resolve_file(args.hps_checkpoint or f"{HPS_REPO}/{default}", default, "--hps_checkpoint")
        named = {f: v for v, f in HPS_FILES.items()}.get(Path(path).name)
        if named and named != version:  # v2.0 and v2.1 scores are not comparable: refuse an obvious mix-up
            raise UserError(f"--hps_checkpoint {Path(path).name} is HPS v{named} but --hps_version is {version}")
        ckpt = torch_load(path, "--hps_checkpoint")
        sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        from transformers import CLIPConfig, CLIPModel  # after the cheap checks: a slow import

        config = from_pretrained(CLIPConfig, clip, "--hps_clip")
        self.tokenize = OpenClipTokenizer(clip)  # before building ViT-H: a bad folder fails fast
        if max(self.tokenize.vocab.values()) >= config.text_config.vocab_size:
            raise UserError(f"--hps_clip {clip}: vocab.json has more tokens than the config's text vocab_size")
        for cfg in (config.text_config, config.vision_config):
            cfg.hidden_act = "gelu"  # open_clip ViT-H-14 uses nn.GELU, not OpenAI's QuickGELU
        with torch.device(device):  # initialise on the device: random init of ViT-H on a CPU takes a while
            self.model = CLIPModel(config)
        load_strict(self.model, open_clip_to_transformers(sd), f"--hps_checkpoint {path}")
        self.model.to(device, dtype).eval()
        self.image_size = config.vision_config.image_size
        self.prep_key = ("resize_longest_pad", self.image_size)  # prepare_item runs each distinct one once
        self.weights = {"checkpoint": path, "clip": clip, "version": version, "tokenization": HPS_TOKENIZATION}

    def prepare(self, image):
        return resize_longest_pad(image, self.image_size)

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        # open_clip's text features: causal mask only, pooled at the end token (the largest id), not at eos_token_id
        ids = self.tokenize(prompts).to(self.model.device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # after final_layer_norm, as open_clip's
        text = self.model.text_projection(hidden[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)])
        image = clip_image_embeds(self.model, pixels)
        return F.cosine_similarity(image, text.float(), dim=-1)  # HPS v2: no logit scale (≈0.27 for SD-1.5)


class ImageReward:
    """THUDM ImageReward: BLIP ViT-L/16 + BERT with cross-attention to the image tokens + MLP head on [CLS]."""

    def __init__(self, args, device, dtype):
        spec, flag = args.imagereward_checkpoint, "--imagereward_med_config"
        path = resolve_file(spec, "ImageReward.pt", "--imagereward_checkpoint")
        beside = Path(path).parent if is_local(spec) else "/".join(spec.split("/")[:2])  # its folder or hub repo
        med_path = resolve_file(args.imagereward_med_config or f"{beside}/med_config.json", "med_config.json", flag)
        try:
            med = json.loads(Path(med_path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--imagereward_med_config {med_path}: not a JSON config ({e})") from None
        what = f"--imagereward_checkpoint {path}"
        vision_sd, text_sd, head_sd = blip_to_transformers(torch_load(path, "--imagereward_checkpoint"))
        from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionModel  # a slow import

        vision_config = blip_vision_config(vision_sd)
        text_config = BlipTextConfig(**{k: med[k] for k in MED_CONFIG_KEYS if k in med}, is_decoder=True)
        text_config.encoder_hidden_size = vision_config.hidden_size  # cross-attention to the ViT (as BLIP's code)
        with torch.device(device):
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
        load_strict(self.vision, vision_sd, what)
        load_strict(self.text, text_sd, what)
        self.head = head_layers(head_sd, self.text.config.hidden_size, what, device)
        self.vision.to(device, dtype).eval()
        self.text.to(device, dtype).eval()
        self.tokenizer = from_pretrained(AutoTokenizer, args.imagereward_tokenizer, "--imagereward_tokenizer")
        # BLIP's init_tokenizer(): adds [DEC] (bos) and [ENC]; vocab 30522 -> 30524 as in med_config
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.image_size = vision_config.image_size
        self.prep_key = ("resize_center_crop", self.image_size)  # the aesthetic predictor's too
        self.weights = {"checkpoint": path, "med_config": med_path, "tokenizer": args.imagereward_tokenizer}

    def prepare(self, image):
        return resize_center_crop(image, self.image_size)

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        p = next(self.vision.parameters())
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt"
        )
        image = self.vision(pixel_values=pixels.to(p.device, p.dtype)).last_hidden_state  # attended to in full
        ids, mask = tok["input_ids"].to(p.device), tok["attention_mask"].to(p.device)
        hidden = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image, is_decoder=False)
        return imagereward_formula(linear_head(hidden.last_hidden_state[:, 0].float(), self.head))


class Aesthetic:
    """LAION improved aesthetic predictor: MLP head on the normalised openai/clip-vit-large-patch14 embedding."""

    def __init__(self, args, device, dtype):
        from transformers import CLIPModel  # a slow import: only to build a scorer

        self.model = from_pretrained(CLIPModel, args.aesthetic_clip, "--aesthetic_clip", output_loading_info=True)
        self.model.to(device, dtype).eval()
        path = resolve_file(args.aesthetic_head, "aesthetic-model.pth", "--aesthetic_head")
        sd = strip_module_prefix(torch_load(path, "--aesthetic_head"))
        self.head = head_layers(sd, self.model.config.projection_dim, f"--aesthetic_head {path}", device)
        self.image_size = self.model.config.vision_config.image_size
        self.prep_key = ("resize_center_crop", self.image_size)
        self.weights = {"clip": args.aesthetic_clip, "head": path}

    def prepare(self, image):
        return resize_center_crop(image, self.image_size)

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        return aesthetic_formula(clip_image_embeds(self.model, pixels), self.head)


SCORERS = {"hps": HPS, "aesthetic": Aesthetic, "imagereward": ImageReward, "pickscore": PickScore}


def load_scorers(args, metrics, device, dtype):
    """Every metric's scorer, all resident (every batch is scored by every metric); transformers' logging quieted."""
    from transformers.utils import logging as hf_logging  # transformers takes seconds to import: only to score

    hf_logging.set_verbosity_error()  # keep stderr for our one-line messages
    hf_logging.disable_progress_bar()
    scorers = {}
    for m in metrics:
        t = time.time()
        scorers[m] = SCORERS[m](args, device, dtype)
        print(f"loaded {m} in {time.time() - t:.1f}s", flush=True)
    return scorers


# ---- aggregation (docs/evaluate.md defines each figure) ----
AVERAGE = "average"  # the pseudo-metric of the tables' "average score" (the raw mean of the metrics shown)
FIGURES = {  # summary.json's figures of a model and metric: name -> (aggregate, statistic over prompts)
    "best_of_n": ("best_of_n", "mean"),
    "best_of_n_median": ("best_of_n", "median"),
    "mean": ("mean", "mean"),
    "median": ("mean", "median"),
    "per_metric_max_of_n": ("per_metric_max_of_n", "mean"),
}


def stats(values):
    """mean, median, std (population, ddof=0) of a list; None when empty."""
    if not values:
        return {"mean": None, "median": None, "std": None}
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std())}


def per_prompt(rows, metric):
    """{(prompt_index, prompt): [score of each image]} for one model's rows."""
    groups = {}
    for r in rows:
        if r.get(metric) is not None:
            groups.setdefault((r["prompt_index"], r["prompt"]), []).append(float(r[metric]))
    return groups


def image_average(row, metrics):
    """The plain mean of an image's raw scores on `metrics`, as the paper; None if one is missing or not finite."""
    values = [row.get(m) for m in metrics]
    if not values or any(v is None or not np.isfinite(float(v)) for v in values):
        return None
    return sum(float(v) for v in values) / len(values)


def select_best_of_n(rows, metrics):
    """The paper's best of N: {(prompt_index, prompt): the row of highest image_average (ties: lowest image_index)}."""
    best = {}
    for r in sorted(rows, key=lambda r: r["image_index"]):
        a = image_average(r, metrics)
        key = (r["prompt_index"], r["prompt"])
        if a is not None and (key not in best or a > best[key][0]):  # strict: an equal later image does not win
            best[key] = (a, r)
    return {k: r for k, (_, r) in best.items()}


def aggregate(rows, metric, selection_metrics):
    """Per prompt the mean, the best-of-N image's score and the max; then stats of each over prompts."""
    groups = per_prompt(rows, metric)
    picked = [float(r[metric]) for r in select_best_of_n(rows, selection_metrics).values()]
    sizes = [len(v) for v in groups.values()]
    return {
        "best_of_n": stats(picked),
        "per_metric_max_of_n": stats([max(v) for v in groups.values()]),
        "mean": stats([float(np.mean(v)) for v in groups.values()]),
        "n_prompts": len(groups),
        "n_images": sum(sizes),
        "images_per_prompt": [min(sizes), max(sizes)] if sizes else [0, 0],
    }


def average_label(metrics):
    """'avg (4 metrics)' for the paper's four; otherwise the count and the names ('avg (3: HPS, ImageReward, ...)')."""
    if set(metrics) == set(METRICS):
        return f"avg ({len(METRICS)} metrics)"
    return f"avg ({len(metrics)}: {', '.join(METRIC_NAMES[m] for m in metrics)})"


def selection_label(metrics, n):
    """What picked the best-of-N image, as summary.md and summary.json name it."""
    if set(metrics) == set(METRICS):
        return f"best of {n}"
    return f"best of {n} by the mean of {len(metrics)} metrics ({', '.join(METRIC_NAMES[m] for m in metrics)})"


def average_scores(model_summary, metrics):
    """The tables' "average score": each figure of FIGURES averaged over `metrics`; None if a metric has none."""
    out = {"metrics": list(metrics), "label": average_label(metrics)}
    for key, (group, stat) in FIGURES.items():
        values = [model_summary[m][group][stat] for m in metrics]
        out[key] = None if None in values else sum(values) / len(values)
    return out


def prompt_values(rows, metrics, on):
    """{metric or AVERAGE: {(prompt_index, prompt): the mean over the images, or the best-of-N image's score}}."""
    averaged = [{**r, AVERAGE: image_average(r, metrics)} for r in rows]
    if on == "best_of_n":
        picked = select_best_of_n(averaged, metrics)
        return {m: {k: float(r[m]) for k, r in picked.items()} for m in [*metrics, AVERAGE]}
    return {m: {k: float(np.mean(v)) for k, v in per_prompt(averaged, m).items()} for m in [*metrics, AVERAGE]}


def win_rates(rows_by_model, baseline, metrics, on="mean"):
    """Per metric (and AVERAGE) and model: the fraction of shared prompts where it beats `baseline`, ties half."""
    values = {model: prompt_values(rows, metrics, on) for model, rows in rows_by_model.items()}
    out = {}
    for metric in [*metrics, AVERAGE]:
        base = values[baseline][metric]
        out[metric] = {}
        for model in [m for m in rows_by_model if m != baseline]:
            other = values[model][metric]
            common = base.keys() & other.keys()
            wins = sum(1.0 if other[k] > base[k] else 0.5 if other[k] == base[k] else 0.0 for k in common)
            out[metric][model] = {"win_rate": wins / len(common) if common else None, "n_prompts": len(common)}
    return out


def same_seeds(rows_a, rows_b):
    """Were the images of the prompts both models have drawn from the same seeds (a paired comparison)?"""
    a = {(r["prompt_index"], r["image_index"]): r.get("seed") for r in rows_a}
    b = {(r["prompt_index"], r["image_index"]): r.get("seed") for r in rows_b}
    common = a.keys() & b.keys()
    return bool(common) and all(a[k] is not None and a[k] == b[k] for k in common)


def summarize(rows, inputs, metrics, hps_version, skipped, weights, mp):
    """summary.json: the figures of each model and metric, their averages, win rates, the best-of-N picks, counts."""
    models, baseline = inputs.models, inputs.baseline
    by_model = {m: [r for r in rows if r["model"] == m] for m in models}
    summary = {m: {metric: aggregate(by_model[m], metric, metrics) for metric in metrics} for m in models}
    n = max(images_per_prompt(summary, m) for m in models)
    picked = {m: sorted(select_best_of_n(by_model[m], metrics).items()) for m in models}
    selected = {m: {str(key[0]): r["image_index"] for key, r in picked[m]} for m in models}  # to look at, or check
    counts = {}
    for m in models:
        listed, scored = len(inputs.metadata[m]), len(by_model[m])
        counts[m] = dict(images_listed=listed, images_scored=scored, images_skipped=len(skipped[m]), skipped=skipped[m])
    selection = {"label": selection_label(metrics, n), "metrics": metrics, "image_index_by_prompt_index": selected}
    return {
        "models": models,
        "metrics": metrics,
        "hps_version": hps_version,
        "baseline": baseline,
        "summary": summary,
        "average": {m: average_scores(summary[m], metrics) for m in models},
        "win_rates": win_rates(by_model, baseline, metrics, on="mean"),
        "win_rates_best_of_n": win_rates(by_model, baseline, metrics, on="best_of_n"),
        "best_of_n_selection": selection,
        "counts": counts,
        "weights": weights,
        "mixed_precision": mp,
        "same_seeds_as_baseline": {m: same_seeds(by_model[baseline], by_model[m]) for m in models if m != baseline},
        "aggregation": aggregation_text(metrics, n),
    }


def aggregation_text(metrics, n):
    """How each figure is computed, in words: summary.json's "aggregation" and the end of summary.md."""
    paper = "the paper's" if set(metrics) == set(METRICS) else "not the paper's, which averages all four"
    over_prompts = "then mean, median and std (ddof=0) over prompts"
    names = ", ".join(METRIC_NAMES[m] for m in metrics)
    return {
        "best_of_n": f"{selection_label(metrics, n)} ({paper}): per prompt, the image with the highest plain mean of "
        f"its raw {names} scores (the largest scale, PickScore's ~21, weighs most; ties: the lowest image index), its "
        f"scores; {over_prompts}",
        "per_metric_max_of_n": f"per prompt, each metric's maximum over the images (of any image); {over_prompts}",
        "mean": f"per prompt, the mean over its images; {over_prompts} (the tables' mean and median)",
        "average": f"{average_label(metrics)}: each figure's plain mean over the metrics",
        "win_rates": "per metric, the fraction of the prompts shared with the baseline where the model's per-prompt "
        "mean is higher, ties counting half; for the average, of each image's raw mean of the metrics",
        "win_rates_best_of_n": "the same on the best-of-N images: each model's selected image per prompt",
    }


# ---- the tables: summary.md and the model card's ----
MAIN_COLUMNS = (("{model} best of {n}{by}", "best_of_n"), ("{model} mean", "mean"), ("{model} median", "median"))
MORE_COLUMNS = (
    ("{model} best of {n} median", "best_of_n_median"),
    ("{model} per-metric max of {n}", "per_metric_max_of_n"),
)
CARD_COLUMNS = (("Best of {n}", "best_of_n"), ("Mean", "mean"), ("Median", "median"))


def images_per_prompt(summary, model):
    """N of the model's best of N: the most images a prompt has."""
    return max(s["images_per_prompt"][1] for s in summary[model].values())


def fmt(x, decimals):
    return "n/a" if x is None else f"{x:.{decimals}f}"


def md_table(head, rows):
    """Markdown table lines; every column but the first right-aligned."""
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def figures_table(report, models, names, decimals, columns, by=""):
    """A table of FIGURES: a row per metric of `names` (or AVERAGE), per model the `columns` (title, figure)."""
    head = ["Metric"]
    for model in models:
        n = images_per_prompt(report["summary"], model)
        head += [title.format(model=model, n=n, by=by) for title, _ in columns]
    cells = []
    for m, name in names.items():
        cells.append([name])
        for model in models:
            for _, key in columns:
                group, stat = FIGURES[key]
                value = report["average"][model][key] if m == AVERAGE else report["summary"][model][m][group][stat]
                cells[-1].append(fmt(value, decimals[m]))
    return md_table(head, cells)


def markdown_summary(report):
    """summary.md: the model card's table, the best-of-N medians and maxima, win rates, and what each figure is."""
    models, metrics, baseline = report["models"], report["metrics"], report["baseline"]
    names = {m: METRIC_NAMES[m] + (f" v{report['hps_version']}" if m == "hps" else "") for m in metrics}
    names[AVERAGE] = average_label(metrics)
    decimals = {**METRIC_DECIMALS, AVERAGE: max(METRIC_DECIMALS[m] for m in metrics)}
    n = max(images_per_prompt(report["summary"], model) for model in models)
    by = "" if set(metrics) == set(METRICS) else f" (by mean of {len(metrics)})"
    lines = ["# Evaluation", "", *figures_table(report, models, names, decimals, MAIN_COLUMNS, by)]
    lines += ["", *figures_table(report, models, names, decimals, MORE_COLUMNS)]
    others = [m for m in models if m != baseline]
    for key, what in (("win_rates", "per-prompt means"), ("win_rates_best_of_n", f"the best-of-{n} images")):
        if others:
            rows = [[names[m]] + [fmt(report[key][m][o]["win_rate"], 3) for o in others] for m in names]
            lines += ["", f"Win rate against {baseline} on {what}:", "", *md_table(["Metric", *others], rows)]
    lines += ["", 'How each figure is computed (summary.json\'s "aggregation"):', ""]
    lines += [f"- {key}: {text}" for key, text in report["aggregation"].items()]
    return "\n".join(lines) + "\n"


def fill_model_card(folder, report, out):
    """The model's table into the evaluation section of its card (sample.py's run_config.json names its folder)."""
    try:
        unet = (json.loads((folder / "run_config.json").read_text()).get("model") or {}).get("unet")
        if unet in (None, "", "base"):
            return
        card = Path(unet) / "README.md"
        text = card.read_text()
    except (OSError, ValueError):
        return
    if CARD_EVALUATION not in text or folder.name not in report["summary"]:
        return
    head, _, rest = text.partition(CARD_EVALUATION)
    tail = rest[rest.index("\n## ") :] if "\n## " in rest else "\n"
    names = {m: CARD_METRICS[m] for m in report["metrics"]}
    table = figures_table(report, [folder.name], names, dict.fromkeys(names, 2), CARD_COLUMNS)
    n = images_per_prompt(report["summary"], folder.name)
    intro = f"Scored by evaluate.py on the prompts of {out} ({n} images per prompt)."
    tmp = card.with_name(f"README.md.{os.getpid()}.tmp")
    tmp.write_text("\n".join([head + CARD_EVALUATION, "", intro, "", *table]) + "\n" + tail)
    os.replace(tmp, card)


# ---- main and its steps ----
class Inputs(NamedTuple):
    """The image folders to score, read and checked before any model is loaded."""

    dirs: list  # each model's folder (Path)
    models: list  # the models' names (their folders' names), in the tables' order
    metadata: dict  # model -> its metadata.jsonl rows, each with its "model" and its image's "path" added
    baseline: str  # the model win rates are against


def read_inputs(args):
    """The image folders, their metadata.jsonl rows (plus "model" and image "path") and the baseline, all checked."""
    dirs = find_model_dirs(args.image_dirs)
    metadata = {d.name: read_jsonl(d / "metadata.jsonl") for d in dirs}
    for d in dirs:
        if not metadata[d.name]:
            raise UserError(f"{d}/metadata.jsonl lists no images")
        for i, row in enumerate(metadata[d.name], 1):
            missing = [k for k in ("file_name", "prompt", "prompt_index", "image_index") if k not in row]
            if missing:
                raise UserError(f"{d}/metadata.jsonl line {i}: missing {missing}")
            row.update(model=d.name, path=d / row["file_name"])
    models = list(metadata)
    baseline = args.baseline or models[0]
    if baseline not in models:
        raise UserError(f"--baseline {baseline}: not one of the models {models}")
    return Inputs(dirs, models, metadata, baseline)


def scoring_settings(args, metrics, mp):
    """What makes a score: scores.jsonl is resumed only under the same settings."""
    weight_flags = ("pickscore_", "hps_", "imagereward_", "aesthetic_")  # the weights flags (and hps_version)
    scoring = {
        "metrics": metrics,
        "hps_version": args.hps_version,
        "mixed_precision": mp,
        "weights": {k: getattr(args, k) for k in sorted(vars(args)) if k.startswith(weight_flags)},
    }
    if "hps" in metrics:
        scoring["hps_tokenization"] = HPS_TOKENIZATION
    return scoring


def resume_scores(out, scoring, metadata, overwrite):
    """scores.jsonl's rows of images still listed, rewritten (a truncated last line dropped); other settings refused."""
    scores_path, config_path = out / "scores.jsonl", out / "run_config.json"
    kept = []
    if scores_path.exists() and not overwrite:
        old = json.loads(config_path.read_text()).get("scoring") if config_path.is_file() else None
        if old != scoring:
            raise UserError(f"{scores_path} holds scores of other settings: pass --overwrite or another --output_dir")
        wanted = {(m, r["file_name"]) for m, rows in metadata.items() for r in rows}
        kept = [r for r in read_jsonl(scores_path) if (r["model"], r["file_name"]) in wanted]
    with open(scores_path.with_name("scores.jsonl.tmp"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(scores_path.with_name("scores.jsonl.tmp"), scores_path)
    return kept


def prepare_item(row, scorers):
    """Worker: one image preprocessed once per distinct prep_key -> {metric: pixels}, or why it is skipped (a str)."""
    if not row["path"].is_file():
        return "missing file"
    image = decode_image(str(row["path"]))
    if image is None:
        return "unreadable image"
    done, out = {}, {}
    try:
        for m, s in scorers.items():
            if s.prep_key not in done:
                done[s.prep_key] = s.prepare(image)
            out[m] = done[s.prep_key]
    except Exception as e:  # e.g. a degenerate 1-pixel-wide image: skip it like an unreadable one
        return f"cannot preprocess ({type(e).__name__}: {e})"
    return out


def score_batch(batch, scorers, metrics):
    """[(metadata row, pixels)] -> their scores.jsonl rows: every metric on the whole batch at once."""
    keys = ("model", "prompt_index", "image_index", "prompt", "file_name", "seed")  # then one per metric
    rows = [{k: row.get(k) for k in keys} for row, _ in batch]
    for m in metrics:
        scores = scorers[m](torch.stack([pixels[m] for _, pixels in batch]), [row["prompt"] for row in rows])
        for row, score in zip(rows, scores.cpu().tolist()):
            row[m] = score
    return rows


def score_images(todo, scorers, metrics, args, scores_path, skipped):
    """Score `todo` batch by batch (the workers prepare the next), appending to scores.jsonl; returns the new rows."""
    batches = [todo[i : i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    new, t0 = [], time.time()
    with ThreadPoolExecutor(max(1, args.num_workers)) as pool, open(scores_path, "a") as f:
        submit = lambda batch: [pool.submit(prepare_item, row, scorers) for row in batch]
        futures = submit(batches[0]) if batches else []
        for bi, batch in enumerate(batches):
            prepared = [future.result() for future in futures]
            futures = submit(batches[bi + 1]) if bi + 1 < len(batches) else []
            good = []
            for row, pixels in zip(batch, prepared):
                if isinstance(pixels, str):  # why it is skipped
                    skipped[row["model"]].append({"file_name": row["file_name"], "reason": pixels})
                    print(f"warning: {row['path']}: {pixels}, skipped", file=sys.stderr)
                else:
                    good.append((row, pixels))
            rows = score_batch(good, scorers, metrics) if good else []
            new += rows
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            if bi % 20 == 0 or bi == len(batches) - 1:
                rate = len(new) / max(time.time() - t0, 1e-9)
                print(f"batch {bi + 1}/{len(batches)}: {len(new)} images scored ({rate:.1f}/s)", flush=True)
    return new


def main(argv=None):
    args = parse_args(argv)
    metrics = args.metrics
    inputs = read_inputs(args)  # checked before any model is loaded
    device, mp, dtype = pick_device(args)

    # Resume: keep the scores of an earlier run with the same settings.
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scoring = scoring_settings(args, metrics, mp)
    kept = resume_scores(out, scoring, inputs.metadata, args.overwrite)
    config = dict(models=inputs.models, baseline=inputs.baseline, scoring=scoring, device=str(device))
    write_json_atomic(out / "run_config.json", run_config("evaluate", args, **config))

    # Score every image not scored yet.
    scorers = load_scorers(args, metrics, device, dtype)
    done = {(r["model"], r["file_name"]) for r in kept}
    todo = [r for rows in inputs.metadata.values() for r in rows if (r["model"], r["file_name"]) not in done]
    models = f"{len(inputs.models)} model(s) with {', '.join(metrics)} on {device} ({mp})"
    print(f"scoring {len(todo)} images ({len(done)} already scored) from {models}", flush=True)
    skipped = {m: [] for m in inputs.models}
    rows = kept + score_images(todo, scorers, metrics, args, out / "scores.jsonl", skipped)

    # Aggregate, compare with the baseline, write the tables, fill the model cards.
    weights = {m: s.weights for m, s in scorers.items()}
    report = summarize(rows, inputs, metrics, args.hps_version, skipped, weights, mp)
    write_json_atomic(out / "summary.json", report)
    summary_md = markdown_summary(report)
    (out / "summary.md").write_text(summary_md)
    for folder in inputs.dirs:
        fill_model_card(folder, report, out)
    counts = {m: {k: v for k, v in c.items() if k != "skipped"} for m, c in report["counts"].items()}
    write_json_atomic(out / "run_config.json", run_config("evaluate", args, **config, weights=weights, counts=counts))
    print(summary_md)
    n_skipped = sum(len(v) for v in skipped.values())
    note = f" ({n_skipped} unreadable image(s) skipped, listed in summary.json)" if n_skipped else ""
    print(f"wrote {out}/scores.jsonl, summary.json, summary.md, run_config.json{note}")


# ---- plumbing: image folders in, weights files by hub id or local path ----
def find_model_dirs(paths):
    """Image folders (with metadata.jsonl) from the arguments: a folder itself, or every such subfolder of it."""
    dirs = []
    for p in map(Path, paths):
        subs = [sub for sub in p.iterdir() if (sub / "metadata.jsonl").is_file()] if p.is_dir() else []
        if (p / "metadata.jsonl").is_file():
            dirs.append(p)
        elif subs:
            dirs += sorted(subs, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.name)])
        elif not p.exists():
            raise UserError(f"{p}: no such folder")
        else:
            raise UserError(f"{p}: no metadata.jsonl there nor in a subfolder: pass a sample.py or generate.py folder")
    names = [d.name for d in dirs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two image folders have the same name {dup}: the model name is the folder name")
    if not dirs:
        raise UserError("no image folders given: pass one or more folders with metadata.jsonl")
    return dirs


def is_local(spec):
    return spec.startswith((".", "/", "~")) or Path(spec).exists()


def resolve_file(spec, default_name, flag):
    """A local path for a weights file: a file, a folder (+ default_name), a hub repo (+ default_name) or hub file."""
    # transformers' cached_file takes a folder or a repo, but neither a file path nor a repo/path/in/repo spec
    if is_local(spec):
        p = Path(spec).expanduser()
        p = p / default_name if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"{flag} {spec}: file not found ({p})")
        return str(p)
    parts = spec.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_name
    try:
        from huggingface_hub import hf_hub_download  # only for a hub id: local paths never import it

        return hf_hub_download(repo, filename)
    except Exception as e:  # offline, unknown repo or file, network: all the user's to fix
        raise UserError(f"{flag} {spec}: could not get {filename} from the hub repo {repo}: {first_line(e)}") from None


def torch_load(path, flag):
    """Never unpickle code: weights_only=True. The aesthetic .pth holds CUDA tensors, hence map_location."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {path}: cannot load it as a torch checkpoint ({first_line(e)})") from None


def from_pretrained(cls, spec, flag, **kwargs):
    """transformers from_pretrained with one-line errors; missing weights are an error, not a random init."""
    check_model_path(spec, flag)
    try:
        out = cls.from_pretrained(spec, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {spec}: {first_line(e)}") from None
    out, info = out if isinstance(out, tuple) else (out, {})  # (model, loading_info) when asked for
    if info.get("missing_keys"):
        raise UserError(f"{flag} {spec}: weights {key_mismatch(info['missing_keys'], [])}")
    return out


def key_mismatch(missing, unexpected, n=4):
    """'missing a, b; unexpected c, d and 3 more': the keys of a checkpoint that do not fit the model."""
    parts = []
    for what, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            parts.append(f"{what} {', '.join(keys[:n])}" + (f" and {len(keys) - n} more" if len(keys) > n else ""))
    return "; ".join(parts)


def load_strict(module, state_dict, what):
    """load_state_dict(strict=True), with missing, unexpected or mis-shaped keys said in one line."""
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # torch raises on mis-shaped tensors even when not strict: one line each
        shapes = str(e).strip().splitlines()[1:] or [str(e)]
        raise UserError(f"{what}: checkpoint does not fit the model config: {shapes[0].strip()}") from None
    if missing or unexpected:
        raise UserError(f"{what}: checkpoint does not match the model: {key_mismatch(missing, unexpected)}")


def first_line(error):
    """An exception's message in one line (its type when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---- helpers every script carries: each is the same text wherever it appears (tests/test_shared.py checks) ----
class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2."""


def cli(main):
    """Run main(); known failures end in one line: bad input (exit 2), disk full (28), Ctrl-C (130)."""
    import errno

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = e.filename or "while writing"
        print(
            f"error: disk full ({where}): free space and rerun the same command; finished work is kept", file=sys.stderr
        )
        sys.exit(28)


def write_json_atomic(path, obj):
    """Write JSON under a temp name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    """The rows of a jsonl file; a truncated last line (a run killed mid-write) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def run_config(stage, args, **extra):
    """What made a folder, with which settings: the same shape for every stage."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "args": dict(vars(args)),
        "versions": versions,
        **extra,
    }


def check_model_path(path, what="--pretrained_model_name_or_path"):
    """A path-looking model argument that does not exist is a typo, not a hub id."""
    if (path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]) and not Path(path).exists():
        raise UserError(f"{what} {path}: folder not found; pass a local pipeline folder or a hub id")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: X)" only where the help text does not state the default already and there is one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.required:
            return text
        return super()._get_help_string(action)


def quiet_known_noise():
    """Drop two import-time messages known to be harmless at their source (every other warning still shows):
    bitsandbytes' missing optional 4-bit CPU kernel, transformers' torchvision fallback (torchvision is not needed)."""
    import logging

    for logger, text in (
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
        ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    ):
        logging.getLogger(logger).addFilter(lambda record, text=text: text not in record.getMessage())


def decode_image(value):
    """bytes, {"bytes", "path"}, a path or PIL -> the RGB picture a viewer sees (to_rgb); None if it does not decode."""
    import io

    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            value = io.BytesIO(value)
        img = value if isinstance(value, Image.Image) else Image.open(value)
        img.load()
        return to_rgb(img)
    except Exception:
        return None


def to_rgb(img):
    """What a viewer sees, as 8-bit RGB: the EXIF orientation applied (phones store photos sideways plus a tag),
    transparency laid over white, 16-bit greyscale scaled to 8 bits (a plain convert clips it to white), palette, CMYK
    and greyscale converted."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


quiet_known_noise()  # before the libraries that log the known noise are imported (they are imported lazily)


if __name__ == "__main__":
    cli(main)
