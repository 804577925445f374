#!/usr/bin/env python
"""train_spin.py: one SPIN-Diffusion iteration (arXiv 2402.10210), and the SFT and Diffusion-DPO baselines.

    theta_k (the start AND the frozen opponent) + real images + generate.py's images of theta_k -> output_dir/unet/

Each pair (real latent, the opponent's latent of the same prompt) is noised with one timestep and one noise, and the
policy's denoising errors (m_r, m_s) are compared with the frozen opponent's (r_r, r_s); SD3 (flow matching): velocity
errors, and output_dir/transformer/:

    loss = mean_i -log sigmoid(-(beta/2) * ((m_r - r_r) - (m_s - r_s)))      (beta: Diffusion-DPO's beta_dpo)

At step 0 the policy is the opponent: the first loss is exactly ln 2. Real images and prompts are encoded once, into
--cache_dir; a training step runs the UNet only. Details: docs/train_spin.md.

    python train_spin.py --dataset sayakpaul/pickapic_v2_webdataset --synthetic_dir synth_0 --output_dir iter_1
    accelerate launch --num_processes 8 train_spin.py ...      (the same flags: 8 processes train what 1 trains)
"""

import argparse
import bisect
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

# accelerate, diffusers, transformers and datasets are imported where they are used (--help need not wait for them);
# peft and bitsandbytes only by --lora_rank and --use_8bit_adam.

# ---- Command line: the flag names of diffusers' training examples ----
BETA = {"sd": 5000.0, "sdxl": 5000.0, "sd3": 100.0}  # --beta's default per family (docs/train_spin.md)
# The families, by the base's model_index.json, and the denoiser each takes (its class, addition_embed_type)
FAMILIES = {
    "StableDiffusionPipeline": ("sd", "UNet2DConditionModel", None),  # SD-1.x/2.x
    "StableDiffusionXLPipeline": ("sdxl", "UNet2DConditionModel", "text_time"),  # also the pooled prompt, sizes
    "StableDiffusion3Pipeline": ("sd3", "SD3Transformer2DModel", None),  # SD3/SD3.5: flow matching
}
PAIR_NOISE = ("shared", "separate_noise", "independent")  # what a pair's two members share: see --pair_noise
CACHE_DIR = os.environ.get("SPIN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "spin-diffusion"))


def build_parser():
    # one flag per line reads as a table
    # fmt: off
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    # models and data
    a("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="base pipeline")
    a("--revision", default=None, help="git revision of the base pipeline's hub repo (its UNet too: --unet base)")
    a("--variant", default=None, help="weights variant of the base pipeline, e.g. fp16 (its UNet too: --unet base)")
    a("--unet", default=None, help="theta_k: a folder holding unet/, a checkpoint-N folder, a hub id or 'base'")
    a("--dataset", "--dataset_name", "--train_data_dir", required=True, help="real data: hub id or local path")
    a("--split", default="train")
    a("--image_column", default=None, help="image column (default: Pick-a-Pic's winner by label, else 'image')")
    a("--caption_column", default="caption")
    a("--max_train_samples", type=int, default=None, help="use only the first N usable rows (ties dropped)")
    a("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")
    a("--synthetic_dir", default=None, help="generate.py's folder of theta_k's images (--loss spin)")
    a("--synthetic_latent", choices=["sampler", "image"], default="sampler", help="generate.py's final sampler "
      "latent, or its PNG encoded like a real image")
    a("--allow_opponent_mismatch", action="store_true", help="train even if another UNet made --synthetic_dir")
    a("--reference_unet", default=None, help="a frozen reference other than --unet (ablations)")
    a("--output_dir", required=True)
    a("--cache_dir", default=CACHE_DIR, help="encoded real latents and prompts, reused by every iteration")
    a("--resolution", type=int, default=None, help="image side in pixels (default: the model's own)")
    # objective
    a("--loss", choices=["spin", "sft", "dpo"], default="spin")
    a("--beta", "--beta_dpo", type=float, default=None, help="KL strength, as Diffusion-DPO's beta_dpo (default: "
      f"{BETA['sd']:g}; SD3: {BETA['sd3']:g}, flow_grpo's SD3.5 DPO: docs/train_spin.md)")
    a("--pair_noise", choices=PAIR_NOISE, default="shared", help="what the two members of a pair share")
    a("--independent_pair_noise", action="store_true", help="the same as --pair_noise independent")
    a("--weighting_scheme", choices=["logit_normal", "mode", "none"], default="logit_normal", help="SD3: how sigma "
      "is drawn (diffusers' compute_density_for_timestep_sampling; none: uniform)")
    a("--logit_mean", type=float, default=0.0, help="SD3: mean of logit_normal")
    a("--logit_std", type=float, default=1.0, help="SD3: spread of logit_normal")
    a("--mode_scale", type=float, default=1.29, help="SD3: scale of mode")
    a("--max_sequence_length", type=int, default=256, help="SD3: T5 prompt tokens, as generate.py's")
    a("--no_t5", action="store_true", help="SD3: without its T5 encoder (zeros), as generate.py's")
    a("--caption_dropout", "--proportion_empty_prompts", type=float, default=0.0, help="empty-prompt probability")
    # optimisation
    a("--learning_rate", type=float, default=2e-5)
    a("--scale_lr", action="store_true", help="times accumulation x batch size x processes")
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
    a("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit")
    a("--seed", type=int, default=0, help="data order, timesteps and noise")
    # hardware
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate's config")
    a("--gradient_checkpointing", action="store_true")
    a("--enable_xformers_memory_efficient_attention", action="store_true")
    a("--lora_rank", "--rank", type=int, default=None, help="train a LoRA adapter of this rank (default: all)")
    a("--lora_alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    a("--lora_target_modules", default="to_k,to_q,to_v,to_out.0")
    a("--allow_tf32", action="store_true")
    a("--dataloader_num_workers", type=int, default=0)
    # bookkeeping
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None, help="keep only this many checkpoint-N folders")
    a("--resume_from_checkpoint", default=None, help="a checkpoint-N folder, or 'latest' (fresh start if none)")
    a("--report_to", default="none", help="accelerate's tracker: tensorboard, wandb, ...")
    # a long run's extras: spin_extras.py (docs/train_spin.md, "A long run")
    a("--validation_prompts", nargs="+", default=None, help="prompts the policy samples while it trains")
    a("--validation_prompts_file", default=None, help="the validation prompts, one per line")
    a("--num_validation_images", type=int, default=2, help="images per validation prompt")
    a("--validation_steps", type=int, default=100)
    a("--validation_seed", type=int, default=0, help="as generate.py's --seed")
    a("--validation_num_inference_steps", type=int, default=50)
    a("--validation_guidance_scale", type=float, default=7.5)
    a("--validation_scheduler", default=None, help="generate.py's --scheduler names (default: the pipeline's)")
    a("--model_card", action="store_true", help="write output_dir/README.md, the model card")
    a("--push_to_hub", action="store_true", help="at the end, upload the model and its card")
    a("--hub_model_id", default=None, help="the hub repository (default: the output folder's name)")
    a("--hub_token", default=None, help="hub token (default: huggingface_hub's login)")
    a("--lora_cumulative", action="store_true", help="also write theta_{k+1} as one adapter on the base UNet")
    a("--checkpoint_on_signal", action="store_true", help="on SIGTERM or SIGUSR1: checkpoint after this step, exit")
    # fmt: on
    return p


# The flags that may differ between a run and its resume or re-run: where things are kept, how fast or how often, what
# else is made; never what is trained. Every other flag, a new one too, is the run's identity and must agree.
MAY_CHANGE = (
    *("output_dir", "cache_dir", "streaming", "resume_from_checkpoint", "checkpointing_steps", "report_to"),
    *("checkpoints_total_limit", "dataloader_num_workers", "gradient_checkpointing", "allow_tf32"),
    "enable_xformers_memory_efficient_attention",
    "mixed_precision",  # a resume may switch it: to bf16 after fp16 stopped on a non-finite loss
    "allow_opponent_mismatch",  # a permission: the opponent itself, --synthetic_dir's, is checked
    "independent_pair_noise",  # folded into --pair_noise
    *("validation_prompts", "validation_prompts_file", "num_validation_images", "validation_steps"),
    *("validation_seed", "validation_num_inference_steps", "validation_guidance_scale", "validation_scheduler"),
    *("model_card", "push_to_hub", "hub_model_id", "hub_token", "lora_cumulative", "checkpoint_on_signal"),
)
# the flags that ask for spin_extras.py (--synthetic_latent image and a launch on several nodes too: load_extras)
EXTRAS = ("validation_prompts", "validation_prompts_file", "model_card", "push_to_hub", "lora_cumulative")
EXTRAS += ("checkpoint_on_signal",)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.independent_pair_noise:
        args.pair_noise = "independent"
    if not 1 <= args.max_sequence_length <= 512 or args.logit_std <= 0:
        raise UserError("--max_sequence_length must be 1 to 512 (T5's limit in SD3), --logit_std above 0")
    if args.loss == "spin" and not args.synthetic_dir:
        p.error("--loss spin needs --synthetic_dir (a folder written by generate.py)")
    return args


def load_extras(args):
    """spin_extras.py, the optional module beside this script, where a flag asks for one of its extras or the launch
    spans several nodes (its check that they share --cache_dir and --output_dir); else None."""
    asked = [f"--{flag}" for flag in EXTRAS if getattr(args, flag)]
    asked += ["--synthetic_latent image"] if args.synthetic_latent == "image" and args.loss == "spin" else []
    asked += ["a launch on several nodes"] if several_nodes() else []
    if not asked:
        return None
    sys.modules.setdefault("train_spin", sys.modules[__name__])  # its `import train_spin` is this running script
    try:
        import spin_extras
    except ModuleNotFoundError as e:
        if e.name != "spin_extras":
            raise
        raise UserError(
            f"{asked[0]} needs spin_extras.py beside train_spin.py: copy it from the same repository"
        ) from None
    return spin_extras


def several_nodes():
    """Whether this launch's processes span several machines (torchrun and accelerate launch say so)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) > int(os.environ.get("LOCAL_WORLD_SIZE", world))


def identity(args):
    """The settings a resumed or re-run output_dir must agree on: every flag but MAY_CHANGE."""
    return {k: v for k, v in vars(args).items() if k not in MAY_CHANGE}


def check_same_run(saved, current, where):
    """Refuse, in one line, a run whose identity differs from the one saved. A flag the record lacks (written before
    the flag existed) counts as its parser default: that run had no other value."""
    if "pair_noise" not in saved and "independent_pair_noise" in saved:  # a run recorded before --pair_noise
        saved = {**saved, "pair_noise": "independent" if saved["independent_pair_noise"] else "shared"}
    parser = build_parser()
    saved = {k: saved[k] if k in saved else parser.get_default(k) for k in current}
    diff = {k: (saved[k], v) for k, v in current.items() if saved[k] != v}
    if diff:
        k, (old, new) = next(iter(diff.items()))
        raise UserError(
            f"{where} was made with other settings ({len(diff)} differ, e.g. --{k} {old!r} there vs {new!r} now); "
            "use the same flags or another --output_dir"
        )


# ---- The math: pure functions on tensors (tests compare them with an independent computation) ----
def spin_loss(model_mse_real, model_mse_syn, ref_mse_real, ref_mse_syn, beta):
    """Per-pair SPIN-Diffusion loss -log sigmoid(-(beta/2) ((m_r - r_r) - (m_s - r_s))), in float32. Diffusion-DPO is
    the same expression with winner/loser in place of real/synthetic."""
    m_r, m_s, r_r, r_s = (x.float() for x in (model_mse_real, model_mse_syn, ref_mse_real, ref_mse_syn))
    return -F.logsigmoid(-(beta / 2) * ((m_r - r_r) - (m_s - r_s)))


def per_sample_mse(pred, target):
    """Mean squared error over C,H,W per sample, in float32 (fp16 errors times a beta of thousands are noise)."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the UNet learns to predict: the noise (epsilon models) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"prediction_type {kind!r} of the scheduler is not supported (epsilon or v_prediction)")


class Conditioning(NamedTuple):
    """A batch's prompt embeddings and the model's other inputs (SDXL's added_cond_kwargs, SD3's pooled_projections)."""

    text: torch.Tensor
    extra: dict = {}


class Draws(NamedTuple):
    """What a batch of pairs is noised with: the first member's timesteps and noise, the second's (the same tensors
    when --pair_noise shares them), and the caption-dropout mask (True: the empty prompt)."""

    t: torch.Tensor
    noise: torch.Tensor
    t2: torch.Tensor
    noise2: torch.Tensor
    drop: Optional[torch.Tensor] = None


def denoising_errors(model, scheduler, latents, noise, t, cond):
    """Per-sample error of `model` denoising `latents` noised with `noise` at timesteps `t`, conditioned on `cond`.
    A flow-matching model (SD3): t indexes the scheduler's sigmas, x_t = (1 - sigma) x_0 + sigma noise, and the model
    predicts the velocity noise - x_0, as diffusers' SD3 training computes it."""
    if hasattr(scheduler, "sigmas"):
        sigma = scheduler.sigmas.to(latents.device)[t].view(-1, *[1] * (latents.ndim - 1))
        noisy, target, t = (1 - sigma) * latents + sigma * noise, noise - latents, scheduler.timesteps.to(t.device)[t]
    else:
        noisy, target = scheduler.add_noise(latents, noise, t), diffusion_target(scheduler, latents, noise, t)
    pred = model(noisy, timestep=t, encoder_hidden_states=cond.text, **cond.extra, return_dict=False)[0]
    return per_sample_mse(pred, target)


def pair_loss(policy, reference, scheduler, real, other, draws, cond, *, beta, autocast):
    """SPIN (other: the opponent's sample) or Diffusion-DPO (real: winner, other: loser) on a batch of pairs: one policy
    call on [real; other], one no-grad reference call on the same inputs. `cond` is laid out for the doubled batch."""
    b, latents = real.shape[0], torch.cat([real, other])
    noises, ts = torch.cat([draws.noise, draws.noise2]), torch.cat([draws.t, draws.t2])
    model_mse = denoising_errors(policy, scheduler, latents, noises, ts, cond)
    with torch.no_grad(), autocast():  # the policy's precision path: margin = 0 exactly at step 0
        ref_mse = denoising_errors(reference, scheduler, latents, noises, ts, cond)
    m_r, m_s, r_r, r_s = model_mse[:b], model_mse[b:], ref_mse[:b], ref_mse[b:]
    margin = (m_r - r_r) - (m_s - r_s)
    stats = {  # per pair: micro-steps and processes are averaged later
        "implicit_acc": (margin < 0).float(),  # the policy prefers the real image more than the reference does
        "real_logratio": -(m_r - r_r),  # > 0: the policy denoises real data better than the reference
        "syn_logratio": -(m_s - r_s),  # < 0: ... and the opponent's samples worse
        **{"model_mse_real": m_r, "model_mse_syn": m_s, "ref_mse_real": r_r, "ref_mse_syn": r_s},
    }
    return spin_loss(m_r, m_s, r_r, r_s, beta).mean(), stats


def sft_loss(policy, scheduler, real, draws, cond):
    """The SFT baseline: plain denoising error on the real images."""
    m_r = denoising_errors(policy, scheduler, real, draws.noise, draws.t, cond)
    return m_r.mean(), {"model_mse_real": m_r}


def draw_timesteps(gen, n, num_train_timesteps, density=None):
    """SD: timesteps uniform in 0..T-1. Flow models (`density`: --weighting_scheme and its parameters): indices into the
    scheduler's sigmas, u * T with u drawn by diffusers' compute_density_for_timestep_sampling, as its SD3 training."""
    if density is None:
        return torch.randint(0, num_train_timesteps, (n,), generator=gen)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(batch_size=n, generator=gen, **density)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def draw_noise(gen, batch, latent_shape, num_train_timesteps, pair_noise="shared", density=None):
    """Timesteps and noise of `batch` pairs (Draws); the shared values are drawn first, so the first member's draws are
    the same under every --pair_noise."""
    t = draw_timesteps(gen, batch, num_train_timesteps, density)
    noise = torch.randn((batch, *latent_shape), generator=gen)
    t2 = draw_timesteps(gen, batch, num_train_timesteps, density) if pair_noise == "independent" else t
    noise2 = torch.randn((batch, *latent_shape), generator=gen) if pair_noise != "shared" else noise
    return Draws(t, noise, t2, noise2)


def draw_step(seed, micro_step, global_batch, start, stop, latent_shape, T, pair_noise, dropout, density=None):
    """The Draws, dropout mask included, of pairs start..stop-1 of one micro-step's global batch. The step's generator
    draws for the whole global batch and each process keeps its own pairs' slice: a pair's draws depend on its place in
    the global batch, not on the process holding it, so 2 processes train what 1 trains and no two GPUs draw the same
    noise."""
    gen = torch.Generator().manual_seed(image_seed(seed, 0, micro_step))
    draws = draw_noise(gen, global_batch, latent_shape, T, pair_noise, density)
    drop = torch.rand(global_batch, generator=gen) < dropout if dropout > 0 else torch.zeros(global_batch, dtype=bool)
    return Draws(*(x[start:stop] for x in (*draws[:4], drop)))


@functools.lru_cache(maxsize=1)  # computed once per epoch (milliseconds at Pick-a-Pic's size, each micro-step)
def epoch_permutation(n, seed, epoch):
    """The row order of one epoch: a seeded permutation, the same on every process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(image_seed(seed, -1, epoch)))


def batch_indices(n, seed, global_batch, micro_step, process_index, per_device):
    """One process's rows at one micro-step: each epoch a fresh permutation cut into global batches (the last partial
    one dropped), of which a process takes its slice. A pure function of the step: a resumed run continues mid-epoch
    exactly."""
    epoch, b = divmod(micro_step, n // global_batch)
    start = b * global_batch + process_index * per_device
    return epoch_permutation(n, seed, epoch)[start : start + per_device].tolist()


# ---- The iteration, step by step ----
def main(argv=None):
    """theta_k -> theta_{k+1}: the SPIN iteration (or the SFT / Diffusion-DPO baseline), its steps in order."""
    args = parse_args(argv)
    run = start_run(args)  # the accelerator (one process per GPU), logging, spin_extras.py where asked for
    models = load_models(args, run)  # theta_k (the policy), scheduler, tokenizers: SD, SDXL or SD3
    if output_dir_is_done(args, run, models):  # a finished run with the same settings: nothing to do
        return
    encode = ImageEncoder(args, run, models)  # the VAE, loaded on first use
    data = encode_real_data(args, run, models, encode)  # real latents and prompt embeddings, cached once
    pairs = make_pairs(args, run, models, data, encode)  # each real row + the opponent's sample (DPO: its loser)
    del encode  # the VAE's memory goes before training
    if args.lora_rank:  # the policy: theta_k frozen under a trainable low-rank adapter
        add_lora(models.unet, args.lora_rank, args.lora_alpha, args.lora_target_modules, args.seed)
    trainer = build_trainer(args, run, models, pairs)  # the frozen opponent theta_k, AdamW and schedule, prepared
    resume(args, run, models, trainer)  # --resume_from_checkpoint: continue exactly
    write_run_record(args, run, models, pairs, data, trainer)
    # each micro-step, train_step: pair_loss noises the pair (denoising_errors) and takes the loss (spin_loss)
    train(args, run, models, data, pairs, trainer)
    save_outputs(args, run, models, trainer)  # output_dir/unet/ (LoRA: also lora/), the run marked finished


@dataclass
class Run:
    """This launch: accelerate's handle, the output folder, a log that prints on the main process, the compute dtype
    (the encoders run in it, frozen weights are held in it) and spin_extras.py where a flag asked for it."""

    accelerator: Any
    out: Path
    log: Callable
    dtype: torch.dtype
    extras: Any
    device: Any
    main_process: bool


def start_run(args):
    """Join a torchrun / accelerate launch. Without CUDA several processes need accelerate's CPU mode (gloo); a launch
    accelerate does not see would leave every process believing it is alone: refused."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out, world = Path(args.output_dir), int(os.environ.get("WORLD_SIZE", "1"))
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
            f"launched as {world} processes but accelerate sees {accelerator.num_processes}; launch with accelerate "
            "launch or torchrun, without overriding the process group"
        )
    log = (lambda *a: print(*a, flush=True)) if accelerator.is_main_process else (lambda *a: None)
    extras = load_extras(args)
    if extras:
        extras.check_args(args, accelerator)  # validation settings, and several nodes' shared folders
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return Run(accelerator, out, log, dtype, extras, accelerator.device, accelerator.is_main_process)


def output_dir_is_done(args, run, models):
    """A finished output_dir with the same settings is a no-op (shell loops re-run stages freely); one made with other
    settings is refused. Otherwise the folder is made."""
    record = run.out / "run_config.json"
    if (run.out / models.folder / "config.json").is_file() and record.is_file():
        done = json.loads(record.read_text())
        check_same_run(done.get("identity", {}), identity(args), f"--output_dir {run.out}")
        if done.get("finished"):
            run.log(f"{run.out}/{models.folder} is already trained with these settings: nothing to do")
            return True
    run.out.mkdir(parents=True, exist_ok=True)
    return False


@dataclass
class Trainer:
    """What the optimisation steps: the policy (prepared by accelerate), the frozen reference and its weights'
    fingerprint, the optimizer over the policy's trainable weights, the learning-rate schedule, the steps done."""

    unet: Any
    reference: Any  # None for SFT
    reference_fingerprint: Optional[str]
    optimizer: Any
    lr_scheduler: Any
    trainable: list
    global_step: int = 0


def build_trainer(args, run, models, pairs):
    """The frozen reference: theta_k itself (a copy held in the compute dtype; LoRA: the policy's own UNet with its
    adapter off) or --reference_unet; AdamW (8-bit with --use_8bit_adam) on the policy's trainable float32 weights and
    the schedule, prepared by accelerate."""
    from diffusers.optimization import get_scheduler

    unet, reference, fingerprint = models.unet, None, models.fingerprint
    if args.loss != "sft" and args.reference_unet is not None:
        reference = load_unet(args.reference_unet, models.base, args.revision, args.variant)
        fingerprint = unet_fingerprint(reference)
    elif args.loss != "sft" and not args.lora_rank:
        reference = copy.deepcopy(unet)
    if reference is not None:
        reference = cast_frozen(reference.requires_grad_(False).eval(), run.dtype).to(run.device)
    if args.lora_rank:
        cast_frozen(unet, run.dtype)  # the frozen UNet under the adapter
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer_cls = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    trainable = [p for p in unet.parameters() if p.requires_grad]
    lr = args.learning_rate * (args.gradient_accumulation_steps * pairs.global_batch if args.scale_lr else 1)
    betas, decay, eps = (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon
    optimizer = optimizer_cls(trainable, lr=lr, betas=betas, weight_decay=decay, eps=eps)
    # stepped by us once per optimizer step, not prepared: warmup and total are optimizer steps, whatever the processes
    steps = {"num_warmup_steps": args.lr_warmup_steps, "num_training_steps": args.max_train_steps}
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, **steps)
    unet, optimizer = run.accelerator.prepare(unet, optimizer)
    if args.lora_rank:
        checkpoint_adapter_only(run.accelerator)
        if args.loss != "sft" and reference is None:
            reference = WithoutAdapter(run.accelerator.unwrap_model(unet))
    fingerprint = fingerprint if args.loss != "sft" else None
    return Trainer(unet, reference, fingerprint, optimizer, lr_scheduler, trainable)


def resume(args, run, models, trainer):
    """--resume_from_checkpoint: the checkpoint's weights, optimizer, RNG states and schedule, once it is known to
    continue this very run (the same settings, process count and starting UNet)."""
    if not args.resume_from_checkpoint:
        return
    found, world = list_checkpoints(run.out), run.accelerator.num_processes
    ckpt = found[-1] if args.resume_from_checkpoint == "latest" and found else None
    if args.resume_from_checkpoint != "latest":
        ckpt = Path(args.resume_from_checkpoint)
        if not (ckpt / "train_state.json").is_file():
            raise UserError(f"--resume_from_checkpoint {ckpt}: not a checkpoint folder (no train_state.json)")
    if ckpt is None:
        return run.log("no checkpoint in output_dir: starting from the beginning")
    state = json.loads((ckpt / "train_state.json").read_text())
    check_same_run(state["identity"], identity(args), f"checkpoint {ckpt}")
    saved = state.get("num_processes", 1)
    if saved != world:  # the global batch, each process's rows and draws depend on it
        raise UserError(
            f"checkpoint {ckpt} was written by a run of {saved} process(es), this one has {world}: an exact "
            f"continuation needs the same count; resume with {saved} processes or start another --output_dir"
        )
    if state["unet_fingerprint"] != models.fingerprint:
        raise UserError(
            f"checkpoint {ckpt} continues another starting UNet; use the same --unet or another --output_dir"
        )
    run.accelerator.load_state(str(ckpt))
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.global_step = state["global_step"]
    run.log(f"resumed from {ckpt} at step {trainer.global_step}")


def train(args, run, models, data, pairs, trainer):
    """--max_train_steps optimizer steps of --gradient_accumulation_steps micro-steps (train_step) from the resumed
    one: a metrics.jsonl row per step, a checkpoint every --checkpointing_steps; spin_extras.py's validation images and
    stop signals where asked for."""
    accum, world = args.gradient_accumulation_steps, run.accelerator.num_processes
    for name in ("alphas_cumprod", "sigmas", "timesteps"):  # the schedule's tables: indexed on the device each step
        if torch.is_tensor(table := getattr(models.scheduler, name, None)):
            setattr(models.scheduler, name, table.to(run.device))
    run.log(
        f"training {args.loss}: {len(pairs.dataset)} pairs, {args.max_train_steps} steps of "
        f"{args.train_batch_size} x {world} x {accum} = {pairs.global_batch * accum} pairs"
    )
    stop = run.extras.StopSignals() if args.checkpoint_on_signal else None
    validation = run.extras.Validation(args, run, models) if args.validation_prompts else None
    sums, stopping = StepSums(run.accelerator, stop), False
    if validation:
        validation.after_step(trainer.global_step, trainer.unet)  # step 0: what theta_k itself samples
    bar = tqdm(total=args.max_train_steps, initial=trainer.global_step, disable=not run.main_process)
    with stop or contextlib.nullcontext(), bar:  # the bar closes before an error message: that stays the last line
        for batch in step_loader(args, run, models, pairs, trainer.global_step):
            row = train_step(batch, args, run, models, data, trainer, sums)
            if row is None:  # a micro-step within the accumulation
                continue
            if run.main_process:
                with open(run.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            run.accelerator.log(row, step=trainer.global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            step, last = trainer.global_step, trainer.global_step == args.max_train_steps
            stopping = stop is not None and stop.agreed is not None and not last  # in the last step: just finish
            if stopping or (step % args.checkpointing_steps == 0 and not last):
                save_checkpoint(run.accelerator, run.out, step, trainer.lr_scheduler, args, models.fingerprint)
            if stopping:
                break
            if validation:
                validation.after_step(step, trainer.unet)
    if validation:
        validation.close()  # its pipeline holds the policy: let save_outputs free it
    if stopping:
        run.extras.exit_stopped(run, args, stop.agreed, trainer.global_step)


def step_loader(args, run, models, pairs, global_step):
    """Item m is micro-step m's batch with its draws (StepBatches); workers prefetch it into pinned memory."""
    T, accum = models.scheduler.config.num_train_timesteps, args.gradient_accumulation_steps
    density = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")  # flow models: how sigma is drawn
    density = {k: getattr(args, k) for k in density} if models.family == "sd3" else None
    steps = StepBatches(pairs, args, run.accelerator.process_index, T, density)
    return torch.utils.data.DataLoader(
        steps,
        batch_size=None,
        sampler=range(global_step * accum, args.max_train_steps * accum),
        num_workers=args.dataloader_num_workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=args.dataloader_num_workers > 0,
        worker_init_fn=run.extras.leave_stop_signals_to_training if args.checkpoint_on_signal else None,
    )


def train_step(batch, args, run, models, data, trainer, sums):
    """One micro-step: the pair (SFT: the real image) noised with the step's draws, the loss and its gradient. The last
    micro-step of an optimizer step also clips, refuses a non-finite loss and steps: it returns the step's metrics
    row, the others None."""
    accelerator, scheduler = run.accelerator, models.scheduler
    sums.pairs += batch["real"].shape[0]  # counted on the host: no device sync
    draws, cond, real = step_inputs(batch, args, models, data, run.device)
    with accelerator.accumulate(trainer.unet):
        if args.loss == "sft":
            loss, stats = sft_loss(trainer.unet, scheduler, real, draws, cond)
        else:
            other, autocast = batch["other"].to(run.device, non_blocking=True), accelerator.autocast
            loss, stats = pair_loss(
                trainer.unet, trainer.reference, scheduler, real, other, draws, cond, beta=args.beta, autocast=autocast
            )
        accelerator.backward(loss)
        sync = accelerator.sync_gradients  # the last micro-step of an optimizer step
        grad_norm = accelerator.clip_grad_norm_(trainer.trainable, args.max_grad_norm) if sync else None
        sums.add(loss, stats, real.shape[0])
        if sync:
            row = sums.reduce(grad_norm)
            refuse_non_finite(row, trainer.global_step + 1, accelerator, run.out)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    if not sync:
        return None
    row.update(lr=trainer.lr_scheduler.get_last_lr()[0], pairs_per_s=row.pop("pairs") / (time.time() - sums.t0))
    if accelerator.optimizer_step_was_skipped:  # fp16: the grad scaler found inf/nan gradients
        row["skipped"] = True  # a step that changed no weight does not advance the schedule either
    else:
        trainer.lr_scheduler.step()
    trainer.global_step += 1
    sums.reset()
    return {"step": trainer.global_step, **row}


def step_inputs(batch, args, models, data, device):
    """A micro-step's batch on the device: its Draws, its Conditioning with caption dropout applied (laid out for
    pair_loss's [real; other] batch) and the real latents."""

    to_dev = lambda name: batch[name].to(device, non_blocking=True)

    t, noise = to_dev("t"), to_dev("noise")
    t2, noise2 = (to_dev("t2"), to_dev("noise2")) if "t2" in batch else (t, noise)
    drop = to_dev("drop") if args.caption_dropout > 0 else None
    text = to_dev("text") if drop is None else torch.where(drop[:, None, None], data.empty_text, to_dev("text"))
    members, extra = 1 if args.loss == "sft" else 2, {}
    if models.family != "sd":  # the pooled prompt embedding, dropped with the prompt
        pooled = to_dev("pooled") if drop is None else torch.where(drop[:, None], data.empty_pooled, to_dev("pooled"))
        extra = {"pooled_projections": torch.cat([pooled] * members)}
    if models.family == "sdxl":  # and each image's micro-conditioning
        ids = [to_dev("time_ids"), to_dev("time_ids_other")][:members]
        extra = {"added_cond_kwargs": {"text_embeds": extra["pooled_projections"], "time_ids": torch.cat(ids)}}
    return Draws(t, noise, t2, noise2, drop), Conditioning(torch.cat([text] * members), extra), to_dev("real")


class StepSums:
    """The metric sums of an optimizer step's micro-steps, kept on the device until the step: one host sync per step,
    none per micro-step. The step's one reduce also carries the stop signals' votes (spin_extras.py)."""

    def __init__(self, accelerator, stop=None):
        self.accelerator, self.stop = accelerator, stop
        self.reset()

    def reset(self):
        self.sums, self.names, self.pairs, self.t0 = None, None, 0, time.time()

    def add(self, loss, stats, batch_size):
        batch_sums = torch.stack([loss.detach() * batch_size] + [v.detach().sum() for v in stats.values()])
        self.sums = batch_sums if self.sums is None else self.sums + batch_sums
        self.names = list(stats)

    def reduce(self, grad_norm):
        """The means over every pair of every process: loss, statistics, gradient norm, and the pairs counted."""
        votes = self.stop.flags() if self.stop else []
        counts = torch.tensor([float(self.pairs), *votes], device=self.accelerator.device)
        total = self.accelerator.reduce(torch.cat([self.sums, counts]), "sum").tolist()
        end = self.sums.numel()
        if self.stop:
            self.stop.agree(total[end + 1 :])
        n, grad_norm = total[end], float("nan") if grad_norm is None else float(grad_norm)
        stats = {k: v / n for k, v in zip(self.names, total[1:end])}
        return {"loss": total[0] / n, **stats, "grad_norm": grad_norm, "pairs": n}


def refuse_non_finite(row, step, accelerator, out):
    """A non-finite loss would poison the weights: stop before the optimizer applies it (fp16's grad scaler skips
    non-finite gradients itself)."""
    if math.isfinite(row["loss"]) and (math.isfinite(row["grad_norm"]) or accelerator.mixed_precision == "fp16"):
        return
    last = list_checkpoints(out)
    kept = f"; the last good checkpoint is {last[-1]}" if last else ""
    raise UserError(
        f"non-finite loss at step {step} (loss {row['loss']}, grad norm {row['grad_norm']}): lower --learning_rate or "
        f"--beta, prefer bf16 to fp16, check the data{kept}; no unet/ was written"
    )


# ---- Models ----
@dataclass
class Models:
    """theta_k and what training needs of its pipeline."""

    base: str  # --pretrained_model_name_or_path: VAE, text encoder(s), tokenizer(s), scheduler
    scheduler: Any  # how latents are noised and what the model predicts: DDPMScheduler; SD3: FlowMatchEuler...
    tokenizers: tuple  # SD: (tokenizer,); SDXL: (tokenizer, tokenizer_2); SD3: none (its pipeline encodes prompts)
    unet: Any  # theta_k in float32: the policy that trains (SD3: the transformer)
    fingerprint: str  # of theta_k's weights: the opponent check, the resume check, the run record
    family: str  # "sd" (SD-1.x/2.x), "sdxl" or "sd3": FAMILIES
    force_zeros: bool  # SDXL base: the unconditional branch's prompt embeddings are zeros, not the empty prompt's
    vae_dtype: torch.dtype  # the compute dtype, but fp32 where the VAE's config asks for it (force_upcast)
    pin: dict  # --revision and --variant where given: every load of the base's parts, the cache keys

    @property
    def folder(self):  # the output's model folder, as the pipeline names it
        return "transformer" if self.family == "sd3" else "unet"


def load_component(what, load, *args, **kwargs):
    """load(*args, **kwargs), a from_pretrained or load_config; a file it cannot read is one line naming `what`."""
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {what}: {variant_hint(e, kwargs.get('variant'))}") from None


def load_models(args, run):
    """theta_k (--unet, float32) with the base pipeline's scheduler, tokenizer(s) and VAE settings; --resolution's
    default is the model's native latent size times the VAE's downsampling."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    check_model_path(args.pretrained_model_name_or_path)
    base, rev = args.pretrained_model_name_or_path, args.revision
    what = f"the pipeline {base!r}"
    config = load_component(what, DiffusionPipeline.load_config, base, revision=rev)
    family, *want = FAMILIES.get(config.get("_class_name"), (None,))
    if args.no_t5 and family != "sd3":
        raise UserError(f"--no_t5: {base} is not SD3; it has no T5 encoder")
    if family is None:  # FLUX too: packed latents and a guidance embedding are another training path
        raise UserError(
            f"{base} is a {config.get('_class_name')}, which is not supported; supported: SD-1.x/2.x "
            "(StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline), SD3/SD3.5 (StableDiffusion3Pipeline)"
        )
    scheduler_class = FlowMatchEulerDiscreteScheduler if family == "sd3" else DDPMScheduler
    scheduler = load_component(what, scheduler_class.from_pretrained, base, subfolder="scheduler", revision=rev)
    unet = load_unet(args.unet, base, rev, args.variant)
    fingerprint = unet_fingerprint(unet)
    kind = [type(unet).__name__, unet.config.get("addition_embed_type")]
    if kind != want:
        raise UserError(f"--unet {args.unet or 'base'}: a {kind[0]} ({kind[1]!r}) does not fit the base's {family}")
    tokenizers, force_zeros = (), family == "sdxl" and bool(config.get("force_zeros_for_empty_prompt", True))
    for name in {"sd": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}.get(family, ()):
        tokenizer = load_component(what, CLIPTokenizer.from_pretrained, base, subfolder=name, revision=rev)
        tokenizers += (check_tokenizer(tokenizer, what, name),)
    args.beta = BETA[family] if args.beta is None else args.beta
    vae = load_component(f"the VAE config of {base!r}", AutoencoderKL.load_config, base, subfolder="vae", revision=rev)
    scale = 2 ** (len(vae["block_out_channels"]) - 1)  # the VAE's downsampling
    args.resolution = args.resolution or unet.config.sample_size * scale
    if args.resolution % (scale * unet.config.get("patch_size", 1)):  # SD3's transformer cuts latents in 2x2 patches
        raise UserError(f"--resolution must be a multiple of {scale * unet.config.get('patch_size', 1)} for this model")
    if args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()  # the reference, a copy of this UNet, inherits it
        except ModuleNotFoundError:
            run.log("note: xformers is not installed; the UNet uses PyTorch's scaled_dot_product_attention")
    # SDXL's VAE overflows in fp16, its config asks for fp32 (force_upcast); bf16 has fp32's range, so it is kept
    vae_dtype = torch.float32 if vae.get("force_upcast", False) and run.dtype == torch.float16 else run.dtype
    pin = {k: getattr(args, k) for k in ("revision", "variant") if getattr(args, k)}  # where given: keys unchanged
    return Models(base, scheduler, tokenizers, unet, fingerprint, family, force_zeros, vae_dtype, pin)


def refuse_unsupported_engine(environ):
    """DeepSpeed, FSDP and Megatron-LM take over accumulation, clipping, autocast and saving, which this script does
    around a plain DDP step: a launch through them would train something else without saying so."""
    for name in ("DeepSpeed", "FSDP", "Megatron-LM"):
        var = f"ACCELERATE_USE_{name.upper().replace('-', '_')}"
        if environ.get(var, "false").lower() in ("true", "1", "yes"):
            raise UserError(
                f"{name} launches are not supported: train_spin.py runs DDP on any number of GPUs and nodes "
                "(accelerate launch --multi_gpu, or torchrun); for a model that does not fit, train a LoRA "
                "adapter (--lora_rank)"
            )


def cast_frozen(module, dtype):
    """Hold a module's frozen weights in the compute dtype: under autocast every matmul and convolution casts its fp32
    weight to it on each call anyway, so this computes the same in half the memory; normalisation layers compute in
    fp32 under autocast, so theirs stay fp32. (diffusers' cast_training_params casts the trainable weights only.)"""
    if dtype == torch.float32:
        return module
    for m in module.modules():
        norm = isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(m).__name__
        for p in m.parameters(recurse=False):
            if not p.requires_grad:  # the norms' copied too: no tensor keeps the loaded file's mapping alive
                p.data = p.data.clone() if norm else p.data.to(dtype)
    return module


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
    """The frozen reference of a LoRA run: the policy's own UNet with its adapter off (no second copy in memory)."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def checkpoint_adapter_only(accelerator):
    """A LoRA run's checkpoint-N/ holds the adapter (ADAPTER_FILE), not the frozen UNet under it: megabytes, not
    gigabytes. Resuming puts it back into the same frozen UNet."""
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
                f"checkpoint {input_dir} has no {ADAPTER_FILE}: it was not written by a LoRA run (resume with the "
                "flags that made it, or use another --output_dir)"
            )
        unexpected = set_peft_model_state_dict(accelerator.unwrap_model(models.pop()), load_file(path)).unexpected_keys
        if unexpected:
            raise UserError(
                f"checkpoint {input_dir}: its adapter does not fit this UNet (e.g. {unexpected[0]}); resume with the "
                "--lora_* flags that made it"
            )

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# ---- Data: real rows -> cached latents, captions -> cached prompt embeddings, generate.py's folder -> pairs. Our own
# caches, not datasets' map(): that would encode on every process and cache by the function's hash, not by the weights
# that encoded the rows; these are built once between all processes and read lazily by row.
SHARD = 1024  # rows per shard of the text and synthetic-image caches, and per piece of a downloaded dataset
CHUNK = 64  # images decoded and encoded at a time
CACHE_FORMAT = 2  # part of every cache key: a cache written in an older layout is rebuilt, never misread


@dataclass
class RealData:
    """The real rows, encoded: the caches' folders, the latent cache's counters, each row's caption, whether its image
    decoded and its prompt's row in the text cache, and what caption dropout trains on."""

    lat_dir: Path
    txt_dir: Path
    info: dict  # usable_rows, rows_read, ties_dropped, undecodable_rows, cache_rows, ...
    captions: list
    valid: list
    caption_ids: list
    empty_text: torch.Tensor
    empty_pooled: Optional[torch.Tensor]  # SDXL only


class ImageEncoder:
    """PIL images -> latents, the way every real image is encoded (the opponent's PNGs too, with --synthetic_latent
    image). The VAE is loaded on first use: a run whose caches are complete never loads it."""

    def __init__(self, args, run, models):
        self.args, self.models, self.device, self.vae = args, models, run.device, None

    def __call__(self, images):
        from diffusers import AutoencoderKL

        if self.vae is None:
            base, load = self.models.base, AutoencoderKL.from_pretrained
            pin = {**self.models.pin, "torch_dtype": self.models.vae_dtype}
            self.vae = load_component(f"the VAE of {base!r}", load, base, subfolder="vae", **pin).to(self.device)
        x = torch.stack([preprocess_image(im, self.args.resolution) for im in images])
        return torch.cat([encode_images(self.vae, x[i : i + 16]) for i in range(0, len(x), 16)])


def encode_real_data(args, run, models, encode):
    """The real rows' latents and their prompts' embeddings, each computed once into --cache_dir (keyed by model and
    data: later iterations reuse them), and the empty prompt's for caption dropout."""
    lat_dir = latent_cache(args, run, models, encode)
    info = json.loads((lat_dir / "info.json").read_text())
    captions = json.loads((lat_dir / "captions.json").read_text())
    run.log(
        f"real data: {info['usable_rows']} usable rows of {info['rows_read']} read "
        f"({info['ties_dropped']} ties dropped, {info['undecodable_rows']} undecodable images skipped)"
    )
    unique = list(dict.fromkeys([""] + captions))  # the empty prompt first: caption dropout's
    txt_dir = text_cache(args, run, models, unique)
    # caption dropout trains on what the unconditional branch sees: the empty prompt, or zeros (force_zeros)
    empty_text = ShardedTensors(txt_dir, "text")[0].to(run.device)
    empty_pooled = ShardedTensors(txt_dir, "pooled")[0].to(run.device) if models.family != "sd" else None
    if models.force_zeros:
        empty_text, empty_pooled = torch.zeros_like(empty_text), torch.zeros_like(empty_pooled)
    position, invalid = {c: i for i, c in enumerate(unique)}, set(info["invalid_rows"])
    valid, ids = [i not in invalid for i in range(len(captions))], [position[c] for c in captions]
    return RealData(lat_dir, txt_dir, info, captions, valid, ids, empty_text, empty_pooled)


def latent_cache(args, run, models, encode):
    """The latent cache of the real rows (DPO: with each row's loser), built once; returns its folder. Piece i of the
    dataset goes to process i mod N, as shard i; with --max_train_samples the rounds stop once the shards made hold
    enough rows. The result is the same whatever N."""
    with_loser, max_rows = args.loss == "dpo", args.max_train_samples
    given = {k: getattr(args, k) for k in ("split", "image_column", "caption_column", "max_train_samples")}
    given.update(resolution=args.resolution, with_loser=with_loser, dataset=source_fingerprint(args.dataset))
    vae = {"vae": weights_identity(models.base, "vae"), "vae_dtype": str(models.vae_dtype)}
    key = cache_key(**given, **vae, **models.pin)
    folder = Path(args.cache_dir) / f"latents-{key}"
    if (folder / "info.json").is_file():
        return folder
    run.log(f"encoding the real images once into {folder} ...")
    t0, pieces = time.time(), dataset_pieces(open_dataset(args.dataset, args.split, args.streaming))

    counted = {}  # cache rows per shard, each shard's header read once

    def enough(made):
        counted.update({j: len(read_piece(shard_path(folder, j))["captions"]) for j in range(len(counted), made)})
        return sum(counted.values()) >= max_rows

    make_shard = lambda i: encode_piece(pieces[i](), args, encode)
    made = build_shards(folder, len(pieces), make_shard, run.accelerator, enough if max_rows else None)
    merged = merge_pieces([read_piece(shard_path(folder, j)) for j in range(made)], max_rows)
    if not merged["captions"]:
        raise UserError("the dataset has no usable rows (ties dropped); check --dataset/--split/--caption_column")
    if run.main_process:
        for j in range(len(merged["sizes"]), len(pieces)):  # shards past the cut (other processes ran ahead)
            shard_path(folder, j).unlink(missing_ok=True)
        (folder / "captions.json").write_text(json.dumps(merged["captions"]))
    invalid = [i for i, ok in enumerate(merged["valid"]) if not ok]
    finish_cache(folder, run.accelerator, {"sizes": merged["sizes"], **merged["counts"], "invalid_rows": invalid})
    rows, seconds, world = merged["counts"]["rows_read"], time.time() - t0, run.accelerator.num_processes
    speed = f"{rows / seconds:.1f} rows/s, {world} process(es), {len(pieces)} piece(s) of the dataset"
    run.log(f"encoded {rows} rows in {seconds:.1f}s ({speed})")
    return folder


def encode_piece(ds, args, encode):
    """One piece of the dataset's usable rows (ties dropped; at most --max_train_samples), encoded CHUNK at a time: a
    shard's (tensors, metadata). A row whose image does not decode keeps its place, marked invalid (a blank image
    stands in). The metadata holds the captions, each row's place among the rows read (so that a cut at
    --max_train_samples recounts ties exactly) and the piece's counters."""
    stats, sides = {}, ("", "_lose") if args.loss == "dpo" else ("",)
    examples = iter_examples(ds, args.caption_column, args.image_column, with_loser=args.loss == "dpo", stats=stats)
    latents, sizes = {s: [] for s in sides}, {s: [] for s in sides}  # sizes: original height, width (SDXL's)
    captions, source_rows, valid = [], [], []
    numbered = ((ex, stats["rows_read"] - 1) for ex in itertools.islice(examples, args.max_train_samples))
    while chunk := list(itertools.islice(numbered, CHUNK)):
        images = {s: [decode_image(ex["image" + s]) for ex, _ in chunk] for s in sides}
        for s, column in images.items():
            latents[s].append(encode([im or Image.new("RGB", (8, 8)) for im in column]).cpu().half())
            sizes[s] += [(im.height, im.width) if im else (0, 0) for im in column]
        valid += [all(images[s][i] is not None for s in sides) for i in range(len(chunk))]
        captions += [ex["caption"] for ex, _ in chunk]
        source_rows += [row for _, row in chunk]
    tensors = {"valid": torch.tensor(valid, dtype=torch.bool)}
    for s in sides:
        tensors["latents" + s] = torch.cat(latents[s]) if captions else torch.zeros(0, 1, dtype=torch.float16)
        tensors["image_hw" + s] = torch.tensor(sizes[s], dtype=torch.int32).reshape(-1, 2)
    return tensors, {k: json.dumps(v) for k, v in {"captions": captions, "source_rows": source_rows, **stats}.items()}


def read_piece(path):
    """A latent shard's header: its captions, source rows, counters and which rows are valid."""
    with safe_open(str(path), "pt") as f:
        meta, valid = f.metadata(), f.get_tensor("valid").tolist()
    return {k: json.loads(meta[k]) for k in ("captions", "source_rows", "rows_read", "ties_dropped")} | {"valid": valid}


def merge_pieces(pieces, max_rows):
    """The cache's rows from its pieces in order, cut at `max_rows` rows: captions, validity, rows per shard, and the
    counters of the rows actually taken (rows read and ties only up to the last row taken)."""
    captions, valid, sizes, rows_read, ties = [], [], [], 0, 0
    for p in pieces:
        take = len(p["captions"]) if max_rows is None else min(len(p["captions"]), max_rows - len(captions))
        if take == len(p["captions"]) and (max_rows is None or len(captions) + take < max_rows):
            rows_read, ties = rows_read + p["rows_read"], ties + p["ties_dropped"]  # the whole piece
        else:  # the cut falls in this piece: only the rows up to its last row taken
            read = p["source_rows"][take - 1] + 1 if take else 0
            rows_read, ties = rows_read + read, ties + read - take
        captions, valid = captions + p["captions"][:take], valid + p["valid"][:take]
        sizes.append(len(p["captions"]))
        if max_rows is not None and len(captions) >= max_rows:
            break
    counts = {"cache_rows": len(captions), "usable_rows": sum(valid), "rows_read": rows_read, "ties_dropped": ties}
    counts["undecodable_rows"] = len(valid) - sum(valid)
    return {"captions": captions, "valid": valid, "sizes": sizes, "counts": counts}


def text_cache(args, run, models, captions):
    """The prompt embeddings of `captions` (the empty prompt first), built once; returns the cache's folder."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    n = {"sd": 1, "sdxl": 2, "sd3": 3}[models.family]  # text encoders: CLIP; two CLIPs; two CLIPs and T5
    names = [f"{kind}{i}" for kind in ("text_encoder", "tokenizer") for i in ("", "_2", "_3")[:n]]
    sd3 = {"max_sequence_length": args.max_sequence_length} if models.family == "sd3" else {}
    parts = {name: weights_identity(models.base, name) for name in names if not (args.no_t5 and name.endswith("_3"))}
    key = cache_key(captions=cache_key(c=captions), text_encoder_dtype=str(run.dtype), **parts, **models.pin, **sd3)
    folder = Path(args.cache_dir) / f"text-{key}"
    if (folder / "info.json").is_file():
        return folder
    run.log(f"encoding {len(captions)} prompts once into {folder} ...")
    what = f"the text encoder(s) of {models.base!r}"
    if sd3:  # the pipeline's own encode_prompt: CLIP penultimate states, padded, beside T5's; both CLIPs' pooled
        load = dict(transformer=models.unet, vae=None, dtype=run.dtype, **models.pin)  # no second transformer
        load.update(dict(text_encoder_3=None, tokenizer_3=None) if args.no_t5 else {})
        pipe = load_component(what, StableDiffusion3Pipeline.from_pretrained, models.base, **load)
        for encoder in filter(None, (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)):
            encoder.to(run.device)  # not the policy: it waits on the CPU until training
        prompt = functools.partial(pipe.encode_prompt, device=run.device, do_classifier_free_guidance=False, **sd3)
        encode = torch.no_grad()(lambda c: prompt(c, None, None)[::2])  # (embeddings, pooled), no autograd graph
    else:
        load = functools.partial(load_component, what, torch_dtype=run.dtype, **models.pin)
        classes = [CLIPTextModel, CLIPTextModelWithProjection]
        encoders = [
            load(c.from_pretrained, models.base, subfolder=n).to(run.device) for c, n in zip(classes, names[:n])
        ]
        encode = functools.partial(encode_prompts, encoders, models.tokenizers)

    def make_shard(i):
        part = captions[i * SHARD : (i + 1) * SHARD]
        chunks = [encode(part[j : j + 64]) for j in range(0, len(part), 64)]
        tensors = {"text": torch.cat([text for text, _ in chunks]).half()}
        pooled = {"pooled": torch.cat([p for _, p in chunks]).half()} if models.family != "sd" else {}
        return tensors | pooled, {}

    return build_cache(folder, len(captions), make_shard, run.accelerator, {"captions": len(captions)})


@torch.no_grad()
def encode_prompts(text_encoders, tokenizers, captions):
    """Captions -> (prompt embeddings, pooled embedding or None), as the pipelines compute them: SD-1.x/2.x the text
    encoder's last hidden state; SDXL both encoders' penultimate hidden states side by side and the second's pooled
    projection (StableDiffusionXLPipeline.encode_prompt)."""
    sdxl, hidden = len(text_encoders) == 2, []
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        out = encoder(torch.tensor(ids.input_ids, device=encoder.device), output_hidden_states=sdxl)
        hidden.append(out.hidden_states[-2] if sdxl else out[0])
    return torch.cat(hidden, dim=-1).float(), out[0].float() if sdxl else None


def build_shards(folder, count, make_shard, accelerator, enough=None):
    """Shards 0..count-1 of a cache, shard i made by process i mod N (make_shard(i) -> tensors, metadata) in rounds of N
    until enough(shards made); a shard that exists is complete (renamed from a temp name): a killed build resumes."""
    folder.mkdir(parents=True, exist_ok=True)
    rank, world, made = accelerator.process_index, accelerator.num_processes, 0
    for first in range(0, count, world):
        path = shard_path(folder, first + rank)
        if first + rank < count and not path.is_file():
            tensors, meta = make_shard(first + rank)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".tmp")), metadata=meta)
            os.replace(path.with_suffix(".tmp"), path)
        accelerator.wait_for_everyone()
        made = min(first + world, count)
        if enough is not None and enough(made):
            break
    return made


def build_cache(folder, rows, make_shard, accelerator, info):
    """A cache of `rows` rows in shards of SHARD rows (build_shards), then its info.json; returns its folder."""
    shards = math.ceil(rows / SHARD)
    build_shards(folder, shards, make_shard, accelerator)
    finish_cache(folder, accelerator, {"sizes": [min(SHARD, rows - i * SHARD) for i in range(shards)], **info})
    return folder


def finish_cache(folder, accelerator, info):
    """info.json (rows per shard and counters), written last by the main process, marks a cache complete."""
    if accelerator.is_main_process:
        write_json_atomic(folder / "info.json", info)
    accelerator.wait_for_everyone()


def shard_path(folder, i):
    return Path(folder) / f"shard-{i:05d}.safetensors"


def cache_key(**parts):
    text = json.dumps({**parts, "format": CACHE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_fingerprint(name):
    """A dataset's identity for the cache key: a local path with the sizes and times of its files, or the hub id."""
    p = Path(name).expanduser()
    if not p.exists():
        return name
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve())] + [
        (str(f.relative_to(p)) if f != p else "", f.stat().st_size, f.stat().st_mtime_ns) for f in files
    ]


def weights_identity(base, subfolder):
    """A pipeline part's identity for the cache keys: its config and each weight file's size and time (other weights
    under the same config never reuse stale latents); a hub id's path otherwise (pin it with --revision)."""
    folder = Path(base).expanduser() / subfolder
    if not folder.is_dir():
        return f"{base}/{subfolder}"
    stamp = lambda f: (
        (f.name, f.read_text()) if f.suffix == ".json" else (f.name, f.stat().st_size, f.stat().st_mtime_ns)
    )
    return [stamp(f) for f in sorted(folder.iterdir()) if f.is_file()]


def dataset_pieces(ds):
    """The dataset cut into pieces, in order, each readable on its own, so that each process reads (and, streamed,
    downloads) only its own: a streamed dataset by its files, a downloaded one by SHARD rows."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        ds = ds.reshard() if hasattr(ds, "reshard") else ds  # parquet: by row groups, where `datasets` can
        n = ds.num_shards if hasattr(ds, "num_shards") else ds.n_shards
        return [functools.partial(ds.shard, num_shards=n, index=i) if n > 1 else (lambda: ds) for i in range(n)]
    return [functools.partial(ds.select, range(a, min(a + SHARD, len(ds)))) for a in range(0, len(ds), SHARD)]


def resize_crop(w, h, resolution):
    """Where preprocess_image puts an image of w x h: its resized size and the top-left corner of the centre crop."""
    s = resolution / min(w, h)
    rw, rh = max(resolution, round(w * s)), max(resolution, round(h * s))
    return rw, rh, (rw - resolution) // 2, (rh - resolution) // 2


def preprocess_image(img, resolution):
    """Resize the short side to `resolution` (bicubic), centre-crop, scale to [-1, 1], CHW float32."""
    rw, rh, left, top = resize_crop(*img.size, resolution)
    img = img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def encode_images(vae, pixels):
    """Pixels in [-1, 1] -> scaled latents, the posterior mean: deterministic, so the cache is reproducible."""
    mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return ((mean - (getattr(vae.config, "shift_factor", None) or 0)) * vae.config.scaling_factor).float()


def time_ids(height, width, resolution):
    """SDXL's micro-conditioning of an image of height x width that preprocess_image brought to `resolution`, as the
    pipeline and diffusers' SDXL training take it: original size, crop top-left, target size."""
    _, _, left, top = resize_crop(width, height, resolution)
    return [height, width, top, left, resolution, resolution]


class ShardedTensors:
    """Lazy row access to one tensor of a cache folder's shards (rows per shard from info.json); each DataLoader worker
    opens its own file handles."""

    def __init__(self, path, key):
        self.path, self.key, self.files = Path(path), key, {}
        self.starts = [0, *itertools.accumulate(json.loads((self.path / "info.json").read_text())["sizes"])]

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, i):
        if not 0 <= i < self.starts[-1]:
            raise IndexError(f"row {i} of a cache with {self.starts[-1]} rows ({self.path})")
        s = bisect.bisect_right(self.starts, i) - 1
        if s not in self.files:
            self.files[s] = safe_open(str(shard_path(self.path, s)), "pt")
        j = i - self.starts[s]
        return self.files[s].get_slice(self.key)[j : j + 1][0].float()

    def __getstate__(self):  # file handles do not pickle: DataLoader workers reopen them
        return {**self.__dict__, "files": {}}


class Pairs(NamedTuple):
    """What the training steps draw from: the pairs, the latent shape, the global batch (pairs per micro-step over every
    process), and where the opponent's samples came from (for the run record)."""

    dataset: Any  # PairDataset
    latent_shape: tuple
    global_batch: int
    synth_config: Optional[dict]  # --synthetic_dir's run_config.json (SPIN)
    syn_dir: Optional[Path]  # the cache of its PNGs encoded like real images (--synthetic_latent image)


def make_pairs(args, run, models, data, encode):
    """SPIN: each usable real row with one of the opponent's samples of its prompt (pair_rows), once the opponent is
    known to be theta_k itself; DPO: each row with its Pick-a-Pic loser; SFT: the real rows alone."""
    rows, others, other_source = [i for i, ok in enumerate(data.valid) if ok], None, None
    synth_config, syn_dir = None, None
    if args.loss == "dpo":
        other_source, others = ShardedTensors(data.lat_dir, "latents_lose"), rows
    if args.loss == "spin":
        synth_config, synthetic = read_synthetic_dir(args.synthetic_dir, args.synthetic_latent)
        check_opponent(args, run, synth_config, models.fingerprint)
        pairs, missing = pair_rows(data.captions, data.valid, synthetic)
        if missing:
            raise UserError(
                f"{len(missing)} training prompt(s) have no synthetic image in --synthetic_dir (e.g. {missing[0]!r}); "
                "run generate.py on the same --dataset/--split/--max_train_samples"
            )
        rows, others = [r for r, _ in pairs], [k for _, k in pairs]
        other_source = LatentFiles([r["path"] for r in synthetic]) if args.synthetic_latent == "sampler" else None
        if args.synthetic_latent == "image":  # spin_extras.py: the PNGs encoded like real images
            syn_dir = run.extras.synthetic_cache(args, run, models, synthetic, encode)
            other_source = ShardedTensors(syn_dir, "latents")
    latent_shape = tuple(ShardedTensors(data.lat_dir, "latents")[rows[0]].shape)
    if other_source is not None and tuple(other_source[others[0]].shape) != latent_shape:
        raise UserError(
            f"synthetic latents are {tuple(other_source[others[0]].shape)} but real latents at --resolution "
            f"{args.resolution} are {latent_shape}: generate and train at the same resolution"
        )
    res = args.resolution if models.family == "sdxl" else None
    dataset = PairDataset(data, rows, others, other_source, res, args.loss == "dpo", models.family != "sd")
    global_batch = args.train_batch_size * run.accelerator.num_processes
    if len(dataset) < global_batch:
        raise UserError(
            f"only {len(dataset)} training pairs, fewer than one batch of {global_batch} (--train_batch_size x "
            "processes): lower --train_batch_size or add data"
        )
    return Pairs(dataset, latent_shape, global_batch, synth_config, syn_dir)


def check_opponent(args, run, synth_config, fingerprint):
    """SPIN's opponent is theta_k itself: --synthetic_dir must have been generated by the UNet being trained, and on
    SD3 from the same T5 prompt length (other prompt embeddings condition another model)."""
    model, settings = synth_config.get("model") or {}, synth_config.get("settings") or {}
    made = (settings.get("max_sequence_length", args.max_sequence_length), settings.get("no_t5", False))  # SD3's
    if made != (args.max_sequence_length, args.no_t5):
        raise UserError(
            f"--synthetic_dir was generated with --max_sequence_length {made[0]}, --no_t5 {made[1]}: train the same"
        )
    if model.get("unet_fingerprint") == fingerprint:
        return
    msg = (
        f"--synthetic_dir {args.synthetic_dir} was generated by UNet {str(model.get('unet_fingerprint'))[:19]}... "
        f"({model.get('unet')!r}), but the UNet being trained (--unet {args.unet or 'base'}) is {fingerprint[:19]}...: "
        "the opponent must be theta_k itself; regenerate with the same --unet, or pass --allow_opponent_mismatch"
    )
    if not args.allow_opponent_mismatch:
        raise UserError(msg)
    run.log("warning: " + msg)


def read_synthetic_dir(path, kind):
    """generate.py's folder: run_config.json (who made it) and its finished images, in prompt and image order (the
    metadata.jsonl rows whose file exists: the PNG for kind "image", the sampler's latent for "sampler")."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--synthetic_dir {path}: folder not found; run generate.py first")
    if not (path / "run_config.json").is_file() or not (path / "metadata.jsonl").is_file():
        raise UserError(f"--synthetic_dir {path}: no run_config.json/metadata.jsonl; it must be generate.py's folder")
    config = json.loads((path / "run_config.json").read_text())
    field = "file_name" if kind == "image" else "latent_file"
    per_row = bool((config.get("args") or {}).get("per_row"))  # generate.py --per_row: prompt i is training row i
    rows = []
    for rec in read_jsonl(path / "metadata.jsonl"):
        if rec.get(field) and (path / rec[field]).is_file():
            rows.append({**rec, "path": str(path / rec[field]), **({"row": rec["prompt_index"]} if per_row else {})})
    if not rows:
        what = "PNG files" if kind == "image" else "latents"
        hint = " (or pass --synthetic_latent image)" if kind != "image" else ""
        raise UserError(
            f"--synthetic_dir {path}: no finished images with {what}; rerun generate.py to complete it{hint}"
        )
    return config, sorted(rows, key=lambda r: (r["prompt_index"], r["image_index"]))


def pair_rows(captions, valid, synthetic):
    """Each valid real row with one synthetic image of its caption: the caption's j-th row takes its image j mod (its
    images), so every image is used; a folder of generate.py --per_row (records carry "row") pairs row i with its own
    image, as the paper's Algorithm 1. Returns [(row, index into `synthetic`)] and the captions without an image."""
    per_row = bool(synthetic) and "row" in synthetic[0]
    by_key, seen, pairs, missing = {}, {}, [], {}
    for k, rec in enumerate(synthetic):
        by_key.setdefault((rec["row"], rec["prompt"]) if per_row else rec["prompt"], []).append(k)
    for row, (caption, ok) in enumerate(zip(captions, valid)):
        found = by_key.get((row, caption) if per_row else caption) if ok else None
        if ok and not found:
            missing[caption] = None
        elif found:
            j = 0 if per_row else seen.get(caption, 0)  # --per_row: the row's own image
            seen[caption] = j + 1
            pairs.append((row, found[j % len(found)]))
    return pairs, list(missing)


class LatentFiles:
    """generate.py's per-image latent files (the sampler's final latents), by index."""

    def __init__(self, paths):
        self.paths = paths

    def __getitem__(self, i):
        return load_file(str(self.paths[i]))["latent"].float()


class PairDataset(torch.utils.data.Dataset):
    """Item i: the real latent, the other one (synthetic or loser; none for SFT) and the prompt embedding, read lazily
    from the caches; SDXL (`sdxl_resolution`) also the pooled embedding and each image's micro-conditioning."""

    def __init__(self, data, rows, others, other_source=None, sdxl_resolution=None, loser=False, pooled=False):
        self.real, self.text = ShardedTensors(data.lat_dir, "latents"), ShardedTensors(data.txt_dir, "text")
        self.rows, self.others, self.caption_ids, self.other_source = rows, others, data.caption_ids, other_source
        self.res, self.pooled = sdxl_resolution, ShardedTensors(data.txt_dir, "pooled") if pooled else None
        if self.res:
            self.hw = ShardedTensors(data.lat_dir, "image_hw")
            self.hw_other = ShardedTensors(data.lat_dir, "image_hw_lose") if loser else None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        item = {"real": self.real[row], "text": self.text[self.caption_ids[row]]}
        if self.other_source is not None:
            item["other"] = self.other_source[self.others[i]]
        if self.pooled is not None:
            item["pooled"] = self.pooled[self.caption_ids[row]]
        if self.res:
            item["time_ids"] = torch.tensor(time_ids(*self.hw[row].int().tolist(), self.res), dtype=torch.float32)
            # a loser keeps its own size; the opponent's image was generated at the training resolution, uncropped
            other_hw = self.hw_other[row].int().tolist() if self.hw_other else (self.res, self.res)
            item["time_ids_other"] = torch.tensor(time_ids(*other_hw, self.res), dtype=torch.float32)
        return item


class StepBatches(torch.utils.data.Dataset):
    """Item m: this process's batch of micro-step m with its draws, made in the data pipeline (the training loop's host
    work is the pinned, non-blocking copies). Batch and draws are pure functions of (--seed, m)."""

    def __init__(self, pairs, args, process_index, num_train_timesteps, density=None):
        self.pairs, self.args, self.process_index, self.T = pairs, args, process_index, num_train_timesteps
        self.density = density

    def __getitem__(self, micro):
        a, pairs, first = self.args, self.pairs, self.process_index * self.args.train_batch_size
        n, global_batch = len(pairs.dataset), pairs.global_batch
        rows = batch_indices(n, a.seed, global_batch, micro, self.process_index, a.train_batch_size)
        batch = torch.utils.data.default_collate([pairs.dataset[i] for i in rows])
        last, shape = first + len(rows), pairs.latent_shape
        dropout = a.caption_dropout
        draws = draw_step(a.seed, micro, global_batch, first, last, shape, self.T, a.pair_noise, dropout, self.density)
        batch.update(t=draws.t, noise=draws.noise, drop=draws.drop)
        if a.pair_noise != "shared":  # else the second member's draws are the first's: not copied twice
            batch.update(t2=draws.t2, noise2=draws.noise2)
        return batch


# ---- The run record, checkpoints and outputs ----
def list_checkpoints(output_dir):
    """The complete checkpoint-N folders of a run, by step."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted((p for p in found if (p / "train_state.json").is_file()), key=lambda p: int(p.name.split("-")[1]))


def write_run_record(args, run, models, pairs, data, trainer):
    """metrics.jsonl without the rows of steps to be redone, and run_config.json (finished: false): what made this
    folder, with which settings, models, precision, data and caches. Starts --report_to's tracker."""
    metrics = run.out / "metrics.jsonl"
    if run.main_process:
        kept = [r for r in read_jsonl(metrics) if r["step"] <= trainer.global_step] if metrics.is_file() else []
        metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        precision = {"compute": str(run.dtype), "vae": str(models.vae_dtype), "frozen_weights": str(run.dtype)}
        model = {"pretrained_model_name_or_path": models.base, "unet": args.unet or "base"}
        model.update(unet_fingerprint=models.fingerprint, conditioning=models.family)
        reference = {
            "unet": args.reference_unet or args.unet or "base",
            "unet_fingerprint": trainer.reference_fingerprint,
        }
        counts = ("usable_rows", "rows_read", "ties_dropped", "undecodable_rows", "cache_rows")
        data_record = {"pairs": len(pairs.dataset), **{k: data.info[k] for k in counts}}
        data_record["synthetic_latent"] = args.synthetic_latent if args.loss == "spin" else None
        caches = {"latents": data.lat_dir, "text": data.txt_dir, "synthetic": pairs.syn_dir}
        record = run_config(
            "train",
            args,
            identity=identity(args),
            finished=False,
            num_processes=run.accelerator.num_processes,
            global_batch=pairs.global_batch * args.gradient_accumulation_steps,
            precision={**precision, "trainable_weights": "torch.float32"},
            model={**model, "prediction_type": models.scheduler.config.get("prediction_type", "flow_velocity")},
            reference=reference,
            opponent=(pairs.synth_config or {}).get("model"),
            data=data_record,
            cache={k: str(v) if v else None for k, v in caches.items()},
        )
        write_json_atomic(run.out / "run_config.json", record)
    if run.accelerator.trackers == [] and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        run.accelerator.init_trackers("spin-diffusion", config=config)


def save_checkpoint(accelerator, out, global_step, lr_scheduler, args, fingerprint):
    """checkpoint-N/: the UNet (LoRA: the adapter), the optimizer and RNG states, train_state.json; written under a temp
    name and renamed once every process has written its part, so a checkpoint-N that exists is complete. Those beyond
    --checkpoints_total_limit go."""
    final, tmp = out / f"checkpoint-{global_step}", out / f"checkpoint-{global_step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, "identity": identity(args), "unet_fingerprint": fingerprint}
        state.update(num_processes=accelerator.num_processes, lr_scheduler=lr_scheduler.state_dict())
        write_json_atomic(tmp / "train_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[: -args.checkpoints_total_limit] if args.checkpoints_total_limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_outputs(args, run, models, trainer):
    """theta_{k+1} as output_dir/unet/ (a LoRA run: the adapter as lora/ too, and unet/ merged), spin_extras.py's
    outputs where asked for, then the run record marked finished."""
    accelerator, out = run.accelerator, run.out
    accelerator.wait_for_everyone()
    if run.main_process:
        final = accelerator.unwrap_model(trainer.unet)
        if args.lora_rank:  # fused into an fp32 copy of the starting UNet: its frozen weights were held cast
            from peft.utils import get_peft_model_state_dict

            adapter = {k: v.detach().cpu().float() for k, v in get_peft_model_state_dict(final).items()}
            final = models.unet = trainer.unet = trainer.reference = trainer.optimizer = trainer.trainable = None
            accelerator.free_memory()  # the training copy goes before the fp32 copy is loaded
            final = save_lora(adapter, args, models, out)
        replace_folder(out / models.folder, lambda tmp: final.save_pretrained(str(tmp)))  # safetensors
        record = {**json.loads((out / "run_config.json").read_text()), "finished": True}
        record["global_step"] = trainer.global_step
        if run.extras:
            run.extras.write_outputs(args, out, record, run.log)  # --lora_cumulative, --model_card
        write_json_atomic(out / "run_config.json", record)
        run.log(f"wrote {out / models.folder} (step {trainer.global_step}); metrics in {out / 'metrics.jsonl'}")
        if args.push_to_hub:
            run.extras.push_to_hub(out, args.hub_model_id or out.name, args.hub_token, run.log)
    accelerator.end_training()


def save_lora(adapter, args, models, out):
    """The trained adapter (peft names) on a fresh float32 load of the starting UNet: the adapter alone as out/lora/
    (the file pipeline.load_lora_weights reads), then the UNet with it merged, the next iteration's plain UNet. The
    scale lora_alpha / rank is multiplied into each lora_B, so that the file means the same to every loader, those that
    read no alpha included (diffusers' save with the adapter's metadata would lose that)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    unet = add_lora(
        load_unet(args.unet, models.base, args.revision, args.variant),
        args.lora_rank,
        args.lora_alpha,
        args.lora_target_modules,
    )
    set_peft_model_state_dict(unet, adapter)
    scale = unet.peft_config["default"].lora_alpha / unet.peft_config["default"].r
    state = {k: v * scale if k.endswith("lora_B.weight") else v for k, v in get_peft_model_state_dict(unet).items()}
    pipeline, layers = StableDiffusion3Pipeline if models.family == "sd3" else StableDiffusionPipeline, models.folder
    replace_folder(out / "lora", lambda tmp: pipeline.save_lora_weights(str(tmp), **{f"{layers}_lora_layers": state}))
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def replace_folder(final, write):
    """write(tmp) fills a temp folder, which then replaces `final`: a folder that exists is complete."""
    tmp = final.with_name(f"{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


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


# ---- model and data helpers (train_spin.py, generate.py; sample.py imports generate.py's) ----
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's checkpoint-N/: the adapter's weights (peft names)


def unet_fingerprint(unet):
    """sha256 of every UNet tensor (names and float32 values): identifies the weights, not the path."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def load_unet(unet_path, base_path, revision=None, variant=None):
    """The denoiser in float32 (SD, SDXL: a UNet; SD3: a transformer), the class its config names: None/'base' (the
    base pipeline's, at its --revision and --variant), a folder holding unet/ or transformer/, a bare model folder, a
    hub id (laid out as the base: unet/ as UCLA-AGI/SPIN-Diffusion-iter*) or a train_spin.py checkpoint-N/."""
    from diffusers import AutoModel

    where, sub, pin = unet_path, None, {}
    if unet_path in (None, "", "base"):
        where, sub, pin = base_path, denoiser_folder(base_path, revision), {"revision": revision, "variant": variant}
    elif Path(unet_path, "train_state.json").is_file():  # accelerate's save_state + train_state.json
        return load_checkpoint_unet(Path(unet_path))
    elif found := [s for s in ("unet", "transformer") if Path(unet_path, s, "config.json").is_file()]:
        sub = found[0]
    elif not Path(unet_path, "config.json").is_file():  # else a bare model folder
        if Path(unet_path).exists() or unet_path.startswith((".", "/", "~")):
            raise UserError(
                f"--unet {unet_path}: no UNet there (expected {unet_path}/unet/config.json, or transformer/); "
                "pass a folder written by train_spin.py, one of its checkpoint-N folders, a hub id, or 'base'"
            )
        sub = denoiser_folder(base_path, revision)
    try:
        return AutoModel.from_pretrained(where, subfolder=sub, torch_dtype=torch.float32, **pin)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the UNet from {where!r}{'/' + sub if sub else ''}: {variant_hint(e, pin.get('variant'))}"
            "; check the path or hub id (and HF_HUB_OFFLINE)"
        ) from None


def denoiser_folder(base, revision=None):
    """Where the base pipeline keeps its denoiser, as model_index.json says: unet/ (SD, SDXL), transformer/ (SD3)."""
    from diffusers import DiffusionPipeline

    try:
        return "transformer" if DiffusionPipeline.load_config(base, revision=revision).get("transformer") else "unet"
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the model_index.json of {base}: {str(e).splitlines()[0]}") from None


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


def variant_hint(error, variant):
    """The first line of a loading error; where it names --variant's files, also their likely cause and the fix."""
    first = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
    if variant and variant in str(error):
        return f"{first}; no --variant {variant} weight files there? drop --variant, or pass one the model has"
    return first


def check_tokenizer(tokenizer, what, subfolder):
    """Refuse the empty tokenizer transformers builds where a pipeline folder lacks its files (it fails in its call)."""
    if tokenizer.model_max_length > 10**6:  # transformers' "no limit recorded": no tokenizer_config.json was read
        raise UserError(
            f"could not load {what}: no tokenizer in its {subfolder}/ (vocab.json, merges.txt, tokenizer_config.json "
            "with model_max_length); save the pipeline with save_pretrained or point at a complete copy"
        )
    return tokenizer


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
            kind, data_files = kinds[files[0].suffix], {split: [str(f) for f in files]}
            return datasets.load_dataset(kind, data_files=data_files, split=split, streaming=streaming)
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
    """The .tar or .parquet files of a local folder that name `split`: in a folder of that name, or <split>.tar,
    <split>_00000.tar... (`datasets` reads test_unique_00000.tar as 'test'); [] where none, both kinds or a card."""
    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace").split("\n---", 1)[0], re.M):
        return []  # the folder's dataset card (a downloaded hub copy) names each split's files: `datasets` reads it
    named = re.compile(rf"{re.escape(split)}(?:[-_.][0-9][^/]*)?\.(?:tar|parquet)")
    files = sorted(f for f in folder.rglob("*") if f.suffix in (".tar", ".parquet") and f.is_file())
    files = [f for f in files if split in f.relative_to(folder).parts[:-1] or named.fullmatch(f.name)]
    return files if len({f.suffix for f in files}) == 1 else []


# Pick-a-Pic's caption column in its copies: the original parquet's, or a webdataset sample's file
PICKAPIC_CAPTIONS = ("caption", "caption.txt", "original_prompt.txt")


def pickapic_columns(column_names, caption_column="caption"):
    """{field: column} for caption, jpg_0, jpg_1, label_0, label_1 when the dataset is Pick-a-Pic, in its parquet
    layout or as webdataset tars (jpg_0.jpg, label_0.txt...), else None. A --caption_column of its own is kept."""
    names = list(column_names)

    def column(field):  # the original name, else the name with one extension
        with_extension = (c for c in names if c.split(".")[0] == field and c.count(".") == 1)
        return field if field in names else next(with_extension, None)

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


def image_seed(seed, prompt_index, image_index):
    """Seed of one image, from (run seed, prompt index, image index) only: independent of batch size, process count
    and resume point, and the same for every model, so that comparisons are paired."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


quiet_known_noise()  # before the libraries that log the known noise are imported (they are imported lazily)


if __name__ == "__main__":
    cli(main)
