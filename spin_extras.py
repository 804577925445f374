"""spin_extras.py: what a long train_spin.py run adds, imported by train_spin.py only when one of these flags asks:

    --validation_prompts / --validation_prompts_file   pictures of the policy while it trains (Validation)
    --model_card, --push_to_hub                         output_dir/README.md, the upload (model_card, push_to_hub)
    --lora_cumulative                                   theta_{k+1} as one adapter on the base UNet
    --checkpoint_on_signal                              a scheduler's SIGTERM / SIGUSR1: checkpoint, then exit
    --synthetic_latent image                            the opponent's PNGs encoded like real images (an ablation)
    (a launch on several nodes)                         the check that every node shares --cache_dir, --output_dir

Keep it beside train_spin.py (it uses train_spin.py's helpers); train_spin.py without it trains the same weights.
docs/train_spin.md ("A long run") has the details.
"""

import json
import os
import re
import secrets
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train_spin import (
    CHUNK,
    SHARD,
    UserError,
    build_cache,
    cache_key,
    decode_image,
    image_seed,
    load_component,
    replace_folder,
    several_nodes,
    weights_identity,
)


def check_args(args, accelerator):
    """Before any work: the validation prompts, from --validation_prompts or --validation_prompts_file (blank lines
    dropped), the other extras' settings, and on several nodes that they share --cache_dir and --output_dir."""
    prompts, path = args.validation_prompts, args.validation_prompts_file
    if prompts and path:
        raise UserError("give the validation prompts with --validation_prompts or --validation_prompts_file, not both")
    if path:
        try:
            prompts = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--validation_prompts_file {path}: cannot read it ({type(e).__name__})") from None
        if not any(line.strip() for line in prompts):
            raise UserError(f"--validation_prompts_file {path}: no prompts in it")
    args.validation_prompts = [q.strip() for q in prompts or [] if q.strip()] or None  # the run record keeps them
    for name in ("num_validation_images", "validation_steps", "validation_num_inference_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.validation_scheduler not in (None, *SCHEDULERS):
        raise UserError(f"--validation_scheduler {args.validation_scheduler}: one of {', '.join(SCHEDULERS)}")
    if args.lora_cumulative and not args.lora_rank:
        raise UserError("--lora_cumulative needs --lora_rank (it stacks the LoRA iterations' adapters)")
    if several_nodes():
        check_shared_folders(accelerator, {"--cache_dir": args.cache_dir, "--output_dir": args.output_dir})


def check_shared_folders(accelerator, folders):
    """Every process writes its part of the caches and checkpoints into --cache_dir and --output_dir and reads the
    others': on several nodes each must be one shared folder. The main process leaves a marker in each; a process that
    does not see it stops every process with one line."""
    from accelerate.utils import broadcast_object_list, gather_object

    token = broadcast_object_list([secrets.token_hex(8) if accelerator.is_main_process else None])[0]
    marks = {flag: Path(folder) / f".shared-check-{token}" for flag, folder in folders.items()}
    for mark in marks.values() if accelerator.is_main_process else ():
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text("")
    accelerator.wait_for_everyone()
    unseen = gather_object([[flag for flag, mark in marks.items() if not mark.is_file()]])
    accelerator.wait_for_everyone()
    for mark in marks.values() if accelerator.is_main_process else ():
        mark.unlink(missing_ok=True)
    bad = sorted({flag for per_process in unseen for flag in per_process})
    if bad:
        ranks = [i for i, per_process in enumerate(unseen) if per_process]
        raise UserError(
            f"{' and '.join(bad)} must be one folder shared by all {accelerator.num_processes} processes "
            f"(process(es) {ranks} do not see the main process's files there): on several nodes put them on a "
            "filesystem every node mounts at the same path"
        )


# ---- Validation images while training: the pictures that show a run diverging or over-training ----
# Each family's pipeline, loaded as generate.py loads it: no safety checker (its black images would hide what the
# model makes), no watermark
PIPELINES = {
    "sd": ("StableDiffusionPipeline", {"safety_checker": None, "requires_safety_checker": False}),
    "sdxl": ("StableDiffusionXLPipeline", {"add_watermarker": False}),
    "sd3": ("StableDiffusion3Pipeline", {}),
}


class Validation:
    """The policy samples the validation prompts from the same seeds before the first step, every --validation_steps
    and after the last, as generate.py samples (image i of prompt p from image_seed(--validation_seed, p, i), the final
    latent decoded here): step 0 is what generate.py makes of theta_k. Written to output_dir/validation/step-N/ and
    sent to --report_to's tensorboard or wandb. Prompt p is sampled by process p mod N and the main process writes them
    all. It draws from its own generators only: the training is the same with or without it."""

    def __init__(self, args, run, models):
        self.args, self.run, self.models, self.pipe = args, run, models, None
        if args.validation_scheduler and models.family == "sd3":  # every process refuses, before any step
            raise UserError("--validation_scheduler: SD3 samples with its own flow-matching sampler; drop the flag")

    def after_step(self, step, unet):
        a, accelerator = self.args, self.run.accelerator
        folder = self.run.out / "validation" / f"step-{step}"
        due = step % a.validation_steps == 0 or step == a.max_train_steps
        if not due or folder.is_dir():  # a resumed run keeps the steps it sampled already
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
        n, prompts = self.args.num_validation_images, self.args.validation_prompts
        return [[image_seed(self.args.validation_seed, p, i) for i in range(n)] for p in range(len(prompts))]

    @torch.no_grad()
    def sample(self, unet, prompt_indices):
        """{prompt index: uint8 images [images, H, W, 3]}: one pipeline call per prompt, in the run's precision."""
        a, pipe, seeds = self.args, self.pipeline(unet), self.seeds()
        r, was_training = a.resolution, unet.training
        shape = (unet.config.in_channels, r // pipe.vae_scale_factor, r // pipe.vae_scale_factor)
        sizes = {"original_size": (r, r), "crops_coords_top_left": (0, 0), "target_size": (r, r)}
        family = self.models.family
        unet.eval()
        out = {}
        try:
            for p in prompt_indices:
                noise, gens = initial_noise(seeds[p], shape)
                with self.run.accelerator.autocast():
                    latents = pipe(
                        prompt=[a.validation_prompts[p]] * len(seeds[p]),
                        latents=noise.to(self.run.device),
                        generator=gens,
                        num_inference_steps=a.validation_num_inference_steps,
                        guidance_scale=a.validation_guidance_scale,
                        height=r,
                        width=r,
                        output_type="latent",
                        **{"sd": {}, "sdxl": sizes, "sd3": {"max_sequence_length": a.max_sequence_length}}[family],
                    ).images
                out[p] = to_pixels(decode_latents(pipe.vae, latents, latents_mean_std=family == "sdxl")).numpy()
        finally:
            unet.train(was_training)
            self.move_parts("cpu")  # the training has their memory in between
        return out

    def pipeline(self, unet):
        """The base pipeline around the policy, loaded on first use (VAE and text encoders kept on the CPU between
        validations)."""
        if self.pipe is None:
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()  # their loading bars would break the training's
            transformers.utils.logging.disable_progress_bar()
            name, kwargs = PIPELINES[self.models.family]
            a, base = self.args, self.models.base
            load = getattr(diffusers, name).from_pretrained
            kwargs = {**kwargs, self.models.folder: unet}  # the policy: unet=, or transformer= for SD3
            kwargs.update(dict(text_encoder_3=None, tokenizer_3=None) if a.no_t5 else {})
            self.pipe = load_component(
                f"the pipeline {base!r}", load, base, dtype=self.run.dtype, **self.models.pin, **kwargs
            )
            if a.validation_scheduler:
                cls = getattr(diffusers, SCHEDULERS[a.validation_scheduler])
                self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config)
            self.pipe.vae.to(self.models.vae_dtype)  # fp32 where the VAE's config asks for it (SDXL's in fp16)
            self.pipe.set_progress_bar_config(disable=True)
        self.move_parts(self.run.device)
        return self.pipe

    def move_parts(self, device):
        if self.pipe is not None and self.run.device.type != "cpu":
            for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                if getattr(self.pipe, name, None) is not None:
                    getattr(self.pipe, name).to(device)

    def close(self):
        self.pipe = None


def write_validation_folder(folder, pixels, prompts, seeds):
    """validation/step-N/: images/<key>.png named as generate.py names them, metadata.jsonl and grid.png (a row per
    prompt), written under a temp name and renamed, so a folder that exists is complete. Returns the grid."""
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in pixels], axis=0)

    def write(tmp):
        (tmp / "images").mkdir(parents=True)
        rows = []
        for p, (prompt, images) in enumerate(zip(prompts, pixels)):
            for i, img in enumerate(images):
                name = f"images/{image_key(p, i)}.png"
                Image.fromarray(img).save(tmp / name, format="PNG")
                rows.append(
                    {"file_name": name, "prompt": prompt, "prompt_index": p, "image_index": i, "seed": seeds[p][i]}
                )
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        Image.fromarray(grid).save(tmp / "grid.png", format="PNG")

    replace_folder(folder, write)
    return grid


def log_validation_images(accelerator, grid, pixels, prompts, step):
    """The step's pictures to the trackers that show images: tensorboard gets the grid, wandb each image and prompt."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            images = [wandb.Image(img, caption=f"{p}: {q}") for p, q in enumerate(prompts) for img in pixels[p]]
            tracker.log({"validation": images}, step=step)


# ---- A scheduler's stop signal: every process stops after the same optimizer step, with a checkpoint of it ----
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Installed around the training loop: SIGTERM / SIGUSR1 end the run after the current optimizer step, with a
    checkpoint of it. The handler only notes the signal; the processes agree on it in the step's one reduce
    (train_spin.py's StepSums), so all stop after the same step however late each got it."""

    def __init__(self):
        self.received, self.agreed, self.previous = set(), None, {}

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
        """One 0/1 vote per STOP_SIGNALS: whether this process got it (StepSums sums them over the processes)."""
        return [float(s in self.received) for s in STOP_SIGNALS]

    def agree(self, counts):
        """The votes summed over the processes: the first of STOP_SIGNALS any of them got, the same on every one."""
        self.agreed = next((s for s, c in zip(STOP_SIGNALS, counts) if c > 0), None)


def exit_stopped(run, args, signum, step):
    """After a stop's checkpoint: one line, and exit status 128 + the signal's number (what shells report for a process
    the signal killed), so that a `set -e` loop stops instead of starting the next stage."""
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


def leave_stop_signals_to_training(worker_id):
    """A DataLoader worker leaves SIGTERM / SIGUSR1 to the training process: a scheduler signals every process of the
    job, and a worker killed by it would fail the run before its stop checkpoint. The training process's own SIGTERM
    (how it ends its workers) still ends the worker: sigwaitinfo tells who sent it. This needs the worker's one thread,
    as fork starts it (elsewhere SIGTERM keeps its default)."""
    import multiprocessing

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the training process never sends it to a worker
    tasks = Path("/proc/self/task")  # Linux: one entry per thread
    if not hasattr(signal, "sigwaitinfo") or not tasks.is_dir() or len(list(tasks.iterdir())) > 1:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask
    parent = multiprocessing.parent_process().pid

    def exit_on_parents_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=exit_on_parents_sigterm, daemon=True).start()


# ---- --synthetic_latent image: train on the opponent's decoded picture, encoded exactly like a real one ----
def synthetic_cache(args, run, models, synthetic, encode):
    """The opponent's PNGs encoded once like real images (keyed by the files and the VAE); returns its folder."""
    with Image.open(synthetic[0]["path"]) as im:
        if im.size != (args.resolution, args.resolution):
            raise UserError(
                f"synthetic images are {im.size[0]}x{im.size[1]} but --resolution is {args.resolution}: generate and "
                "train at the same resolution"
            )
    files = [(r["path"], os.stat(r["path"]).st_size, os.stat(r["path"]).st_mtime_ns) for r in synthetic]
    vae = {"vae": weights_identity(models.base, "vae"), "vae_dtype": str(models.vae_dtype)}
    folder = (
        Path(args.cache_dir) / f"synthetic-{cache_key(files=files, resolution=args.resolution, **vae, **models.pin)}"
    )
    if (folder / "info.json").is_file():
        return folder
    run.log(f"encoding {len(synthetic)} synthetic images like real ones into {folder} ...")

    def make_shard(i):
        records = synthetic[i * SHARD : (i + 1) * SHARD]
        images = [decode_image(r["path"]) for r in records]
        bad = next((r["path"] for r, im in zip(records, images) if im is None), None)
        if bad:
            raise UserError(
                f"synthetic image {bad} does not decode; delete its line from metadata.jsonl (or the whole folder) "
                "and rerun generate.py"
            )
        return {"latents": torch.cat([encode(images[j : j + CHUNK]) for j in range(0, len(images), CHUNK)]).half()}, {}

    return build_cache(folder, len(synthetic), make_shard, run.accelerator, {"synthetic_dir": str(args.synthetic_dir)})


# ---- The finished run's extra outputs: lora_cumulative/, the model card, the upload ----
def write_outputs(args, out, record, log):
    """--lora_cumulative's lora_cumulative/ and --model_card's README.md (--push_to_hub's too), written before
    train_spin.py marks the run finished."""
    if args.lora_cumulative and args.lora_rank:
        write_cumulative_lora(args, out, log)
    if args.model_card or args.push_to_hub:
        write_text_atomic(out / "README.md", model_card(record, args.hub_model_id or out.name))


LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights reads


def stack_adapters(adapters):
    """One adapter equal to the sum of several (diffusers' LoRA names, each scale folded into its B): the A's stacked
    and the B's side by side, so B A = sum_k B_k A_k (rank: the sum of the ranks). A module an adapter lacks gets
    zeros."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for sd in adapters for k in sd})
    out = {}
    for m in modules:
        a_key, b_key = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        d_in, d_out = next((sd[a_key].shape[1], sd[b_key].shape[0]) for sd in adapters if a_key in sd)
        a_parts, b_parts = [], []
        for sd in adapters:
            rank = next(v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight"))
            a_parts.append(sd[a_key].float() if a_key in sd else torch.zeros(rank, d_in))
            b_parts.append(sd[b_key].float() if b_key in sd else torch.zeros(d_out, rank))
        out[a_key], out[b_key] = torch.cat(a_parts, 0).contiguous(), torch.cat(b_parts, 1).contiguous()
    return out


def write_cumulative_lora(args, out, log):
    """output_dir/lora_cumulative/: theta_{k+1} as one adapter on the base pipeline's UNet. Each LoRA iteration's unet/
    is its start with its adapter fused, so theta_{k+1} = theta_0 + the sum of every iteration's B A (stack_adapters).
    Only for a chain that starts at the base UNet: from 'base', or from a LoRA iteration that has lora_cumulative/."""
    from safetensors.torch import load_file, save_file

    start = Path(args.unet) if args.unet not in (None, "", "base") else None
    adapters = []
    if start is not None:
        if not (start / "lora_cumulative" / LORA_FILE).is_file():
            return log(f"note: no lora_cumulative/: --unet {args.unet} is not the base UNet plus LoRA adapters")
        adapters.append(load_file(str(start / "lora_cumulative" / LORA_FILE)))
    adapters.append(load_file(str(out / "lora" / LORA_FILE)))

    def write(tmp):
        tmp.mkdir()
        save_file(stack_adapters(adapters), str(tmp / LORA_FILE))

    replace_folder(out / "lora_cumulative", write)


def iteration_of(unet):
    """Which SPIN iteration a run makes: 1 from a UNet no SPIN run made, else one more than the run it starts from
    (a checkpoint-N/ belongs to the run in the folder above it)."""
    if unet in (None, "", "base"):
        return 1
    folder = Path(unet).parent if Path(unet, "train_state.json").is_file() else Path(unet)
    if not (folder / "run_config.json").is_file():
        return 1
    made = json.loads((folder / "run_config.json").read_text()).get("args", {})
    return iteration_of(made.get("unet")) + 1 if made.get("loss") == "spin" else 1


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_id(name, kind):
    """The hub id behind a --pretrained_model_name_or_path or --dataset: itself where it is one, else what a local copy
    records of it (a hub cache snapshot's folder, models--org--name or datasets--org--name); None where nothing does."""
    path = Path(name).expanduser()
    if not path.exists():
        return name.strip("/") if HUB_ID.fullmatch(name.strip("/")) else None
    found = re.search(rf"{kind}s--([^/]+?)--([^/]+)/snapshots/", path.resolve().as_posix() + "/")
    return f"{found[1]}/{found[2]}" if found else None


# evaluate.py finds the section by this line (the same constant there)
CARD_EVALUATION = "<!-- evaluation: evaluate.py fills this section when it scores this model -->"


def model_card(record, name):
    """README.md of an output folder, in the released SPIN-Diffusion cards' form: hub metadata (hub ids only), what it
    is, the training hyperparameters as those cards list them, how to load it, and evaluate.py's section."""
    from huggingface_hub import ModelCardData

    a, base = record["args"], record["model"]["pretrained_model_name_or_path"]
    base_id, dataset_id, lora = hub_id(base, "model"), hub_id(a["dataset"], "dataset"), a.get("lora_rank")
    tags = ["spin-diffusion", "text-to-image", "diffusers", "stable-diffusion"] + (["lora"] if lora else [])
    folder = "transformer" if record["model"].get("conditioning") == "sd3" else "unet"
    model_class = {"unet": "UNet2DConditionModel", "transformer": "SD3Transformer2DModel"}[folder]
    dtype = "bfloat16" if folder == "transformer" else "float16"  # as Stability and diffusers load SD3.5
    meta = ModelCardData(
        base_model=base_id,
        datasets=[dataset_id] if dataset_id else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
    )
    if a["loss"] == "spin":
        start = a.get("unet") or "base"
        what = f"iteration {iteration_of(a.get('unet'))} of SPIN-Diffusion (self-play fine-tuning, arXiv 2402.10210), "
        what += f"trained against the samples of the UNet it starts from ({start})"
    else:
        what = {"sft": "the SFT baseline (supervised fine-tuning on the real images)"}.get(
            a["loss"], "the Diffusion-DPO baseline (winner vs loser pairs)"
        )
    source = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base}`"
    hyper = {
        "learning_rate": a["learning_rate"],
        "train_batch_size": a["train_batch_size"],
        "num_devices": record.get("num_processes", 1),
        "train_gradient_accumulation_steps": a["gradient_accumulation_steps"],
        "total_train_batch_size": record.get("global_batch"),
        "optimizer": "AdamW8bit" if a.get("use_8bit_adam") else "AdamW",
        "lr_scheduler": a["lr_scheduler"],
        "lr_warmup_steps": a["lr_warmup_steps"],
        "num_training_steps": record.get("global_step", a["max_train_steps"]),
        **({"beta": a["beta"]} if a["loss"] != "sft" else {}),
        "mixed_precision": a.get("mixed_precision") or "no",
        **({"lora_rank": lora, "lora_alpha": a.get("lora_alpha") or lora} if lora else {}),
    }
    pin = "".join(f', {k}="{a[k]}"' for k in ("revision", "variant") if a.get(k))  # the base weights it trained on
    load = [
        "```python",
        "import torch",
        f"from diffusers import DiffusionPipeline, {model_class}",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base_id or base}"{pin}, torch_dtype=torch.{dtype})',
        f'pipe.{folder} = {model_class}.from_pretrained("{name}", subfolder="{folder}", torch_dtype=torch.{dtype})',
    ]
    if lora:
        load += [
            "# or, as an adapter on the base model: this iteration's change (lora/) or every iteration so far",
            f'# pipe.load_lora_weights("{name}", subfolder="lora_cumulative")',
        ]
    body = [
        f"# {name}",
        "",
        f"This {model_class} is {what}, fine-tuned from {source} on `{a['dataset']}` (split `{a['split']}`). Made by "
        "`train_spin.py` (run_config.json holds every setting).",
        "",
        "## Training hyperparameters",
        "",
        *[f"- {k}: {v}" for k, v in hyper.items()],
        "",
        "## Usage",
        "",
        f"Load the base pipeline and swap in this {folder}:",
        "",
        *load,
        "```",
        "",
        "## Evaluation",
        "",
        CARD_EVALUATION,
        "",
        "Not evaluated yet.",
        "",
    ]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body)


def write_text_atomic(path, text):
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def push_to_hub(out, repo_id, token, log):
    """Upload the finished folder's model (unet/ or transformer/, lora/, lora_cumulative/) and its card; nothing
    half-written: this runs after run_config.json says finished."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, exist_ok=True)
        patterns = ["unet/*", "transformer/*", "lora/*", "lora_cumulative/*", "README.md"]
        message = f"train_spin.py: {out.name}"
        api.upload_folder(
            repo_id=getattr(repo, "repo_id", repo_id),
            folder_path=str(out),
            allow_patterns=patterns,
            commit_message=message,
        )
    except Exception as e:  # the trained model is on disk either way
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"--push_to_hub {repo_id}: {first}; the model is in {out}: push it later with huggingface-cli upload "
            f"{repo_id} {out}"
        ) from None
    log(f"pushed {out} to the hub: {repo_id}")


# ---- helpers every script carries: each is the same text wherever it appears (tests/test_shared.py checks) ----
def image_key(prompt_index, image_index):
    """File stem of one image: the same in every folder of images (generate.py, sample.py, validation)."""
    return f"p{prompt_index:07d}_i{image_index:03d}"


# Sampler names (generate.py and sample.py --scheduler, train_spin.py --validation_scheduler) -> diffusers classes
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
    else:  # SD3's also shifted back
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0)
    return vae.decode(latents, return_dict=False)[0]


def to_pixels(images):
    """Decoded images in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] on the CPU, as generate.py writes them."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
