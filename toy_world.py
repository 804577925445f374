#!/usr/bin/env python
"""toy_world.py: SPIN-Diffusion's central claim, offline on a CPU, through the real scripts.

Claim (arXiv 2402.10210): self-play moves the model toward the data distribution, further than supervised
fine-tuning (SFT) gets with the same compute. Here the "data distribution" is a procedural one we know exactly
(3 shapes x 4 colours on a light background, 32x32), the models are tiny (a VAE downsampling x4 trained here for
a few seconds, a frozen random CLIP text encoder, a ~0.8M-parameter UNet), and the distance to the data is a
Frechet distance per caption against held-out real images, measured on the pictures: each generated PNG is encoded
exactly as a real image is (image space; the sampler's own latents are scored too, as a second column). The full
record of results is docs/toy_world.md.

Everything is run through the command lines of generate.py and train_spin.py (as subprocesses), exactly as
spin_loop.sh runs them on SD-1.5, so the experiment is also an end-to-end check of those scripts.

    python toy_world.py --output_dir runs/toy            # whole experiment: world, theta_0, SPIN and SFT arms, FD table, plots
    python toy_world.py --output_dir runs/toy_ci --quick --check   # CI size; exits 1 if a check does not hold
    python toy_world.py --output_dir runs/toy --arm dpo  # an ablation arm (ARMS) in the same world
    python toy_world.py build --output_dir DIR           # only data + pipeline + theta_0 (for spin_loop.sh)
    python toy_world.py fd --world DIR --unet A --unet B --names a b   # FD table of any UNets in that world

Every stage is skipped when its output exists and is complete, so a rerun only redoes what is missing.
"""
import argparse
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: offline tokenizer, tiny UNet, draw_shape()

from train_spin import quiet_known_noise  # noqa: E402  (the scripts' filter for known-harmless import messages)

quiet_known_noise()

# ---------------------------------------------------------------------------------------------------------
# Configuration. FULL is the size docs/toy_world.md's tables come from; QUICK is the CI size (same world and recipe,
# fewer iterations). Everything a number in docs/toy_world.md depends on is here.
#
# Why guidance 7.5 and lr 1e-5 (issue 6's prototype used 3 and 1e-4; docs/toy_world.md has both runs):
# - theta_0's conditional model is already close to the data; classifier-free guidance at SD's usual 7.5 (the scale
#   the model card samples with) extrapolates past it. SFT trains the noise predictor and never sees the guided
#   samples; SPIN trains against the opponent's own guided samples, so it could close that gap: the claim under test.
#   In image space the gap theta_0 -> (real images through the decoder) is 1.5-3 FD, and SPIN 3 closes 11-51% of it.
# - At lr 1e-4 the SPIN loss reaches 0 within a few steps and the model over-optimises (FD jumps); at 1e-5 each
#   iteration still saturates the loss but moves the model a measured distance. Both arms use the same lr.
# - synthetic_latent "sampler": measured in image space on seeds 0-2, SPIN on the sampler's latents moved theta_0's
#   pictures toward the data on every seed, SPIN on the re-encoded images did not move them at all (docs/toy_world.md).
# ---------------------------------------------------------------------------------------------------------
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
CAPTIONS = [f"a {c} {s}" for s in SHAPES for c in COLOURS]  # 12 captions; their order defines prompt_index
RESOLUTION = 32   # pixels; the VAE downsamples x4, so latents are 4 x 8 x 8
POOL = 2          # the metric average-pools latents 2x2: 4 x 4 x 4 = 64 dimensions per image
EVAL_SEED = 1234  # initial noise of every evaluation sample: the same for every model (paired comparison)


@dataclasses.dataclass(frozen=True)
class Sizes:
    train_per_caption: int = 200   # real training images per caption (Pick-a-Pic rows)
    test_per_caption: int = 64     # held-out real images per caption (the metric's reference)
    vae_steps: int = 600           # VAE decoder training steps (batch 32): enough for recognisable decoded shapes
    train_encoder: bool = False    # True: train the whole VAE (an easier latent space; see train_vae)
    theta0_steps: int = 800        # theta_0: SFT from scratch
    theta0_batch: int = 64
    theta0_lr: float = 1e-3
    caption_dropout: float = 0.1   # theta_0 learns the empty prompt too, so classifier-free guidance works
    iterations: int = 3            # SPIN iterations (and SFT continuations with the same compute)
    steps: int = 100               # optimizer steps per iteration, both arms
    batch: int = 32                # pairs (SPIN) or images (SFT) per step
    lr: float = 1e-5               # both arms (1e-4 over-optimises SPIN here: the README has the runs)
    beta: float = 2000.0
    opponent_images: int = 32      # synthetic images per caption generated by the opponent each iteration
    eval_images: int = 64          # evaluation samples per caption (a 64-dim covariance needs >= 64)
    guidance: float = 7.5          # SD's usual scale, for the opponent and the evaluation: its bias is the gap (see below)
    sample_steps: int = 10         # DDIM steps, for the opponent and for the evaluation
    fine_steps: int = 50           # the final models are also evaluated with this many DDIM steps
    arm: str = "spin"              # which self-play arm runs beside SFT (ARMS below; the ablations of issue 14)
    synthetic_latent: str = "sampler"  # train_spin.py --synthetic_latent: sampler latent / PNG re-encoded (see above)
    independent_pair_noise: bool = False  # train_spin.py --independent_pair_noise (default: one t and noise per pair)


# The arms, at equal compute (iterations x steps optimizer steps of batch pairs each):
ARMS = {
    # self-play: theta_k generates, training starts from theta_k with theta_k as the frozen reference (the paper)
    "spin": "spin",
    # one run of iterations x steps steps against theta_0's samples, theta_0 as reference: Diffusion-DPO with the real
    # image as winner and theta_0's sample as loser (the paper says SPIN beats it from iteration 2)
    "dpo": "dpo",
    # self-play with a refreshed opponent (theta_k generates, training starts from theta_k) but theta_0 kept as the
    # reference: is it the moving reference or the fresh samples that matter?
    "spin_ref0": "ref0",
}
CHOICES = {"arm": tuple(ARMS), "synthetic_latent": ("sampler", "image")}


FULL = Sizes()
# CI: the same world (so a full run and a quick run of one seed share it) and arms, 2 iterations instead of 3 and no
# 50-step evaluation. Not smaller: a theta_0 trained half as long is not at its SFT plateau, fewer evaluation images
# (< 64 per caption) make the 64-dim covariances singular, and a shorter decoder training (the former 200 steps) lifts
# the image-space floor that every model's pictures pass through (seed 1: theta_0 11.19 with 200 steps, 9.00 with 600).
QUICK = Sizes(iterations=2, fine_steps=0)


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------
def log(*a):
    print(*a, flush=True)


def write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs in one world (other arm settings) may both write
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


TIMINGS = {}  # output folder -> seconds its script took (this process); saved in timings.json of the world


def run_script(script, *args, threads=None):
    """Run one of the repo's scripts through its command line, offline; its output goes to our stdout.
    A failure stops the experiment with the script's own error line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    log("$ " + " ".join(cmd[1:]))
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    def lines(text):  # without progress bars
        return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]

    tail = lines(p.stderr) if p.returncode else (lines(p.stdout) or lines(p.stderr))
    if p.returncode != 0:
        sys.stderr.write("\n".join(tail[-30:]) + "\n")
        raise SystemExit(f"error: {script} failed (exit {p.returncode})")
    if tail:
        log("  " + tail[-1])
    seconds = round(time.time() - t0, 1)
    if "--output_dir" in args:
        TIMINGS[str(args[args.index("--output_dir") + 1])] = seconds
    return seconds


# ---------------------------------------------------------------------------------------------------------
# The world: data
# ---------------------------------------------------------------------------------------------------------
def draw(caption, rng):
    """One real image of `caption` ("a {colour} {shape}"): tests/tiny.py's draw_shape with its jitter."""
    import tiny

    _, colour, shape = caption.split()
    return tiny.draw_shape(shape, colour, RESOLUTION, rng)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: JPEG ringing would be part of the "data distribution"
    return buf.getvalue()


def write_pickapic(path, per_caption, seed, split_id):
    """A Pick-a-Pic-format parquet file: the real image is labelled 1; the other image is the same colour
    drawn as the next shape (labelled 0), so the file is also usable for Diffusion-DPO. Rows cycle over the
    captions in CAPTIONS order, so the unique prompts come out in that order (prompt_index = CAPTIONS index)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(per_caption * len(CAPTIONS)):
        cap = CAPTIONS[i % len(CAPTIONS)]
        rng = np.random.default_rng([seed, split_id, i])
        _, colour, shape = cap.split()
        real = png_bytes(draw(cap, rng))
        other = png_bytes(draw(f"a {colour} {SHAPES[(SHAPES.index(shape) + 1) % 3]}", rng))
        win = i % 2  # the real image alternates between jpg_0 and jpg_1, as preferred images do in Pick-a-Pic
        imgs, labels = [other, other], [0.0, 0.0]
        imgs[win], labels[win] = real, 1.0
        rows["caption"].append(cap)
        rows["jpg_0"].append(imgs[0])
        rows["jpg_1"].append(imgs[1])
        rows["label_0"].append(labels[0])
        rows["label_1"].append(labels[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows), str(tmp))
    os.replace(tmp, path)


def real_images(path):
    """[(caption, RGB PIL)] of a Pick-a-Pic parquet file (the image labelled 1)."""
    import pyarrow.parquet as pq

    from train_spin import decode_image

    t = pq.read_table(str(path)).to_pydict()
    return [(c, decode_image(j0 if l0 > l1 else j1))
            for c, j0, j1, l0, l1 in zip(t["caption"], t["jpg_0"], t["jpg_1"], t["label_0"], t["label_1"])]


# ---------------------------------------------------------------------------------------------------------
# The world: models
# ---------------------------------------------------------------------------------------------------------
def train_vae(images, steps, seed, train_encoder=False, kl_weight=1e-4, batch=32, lr=2e-3):
    """A tiny AutoencoderKL (x4 downsampling, 4 latent channels, random init from `seed`).

    Default: the encoder stays random and frozen (it defines the latent space the diffusion model and the metric
    live in, as a random VAE would) and only the decoder is trained for `steps` steps, so that samples decode
    into pictures a reader can judge; the experiment itself never sees the decoder. train_encoder=True trains the
    whole VAE (reconstruction + small KL): a much easier latent space, where theta_0 is already close to the data
    and SPIN at these settings over-optimises (see the README). scaling_factor makes the training latents unit-std,
    as SD's 0.18215 does."""
    import torch
    from diffusers import AutoencoderKL

    from train_spin import preprocess_image

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=RESOLUTION)
    x = torch.stack([preprocess_image(img, RESOLUTION) for img in images])

    def encode_all():
        with torch.no_grad():
            return torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])

    frozen = None if train_encoder else encode_all()
    params = vae.parameters() if train_encoder else [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        if train_encoder:
            post = vae.encode(x[idx]).latent_dist
            rec = vae.decode(post.sample()).sample
            loss = (rec - x[idx]).pow(2).mean() + kl_weight * post.kl().mean() / x[0].numel()
        else:
            loss = (vae.decode(frozen[idx]).sample - x[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"  vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    mean = encode_all()
    with torch.no_grad():
        rec = torch.cat([vae.decode(mean[i:i + 256]).sample for i in range(0, len(mean), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return vae, float((rec - x).pow(2).mean())


def build_pipeline(path, vae, seed):
    """Save a StableDiffusionPipeline folder (as SD-1.5 is laid out): our VAE, a frozen random CLIP text
    encoder with the offline byte-level tokenizer, a random tiny UNet (theta_0 is trained from it), DDIM."""
    import shutil

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    import tiny

    torch.manual_seed(seed)
    tokenizer = tiny.build_clip_tokenizer(path / "_tokenizer_build")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32))
    unet = tiny.tiny_unet(seed, sample_size=RESOLUTION // 4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    shutil.rmtree(path / "_tokenizer_build", ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return sum(p.numel() for p in unet.parameters())


def encode_real(pipeline, parquet):
    """Held-out / training real images -> scaled VAE latents, exactly as train_spin.py encodes real data
    (the same functions): {caption: [n, 4, 8, 8] float32}."""
    import torch
    from diffusers import AutoencoderKL

    from train_spin import encode_images, preprocess_image

    vae = AutoencoderKL.from_pretrained(str(pipeline), subfolder="vae").eval()
    out = {}
    items = real_images(parquet)
    for cap in CAPTIONS:
        x = torch.stack([preprocess_image(img, RESOLUTION) for c, img in items if c == cap])
        out[cap] = torch.cat([encode_images(vae, x[i:i + 256]) for i in range(0, len(x), 256)])
    return out


# ---------------------------------------------------------------------------------------------------------
# The metric: per-caption Frechet distance in 2x2-pooled latent space
# ---------------------------------------------------------------------------------------------------------
def sqrtm_psd(a):
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh; negative rounding clipped)."""
    import numpy as np

    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)). tr (C1 C2)^(1/2) = tr (C1^(1/2) C2 C1^(1/2))^(1/2): the
    inner matrix is symmetric PSD, so two eigh calls do it, without scipy and without complex rounding."""
    import numpy as np

    s1 = sqrtm_psd(cov1)
    cross = np.trace(sqrtm_psd(s1 @ cov2 @ s1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * cross)


def features(latents):
    """[n, 4, 8, 8] latents -> [n, 64] float64: 2x2 average pooling keeps layout and colour, and makes the
    dimension small enough for a covariance from ~64 samples."""
    import torch.nn.functional as F

    return F.avg_pool2d(latents.float(), POOL).flatten(1).double().numpy()


def gaussian(x):
    import numpy as np

    return x.mean(0), np.cov(x, rowvar=False)


def fd_per_caption(generated, reference):
    """{caption: FD} between two {caption: latents} dicts, over the captions of `reference`."""
    return {cap: frechet_distance(*gaussian(features(generated[cap])), *gaussian(features(reference[cap])))
            for cap in reference}


def fd_table_row(per_caption):
    import numpy as np

    vals = list(per_caption.values())
    return {"fd": float(np.mean(vals)), "per_caption": per_caption}


# ---------------------------------------------------------------------------------------------------------
# Image space. The FD above is computed on whatever latents it is given; which latents decides what it measures.
# The sampler's final latent (generate.py's latents/ file) is NOT what a user sees: the decoder discards part of it
# (seed 0: theta_0's sampled latents have 63% more neighbour-difference energy than real ones; the same samples
# decoded and re-encoded match the real statistics), and SPIN learns to remove exactly that energy, which halves the
# sampler-latent FD while the pictures' FD falls 4-17% (issue 14; docs/toy_world.md). So the FD is computed in
# image space: the PNG generate.py saved, encoded exactly as train_spin.py encodes a real image (preprocess_image +
# encode_images, the VAE posterior mean). The random frozen encoder is then a fixed random feature map of the picture, the same for
# real and generated images. The sampler-latent FD stays as a second column so the difference stays visible.
# ---------------------------------------------------------------------------------------------------------
_VAES = {}


def world_vae(pipeline):
    """The world's VAE (loaded once per process)."""
    from diffusers import AutoencoderKL

    key = str(pipeline)
    if key not in _VAES:
        _VAES[key] = AutoencoderKL.from_pretrained(key, subfolder="vae").eval()
    return _VAES[key]


def encode_pil(vae, images):
    """RGB PIL images -> scaled latents, with train_spin.py's own functions (what its real-data cache holds)."""
    import torch

    from train_spin import encode_images, preprocess_image

    x = torch.stack([preprocess_image(img, RESOLUTION) for img in images])
    return torch.cat([encode_images(vae, x[i:i + 256]) for i in range(0, len(x), 256)])


def to_pil(vae, latents):
    """Scaled latents -> RGB PIL images, decoded and quantised exactly as generate.py writes its PNGs."""
    import torch
    from PIL import Image

    with torch.no_grad():
        x = torch.cat([vae.decode(latents[i:i + 256] / vae.config.scaling_factor).sample for i in range(0, len(latents), 256)])
    pixels = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in pixels]


def folder_image_latents(folder, vae):
    """{caption: [n, 4, 8, 8]}: every PNG of a generate.py folder, encoded as a real image is."""
    from PIL import Image

    from train_spin import read_jsonl

    by = {}
    for r in read_jsonl(Path(folder) / "metadata.jsonl"):
        with Image.open(Path(folder) / r["file_name"]) as img:
            by.setdefault(r["prompt"], []).append(img.convert("RGB"))
    return {cap: encode_pil(vae, imgs) for cap, imgs in by.items()}


# ---------------------------------------------------------------------------------------------------------
# Stages. Each one returns at once when its output is already complete.
# ---------------------------------------------------------------------------------------------------------
WORLD_KEYS = ("train_per_caption", "test_per_caption", "vae_steps", "train_encoder", "theta0_steps", "theta0_batch", "theta0_lr",
              "caption_dropout")


def world_paths(d):
    d = Path(d)
    return {"dir": d, "pipeline": d / "pipeline", "train": d / "data" / "train.parquet", "test": d / "data" / "test.parquet",
            "theta0": d / "theta0", "cache": d / "cache", "real": d / "real_latents.safetensors", "json": d / "world.json"}


def check_world(p, seed, sizes):
    """A world folder is made with one seed and one set of world sizes: refuse to mix (use another folder)."""
    want = {"seed": seed, **{k: getattr(sizes, k) for k in WORLD_KEYS}}
    if p["json"].is_file():
        have = json.loads(p["json"].read_text()).get("settings", {})
        diff = [f"{k}: {have.get(k)!r} there, {v!r} now" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise SystemExit(f"error: {p['dir']} holds a world made with other settings ({'; '.join(diff)}): "
                             "use another --output_dir")
    return want


def train_args(p, *, unet, loss, steps, batch, lr, seed, output_dir, caption_dropout=0.0, beta=None, synthetic_dir=None,
               synthetic_latent=None, reference=None, independent_pair_noise=False):
    """train_spin.py's flags, the same for theta_0, SPIN and SFT: constant learning rate without warmup (the
    runs are short, and each SPIN iteration starts from a trained model), float32, no checkpoints."""
    a = ["--pretrained_model_name_or_path", p["pipeline"], "--dataset", p["train"], "--resolution", RESOLUTION,
         "--cache_dir", p["cache"], "--unet", unet, "--loss", loss, "--max_train_steps", steps, "--train_batch_size", batch,
         "--learning_rate", lr, "--lr_scheduler", "constant", "--lr_warmup_steps", 0, "--seed", seed,
         "--caption_dropout", caption_dropout, "--mixed_precision", "no", "--checkpointing_steps", 10**9,
         "--output_dir", output_dir]
    if beta is not None:
        a += ["--beta", beta]
    if synthetic_dir is not None:
        a += ["--synthetic_dir", synthetic_dir]
    if synthetic_latent is not None:
        a += ["--synthetic_latent", synthetic_latent]
    if reference is not None:
        a += ["--reference_unet", reference]
    if independent_pair_noise:
        a += ["--independent_pair_noise"]
    return a


def generate_args(p, *, unet, prompts, n, steps, guidance, seed, output_dir):
    return ["--pretrained_model_name_or_path", p["pipeline"], "--unet", unet, "--dataset", prompts,
            "--num_images_per_prompt", n, "--num_inference_steps", steps, "--guidance_scale", guidance,
            "--resolution", RESOLUTION, "--scheduler", "ddim", "--seed", seed, "--batch_size", 128,
            "--mixed_precision", "no", "--output_dir", output_dir]


def finished(train_dir):
    rc = Path(train_dir) / "run_config.json"
    return (Path(train_dir) / "unet" / "config.json").is_file() and rc.is_file() and json.loads(rc.read_text()).get("finished")


def build_world(out, seed, sizes, threads=1):
    """Data, pipeline (with its trained VAE) and theta_0 in `out`; world.json describes them."""
    import torch

    p = world_paths(out)
    settings = check_world(p, seed, sizes)
    p["dir"].mkdir(parents=True, exist_ok=True)
    times = json.loads(p["json"].read_text()).get("seconds", {}) if p["json"].is_file() else {}
    # Data: split ids 0/1 keep the held-out images independent of the training ones for the same seed.
    t0 = time.time()
    for key, per, split_id in (("train", sizes.train_per_caption, 0), ("test", sizes.test_per_caption, 1)):
        if not p[key].is_file():
            log(f"drawing {per * len(CAPTIONS)} {key} images -> {p[key]}")
            write_pickapic(p[key], per, seed, split_id)
    times.setdefault("data", round(time.time() - t0, 1))
    # Pipeline: VAE trained here, random text encoder and UNet.
    if not (p["pipeline"] / "model_index.json").is_file():
        t0 = time.time()
        torch.set_num_threads(threads)
        log(f"training the VAE {'' if sizes.train_encoder else 'decoder '}({sizes.vae_steps} steps) ...")
        vae, rec_mse = train_vae([img for _, img in real_images(p["train"])], sizes.vae_steps, seed, sizes.train_encoder)
        n_unet = build_pipeline(p["pipeline"], vae, seed)
        write_json(p["pipeline"] / "toy_world_vae.json", {"reconstruction_mse": rec_mse, "unet_parameters": n_unet,
                                                         "scaling_factor": vae.config.scaling_factor})
        times["pipeline"] = round(time.time() - t0, 1)
        log(f"pipeline -> {p['pipeline']} (VAE reconstruction MSE {rec_mse:.4f} in [-1, 1] pixels, UNet {n_unet:,} parameters)")
    # theta_0: SFT from the pipeline's random UNet, with caption dropout so guidance has an unconditional model.
    if not finished(p["theta0"]):
        times["theta0"] = round(run_script("train_spin.py", *train_args(
            p, unet="base", loss="sft", steps=sizes.theta0_steps, batch=sizes.theta0_batch, lr=sizes.theta0_lr,
            seed=seed, caption_dropout=sizes.caption_dropout, output_dir=p["theta0"]), threads=threads), 1)
    # Real latents for the metric (and its floor), encoded as train_spin.py encodes them.
    if not p["real"].is_file():
        from safetensors.torch import save_file

        torch.set_num_threads(threads)
        tensors = {}
        for key in ("train", "test"):
            for i, (cap, lat) in enumerate(encode_real(p["pipeline"], p[key]).items()):
                tensors[f"{key}/{i}"] = lat.contiguous()
        tmp = p["real"].with_name(p["real"].name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, p["real"])
    write_json(p["json"], {
        "what": "toy world of toy_world.py: 12 captions 'a {colour} {shape}', 32x32 images, 4x8x8 latents",
        "captions": CAPTIONS, "settings": settings, "seconds": times,
        "pipeline": str(p["pipeline"]), "train": str(p["train"]), "test": str(p["test"]), "theta0": str(p["theta0"]),
        "cache_dir": str(p["cache"]), "real_latents": str(p["real"]),
        "eval": {"guidance": sizes.guidance, "sample_steps": sizes.sample_steps, "eval_images": sizes.eval_images},
        "notes": "test.parquet is the held-out real set and its captions are the held-out prompts; "
                 "theta0 is a train_spin.py folder (theta0/unet/) trained with --loss sft from the random UNet"})
    return p


def real_latents(p):
    """{"train"|"test": {caption: latents}} from the world's real_latents.safetensors."""
    from safetensors.torch import load_file

    t = load_file(str(p["real"]))
    return {key: {cap: t[f"{key}/{i}"] for i, cap in enumerate(CAPTIONS)} for key in ("train", "test")}


def noise_floor(p, n):
    """The floors, against the held-out real latents, with n training images per caption (the number of evaluation
    samples per model: FD is biased upward at small n, so a floor from more images would flatter every model):
    real: training real images as they are (what a perfect sampler would score: sampling noise only);
    decoder: the same images decoded and re-encoded as generate.py's PNGs are (what a perfect model would score in
    image space: the decoder's loss is part of every generated picture). Cached in floors.json."""
    path = p["dir"] / "floors.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if str(n) not in cached:
        real = real_latents(p)
        train = {cap: lat[:n] for cap, lat in real["train"].items()}
        vae = world_vae(p["pipeline"])
        through = {cap: encode_pil(vae, to_pil(vae, lat)) for cap, lat in train.items()}
        cached[str(n)] = {"real": fd_table_row(fd_per_caption(train, real["test"]))["fd"],
                          "decoder": fd_table_row(fd_per_caption(through, real["test"]))["fd"]}
        write_json(path, cached)
    return cached[str(n)]


def eval_dir(p, unet, sizes, steps):
    """Evaluation samples are cached per UNet weights (fingerprint) and sampler steps, whoever asks for them."""
    import torch

    from train_spin import load_unet, unet_fingerprint

    torch.set_num_threads(1)
    fp = unet_fingerprint(load_unet(str(unet), str(p["pipeline"])))
    return p["dir"] / "eval" / f"ddim{steps}_g{sizes.guidance:g}_n{sizes.eval_images}" / fp.split(":")[1][:16]


def sample_for_eval(p, unet, sizes, steps, threads=1):
    """generate.py on the held-out prompts, with the same seed (hence the same initial noise) for every model."""
    out = eval_dir(p, unet, sizes, steps)
    stats = out / "stats.json"
    if stats.is_file() and json.loads(stats.read_text())["images_present"] == sizes.eval_images * len(CAPTIONS):
        return out, 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, run_script("generate.py", *generate_args(
        p, unet=unet, prompts=p["test"], n=sizes.eval_images, steps=steps, guidance=sizes.guidance, seed=EVAL_SEED,
        output_dir=out), threads=threads)


def folder_latents(folder):
    """{caption: [n, 4, 8, 8]} of a generate.py folder."""
    import torch
    from safetensors.torch import load_file

    from train_spin import read_jsonl

    by = {}
    for r in read_jsonl(Path(folder) / "metadata.jsonl"):
        by.setdefault(r["prompt"], []).append(load_file(str(Path(folder) / r["latent_file"]))["latent"])
    return {cap: torch.stack(v) for cap, v in by.items()}


def evaluate(p, unet, sizes, steps, threads=1):
    """FD of one UNet's evaluation samples: "fd" in image space (the toy world's metric), "fd_sampler" on the
    sampler's latents (the former metric, kept for comparison)."""
    folder, seconds = sample_for_eval(p, unet, sizes, steps, threads)
    test = real_latents(p)["test"]
    image = fd_table_row(fd_per_caption(folder_image_latents(folder, world_vae(p["pipeline"])), test))
    sampler = fd_table_row(fd_per_caption(folder_latents(folder), test))
    return {"fd": image["fd"], "per_caption": image["per_caption"], "fd_sampler": sampler["fd"],
            "per_caption_sampler": sampler["per_caption"], "samples": str(folder), "seconds": round(seconds, 1)}


def arm_names(sizes):
    """Folder names of the two arms: every setting an arm's models depend on is in its name, so a run with other
    settings gets its own folders in the same world (and a rerun with the same settings reuses them)."""
    sft = f"sft_lr{sizes.lr:g}_{sizes.steps}x{sizes.batch}"
    steps = sizes.steps * sizes.iterations if sizes.arm == "dpo" else sizes.steps  # dpo: one run of all the steps
    spin = (f"{ARMS[sizes.arm]}_lr{sizes.lr:g}_beta{sizes.beta:g}_{steps}x{sizes.batch}_"
            f"opp{sizes.opponent_images}_g{sizes.guidance:g}_ddim{sizes.sample_steps}_lat-{sizes.synthetic_latent}"
            + ("_indep" if sizes.independent_pair_noise else ""))
    return spin, sft


def results_tag(sizes):
    """Name of a run's results/plot files in the world: the arm folder and the number of iterations (a --quick run
    of 2 iterations in the same world must not overwrite a full run's 3-iteration results)."""
    return f"{arm_names(sizes)[0]}_{sizes.iterations}it"


def spin_arm(p, sizes, seed, threads=1):
    """The self-play arm (sizes.arm, see ARMS). Each iteration: the opponent generates synthetic images for every
    training caption (generate.py), then train_spin.py --loss spin trains against them. Returns {result key: folder}:
    spin_1 .. spin_K (ref0_1 .. ref0_K), or dpo_K for the single run of K x steps steps."""
    arm, theta0, K = p["dir"] / arm_names(sizes)[0], p["theta0"], sizes.iterations
    runs = [(1, K * sizes.steps)] if sizes.arm == "dpo" else [(k, sizes.steps) for k in range(1, K + 1)]
    out, prev = {}, theta0
    for k, steps in runs:
        synth, it = arm / f"synth_{k - 1}", arm / f"iter_{k}"
        if not finished(it):
            arm.mkdir(parents=True, exist_ok=True)
            run_script("generate.py", *generate_args(
                p, unet=prev, prompts=p["train"], n=sizes.opponent_images, steps=sizes.sample_steps,
                guidance=sizes.guidance, seed=seed * 1000 + k, output_dir=synth), threads=threads)
            run_script("train_spin.py", *train_args(
                p, unet=prev, loss="spin", steps=steps, batch=sizes.batch, lr=sizes.lr, seed=seed * 1000 + k,
                beta=sizes.beta, synthetic_dir=synth, output_dir=it, synthetic_latent=sizes.synthetic_latent,
                reference=theta0 if sizes.arm == "spin_ref0" else None,
                independent_pair_noise=sizes.independent_pair_noise), threads=threads)
        out[f"{ARMS[sizes.arm]}_{K if sizes.arm == 'dpo' else k}"] = it
        prev = it
    return out


def sft_arm(p, sizes, seed, threads=1):
    """SFT with the same optimizer steps and batch: each "iteration" continues from the previous one."""
    arm, prev, out = p["dir"] / arm_names(sizes)[1], p["theta0"], []
    for k in range(1, sizes.iterations + 1):
        it = arm / f"iter_{k}"
        if not finished(it):
            arm.mkdir(parents=True, exist_ok=True)
            run_script("train_spin.py", *train_args(
                p, unet=prev, loss="sft", steps=sizes.steps, batch=sizes.batch, lr=sizes.lr, seed=seed * 1000 + k,
                output_dir=it), threads=threads)
        out.append(it)
        prev = it
    return out


def in_parallel(jobs, *calls):
    """Run independent stages (each mostly a subprocess) side by side: 2 cores, 2 single-threaded jobs."""
    from concurrent.futures import ThreadPoolExecutor

    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (diffusers' lazy imports race in threads)

    if jobs <= 1:
        return [c() for c in calls]
    with ThreadPoolExecutor(jobs) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def train_metrics(train_dir):
    """First and last logged step of a train_spin.py run (metrics.jsonl)."""
    from train_spin import read_jsonl

    rows = read_jsonl(Path(train_dir) / "metrics.jsonl")
    return {"first": rows[0], "last": rows[-1], "steps": len(rows)}


def run_experiment(out, seed, sizes, threads=1, jobs=2):
    """The whole experiment: world, both arms, evaluation of every model, results.json, plots."""
    t_start = time.time()
    times = {}
    t0 = time.time()
    p = build_world(out, seed, sizes, threads)
    times["world"] = round(time.time() - t0, 1)
    t0 = time.time()
    arm, sft = in_parallel(jobs, lambda: spin_arm(p, sizes, seed, threads), lambda: sft_arm(p, sizes, seed, threads))
    times["arms"] = round(time.time() - t0, 1)

    K, last = sizes.iterations, list(arm)[-1]
    models = {"theta_0": p["theta0"], **arm, **{f"sft_{k}": d for k, d in enumerate(sft, 1)}}
    final = {"theta_0": p["theta0"], last: arm[last], f"sft_{K}": sft[-1]}
    t0 = time.time()
    calls = [(name, d, sizes.sample_steps) for name, d in models.items()]
    if sizes.fine_steps:
        calls += [(name, d, sizes.fine_steps) for name, d in final.items()]
    rows = in_parallel(jobs, *[lambda d=d, s=s: evaluate(p, d, sizes, s, threads) for _, d, s in calls])
    times["evaluation"] = round(time.time() - t0, 1)
    fd = {name: r for (name, _, s), r in zip(calls, rows) if s == sizes.sample_steps}
    fd_fine = {name: r for (name, _, s), r in zip(calls, rows) if s != sizes.sample_steps}
    floor = noise_floor(p, sizes.eval_images)
    times["total"] = round(time.time() - t_start, 1)
    stage_times = save_timings(p)
    arm_dir = str(next(iter(arm.values())).parent)
    for name, d in (("arm", arm_dir), ("sft_arm", str(sft[0].parent))):  # script seconds, summed over the arm's folders
        times[name] = round(sum(v for k, v in stage_times.items() if k.startswith(d + os.sep)), 1)
    results = {
        "seed": seed, "sizes": dataclasses.asdict(sizes), "world": str(p["dir"]), "arm": sizes.arm,
        "metric": "image space: FD between generate.py's PNGs encoded as real images are and held-out real latents",
        "fd": {k: v["fd"] for k, v in fd.items()}, "fd_per_caption": {k: v["per_caption"] for k, v in fd.items()},
        "captions_better": captions_better({k: v["per_caption"] for k, v in fd.items()}),
        "fd_sampler": {k: v["fd_sampler"] for k, v in fd.items()},
        "fd_fine": {k: v["fd"] for k, v in fd_fine.items()},
        "fd_fine_sampler": {k: v["fd_sampler"] for k, v in fd_fine.items()},
        "floor": floor, "models": {k: str(v) for k, v in models.items()},
        "spin_metrics": [train_metrics(d) for d in arm.values()], "sft_metrics": [train_metrics(d) for d in sft],
        "seconds": {**times, "world_stages": json.loads(p["json"].read_text())["seconds"]},
    }
    tag = results_tag(sizes)
    write_json(p["dir"] / f"results_{tag}.json", results)
    print_table(results)
    plot_fd(results, p["dir"] / f"fd_{tag}.png")
    plot_samples(p, {**{k: v["samples"] for k, v in fd.items()}}, p["dir"] / f"samples_{tag}.png")
    return results


def captions_better(per_caption):
    """{model: on how many captions its image-space FD is below theta_0's}: the mean over 12 captions can move
    with one caption; a paired count over captions (same evaluation seeds) says whether a change is broad."""
    base = per_caption["theta_0"]
    return {name: sum(fd[c] < base[c] for c in base) for name, fd in per_caption.items() if name != "theta_0"}


def save_timings(p):
    """Seconds per stage output (this run's, plus earlier runs' for stages that were skipped now)."""
    path = p["dir"] / "timings.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**old, **TIMINGS})
    return {**old, **TIMINGS}


def print_table(r):
    K, key = r["sizes"]["iterations"], ARMS[r["arm"]]
    fl = r["floor"]
    log("")
    log(f"Frechet distance to held-out real images, per caption, mean over {len(CAPTIONS)} captions (lower is better; "
        f"DDIM {r['sizes']['sample_steps']} steps, guidance {r['sizes']['guidance']:g}).")
    log("image: generated PNGs encoded as real images are (the metric); sampler: the sampler's final latents (the old one)")
    log(f"{'iteration':>10} {key + ' image':>12} {'SFT image':>10}   {key + ' sampler':>14} {'SFT sampler':>12}")
    for k in range(K + 1):
        a, b = ("theta_0", "theta_0") if k == 0 else (f"{key}_{k}", f"sft_{k}")
        cell = lambda d, n, w: f"{d[n]:>{w}.2f}" if n in d else f"{'-':>{w}}"
        log(f"{k:>10} {cell(r['fd'], a, 12)} {cell(r['fd'], b, 10)}   {cell(r['fd_sampler'], a, 14)} "
            f"{cell(r['fd_sampler'], b, 12)}" + ("   (theta_0)" if k == 0 else ""))
    log(f"floors: held-out vs training real {fl['real']:.2f}; real images through the decoder {fl['decoder']:.2f} "
        "(the best an image-space FD can be here)")
    log(f"captions (of {len(CAPTIONS)}) where the image-space FD is below theta_0's: "
        + ", ".join(f"{n} {c}" for n, c in r["captions_better"].items()))
    if r["fd_fine"]:
        f, g = r["fd_fine"], r["fd_fine_sampler"]
        log(f"with DDIM {r['sizes']['fine_steps']} steps (image / sampler): " + ", ".join(
            f"{n} {f[n]:.2f} / {g[n]:.2f}" for n in f))
    first = [m["first"]["loss"] for m in r["spin_metrics"]]
    log(f"first {key} loss per iteration: " + ", ".join(f"{x:.6f}" for x in first) + f" (ln 2 = {math.log(2):.6f})")
    log("seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items() if not isinstance(v, dict)))


def plot_fd(r, path):
    """FD per iteration, image space (solid) and sampler latents (faint), with both floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K, key = r["sizes"]["iterations"], ARMS[r["arm"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for fd, style, alpha, what in ((r["fd"], "-", 1.0, "image"), (r["fd_sampler"], ":", 0.45, "sampler latent")):
        for name, marker, colour in ((key, "o", "C0"), ("sft", "s", "C1")):
            x = [0] + [k for k in range(1, K + 1) if f"{name}_{k}" in fd]
            ax.plot(x, [fd["theta_0"]] + [fd[f"{name}_{k}"] for k in x[1:]], marker=marker, ls=style, color=colour,
                    alpha=alpha, label=f"{ {'spin': 'SPIN', 'sft': 'SFT'}.get(name, name)} ({what})")
    ax.axhline(r["floor"]["decoder"], color="gray", ls="--", label="floor: real through the decoder")
    ax.axhline(r["floor"]["real"], color="gray", ls=":", label="floor: real vs real")
    ax.set_xlabel("iteration (x steps)")
    ax.set_ylabel("FD to held-out real")
    ax.set_xticks(range(K + 1))
    ax.set_ylim(bottom=0)
    ax.set_title(f"toy world, seed {r['seed']}, arm {r['arm']}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"plot -> {path}")


def sample_grid(folder, columns):
    """Rows: captions; columns: the first `columns` evaluation samples (same seeds in every model's grid)."""
    import numpy as np
    from PIL import Image

    from train_spin import read_jsonl

    rows = {(r["prompt_index"], r["image_index"]): r for r in read_jsonl(Path(folder) / "metadata.jsonl")}
    return np.concatenate([np.concatenate([np.asarray(Image.open(Path(folder) / rows[(i, j)]["file_name"]).convert("RGB"))
                                           for j in range(columns)], 1) for i in range(len(CAPTIONS))], 0)


def plot_samples(p, folders, path, columns=4, dpi=150, small=False):
    """One picture: the real held-out images, then every model's samples, side by side (decoded by our VAE).
    small: a 256-colour PNG (a third of the size; for figures committed to docs/, which must stay < 200 KB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    real = {}
    for cap, img in real_images(p["test"]):
        real.setdefault(cap, []).append(np.asarray(img))
    grids = {"real": np.concatenate([np.concatenate(real[c][:columns], 1) for c in CAPTIONS], 0)}
    grids.update({name: sample_grid(f, columns) for name, f in folders.items()})
    fig, axes = plt.subplots(1, len(grids), figsize=(1.3 * len(grids) + 1, 4.2))
    for ax, (name, g) in zip(axes, grids.items()):
        ax.imshow(g, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_yticks([RESOLUTION * (i + 0.5) for i in range(len(CAPTIONS))], CAPTIONS, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    if small:
        from PIL import Image

        with Image.open(path) as img:
            quantised = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        quantised.save(path, optimize=True)
    log(f"samples -> {path}")


# ---------------------------------------------------------------------------------------------------------
# Checks (CI): only what held in image space on every seed run (docs/toy_world.md, "What CI checks")
# ---------------------------------------------------------------------------------------------------------
def checks(r):
    """[(description, passed)] for a results dict: only what held in image space on every seed run (seeds 0-7 with
    the default settings, at 2 and at 3 iterations; docs/toy_world.md has the tables): the best SPIN iterate beats
    theta_0 and the best SFT iterate. Strict but unscaled: the thinnest margins were 1.6% (seed 7 at 2 iterations,
    vs SFT) and 4.2% (seed 6, vs theta_0); seed 1 (CI's) 5% and 7.5%. Not asserted because they failed on a seed:
    SPIN 1 < theta_0 (seeds 0, 6), SPIN 2 < SPIN 1 (seeds 3, 7), SPIN 2 < theta_0 and SPIN 2 < SFT 2 (seed 7: 2.70
    vs 2.67 and 2.60), SPIN 3 < theta_0 (seed 6: 5.90 vs 5.90); nor anything about the other arms (one seed)."""
    fd, fs, ln2 = r["fd"], r["fd_sampler"], math.log(2)
    values = [*fd.values(), *fs.values(), *r["fd_fine"].values(), *r["fd_fine_sampler"].values(), *r["floor"].values()]
    # ln 2 at step 0 needs the frozen reference to be the starting UNet: not so after iteration 1 of spin_ref0
    out = [(f"iteration {k} starts at loss ln 2: {m['first']['loss']:.6f}", abs(m["first"]["loss"] - ln2) < 1e-4)
           for k, m in enumerate(r["spin_metrics"], 1) if k == 1 or r["arm"] != "spin_ref0"]
    out += [
        ("every FD and loss is finite", all(math.isfinite(v) for v in values)
         and all(math.isfinite(m["last"]["loss"]) for m in r["spin_metrics"] + r["sft_metrics"])),
        # the metric itself: the decoder loses something, and the sampler's latents overstate theta_0's distance
        (f"floor through the decoder {r['floor']['decoder']:.2f} > floor real vs real {r['floor']['real']:.2f}",
         r["floor"]["decoder"] > r["floor"]["real"]),
        (f"theta_0: image-space FD {fd['theta_0']:.2f} < sampler-latent FD {fs['theta_0']:.2f}", fd["theta_0"] < fs["theta_0"]),
    ]
    spin = {k: v for k, v in fd.items() if k.startswith("spin_")}
    sft = {k: v for k, v in fd.items() if k.startswith("sft_")}
    if r["arm"] == "spin" and spin and sft:  # the default arm: what held on every seed
        best, best_sft = min(spin, key=spin.get), min(sft, key=sft.get)
        out += [
            (f"best SPIN iterate FD({best}) {spin[best]:.2f} < FD(theta_0) {fd['theta_0']:.2f}", spin[best] < fd["theta_0"]),
            (f"best SPIN iterate FD({best}) {spin[best]:.2f} < best SFT iterate FD({best_sft}) {sft[best_sft]:.2f}",
             spin[best] < sft[best_sft]),
        ]
    return out


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def add_common(ap):
    ap.add_argument("--seed", type=int, default=0, help="world (data, VAE, random UNet/text encoder) and training seeds")
    ap.add_argument("--quick", action="store_true", help="CI size (see QUICK at the top of the file)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (OpenMP spinning on shared cores is slow)")
    for f in dataclasses.fields(Sizes):
        if f.type in (bool, "bool"):
            ap.add_argument("--" + f.name, action="store_const", const=True, default=None)
            continue
        if f.name in CHOICES:
            ap.add_argument("--" + f.name, choices=CHOICES[f.name], default=None,
                            help=f"default {getattr(FULL, f.name)} ({getattr(QUICK, f.name)} with --quick)")
            continue
        ap.add_argument("--" + f.name, type=f.type if callable(f.type) else type(f.default), default=None,
                        help=f"default {getattr(FULL, f.name)} ({getattr(QUICK, f.name)} with --quick)")


def sizes_from(args):
    base = QUICK if args.quick else FULL
    return dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)
                                        if getattr(args, f.name) is not None})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in ("run", "build", "fd") else "run"
    argv = argv[1:] if argv and argv[0] == command else argv
    ap = argparse.ArgumentParser(prog=f"toy_world.py {command}", description=__doc__.split("\n")[0])
    if command in ("run", "build"):
        ap.add_argument("--output_dir", required=True, help="the world folder (one per seed and size)")
        add_common(ap)
    if command == "run":
        ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="stages run side by side")
        ap.add_argument("--check", action="store_true", help="exit 1 unless the CI checks hold")
    if command == "fd":
        ap.add_argument("--world", required=True, help="a folder made by `toy_world.py build` (or run)")
        ap.add_argument("--unet", action="append", required=True, help="a folder with unet/ (repeat)")
        ap.add_argument("--names", nargs="*", help="labels for the table (default: the folder names)")
        ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the world's sample_steps)")
        ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the world's guidance)")
        ap.add_argument("--json", default=None, help="where to write the table (default: WORLD/fd.json)")
        ap.add_argument("--plot", default=None, help="also write FD per model (in --unet order) to this PNG")
        ap.add_argument("--grid", default=None, help="also write a grid of real images and each model's samples to this PNG")
        ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
        ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if command == "build":
        p = build_world(args.output_dir, args.seed, sizes_from(args), args.threads)
        save_timings(p)
        for key in ("pipeline", "train", "test", "theta0", "json"):
            print(f"{key}: {p[key]}")
        return
    if command == "fd":
        return fd_command(args)
    r = run_experiment(args.output_dir, args.seed, sizes_from(args), args.threads, args.jobs)
    if args.check:
        results = checks(r)
        for what, ok in results:
            log(f"{'PASS' if ok else 'FAIL'}  {what}")
        if not all(ok for _, ok in results):
            sys.exit(1)


def fd_command(args):
    """FD table of given UNets in an existing world (the evaluation of spin_loop.sh's runs)."""
    p = world_paths(args.world)
    if not p["json"].is_file():
        raise SystemExit(f"error: --world {args.world}: no world.json; run `toy_world.py build --output_dir {args.world}` first")
    w = json.loads(p["json"].read_text())
    sizes = dataclasses.replace(FULL, **{k: v for k, v in w.get("eval", {}).items()})
    if args.guidance is not None:
        sizes = dataclasses.replace(sizes, guidance=args.guidance)
    steps = args.steps or sizes.sample_steps
    names = args.names or [Path(u).name for u in args.unet]
    if len(names) != len(args.unet):
        raise SystemExit(f"error: {len(names)} --names for {len(args.unet)} --unet")
    rows = in_parallel(args.jobs, *[lambda u=u: evaluate(p, u, sizes, steps, args.threads) for u in args.unet])
    floor = noise_floor(p, sizes.eval_images)
    table = {"steps": steps, "guidance": sizes.guidance, "eval_images": sizes.eval_images, "floor": floor,
             "metric": "fd: image space (generate.py's PNGs encoded as real images are); fd_sampler: sampler latents",
             "fd": {n: r["fd"] for n, r in zip(names, rows)}, "per_caption": {n: r["per_caption"] for n, r in zip(names, rows)},
             "fd_sampler": {n: r["fd_sampler"] for n, r in zip(names, rows)},
             "samples": {n: r["samples"] for n, r in zip(names, rows)}, "unets": dict(zip(names, args.unet))}
    log(f"{'model':>20} {'FD image':>9} {'FD sampler':>11}")
    for n, r in zip(names, rows):
        log(f"{n:>20} {r['fd']:>9.2f} {r['fd_sampler']:>11.2f}")
    log(f"{'floor: real':>20} {floor['real']:>9.2f}")
    log(f"{'floor: decoder':>20} {floor['decoder']:>9.2f}   (real images decoded and re-encoded)")
    out = Path(args.json or p["dir"] / "fd.json")
    write_json(out, table)
    log(f"-> {out}")
    if args.plot:
        plot_fd_models(table, args.plot)
    if args.grid:
        plot_samples(p, table["samples"], args.grid, columns=3, dpi=100, small=True)


def plot_fd_models(table, path):
    """The fd subcommand's table as a plot (spin_loop.sh's demo: theta_0, iter_1 .. iter_K): image-space FD, the
    sampler-latent FD faintly for comparison, and the two floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["fd"])
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(range(len(names)), [table["fd"][n] for n in names], "o-", color="C0", label="FD, image space (the metric)")
    ax.plot(range(len(names)), [table["fd_sampler"][n] for n in names], "o:", color="C0", alpha=0.4,
            label="FD, sampler latents (not what the pictures show)")
    ax.axhline(table["floor"]["decoder"], color="gray", ls="--", lw=1, label="floor: real images through the decoder")
    ax.axhline(table["floor"]["real"], color="gray", ls=":", lw=1, label="floor: real vs real")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("FD to held-out real (lower is better)")
    ax.set_title(f"toy world: DDIM {table['steps']}, guidance {table['guidance']:g}", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log(f"plot -> {path}")


if __name__ == "__main__":
    main()
