#!/usr/bin/env python
"""train_spin.py: one SPIN-Diffusion iteration (arXiv 2402.10210), plus the SFT and Diffusion-DPO baselines.

    theta_k (initial weights AND frozen reference/opponent) + real images + generate.py's synthetic images
        -> output_dir/unet/  (theta_{k+1}, diffusers format, safetensors)

For every pair (real latent z0, synthetic latent z0' of the same prompt c) we draw one timestep and one
noise shared by the pair, and compare the per-sample denoising errors of the policy (m_r, m_s) with those of
the frozen opponent (r_r, r_s):

    margin = (m_r - r_r) - (m_s - r_s)          loss = mean_i  -log sigmoid(-(beta/2) * margin_i)

i.e. lower the error on real data and raise it on the opponent's own samples, both relative to the
opponent. beta follows Salesforce Diffusion-DPO's `beta_dpo` (SD-1.5 default 5000). At step 0 the policy
equals the reference, so margin = 0 and the loss is exactly ln 2.

Speed: real images are VAE-encoded and prompts text-encoded once, into an on-disk cache (--cache_dir) that
every later iteration reuses; synthetic latents come straight from generate.py. The training step runs the
UNet only: one policy call on [real; synthetic] and one no-grad reference call.

Reading order: the flags, the math (spin_loss, pair_loss), main() (the iteration's steps in order), one training
step (train_step), the models, the data and its caches, the run record and checkpoints; last, the helpers every
script carries a copy of (tests/test_shared.py keeps the copies identical).

Single GPU:   python train_spin.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
                  --dataset yuvalkirstain/pickapic_v2 --synthetic_dir runs/x/synth_0 --output_dir runs/x/iter_1
Many GPUs:    accelerate launch --num_processes 8 train_spin.py ...   (same flags)
"""

import argparse
import bisect
import copy
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

# accelerate, diffusers, transformers and datasets are imported where they are used: together they take seconds to
# import, which --help and the scripts importing this file's helpers (toy_world.py) need not pay. peft and
# bitsandbytes are optional: imported only by --lora_rank / --use_8bit_adam.


# ---------------------------------------------------------------------------------------------------------
# Command line. Flag names follow the diffusers training examples.
# ---------------------------------------------------------------------------------------------------------
PAIR_NOISE = ("shared", "separate_noise", "independent")  # what a pair's two members share: see --pair_noise


def build_parser():
    # one flag per line reads as a table (ruff's format would spread each over five lines)
    # fmt: off
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    # models and data
    a("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
      help="base pipeline (VAE, text encoder, tokenizer, scheduler): hub id or folder")
    a("--revision", default=None, help="git revision (branch, tag or commit) of the base pipeline's hub repo to load "
      "its parts from, and its UNet with --unet base (a --unet of another model is its own; a local folder ignores it)")
    a("--variant", default=None, help="weights variant of the base pipeline's parts, e.g. fp16 (diffusion_pytorch_model"
      ".fp16.safetensors), and of its UNet with --unet base (a --unet of another model is its own)")
    a("--unet", default=None, help="theta_k to start from and to use as frozen reference: folder with unet/, "
      "a checkpoint-N folder, hub id (e.g. UCLA-AGI/SPIN-Diffusion-iter1) or 'base' (the base pipeline's UNet)")
    a("--dataset", "--dataset_name", "--train_data_dir", required=True,
      help="real data: hub id or local path (parquet file/folder, webdataset tars, image folder with metadata.jsonl)")
    a("--split", default="train")
    a("--image_column", default=None, help="image column (default: Pick-a-Pic jpg_0/jpg_1 by label, else 'image')")
    a("--caption_column", default="caption")
    a("--max_train_samples", type=int, default=None, help="use only the first N usable rows (after dropping ties)")
    a("--streaming", action="store_true",
      help="stream the dataset instead of downloading it whole (Pick-a-Pic is hundreds of GB)")
    a("--synthetic_dir", default=None,
      help="folder written by generate.py with the opponent's images (required for --loss spin)")
    a("--synthetic_latent", choices=["sampler", "image"], default="sampler",
      help="which latent of each synthetic image to train on: 'sampler', generate.py's final sampler latent, or "
      "'image', its saved PNG encoded exactly like a real image (docs/toy_world.md compares the two)")
    a("--allow_opponent_mismatch", action="store_true",
      help="train even if --synthetic_dir was generated by another UNet")
    a("--reference_unet", default=None, help="frozen reference, if not the starting UNet (--unet): folder, hub id "
      "or 'base'. SPIN and Diffusion-DPO use the starting UNet; this is for ablations (theta_0 kept as reference)")
    a("--output_dir", required=True)
    a("--cache_dir", default=os.environ.get("SPIN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                                           "spin-diffusion")),
      help="where encoded real latents and prompt embeddings are kept (keyed by model and data, reused by every "
      "iteration)")
    a("--resolution", type=int, default=None, help="image side in pixels (default: the model's own, 512 for SD-1.5)")
    # objective
    a("--loss", choices=["spin", "sft", "dpo"], default="spin")
    a("--beta", "--beta_dpo", type=float, default=5000.0, help="KL strength, in Diffusion-DPO's beta_dpo convention")
    a("--pair_noise", choices=PAIR_NOISE, default="shared",
      help="what the two members of a pair share: 'shared' one timestep and one noise (Diffusion-DPO's code), "
      "'separate_noise' one timestep and two noises (the paper's Appendix C.6), 'independent' nothing")
    a("--independent_pair_noise", action="store_true", help="the same as --pair_noise independent")
    a("--caption_dropout", "--proportion_empty_prompts", type=float, default=0.0,
      help="probability of training on the empty prompt (keeps classifier-free guidance working)")
    # optimisation
    a("--learning_rate", type=float, default=2e-5)
    a("--scale_lr", action="store_true", help="multiply the learning rate by accumulation x batch size x processes")
    a("--lr_scheduler", default="linear", help="linear, cosine, constant, constant_with_warmup, ...")
    a("--lr_warmup_steps", type=int, default=200)
    a("--train_batch_size", type=int, default=8, help="pairs per device per micro-step")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=500, help="optimizer steps")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit: optimizer state in 8 bits")
    a("--seed", type=int, default=0, help="data order, timesteps and noise (each process draws its own)")
    # hardware
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
      help="default: accelerate config; trainable weights stay fp32")
    a("--gradient_checkpointing", action="store_true")
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="xformers attention where it is installed; else a note: PyTorch's scaled_dot_product_attention is used")
    # LoRA (peft): train a low-rank adapter instead of every weight
    a("--lora_rank", "--rank", type=int, default=None, help="train a LoRA adapter of this rank on the UNet "
      "(default: full fine-tuning); the reference is the same UNet with the adapter off, unet/ is written merged")
    a("--lora_alpha", type=float, default=None,
      help="LoRA scale numerator (default: the rank, as diffusers' LoRA examples)")
    a("--lora_target_modules", default="to_k,to_q,to_v,to_out.0",
      help="comma-separated module names the adapter wraps (diffusers' LoRA examples: the attention projections)")
    a("--allow_tf32", action="store_true")
    a("--dataloader_num_workers", type=int, default=0)
    # bookkeeping
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None,
      help="keep only this many checkpoint-N folders (each: UNet or LoRA adapter + optimizer)")
    a("--resume_from_checkpoint", default=None,
      help="a checkpoint-N folder, or 'latest' (in output_dir; starts fresh if none)")
    a("--report_to", default="none",
      help="accelerate tracker: tensorboard, wandb, ... (metrics.jsonl is always written)")
    a("--push_to_hub", action="store_true",
      help="at the end, upload unet/ (LoRA: also lora/, lora_cumulative/) and the model card README.md")
    a("--hub_model_id", default=None, help="the hub repository to push to (default: the output folder's name)")
    a("--hub_token", default=None, help="hub token (default: huggingface_hub's login)")
    # validation images while training: the same prompts and seeds at step 0, every N steps and at the end
    a("--validation_prompts", nargs="+", default=None,
      help="prompts the policy samples while training: output_dir/validation/step-N/ and --report_to's tracker")
    a("--validation_prompts_file", default=None, help="the validation prompts, one per line")
    a("--num_validation_images", type=int, default=2, help="images per validation prompt")
    a("--validation_steps", type=int, default=100, help="sample the validation prompts every N optimizer steps")
    a("--validation_seed", type=int, default=0,
      help="image i of prompt p starts from seed image_seed(seed, p, i), as generate.py --seed makes it")
    a("--validation_num_inference_steps", type=int, default=50)
    a("--validation_guidance_scale", type=float, default=7.5)
    a("--validation_scheduler", choices=sorted(SCHEDULERS), default=None,
      help="sampler, generate.py's --scheduler names (default: the pipeline's own)")
    # fmt: on
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.independent_pair_noise:
        args.pair_noise = "independent"
    if args.loss == "spin" and not args.synthetic_dir:
        p.error("--loss spin needs --synthetic_dir (a folder written by generate.py)")
    args.validation_prompts = validation_prompts(args.validation_prompts, args.validation_prompts_file)
    for name in ("num_validation_images", "validation_steps", "validation_num_inference_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    return args


def validation_prompts(prompts, prompts_file):
    """The validation prompts from --validation_prompts or --validation_prompts_file (one per line), blank lines
    dropped; None for no validation. The run record keeps the list itself."""
    if prompts and prompts_file:
        raise UserError("give the validation prompts with --validation_prompts or --validation_prompts_file, not both")
    if prompts_file:
        try:
            prompts = Path(prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--validation_prompts_file {prompts_file}: cannot read it ({type(e).__name__})") from None
        if not any(line.strip() for line in prompts):
            raise UserError(f"--validation_prompts_file {prompts_file}: no prompts in it")
    prompts = [q.strip() for q in prompts or [] if q.strip()]
    return prompts or None


# The flags that may differ between a run and its resume or re-run: they change where things are kept, how fast or
# how often, not what is trained. Every other flag (a new one too) is part of the run's identity and must agree.
MAY_CHANGE = (
    "output_dir",  # the folder that holds the record itself
    "cache_dir",  # where the encoded data is kept (its keys name what it holds)
    "streaming",  # how the dataset is read, not which rows
    "allow_opponent_mismatch",  # a permission; the opponent itself is --synthetic_dir's, which is checked
    "independent_pair_noise",  # folded into --pair_noise, which is checked
    "mixed_precision",  # a resume may switch it: to bf16 after fp16 stopped on a non-finite loss
    "gradient_checkpointing",  # memory only: the same numbers
    "enable_xformers_memory_efficient_attention",  # an attention kernel: memory and speed
    "allow_tf32",  # a hardware setting
    "dataloader_num_workers",  # the batches and draws are pure functions of the step (StepBatches)
    "checkpointing_steps",  # how often checkpoints are written
    "checkpoints_total_limit",  # how many are kept
    "resume_from_checkpoint",  # where to continue from
    "report_to",  # where metrics also go
    "push_to_hub",  # where the result also goes
    "hub_model_id",
    "hub_token",
    # what the validation samples: pictures of the run, drawn from their own generators (the training is unchanged)
    "validation_prompts",
    "validation_prompts_file",
    "num_validation_images",
    "validation_steps",
    "validation_seed",
    "validation_num_inference_steps",
    "validation_guidance_scale",
    "validation_scheduler",
)


def identity(args):
    """The settings a resumed or re-run output_dir must agree on: every flag but MAY_CHANGE."""
    return {k: v for k, v in vars(args).items() if k not in MAY_CHANGE}


def check_same_run(saved, current, where):
    """Refuse, in one line, a run whose identity differs from the one `saved` in its output_dir. A flag the saved
    record lacks (it was written before the flag existed) counts as its parser default: that run had no other value."""
    if "pair_noise" not in saved and "independent_pair_noise" in saved:  # a run recorded before --pair_noise
        saved = {**saved, "pair_noise": "independent" if saved["independent_pair_noise"] else "shared"}
    parser = build_parser()
    saved = {k: saved[k] if k in saved else parser.get_default(k) for k in current}
    diff = {k: (saved[k], v) for k, v in current.items() if saved[k] != v}
    if diff:
        k, (old, new) = next(iter(diff.items()))
        raise UserError(
            f"{where} was made with other settings ({len(diff)} differ, e.g. --{k} {old!r} there vs "
            f"{new!r} now); use the same flags or another --output_dir"
        )


# ---------------------------------------------------------------------------------------------------------
# The math: pure functions on tensors (tests compare them with an independent computation).
# ---------------------------------------------------------------------------------------------------------
def spin_loss(model_mse_real, model_mse_syn, ref_mse_real, ref_mse_syn, beta):
    """Per-pair SPIN-Diffusion loss: -log sigmoid(-(beta/2) * ((m_r - r_r) - (m_s - r_s))), in float32.
    Diffusion-DPO is the same expression with winner/loser in place of real/synthetic."""
    m_r, m_s, r_r, r_s = (x.float() for x in (model_mse_real, model_mse_syn, ref_mse_real, ref_mse_syn))
    margin = (m_r - r_r) - (m_s - r_s)
    return -F.logsigmoid(-(beta / 2) * margin)


def per_sample_mse(pred, target):
    """Mean squared error over C,H,W for each sample, in float32 (fp16 errors times beta ~ 5000 are noise)."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict: the noise (epsilon models) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"prediction_type {kind!r} of the scheduler is not supported (epsilon or v_prediction)")


def pair_stats(m_r, m_s, r_r, r_s):
    """What to log for a batch of pairs (sums, so micro-batches and processes can be averaged later)."""
    margin = (m_r - r_r) - (m_s - r_s)
    return {
        "implicit_acc": (margin < 0).float(),  # the policy prefers the real image more than the reference does
        "real_logratio": -(m_r - r_r),  # > 0: the policy denoises real data better than the reference
        "syn_logratio": -(m_s - r_s),  # < 0: ... and the opponent's samples worse
        "model_mse_real": m_r,
        "model_mse_syn": m_s,
        "ref_mse_real": r_r,
        "ref_mse_syn": r_s,
    }


def denoising_errors(model, scheduler, latents, noise, t, text, added=None):
    """Per-sample error of `model` at denoising `latents` noised with `noise` at timesteps `t`. `added`: SDXL's extra
    conditioning ({"text_embeds": pooled prompt embedding, "time_ids": micro-conditioning}), None for SD-1.x/2.x."""
    pred = model(
        scheduler.add_noise(latents, noise, t),
        t,
        encoder_hidden_states=text,
        added_cond_kwargs=added,
        return_dict=False,
    )[0]
    return per_sample_mse(pred, diffusion_target(scheduler, latents, noise, t))


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch: the prompt embeddings and, for SDXL, its added_cond_kwargs
    ({"text_embeds": pooled prompt embedding, "time_ids": micro-conditioning}; None for SD-1.x/2.x)."""

    text: torch.Tensor
    added: Optional[dict] = None


class Draws(NamedTuple):
    """What a batch of pairs is noised with: the first member's timesteps and noise, and the second member's (the
    same tensors when --pair_noise shares them)."""

    t: torch.Tensor
    noise: torch.Tensor
    t2: torch.Tensor
    noise2: torch.Tensor


class StepDraws(NamedTuple):
    """Everything a micro-step draws for its pairs: Draws plus the caption-dropout mask (True: the empty prompt)."""

    t: torch.Tensor
    noise: torch.Tensor
    t2: torch.Tensor
    noise2: torch.Tensor
    drop: Optional[torch.Tensor]


def pair_loss(policy, reference, scheduler, real, other, draws, cond, *, beta, autocast):
    """SPIN (other = opponent's sample) or Diffusion-DPO (real = winner, other = loser) on a batch of pairs:
    one policy call on the concatenated [real; other] batch, one no-grad reference call on the same inputs.
    `draws` (Draws) noise the pair; `cond` (Conditioning) is the prompt's, its SDXL `added` already laid out for the
    concatenated batch."""
    b = real.shape[0]
    latents, noises = torch.cat([real, other]), torch.cat([draws.noise, draws.noise2])
    ts, texts = torch.cat([draws.t, draws.t2]), torch.cat([cond.text, cond.text])
    model_mse = denoising_errors(policy, scheduler, latents, noises, ts, texts, cond.added)
    with torch.no_grad(), autocast():  # the same precision path as the policy: margin = 0 exactly at step 0
        ref_mse = denoising_errors(reference, scheduler, latents, noises, ts, texts, cond.added)
    m_r, m_s, r_r, r_s = model_mse[:b], model_mse[b:], ref_mse[:b], ref_mse[b:]
    return spin_loss(m_r, m_s, r_r, r_s, beta).mean(), pair_stats(m_r, m_s, r_r, r_s)


def sft_loss(policy, scheduler, real, draws, cond):
    """The SFT baseline: plain denoising MSE on the real images."""
    m_r = denoising_errors(policy, scheduler, real, draws.noise, draws.t, cond.text, cond.added)
    return m_r.mean(), {"model_mse_real": m_r}


def step_generator(seed, micro_step):
    """CPU generator of one micro-step, independent of where a run was resumed. It draws for the whole global batch
    and each process keeps the slice of its own pairs (draw_step), so what a pair gets depends on its place in the
    global batch, not on the process holding it: 2 processes x batch 1 train what 1 process x batch 2 trains, and no
    two GPUs draw the same noise (SPEC pitfall 4). Seeded as image_seed(seed, 0, micro_step), as the single process
    of earlier versions was, so one process draws what it always drew."""
    return torch.Generator().manual_seed(image_seed(seed, 0, micro_step))


def draw_noise(gen, batch, latent_shape, num_train_timesteps, pair_noise="shared"):
    """Timesteps and noise for `batch` pairs (Draws). `pair_noise` (PAIR_NOISE): the pair's two members share both
    ('shared'), share the timestep only ('separate_noise'), or neither ('independent'). Each mode draws the shared
    values first, so the first member's draws are the same in every mode."""
    t = torch.randint(0, num_train_timesteps, (batch,), generator=gen)
    noise = torch.randn((batch, *latent_shape), generator=gen)
    t2 = torch.randint(0, num_train_timesteps, (batch,), generator=gen) if pair_noise == "independent" else t
    noise2 = torch.randn((batch, *latent_shape), generator=gen) if pair_noise != "shared" else noise
    return Draws(t, noise, t2, noise2)


def draw_step(
    seed, micro_step, global_batch, start, stop, latent_shape, num_train_timesteps, pair_noise, caption_dropout
):
    """Timesteps, noise and caption-dropout mask (StepDraws) of pairs start..stop-1 of one micro-step's global batch."""
    gen = step_generator(seed, micro_step)
    t, noise, t2, noise2 = draw_noise(gen, global_batch, latent_shape, num_train_timesteps, pair_noise)
    drop = (
        torch.rand(global_batch, generator=gen) < caption_dropout
        if caption_dropout > 0
        else torch.zeros(global_batch, dtype=torch.bool)
    )
    return StepDraws(t[start:stop], noise[start:stop], t2[start:stop], noise2[start:stop], drop[start:stop])


def epoch_permutation(n, seed, epoch):
    """The row order of one epoch: a seeded permutation, the same on every process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(image_seed(seed, -1, epoch)))


def batch_indices(n, seed, global_batch, micro_step, process_index, per_device, perm=None):
    """Row indices for one process at one micro-step. Each epoch is a fresh seeded permutation cut into global
    batches (the last partial batch is dropped); a process takes its slice. Pure function of the step, so a
    resumed run continues mid-epoch exactly where the interrupted one was. `perm`: the epoch's permutation, if the
    caller keeps it (computing it costs milliseconds at Pick-a-Pic's size)."""
    epoch, b = divmod(micro_step, n // global_batch)
    perm = epoch_permutation(n, seed, epoch) if perm is None else perm
    start = b * global_batch + process_index * per_device
    return perm[start : start + per_device].tolist()


# ---------------------------------------------------------------------------------------------------------
# The training run: one SPIN iteration, step by step
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    """theta_k -> theta_{k+1}: the SPIN iteration (or the SFT / Diffusion-DPO baseline), its steps in order."""
    args = parse_args(argv)
    run = start_run(args)  # the accelerator (one process per GPU), logging, TF32
    models = load_models(args, run)  # theta_k (the policy), scheduler, tokenizers, SD/SDXL
    if output_dir_is_done(args, run):  # a finished run with the same settings: nothing to do
        return
    encode = ImageEncoder(args, run, models)  # the VAE, loaded on first use
    data = encode_real_data(args, run, models, encode)  # real latents and prompt embeddings, cached once
    pairs = make_pairs(args, run, models, data, encode)  # each real row + the opponent's sample (DPO: its loser)
    del encode  # the VAE's memory goes before training
    if args.lora_rank:  # the policy: theta_k frozen under a trainable low-rank adapter
        add_lora(models.unet, args.lora_rank, args.lora_alpha, args.lora_target_modules, args.seed)
    reference = make_reference(args, run, models)  # the frozen opponent: theta_k itself
    trainer = build_optimizer(args, run, models, reference, pairs)  # AdamW + schedule on the policy, prepared
    resume(args, run, models, trainer)  # --resume_from_checkpoint: continue exactly
    metrics_path = write_run_record(args, run, models, reference, pairs, data, trainer)
    # each micro-step, train_step: pair_loss noises the pair (denoising_errors) and takes the loss (spin_loss)
    train(args, run, models, data, pairs, trainer, metrics_path)
    save_outputs(args, run, models, trainer, metrics_path)  # output_dir/unet/ (LoRA: also lora/), run finished


@dataclass
class Run:
    """This launch: accelerate's handle, the output folder, a log that prints on the main process only, and the
    compute dtype (--mixed_precision: the encoders run in it and frozen weights are held in it, cast_frozen)."""

    accelerator: Any
    out: Path
    log: Callable
    dtype: torch.dtype

    @property
    def device(self):
        return self.accelerator.device

    @property
    def main_process(self):
        return self.accelerator.is_main_process


def start_run(args):
    """Join a torchrun / accelerate launch. Without CUDA, several processes need accelerate's CPU mode (gloo); a launch
    it does not see would leave every process believing it is alone (each encoding the cache, each writing every
    checkpoint and metric), so that is refused."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(args.output_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    refuse_unsupported_engine(os.environ)
    accelerator = Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if accelerator.num_processes != world:
        raise UserError(
            f"launched as {world} processes but accelerate sees {accelerator.num_processes}; "
            "launch with accelerate launch or torchrun, without overriding the process group"
        )
    log = (lambda *a: print(*a, flush=True)) if accelerator.is_main_process else (lambda *a: None)
    check_shared_folders(accelerator, {"--cache_dir": args.cache_dir, "--output_dir": args.output_dir})
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return Run(accelerator, out, log, dtype)


def output_dir_is_done(args, run):
    """A finished output_dir with the same settings is a no-op (shell loops re-run stages freely); one made with other
    settings is refused. Otherwise the folder is made, and the run goes on."""
    out = run.out
    if (out / "unet" / "config.json").is_file() and (out / "run_config.json").is_file():
        done = json.loads((out / "run_config.json").read_text())
        check_same_run(done.get("identity", {}), identity(args), f"--output_dir {out}")
        if done.get("finished"):
            run.log(f"{out}/unet is already trained with these settings: nothing to do")
            return True
    out.mkdir(parents=True, exist_ok=True)
    return False


@dataclass
class Reference:
    """The frozen model the policy is scored against, and the fingerprint of its weights (for the run record)."""

    module: Any  # None for SFT, and for LoRA until build_optimizer sets the policy with its adapter off
    fingerprint: Optional[str]


def make_reference(args, run, models):
    """The frozen reference/opponent: theta_k itself (a frozen copy; LoRA: the policy's own UNet with the adapter off,
    no copy), or --reference_unet for ablations. SFT has none. Held in the compute dtype (cast_frozen)."""
    if args.loss == "sft":
        return Reference(None, None)
    if args.lora_rank and args.reference_unet is None:
        return Reference(None, models.fingerprint)  # WithoutAdapter, set up after accelerator.prepare
    if args.reference_unet is not None:
        module = load_unet(args.reference_unet, models.base, args.revision, args.variant)
        fingerprint = unet_fingerprint(module)
    else:
        module, fingerprint = copy.deepcopy(models.unet), models.fingerprint
    module = cast_frozen(module.requires_grad_(False).eval(), run.dtype).to(run.device)
    return Reference(module, fingerprint)


@dataclass
class Trainer:
    """What the optimisation steps: the policy (prepared by accelerate), its reference, the optimizer over its
    trainable weights, the learning-rate schedule, and the optimizer steps done."""

    unet: Any
    reference: Any
    optimizer: Any
    lr_scheduler: Any
    trainable: list
    global_step: int = 0


def build_optimizer(args, run, models, reference, pairs):
    """AdamW (8-bit with --use_8bit_adam) on the policy's trainable weights (fp32), the learning-rate schedule, and
    accelerate's preparation of both."""
    from diffusers.optimization import get_scheduler

    unet = models.unet
    if args.lora_rank:
        cast_frozen(unet, run.dtype)  # the frozen base under the adapter (policy and, adapter off, reference)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * pairs.global_batch
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = optimizer_cls(
        trainable,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # Stepped by us once per optimizer step (not prepared): warmup and total steps are optimizer steps,
    # whatever the number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    unet, optimizer = run.accelerator.prepare(unet, optimizer)
    if args.lora_rank:
        checkpoint_adapter_only(run.accelerator)
        if args.loss != "sft" and reference.module is None:
            reference.module = WithoutAdapter(run.accelerator.unwrap_model(unet))
    return Trainer(unet, reference.module, optimizer, lr_scheduler, trainable)


def resume(args, run, models, trainer):
    """--resume_from_checkpoint: the checkpoint's weights, optimizer, RNG states and schedule, once it is known to
    continue this very run (same settings, process count and starting UNet)."""
    if not args.resume_from_checkpoint:
        return
    out, world = run.out, run.accelerator.num_processes
    ckpt = list_checkpoints(out)[-1] if args.resume_from_checkpoint == "latest" and list_checkpoints(out) else None
    if args.resume_from_checkpoint != "latest":
        ckpt = Path(args.resume_from_checkpoint)
        if not (ckpt / "train_state.json").is_file():
            raise UserError(f"--resume_from_checkpoint {ckpt}: not a checkpoint folder (no train_state.json)")
    if ckpt is None:
        run.log("no checkpoint in output_dir: starting from the beginning")
        return
    state = json.loads((ckpt / "train_state.json").read_text())
    check_same_run(state["identity"], identity(args), f"checkpoint {ckpt}")
    # The global batch, each process's rows and its slice of the draws depend on the process count.
    if state.get("num_processes", 1) != world:
        raise UserError(
            f"checkpoint {ckpt} was written by a run of {state.get('num_processes', 1)} process(es), "
            f"this one has {world}: an exact continuation needs the same count; resume with "
            f"{state.get('num_processes', 1)} processes or start another --output_dir"
        )
    if state["unet_fingerprint"] != models.fingerprint:
        raise UserError(
            f"checkpoint {ckpt} continues another starting UNet; use the same --unet or another --output_dir"
        )
    run.accelerator.load_state(str(ckpt))
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.global_step = state["global_step"]
    run.log(f"resumed from {ckpt} at step {trainer.global_step}")


def train(args, run, models, data, pairs, trainer, metrics_path):
    """The optimisation: --max_train_steps optimizer steps of --gradient_accumulation_steps micro-steps (train_step),
    from the resumed step on; a metrics.jsonl row per step, a checkpoint every --checkpointing_steps, validation images
    every --validation_steps; a scheduler's stop signal (StopSignals) ends it after a checkpoint of the step."""
    accum, per_device, world = args.gradient_accumulation_steps, args.train_batch_size, run.accelerator.num_processes
    loader = step_loader(args, run, models, pairs, trainer.global_step)
    # add_noise/get_velocity index it on the device, without a copy per step
    models.scheduler.alphas_cumprod = models.scheduler.alphas_cumprod.to(run.device)
    run.log(
        f"training {args.loss}: {len(pairs.dataset)} pairs, {args.max_train_steps} steps of "
        f"{per_device} x {world} x {accum} = {pairs.global_batch * accum} pairs"
    )
    progress = tqdm(
        total=args.max_train_steps, initial=trainer.global_step, disable=not run.main_process, desc=f"train {args.loss}"
    )
    stop = StopSignals()  # a scheduler's SIGTERM / SIGUSR1: checkpoint after this step and exit
    sums = StepSums(run.accelerator, stop)
    validation = Validation(args, run, models)  # --validation_prompts: pictures of the policy as it trains
    validation.after_step(trainer.global_step, trainer.unet)  # step 0: what theta_k itself samples
    with stop, progress as bar:  # the bar is closed before any error message, so the message is the last line
        for batch in loader:
            row = train_step(batch, args, run, models, data, trainer, sums)
            if row is None:  # a micro-step within the accumulation: no optimizer step yet
                continue
            if run.main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            run.accelerator.log(row, step=trainer.global_step)
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}", **({"acc": f"{row['implicit_acc']:.2f}"} if "implicit_acc" in row else {})
            )
            last = trainer.global_step == args.max_train_steps  # a stop signal during the last step: just finish
            if not last and (trainer.global_step % args.checkpointing_steps == 0 or stop.agreed):
                save_checkpoint(
                    run.accelerator, run.out, trainer.global_step, trainer.lr_scheduler, args, models.fingerprint
                )
                if stop.agreed:
                    break
            validation.after_step(trainer.global_step, trainer.unet)
    validation.close()  # the pipeline holds the policy: let save_outputs free it
    if stop.agreed and trainer.global_step < args.max_train_steps:
        exit_stopped(run, args, stop.agreed, trainer.global_step)


# How schedulers say "stop soon" (SLURM also --signal=USR1@...). Windows has no SIGUSR1.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """While training, SIGTERM / SIGUSR1 end the run after the current optimizer step, with a checkpoint of it. The
    handler only notes the signal; the processes agree on it in the step's one reduce (StepSums.reduce), so all stop
    after the same step however late the signal reached each. A context, installed around the training loop only:
    before it a killed run re-encodes its caches safely (atomic pieces), after it unet/ is written atomically."""

    def __init__(self):
        self.received = set()  # the signals this process got
        self.agreed = None  # the signal every process stops on, once a step's reduce has seen one
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            self.previous = {s: signal.signal(s, self.note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():  # None: a handler not set from Python, i.e. the default
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def note(self, signum, frame):
        self.received.add(signum)  # a set: under SLURM a worker may get a signal twice (directly, and from torchrun)

    def flags(self):
        """One 0/1 per STOP_SIGNALS: whether this process got it (summed over the processes by StepSums.reduce)."""
        return [float(s in self.received) for s in STOP_SIGNALS]

    def agree(self, counts):
        """The flags summed over the processes: the first of STOP_SIGNALS any of them got, the same on every one."""
        self.agreed = next((s for s, c in zip(STOP_SIGNALS, counts) if c > 0), None)


def exit_stopped(run, args, signum, step):
    """After a stop's checkpoint: one line, and exit status 128 + the signal's number (what shells report for a process
    the signal killed): non-zero, so a `set -e` script (spin_loop.sh) stops instead of starting the next stage."""
    flag = "" if args.resume_from_checkpoint == "latest" else " with --resume_from_checkpoint latest"
    run.accelerator.end_training()  # the trackers' last writes, and the process group closed
    if run.main_process:
        print(
            f"stopped by {signal.Signals(signum).name} at step {step} of {args.max_train_steps}: saved "
            f"{run.out / f'checkpoint-{step}'}; run the same command{flag} to continue",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(128 + signum)


def step_loader(args, run, models, pairs, global_step):
    """Item m is micro-step m's batch with its draws (StepBatches); workers prefetch it into pinned memory."""
    accum = args.gradient_accumulation_steps
    steps = StepBatches(
        pairs.dataset,
        args.seed,
        pairs.global_batch,
        run.accelerator.process_index,
        args.train_batch_size,
        pairs.latent_shape,
        models.scheduler.config.num_train_timesteps,
        args.pair_noise,
        args.caption_dropout,
    )
    return torch.utils.data.DataLoader(
        steps,
        batch_size=None,
        sampler=range(global_step * accum, args.max_train_steps * accum),
        num_workers=args.dataloader_num_workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=leave_stop_signals_to_training,
    )


def leave_stop_signals_to_training(worker_id):
    """A DataLoader worker leaves SIGTERM / SIGUSR1 to the training process (StopSignals): a scheduler signals every
    process of the job, and a worker it killed would fail the run before its stop checkpoint. The training process's
    own SIGTERM (how multiprocessing ends its workers) still ends the worker: sigwaitinfo tells who sent it. A signal
    goes to any thread that does not block it, so this needs the worker's one thread, as fork starts it (Linux's
    default up to Python 3.13; spawn and forkserver start a second one): elsewhere SIGTERM keeps its default."""
    import multiprocessing

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the training process never sends it to a worker
    tasks = Path("/proc/self/task")  # Linux: one entry per thread
    if not hasattr(signal, "sigwaitinfo") or not tasks.is_dir() or len(list(tasks.iterdir())) > 1:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask
    parent = multiprocessing.parent_process().pid  # the training process

    def exit_on_parents_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=exit_on_parents_sigterm, daemon=True).start()


# ---------------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------------
def train_step(batch, args, run, models, data, trainer, sums):
    """One micro-step: the pair (or, SFT, the real image) noised with the step's draws, the loss and its gradient.
    The last micro-step of an optimizer step also clips, guards against a non-finite loss and steps the optimizer;
    it returns the step's metrics row, the others None."""
    accelerator = run.accelerator
    sums.pairs += batch["real"].shape[0]  # counted on the host: no device sync
    draws, cond, real = step_inputs(batch, args, models, data, run.device)
    with accelerator.accumulate(trainer.unet):
        if args.loss == "sft":
            loss, stats = sft_loss(trainer.unet, models.scheduler, real, draws, cond)
        else:
            other = batch["other"].to(run.device, non_blocking=True)
            loss, stats = pair_loss(
                trainer.unet,
                trainer.reference,
                models.scheduler,
                real,
                other,
                draws,
                cond,
                beta=args.beta,
                autocast=accelerator.autocast,
            )
        accelerator.backward(loss)
        sync = accelerator.sync_gradients  # the last micro-step of an optimizer step
        grad_norm = accelerator.clip_grad_norm_(trainer.trainable, args.max_grad_norm) if sync else None
        sums.add(loss, stats, real.shape[0])
        if sync:
            step = sums.reduce(grad_norm)
            refuse_non_finite(step, trainer.global_step + 1, accelerator, run.out)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    if not sync:
        return None
    step_lr = trainer.lr_scheduler.get_last_lr()[0]  # the rate this step used
    skipped = accelerator.optimizer_step_was_skipped  # fp16: the scaler found inf/nan gradients
    if not skipped:  # a skipped step changed no weight, so it does not advance the schedule either
        trainer.lr_scheduler.step()
    trainer.global_step += 1
    row = step.row(trainer.global_step, step_lr, time.time() - sums.t0, skipped)
    sums.reset()
    return row


def step_inputs(batch, args, models, data, device):
    """A micro-step's batch on the device: its draws (StepDraws), its conditioning with caption dropout applied
    (Conditioning; SDXL's laid out for pair_loss's concatenated batch) and the real latents."""

    def to_dev(x):
        return x.to(device, non_blocking=True)

    t, noise = to_dev(batch["t"]), to_dev(batch["noise"])
    t2, noise2 = (to_dev(batch["t2"]), to_dev(batch["noise2"])) if "t2" in batch else (t, noise)
    text = to_dev(batch["text"])
    drop = to_dev(batch["drop"]) if args.caption_dropout > 0 else None
    if drop is not None:
        text = torch.where(drop[:, None, None], data.empty_text, text)
    added = None
    if models.sdxl:  # pooled prompt embedding (dropped like the prompt) and each image's micro-conditioning
        pooled = to_dev(batch["pooled"])
        if drop is not None:
            pooled = torch.where(drop[:, None], data.empty_pooled, pooled)
        ids = to_dev(batch["time_ids"])
        if args.loss != "sft":
            pooled, ids = torch.cat([pooled, pooled]), torch.cat([ids, to_dev(batch["time_ids_other"])])
        added = {"text_embeds": pooled, "time_ids": ids}
    return StepDraws(t, noise, t2, noise2, drop), Conditioning(text, added), to_dev(batch["real"])


@dataclass
class StepMetrics:
    """One optimizer step's means over its pairs (every micro-step, every process), and its gradient norm."""

    loss: float
    stats: dict  # the loss's statistics by name (pair_stats; SFT: model_mse_real)
    pairs: float
    grad_norm: float

    def row(self, step, lr, seconds, skipped):
        """The step's metrics.jsonl line."""
        return {
            "step": step,
            "loss": self.loss,
            **self.stats,
            "lr": lr,
            "grad_norm": self.grad_norm,
            "pairs_per_s": self.pairs / seconds,
            **({"skipped": True} if skipped else {}),
        }


class StepSums:
    """The metric sums of one optimizer step's micro-steps. They stay on the device until the optimizer step: one
    host sync per step (the metrics and the non-finite guard need it), none per micro-step."""

    def __init__(self, accelerator, stop):
        self.accelerator, self.stop = accelerator, stop
        self.reset()

    def reset(self):
        self.sums, self.names, self.pairs, self.t0 = None, None, 0, time.time()

    def add(self, loss, stats, batch_size):
        batch_sums = torch.stack([loss.detach() * batch_size] + [v.detach().sum() for v in stats.values()])
        self.sums = batch_sums if self.sums is None else self.sums + batch_sums
        self.names = list(stats)

    def reduce(self, grad_norm):
        """The sums over every process, divided by the pairs counted: StepMetrics. The same reduce carries each
        process's stop flags (StopSignals.agree), so agreeing on a stop costs no synchronisation of its own."""
        dev = self.accelerator.device
        counts = torch.tensor([float(self.pairs), *self.stop.flags()], device=dev)
        total = self.accelerator.reduce(torch.cat([self.sums, counts]), "sum").tolist()
        end = self.sums.numel()
        vals, n = total[:end], total[end]
        self.stop.agree(total[end + 1 :])
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        return StepMetrics(vals[0] / n, {k: v / n for k, v in zip(self.names, vals[1:])}, n, gn)


def refuse_non_finite(step, step_number, accelerator, out):
    """A non-finite loss would poison the weights: stop before the optimizer applies it (fp16's grad scaler skips
    non-finite gradients itself)."""
    if not math.isfinite(step.loss) or (not math.isfinite(step.grad_norm) and accelerator.mixed_precision != "fp16"):
        last = list_checkpoints(out)
        raise UserError(
            f"non-finite loss at step {step_number} (loss {step.loss}, grad norm {step.grad_norm}): "
            "lower --learning_rate or --beta, prefer bf16 to fp16, check the data"
            + (f"; the last good checkpoint is {last[-1]}" if last else "")
            + "; no unet/ was written"
        )


# ---------------------------------------------------------------------------------------------------------
# Validation images while training: the pictures that show a run diverging or over-training
# ---------------------------------------------------------------------------------------------------------
# The pipeline class of each model family, and what it is loaded with: no safety checker (its black images would
# hide what the model makes) and no watermark, as generate.py loads them.
VALIDATION_PIPELINES = {
    "sd": ("StableDiffusionPipeline", {"safety_checker": None, "requires_safety_checker": False}),
    "sdxl": ("StableDiffusionXLPipeline", {"add_watermarker": False}),
}


class Validation:
    """--validation_prompts: the policy samples the same prompts from the same seeds before the first step, every
    --validation_steps and after the last, the way generate.py samples (image i of prompt p from its own seed
    image_seed(--validation_seed, p, i), the pipeline's final latent decoded here), so step 0 is what generate.py makes
    from theta_k. Each is written to output_dir/validation/step-N/ (images/, metadata.jsonl, grid.png: a row per
    prompt) and sent to --report_to's tensorboard or wandb. The prompts are shared out among the processes (prompt p
    to process p % N, as generate.py shares them) and the main process writes them all, so no process waits on one
    that samples alone; the rest of the pipeline (VAE, text encoders) is loaded once and kept on the CPU in between.
    It draws only from its own generators: the training is the same with or without it."""

    def __init__(self, args, run, models):
        self.args, self.run, self.models, self.pipe = args, run, models, None

    def after_step(self, step, unet):
        a, accelerator = self.args, self.run.accelerator
        if not a.validation_prompts or not (step % a.validation_steps == 0 or step == a.max_train_steps):
            return
        folder = self.run.out / "validation" / f"step-{step}"
        if folder.is_dir():  # a resumed run keeps the steps it already sampled (every process sees the same folder)
            return
        mine = range(accelerator.process_index, len(a.validation_prompts), accelerator.num_processes)
        pixels = self.sample(accelerator.unwrap_model(unet), mine) if mine else {}
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            pixels = {p: x for part in gather_object([pixels]) for p, x in part.items()}
        if self.run.main_process:
            pixels = np.stack([pixels[p] for p in range(len(a.validation_prompts))])
            grid = write_validation_folder(folder, pixels, a.validation_prompts, self.seeds())
            log_validation_images(accelerator, grid, pixels, a.validation_prompts, step)
        accelerator.wait_for_everyone()

    def seeds(self):
        n = self.args.num_validation_images
        return [
            [image_seed(self.args.validation_seed, p, i) for i in range(n)]
            for p in range(len(self.args.validation_prompts))
        ]

    @torch.no_grad()
    def sample(self, unet, prompt_indices):
        """{prompt index: uint8 images [images per prompt, H, W, 3]}: one pipeline call per prompt, its images' noise
        from their own seeds, in the run's precision (under autocast, as the policy trains)."""
        a, device = self.args, self.run.device
        pipe = self.pipeline(unet)
        r, f = a.resolution, pipe.vae_scale_factor
        shape = (unet.config.in_channels, r // f, r // f)
        extra = {"original_size": (r, r), "crops_coords_top_left": (0, 0), "target_size": (r, r)}
        was_training = unet.training
        unet.eval()
        out, seeds = {}, self.seeds()
        try:
            for p in prompt_indices:
                noise, gens = initial_noise(seeds[p], shape)
                with self.run.accelerator.autocast():
                    latents = pipe(
                        prompt=[a.validation_prompts[p]] * len(seeds[p]),
                        latents=noise.to(device),
                        generator=gens,
                        num_inference_steps=a.validation_num_inference_steps,
                        guidance_scale=a.validation_guidance_scale,
                        height=r,
                        width=r,
                        output_type="latent",
                        **(extra if self.models.sdxl else {}),
                    ).images
                out[p] = to_pixels(decode_latents(pipe.vae, latents, latents_mean_std=self.models.sdxl)).numpy()
        finally:
            unet.train(was_training)
            self.offload()
        return out

    def pipeline(self, unet):
        """The base pipeline around the policy, loaded on first use; its other parts moved to the device."""
        if self.pipe is None:
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()  # their loading bars would break the training's
            transformers.utils.logging.disable_progress_bar()
            name, kwargs = VALIDATION_PIPELINES[self.models.family]
            base = self.models.base
            pipe = load_component(
                f"the pipeline {base!r}",
                getattr(diffusers, name).from_pretrained,
                base,
                unet=unet,
                dtype=self.run.dtype,
                revision=self.args.revision,
                variant=self.args.variant,
                **kwargs,
            )
            if self.args.validation_scheduler:
                cls = getattr(diffusers, SCHEDULERS[self.args.validation_scheduler])
                pipe.scheduler = cls.from_config(pipe.scheduler.config)
            pipe.vae.to(self.models.vae_dtype)  # fp32 where the VAE's config asks for it (SDXL's in fp16)
            pipe.set_progress_bar_config(disable=True)
            self.pipe = pipe
        for part in self.parts():
            part.to(self.run.device)
        return self.pipe

    def parts(self):
        names = ("vae", "text_encoder", "text_encoder_2")
        return [getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]

    def offload(self):
        """The VAE and text encoders go back to the CPU: the training has their memory."""
        if self.pipe is not None and self.run.device.type != "cpu":
            for part in self.parts():
                part.to("cpu")

    def close(self):
        self.pipe = None


def validation_grid(pixels):
    """uint8 [prompts, images, H, W, 3] -> one image: a row per prompt, its images side by side."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in pixels], axis=0)


def write_validation_folder(folder, pixels, prompts, seeds):
    """validation/step-N/: images/<key>.png named as generate.py names them, metadata.jsonl (file_name, prompt,
    prompt_index, image_index, seed) and grid.png; written under a temp name and renamed, so a folder that exists is
    complete. Returns the grid."""
    tmp = folder.with_name(f"{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows = []
    for p, (prompt, images) in enumerate(zip(prompts, pixels)):
        for i, img in enumerate(images):
            name = f"images/{image_key(p, i)}.png"
            Image.fromarray(img).save(tmp / name, format="PNG")
            rows.append({"file_name": name, "prompt": prompt, "prompt_index": p, "image_index": i, "seed": seeds[p][i]})
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid = validation_grid(pixels)
    Image.fromarray(grid).save(tmp / "grid.png", format="PNG")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return grid


def log_validation_images(accelerator, grid, pixels, prompts, step):
    """The step's pictures to the trackers that show images: tensorboard gets the grid, wandb every image with its
    prompt as caption."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            images = [wandb.Image(img, caption=f"{p}: {q}") for p, q in enumerate(prompts) for img in pixels[p]]
            tracker.log({"validation": images}, step=step)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Models:
    """theta_k and the parts of its pipeline that training needs."""

    base: str  # --pretrained_model_name_or_path: VAE, text encoder(s), tokenizer(s), scheduler
    scheduler: Any  # DDPMScheduler: how latents are noised and what the UNet predicts
    tokenizers: tuple  # SD: (CLIP tokenizer,); SDXL: (tokenizer, tokenizer_2)
    unet: Any  # theta_k, float32: the policy that trains
    fingerprint: str  # of theta_k's weights: the opponent check, the resume check, the run record
    family: str  # "sd" (SD-1.x/2.x) or "sdxl": model_family
    force_zeros: bool  # SDXL base: the unconditional branch's prompt embeddings are zeros, not the empty prompt's
    vae_config: dict
    vae_dtype: torch.dtype  # the compute dtype, but fp32 where the VAE asks for it (force_upcast)

    @property
    def sdxl(self):
        return self.family == "sdxl"


def load_component(what, load, *args, **kwargs):
    """load(*args, **kwargs) (a from_pretrained or load_config); a missing or unreadable file is one line naming
    `what`."""
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as e:
        msg = variant_hint(e, kwargs.get("variant"))
        raise UserError(f"could not load {what}: {msg}") from None


def load_tokenizer(what, cls, base, subfolder, revision):
    """A pipeline's tokenizer, refused in one line where the folder lacks its files (check_tokenizer)."""
    tokenizer = load_component(what, cls.from_pretrained, base, subfolder=subfolder, revision=revision)
    return check_tokenizer(tokenizer, what, subfolder)


def model_family(unet_config):
    """'sdxl' when the UNet also takes the pooled prompt embedding and the micro-conditioning (addition_embed_type
    text_time), 'sd' for SD-1.x/2.x (none); any other is refused."""
    kind = unet_config.addition_embed_type
    if kind not in (None, "text_time"):
        raise UserError(f"UNet addition_embed_type {kind!r} is not supported (SD-1.x/2.x: none, SDXL: text_time)")
    return "sdxl" if kind == "text_time" else "sd"


def load_models(args, run):
    """theta_k (--unet, float32) with the base pipeline's scheduler, tokenizer(s) and VAE config; sets --resolution's
    default, the UNet's native latent size times the VAE's downsampling."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
    from transformers import CLIPTokenizer

    check_model_path(args.pretrained_model_name_or_path)
    base, rev = args.pretrained_model_name_or_path, args.revision
    pipeline = f"the pipeline {base!r}"
    scheduler = load_component(pipeline, DDPMScheduler.from_pretrained, base, subfolder="scheduler", revision=rev)
    tokenizers = (load_tokenizer(pipeline, CLIPTokenizer, base, "tokenizer", rev),)
    unet = load_unet(args.unet, base, rev, args.variant)
    fingerprint = unet_fingerprint(unet)
    if args.enable_xformers_memory_efficient_attention:
        use_xformers(unet, run.log)
    family = model_family(unet.config)
    force_zeros = False
    if family == "sdxl":
        sdxl_pipeline = f"the SDXL pipeline {base!r}"
        tokenizers += (load_tokenizer(sdxl_pipeline, CLIPTokenizer, base, "tokenizer_2", rev),)
        config = load_component(sdxl_pipeline, DiffusionPipeline.load_config, base, revision=rev)
        force_zeros = bool(config.get("force_zeros_for_empty_prompt", True))
    vae_config = load_component(
        f"the VAE config of {base!r}", AutoencoderKL.load_config, base, subfolder="vae", revision=rev
    )
    if args.resolution is None:
        args.resolution = unet.config.sample_size * 2 ** (len(vae_config["block_out_channels"]) - 1)
    # SDXL's VAE overflows in fp16: its config asks for fp32 (force_upcast), as the pipeline does; bf16's range is
    # fp32's, so bf16 is kept.
    vae_dtype = torch.float32 if vae_config.get("force_upcast", False) and run.dtype == torch.float16 else run.dtype
    return Models(base, scheduler, tokenizers, unet, fingerprint, family, force_zeros, vae_config, vae_dtype)


def use_xformers(unet, log):
    """diffusers' --enable_xformers_memory_efficient_attention: xformers' kernels where the package is installed (the
    reference, a copy of this UNet, inherits them); without it the UNet keeps PyTorch's scaled_dot_product_attention,
    a memory-efficient kernel already, and the log says so instead of failing."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        log(
            "note: xformers is not installed; the UNet uses PyTorch's scaled_dot_product_attention (memory-efficient "
            "already)"
        )
        return
    unet.enable_xformers_memory_efficient_attention()


UNSUPPORTED_ENGINES = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def refuse_unsupported_engine(environ):
    """This script accumulates, clips, guards against non-finite losses and saves around a plain DDP step. DeepSpeed,
    FSDP and Megatron-LM take those over (their own accumulation, clipping after their step, no autocast, sharded or
    bf16 saves), so a launch through them would train something else without saying so."""
    for var, name in UNSUPPORTED_ENGINES.items():
        if environ.get(var, "false").lower() in ("true", "1", "yes"):
            raise UserError(
                f"{name} launches are not supported: train_spin.py runs DDP on any number of GPUs and nodes "
                "(accelerate launch --multi_gpu, or torchrun); for a model that does not fit, train a "
                "LoRA adapter (--lora_rank)"
            )


def check_shared_folders(accelerator, folders):
    """Every process writes into --cache_dir (its pieces of the cache) and --output_dir (its RNG state in each
    checkpoint) and reads what the others wrote there, so with several nodes each must be one shared folder. The main
    process leaves a marker in each; a process that does not see it stops every process with one line."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    token = broadcast_object_list([secrets.token_hex(8) if accelerator.is_main_process else None])[0]
    marks = {flag: Path(folder) / f".shared-check-{token}" for flag, folder in folders.items()}
    if accelerator.is_main_process:
        for mark in marks.values():
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text("")
    accelerator.wait_for_everyone()
    unseen = gather_object([[flag for flag, mark in marks.items() if not mark.is_file()]])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for mark in marks.values():
            mark.unlink(missing_ok=True)
    bad = sorted({flag for per_process in unseen for flag in per_process})
    if bad:
        ranks = [i for i, per_process in enumerate(unseen) if per_process]
        raise UserError(
            f"{' and '.join(bad)} must be one folder shared by all {accelerator.num_processes} processes "
            f"(process(es) {ranks} do not see the main process's files there): on several nodes put "
            "them on a filesystem every node mounts at the same path"
        )


def is_norm(module):
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(module).__name__


def cast_frozen(module, dtype):
    """Hold a module's frozen weights in the compute dtype. Under autocast every matmul and convolution casts its
    fp32 weight to that dtype on each call anyway, so the cast copy computes exactly the same, in half the memory;
    normalisation layers compute in fp32 under autocast, so their weights stay fp32. Trainable weights stay fp32."""
    if dtype == torch.float32:
        return module
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if not p.requires_grad:
                # the norms' fp32 weights are copied too, so that no tensor keeps the loaded file's mapping alive
                p.data = p.data.clone() if is_norm(m) else p.data.to(dtype)
    return module


def checkpoint_adapter_only(accelerator):
    """A LoRA run's checkpoint-N/ holds the adapter, not the frozen UNet under it (its optimizer state holds only the
    adapter's anyway): megabytes instead of gigabytes. Resuming puts the adapter back into the same frozen UNet."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            state = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(output_dir, ADAPTER_FILE)
            )
        weights.clear()

    def load(models, input_dir):
        path = os.path.join(input_dir, ADAPTER_FILE)
        if not os.path.isfile(path):
            raise UserError(
                f"checkpoint {input_dir} has no {ADAPTER_FILE}: it was not written by a LoRA run "
                "(resume with the flags that made it, or use another --output_dir)"
            )
        result = set_peft_model_state_dict(accelerator.unwrap_model(models.pop()), load_file(path))
        if result.unexpected_keys:
            raise UserError(
                f"checkpoint {input_dir}: its adapter does not fit this UNet (e.g. {result.unexpected_keys[0]}); "
                "resume with the --lora_* flags that made it"
            )

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def add_lora(unet, rank, alpha, target_modules, seed=0):
    """Freeze the UNet under a trainable LoRA adapter (lora_config): B starts at zero, so at step 0 the policy computes
    exactly what the UNet computes and the first loss is ln 2; A's random start is drawn from `seed`."""
    from diffusers.training_utils import cast_training_params

    config = lora_config(rank, alpha, target_modules)
    unet.requires_grad_(False)
    try:
        torch.manual_seed(image_seed(seed, -2, 0))
        unet.add_adapter(config)
    except ValueError as e:
        raise UserError(f"--lora_target_modules {target_modules}: {str(e).splitlines()[0]}") from None
    cast_training_params(unet)  # the adapter's weights train in float32 whatever --mixed_precision
    return unet


class WithoutAdapter:
    """The frozen reference of a LoRA run: the policy's own UNet with its adapter switched off, so no second copy of
    the UNet is held in memory. Called only under no_grad."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


# ---------------------------------------------------------------------------------------------------------
# Data: real rows -> cached latents; captions -> cached text embeddings; synthetic folder -> pairs.
# ---------------------------------------------------------------------------------------------------------
SHARD = 1024  # rows per shard file of the text and synthetic-image caches
PIECE_ROWS = 1024  # rows per piece of a downloaded dataset (a streamed one is cut by its files)
CHUNK = 64  # images decoded and encoded at a time


@dataclass
class RealData:
    """The real rows, encoded: where their latents and prompt embeddings are cached, which rows are usable, each
    row's prompt, and what caption dropout trains on (the unconditional branch's conditioning)."""

    lat_dir: Path
    txt_dir: Path
    info: dict  # the latent cache's counters (usable_rows, rows_read, ties_dropped, ...)
    captions: list  # per cache row
    valid: list  # per cache row: its image decoded
    caption_ids: list  # per cache row: its prompt's row in the text cache
    empty_text: torch.Tensor
    empty_pooled: Optional[torch.Tensor]  # SDXL only


class ImageEncoder:
    """PIL images -> latents, exactly as every real image is encoded (synthetic images too, with --synthetic_latent
    image). The VAE is loaded on first use: a run whose caches are complete never loads it."""

    def __init__(self, args, run, models):
        self.base, self.dtype, self.device, self.resolution = models.base, models.vae_dtype, run.device, args.resolution
        self.revision, self.variant = args.revision, args.variant
        self.vae = None

    def __call__(self, imgs):
        from diffusers import AutoencoderKL

        if self.vae is None:
            self.vae = load_component(
                f"the VAE of {self.base!r}",
                AutoencoderKL.from_pretrained,
                self.base,
                subfolder="vae",
                torch_dtype=self.dtype,
                revision=self.revision,
                variant=self.variant,
            ).to(self.device)
            self.vae.requires_grad_(False)
        x = torch.stack([preprocess_image(im, self.resolution) for im in imgs])
        return torch.cat([encode_images(self.vae, x[i : i + 16]) for i in range(0, len(x), 16)])


def encode_real_data(args, run, models, encode):
    """The real rows' latents and their prompts' embeddings, each computed once into --cache_dir (keyed by model and
    data: later iterations reuse them), plus the empty prompt for caption dropout."""
    lat_dir = encode_real_images(args, run, models, encode)
    info = json.loads((lat_dir / "info.json").read_text())
    captions = json.loads((lat_dir / "captions.json").read_text())
    invalid = set(info["invalid_rows"])
    valid = [i not in invalid for i in range(len(captions))]
    run.log(
        f"real data: {info['usable_rows']} usable rows of {info['rows_read']} read "
        f"({info['ties_dropped']} ties dropped, {info['undecodable_rows']} undecodable images skipped)"
    )
    unique = list(dict.fromkeys([""] + captions))  # the empty prompt first: caption dropout's
    pos = {c: i for i, c in enumerate(unique)}
    txt_dir = encode_prompts_once(args, run, models, unique)
    # What caption dropout trains on: what the pipeline's unconditional branch sees (the empty prompt's embeddings,
    # or zeros for SDXL base's force_zeros_for_empty_prompt), pooled embedding included.
    empty_text = ShardedTensors(txt_dir, "text")[0].to(run.device)
    empty_pooled = ShardedTensors(txt_dir, "pooled")[0].to(run.device) if models.sdxl else None
    if models.force_zeros:
        empty_text, empty_pooled = torch.zeros_like(empty_text), torch.zeros_like(empty_pooled)
    return RealData(lat_dir, txt_dir, info, captions, valid, [pos[c] for c in captions], empty_text, empty_pooled)


def encode_real_images(args, run, models, encode):
    """The latent cache of the real rows (DPO: with each row's loser), built once; returns its folder."""
    with_loser = args.loss == "dpo"
    lat_dir = Path(args.cache_dir) / (
        "latents-"
        + cache_key(
            dataset=source_fingerprint(args.dataset),
            split=args.split,
            image_column=args.image_column,
            caption_column=args.caption_column,
            max_train_samples=args.max_train_samples,
            resolution=args.resolution,
            with_loser=with_loser,
            vae=weights_identity(models.base, "vae"),
            vae_dtype=str(models.vae_dtype),
            **base_pin(args),
        )
    )
    if not cache_complete(lat_dir):
        run.log(f"encoding the real images once into {lat_dir} ...")
        pieces = dataset_pieces(open_dataset(args.dataset, args.split, args.streaming))

        def read(piece, stats):
            return iter_examples(
                piece, args.caption_column, args.image_column, with_images=True, with_loser=with_loser, stats=stats
            )

        t_build = time.time()
        build_latent_cache(lat_dir, pieces, read, encode, run.accelerator, with_loser, args.max_train_samples)
        built, seconds = json.loads((lat_dir / "info.json").read_text())["rows_read"], time.time() - t_build
        run.log(
            f"encoded {built} rows in {seconds:.1f}s ({built / seconds:.1f} rows/s, "
            f"{run.accelerator.num_processes} process(es), {len(pieces)} piece(s) of the dataset)"
        )
    return lat_dir


def encode_prompts_once(args, run, models, unique):
    """The text cache of the unique prompts (the empty one first), built once; returns its folder."""
    base, sdxl = models.base, models.sdxl
    txt_dir = Path(args.cache_dir) / (
        "text-"
        + cache_key(
            captions=cache_key(c=unique),
            tokenizer=weights_identity(base, "tokenizer"),
            text_encoder=weights_identity(base, "text_encoder"),
            text_encoder_dtype=str(run.dtype),
            **base_pin(args),
            **(
                {
                    "tokenizer_2": weights_identity(base, "tokenizer_2"),
                    "text_encoder_2": weights_identity(base, "text_encoder_2"),
                }
                if sdxl
                else {}
            ),
        )
    )
    if cache_complete(txt_dir):
        return txt_dir
    run.log(f"encoding {len(unique)} prompts once into {txt_dir} ...")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    what, pin = f"the text encoder(s) of {base!r}", {"revision": args.revision, "variant": args.variant}
    text_encoder = load_component(
        what, CLIPTextModel.from_pretrained, base, subfolder="text_encoder", torch_dtype=run.dtype, **pin
    ).to(run.device)
    if sdxl:
        text_encoder_2 = load_component(
            what,
            CLIPTextModelWithProjection.from_pretrained,
            base,
            subfolder="text_encoder_2",
            torch_dtype=run.dtype,
            **pin,
        ).to(run.device)
        build_text_cache(
            txt_dir,
            unique,
            lambda c: encode_prompts_sdxl((text_encoder, text_encoder_2), models.tokenizers, c),
            run.accelerator,
        )
    else:
        build_text_cache(
            txt_dir, unique, lambda c: encode_prompts(text_encoder, models.tokenizers[0], c), run.accelerator
        )
    return txt_dir


@dataclass
class Pairs:
    """What the training steps draw from: the pairs, the latent shape, the global batch (pairs per micro-step over
    every process), and where the opponent's samples came from (for the run record)."""

    dataset: Any  # PairDataset
    latent_shape: tuple
    global_batch: int
    synth_config: Optional[dict]  # --synthetic_dir's run_config.json (SPIN)
    syn_dir: Optional[Path]  # the cache of its PNGs encoded like real images (--synthetic_latent image)


def make_pairs(args, run, models, data, encode):
    """SPIN: each usable real row with one of the opponent's samples of the same prompt (pair_rows), after checking the
    opponent is theta_k itself; DPO: each row with its Pick-a-Pic loser; SFT: the real rows alone."""
    others, rows, other_source = None, [i for i, ok in enumerate(data.valid) if ok], None
    synth_config, syn_dir = None, None
    if args.loss == "dpo":
        other_source, others = ShardedTensors(data.lat_dir, "latents_lose"), rows
    if args.loss == "spin":
        synth_config, synthetic = read_synthetic_dir(args.synthetic_dir, args.synthetic_latent)
        check_opponent(args, run, synth_config, models.fingerprint)
        pairs, missing = pair_rows(data.captions, data.valid, synthetic)
        if missing:
            raise UserError(
                f"{len(missing)} training prompt(s) have no synthetic image in {args.synthetic_dir} "
                f"(e.g. {missing[0]!r}); run generate.py on the same --dataset/--split/--max_train_samples"
            )
        rows, others = [r for r, _ in pairs], [k for _, k in pairs]
        if args.synthetic_latent == "sampler":
            other_source = LatentFiles([r["path"] for r in synthetic])
        else:
            syn_dir = encode_synthetic_images(args, run, models, synthetic, encode)
            other_source = ShardedTensors(syn_dir, "latents")
    latent_shape = tuple(ShardedTensors(data.lat_dir, "latents")[rows[0]].shape)
    if other_source is not None and tuple(other_source[others[0]].shape) != latent_shape:
        raise UserError(
            f"synthetic latents are {tuple(other_source[others[0]].shape)} but real latents at "
            f"--resolution {args.resolution} are {latent_shape}: generate and train at the same resolution"
        )
    dataset = PairDataset(
        data.lat_dir,
        data.txt_dir,
        rows,
        others,
        data.caption_ids,
        other_source,
        sdxl_resolution=args.resolution if models.sdxl else None,
        loser=args.loss == "dpo",
    )
    global_batch = args.train_batch_size * run.accelerator.num_processes
    if len(dataset) < global_batch:
        raise UserError(
            f"only {len(dataset)} training pairs, fewer than one batch of {global_batch} "
            "(--train_batch_size x processes): lower --train_batch_size or add data"
        )
    return Pairs(dataset, latent_shape, global_batch, synth_config, syn_dir)


def check_opponent(args, run, synth_config, fingerprint):
    """SPIN's opponent is theta_k itself: --synthetic_dir must have been generated by the UNet being trained."""
    made_by = (synth_config.get("model") or {}).get("unet_fingerprint")
    if made_by == fingerprint:
        return
    msg = (
        f"--synthetic_dir {args.synthetic_dir} was generated by UNet {str(made_by)[:19]}... "
        f"({(synth_config.get('model') or {}).get('unet')!r}), but the UNet being trained "
        f"(--unet {args.unet or 'base'}) is {fingerprint[:19]}...: the opponent must be theta_k itself; "
        "regenerate with the same --unet, "
        "or pass --allow_opponent_mismatch"
    )
    if not args.allow_opponent_mismatch:
        raise UserError(msg)
    run.log("warning: " + msg)


def encode_synthetic_images(args, run, models, synthetic, encode):
    """The opponent's saved images, encoded once like real ones (cached: keyed by the files and the VAE); returns the
    cache's folder."""
    with Image.open(synthetic[0]["path"]) as im:
        if im.size != (args.resolution, args.resolution):
            raise UserError(
                f"synthetic images are {im.size[0]}x{im.size[1]} but --resolution is {args.resolution}: "
                "generate and train at the same resolution"
            )
    syn_dir = Path(args.cache_dir) / (
        "synthetic-"
        + cache_key(
            files=[(r["path"], os.stat(r["path"]).st_size, os.stat(r["path"]).st_mtime_ns) for r in synthetic],
            resolution=args.resolution,
            vae=weights_identity(models.base, "vae"),
            vae_dtype=str(models.vae_dtype),
            **base_pin(args),
        )
    )
    if cache_complete(syn_dir):
        return syn_dir
    run.log(f"encoding {len(synthetic)} synthetic images like real ones into {syn_dir} ...")

    def encode_synthetic(a, b):
        imgs = [decode_image(r["path"]) for r in synthetic[a:b]]
        bad = next((r["path"] for r, im in zip(synthetic[a:b], imgs) if im is None), None)
        if bad:
            raise UserError(
                f"synthetic image {bad} does not decode; delete its line from metadata.jsonl "
                "(or the whole folder) and rerun generate.py"
            )
        return torch.cat([encode(imgs[i : i + CHUNK]) for i in range(0, len(imgs), CHUNK)])

    build_sharded_cache(
        syn_dir,
        len(synthetic),
        encode_synthetic,
        "latents",
        run.accelerator,
        {"synthetic_dir": str(args.synthetic_dir)},
    )
    return syn_dir


def resize_crop(w, h, resolution):
    """Where preprocess_image puts an image of w x h: its resized size and the top-left corner of the centre crop."""
    s = resolution / min(w, h)
    rw, rh = max(resolution, round(w * s)), max(resolution, round(h * s))
    return rw, rh, (rw - resolution) // 2, (rh - resolution) // 2


def preprocess_image(img, resolution):
    """Resize the short side to `resolution` (bicubic), centre-crop, scale to [-1, 1], CHW float32."""
    rw, rh, left, top = resize_crop(*img.size, resolution)
    img = img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_images(vae, pixels):
    """Pixels in [-1, 1] -> scaled latents (the posterior mean: deterministic, so the cache is reproducible)."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (posterior.mean * vae.config.scaling_factor).float()


def time_ids(height, width, resolution):
    """SDXL's micro-conditioning of an image of height x width brought to `resolution` by preprocess_image, as the
    pipeline and diffusers' SDXL training take it: original size, crop top-left, target size."""
    _, _, left, top = resize_crop(width, height, resolution)
    return [height, width, top, left, resolution, resolution]


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, captions):
    """Captions -> the last hidden state of the text encoder on 77 padded tokens, as SD-1.x/2.x condition on."""
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float()


@torch.no_grad()
def encode_prompts_sdxl(text_encoders, tokenizers, captions):
    """Captions -> SDXL's conditioning, as StableDiffusionXLPipeline.encode_prompt computes it: the penultimate hidden
    states of both text encoders, concatenated, and the pooled (projected) embedding of the second."""
    hidden, pooled = [], None
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1).float(), pooled.float()


def source_fingerprint(name):
    """Identity of a dataset for the cache key: for local paths, the sizes and times of its files."""
    p = Path(name).expanduser()
    if not p.exists():
        return name
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve())] + [
        (str(f.relative_to(p)) if f != p else "", f.stat().st_size, f.stat().st_mtime_ns) for f in files
    ]


def weights_identity(base, subfolder):
    """Identity of a pipeline component for the cache keys: its config plus, for a local folder, the size and time
    of its weight files (a VAE with the same config but other weights must not reuse stale latents); for a hub id,
    the id (pass --revision with a commit, or download it to a folder, if the hub copy may change). Every weight file
    of the folder counts, so which --variant loads is base_pin's to say."""
    folder = Path(base).expanduser() / subfolder
    if not folder.is_dir():
        return f"{base}/{subfolder}"
    files = sorted(f for f in folder.iterdir() if f.is_file())
    return [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) if f.suffix != ".json" else (f.name, f.read_text())
        for f in files
    ]


def base_pin(args):
    """--revision and --variant where given, for the cache keys: they choose the base's weights (a run without them
    keeps its keys)."""
    return {k: getattr(args, k) for k in ("revision", "variant") if getattr(args, k)}


CACHE_FORMAT = 2  # part of every cache key: a cache written in an older layout is rebuilt, never misread


def cache_key(**parts):
    parts["format"] = CACHE_FORMAT
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_complete(path):
    return Path(path, "info.json").is_file()


def dataset_pieces(ds):
    """The dataset cut into pieces, in dataset order, each readable on its own: a process reads only its own pieces,
    so N processes read (and, streamed, download) the data once between them instead of N times. A streamed dataset
    is cut by its files (parquet: by row groups, where this `datasets` can); a downloaded one by row ranges. How it
    is cut changes only the cache's file layout, never its rows."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        if hasattr(ds, "reshard"):
            ds = ds.reshard()
        n = ds.num_shards if hasattr(ds, "num_shards") else ds.n_shards
        return [partial(ds.shard, num_shards=n, index=i) if n > 1 else (lambda: ds) for i in range(n)]
    n = len(ds)
    return [partial(ds.select, range(a, min(a + PIECE_ROWS, n))) for a in range(0, n, PIECE_ROWS)]


def encode_piece(out, examples, stats, encode, with_loser, max_rows):
    """Encode one piece's usable rows (ties already dropped by `examples`), at most `max_rows` of them, into one
    shard file, decoding CHUNK rows at a time (Pick-a-Pic images are large). A row whose image does not decode is
    kept in place and marked invalid. The file's metadata holds its captions, the position of each row among the
    piece's rows read (so a cut at --max_train_samples can recount ties exactly) and the piece's counters."""
    captions, source_rows, valid, cols = [], [], [], {"latents": [], "latents_lose": []}
    sizes = {"image_hw": [], "image_hw_lose": []}  # original height, width: SDXL's micro-conditioning
    examples = itertools.islice(examples, max_rows)
    while chunk := list(itertools.islice(((ex, stats["rows_read"] - 1) for ex in examples), CHUNK)):
        imgs = [[decode_image(ex["image"]) for ex, _ in chunk]]
        if with_loser:
            imgs.append([decode_image(ex["image_lose"]) for ex, _ in chunk])
        ok = torch.tensor([all(col[i] is not None for col in imgs) for i in range(len(chunk))])
        for key, col in zip(("latents", "latents_lose"), imgs):
            sizes["image_hw" + key[len("latents") :]] += [
                (im.height, im.width) if im is not None else (0, 0) for im in col
            ]
            lat = encode([im for im, good in zip(col, ok) if good]).cpu() if ok.any() else None
            full = torch.zeros((len(chunk), *(lat.shape[1:] if lat is not None else (1,))))
            if lat is not None:
                full[ok] = lat
            cols[key].append(full.to(torch.float16))  # half the disk; latents are O(1)
        captions += [ex["caption"] for ex, _ in chunk]
        source_rows += [i for _, i in chunk]
        valid.append(ok)

    def cat(parts):  # chunks of an all-undecodable chunk are (n, 1): give them the piece's latent shape
        shape = next((p.shape[1:] for p in parts if p.shape[1:] != (1,)), (1,))
        return (
            torch.cat([p if p.shape[1:] == shape else p.new_zeros((len(p), *shape)) for p in parts])
            if parts
            else torch.zeros(0, 1)
        )

    tensors = {
        "latents": cat(cols["latents"]).contiguous(),
        "valid": torch.cat(valid) if valid else torch.zeros(0, dtype=torch.bool),
        "image_hw": torch.tensor(sizes["image_hw"], dtype=torch.int32).reshape(-1, 2),
    }
    if with_loser:
        tensors["latents_lose"] = cat(cols["latents_lose"]).contiguous()
        tensors["image_hw_lose"] = torch.tensor(sizes["image_hw_lose"], dtype=torch.int32).reshape(-1, 2)
    meta = {
        "captions": json.dumps(captions),
        "source_rows": json.dumps(source_rows),
        "rows_read": str(stats["rows_read"]),
        "ties_dropped": str(stats["ties_dropped"]),
    }
    tmp = out.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)


def read_piece(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        return {
            "captions": json.loads(meta["captions"]),
            "source_rows": json.loads(meta["source_rows"]),
            "rows_read": int(meta["rows_read"]),
            "ties_dropped": int(meta["ties_dropped"]),
            "valid": f.get_tensor("valid").tolist(),
        }


def merge_pieces(pieces, max_rows):
    """The cache's row list from its pieces in order, cut at `max_rows` usable rows: captions, validity, rows per
    shard file, and the counters of the rows actually taken (ties and rows read only up to the cut). Each counter
    has its own name: rows read, ties dropped, cache rows (ties dropped, undecodable ones kept in place),
    undecodable and usable rows are never mixed up."""
    captions, valid, sizes, rows_read, ties = [], [], [], 0, 0
    for p in pieces:
        take = len(p["captions"]) if max_rows is None else min(len(p["captions"]), max_rows - len(captions))
        if take == len(p["captions"]) and (max_rows is None or len(captions) + take < max_rows):
            rows_read += p["rows_read"]  # the whole piece was used
            ties += p["ties_dropped"]
        else:  # the cut falls in this piece: count only the rows up to its last usable row taken
            read = p["source_rows"][take - 1] + 1 if take else 0
            rows_read, ties = rows_read + read, ties + read - take
        captions += p["captions"][:take]
        valid += p["valid"][:take]
        sizes.append(len(p["captions"]))
        if max_rows is not None and len(captions) >= max_rows:
            break
    return {
        "captions": captions,
        "valid": valid,
        "sizes": sizes,
        "counts": {
            "cache_rows": len(captions),
            "usable_rows": sum(valid),
            "rows_read": rows_read,
            "ties_dropped": ties,
            "undecodable_rows": len(valid) - sum(valid),
        },
    }


def build_latent_cache(path, pieces, read, encode, accelerator, with_loser, max_rows):
    """Encode every usable real row once. Piece i goes to process i mod N, which reads only its own pieces, in rounds
    of N pieces; with --max_train_samples the rounds stop once the pieces done hold enough usable rows. The result
    (shard i = piece i's usable rows) is the same whatever N. info.json, written last by the main process, marks
    the cache complete; a shard file that exists is complete, so an interrupted build resumes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = lambda i: path / f"shard-{i:05d}.safetensors"  # noqa: E731
    done, usable = 0, 0
    for first in range(0, len(pieces), world):
        i = first + rank
        if i < len(pieces) and not shard(i).is_file():
            stats = {}
            encode_piece(shard(i), read(pieces[i](), stats), stats, encode, with_loser, max_rows)
        accelerator.wait_for_everyone()
        if max_rows is not None:  # every process reads the same small headers, so all stop at the same round
            usable += sum(len(read_piece(shard(j))["captions"]) for j in range(done, min(first + world, len(pieces))))
        done = min(first + world, len(pieces))
        if max_rows is not None and usable >= max_rows:
            break
    merged = merge_pieces([read_piece(shard(j)) for j in range(done)], max_rows)
    if not merged["captions"]:
        raise UserError(
            "the dataset has no usable rows (after dropping ties); check --dataset/--split/--caption_column"
        )
    if accelerator.is_main_process:
        for j in range(len(merged["sizes"]), len(pieces)):  # pieces past the cut (other processes ran ahead)
            shard(j).unlink(missing_ok=True)
        (path / "captions.json").write_text(json.dumps(merged["captions"]))
        write_json_atomic(
            path / "info.json",
            {
                "sizes": merged["sizes"],
                **merged["counts"],
                "invalid_rows": [i for i, v in enumerate(merged["valid"]) if not v],
            },
        )
    accelerator.wait_for_everyone()


def build_sharded_cache(path, n, encode_range, key, accelerator, info=None):
    """A cache of n rows in shards of SHARD rows: process k encodes shards k, k+N, ...; `encode_range(a, b)` gives
    rows a..b-1 as one tensor (saved under `key`) or a dict of tensors. info.json (rows per shard + `info`), written
    last, marks it complete."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    for idx, start in enumerate(range(0, n, SHARD)):
        out = path / f"shard-{idx:05d}.safetensors"
        if idx % world == rank and not out.is_file():
            tensors = encode_range(start, min(start + SHARD, n))
            tensors = tensors if isinstance(tensors, dict) else {key: tensors}
            tmp = out.with_suffix(".tmp")
            save_file({k: v.cpu().to(torch.float16).contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, out)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sizes = [min(SHARD, n - s) for s in range(0, n, SHARD)]
        write_json_atomic(path / "info.json", {"sizes": sizes, **(info or {})})
    accelerator.wait_for_everyone()


def build_text_cache(path, captions, encode, accelerator):
    """Prompt embeddings, 64 captions per text-encoder call. `encode` gives the hidden states, or (SDXL) the hidden
    states and the pooled embeddings, saved as "text" and "pooled"."""

    def encode_range(a, b):
        parts = [encode(captions[i : min(i + 64, b)]) for i in range(a, b, 64)]
        if isinstance(parts[0], tuple):
            return {"text": torch.cat([p[0] for p in parts]), "pooled": torch.cat([p[1] for p in parts])}
        return torch.cat(parts)

    build_sharded_cache(path, len(captions), encode_range, "text", accelerator, {"captions": len(captions)})
    if accelerator.is_main_process:
        (Path(path) / "captions.json").write_text(json.dumps(captions))


class ShardedTensors:
    """Lazy row access to a cache folder's shard-*.safetensors, rows per file from its info.json (each DataLoader
    worker opens its own file handles)."""

    def __init__(self, path, key):
        self.path, self.key, self.files, self.bisect = Path(path), key, {}, bisect.bisect_right
        sizes = json.loads((self.path / "info.json").read_text())["sizes"]
        self.starts = [0]
        for s in sizes:
            self.starts.append(self.starts[-1] + s)

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, i):
        if not 0 <= i < self.starts[-1]:
            raise IndexError(f"row {i} of a cache with {self.starts[-1]} rows ({self.path})")
        s = self.bisect(self.starts, i) - 1
        if s not in self.files:
            self.files[s] = safe_open(str(self.path / f"shard-{s:05d}.safetensors"), "pt")
        j = i - self.starts[s]
        return self.files[s].get_slice(self.key)[j : j + 1][0].float()

    def __getstate__(self):  # handles do not pickle: DataLoader workers reopen
        return {**self.__dict__, "files": {}}


class LatentFiles:
    """generate.py's per-image latent files (the sampler's final latents), by index."""

    def __init__(self, paths):
        self.paths = paths

    def __getitem__(self, i):
        return load_latent(self.paths[i])


def load_latent(path):
    return load_file(str(path))["latent"].float()


def pair_rows(captions, valid, synthetic):
    """Pair each valid real row with one synthetic image of its caption. The j-th row of a caption takes that
    caption's synthetic image j mod (images per caption), so every synthetic image is used. A folder generated
    with generate.py --per_row (records carry "row", see read_synthetic_dir) pairs row i with its own image
    (the first of row i, of the same caption), as the paper's Algorithm 1 does. Returns [(row, index into
    `synthetic`)] and the captions that have no synthetic image."""
    by_prompt, seen, pairs, missing = {}, {}, [], {}
    per_row = bool(synthetic) and "row" in synthetic[0]
    for k, rec in enumerate(synthetic):
        key = (rec["row"], rec["prompt"]) if per_row else rec["prompt"]
        by_prompt.setdefault(key, []).append(k)
    for row, (cap, ok) in enumerate(zip(captions, valid)):
        if not ok:
            continue
        if per_row:
            found = by_prompt.get((row, cap))
            if found:
                pairs.append((row, found[0]))
            else:
                missing[cap] = None
            continue
        found = by_prompt.get(cap)
        if not found:
            missing[cap] = None
            continue
        j = seen.get(cap, 0)
        seen[cap] = j + 1
        pairs.append((row, found[j % len(found)]))
    return pairs, list(missing)


def read_synthetic_dir(path, kind="image"):
    """generate.py's folder: run_config.json (who generated) + metadata.jsonl (one line per finished image). `kind`
    is the file each row needs: "image" (the PNG, file_name) or "sampler" (the sampler's latent, latent_file)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--synthetic_dir {path}: folder not found; run generate.py first")
    if not (path / "run_config.json").is_file() or not (path / "metadata.jsonl").is_file():
        raise UserError(
            f"--synthetic_dir {path}: no run_config.json/metadata.jsonl; it must be a folder written by generate.py"
        )
    config = json.loads((path / "run_config.json").read_text())
    field = "file_name" if kind == "image" else "latent_file"
    # generate.py --per_row: prompt i is usable training row i (duplicates kept), so each record names its row
    per_row = bool((config.get("args") or {}).get("per_row"))
    rows = []
    for rec in read_jsonl(path / "metadata.jsonl"):
        if rec.get(field) and (path / rec[field]).is_file():
            rows.append({**rec, "path": str(path / rec[field]), **({"row": rec["prompt_index"]} if per_row else {})})
    if not rows:
        raise UserError(
            f"--synthetic_dir {path}: no finished images with {'PNG files' if kind == 'image' else 'latents'}; "
            "rerun generate.py to complete it" + (" (or pass --synthetic_latent image)" if kind != "image" else "")
        )
    rows.sort(key=lambda r: (r["prompt_index"], r["image_index"]))
    return config, rows


class PairDataset(torch.utils.data.Dataset):
    """Item i: real latent, the other latent (synthetic or loser; absent for SFT) and the prompt embedding, all
    read lazily from the caches (prompt embeddings of a large dataset do not fit in device memory)."""

    def __init__(
        self, latent_cache, text_cache, rows, others, caption_ids, other_source=None, sdxl_resolution=None, loser=False
    ):
        self.real = ShardedTensors(latent_cache, "latents")
        self.text = ShardedTensors(text_cache, "text")
        self.other_source = other_source  # ShardedTensors (loser latents, encoded synthetic images) or LatentFiles
        self.rows, self.others, self.caption_ids = rows, others, caption_ids
        self.res = sdxl_resolution  # SDXL: also the pooled embedding and each image's micro-conditioning
        if self.res:
            self.pooled = ShardedTensors(text_cache, "pooled")
            self.hw = ShardedTensors(latent_cache, "image_hw")
            self.hw_other = ShardedTensors(latent_cache, "image_hw_lose") if loser else None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        item = {"real": self.real[row], "text": self.text[self.caption_ids[row]]}
        if self.other_source is not None:
            item["other"] = self.other_source[self.others[i]]
        if self.res:
            item["pooled"] = self.pooled[self.caption_ids[row]]
            item["time_ids"] = torch.tensor(time_ids(*self.hw[row].int().tolist(), self.res), dtype=torch.float32)
            # a loser keeps its own size; an opponent image was generated at the training resolution, uncropped
            other = (
                time_ids(*self.hw_other[row].int().tolist(), self.res)
                if self.hw_other
                else time_ids(self.res, self.res, self.res)
            )
            item["time_ids_other"] = torch.tensor(other, dtype=torch.float32)
        return item


class StepBatches(torch.utils.data.Dataset):
    """Item m: this process's batch of micro-step m with everything its step draws (timesteps, noise, caption-dropout
    mask), made in the data pipeline, so the training loop's host work is the pinned, non-blocking copies. The batch
    and the draws are pure functions of (seed, m), as batch_indices and draw_step define them."""

    def __init__(
        self,
        pairs,
        seed,
        global_batch,
        process_index,
        per_device,
        latent_shape,
        num_train_timesteps,
        pair_noise,
        caption_dropout,
    ):
        self.pairs, self.seed, self.global_batch = pairs, seed, global_batch
        self.process_index, self.per_device, self.first = process_index, per_device, process_index * per_device
        self.latent_shape, self.T, self.pair_noise, self.caption_dropout = (
            latent_shape,
            num_train_timesteps,
            pair_noise,
            caption_dropout,
        )
        self.perm = (None, None)  # (epoch, permutation): each worker keeps the current epoch's

    def __getitem__(self, micro):
        n = len(self.pairs)
        epoch = micro // (n // self.global_batch)
        if self.perm[0] != epoch:
            self.perm = (epoch, epoch_permutation(n, self.seed, epoch))
        rows = batch_indices(n, self.seed, self.global_batch, micro, self.process_index, self.per_device, self.perm[1])
        batch = torch.utils.data.default_collate([self.pairs[i] for i in rows])
        draws = draw_step(
            self.seed,
            micro,
            self.global_batch,
            self.first,
            self.first + len(rows),
            self.latent_shape,
            self.T,
            self.pair_noise,
            self.caption_dropout,
        )
        batch.update(t=draws.t, noise=draws.noise, drop=draws.drop)
        if self.pair_noise != "shared":  # else the second member's draws are the first's: not copied twice
            batch.update(t2=draws.t2, noise2=draws.noise2)
        return batch


# ---------------------------------------------------------------------------------------------------------
# The run record, checkpoints and output
# ---------------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir):
    found = [
        p
        for p in Path(output_dir).glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[1].isdigit() and (p / "train_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def write_run_record(args, run, models, reference, pairs, data, trainer):
    """metrics.jsonl without the rows of steps that will be redone, and run_config.json (finished: false): what made
    this folder, with which settings, models, precision, data and caches. Starts --report_to's tracker."""
    accelerator, out = run.accelerator, run.out
    metrics_path = out / "metrics.jsonl"
    if run.main_process:
        kept = (
            [r for r in read_jsonl(metrics_path) if r["step"] <= trainer.global_step] if metrics_path.is_file() else []
        )
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        write_json_atomic(
            out / "run_config.json",
            run_config(
                "train",
                args,
                identity=identity(args),
                finished=False,
                num_processes=accelerator.num_processes,
                global_batch=pairs.global_batch * args.gradient_accumulation_steps,
                precision={
                    "compute": str(run.dtype),
                    "vae": str(models.vae_dtype),
                    "frozen_weights": str(run.dtype),
                    "trainable_weights": "torch.float32",
                },
                model={
                    "pretrained_model_name_or_path": models.base,
                    "unet": args.unet or "base",
                    "unet_fingerprint": models.fingerprint,
                    "conditioning": models.family,
                    "prediction_type": models.scheduler.config.prediction_type,
                },
                reference={
                    "unet": args.reference_unet or args.unet or "base",
                    "unet_fingerprint": reference.fingerprint,
                },
                opponent=(pairs.synth_config or {}).get("model"),
                data={
                    "pairs": len(pairs.dataset),
                    "synthetic_latent": args.synthetic_latent if args.loss == "spin" else None,
                    **{
                        k: data.info[k]
                        for k in ("usable_rows", "rows_read", "ties_dropped", "undecodable_rows", "cache_rows")
                    },
                },
                cache={
                    "latents": str(data.lat_dir),
                    "text": str(data.txt_dir),
                    "synthetic": str(pairs.syn_dir) if pairs.syn_dir else None,
                },
            ),
        )
    if accelerator.trackers == [] and args.report_to != "none":
        accelerator.init_trackers(
            "spin-diffusion", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )
    return metrics_path


def save_outputs(args, run, models, trainer, metrics_path):
    """theta_{k+1} as output_dir/unet/ (a LoRA run: the adapter as lora/ too, and unet/ merged), then the run record
    marked finished."""
    accelerator, out = run.accelerator, run.out
    accelerator.wait_for_everyone()
    if run.main_process:
        final = accelerator.unwrap_model(trainer.unet)
        if args.lora_rank:  # fused into an fp32 copy of the starting UNet: its frozen weights were held cast
            from peft.utils import get_peft_model_state_dict

            adapter = {k: v.detach().cpu().float() for k, v in get_peft_model_state_dict(final).items()}
            final = models.unet = trainer.unet = trainer.reference = trainer.optimizer = trainer.trainable = None
            accelerator.free_memory()  # the training copy goes before the fp32 copy is loaded
            final = save_lora_outputs(adapter_on_fp32_copy(adapter, args, models.base), out)
            write_cumulative_lora(args, out, run.log)
        save_unet_atomically(final, out)
        cfg = {
            **json.loads((out / "run_config.json").read_text()),
            "finished": True,
            "global_step": trainer.global_step,
        }
        write_text_atomic(out / "README.md", model_card(cfg, args.hub_model_id or out.name))
        write_json_atomic(out / "run_config.json", cfg)
        run.log(f"wrote {out / 'unet'} (step {trainer.global_step}) and its model card; metrics in {metrics_path}")
        if args.push_to_hub:
            push_to_hub(out, args.hub_model_id or out.name, args.hub_token, run.log)
    accelerator.end_training()


def iteration_of(unet):
    """Which SPIN iteration a run makes: 1 from a UNet no SPIN run made, else one more than the run it starts from."""
    cfg = Path(unet) / "run_config.json" if unet not in (None, "", "base") else None
    if cfg is None or not cfg.is_file():
        return 1
    made = json.loads(cfg.read_text())
    return iteration_of(made["args"].get("unet")) + 1 if made.get("args", {}).get("loss") == "spin" else 1


# evaluate.py finds the section by this line (the same constant there)
CARD_EVALUATION = "<!-- evaluation: evaluate.py fills this section when it scores this model -->"


def model_card(cfg, name):
    """README.md of an output folder, in the form of the released SPIN-Diffusion cards: hub metadata, what it is,
    the training hyperparameters as those cards list them, how to load it, and the evaluation (evaluate.py's)."""
    a, model = cfg["args"], cfg["model"]
    base, lora = model["pretrained_model_name_or_path"], a.get("lora_rank")
    pin = "".join(f', {k}="{a[k]}"' for k in ("revision", "variant") if a.get(k))  # the base's weights it trained on
    if a["loss"] == "spin":
        what = (
            f"iteration {iteration_of(a.get('unet'))} of SPIN-Diffusion (self-play fine-tuning, arXiv 2402.10210), "
            f"trained against the samples of the UNet it starts from ({a.get('unet') or 'base'})"
        )
    else:
        what = {
            "sft": "the SFT baseline (supervised fine-tuning on the real images)",
            "dpo": "the Diffusion-DPO baseline (winner vs loser pairs)",
        }[a["loss"]]
    tags = ["spin-diffusion", "text-to-image", "diffusers", "stable-diffusion"] + (["lora"] if lora else [])
    meta = [
        "---",
        f"base_model: {base}",
        "datasets:",
        f"- {a['dataset']}",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
    ]
    hyper = {
        "learning_rate": a["learning_rate"],
        "train_batch_size": a["train_batch_size"],
        "num_devices": cfg.get("num_processes", 1),
        "train_gradient_accumulation_steps": a["gradient_accumulation_steps"],
        "total_train_batch_size": cfg.get("global_batch"),
        "optimizer": "AdamW8bit" if a.get("use_8bit_adam") else "AdamW",
        "lr_scheduler": a["lr_scheduler"],
        "lr_warmup_steps": a["lr_warmup_steps"],
        "num_training_steps": cfg.get("global_step", a["max_train_steps"]),
        **({"beta": a["beta"]} if a["loss"] != "sft" else {}),
        "mixed_precision": a.get("mixed_precision") or "no",
        **({"lora_rank": lora, "lora_alpha": a.get("lora_alpha") or lora} if lora else {}),
    }
    load = [
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline, UNet2DConditionModel",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base}"{pin}, torch_dtype=torch.float16)',
        f'pipe.unet = UNet2DConditionModel.from_pretrained("{name}", subfolder="unet", torch_dtype=torch.float16)',
    ]
    if lora:
        load += [
            "# or, as an adapter on the base model: this iteration's change (lora/) or every iteration so far",
            f'# pipe.load_lora_weights("{name}", subfolder="lora_cumulative")',
        ]
    load += ["```"]
    return "\n".join(
        meta
        + [
            "",
            f"# {name}",
            "",
            f"This UNet is {what}, fine-tuned from [{base}](https://huggingface.co/{base}) on "
            f"`{a['dataset']}` (split `{a['split']}`). Made by `train_spin.py` (run_config.json holds every setting).",
            "",
            "## Training hyperparameters",
            "",
            *[f"- {k}: {v}" for k, v in hyper.items()],
            "",
            "## Usage",
            "",
            "Load the base pipeline and swap in this UNet:",
            "",
            *load,
            "",
            "## Evaluation",
            "",
            CARD_EVALUATION,
            "",
            "Not evaluated yet.",
            "",
        ]
    )


def write_text_atomic(path, text):
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def push_to_hub(out, repo_id, token, log):
    """Upload the finished folder's model (unet/, lora/, lora_cumulative/) and its card, nothing half-written: this
    runs after run_config.json says finished."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=getattr(repo, "repo_id", repo_id),
            folder_path=str(out),
            allow_patterns=["unet/*", "lora/*", "lora_cumulative/*", "README.md"],
            commit_message=f"train_spin.py: {out.name}",
        )
    except Exception as e:  # the trained model is on disk either way
        raise UserError(
            f"--push_to_hub {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; the "
            f"model is in {out}: push it later with huggingface-cli upload {repo_id} {out}"
        ) from None
    log(f"pushed {out} to the hub: {repo_id}")


def save_checkpoint(accelerator, out, global_step, lr_scheduler, args, fingerprint):
    """checkpoint-N/: UNet (safetensors) + optimizer + our train_state.json; written under a temp name and
    renamed, so a checkpoint-N that exists is complete. Older ones beyond --checkpoints_total_limit go."""
    final = out / f"checkpoint-{global_step}"
    tmp = out / f"checkpoint-{global_step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if accelerator.is_main_process:
        write_json_atomic(
            tmp / "train_state.json",
            {
                "global_step": global_step,
                "identity": identity(args),
                "num_processes": accelerator.num_processes,
                "unet_fingerprint": fingerprint,
                "lr_scheduler": lr_scheduler.state_dict(),
            },
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if args.checkpoints_total_limit:
            for old in list_checkpoints(out)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_lora_outputs(unet, output_dir):
    """The adapter alone (output_dir/lora/pytorch_lora_weights.safetensors, the file pipeline.load_lora_weights reads),
    then the adapter merged into the UNet, which save_unet_atomically writes as unet/: the next iteration's
    generate.py, sample.py and the opponent fingerprint see a plain UNet."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    lora = Path(output_dir) / "lora"
    tmp = Path(output_dir) / "lora.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp), unet_lora_layers=scale_folded(get_peft_model_state_dict(unet), unet), safe_serialization=True
    )
    shutil.rmtree(lora, ignore_errors=True)
    os.replace(tmp, lora)
    unet.fuse_lora()
    unet.unload_lora()
    return unet


LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights reads


def scale_folded(adapter, unet):
    """The adapter's state dict with its scale, lora_alpha / rank, multiplied into each lora_B: the file then means
    the same to every loader, including those that read no alpha and apply scale 1 (load_lora_weights does, for a
    file without adapter metadata)."""
    config = unet.peft_config["default"]
    scale = config.lora_alpha / config.r
    return {k: v * scale if k.endswith("lora_B.weight") else v for k, v in adapter.items()}


def stack_adapters(adapters):
    """One adapter equal to the sum of several (state dicts in diffusers' LoRA names, each scale folded into its B, as
    scale_folded saves them): lora_A is the A's stacked and lora_B the B's side by side, so that B A = sum_k B_k A_k
    (rank: the sum of the ranks). A module missing from an adapter gets zeros."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for sd in adapters for k in sd})
    out = {}
    for m in modules:
        shape = next(
            (sd[f"{m}.lora_A.weight"].shape[1], sd[f"{m}.lora_B.weight"].shape[0])
            for sd in adapters
            if f"{m}.lora_A.weight" in sd
        )
        a_parts, b_parts = [], []
        for sd in adapters:
            rank = next(v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight"))
            if f"{m}.lora_A.weight" in sd:
                a_parts.append(sd[f"{m}.lora_A.weight"].float())
                b_parts.append(sd[f"{m}.lora_B.weight"].float())
            else:
                a_parts.append(torch.zeros(rank, shape[0]))
                b_parts.append(torch.zeros(shape[1], rank))
        out[f"{m}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
        out[f"{m}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
    return out


def write_cumulative_lora(args, out, log):
    """output_dir/lora_cumulative/: theta_{k+1} as one adapter on the base pipeline's UNet. Each LoRA iteration's unet/
    is its starting UNet with its adapter fused, so theta_{k+1} = theta_0 + the sum of every iteration's scaled B A,
    which stack_adapters turns into one adapter (rank: the sum). It exists only for a chain that starts at the base
    UNet: from 'base' this adapter alone, from a LoRA iteration that has one, its lora_cumulative/ plus this adapter.
    Any other start (a full fine-tune, a hub UNet) is not the base plus adapters, so none is written."""
    start = Path(args.unet) if args.unet not in (None, "", "base") else None
    adapters = []
    if start is not None:
        if not (start / "lora_cumulative" / LORA_FILE).is_file():
            log(f"note: no lora_cumulative/: --unet {args.unet} is not the base UNet plus LoRA adapters")
            return
        adapters.append(load_file(str(start / "lora_cumulative" / LORA_FILE)))
    adapters.append(load_file(str(out / "lora" / LORA_FILE)))
    tmp, final = out / "lora_cumulative.partial", out / "lora_cumulative"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(stack_adapters(adapters), str(tmp / LORA_FILE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def adapter_on_fp32_copy(adapter, args, base):
    """The trained adapter's weights (peft names), put on a fresh float32 load of the starting UNet (the same LoRA
    config)."""
    from peft.utils import set_peft_model_state_dict

    start = load_unet(args.unet, base, args.revision, args.variant)
    copy = add_lora(start, args.lora_rank, args.lora_alpha, args.lora_target_modules, args.seed)
    set_peft_model_state_dict(copy, adapter)
    return copy


def save_unet_atomically(unet, output_dir):
    """Write output_dir/unet/ so that it exists only when complete (temp folder, then rename)."""
    out = Path(output_dir) / "unet"
    tmp = Path(output_dir) / "unet.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ---- shared helpers: the same text in every script (tests/test_shared.py checks) ----
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


# ---- end shared helpers ----


# ---- shared model and data helpers: the same text in train_spin.py and generate.py (sample.py imports it) ----
def unet_fingerprint(unet):
    """sha256 of every UNet tensor (names and float32 values): identifies the weights, not the path."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def is_checkpoint(unet_path):
    """A checkpoint-N/ folder written by train_spin.py (accelerate's save_state + train_state.json)."""
    return unet_path not in (None, "", "base") and Path(unet_path, "train_state.json").is_file()


def unet_source(unet_path, base_path):
    """(where, subfolder) of a UNet given as None/'base', a folder holding unet/, a bare UNet folder or a hub id."""
    if unet_path in (None, "", "base"):
        return base_path, "unet"
    if Path(unet_path, "unet", "config.json").is_file():
        return unet_path, "unet"
    if Path(unet_path, "config.json").is_file():
        return unet_path, None
    if Path(unet_path).exists() or unet_path.startswith((".", "/", "~")):
        raise UserError(
            f"--unet {unet_path}: no UNet there (expected {unet_path}/unet/config.json); "
            "pass a folder written by train_spin.py, one of its checkpoint-N folders, a hub id, or 'base'"
        )
    return unet_path, "unet"


def load_unet(unet_path, base_path, revision=None, variant=None):
    """A UNet in float32: None/'base' (the base pipeline's, at its --revision and --variant), a folder holding unet/, a
    bare UNet folder, a hub id (subfolder unet/, as UCLA-AGI/SPIN-Diffusion-iter*) or a train_spin.py checkpoint-N/."""
    from diffusers import UNet2DConditionModel

    if is_checkpoint(unet_path):
        return load_checkpoint_unet(Path(unet_path))
    where, sub = unet_source(unet_path, base_path)
    pin = {"revision": revision, "variant": variant} if unet_path in (None, "", "base") else {}
    try:
        return UNet2DConditionModel.from_pretrained(where, subfolder=sub, torch_dtype=torch.float32, **pin)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the UNet from {where!r}{'/' + sub if sub else ''}: {variant_hint(e, pin.get('variant'))}"
            "; check the path or hub id (and HF_HUB_OFFLINE)"
        ) from None


def variant_hint(error, variant):
    """The first line of a loading error; where it names --variant's files, also their likely cause and the fix."""
    first = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
    if variant and variant in str(error):
        return f"{first}; no --variant {variant} weight files there? drop --variant, or pass one the model has"
    return first


ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's checkpoint-N/: the adapter's weights (peft names)


def load_checkpoint_unet(ckpt):
    """A train_spin.py checkpoint-N/ as a UNet in float32: the run's starting UNet (named by its run_config.json) with
    the checkpoint's weights, or, for a LoRA run, its adapter fused: what the run's unet/ would hold at step N."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        cfg = json.loads((ckpt.parent / "run_config.json").read_text())
        start, base, args = cfg["model"]["unet"], cfg["model"]["pretrained_model_name_or_path"], cfg["args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"--unet {ckpt}: a checkpoint, but {ckpt.parent / 'run_config.json'} does not name the run's starting "
            "UNet (model.unet); pass a checkpoint inside a train_spin.py output folder"
        ) from None
    lora = args.get("lora_rank")
    weights = ckpt / (ADAPTER_FILE if lora else "model.safetensors")
    if not weights.is_file():
        raise UserError(f"--unet {ckpt}: a checkpoint without its weights ({weights.name}); pass another checkpoint")
    # loaded, not built from its config: diffusers' loading in another thread can leave a built model on meta tensors
    unet = load_unet(start, base, args.get("revision"), args.get("variant"))
    state = load_file(str(weights))
    try:
        if lora:
            unet.add_adapter(lora_config(lora, args.get("lora_alpha"), args["lora_target_modules"]))
            unexpected = set_peft_model_state_dict(unet, state).unexpected_keys
            if unexpected:
                raise RuntimeError(f"unexpected {unexpected[0]}")
            unet.fuse_lora()
            unet.unload_lora()
        else:  # a multi-process run saves the DDP wrapper's names, behind "module."
            torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "module.")
            unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"--unet {ckpt}: its {weights.name} does not fit the run's starting UNet: {str(e).splitlines()[0]}"
        ) from None
    return unet.to(torch.float32)


def lora_config(rank, alpha, target_modules):
    """peft's LoraConfig of train_spin.py's adapters: scale alpha / rank (alpha None: the rank), the comma-separated
    target modules, B initialised to zero (so the adapted UNet starts as the UNet itself)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("LoRA needs peft: pip install peft") from None
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)


def open_dataset(name, split, streaming=False):
    """A `datasets` dataset from a hub id, a local folder in any format `datasets` reads (parquet files, webdataset
    .tar shards, an image folder with metadata.jsonl) or one parquet/json/jsonl/csv/tar file."""
    import datasets

    p = Path(name).expanduser()
    local = name.startswith((".", "/", "~")) or p.exists()
    if local and not p.exists():
        raise UserError(f"--dataset {name}: no such file or folder; pass a local dataset path or a hub id")
    kinds = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tar": "webdataset"}
    if p.is_file() and p.suffix not in kinds:
        raise UserError(f"--dataset {name}: unknown file type {p.suffix!r}; use parquet, json(l), csv or tar")
    files = [p] if p.is_file() else split_files(p, split) if p.is_dir() else []
    try:
        if files:
            data_files = {split: [str(f) for f in files]}
            return datasets.load_dataset(
                kinds[files[0].suffix], data_files=data_files, split=split, streaming=streaming
            )
        return datasets.load_dataset(str(p) if local else name, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        unresolved = ("DatasetNotFoundError", "RepositoryNotFoundError")
        if not local and (isinstance(e, ConnectionError) or type(e).__name__ in unresolved):
            raise UserError(f"--dataset {name} does not resolve ({msg.rstrip('.')}){unresolved_hint(name)}") from None
        raise UserError(f"could not load --dataset {name} split {split!r}: {msg}") from None


def unresolved_hint(name):
    """What to say after a dataset id that does not resolve: the original Pick-a-Pic is gone, its copies work."""
    if name.strip("/").lower() not in ("yuvalkirstain/pickapic_v2", "yuvalkirstain/pickapic_v1"):
        return ": check the hub id (and HF_HUB_OFFLINE: offline, only cached datasets load) or pass a local folder"
    return (
        ": the original Pick-a-Pic was removed from the Hugging Face Hub in 2025; copies work in either layout, "
        "parquet (caption, jpg_0, jpg_1, label_0, label_1) or webdataset tar shards (original_prompt.txt, jpg_0.jpg, "
        "jpg_1.jpg, label_0.txt, label_1.txt; e.g. sayakpaul/pickapic_v2_webdataset): pass one with --dataset "
        "(a hub id or a local folder)"
    )


def split_files(folder, split):
    """The .tar or .parquet files of a local folder that name `split`: under a folder of that name, or called
    `<split>.tar`, `<split>_00000.tar`, `<split>-00000-of-00009.parquet`... (`datasets`' own inference would mix
    test_unique_00000.tar into 'test'). None, both kinds, or a dataset card that lists the files: [] (`datasets`
    decides)."""
    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace").split("\n---", 1)[0], re.M):
        return []  # the folder's dataset card (a downloaded hub copy) names each split's files: `datasets` reads it
    named = re.compile(rf"{re.escape(split)}(?:[-_.][0-9][^/]*)?\.(?:tar|parquet)")
    files = sorted(
        f
        for f in folder.rglob("*")
        if f.suffix in (".tar", ".parquet")
        and f.is_file()
        and (split in f.relative_to(folder).parts[:-1] or named.fullmatch(f.name))
    )
    return files if len({f.suffix for f in files}) == 1 else []


# Pick-a-Pic's fields, and where its copies keep each one: the original parquet columns, or, in webdataset tar shards
# (e.g. sayakpaul/pickapic_v2_webdataset), a file per field in each sample, which `datasets` names with its extension.
PICKAPIC_CAPTIONS = ("caption", "caption.txt", "original_prompt.txt")


def pickapic_columns(column_names, caption_column="caption"):
    """{field: column} for caption, jpg_0, jpg_1, label_0, label_1 when the dataset is Pick-a-Pic, in its parquet
    layout or as webdataset tars (jpg_0.jpg, label_0.txt...), else None. A --caption_column of its own is kept."""
    names = list(column_names)

    def column(field):  # the original name, else the name with one extension
        return (
            field
            if field in names
            else next((c for c in names if c.split(".")[0] == field and c.count(".") == 1), None)
        )

    cols = {f: column(f) for f in ("jpg_0", "jpg_1", "label_0", "label_1")}
    if None in cols.values():
        return None
    if caption_column == "caption":
        caption_column = next((c for c in PICKAPIC_CAPTIONS if c in names), caption_column)
    return {"caption": caption_column, **cols}


def iter_examples(ds, caption_column="caption", image_column=None, with_images=True, with_loser=False, stats=None):
    """{"caption", "image", "image_lose"} per usable row, images undecoded (bytes, path dict or PIL). A Pick-a-Pic row
    gives its image labelled 1 as "image" and the other as "image_lose"; ties are dropped and counted.
    stats["rows_read"] counts every row read, ties included, stats["ties_dropped"] the ties."""
    import datasets

    stats = {} if stats is None else stats
    stats.setdefault("rows_read", 0)
    stats.setdefault("ties_dropped", 0)
    names = list(ds.column_names or ds.features or [])
    cols = pickapic_columns(names, caption_column)
    if cols and image_column in ("jpg_0", "jpg_1", cols["jpg_0"], cols["jpg_1"]):
        raise UserError(
            f"--image_column {image_column}: in Pick-a-Pic the real image is jpg_0 or jpg_1 by each row's "
            "labels (the one labelled 1); drop --image_column and it is picked by label, ties dropped"
        )
    pickapic = cols is not None and image_column is None
    caption_column = cols["caption"] if pickapic else caption_column
    if image_column is None and not pickapic:
        image_column = next((c for c in ("image", "jpg", "png", "img") if c in names), "image")
    need = [caption_column] + ([cols["label_0"], cols["label_1"]] if pickapic else [])
    images = ([cols["jpg_0"], cols["jpg_1"]] if pickapic else [image_column]) if with_images else []
    missing = [c for c in need + images if c not in names]
    if missing:
        raise UserError(f"dataset has no column(s) {missing} (it has {names}); set --caption_column / --image_column")
    if with_loser and not pickapic:
        raise UserError(
            "--loss dpo needs winner/loser pairs: a Pick-a-Pic-format dataset (jpg_0, jpg_1, label_0, label_1)"
        )
    ds = ds.select_columns(need + images)
    for c in images:
        if isinstance((ds.features or {}).get(c), datasets.Image):
            ds = ds.cast_column(c, datasets.Image(decode=False))  # decoded by decode_image: corrupt files are skipped
    for row in ds:
        stats["rows_read"] += 1
        caption = row[caption_column]
        ex = {"caption": caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption}
        if pickapic:
            try:  # the parquet layout holds floats, the webdataset one text ("1.0", "0", "0.5")
                l0, l1 = float(row[cols["label_0"]]), float(row[cols["label_1"]])
            except (TypeError, ValueError):
                raise UserError(
                    f"row {stats['rows_read']}: Pick-a-Pic labels {row[cols['label_0']]!r}, {row[cols['label_1']]!r} "
                    "are not numbers (1, 0 or 0.5); check --dataset"
                ) from None
            if l0 == l1:
                stats["ties_dropped"] += 1
                continue
            win = 0 if l0 > l1 else 1
            if with_images:
                ex["image"] = row[cols[f"jpg_{win}"]]
            if with_loser:
                ex["image_lose"] = row[cols[f"jpg_{1 - win}"]]
        elif with_images:
            ex["image"] = row[image_column]
        yield ex


def image_key(prompt_index, image_index):
    """File stem of one image: the same in every folder of images (generate.py, sample.py, validation)."""
    return f"p{prompt_index:07d}_i{image_index:03d}"


def image_seed(seed, prompt_index, image_index):
    """Seed of one image, from (run seed, prompt index, image index) only: independent of batch size, process count
    and resume point, and the same for every model, so that comparisons are paired."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# Sampler names (generate.py and sample.py --scheduler, train_spin.py --validation_scheduler) -> diffusers classes.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def initial_noise(seeds, shape):
    """Starting noise of each image from its own CPU generator: the same on every device, batch size and process.
    The generators are returned too, already advanced, for samplers that draw noise at every step."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def decode_latents(vae, latents, latents_mean_std):
    """A pipeline's final latent (output_type="latent") -> image in [-1, 1], decoded as the pipeline decodes it: in the
    VAE's dtype, un-normalised with the VAE config's latents_mean/latents_std where it has them and
    `latents_mean_std` (SDXL's pipeline), else divided by scaling_factor."""
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if latents_mean_std and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    return vae.decode(latents, return_dict=False)[0]


def check_tokenizer(tokenizer, what, subfolder):
    """transformers builds an empty tokenizer where a pipeline folder lacks its files (no vocabulary, no length
    limit), which would fail later inside its call: refused here in one line."""
    if tokenizer.model_max_length > 10**6:  # transformers' "no limit recorded": no tokenizer_config.json was read
        raise UserError(
            f"could not load {what}: no tokenizer in its {subfolder}/ (vocab.json, merges.txt, tokenizer_config.json "
            "with model_max_length); save the pipeline with save_pretrained or point at a complete copy"
        )
    return tokenizer


def to_pixels(images):
    """Decoded images in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] on the CPU, as generate.py writes them."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ---- end shared model and data helpers ----


quiet_known_noise()  # before any library that logs the known noise is imported (they are imported lazily)


if __name__ == "__main__":
    cli(main)
