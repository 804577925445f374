#!/usr/bin/env python
"""Score folders of generated images with PickScore, HPS v2/v2.1, ImageReward and the LAION aesthetic predictor.

    python evaluate.py runs/exp/samples --output_dir runs/exp/eval            # every model folder under samples/
    python evaluate.py samples/base samples/iter_1 --metrics hps,pickscore --hps_version v2.1

Each image folder holds metadata.jsonl (one line per image: file_name, prompt, prompt_index, image_index, seed) as
generate.py and sample.py write it; the model name is the folder name. All four scorers run with `transformers`
alone: HPS and ImageReward checkpoints are converted key by key from their original layouts (open_clip, BLIP) and
loaded strictly; HPS prompts are tokenised exactly as open_clip's tokenize(). The towers run in fp32 (as the
official PickScore, ImageReward and aesthetic code do; the official hpsv2.score runs under CUDA autocast) unless
--mixed_precision asks for fp16/bf16. HPS is v2.0 unless --hps_version v2.1. Writes scores.jsonl (one line per
image), summary.json, summary.md (the model card's table: per model the paper's best of N, i.e. per prompt the
image with the highest raw mean of the metrics, then mean and median, plus the average over the metrics; the
per-metric max of N apart; win rates against the first model on per-prompt means and on the best-of-N images) and
run_config.json to --output_dir.
"""

import argparse
import html
import json
import math
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
# Rows of summary.md in the model card's order; --metrics may name them in any order.
METRICS = ("hps", "aesthetic", "imagereward", "pickscore")
METRIC_NAMES = {"hps": "HPS", "aesthetic": "Aesthetic", "imagereward": "ImageReward", "pickscore": "PickScore"}
METRIC_DECIMALS = {"hps": 4, "aesthetic": 3, "imagereward": 3, "pickscore": 3}  # HPS lives around 0.27

# Official weights (hub ids). Every flag also takes a local path; both go through the same loading code.
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}  # not comparable: always record which
HPS_CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # config + tokenizer the open_clip weights are converted onto
IMAGEREWARD_REPO = "THUDM/ImageReward"  # ImageReward.pt + med_config.json
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
# sac+logos+ava1-l14-linearMSE.pth, as trl's DDPO example publishes it (the same tensors under another name).
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"

# Preprocessing: all four scorers see 224x224 images normalised with OpenAI CLIP's mean/std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224  # ImageReward and the aesthetic predictor; HPS and PickScore take it from their configs (also 224)
CLIP_MAX_LENGTH = 77  # CLIP context length (open_clip pads every prompt to it)
# HPS prompts go through open_clip's tokenize(), spelled out below; recorded in the scoring settings, so that a
# scores.jsonl made with another tokenisation is not resumed.
HPS_TOKENIZATION = "open_clip tokenize()"
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward truncates prompts to 35 BERT tokens
IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward standardises the head's raw output with these
IMAGEREWARD_STD = 1.0333394966054072
BLIP_VIT_HEAD_DIM = 64  # BLIP's ViT-B/16 (12 heads) and ViT-L/16 (16 heads) both use 64-wide heads
BLIP_VIT_LN_EPS = 1e-6  # BLIP's ViT uses LayerNorm(eps=1e-6); transformers' default is 1e-5
HEAD_LINEARS = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers in both MLP heads (1, 3, 5 are Dropouts)


# ---- flags ----
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through cli(), not usage + traceback
        raise UserError(f"{message} (see python evaluate.py --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "image_dirs_pos",
        nargs="*",
        metavar="IMAGE_DIR",
        help="image folders with metadata.jsonl, or a folder of such folders (samples/)",
    )
    p.add_argument("--image_dirs", nargs="+", default=[], help="the same, as a flag")
    p.add_argument("--output_dir", default="eval")
    p.add_argument(
        "--metrics",
        action="append",
        default=None,
        help=f"comma-separated and/or repeated, any of {','.join(METRICS)} (default: all)",
    )
    p.add_argument(
        "--hps_version",
        default="2.0",
        help="v2.0 (default, as the official hpsv2.score) or v2.1; not comparable: recorded in every output",
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--mixed_precision",
        default="no",
        help="no (fp32: the official PickScore, ImageReward and aesthetic code run so, hpsv2 under CUDA "
        "autocast), fp16 or bf16 for the towers: reduced precision "
        "is faster but moves scores; normalisation, dot products and heads stay fp32",
    )
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--baseline", default=None, help="model that win rates are against (default: the first)")
    p.add_argument(
        "--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding and preprocessing images"
    )
    p.add_argument("--overwrite", action="store_true", help="rescore images already in output_dir/scores.jsonl")
    p.add_argument("--pickscore_model", default=PICKSCORE_MODEL)
    p.add_argument("--pickscore_processor", default=PICKSCORE_PROCESSOR)
    p.add_argument(
        "--hps_checkpoint",
        default=None,
        help=f"HPS .pt file, folder or hub file (default {HPS_REPO}/{HPS_FILES['2.0']} or "
        f"{HPS_FILES['2.1']} by --hps_version)",
    )
    p.add_argument("--hps_clip", default=HPS_CLIP, help="ViT-H-14 CLIP config + tokenizer for the HPS weights")
    p.add_argument(
        "--imagereward_checkpoint",
        default=IMAGEREWARD_REPO,
        help="ImageReward.pt file, a folder holding it, or a hub repo",
    )
    p.add_argument("--imagereward_med_config", default=None, help="med_config.json (default: beside the checkpoint)")
    p.add_argument("--imagereward_tokenizer", default=IMAGEREWARD_TOKENIZER)
    p.add_argument("--aesthetic_clip", default=AESTHETIC_CLIP)
    p.add_argument(
        "--aesthetic_head", default=AESTHETIC_HEAD, help="sac+logos+ava1-l14-linearMSE.pth (file, folder or hub file)"
    )
    args = p.parse_args(argv)
    args.image_dirs = list(args.image_dirs_pos) + list(args.image_dirs)
    del args.image_dirs_pos
    return args


def parse_metrics(values):
    names = [m.strip().lower() for v in (values or [",".join(METRICS)]) for m in v.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)}")
    if not names:
        raise UserError(f"--metrics is empty: choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]  # the model card's order


def pick_device(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # fp32 unless asked: the official PickScore, ImageReward and aesthetic code run their towers in fp32 (hpsv2's
    # score() under CUDA autocast: fp32 HPS may differ from it slightly on a GPU)
    mp = str(args.mixed_precision).lower()
    mp = "no" if mp == "fp32" else mp  # recorded as "no", the other scripts' word for it
    dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if mp not in dtypes:
        raise UserError(f"--mixed_precision {mp}: choose no (fp32), fp16 or bf16")
    if mp == "fp16" and device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU: use no or bf16 on a CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    return device, mp, dtypes[mp]


# ---- preprocessing (exactly the originals' torchvision pipelines, written with PIL + torch) ----
def pil_to_tensor(img):
    """torchvision ToTensor: HWC uint8 -> CHW float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


def normalize(x, mean=CLIP_MEAN, std=CLIP_STD):
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def resize_center_crop(img, size=IMAGE_SIZE):
    """ImageReward and the aesthetic predictor (OpenAI CLIP's transform): Resize(size, BICUBIC) on the PIL image
    (shorter side -> size, longer side int()-truncated), CenterCrop(size), ToTensor, Normalize."""
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return normalize(pil_to_tensor(img))


def resize_longest_pad(img, size=IMAGE_SIZE):
    """HPS v2 (its open_clip fork, ResizeMaxSize): ToTensor first, then a bicubic antialiased resize of the
    *tensor* so the longer side is `size` (Python round() for the other side), zero-pad to size x size
    (centred, extra pixel right/bottom), Normalize. Padding happens in [0, 1] space, before normalisation."""
    x = pil_to_tensor(img)
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return normalize(x)


# ---- HPS prompts: open_clip's tokenize(), on the vocab.json + merges.txt of --hps_clip ----
# HPS v2 was trained and is scored (hpsv2) with open_clip's tokenizer. The Hugging Face CLIPTokenizer of the same
# vocabulary gives other ids on real prompts: it runs no ftfy and no HTML unescaping, treats a pad token such as
# laion's "!" as a special token (a literal "!" becomes the pad id), and pads with the pad id. Up to 0.2 apart.
OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")  # open_clip's names: recognised inside a prompt too
HF_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")  # the same two ids, as a HF vocab.json names them
# open_clip's pre-tokenisation (case-insensitive): its specials, English contractions, runs of letters, single
# digits, runs of anything else but whitespace. Whitespace separates words and is dropped.
OPEN_CLIP_WORD = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
END_OF_WORD = "</w>"  # byte-level CLIP BPE marks the last symbol of every word


def clean_prompt(text):
    """open_clip's text cleaning, in its order: ftfy.fix_text (mojibake, curly quotes, ...), HTML entities unescaped
    twice (so "&amp;amp;" -> "&"), stripped, every run of whitespace one space, lowercased."""
    import ftfy  # optional, only HPS needs it: HPS() says so in one line when it is missing

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()  # str.split() and re's \s agree on what is whitespace


def byte_alphabet():
    """Byte-level BPE's alphabet (GPT-2, CLIP): every byte as one printable character. The printable Latin-1 bytes
    stand for themselves; the 68 others (controls, space, NBSP, soft hyphen) take chr(256), chr(257), ... in byte
    order, so that no symbol is whitespace."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}


BYTE_CHARS = byte_alphabet()


def split_words(text):
    """A cleaned prompt -> open_clip's words (the `regex` module: transformers needs it too)."""
    import regex  # only HPS needs \p{L} / \p{N} classes, which re lacks

    return regex.findall(OPEN_CLIP_WORD, text, flags=regex.IGNORECASE)


def bpe(word, ranks):
    """Byte-level BPE of one word (already in BYTE_CHARS): one symbol per character, the last one with </w>; then,
    while some adjacent pair is a merge, merge every occurrence (left to right, never overlapping) of the pair with
    the lowest rank."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def frame_ids(ids, start, end, length=CLIP_MAX_LENGTH):
    """open_clip's framing: start + ids + end; longer than `length` -> cut to `length` with the end token last (so
    the text tower always pools an end token); shorter -> padded with 0 (id 0 is "!", but padding never matters:
    the causal mask hides it from the end token)."""
    ids = [start, *ids, end]
    if len(ids) > length:
        ids = ids[: length - 1] + [end]
    return ids + [0] * (length - len(ids))


def read_clip_bpe(spec):
    """(vocab, merges) from the vocab.json and merges.txt of a HF CLIP tokenizer (a folder or hub id). Every merge
    must make a token of the vocab, and both specials must be in it: one-line errors, not a KeyError mid-run."""
    vocab_path = resolve_file(spec, "vocab.json", "--hps_clip")
    merges_path = resolve_file(spec, "merges.txt", "--hps_clip")
    try:
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise UserError(f"--hps_clip {spec}: cannot read its tokenizer files ({e})") from None
    if not isinstance(vocab, dict):
        raise UserError(f"--hps_clip {spec}: {vocab_path} is not a token -> id mapping")
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    bad = [" ".join(m) for m in merges if len(m) != 2 or "".join(m) not in vocab]
    if bad:
        raise UserError(f"--hps_clip {spec}: merges.txt does not match vocab.json (e.g. the merge {bad[0]!r})")
    missing = [t for t in HF_CLIP_SPECIALS if t not in vocab]
    if missing:
        raise UserError(f"--hps_clip {spec}: vocab.json has no {missing}: not a CLIP tokenizer")
    return vocab, merges


class OpenClipTokenizer:
    """open_clip's tokenize(texts) (context length 77) on a HF CLIP vocabulary: clean_prompt, split_words, BYTE_CHARS,
    bpe, ids from vocab.json, frame_ids. A literal "<end_of_text>" in a prompt is that token, as in open_clip."""

    def __init__(self, vocab, merges, length=CLIP_MAX_LENGTH):
        self.vocab, self.length = vocab, length
        self.ranks = {}
        for rank, pair in enumerate(merges):
            self.ranks[pair] = rank  # a repeated merge keeps its last rank, as dict(zip(merges, range(n)))
        self.start, self.end = (vocab[t] for t in HF_CLIP_SPECIALS)
        self.specials = dict(zip(OPEN_CLIP_SPECIALS, (self.start, self.end)))
        self.cache = {}  # word -> ids: prompts repeat words

    def word_ids(self, word):
        if word in self.specials:
            return [self.specials[word]]
        if word not in self.cache:
            chars = "".join(BYTE_CHARS[b] for b in word.encode("utf-8"))
            self.cache[word] = [self.vocab[s] for s in bpe(chars, self.ranks)]
        return self.cache[word]

    def encode(self, prompt):
        return [i for word in split_words(clean_prompt(prompt)) for i in self.word_ids(word)]

    def __call__(self, prompts):
        return torch.tensor([frame_ids(self.encode(p), self.start, self.end, self.length) for p in prompts])


# ---- checkpoint key conversion ----
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


def strip_module_prefix(sd):
    """(Distributed)DataParallel saves keys as module.<name>."""
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def open_clip_to_transformers(sd):
    """open_clip CLIP state dict -> transformers CLIPModel state dict. Unknown keys pass through unchanged, so
    that the strict load names them as unexpected."""
    out = {}
    for key, value in strip_module_prefix(sd).items():
        m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        m2 = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m2:  # q, k, v fused along dim 0 in nn.MultiheadAttention
            tower = "vision_model" if m2.group(1) else "text_model"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{tower}.encoder.layers.{m2.group(2)}.self_attn.{name}.{m2.group(3)}"] = part.clone()
        elif m and m.group(3) in OPEN_CLIP_BLOCK:
            tower = "vision_model" if m.group(1) else "text_model"
            out[f"{tower}.encoder.layers.{m.group(2)}.{OPEN_CLIP_BLOCK[m.group(3)]}.{m.group(4)}"] = value
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
    for old, new in (
        (".norm1.", ".layer_norm1."),
        (".norm2.", ".layer_norm2."),
        (".attn.qkv.", ".self_attn.qkv."),
        (".attn.proj.", ".self_attn.projection."),
    ):
        key = key.replace(old, new)
    return key


# In ImageReward.pt but not used by the reward: BLIP's contrastive projections and a position-id buffer.
BLIP_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def blip_to_transformers(sd):
    """ImageReward state dict -> (BlipVisionModel sd, BlipTextModel sd, MLP head sd, unexpected keys). The BERT
    text encoder of BLIP (med.py) has transformers' BlipTextModel names already: only prefixes change."""
    vision, text, head, unexpected = {}, {}, {}, []
    for key, value in strip_module_prefix(sd).items():
        if key.startswith("blip.visual_encoder."):
            vision[rename_blip_vit_key(key[len("blip.visual_encoder.") :])] = value
        elif key.startswith(BLIP_UNUSED):
            continue
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            head[key[len("mlp.") :]] = value
        else:
            unexpected.append(key)
    return vision, text, head, unexpected


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
        image_size=int(round(math.sqrt(n_pos - 1))) * patch,
        layer_norm_eps=BLIP_VIT_LN_EPS,
        hidden_act="gelu",
    )


def blip_text_config(med_config, encoder_width):
    """BlipTextConfig from ImageReward's med_config.json (BERT-base + cross-attention). encoder_width is the
    ViT width (1024), which BLIP sets in code, overriding the file's 768."""
    from transformers import BlipTextConfig  # transformers takes seconds to import: only to build a scorer

    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    )
    return BlipTextConfig(
        **{k: med_config[k] for k in keys if k in med_config}, encoder_hidden_size=encoder_width, is_decoder=True
    )  # is_decoder=True: build the cross-attention layers


def head_layers(sd, in_features, what):
    """The 5 Linear layers (weight, bias) of an ImageReward / LAION aesthetic MLP head, in float32."""
    expected = {f"layers.{i}.{p}" for i in HEAD_LINEARS for p in ("weight", "bias")}
    if set(sd) != expected:
        parts = [f"missing {describe_keys(expected - set(sd))}"] if expected - set(sd) else []
        parts += [f"unexpected {describe_keys(set(sd) - expected)}"] if set(sd) - expected else []
        raise UserError(f"{what}: MLP head keys do not match layers.{{0,2,4,6,7}}: {'; '.join(parts)}")
    layers, width = [], in_features
    for i in HEAD_LINEARS:
        w, b = sd[f"layers.{i}.weight"].float(), sd[f"layers.{i}.bias"].float()
        if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise UserError(f"{what}: layers.{i} has shape {tuple(w.shape)}, expected (*, {width})")
        layers.append((w, b))
        width = w.shape[0]
    if width != 1:
        raise UserError(f"{what}: the MLP head ends in {width} outputs, expected 1")
    return layers


# ---- score formulas (float32) ----
def l2_normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


def cosine(a, b):
    """Row-wise cosine of two (B, D) batches."""
    return (l2_normalize(a.float()) * l2_normalize(b.float())).sum(-1)


def pickscore_formula(image_emb, text_emb, logit_scale):
    """PickScore = exp(logit_scale) * cos(image, text) (≈21 for SD-1.5; a raw cosine ≈0.2: the scale left out)."""
    return logit_scale.float().exp() * cosine(image_emb, text_emb)


def hps_formula(image_emb, text_emb):
    """HPS v2 = cos(image, text), no logit scale (≈0.27 for SD-1.5; benchmarks print it x100)."""
    return cosine(image_emb, text_emb)


def linear_head(x, layers):
    """The MLP heads: Linear layers without activations (the originals' ReLUs are commented out), dropout off."""
    x = x.float()
    for w, b in layers:
        x = F.linear(x, w.to(x.device), b.to(x.device))
    return x[:, 0]


def imagereward_formula(raw):
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def aesthetic_formula(image_emb, layers):
    """LAION improved aesthetic predictor: the head on the L2-normalised CLIP ViT-L/14 image embedding."""
    return linear_head(l2_normalize(image_emb.float()), layers)


def clip_image_embeds(model, pixel_values):
    p = next(model.parameters())
    pooled = model.vision_model(pixel_values=pixel_values.to(p.device, p.dtype)).pooler_output
    return model.visual_projection(pooled).float()


def clip_text_embeds(model, input_ids, attention_mask=None):
    device = next(model.parameters()).device
    mask = None if attention_mask is None else attention_mask.to(device)
    pooled = model.text_model(input_ids=input_ids.to(device), attention_mask=mask).pooler_output
    return model.text_projection(pooled).float()


def open_clip_text_embeds(model, input_ids):
    """open_clip's text features on a transformers CLIPModel: only the causal mask (no padding mask), and pooled at
    input_ids.argmax(-1), the end token (the largest id), whatever eos_token_id the transformers config names (it
    pools at the argmax only when that is the legacy 2, else at the first eos_token_id)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    hidden = model.text_model(input_ids=ids).last_hidden_state  # after final_layer_norm, as open_clip's ln_final
    pooled = hidden[torch.arange(ids.shape[0], device=device), ids.argmax(dim=-1)]
    return model.text_projection(pooled).float()


# ---- aggregation ----
AVERAGE = "average"  # the pseudo-metric of the tables' "average score" (the raw mean of the metrics shown)


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
    """The plain mean of one image's raw scores on `metrics`; None when one of them is missing or not finite.
    Raw, as the paper averages them, although the scales differ (PickScore ~21, aesthetic ~5, ImageReward ~0-1,
    HPS ~0.27): PickScore and aesthetic dominate the mean."""
    values = [row.get(m) for m in metrics]
    if not values or any(v is None or not math.isfinite(float(v)) for v in values):
        return None
    return sum(float(v) for v in values) / len(values)


def select_best_of_n(rows, metrics):
    """The paper's best of N (its §6.1, the model card's "Best of Five"): per prompt, the one image with the highest
    raw mean of `metrics` (the four, or those that were run). Ties: the lowest image_index wins.
    Returns {(prompt_index, prompt): row}."""
    best = {}
    for r in sorted(rows, key=lambda r: r["image_index"]):
        a = image_average(r, metrics)
        key = (r["prompt_index"], r["prompt"])
        if a is not None and (key not in best or a > best[key][0]):  # strict: an equal later image does not win
            best[key] = (a, r)
    return {k: r for k, (_, r) in best.items()}


def aggregate(rows, metric, selection_metrics):
    """Per prompt over its N images: the mean, the best-of-N image's score (picked by the raw mean of
    `selection_metrics`) and the per-metric max (each metric's own maximum, possibly of different images: another,
    higher number than the model card's best of N); then over prompts: mean, median, std of each."""
    groups = per_prompt(rows, metric)
    means = [float(np.mean(v)) for v in groups.values()]
    maxes = [max(v) for v in groups.values()]
    picked = [float(r[metric]) for r in select_best_of_n(rows, selection_metrics).values()]
    sizes = [len(v) for v in groups.values()]
    return {
        "best_of_n": stats(picked),
        "per_metric_max_of_n": stats(maxes),
        "mean": stats(means),
        "n_prompts": len(groups),
        "n_images": sum(sizes),
        "images_per_prompt": [min(sizes), max(sizes)] if sizes else [0, 0],
    }


def average_label(metrics):
    """'avg (4 metrics)' for the paper's four; otherwise the count and the names ('avg (3: HPS, ImageReward, ...)')."""
    if set(metrics) == set(METRICS):
        return f"avg ({len(METRICS)} metrics)"
    return f"avg ({len(metrics)}: {', '.join(METRIC_NAMES[m] for m in metrics)})"


def average_scores(model_summary, metrics):
    """The tables' "average score": for each figure (best of N and its median, mean, median, per-metric max), the
    plain mean of that figure over `metrics` (a row of the paper's tables averaged across its metric columns; for
    the medians, the mean of the medians); None if a metric has no value."""
    figures = {
        "best_of_n": ("best_of_n", "mean"),
        "best_of_n_median": ("best_of_n", "median"),
        "mean": ("mean", "mean"),
        "median": ("mean", "median"),
        "per_metric_max_of_n": ("per_metric_max_of_n", "mean"),
    }
    out = {"metrics": list(metrics), "label": average_label(metrics)}
    for key, (group, stat) in figures.items():
        values = [model_summary[m][group][stat] for m in metrics]
        out[key] = None if not values or any(v is None for v in values) else sum(values) / len(values)
    return out


def prompt_values(rows, metrics, on):
    """{metric or AVERAGE: {(prompt_index, prompt): value}} for one model. on="mean": the mean over the prompt's
    images (AVERAGE: of each image's raw mean of `metrics`); on="best_of_n": the scores of the image that
    select_best_of_n picked (AVERAGE: its raw mean of `metrics`, the selection criterion itself)."""
    if on == "best_of_n":
        picked = select_best_of_n(rows, metrics)
        out = {m: {k: float(r[m]) for k, r in picked.items()} for m in metrics}
        out[AVERAGE] = {k: image_average(r, metrics) for k, r in picked.items()}
        return out
    out = {m: {k: float(np.mean(v)) for k, v in per_prompt(rows, m).items()} for m in metrics}
    averages = [{**r, AVERAGE: image_average(r, metrics)} for r in rows]
    out[AVERAGE] = {k: float(np.mean(v)) for k, v in per_prompt(averages, AVERAGE).items()}
    return out


def win_rates(rows_by_model, baseline, metrics, on="mean"):
    """Per metric (and AVERAGE), per model: the fraction of the prompts both it and `baseline` have where its value is
    higher than the baseline's (ties count half); the values are per-prompt means (on="mean") or the best-of-N
    images' scores (on="best_of_n"), see prompt_values."""
    values = {model: prompt_values(rows, metrics, on) for model, rows in rows_by_model.items()}
    out = {}
    for metric in list(metrics) + [AVERAGE]:
        base = values[baseline][metric]
        out[metric] = {}
        for model in rows_by_model:
            if model == baseline:
                continue
            other = values[model][metric]
            common = sorted(base.keys() & other.keys())
            wins = sum(1.0 if other[k] > base[k] else 0.5 if other[k] == base[k] else 0.0 for k in common)
            out[metric][model] = {"win_rate": wins / len(common) if common else None, "n_prompts": len(common)}
    return out


def selection_label(metrics, n):
    """What picked the best-of-N image, as summary.md and summary.json name it."""
    if set(metrics) == set(METRICS):
        return f"best of {n}"
    return f"best of {n} by the mean of {len(metrics)} metrics ({', '.join(METRIC_NAMES[m] for m in metrics)})"


def same_seeds(rows_a, rows_b):
    """Were the images of the prompts both models have drawn from the same seeds (a paired comparison)?"""
    a = {(r["prompt_index"], r["image_index"]): r.get("seed") for r in rows_a}
    b = {(r["prompt_index"], r["image_index"]): r.get("seed") for r in rows_b}
    common = a.keys() & b.keys()
    return bool(common) and all(a[k] is not None and a[k] == b[k] for k in common)


# ---- summary.md ----
def fmt(x, decimals):
    return "n/a" if x is None else f"{x:.{decimals}f}"


def markdown_summary(summary, models, metrics, baseline, wins, hps_version, averages, wins_best):
    """The model card's table (rows: metrics and the average; columns: best of N / mean / median per model), the
    per-metric maxima apart, and the win rates on per-prompt means and on the best-of-N images."""
    name = {m: METRIC_NAMES[m] + (f" v{hps_version}" if m == "hps" else "") for m in metrics}
    name[AVERAGE] = average_label(metrics)
    n = max((summary[model][m]["images_per_prompt"][1] for model in models for m in metrics), default=0)
    subset = set(metrics) != set(METRICS)
    head, rule = ["Metric"], ["---"]
    for model in models:
        k = max((summary[model][m]["images_per_prompt"][1] for m in metrics), default=0)
        head += [
            f"{model} best of {k}" + (f" (by mean of {len(metrics)})" if subset else ""),
            f"{model} mean",
            f"{model} median",
        ]
        rule += ["---:"] * 3
    avg_decimals = max(METRIC_DECIMALS[m] for m in metrics)
    lines = [
        "# Evaluation",
        "",
        f"{selection_label(metrics, n)}: per prompt, the one image with the highest plain mean of its raw "
        f"{', '.join(METRIC_NAMES[m] for m in metrics)} scores ("
        + (
            "not the paper's selection, which averages all four metrics"
            if subset
            else "the paper's selection, the model card's \"Best of Five\""
        )
        + "; raw scales, so the largest, PickScore ~21 and aesthetic ~5, weigh most; ties: the lowest image "
        "index), that image's score of each metric, then the mean over prompts. Mean and median: of the "
        f"per-prompt means over the N images. {name[AVERAGE]}: the mean of the column's metric values.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(rule) + " |",
    ]
    for m in list(metrics) + [AVERAGE]:
        cells = [name[m]]
        for model in models:
            if m == AVERAGE:
                a, d = averages[model], avg_decimals
                cells += [fmt(a["best_of_n"], d), fmt(a["mean"], d), fmt(a["median"], d)]
            else:
                s, d = summary[model][m], METRIC_DECIMALS[m]
                cells += [fmt(s["best_of_n"]["mean"], d), fmt(s["mean"]["mean"], d), fmt(s["mean"]["median"], d)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Best of {n} median: the median over prompts of the selected images' scores. Per-metric max of "
        f"{n}: each metric's own maximum over the prompt's images (possibly of different images, so higher; not "
        f"the model card's best of {n}), mean over prompts.",
        "",
    ]
    head, rule = ["Metric"], ["---"]
    for model in models:
        k = max((summary[model][m]["images_per_prompt"][1] for m in metrics), default=0)
        head += [f"{model} best of {k} median", f"{model} per-metric max of {k}"]
        rule += ["---:"] * 2
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    for m in list(metrics) + [AVERAGE]:
        cells = [name[m]]
        for model in models:
            if m == AVERAGE:
                a, d = averages[model], avg_decimals
                cells += [fmt(a["best_of_n_median"], d), fmt(a["per_metric_max_of_n"], d)]
            else:
                s, d = summary[model][m], METRIC_DECIMALS[m]
                cells += [fmt(s["best_of_n"]["median"], d), fmt(s["per_metric_max_of_n"]["mean"], d)]
        lines.append("| " + " | ".join(cells) + " |")
    others = [m for m in models if m != baseline]
    for table, what in (
        (wins, f"per-prompt means (each prompt: the mean over its {n} images)"),
        (wins_best, f"the best-of-{n} images (each prompt: the image the selection above picked, for each model)"),
    ):
        if not others:
            break
        lines += [
            "",
            f"Win rate against {baseline} on {what}: the fraction of shared prompts where the model's "
            f"value is higher (ties count half); {name[AVERAGE]}: of the raw mean of the metrics.",
            "",
            "| Metric | " + " | ".join(others) + " |",
            "| --- |" + " ---: |" * len(others),
        ]
        for m in list(metrics) + [AVERAGE]:
            lines.append(f"| {name[m]} | " + " | ".join(fmt(table[m][o]["win_rate"], 3) for o in others) + " |")
    return "\n".join(lines) + "\n"


# ---- the four scorers: prepare(image) on CPU workers, then __call__(pixels, prompts) on the device ----
class PickScore:
    """yuvalkirstain/PickScore_v1 (a transformers CLIPModel) with the laion ViT-H-14 processor, as its README."""

    def __init__(self, model, processor, device, dtype):
        from transformers import AutoProcessor, CLIPModel  # a slow import: only to build a scorer

        self.model = from_pretrained(CLIPModel, model, "--pickscore_model", output_loading_info=True)
        self.logit_scale = self.model.logit_scale.detach().float().clone()  # fp32: exp() of fp16 is off by ~0.2%
        self.model.to(device, dtype).eval()
        self.processor = from_pretrained(AutoProcessor, processor, "--pickscore_processor")
        self.weights = {"model": model, "processor": processor}

    prep_key = ("pickscore processor",)

    def prepare(self, image):
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        tok = self.processor(
            text=prompts, padding=True, truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt"
        )
        text = clip_text_embeds(self.model, tok["input_ids"], tok["attention_mask"])
        image = clip_image_embeds(self.model, pixels)
        return pickscore_formula(image, text, self.logit_scale.to(image.device))


class HPS:
    """HPS v2 / v2.1: open_clip ViT-H-14 weights ({"state_dict": ...}) converted onto a transformers CLIPModel."""

    def __init__(self, checkpoint, version, clip, device, dtype):
        spec = checkpoint or f"{HPS_REPO}/{HPS_FILES[version]}"
        path = resolve_file(spec, HPS_FILES[version], "--hps_checkpoint")
        other = {f: v for v, f in HPS_FILES.items()}.get(Path(path).name)
        if other and other != version:  # v2.0 and v2.1 scores are not comparable: refuse an obvious mix-up
            raise UserError(f"--hps_checkpoint {Path(path).name} is HPS v{other} but --hps_version is {version}")
        ckpt = torch_load(path, "--hps_checkpoint")
        sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        try:
            import ftfy  # noqa: F401  (open_clip cleans every prompt with it)
        except ImportError:
            raise UserError("HPS needs ftfy (pip install ftfy): open_clip cleans prompts with it") from None
        from transformers import CLIPConfig, CLIPModel  # after the cheap checks: a slow import

        check_model_path(clip, "--hps_clip")
        try:
            config = CLIPConfig.from_pretrained(clip)
        except (OSError, ValueError) as e:
            raise UserError(f"--hps_clip {clip}: {str(e).splitlines()[0]}") from None
        self.tokenize = OpenClipTokenizer(*read_clip_bpe(clip))  # before building ViT-H: a bad folder fails fast
        if max(self.tokenize.vocab.values()) >= config.text_config.vocab_size:
            raise UserError(
                f"--hps_clip {clip}: vocab.json has more tokens than the config's text vocab_size "
                f"{config.text_config.vocab_size}"
            )
        for cfg in (config.text_config, config.vision_config):
            cfg.hidden_act = "gelu"  # open_clip ViT-H-14 uses nn.GELU, not OpenAI's QuickGELU
        with torch.device(device):  # initialise on the device: random init of ViT-H on a CPU takes a while
            self.model = CLIPModel(config)
        load_strict(self.model, open_clip_to_transformers(sd), f"--hps_checkpoint {path}")
        self.model.to(device, dtype).eval()
        self.image_size = config.vision_config.image_size
        self.weights = {"checkpoint": path, "clip": clip, "version": version, "tokenization": HPS_TOKENIZATION}

    @property
    def prep_key(self):
        return ("resize_longest_pad", self.image_size)

    def prepare(self, image):
        return resize_longest_pad(image, self.image_size)

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        text = open_clip_text_embeds(self.model, self.tokenize(prompts))
        return hps_formula(clip_image_embeds(self.model, pixels), text)


class ImageReward:
    """THUDM ImageReward: BLIP ViT-L/16 + BERT with cross-attention to the image tokens + MLP head on [CLS]."""

    def __init__(self, checkpoint, med_config, tokenizer, device, dtype):
        path = resolve_file(checkpoint, "ImageReward.pt", "--imagereward_checkpoint")
        med_spec = med_config or sibling_spec(checkpoint, "med_config.json")
        med_path = resolve_file(med_spec, "med_config.json", "--imagereward_med_config")
        try:
            med = json.loads(Path(med_path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--imagereward_med_config {med_path}: not a JSON config ({e})") from None
        what = f"--imagereward_checkpoint {path}"
        vision_sd, text_sd, head_sd, unexpected = blip_to_transformers(torch_load(path, "--imagereward_checkpoint"))
        if unexpected:
            raise UserError(f"{what}: checkpoint does not match the model: unexpected {describe_keys(unexpected)}")
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel  # a slow import, as above

        vision_config = blip_vision_config(vision_sd)
        with torch.device(device):
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(blip_text_config(med, vision_config.hidden_size), add_pooling_layer=False)
        load_strict(self.vision, vision_sd, what)
        load_strict(self.text, text_sd, what)
        self.head = [(w.to(device), b.to(device)) for w, b in head_layers(head_sd, self.text.config.hidden_size, what)]
        self.vision.to(device, dtype).eval()
        self.text.to(device, dtype).eval()
        self.tokenizer = from_pretrained(AutoTokenizer, tokenizer, "--imagereward_tokenizer")
        # BLIP's init_tokenizer(): adds [DEC] (bos) and [ENC]; vocab 30522 -> 30524 as in med_config
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.image_size = vision_config.image_size
        self.weights = {"checkpoint": path, "med_config": med_path, "tokenizer": tokenizer}

    @property
    def prep_key(self):  # the same pipeline for ImageReward and the aesthetic predictor: computed once
        return ("resize_center_crop", self.image_size)

    def prepare(self, image):
        return resize_center_crop(image, self.image_size)

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        p = next(self.vision.parameters())
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt"
        )
        image_embeds = self.vision(pixel_values=pixels.to(p.device, p.dtype)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=p.device)
        hidden = self.text(
            input_ids=tok["input_ids"].to(p.device),
            attention_mask=tok["attention_mask"].to(p.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        ).last_hidden_state
        return imagereward_formula(linear_head(hidden[:, 0].float(), self.head))


class Aesthetic:
    """LAION improved aesthetic predictor: MLP head on the normalised openai/clip-vit-large-patch14 embedding."""

    def __init__(self, clip, head, device, dtype):
        from transformers import CLIPModel  # a slow import: only to build a scorer

        self.model = from_pretrained(CLIPModel, clip, "--aesthetic_clip", output_loading_info=True)
        self.model.to(device, dtype).eval()
        path = resolve_file(head, "aesthetic-model.pth", "--aesthetic_head")
        sd = strip_module_prefix(torch_load(path, "--aesthetic_head"))
        self.head = [
            (w.to(device), b.to(device))
            for w, b in head_layers(sd, self.model.config.projection_dim, f"--aesthetic_head {path}")
        ]
        self.image_size = self.model.config.vision_config.image_size
        self.weights = {"clip": clip, "head": path}

    @property
    def prep_key(self):  # the same pipeline for ImageReward and the aesthetic predictor: computed once
        return ("resize_center_crop", self.image_size)

    def prepare(self, image):
        return resize_center_crop(image, self.image_size)

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        return aesthetic_formula(clip_image_embeds(self.model, pixels), self.head)


def load_scorers(args, metrics, device, dtype):
    scorers = {}
    for m in metrics:  # all resident at once: every batch is scored by every metric
        t = time.time()
        if m == "pickscore":
            scorers[m] = PickScore(args.pickscore_model, args.pickscore_processor, device, dtype)
        elif m == "hps":
            scorers[m] = HPS(args.hps_checkpoint, args.hps_version, args.hps_clip, device, dtype)
        elif m == "imagereward":
            scorers[m] = ImageReward(
                args.imagereward_checkpoint, args.imagereward_med_config, args.imagereward_tokenizer, device, dtype
            )
        elif m == "aesthetic":
            scorers[m] = Aesthetic(args.aesthetic_clip, args.aesthetic_head, device, dtype)
        print(f"loaded {m} in {time.time() - t:.1f}s", flush=True)
    return scorers


# ---- main and its steps ----
class Inputs(NamedTuple):
    """The image folders to score, read and checked before any model is loaded."""

    dirs: list  # each model's folder (Path)
    models: list  # the models' names (their folders' names), in the tables' order
    metadata: dict  # model -> the rows of its metadata.jsonl
    baseline: str  # the model win rates are against


class Item(NamedTuple):
    """One image to score: its model's folder and its metadata.jsonl row."""

    folder: Path
    row: dict


class Prepared(NamedTuple):
    """prepare_item's result: the image ready for every scorer, or why it is skipped."""

    pixels: dict  # metric -> preprocessed image tensor; None when the image is skipped
    why: str  # None when the image is ready


def check_settings(args):
    """The metrics to run, in the model card's order; --hps_version normalised (v2.1 -> 2.1); --batch_size checked."""
    metrics = parse_metrics(args.metrics)
    args.hps_version = str(args.hps_version).lower().lstrip("v")
    if args.hps_version not in HPS_FILES:
        raise UserError(f"--hps_version {args.hps_version}: choose v2.0 or v2.1")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    return metrics


def read_inputs(args):
    """The image folders of the arguments, their metadata.jsonl rows and the baseline, all checked."""
    dirs = find_model_dirs(args.image_dirs)
    models = [d.name for d in dirs]
    metadata = {d.name: read_metadata(d) for d in dirs}
    baseline = args.baseline or models[0]
    if baseline not in models:
        raise UserError(f"--baseline {baseline}: not one of the models {models}")
    return Inputs(dirs, models, metadata, baseline)


def scoring_settings(args, metrics, mp):
    """What makes a score: scores.jsonl is resumed only under the same settings."""
    scoring = {
        "metrics": metrics,
        "hps_version": args.hps_version,
        "mixed_precision": mp,
        "weights": {
            k: getattr(args, k)
            for k in sorted(vars(args))
            if k.startswith(("pickscore_", "hps_", "imagereward_", "aesthetic_"))
        },
    }
    if "hps" in metrics:
        scoring["hps_tokenization"] = HPS_TOKENIZATION
    return scoring


def resume_scores(out, scoring, metadata, overwrite):
    """The rows of scores.jsonl that an earlier run with the same settings made for images still listed (keyed by
    model and file); scores.jsonl is rewritten to hold just them, which also drops a truncated last line."""
    scores_path, config_path = out / "scores.jsonl", out / "run_config.json"
    kept = []
    if scores_path.exists() and not overwrite:
        old = json.loads(config_path.read_text()).get("scoring") if config_path.is_file() else None
        if old != scoring:
            raise UserError(
                f"{scores_path} holds scores made with other settings: pass --overwrite or another --output_dir"
            )
        wanted = {(m, r["file_name"]) for m, rows in metadata.items() for r in rows}
        kept = [r for r in read_jsonl(scores_path) if (r["model"], r["file_name"]) in wanted]
    with open(scores_path.with_name("scores.jsonl.tmp"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(scores_path.with_name("scores.jsonl.tmp"), scores_path)
    return kept


def load_all_scorers(args, metrics, device, dtype):
    """Every metric's scorer, all resident; transformers' own logging quieted first."""
    from transformers.utils import logging as hf_logging  # transformers takes seconds to import: only to score

    hf_logging.set_verbosity_error()  # keep stderr for our one-line messages
    hf_logging.disable_progress_bar()
    return load_scorers(args, metrics, device, dtype)


def prepare_item(item, scorers):
    """Worker: decode one image and preprocess it once per distinct pipeline (ImageReward and aesthetic share)."""
    folder, row = item
    path = Path(folder) / row["file_name"]
    if not path.is_file():
        return Prepared(None, "missing file")
    image = decode_image(str(path))
    if image is None:
        return Prepared(None, "unreadable image")
    cache, out = {}, {}
    try:
        for m, s in scorers.items():
            if s.prep_key not in cache:
                cache[s.prep_key] = s.prepare(image)
            out[m] = cache[s.prep_key]
    except Exception as e:  # e.g. a degenerate 1-pixel-wide image: skip it like an unreadable one
        return Prepared(None, f"cannot preprocess ({type(e).__name__}: {e})")
    return Prepared(out, None)


def score_batch(good, scorers, metrics):
    """[(Item, pixels)] -> their scores.jsonl rows: every metric on the whole batch at once."""
    prompts = [item.row["prompt"] for item, _ in good]
    scores = {m: scorers[m](torch.stack([pixels[m] for _, pixels in good]), prompts).cpu().tolist() for m in metrics}
    return [
        {
            "model": item.folder.name,
            "prompt_index": item.row["prompt_index"],
            "image_index": item.row["image_index"],
            "prompt": item.row["prompt"],
            "file_name": item.row["file_name"],
            "seed": item.row.get("seed"),
            **{m: scores[m][i] for m in metrics},
        }
        for i, (item, _) in enumerate(good)
    ]


def score_images(todo, scorers, metrics, args, scores_path, skipped):
    """Score `todo` [Item] batch by batch, appending each batch's rows to scores.jsonl (a killed run keeps them);
    workers decode the next batch meanwhile. Unreadable images go to skipped[model]. Returns the new rows."""
    batches = [todo[i : i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    new = []
    t0, n_scored = time.time(), 0
    with ThreadPoolExecutor(max(1, args.num_workers)) as pool, open(scores_path, "a") as f:
        futures = [pool.submit(prepare_item, it, scorers) for it in batches[0]] if batches else []
        for bi, batch in enumerate(batches):
            results = [fut.result() for fut in futures]
            if bi + 1 < len(batches):
                futures = [pool.submit(prepare_item, it, scorers) for it in batches[bi + 1]]
            good = []
            for item, prepared in zip(batch, results):
                if prepared.pixels is None:
                    skipped[item.folder.name].append({"file_name": item.row["file_name"], "reason": prepared.why})
                    print(
                        f"warning: {item.folder / item.row['file_name']}: {prepared.why}, skipped",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    good.append((item, prepared.pixels))
            if not good:
                continue
            rows = score_batch(good, scorers, metrics)
            new += rows
            f.writelines(json.dumps(rec) + "\n" for rec in rows)
            f.flush()
            n_scored += len(good)
            if bi % 20 == 0 or bi == len(batches) - 1:
                rate = n_scored / max(time.time() - t0, 1e-9)
                print(f"batch {bi + 1}/{len(batches)}: {n_scored} images scored ({rate:.1f}/s)", flush=True)
    return new


def aggregation_text(metrics, n):
    """summary.json's "aggregation": how each figure was computed, in words."""
    return {
        "best_of_n": f"{selection_label(metrics, n)} (the paper's and the model card's): per prompt, the image "
        f"with the highest plain mean of its raw {', '.join(metrics)} scores (ties: the lowest "
        "image_index); that image's score of each metric; then over prompts: mean, median, std",
        "per_metric_max_of_n": "per prompt, each metric's own maximum over its images (possibly of different "
        "images; not the model card's best of N); then over prompts: mean, median, std",
        "mean": "per prompt, the mean over its images; then over prompts: mean, median, std (ddof=0)",
        "average": f"{average_label(metrics)}: for each figure (best_of_n, best_of_n_median, mean, median, "
        "per_metric_max_of_n), the plain mean of that figure over the metrics",
        "win_rates": "per metric: the fraction of prompts shared with the baseline where the model's per-prompt "
        "mean over its images is higher, ties count half; 'average': of the raw mean of the "
        "metrics",
        "win_rates_best_of_n": "the same on the best_of_n images: each model's selected image per prompt",
    }


def summarize(rows_by_model, inputs, metrics, hps_version, skipped, weights, mp):
    """summary.json: per model and metric the aggregates, their average over the metrics, the win rates against
    the baseline (on per-prompt means and on the best-of-N images), which image the best of N took, and counts."""
    models, baseline = inputs.models, inputs.baseline
    summary = {m: {metric: aggregate(rows_by_model[m], metric, metrics) for metric in metrics} for m in models}
    n = max((summary[m][metric]["images_per_prompt"][1] for m in models for metric in metrics), default=0)
    selected = {}  # which image the best of N took, per model and prompt_index (to look at it, or to check it)
    for m in models:
        picked = sorted(select_best_of_n(rows_by_model[m], metrics).items(), key=lambda kv: kv[0][0])
        selected[m] = {str(key[0]): r["image_index"] for key, r in picked}
    counts = {
        m: {
            "images_listed": len(inputs.metadata[m]),
            "images_scored": len(rows_by_model[m]),
            "images_skipped": len(skipped[m]),
            "skipped": skipped[m],
        }
        for m in models
    }
    return {
        "models": models,
        "metrics": metrics,
        "hps_version": hps_version,
        "baseline": baseline,
        "summary": summary,
        "average": {m: average_scores(summary[m], metrics) for m in models},
        "win_rates": win_rates(rows_by_model, baseline, metrics, on="mean"),
        "win_rates_best_of_n": win_rates(rows_by_model, baseline, metrics, on="best_of_n"),
        "best_of_n_selection": {
            "label": selection_label(metrics, n),
            "metrics": metrics,
            "image_index_by_prompt_index": selected,
        },
        "counts": counts,
        "weights": weights,
        "mixed_precision": mp,
        "same_seeds_as_baseline": {
            m: same_seeds(rows_by_model[baseline], rows_by_model[m]) for m in models if m != baseline
        },
        "aggregation": aggregation_text(metrics, n),
    }


def write_tables(out, report):
    """summary.json and summary.md (the model card's table and the win rates)."""
    write_json_atomic(out / "summary.json", report)
    (out / "summary.md").write_text(
        markdown_summary(
            report["summary"],
            report["models"],
            report["metrics"],
            report["baseline"],
            report["win_rates"],
            report["hps_version"],
            report["average"],
            report["win_rates_best_of_n"],
        )
    )


def main(argv=None):
    args = parse_args(argv)
    metrics = check_settings(args)
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
    scorers = load_all_scorers(args, metrics, device, dtype)
    done = {(r["model"], r["file_name"]) for r in kept}
    todo = [
        Item(folder, r)
        for folder in inputs.dirs
        for r in inputs.metadata[folder.name]
        if (folder.name, r["file_name"]) not in done
    ]
    skipped = {m: [] for m in inputs.models}
    print(
        f"scoring {len(todo)} images ({len(done)} already scored) from {len(inputs.models)} model(s) with "
        f"{', '.join(metrics)} on {device} ({mp})",
        flush=True,
    )
    rows = kept + score_images(todo, scorers, metrics, args, out / "scores.jsonl", skipped)

    # Aggregate, compare with the baseline, write the tables.
    rows_by_model = {m: [r for r in rows if r["model"] == m] for m in inputs.models}
    weights = {m: s.weights for m, s in scorers.items()}
    report = summarize(rows_by_model, inputs, metrics, args.hps_version, skipped, weights, mp)
    write_tables(out, report)
    for folder in inputs.dirs:
        fill_model_card(folder, inputs.metadata[folder.name], report, out)
    counts = {m: {k: v for k, v in c.items() if k != "skipped"} for m, c in report["counts"].items()}
    write_json_atomic(out / "run_config.json", run_config("evaluate", args, **config, weights=weights, counts=counts))
    print((out / "summary.md").read_text())
    n_skipped = sum(len(v) for v in skipped.values())
    print(
        f"wrote {out}/scores.jsonl, summary.json, summary.md, run_config.json"
        + (f" ({n_skipped} unreadable image(s) skipped, listed in summary.json)" if n_skipped else "")
    )


# the line train_spin.py writes into a model card where the evaluation goes (the same constant there)
CARD_EVALUATION = "<!-- evaluation: evaluate.py fills this section when it scores this model -->"
CARD_METRICS = {"hps": "HPS", "aesthetic": "Aesthetic", "imagereward": "Image Reward", "pickscore": "Pickapic Score"}


def card_table(summary, model, metrics, n_images, source):
    """The released cards' evaluation table for one model: per metric, best of N (the paper's selection), the mean
    and the median over prompts of the per-prompt means."""
    lines = [
        f"Scored by evaluate.py on {source} ({n_images} images per prompt).",
        "",
        f"| Metric | Best of {n_images} | Mean | Median |",
        "|---|---|---|---|",
    ]
    for m in metrics:
        s = summary[model][m]
        lines.append(
            f"| {CARD_METRICS.get(m, m)} | {s['best_of_n']['mean']:.2f} | {s['mean']['mean']:.2f} | "
            f"{s['mean']['median']:.2f} |"
        )
    return "\n".join(lines)


def fill_model_card(folder, rows, report, out):
    """The sampled model's folder (sample.py's run_config.json names it) holds a model card written by train_spin.py:
    its evaluation section gets this model's table. Other models (a hub id, base) have no card to fill."""
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
    per_prompt = {}
    for r in rows:
        per_prompt[r["prompt_index"]] = per_prompt.get(r["prompt_index"], 0) + 1
    n = max(per_prompt.values(), default=1)
    head, _, rest = text.partition(CARD_EVALUATION)
    tail = rest[rest.index("\n## ") :] if "\n## " in rest else "\n"
    table = card_table(report["summary"], folder.name, report["metrics"], n, f"the prompts of {out}")
    tmp = card.with_name(f"README.md.{os.getpid()}.tmp")
    tmp.write_text(f"{head}{CARD_EVALUATION}\n\n{table}\n{tail}")
    os.replace(tmp, card)


# ---- plumbing: image folders in, weights files by hub id or local path ----
def natural_key(name):
    """iter_2 sorts before iter_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_model_dirs(paths):
    """Image folders (with metadata.jsonl) from the arguments: a folder itself, or every such subfolder of it."""
    dirs = []
    for p in map(Path, paths):
        if (p / "metadata.jsonl").is_file():
            dirs.append(p)
        elif p.is_dir() and any((sub / "metadata.jsonl").is_file() for sub in p.iterdir() if sub.is_dir()):
            subs = [sub for sub in p.iterdir() if (sub / "metadata.jsonl").is_file()]
            dirs += sorted(subs, key=lambda s: natural_key(s.name))
        elif not p.exists():
            raise UserError(f"{p}: no such folder")
        else:
            raise UserError(
                f"{p}: no metadata.jsonl there (nor in any subfolder); pass a folder written by "
                "sample.py or generate.py"
            )
    names = [d.name for d in dirs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two image folders have the same name {dup}: the model name is the folder name")
    if not dirs:
        raise UserError("no image folders given: pass one or more folders with metadata.jsonl")
    return dirs


def read_metadata(folder):
    rows = read_jsonl(Path(folder) / "metadata.jsonl")
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("file_name", "prompt", "prompt_index", "image_index") if k not in row]
        if missing:
            raise UserError(f"{folder}/metadata.jsonl line {i}: missing {missing}")
    if not rows:
        raise UserError(f"{folder}/metadata.jsonl lists no images")
    return rows


def is_local(spec):
    return spec.startswith((".", "/", "~")) or Path(spec).exists()


def resolve_file(spec, default_name, flag):
    """A local path for a weights file: a local file, a local folder (+ default_name), or a hub id
    'owner/repo' (+ default_name) or 'owner/repo/path/in/repo', downloaded with huggingface_hub."""
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
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{flag} {spec}: could not get {filename} from the hub repo {repo}: {msg}") from None


def sibling_spec(spec, name):
    """The spec of `name` beside the file/folder/hub repo `spec` (med_config.json beside ImageReward.pt)."""
    if is_local(spec):
        p = Path(spec).expanduser()
        return str((p if p.is_dir() else p.parent) / name)
    return "/".join(spec.split("/")[:2] + [name])


def torch_load(path, flag):
    """Never unpickle code: weights_only=True. The aesthetic .pth holds CUDA tensors, hence map_location."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{flag} {path}: cannot load it as a torch checkpoint ({msg})") from None


def from_pretrained(cls, spec, flag, **kwargs):
    """transformers from_pretrained with one-line errors; missing weights are an error, not a random init."""
    check_model_path(spec, flag)
    try:
        out = cls.from_pretrained(spec, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {spec}: {str(e).splitlines()[0]}") from None
    if isinstance(out, tuple):  # (model, loading_info)
        model, info = out
        if info.get("missing_keys"):
            raise UserError(f"{flag} {spec}: weights missing for {describe_keys(info['missing_keys'])}")
        return model
    return out


def describe_keys(keys, n=4):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_strict(module, state_dict, what):
    """load_state_dict(strict=True), with missing / unexpected / mis-shaped keys as one readable line."""
    expected = module.state_dict()
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        parts = ([f"missing {describe_keys(missing)}"] if missing else []) + (
            [f"unexpected {describe_keys(unexpected)}"] if unexpected else []
        )
        raise UserError(f"{what}: checkpoint does not match the model: {'; '.join(parts)}")
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise UserError(f"{what}: checkpoint shapes do not match the model config: {describe_keys(bad, 2)}")
    module.load_state_dict(state_dict, strict=True)


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
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
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
