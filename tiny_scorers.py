"""Tiny random scorers saved in the ORIGINAL checkpoint layouts, and independent reference forwards.

- CLIP folders (transformers CLIPModel + CLIPProcessor): PickScore, the aesthetic predictor's CLIP, and the
  config + tokenizer that HPS's weights are converted onto.
- HPS: an open_clip-layout ViT state dict saved as {"state_dict": ...} with torch.save.
- ImageReward: the BLIP layout (timm ViT + med.py BERT with cross-attention + mlp.layers.{0,2,4,6,7}) saved as
  ImageReward.pt, with med_config.json beside it, and a WordPiece bert tokenizer.
- The aesthetic head: layers.{0,2,4,6,7} saved as a .pth.

The reference forwards below read those original layouts directly with plain torch ops (no transformers), so
comparing evaluate.py's scores with them checks the key conversion, the config mapping and the formulas.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tiny import bytes_to_unicode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Tiny sizes: image 224 (the official preprocessing) with 32-pixel patches -> 49 patch tokens.
CLIP_TINY = dict(width=32, layers=2, heads=2, mlp=64, patch=32, image=224, embed=24)
VIT_TINY = dict(width=128, layers=2, mlp=256, patch=32, image=224)  # BLIP ViT: 64-wide heads -> 2 heads
BERT_TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
)
BERT_WORDS = [
    "a",
    "an",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "on",
    "of",
    "photo",
    "cat",
    "dog",
    "big",
    "small",
    "painting",
    "with",
    "and",
    "in",
    "sky",
    "##s",
    "##y",
]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


def _ln(g, prefix, dim, sd, w="weight", b="bias"):
    sd[f"{prefix}.{w}"] = 1.0 + _randn(g, dim)
    sd[f"{prefix}.{b}"] = _randn(g, dim)


def _linear(g, prefix, n_out, n_in, sd, bias=True, std=None):
    sd[f"{prefix}.weight"] = _randn(g, n_out, n_in, std=std or 1.0 / math.sqrt(n_in))
    if bias:
        sd[f"{prefix}.bias"] = _randn(g, n_out, std=0.05)


# ---- CLIP folders (PickScore, aesthetic CLIP, HPS config + tokenizer) ----
# A few BPE merges, in rank order, so that tokenisation is not one token per byte: overlapping candidates ("e d</w>"
# outranks "r e", so "red" is r + ed</w> before red</w>), a repeated pair ("a a"), a merge of the two UTF-8 bytes of
# "é" (c3 a9 -> "Ã©", what mojibake repair must produce), punctuation runs ("!!") and a contraction.
CLIP_MERGES = [
    "e d</w>",
    "r e",
    "r ed</w>",
    "c a",
    "a t</w>",
    "ca t</w>",
    "t h",
    "th e</w>",
    "a a",
    "aa a</w>",
    "Ã ©</w>",
    "ca f",
    "caf Ã©</w>",
    "! !</w>",
    "' s</w>",
    "s q",
    "sq u",
    "a r",
    "ar e</w>",
    "squ are</w>",
    "d o",
    "do g</w>",
    "b l",
    "bl u",
    "blu e</w>",
    "i n</w>",
]


def build_clip_tokenizer(path, merges=CLIP_MERGES, pad_token="<|endoftext|>"):
    """An offline byte-level CLIP tokenizer in the real layout: the 256 byte characters, the same with </w>, one
    token per merge (in merge order), then <|startoftext|> and <|endoftext|> (the largest id, as in CLIP).
    pad_token "!" is laion's CLIP-ViT-H-14 tokenizer (the HPS and PickScore one)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(path), model_max_length=77, pad_token=pad_token)
    tok.save_pretrained(str(path))
    return tok


def build_tiny_clip(
    path, seed=0, projection_dim=CLIP_TINY["embed"], logit_scale=math.log(40.0), pad_token="<|endoftext|>"
):
    """A transformers CLIPModel folder with a CLIPProcessor (CLIP image processor + byte-level tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tok = build_clip_tokenizer(path, pad_token=pad_token)
    c = CLIP_TINY
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=c["width"],
            intermediate_size=c["mlp"],
            num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"],
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=c["width"],
            intermediate_size=c["mlp"],
            num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"],
            image_size=c["image"],
            patch_size=c["patch"],
        ),
        projection_dim=projection_dim,
        logit_scale_init_value=logit_scale,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():  # make every weight non-trivial (LayerNorms are 1/0 at init)
        g = _g(seed + 1)
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(_randn(g, *p.shape))
    model.save_pretrained(str(path))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": c["image"]}, crop_size={"height": c["image"], "width": c["image"]}
        ),
        tokenizer=tok,
    )
    processor.save_pretrained(str(path))
    return path


# ---- HPS: open_clip layout ----
def build_tiny_hps(path, seed=0, vocab_size=None, prefix="", extra=None, drop=None):
    """Random open_clip CLIP weights for CLIP_TINY, saved as {"state_dict": sd} (optionally `module.`-prefixed,
    with extra or dropped keys for the error tests). Returns the (unprefixed) state dict."""
    g = _g(seed)
    c = CLIP_TINY
    W, E, grid = c["width"], c["embed"], c["image"] // c["patch"]
    sd = {}

    def blocks(p):
        for i in range(c["layers"]):
            b = f"{p}transformer.resblocks.{i}"
            _ln(g, f"{b}.ln_1", W, sd)
            sd[f"{b}.attn.in_proj_weight"] = _randn(g, 3 * W, W, std=W**-0.5)
            sd[f"{b}.attn.in_proj_bias"] = _randn(g, 3 * W, std=0.05)
            _linear(g, f"{b}.attn.out_proj", W, W, sd)
            _ln(g, f"{b}.ln_2", W, sd)
            _linear(g, f"{b}.mlp.c_fc", c["mlp"], W, sd)
            _linear(g, f"{b}.mlp.c_proj", W, c["mlp"], sd)

    sd["positional_embedding"] = _randn(g, 77, W)
    sd["text_projection"] = _randn(g, W, E, std=W**-0.5)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["token_embedding.weight"] = _randn(g, vocab_size, W)
    blocks("")
    _ln(g, "ln_final", W, sd)
    sd["visual.class_embedding"] = _randn(g, W)
    sd["visual.positional_embedding"] = _randn(g, grid * grid + 1, W)
    sd["visual.proj"] = _randn(g, W, E, std=W**-0.5)
    sd["visual.conv1.weight"] = _randn(g, W, 3, c["patch"], c["patch"], std=0.02)
    _ln(g, "visual.ln_pre", W, sd)
    blocks("visual.")
    _ln(g, "visual.ln_post", W, sd)
    saved = {prefix + k: v for k, v in sd.items() if k != drop}
    saved.update(extra or {})
    torch.save({"state_dict": saved}, path)
    return sd


def _heads_attention(q, k, v, n_heads, mask=None):
    B, Lq, D = q.shape
    d = D // n_heads
    q, k, v = (t.reshape(B, -1, n_heads, d).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        att = att + mask
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(B, Lq, D)


def ref_open_clip(sd, pixels, tokens, heads=CLIP_TINY["heads"], patch=CLIP_TINY["patch"]):
    """open_clip's CLIP forward on its own state dict: (image features, text features), unnormalised."""

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def resblocks(x, p, mask=None):
        i = 0
        while f"{p}transformer.resblocks.{i}.ln_1.weight" in sd:
            b = f"{p}transformer.resblocks.{i}"
            h = ln(x, b + ".ln_1")
            q, k, v = (h @ sd[b + ".attn.in_proj_weight"].T + sd[b + ".attn.in_proj_bias"]).chunk(3, -1)
            a = _heads_attention(q, k, v, heads, mask)
            x = x + a @ sd[b + ".attn.out_proj.weight"].T + sd[b + ".attn.out_proj.bias"]
            h = F.gelu(ln(x, b + ".ln_2") @ sd[b + ".mlp.c_fc.weight"].T + sd[b + ".mlp.c_fc.bias"])
            x = x + h @ sd[b + ".mlp.c_proj.weight"].T + sd[b + ".mlp.c_proj.bias"]
            i += 1
        return x

    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = resblocks(ln(x, "visual.ln_pre"), "visual.")
    image = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]

    L = tokens.shape[1]
    causal = torch.full((L, L), float("-inf")).triu(1)
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:L]
    x = ln(resblocks(x, "", causal), "ln_final")
    text = x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    return image, text


# ---- ImageReward: BLIP layout ----
def build_bert_tokenizer(path):
    """An offline WordPiece tokenizer in bert-base-uncased's format (vocab.txt)."""
    from transformers import BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS + list("bcdefghijklmnopqrstuvwxz")
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(path))
    return tok


def build_tiny_imagereward(folder, vocab_size, seed=0, extra=None, drop=None):
    """ImageReward.pt (bare state dict in the BLIP layout) + med_config.json in `folder`. Returns (sd, med)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = _g(seed)
    v, t = VIT_TINY, BERT_TINY
    Wv, Wt, grid = v["width"], t["hidden_size"], v["image"] // v["patch"]
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "model_type": "bert",
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
        **t,
    }  # encoder_width is overridden in code, as BLIP
    sd = {}
    p = "blip.visual_encoder."
    sd[p + "cls_token"] = _randn(g, 1, 1, Wv)
    sd[p + "pos_embed"] = _randn(g, 1, grid * grid + 1, Wv)
    _linear(g, p + "patch_embed.proj", Wv, 3 * v["patch"] ** 2, sd)
    sd[p + "patch_embed.proj.weight"] = sd[p + "patch_embed.proj.weight"].reshape(Wv, 3, v["patch"], v["patch"])
    for i in range(v["layers"]):
        b = f"{p}blocks.{i}"
        _ln(g, b + ".norm1", Wv, sd)
        _linear(g, b + ".attn.qkv", 3 * Wv, Wv, sd)
        _linear(g, b + ".attn.proj", Wv, Wv, sd)
        _ln(g, b + ".norm2", Wv, sd)
        _linear(g, b + ".mlp.fc1", v["mlp"], Wv, sd)
        _linear(g, b + ".mlp.fc2", Wv, v["mlp"], sd)
    _ln(g, p + "norm", Wv, sd)
    p = "blip.text_encoder."
    sd[p + "embeddings.position_ids"] = torch.arange(t["max_position_embeddings"]).expand((1, -1))
    sd[p + "embeddings.word_embeddings.weight"] = _randn(g, vocab_size, Wt, std=0.5)
    sd[p + "embeddings.position_embeddings.weight"] = _randn(g, t["max_position_embeddings"], Wt, std=0.5)
    _ln(g, p + "embeddings.LayerNorm", Wt, sd)
    for i in range(t["num_hidden_layers"]):
        b = f"{p}encoder.layer.{i}"
        for att, kv_in in (("attention", Wt), ("crossattention", Wv)):
            _linear(g, f"{b}.{att}.self.query", Wt, Wt, sd)
            _linear(g, f"{b}.{att}.self.key", Wt, kv_in, sd)
            _linear(g, f"{b}.{att}.self.value", Wt, kv_in, sd)
            _linear(g, f"{b}.{att}.output.dense", Wt, Wt, sd)
            _ln(g, f"{b}.{att}.output.LayerNorm", Wt, sd)
        _linear(g, f"{b}.intermediate.dense", t["intermediate_size"], Wt, sd)
        _linear(g, f"{b}.output.dense", Wt, t["intermediate_size"], sd)
        _ln(g, f"{b}.output.LayerNorm", Wt, sd)
    _linear(g, "blip.vision_proj", 16, Wv, sd)  # BLIP's contrastive projections: in the file, unused by the reward
    _linear(g, "blip.text_proj", 16, Wt, sd)
    sd.update(head_state_dict(Wt, seed + 7, prefix="mlp."))
    saved = {k: v for k, v in sd.items() if k != drop}
    saved.update(extra or {})
    torch.save(saved, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    return sd, med


def ref_blip_reward(sd, med, pixels, input_ids, attention_mask):
    """ImageReward.score on the BLIP-layout state dict (vit.py + med.py forward), before standardisation."""

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    # vision (timm ViT, pre-LN, LayerNorm eps 1e-6, 64-wide heads)
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[p + "pos_embed"]
    heads_v = x.shape[-1] // 64
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}"
        q, k, v = lin(ln(x, b + ".norm1", 1e-6), b + ".attn.qkv").chunk(3, -1)
        x = x + lin(_heads_attention(q, k, v, heads_v), b + ".attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + ".norm2", 1e-6), b + ".mlp.fc1")), b + ".mlp.fc2")
        i += 1
    image = ln(x, p + "norm", 1e-6)

    # text (BERT, post-LN) with cross-attention to every image token
    p, eps, heads_t = "blip.text_encoder.", med["layer_norm_eps"], med["num_attention_heads"]
    L = input_ids.shape[1]
    h = sd[p + "embeddings.word_embeddings.weight"][input_ids] + sd[p + "embeddings.position_embeddings.weight"][:L]
    h = ln(h, p + "embeddings.LayerNorm", eps)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    i = 0
    while f"{p}encoder.layer.{i}.attention.self.query.weight" in sd:
        b = f"{p}encoder.layer.{i}"
        a = _heads_attention(
            lin(h, b + ".attention.self.query"),
            lin(h, b + ".attention.self.key"),
            lin(h, b + ".attention.self.value"),
            heads_t,
            mask,
        )
        h = ln(lin(a, b + ".attention.output.dense") + h, b + ".attention.output.LayerNorm", eps)
        a = _heads_attention(
            lin(h, b + ".crossattention.self.query"),
            lin(image, b + ".crossattention.self.key"),
            lin(image, b + ".crossattention.self.value"),
            heads_t,
        )
        h = ln(lin(a, b + ".crossattention.output.dense") + h, b + ".crossattention.output.LayerNorm", eps)
        f = F.gelu(lin(h, b + ".intermediate.dense"))
        h = ln(lin(f, b + ".output.dense") + h, b + ".output.LayerNorm", eps)
        i += 1
    return ref_head({k[len("mlp.") :]: v for k, v in sd.items() if k.startswith("mlp.")}, h[:, 0])


# ---- MLP heads (ImageReward and aesthetic) ----
def head_state_dict(in_dim, seed=0, prefix="", hidden=(64, 16, 8, 4)):
    """layers.{0,2,4,6,7} of the original nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout,
    Linear, Linear), at toy width."""
    g = _g(seed)
    sd, dims = {}, (in_dim,) + tuple(hidden) + (1,)
    for idx, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        _linear(g, f"{prefix}layers.{idx}", n_out, n_in, sd, std=1.0 / math.sqrt(n_in))
    return sd


def ref_head(sd, x):
    """The original MLP class (ImageReward / improved-aesthetic-predictor), eval mode."""
    dims = [sd[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
    mlp = torch.nn.Module()  # the original MLP module: its Sequential is the attribute `layers`
    mlp.layers = torch.nn.Sequential(
        torch.nn.Linear(dims[0][1], dims[0][0]),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(dims[1][1], dims[1][0]),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(dims[2][1], dims[2][0]),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(dims[3][1], dims[3][0]),
        torch.nn.Linear(dims[4][1], dims[4][0]),
    )
    mlp.load_state_dict(sd)
    return mlp.eval().layers(x.float())[:, 0]


def build_aesthetic_head(path, in_dim, seed=0, **kw):
    sd = head_state_dict(in_dim, seed, **kw)
    torch.save(sd, path)
    return sd


# ---- image folders in the metadata.jsonl schema ----
def build_image_folder(path, prompts, n_images=2, size=(96, 64), seed=0, corrupt=(), prompt_offset=0):
    """<path>/images/p*_i*.png + metadata.jsonl as sample.py writes them; `corrupt` = (prompt, image) pairs."""
    path = Path(path)
    (path / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(path / "metadata.jsonl", "w") as f:
        for pi, prompt in enumerate(prompts):
            for ii in range(n_images):
                name = f"images/p{pi + prompt_offset:07d}_i{ii:03d}.png"
                if (pi, ii) in corrupt:
                    (path / name).write_bytes(b"not a png")
                else:
                    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path / name)
                f.write(
                    json.dumps(
                        {
                            "file_name": name,
                            "prompt": prompt,
                            "prompt_index": pi + prompt_offset,
                            "image_index": ii,
                            "seed": 1000 * pi + ii,
                        }
                    )
                    + "\n"
                )
    (path / "run_config.json").write_text(json.dumps({"stage": "sample"}))
    return path


def build_all(d):
    """Every tiny scorer in its original layout under `d`, and the evaluate.py flags that point at them."""
    d = Path(d)
    pick = build_tiny_clip(d / "pickscore", seed=1, pad_token="!")  # both laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    aes_clip = build_tiny_clip(d / "aes_clip", seed=2)  # openai/clip-vit-large-patch14 pads with <|endoftext|>
    hps_clip = build_tiny_clip(d / "hps_clip", seed=3, pad_token="!")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(hps_clip)))
    hps_sd = build_tiny_hps(d / "HPS_v2_compressed.pt", seed=4, vocab_size=vocab, prefix="module.")
    bert = build_bert_tokenizer(d / "bert")
    ir_sd, med = build_tiny_imagereward(d / "imagereward", vocab_size=len(bert) + 2, seed=5)
    head_sd = build_aesthetic_head(d / "aesthetic.pth", in_dim=CLIP_TINY["embed"], seed=6)
    flags = [
        "--pickscore_model",
        pick,
        "--pickscore_processor",
        pick,
        "--hps_checkpoint",
        d / "HPS_v2_compressed.pt",
        "--hps_clip",
        hps_clip,
        "--imagereward_checkpoint",
        d / "imagereward",
        "--imagereward_tokenizer",
        d / "bert",
        "--aesthetic_clip",
        aes_clip,
        "--aesthetic_head",
        d / "aesthetic.pth",
    ]
    return dict(
        dir=d,
        pick=pick,
        aes_clip=aes_clip,
        hps_clip=hps_clip,
        hps_sd=hps_sd,
        ir_sd=ir_sd,
        med=med,
        head_sd=head_sd,
        flags=[str(f) for f in flags],
    )


if __name__ == "__main__":  # python tiny_scorers.py DIR: build the demo's (random, meaningless) scorers
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from evaluate import quiet_known_noise  # the scripts' filter for known-harmless import messages

    quiet_known_noise()
    out = Path(sys.argv[1])
    flags = build_all(out)["flags"]
    (out / "evaluate_flags.txt").write_text("\n".join(flags) + "\n")
    print("\n".join(flags))
