"""evaluate.py: preprocessing, key conversion, the four score formulas against independent forwards of the
original layouts, batching/truncation, aggregation, and the CLI's outputs and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from conftest import run_in_process

import evaluate as ev  # noqa: E402
import tiny  # noqa: E402
import tiny_scorers as ts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "the big blue squares on a painting", "a cat", "yellow triangle in the sky"]


def run_cli(*args, env=None):
    if env is None:  # the same cli()/main() path, in this process (conftest.run_in_process)
        return run_in_process("evaluate.py", *args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def assert_one_line_error(res, *fragments):
    assert res.returncode != 0, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.fixture(scope="session")
def w(tmp_path_factory):
    """Every tiny scorer, in its original layout, and the CLI flags that point evaluate.py at them."""
    built = ts.build_all(tmp_path_factory.mktemp("scorers"))
    built["flags"] += ["--device", "cpu"]  # and the default precision, which must be fp32 ("no")
    return built


@pytest.fixture(scope="session")
def scorers(w):
    """The scorers built by evaluate.py's own loaders (the same code the CLI runs)."""
    args = ev.parse_args(["x"] + w["flags"])
    return ev.load_scorers(args, list(ev.METRICS), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, wd, 3), dtype=np.uint8))
        for wd, h in [(96, 64), (64, 96), (224, 224), (300, 301)]
    ]


# ---- preprocessing ----
def test_resize_center_crop_is_openai_clip_transform():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8))  # w=600, h=400
    # torchvision Resize(224): shorter side 224, longer int(224 * 600 / 400) = 336; CenterCrop: round(112/2)=56
    want = img.resize((336, 224), Image.BICUBIC).crop((56, 0, 280, 224))
    want = (
        torch.tensor(np.asarray(want), dtype=torch.float32).permute(2, 0, 1) / 255
        - torch.tensor(ts.CLIP_MEAN)[:, None, None]
    ) / torch.tensor(ts.CLIP_STD)[:, None, None]
    got = ev.resize_center_crop(img)
    assert got.shape == (3, 224, 224) and torch.allclose(got, want, atol=1e-6)
    tall = Image.fromarray(rng.integers(0, 256, (301, 200, 3), dtype=np.uint8))  # int(224*301/200)=337 -> top 56
    want = tall.resize((224, 337), Image.BICUBIC).crop((0, 56, 224, 280))
    assert torch.allclose(ev.resize_center_crop(tall), ev.normalize(ev.pil_to_tensor(want)), atol=1e-6)
    square = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))  # no resampling at all
    assert torch.allclose(ev.resize_center_crop(square), ev.normalize(ev.pil_to_tensor(square)))


def test_resize_longest_pad_is_hps_transform():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (100, 301, 3), dtype=np.uint8))  # w=301, h=100
    got = ev.resize_longest_pad(img)
    # scale 224/301: h -> round(74.42) = 74, w -> 224; pad 150 rows: 75 on top, 75 below; zeros before Normalize
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
    body = F.interpolate(x[None], size=(74, 224), mode="bicubic", align_corners=False, antialias=True)[0]
    pad_value = (-torch.tensor(ts.CLIP_MEAN) / torch.tensor(ts.CLIP_STD))[:, None, None]
    assert got.shape == (3, 224, 224)
    assert torch.allclose(got[:, :75], pad_value.expand(3, 75, 224), atol=1e-6)
    assert torch.allclose(got[:, 149:], pad_value.expand(3, 75, 224), atol=1e-6)
    assert torch.allclose(got[:, 75:149], ev.normalize(body), atol=1e-6)
    tall = Image.fromarray(rng.integers(0, 256, (300, 150, 3), dtype=np.uint8))  # 112 wide: 56 + 56 columns
    got = ev.resize_longest_pad(tall)
    assert torch.allclose(got[:, :, :56], pad_value.expand(3, 224, 56), atol=1e-6)
    assert torch.allclose(got[:, :, 168:], pad_value.expand(3, 224, 56), atol=1e-6)
    square = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    assert torch.allclose(ev.resize_longest_pad(square), ev.normalize(ev.pil_to_tensor(square)))


# ---- key conversion ----
def test_open_clip_conversion_splits_qkv_and_transposes_projections():
    W = 8
    qkv = torch.arange(3 * W * W, dtype=torch.float32).reshape(3 * W, W)
    sd = {
        "module.transformer.resblocks.0.attn.in_proj_weight": qkv,
        "module.visual.transformer.resblocks.1.attn.in_proj_bias": torch.arange(3 * W, dtype=torch.float32),
        "module.text_projection": torch.randn(W, 4),
        "module.visual.proj": torch.randn(W, 5),
        "module.visual.transformer.resblocks.1.mlp.c_fc.weight": torch.randn(16, W),
        "module.something.else": torch.zeros(1),
    }
    out = ev.open_clip_to_transformers(sd)
    assert torch.equal(out["text_model.encoder.layers.0.self_attn.q_proj.weight"], qkv[:W])
    assert torch.equal(out["text_model.encoder.layers.0.self_attn.k_proj.weight"], qkv[W : 2 * W])
    assert torch.equal(out["text_model.encoder.layers.0.self_attn.v_proj.weight"], qkv[2 * W :])
    assert torch.equal(out["vision_model.encoder.layers.1.self_attn.v_proj.bias"], torch.arange(2 * W, 3 * W).float())
    assert torch.equal(out["text_projection.weight"], sd["module.text_projection"].T)
    assert torch.equal(out["visual_projection.weight"], sd["module.visual.proj"].T)
    assert "vision_model.encoder.layers.1.mlp.fc1.weight" in out
    assert "something.else" in out  # unknown keys survive, so the strict load reports them


def test_blip_conversion_names(w):
    vision, text, head = ev.blip_to_transformers(w["ir_sd"])
    assert all(k.startswith(("embeddings.", "encoder.")) for k in text)  # no key of neither model left over
    assert "embeddings.class_embedding" in vision and "post_layernorm.weight" in vision
    assert "encoder.layers.1.self_attn.projection.weight" in vision
    assert "encoder.layer.0.crossattention.self.key.weight" in text
    assert "embeddings.position_ids" not in text
    assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    cfg = ev.blip_vision_config(vision)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size, cfg.image_size, cfg.num_hidden_layers) == (
        128,
        2,
        32,
        224,
        2,
    )


# ---- each scorer equals an independent computation on the original layout ----
def test_hps_matches_open_clip_forward(w, scorers, images):
    s = scorers["hps"]
    pixels = torch.stack([ev.resize_longest_pad(im) for im in images])
    img, txt = ts.ref_open_clip(w["hps_sd"], pixels, ref_open_clip_tokenize(PROMPTS, w["hps_clip"]))
    want = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    got = s(torch.stack([s.prepare(im) for im in images]), PROMPTS)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert got.std() > 1e-3  # not a constant


def test_imagereward_matches_blip_forward(w, scorers, images):
    s = scorers["imagereward"]
    pixels = torch.stack([ev.resize_center_crop(im) for im in images])
    tok = s.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    raw = ts.ref_blip_reward(w["ir_sd"], w["med"], pixels, tok["input_ids"], tok["attention_mask"])
    want = (raw - 0.16717362830052426) / 1.0333394966054072
    got = s(torch.stack([s.prepare(im) for im in images]), PROMPTS)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert got.std() > 1e-4
    assert len(s.tokenizer) == w["med"]["vocab_size"]  # [DEC] and [ENC] added, as BLIP's init_tokenizer


def test_aesthetic_matches_clip_plus_original_head(w, scorers, images):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(w["aes_clip"])).eval()
    pixels = torch.stack([ev.resize_center_crop(im) for im in images])
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        want = ts.ref_head(w["head_sd"], emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True))
    got = scorers["aesthetic"](pixels, PROMPTS)
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_pickscore_matches_readme_computation(w, scorers, images):
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(w["pick"])).eval()
    processor = AutoProcessor.from_pretrained(str(w["pick"]))
    with torch.no_grad():
        im = processor(images=images, return_tensors="pt")
        tx = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        ie = model.visual_projection(model.vision_model(**im).pooler_output)
        te = model.text_projection(model.text_model(**tx).pooler_output)
        want = model.logit_scale.exp() * (F.normalize(ie, dim=-1) * F.normalize(te, dim=-1)).sum(-1)
    s = scorers["pickscore"]
    got = s(torch.stack([s.prepare(x) for x in images]), PROMPTS)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert abs(float(model.logit_scale.detach().exp()) - 40.0) < 1e-3  # the scale is applied, not a bare cosine


@pytest.mark.parametrize("metric", ev.METRICS)
def test_batched_equals_one_at_a_time(scorers, images, metric):
    s = scorers[metric]
    pixels = torch.stack([s.prepare(im) for im in images])
    batched = s(pixels, PROMPTS)
    single = torch.cat([s(pixels[i : i + 1], [PROMPTS[i]]) for i in range(len(images))])
    assert torch.allclose(batched, single, atol=1e-5), (batched, single)


def test_prompt_truncation(scorers, images):
    words = (["red", "blue", "cat", "dog", "sky"] * 20)[:60]
    ir = scorers["imagereward"]
    ids = ir.tokenizer(" ".join(words), padding="max_length", truncation=True, max_length=35)["input_ids"]
    assert len(ids) == 35 and ids[0] == ir.tokenizer.cls_token_id and ids[-1] == ir.tokenizer.sep_token_id
    px = ir.prepare(images[0])[None]
    assert torch.allclose(ir(px, [" ".join(words)]), ir(px, [" ".join(words[:33])]), atol=1e-6)
    assert not torch.allclose(ir(px, [" ".join(words)]), ir(px, [" ".join(words[:20])]), atol=1e-6)
    letters = " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(100))  # one token per letter
    short = " ".join(letters.split()[:75])
    for metric in ("hps", "pickscore"):
        s = scorers[metric]
        if metric == "hps":
            ids = s.tokenize([letters])[0].tolist()
            assert len(ids) == 77 and ids[-1] == s.tokenize.end and 0 not in ids
        else:
            tok = s.processor.tokenizer
            ids = tok(letters, truncation=True, max_length=77)["input_ids"]
            assert len(ids) == 77 and ids[-1] == tok.eos_token_id
        px = s.prepare(images[1])[None]
        assert torch.allclose(s(px, [letters]), s(px, [short]), atol=1e-5)


# ---- HPS prompts: open_clip's tokenize(), checked against an independent reference ----
# Prompts on which the Hugging Face CLIPTokenizer and open_clip disagree (or might): curly quotes, HTML entities
# (also double-escaped), mojibake, whitespace runs, a literal "!" (laion's pad token), "!!" (a merge), an empty
# prompt, a literal open_clip special, contractions and digits, and one longer than 77 tokens.
TRICKY_PROMPTS = [
    "A “Red” cat’s square",
    "cats &amp; dogs &amp;amp; the sky &lt;3",
    "cafÃ© on a SQUARE",
    "  a\tred \n\n circle\r\n  with   the  cat ",
    "a cat! the dog!!",
    "",
    "<end_of_text> red dogs",
    "it's 3 cats; aaaa aaa",
    "ÉCOLE ﬁne 日本 🙂",
    " ".join(["the red cat"] * 30),
]
OPEN_CLIP_PATTERN = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def ref_open_clip_tokenize(prompts, folder, length=77):
    """open_clip.tokenize() from its documented steps, written apart from evaluate.py: clean (ftfy, HTML unescaped
    twice, whitespace runs -> one space, lowercase), split with open_clip's pattern, byte-level BPE in the original
    paper's form (the word as space-separated symbols; the lowest-rank pair replaced everywhere with re.sub), ids
    from vocab.json, start/end tokens, truncated with the end token last, zero padding."""
    import html
    import re

    import ftfy
    import regex

    folder = Path(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [m for m in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if m]
    rank = {m: i for i, m in enumerate(merges)}
    char = tiny.bytes_to_unicode()
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    out = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        text = html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = [sot]
        for piece in regex.findall(OPEN_CLIP_PATTERN, text, regex.IGNORECASE):
            if piece in ("<start_of_text>", "<end_of_text>"):
                ids.append(sot if piece == "<start_of_text>" else eot)
                continue
            word = " ".join(char[b] for b in piece.encode("utf-8")) + "</w>"
            while True:
                sym = word.split(" ")
                found = [f"{a} {b}" for a, b in zip(sym, sym[1:]) if f"{a} {b}" in rank]
                if not found:
                    break
                best = min(found, key=rank.get)
                word = re.sub(r"(?<!\S)" + re.escape(best) + r"(?!\S)", best.replace(" ", ""), word)
            ids += [vocab[t] for t in word.split(" ")]
        ids.append(eot)
        if len(ids) > length:
            ids = ids[:length]
            ids[-1] = eot
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def test_clean_prompt_is_open_clip_cleaning():
    assert ev.clean_prompt("A “Red” cat’s") == 'a "red" cat\'s'  # ftfy straightens curly quotes
    assert ev.clean_prompt("cats &amp; dogs &amp;amp; birds &lt;3") == "cats & dogs & birds <3"
    assert ev.clean_prompt("cafÃ© latte") == "café latte"  # mojibake repaired
    assert ev.clean_prompt("  a\tred \n\n circle\r\n  with\u00a0 the  CAT ") == "a red circle with the cat"
    assert ev.clean_prompt("") == ""


def test_bpe_merges_lowest_rank_everywhere(w):
    tok = ev.OpenClipTokenizer(str(w["hps_clip"]))
    vocab = json.loads((w["hps_clip"] / "vocab.json").read_text(encoding="utf-8"))

    def bpe(word):
        return [vocab[t] for t in word]

    assert tok.word_ids("red") == bpe(["red</w>"])  # e d</w> first, then r ed</w>
    assert tok.word_ids("aaa") == bpe(["aaa</w>"])
    assert tok.word_ids("aaaa") == bpe(["aa", "a", "a</w>"])  # a a merged left to right, without overlap
    assert tok.word_ids("x") == bpe(["x</w>"])
    # by hand: 'a "red" cat!! café' -> a | " | red | " | cat | !! | café (c3 a9 -> Ã©)
    want = ["<|startoftext|>", "a</w>", '"</w>', "red</w>", '"</w>', "cat</w>", "!!</w>", "cafÃ©</w>", "<|endoftext|>"]
    ids = tok(["A “Red” cat!! cafÃ©"])[0].tolist()
    assert ids == [vocab[t] for t in want] + [0] * (77 - len(want))


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
def test_hps_tokenize_matches_reference(w, scorers, prompt):
    got = scorers["hps"].tokenize([prompt])
    want = ref_open_clip_tokenize([prompt], w["hps_clip"])
    assert got.dtype == torch.long and got.shape == (1, 77)
    assert got.tolist() == want.tolist()


def test_hps_tokenize_frames_like_open_clip(w, scorers):
    tok = scorers["hps"].tokenize
    vocab = json.loads((w["hps_clip"] / "vocab.json").read_text(encoding="utf-8"))
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert eot == max(vocab.values())  # as in CLIP: the end token has the largest id, where open_clip pools
    ids = tok(TRICKY_PROMPTS)
    assert ids.tolist() == ref_open_clip_tokenize(TRICKY_PROMPTS, w["hps_clip"]).tolist()  # batched = one by one
    assert ids[5].tolist() == [sot, eot] + [0] * 75  # the empty prompt
    long = ids[-1].tolist()
    assert long[0] == sot and long[-1] == eot and long.count(eot) == 1 and 0 not in long  # cut to 77, end kept
    bang = tok(["a!"])[0].tolist()
    assert bang[:4] == [sot, vocab["a</w>"], vocab["!</w>"], eot] and bang[4:] == [0] * 73  # "!" is no pad token


def test_hf_tokenizer_gives_other_ids(w, scorers):
    """Why HPS does not use the Hugging Face CLIPTokenizer of --hps_clip (docs/evaluate.md): on curly quotes, HTML
    entities, mojibake and a literal "!" (laion's pad token) its ids are not open_clip's."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(w["hps_clip"]))
    for prompt in ["A “Red” cat’s square", "cats &amp; dogs", "cafÃ© on a SQUARE", "a cat! the dog"]:
        ours = scorers["hps"].tokenize([prompt]).tolist()
        assert ours == ref_open_clip_tokenize([prompt], w["hps_clip"]).tolist()
        assert hf([prompt], padding="max_length", max_length=77, truncation=True)["input_ids"] != ours, prompt


def load_open_clip_tokenizer_module():
    """open_clip's tokenizer.py, loaded alone (the package's __init__ needs torchvision and timm); skip without it."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (a cross-check only: pip install --no-deps open_clip_torch)")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_alone", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod, path.parent / "bpe_simple_vocab_16e6.txt.gz"


def test_hps_tokenize_equals_open_clip_itself(w, tmp_path):
    """Cross-check with open_clip's own SimpleTokenizer: on the tiny vocabulary, and on CLIP's real 49408-token one
    (written out as vocab.json + merges.txt, the layout --hps_clip provides) with random prompts too."""
    import gzip
    import random

    oc, real_bpe = load_open_clip_tokenizer_module()
    merges = (w["hps_clip"] / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    with gzip.open(tmp_path / "tiny.txt.gz", "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(m for m in merges if m))  # no trailing newline: '' would be a merge
    ours = ev.OpenClipTokenizer(str(w["hps_clip"]))
    assert ours(TRICKY_PROMPTS).tolist() == oc.SimpleTokenizer(str(tmp_path / "tiny.txt.gz"))(TRICKY_PROMPTS).tolist()

    real = gzip.open(real_bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(tiny.bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in real]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (tmp_path / "real" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(real) + "\n", encoding="utf-8")
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), 0x2019, 0x201C, 0x201D, 0x1F642]] + [
        "\n",
        "\t",
        "&amp;",
        "&#39;",
        "Ã©",
        "  ",
        "'s",
        "!",
    ]
    prompts = TRICKY_PROMPTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))) for _ in range(200)]
    ours = ev.OpenClipTokenizer(str(tmp_path / "real"))
    assert ours(prompts).tolist() == oc.tokenize(prompts).tolist()


def hps_scorer(w, clip):
    args = ev.parse_args(
        ["x", *w["flags"], "--hps_checkpoint", str(w["dir"] / "HPS_v2_compressed.pt"), "--hps_clip", str(clip)]
    )
    return ev.HPS(args, torch.device("cpu"), torch.float32)


def test_hps_score_is_open_clip_path_and_pools_at_end_token(w, scorers, images, tmp_path):
    """The HPS score of tricky prompts equals open_clip's forward (tiny_scorers.py: its own state dict, pooled
    at ids.argmax) on the reference token ids; and it does not depend on the eos_token_id of the transformers
    config, where transformers would pool (first eos_token_id unless it is the legacy 2)."""
    prompts = TRICKY_PROMPTS
    pictures = [images[i % len(images)] for i in range(len(prompts))]
    pixels = torch.stack([ev.resize_longest_pad(im) for im in pictures])
    img, txt = ts.ref_open_clip(w["hps_sd"], pixels, ref_open_clip_tokenize(prompts, w["hps_clip"]))
    want = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    got = scorers["hps"](pixels, prompts)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    # the same weights with a config whose eos_token_id is another token ("a</w>"), or the legacy 2
    vocab = json.loads((w["hps_clip"] / "vocab.json").read_text(encoding="utf-8"))
    for eos in (vocab["a</w>"], 2):
        clip = tmp_path / f"clip_eos{eos}"
        clip.mkdir()
        for f in w["hps_clip"].iterdir():
            (clip / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((clip / "config.json").read_text())
        cfg["text_config"]["eos_token_id"] = eos
        (clip / "config.json").write_text(json.dumps(cfg))
        assert torch.allclose(hps_scorer(w, clip)(pixels, prompts), want, atol=1e-5), eos


def test_hps_tokenizer_files_are_checked(w, tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "vocab.json").write_text((w["hps_clip"] / "vocab.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ev.UserError, match="merges.txt"):
        ev.OpenClipTokenizer(str(clip))
    (clip / "merges.txt").write_text("#version: 0.2\nr e\nq z\n")  # "qz" is no token of the vocab
    with pytest.raises(ev.UserError, match="merges.txt does not match vocab.json.*qz"):
        ev.OpenClipTokenizer(str(clip))


# ---- precision ----
def test_precision_default_is_fp32(monkeypatch):
    with pytest.raises(ev.UserError, match="fp16 needs a GPU"):
        ev.pick_device(ev.parse_args(["x", "--mixed_precision", "fp16", "--device", "cpu"]))
    args = ev.parse_args(["x"])
    assert ev.pick_device(args)[1:] == ("no", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU too (hpsv2 alone autocasts; README)
    device, mp, dtype = ev.pick_device(ev.parse_args(["x"]))
    assert (device.type, mp, dtype) == ("cuda", "no", torch.float32)
    assert ev.pick_device(ev.parse_args(["x", "--mixed_precision", "fp32"]))[1:] == ("no", torch.float32)
    assert ev.pick_device(ev.parse_args(["x", "--mixed_precision", "bf16"]))[1:] == ("bf16", torch.bfloat16)
    assert ev.pick_device(ev.parse_args(["x", "--mixed_precision", "fp16"]))[1:] == ("fp16", torch.float16)


def test_bf16_towers_give_fp32_scores_that_move(w, scorers, images):
    """--mixed_precision bf16 runs the towers in bf16: the scores (normalisation, dot products, heads) come out in fp32
    and differ from the fp32 ones."""
    args = ev.parse_args(["x", *w["flags"], "--mixed_precision", "bf16"])
    device, mp, dtype = ev.pick_device(args)
    low = ev.load_scorers(args, list(ev.METRICS), device, dtype)
    for m in ev.METRICS:
        pixels = torch.stack([scorers[m].prepare(im) for im in images])
        got, want = low[m](pixels, PROMPTS), scorers[m](pixels, PROMPTS)
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), m
        assert not torch.equal(got, want), m


def test_load_strict_names_the_keys_that_do_not_fit():
    linear = torch.nn.Linear(3, 4)
    with pytest.raises(ev.UserError, match="x: checkpoint does not fit the model config: size mismatch for weight"):
        ev.load_strict(linear, {"weight": torch.zeros(4, 2), "bias": torch.zeros(4)}, "x")
    with pytest.raises(ev.UserError, match="x: checkpoint does not match the model: missing bias; unexpected extra"):
        ev.load_strict(linear, {"weight": torch.zeros(4, 3), "extra": torch.zeros(1)}, "x")


def test_head_keys_and_shapes_are_checked():
    sd = ts.head_state_dict(8)
    assert len(ev.head_layers(sd, 8, "x")) == 5
    with pytest.raises(ev.UserError, match="missing layers.7.bias"):
        ev.head_layers({k: v for k, v in sd.items() if k != "layers.7.bias"}, 8, "x")
    with pytest.raises(ev.UserError, match="unexpected layers.1.weight"):
        ev.head_layers({**sd, "layers.1.weight": torch.zeros(1)}, 8, "x")
    with pytest.raises(ev.UserError, match="layers.0"):
        ev.head_layers(sd, 9, "x")


# ---- aggregation ----
def rows(model, table):
    """table: {prompt_index: [scores]} -> score rows."""
    return [
        {
            "model": model,
            "prompt_index": p,
            "prompt": f"prompt {p}",
            "image_index": i,
            "seed": i,
            "file_name": f"p{p}_i{i}.png",
            "hps": s,
        }
        for p, scores in table.items()
        for i, s in enumerate(scores)
    ]


def test_aggregate_per_prompt_then_over_prompts():
    a = ev.aggregate(rows("m", {0: [1.0, 3.0], 1: [2.0, 2.0, 5.0], 2: [0.0]}), "hps", ["hps"])
    # per-prompt means 2, 3, 0; maxima 3, 5, 0 (one metric: the best-of-N image is the max)
    assert a["mean"]["mean"] == pytest.approx(5 / 3) and a["mean"]["median"] == pytest.approx(2.0)
    assert a["mean"]["std"] == pytest.approx(np.std([2, 3, 0]))
    for key in ("best_of_n", "per_metric_max_of_n"):
        assert a[key]["mean"] == pytest.approx(8 / 3) and a[key]["median"] == pytest.approx(3.0)
    assert (a["n_prompts"], a["n_images"], a["images_per_prompt"]) == (3, 6, [1, 3])
    empty = ev.aggregate([], "hps", ["hps"])
    assert empty["mean"]["mean"] is None and empty["best_of_n"]["mean"] is None and empty["n_prompts"] == 0


def test_win_rates_ties_half_and_common_prompts_only():
    by_model = {
        "base": rows("base", {0: [1.0, 1.0], 1: [2.0], 2: [3.0], 3: [9.0]}),
        "new": rows("new", {0: [0.0, 3.0], 1: [2.0], 2: [2.0], 4: [100.0]}),
    }
    # prompt 0: 1.5 > 1 win; 1: tie; 2: loss; 3 and 4 not shared
    out = ev.win_rates(by_model, "base", ["hps"])
    assert out["hps"]["new"] == {"win_rate": pytest.approx(0.5), "n_prompts": 3}
    assert "base" not in out["hps"]
    # on the best-of-N images (one metric: each prompt's max): prompt 0: 3 > 1 win; 1: tie; 2: loss
    assert ev.win_rates(by_model, "base", ["hps"], on="best_of_n")["hps"]["new"]["win_rate"] == pytest.approx(0.5)
    by_model["new"] = rows("new", {7: [1.0]})
    assert ev.win_rates(by_model, "base", ["hps"])["hps"]["new"] == {"win_rate": None, "n_prompts": 0}


# Four-metric tables where the paper's best of N (one image per prompt, by the raw mean of its four scores) and the
# per-metric maxima differ. Scores (hps, aesthetic, imagereward, pickscore) per image; dyadic values, so that sums and
# ties are exact. Per image, the raw mean of the four (of HPS, ImageReward, PickScore in brackets):
#   base p0: i0 25.5/4 [20.5/3]   i1 28.25/4 [22.25/3]  -> i1 [i1]
#        p1: i0 27.75/4 [20.75/3] i1 26.5/4 [22/3]      -> i0 [i1]
#        p2: i0 27.5/4 [21.5/3]   i1 27.5/4 [21.75/3]   -> i0 (a tie: the first image) [i1]
#   new  p0: i0 27.125/4          i1 27.625/4           -> i1
#        p1: i0 28.625/4          i1 26.125/4           -> i0
#        p2: i0 26.75/4           i1 29.5/4             -> i1 (the same with three metrics)
BASE = {
    0: [(0.5, 5.0, 0.0, 20.0), (0.25, 6.0, 1.0, 21.0)],
    1: [(0.25, 7.0, 0.5, 20.0), (0.5, 4.5, 1.5, 20.0)],
    2: [(0.25, 6.0, 0.25, 21.0), (0.5, 5.75, 0.25, 21.0)],
}
NEW = {
    0: [(0.375, 5.5, 0.75, 20.5), (0.375, 5.5, 0.25, 21.5)],
    1: [(0.125, 6.5, 2.0, 20.0), (0.625, 5.5, 0.0, 20.0)],
    2: [(0.25, 6.0, 0.5, 20.0), (0.5, 6.5, 0.5, 22.0)],
}
THREE = ["hps", "imagereward", "pickscore"]


def rows4(model, table):
    return [
        {
            "model": model,
            "prompt_index": p,
            "prompt": f"prompt {p}",
            "image_index": i,
            "seed": i,
            "file_name": f"p{p}_i{i}.png",
            **dict(zip(ev.METRICS, s)),
        }
        for p, images in table.items()
        for i, s in enumerate(images)
    ]


def test_best_of_n_picks_one_image_by_the_raw_mean():
    def picked(rs, metrics):
        return {k[0]: r["image_index"] for k, r in ev.select_best_of_n(rs, metrics).items()}

    base = rows4("base", BASE)
    assert picked(base, list(ev.METRICS)) == {0: 1, 1: 0, 2: 0}
    assert picked(base[::-1], list(ev.METRICS)) == {0: 1, 1: 0, 2: 0}  # the tie goes to image 0 in any row order
    assert picked(base, THREE) == {0: 1, 1: 1, 2: 1}  # only the metrics that were run pick
    assert picked(rows4("new", NEW), list(ev.METRICS)) == {0: 1, 1: 0, 2: 1}
    assert ev.image_average(base[0], list(ev.METRICS)) == 25.5 / 4  # raw scores, not standardised
    no_score = [dict(r, pickscore=None) if (r["prompt_index"], r["image_index"]) == (0, 1) else r for r in base]
    assert picked(no_score, list(ev.METRICS))[0] == 0  # an image missing a score is no candidate


def test_aggregates_by_hand():
    summary = {m: ev.aggregate(rows4("base", BASE), m, list(ev.METRICS)) for m in ev.METRICS}
    # best of 2: the images picked above (p0 i1, p1 i0, p2 i0); mean and median over the three prompts
    want_best = {
        "hps": ((0.25 + 0.25 + 0.25) / 3, 0.25),
        "aesthetic": ((6.0 + 7.0 + 6.0) / 3, 6.0),
        "imagereward": ((1.0 + 0.5 + 0.25) / 3, 0.5),
        "pickscore": ((21.0 + 20.0 + 21.0) / 3, 21.0),
    }
    # per-metric max of 2: each metric's own maximum per prompt
    want_max = {
        "hps": (0.5 + 0.5 + 0.5) / 3,
        "aesthetic": (6.0 + 7.0 + 6.0) / 3,
        "imagereward": (1.0 + 1.5 + 0.25) / 3,
        "pickscore": (21.0 + 20.0 + 21.0) / 3,
    }
    # per-prompt means, then their mean and median
    want_mean = {
        "hps": (0.375, 0.375),
        "aesthetic": ((5.5 + 5.75 + 5.875) / 3, 5.75),
        "imagereward": ((0.5 + 1.0 + 0.25) / 3, 0.5),
        "pickscore": ((20.5 + 20.0 + 21.0) / 3, 20.5),
    }
    for m in ev.METRICS:
        s = summary[m]
        assert (s["best_of_n"]["mean"], s["best_of_n"]["median"]) == pytest.approx(want_best[m]), m
        assert s["per_metric_max_of_n"]["mean"] == pytest.approx(want_max[m]), m
        assert (s["mean"]["mean"], s["mean"]["median"]) == pytest.approx(want_mean[m]), m
    assert summary["hps"]["best_of_n"]["mean"] != pytest.approx(summary["hps"]["per_metric_max_of_n"]["mean"])
    # with three metrics, p1 and p2 pick image 1: HPS (0.25 + 0.5 + 0.5) / 3, ImageReward (1 + 1.5 + 0.25) / 3
    three = {m: ev.aggregate(rows4("base", BASE), m, THREE) for m in THREE}
    assert three["hps"]["best_of_n"]["mean"] == pytest.approx(1.25 / 3)
    assert three["imagereward"]["best_of_n"]["mean"] == pytest.approx(2.75 / 3)


def test_average_column_by_hand():
    summary = {m: ev.aggregate(rows4("base", BASE), m, list(ev.METRICS)) for m in ev.METRICS}
    avg = ev.average_scores(summary, list(ev.METRICS))
    assert avg["label"] == "avg (4 metrics)" and avg["metrics"] == list(ev.METRICS)
    # the mean over the four metrics of each figure in test_aggregates_by_hand
    assert avg["best_of_n"] == pytest.approx((0.25 + 19 / 3 + 1.75 / 3 + 62 / 3) / 4)  # = (28.25+27.75+27.5)/12
    assert avg["best_of_n_median"] == pytest.approx((0.25 + 6.0 + 0.5 + 21.0) / 4)
    assert avg["mean"] == pytest.approx((0.375 + 17.125 / 3 + 1.75 / 3 + 61.5 / 3) / 4)
    assert avg["median"] == pytest.approx((0.375 + 5.75 + 0.5 + 20.5) / 4)
    assert avg["per_metric_max_of_n"] == pytest.approx((0.5 + 19 / 3 + 2.75 / 3 + 62 / 3) / 4)
    three = {m: ev.aggregate(rows4("base", BASE), m, THREE) for m in THREE}
    avg3 = ev.average_scores(three, THREE)
    assert avg3["label"] == "avg (3: HPS, ImageReward, PickScore)"
    assert avg3["best_of_n"] == pytest.approx((1.25 / 3 + 2.75 / 3 + 62 / 3) / 3)  # p0-p2 all image 1
    assert avg3["mean"] == pytest.approx((0.375 + 1.75 / 3 + 61.5 / 3) / 3)


def test_win_rates_on_means_and_on_best_of_n_by_hand():
    by_model = {"base": rows4("base", BASE), "new": rows4("new", NEW)}
    on_means = ev.win_rates(by_model, "base", list(ev.METRICS), on="mean")
    on_best = ev.win_rates(by_model, "base", list(ev.METRICS), on="best_of_n")
    # per-prompt means, new vs base (W win, T tie, L loss), per prompt p0 p1 p2:
    #   HPS all 0.375: T T T; aesthetic 5.5=5.5, 6>5.75, 6.25>5.875: T W W; ImageReward 0.5=0.5, 1=1, 0.5>0.25: T T W;
    #   PickScore 21>20.5, 20=20, 21=21: W T T; raw mean of the four (x8): 54.75>53.75, 54.75>54.25, 56.25>55: W W W
    want_means = {"hps": 1.5 / 3, "aesthetic": 2.5 / 3, "imagereward": 2 / 3, "pickscore": 2 / 3, ev.AVERAGE: 1.0}
    # the selected images, new (p0 i1, p1 i0, p2 i1) vs base (p0 i1, p1 i0, p2 i0):
    #   HPS .375>.25, .125<.25, .5>.25: W L W; aesthetic 5.5<6, 6.5<7, 6.5>6: L L W; ImageReward .25<1, 2>.5, .5>.25:
    #   L W W; PickScore 21.5>21, 20=20, 22>21: W T W; raw mean (x4) 27.625<28.25, 28.625>27.75, 29.5>27.5: L W W
    want_best = {"hps": 2 / 3, "aesthetic": 1 / 3, "imagereward": 2 / 3, "pickscore": 2.5 / 3, ev.AVERAGE: 2 / 3}
    for m, want in want_means.items():
        assert on_means[m]["new"] == {"win_rate": pytest.approx(want), "n_prompts": 3}, m
    for m, want in want_best.items():
        assert on_best[m]["new"] == {"win_rate": pytest.approx(want), "n_prompts": 3}, m


def summarise(by_model, metrics, hps_version="2.0"):
    """summary.md of these rows, through summarize (summary.json) as the CLI makes it."""
    rows = [r for model_rows in by_model.values() for r in model_rows]
    inputs = ev.Inputs([], list(by_model), by_model, "base")
    report = ev.summarize(rows, inputs, metrics, hps_version, {m: [] for m in by_model}, {}, "no")
    return ev.markdown_summary(report)


def test_markdown_table_has_the_model_card_shape():
    by_model = {
        "base": rows("base", {0: [0.2, 0.3], 1: [0.25, 0.27]}),
        "iter_1": rows("iter_1", {0: [0.3, 0.3], 1: [0.2, 0.2]}),
    }
    lines = summarise(by_model, ["hps"], "2.1").splitlines()
    header = next(ln for ln in lines if ln.startswith("| Metric"))
    assert header == (
        "| Metric | base best of 2 (by mean of 1) | base mean | base median | iter_1 best of 2 (by mean "
        "of 1) | iter_1 mean | iter_1 median |"
    )
    assert "| HPS v2.1 | 0.2850 | 0.2550 | 0.2550 | 0.2500 | 0.2500 | 0.2500 |" in lines
    assert "| HPS v2.1 | 0.500 |" in lines  # win rate: one win, one loss


def test_markdown_tables_by_hand():
    md = summarise({"base": rows4("base", BASE), "new": rows4("new", NEW)}, list(ev.METRICS))
    lines = md.splitlines()
    assert "| Metric | base best of 2 | base mean | base median | new best of 2 | new mean | new median |" in lines
    # base: the numbers of test_aggregates_by_hand; new: best of 2 = p0 i1, p1 i0, p2 i1
    assert "| HPS v2.0 | 0.2500 | 0.3750 | 0.3750 | 0.3333 | 0.3750 | 0.3750 |" in lines
    assert "| PickScore | 20.667 | 20.500 | 20.500 | 21.167 | 20.667 | 21.000 |" in lines
    assert "| avg (4 metrics) | 6.9583 | 6.7917 | 6.7812 | 7.1458 | 6.9062 | 6.9688 |" in lines
    assert (
        "| Metric | base best of 2 median | base per-metric max of 2 | new best of 2 median | new per-metric max "
        "of 2 |" in lines
    )
    assert "| ImageReward | 0.500 | 0.917 | 0.500 | 1.083 |" in lines
    assert md.count("| HPS v2.0 | 0.500 |") == 1 and md.count("| HPS v2.0 | 0.667 |") == 1  # the two win rates
    assert (
        md.index("on per-prompt means")
        < md.index("| HPS v2.0 | 0.500 |")
        < md.index("on the best-of-2 images")
        < md.index("| HPS v2.0 | 0.667 |")
    )
    assert "| avg (4 metrics) | 1.000 |" in lines and "| Aesthetic | 0.333 |" in lines
    three = summarise({"base": rows4("base", BASE), "new": rows4("new", NEW)}, THREE)
    assert "best of 2 by the mean of 3 metrics (HPS, ImageReward, PickScore)" in three
    assert "| base best of 2 (by mean of 3) |" in three and "| avg (3: HPS, ImageReward, PickScore) |" in three
    assert "| HPS v2.0 | 0.4167 |" in three  # p0-p2 all image 1


def test_hps_version_default_is_v2_0():
    assert ev.parse_args(["x"]).hps_version == "2.0"  # as the official hpsv2.score
    assert ev.HPS_FILES["2.0"] == "HPS_v2_compressed.pt"


# ---- the CLI end to end ----
@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples") / "samples"
    ts.build_image_folder(d / "base", PROMPTS, n_images=2, seed=10)
    ts.build_image_folder(d / "iter_1", PROMPTS[:3], n_images=2, seed=11, corrupt={(1, 0)})
    return d


@pytest.fixture(scope="session")
def cli_run(w, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    res = run_cli(samples, "--output_dir", out, "--batch_size", 3, *w["flags"])
    assert res.returncode == 0, res.stderr
    return out, res


def test_cli_outputs(cli_run, scorers, samples):
    out, res = cli_run
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 8 + 5  # iter_1: 6 listed, 1 unreadable
    for r in scores:
        assert {"model", "prompt_index", "image_index", "prompt", "file_name", "seed", *ev.METRICS} <= set(r)
    # CLI scores equal the in-process scorers on the same images
    for r in scores[:3] + scores[-2:]:
        img = Image.open(samples / r["model"] / r["file_name"]).convert("RGB")
        for m in ev.METRICS:
            s = scorers[m]
            assert r[m] == pytest.approx(float(s(s.prepare(img)[None], [r["prompt"]])[0]), abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == ["base", "iter_1"] and summary["hps_version"] == "2.0"  # the default
    assert summary["counts"]["iter_1"]["images_skipped"] == 1
    assert summary["counts"]["iter_1"]["skipped"][0]["file_name"] == "images/p0000001_i000.png"
    assert summary["counts"]["base"]["images_scored"] == 8
    assert summary["weights"]["hps"]["version"] == "2.0"
    assert summary["win_rates"]["pickscore"]["iter_1"]["n_prompts"] == 3
    assert summary["same_seeds_as_baseline"]["iter_1"] is True
    base = [r for r in scores if r["model"] == "base"]
    assert summary["summary"]["base"]["aesthetic"]["mean"]["mean"] == pytest.approx(
        np.mean([np.mean([r["aesthetic"] for r in base if r["prompt_index"] == p]) for p in range(4)])
    )
    # best of 2: per prompt the image with the larger sum of its four raw scores, then its scores
    chosen = [
        max((r for r in base if r["prompt_index"] == p), key=lambda r: sum(r[m] for m in ev.METRICS)) for p in range(4)
    ]
    assert [r["image_index"] for r in chosen] == [
        summary["best_of_n_selection"]["image_index_by_prompt_index"]["base"][str(p)] for p in range(4)
    ]
    for m in ev.METRICS:
        s = summary["summary"]["base"][m]
        assert s["best_of_n"]["mean"] == pytest.approx(np.mean([r[m] for r in chosen]))
        assert s["per_metric_max_of_n"]["mean"] == pytest.approx(
            np.mean([max(r[m] for r in base if r["prompt_index"] == p) for p in range(4)])
        )
    assert summary["average"]["base"]["best_of_n"] == pytest.approx(
        np.mean([sum(r[m] for m in ev.METRICS) / 4 for r in chosen])
    )
    assert summary["average"]["base"]["label"] == "avg (4 metrics)"
    assert summary["best_of_n_selection"]["label"] == "best of 2"
    assert summary["win_rates_best_of_n"]["average"]["iter_1"]["n_prompts"] == 3
    assert set(summary["aggregation"]) == {
        "best_of_n",
        "per_metric_max_of_n",
        "mean",
        "average",
        "win_rates",
        "win_rates_best_of_n",
    }
    md = (out / "summary.md").read_text()
    for name in (
        "HPS v2.0",
        "Aesthetic",
        "ImageReward",
        "PickScore",
        "base best of 2",
        "iter_1 median",
        "avg (4 metrics)",
        "base per-metric max of 2",
        "on per-prompt means",
        "on the best-of-2 images",
    ):
        assert name in md
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["stage"] == "evaluate" and cfg["scoring"]["hps_version"] == "2.0"
    assert summary["mixed_precision"] == "no" and cfg["scoring"]["mixed_precision"] == "no"  # fp32 by default
    assert cfg["scoring"]["hps_tokenization"] == "open_clip tokenize()"
    assert "p0000001_i000.png" in res.stderr and "error" not in res.stderr


def test_cli_resume_and_changed_settings(cli_run, w, samples):
    out, _ = cli_run
    before = (out / "scores.jsonl").read_text()
    res = run_cli(samples, "--output_dir", out, "--batch_size", 3, *w["flags"])
    assert res.returncode == 0, res.stderr
    assert "scoring 1 images (13 already scored)" in res.stdout  # only the unreadable one is retried
    assert (out / "scores.jsonl").read_text() == before
    res = run_cli(samples, "--output_dir", out, "--metrics", "hps", *w["flags"])
    assert_one_line_error(res, "other settings", "--overwrite")


def test_cli_single_folder_subset_of_metrics(w, samples, tmp_path):
    res = run_cli(
        "--image_dirs",
        samples / "iter_1",
        "--metrics",
        "aesthetic",
        "--metrics",
        "imagereward",
        "--output_dir",
        tmp_path,
        *w["flags"],
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"] == ["aesthetic", "imagereward"] and summary["models"] == ["iter_1"]
    row = json.loads((tmp_path / "scores.jsonl").read_text().splitlines()[0])
    assert "aesthetic" in row and "hps" not in row
    # the best of N is picked by the mean of the two metrics that ran, and says so
    label = "best of 2 by the mean of 2 metrics (Aesthetic, ImageReward)"
    assert summary["best_of_n_selection"]["label"] == label and label in (tmp_path / "summary.md").read_text()
    assert summary["average"]["iter_1"]["label"] == "avg (2: Aesthetic, ImageReward)"


def test_model_folders_in_natural_order(tmp_path):
    for name in ("iter_10", "iter_2", "base"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.jsonl").write_text("")
    assert [d.name for d in ev.find_model_dirs([tmp_path])] == ["base", "iter_2", "iter_10"]


# ---- bad input: one line on stderr, non-zero exit ----
def test_cli_folder_without_metadata(w, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(tmp_path / "empty", *w["flags"]), "no metadata.jsonl")


def test_cli_unknown_metric(samples, w):
    assert_one_line_error(run_cli(samples, "--metrics", "hps,clipscore", *w["flags"]), "clipscore")


def test_cli_missing_checkpoint_file(samples, w, tmp_path):
    flags = w["flags"] + ["--hps_checkpoint", str(tmp_path / "nope.pt")]
    assert_one_line_error(
        run_cli(samples, "--metrics", "hps", "--output_dir", tmp_path, *flags), "nope.pt", "not found"
    )


def test_cli_hps_checkpoint_missing_and_unexpected_keys(samples, w, tmp_path):
    vocab = w["hps_sd"]["token_embedding.weight"].shape[0]
    ts.build_tiny_hps(
        tmp_path / "bad.pt", vocab_size=vocab, drop="visual.ln_post.bias", extra={"visual.conv1.bias": torch.zeros(32)}
    )  # open_clip's conv1 has no bias
    res = run_cli(
        samples,
        "--metrics",
        "hps",
        "--output_dir",
        tmp_path / "a",
        *w["flags"],
        "--hps_checkpoint",
        tmp_path / "bad.pt",
    )
    assert_one_line_error(res, "missing vision_model.post_layernorm.bias", "unexpected visual.conv1.bias")


def test_cli_imagereward_unexpected_key(samples, w, tmp_path):
    bert_vocab = w["med"]["vocab_size"]
    ts.build_tiny_imagereward(tmp_path / "ir", vocab_size=bert_vocab, extra={"blip.itm_head.weight": torch.zeros(2)})
    res = run_cli(
        samples,
        "--metrics",
        "imagereward",
        "--output_dir",
        tmp_path / "o",
        *w["flags"],
        "--imagereward_checkpoint",
        tmp_path / "ir" / "ImageReward.pt",
    )
    assert_one_line_error(res, "unexpected blip.itm_head.weight")


def test_cli_hps_version_mismatch(samples, w, tmp_path):
    res = run_cli(samples, "--metrics", "hps", "--hps_version", "v2.1", "--output_dir", tmp_path, *w["flags"])
    assert_one_line_error(res, "HPS v2.0", "--hps_version is 2.1")


def test_loaders_use_weights_only(monkeypatch, tmp_path):
    """A checkpoint that pickles code is refused (torch.load(weights_only=True)), as a one-line UserError."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ev.UserError, match="cannot load it"):
        ev.torch_load(str(tmp_path / "evil.pt"), "--hps_checkpoint")


def test_scoring_a_trained_model_fills_its_model_card(w, samples, tmp_path):
    """A sample folder made from a train_spin.py output folder (sample.py's run_config.json names it): evaluate.py
    writes that model's table (best of N, mean, median per metric, as the released cards) into its README.md's
    evaluation section and leaves the rest of the card as it was."""
    import shutil

    import spin_extras  # train_spin.py --model_card writes the card with it

    model = tmp_path / "iter_1_model"
    model.mkdir()
    cfg = {
        "args": {
            "loss": "spin",
            "unet": None,
            "dataset": "pickapic",
            "split": "train",
            "learning_rate": 2e-5,
            "train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "lr_scheduler": "linear",
            "lr_warmup_steps": 200,
            "max_train_steps": 500,
            "beta": 5000.0,
            "lora_rank": None,
        },
        "model": {"pretrained_model_name_or_path": "base/model"},
        "global_step": 500,
    }
    card = spin_extras.model_card(cfg, "someone/iter1")
    (model / "README.md").write_text(card + "\n## Citation\n\nkept\n")
    folder = tmp_path / "samples" / "iter_1"
    shutil.copytree(samples / "iter_1", folder)
    made = json.loads((folder / "run_config.json").read_text()) if (folder / "run_config.json").is_file() else {}
    (folder / "run_config.json").write_text(json.dumps({**made, "model": {"unet": str(model)}}))
    res = run_cli(folder, "--output_dir", tmp_path / "eval", *w["flags"])
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["summary"]["iter_1"]
    text = (model / "README.md").read_text()
    assert text.startswith(card.split(ev.CARD_EVALUATION)[0]) and text.endswith("## Citation\n\nkept\n")
    s = summary["pickscore"]
    row = f"| Pickapic Score | {s['best_of_n']['mean']:.2f} | {s['mean']['mean']:.2f} | {s['mean']['median']:.2f} |"
    assert "| Metric | Best of 2 | Mean | Median |" in text and row in text and "Not evaluated yet" not in text
