"""train_spin.py on SD3-family pipelines (flow matching): the loss against an independent computation and flow_grpo's
Diffusion-DPO loss, and the real script through its command line on a tiny StableDiffusion3Pipeline."""

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import ROOT, error_line, make_synthetic_dir, metrics, train, train_args, wide_pickapic

import tiny
import train_spin as ts

SHAPE = (16, 8, 8)  # the tiny SD3 VAE's latents at 32x32
DENSITY = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def tiny_transformer(seed):
    return tiny.tiny_sd3_transformer(seed).eval()


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    real, other = torch.randn(b, *SHAPE, generator=g), torch.randn(b, *SHAPE, generator=g)
    text, pooled = torch.randn(b, 20, 64, generator=g), torch.randn(b, 64, generator=g)
    return real, other, text, pooled


def test_flow_errors_match_an_independent_computation():
    """x_t = (1 - sigma) x_0 + sigma eps at sigma = the shifted schedule's (computed here from its formula), the model
    called at timestep sigma * 1000, the error against the velocity eps - x_0."""
    model, scheduler = tiny_transformer(0), flow_scheduler()
    real, _, text, pooled = inputs()
    t = torch.tensor([0, 400, 999])
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5))
    s = torch.linspace(1.0, 1 / 1000, 1000)  # the unshifted sigmas, then SD3's shift 3
    sigma = (3.0 * s / (1 + 2.0 * s))[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = model(
            hidden_states=(1 - sigma) * real + sigma * noise,
            timestep=sigma.flatten() * 1000,
            encoder_hidden_states=text,
            pooled_projections=pooled,
        ).sample
        expected = ((pred - (noise - real)) ** 2).mean(dim=(1, 2, 3))
        cond = ts.Conditioning(text, {"pooled_projections": pooled})
        ours = ts.denoising_errors(model, scheduler, real, noise, t, cond)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def flow_grpo_dpo_loss(transformer, ref, scheduler, winner, loser, noise, indices, embeds, pooled, beta):
    """yifan123/flow_grpo scripts/train_sd3_dpo.py's Diffusion-DPO step on the same inputs, its computation retyped:
    [winner; loser] share the noise and the timesteps, sigmas looked up by timestep in the scheduler's table, the
    per-image mean squared velocity error, -logsigmoid(-0.5 beta ((w - ref_w) - (l - ref_l)))."""
    model_input, bsz = torch.cat([winner, loser]), winner.shape[0]
    noise = torch.cat([noise, noise])
    timesteps = scheduler.timesteps[indices]
    timesteps = torch.cat([timesteps, timesteps])
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    embeds, pooled = torch.cat([embeds, embeds]), torch.cat([pooled, pooled])
    kw = dict(timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)
    model_pred = transformer(hidden_states=noisy, **kw)[0]
    with torch.no_grad():
        model_pred_ref = ref(hidden_states=noisy, **kw)[0]
    target = noise - model_input
    theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    ref_mse = ((model_pred_ref.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    w_diff = theta_mse[:bsz] - ref_mse[:bsz]
    l_diff = theta_mse[bsz:] - ref_mse[bsz:]
    return torch.mean(-F.logsigmoid(-0.5 * beta * (w_diff - l_diff)))


def test_dpo_loss_equals_flow_grpo_on_the_same_inputs():
    """Our pair_loss (SPIN and Diffusion-DPO: real/winner vs synthetic/loser) on a flow model equals flow_grpo's SD3
    DPO loss, value and gradient, with the draws our seeded step makes (logit-normal indices, shared noise)."""
    policy, scheduler = tiny_transformer(0), flow_scheduler()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    real, other, text, pooled = inputs()
    draws = ts.draw_step(0, 7, 3, 0, 3, SHAPE, 1000, "shared", 0.0, DENSITY)
    assert not torch.equal(draws.t, draws.t[:1].expand(3))  # distinct sigmas across the batch
    cond = ts.Conditioning(torch.cat([text, text]), {"pooled_projections": torch.cat([pooled, pooled])})
    ours, stats = ts.pair_loss(
        policy,
        reference,
        scheduler,
        real,
        other,
        draws,
        cond,
        beta=100.0,
        autocast=contextlib.nullcontext,
    )
    (g_ours,) = torch.autograd.grad(ours, [policy.pos_embed.proj.weight])
    theirs = flow_grpo_dpo_loss(policy, reference, scheduler, real, other, draws.noise, draws.t, text, pooled, 100.0)
    (g_theirs,) = torch.autograd.grad(theirs, [policy.pos_embed.proj.weight])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-8)
    assert ours.item() != pytest.approx(math.log(2))  # the policy differs from its reference: a real margin


def test_sigma_draws_are_diffusers_and_a_pure_function_of_the_step():
    """The timestep indices are diffusers' compute_density_for_timestep_sampling times T on our step's generator, so a
    pair's sigma depends on its place in the global batch: 2 processes draw what 1 draws."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    for scheme in ("logit_normal", "mode", "none"):
        density = {**DENSITY, "weighting_scheme": scheme}
        g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        u = compute_density_for_timestep_sampling(batch_size=64, generator=g2, **density)
        assert torch.equal(ts.draw_timesteps(g1, 64, 1000, density), (u * 1000).long())
    whole = ts.draw_step(0, 3, 4, 0, 4, SHAPE, 1000, "independent", 0.5, DENSITY)
    halves = [ts.draw_step(0, 3, 4, r * 2, r * 2 + 2, SHAPE, 1000, "independent", 0.5, DENSITY) for r in range(2)]
    for i in range(5):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    # logit-normal(0, 1) puts the indices' median at the middle of the table, as sigmoid(0) = 0.5
    g = torch.Generator().manual_seed(0)
    assert abs(ts.draw_timesteps(g, 20000, 1000, DENSITY).float().median().item() - 500) < 15


def test_real_images_are_encoded_into_the_latent_space_the_pipeline_decodes(sd3_pipeline):
    """SD3's VAE shifts as well as scales: encode_images gives (mean - shift_factor) * scaling_factor, which the
    pipeline's decoding (latent / scaling_factor + shift_factor, generate.py's decode_latents) maps back."""
    from diffusers import AutoencoderKL

    import generate

    vae = AutoencoderKL.from_pretrained(sd3_pipeline, subfolder="vae")
    assert vae.config.shift_factor and vae.config.scaling_factor != 1
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        latents = ts.encode_images(vae, x)
        torch.testing.assert_close(latents, (mean - vae.config.shift_factor) * vae.config.scaling_factor)
        torch.testing.assert_close(generate.decode_latents(vae, latents, False), vae.decode(mean).sample)


def test_sft_learns_the_velocity_not_the_noise():
    """SFT's target on a flow model is eps - x_0: a model that predicts exactly that has zero loss; one that predicts
    the noise (an epsilon model's target) does not."""
    scheduler, (real, _, text, pooled) = flow_scheduler(), inputs()
    draws = ts.draw_step(0, 0, 3, 0, 3, SHAPE, 1000, "shared", 0.0, DENSITY)
    cond = ts.Conditioning(text, {"pooled_projections": pooled})
    velocity = lambda noisy, **kw: (draws.noise - real,)  # noqa: E731
    noise = lambda noisy, **kw: (draws.noise,)  # noqa: E731
    assert ts.sft_loss(velocity, scheduler, real, draws, cond)[0].item() == 0.0
    assert ts.sft_loss(noise, scheduler, real, draws, cond)[0].item() > 0.1


def test_sd3_spin_sft_dpo_and_lora_through_the_command_line(sd3_pipeline, tmp_path):
    """SPIN, DPO (fp32 and bf16 autocast: first loss ln 2), SFT and LoRA on the tiny SD3 pipeline: transformer/ loads
    with SD3Transformer2DModel, lora/ with the pipeline's load_lora_weights and means what transformer/ holds; a run
    resumes bit-identically; the default beta is the flow-model one."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    data = wide_pickapic(tmp_path / "wide.parquet")
    synth = make_synthetic_dir(tmp_path / "synth", sd3_pipeline, shape=SHAPE)
    seq = ["--max_sequence_length", "16"]
    for name, extra in (
        ("spin", ["--synthetic_dir", synth, "--caption_dropout", "0.5"]),
        ("spin_bf16", ["--synthetic_dir", synth, "--mixed_precision", "bf16"]),
        ("dpo_bf16", ["--loss", "dpo", "--mixed_precision", "bf16"]),
        ("sft", ["--loss", "sft"]),
        ("lora", ["--synthetic_dir", synth, "--lora_rank", "4", "--learning_rate", "1e-2"]),
    ):
        train(*train_args(sd3_pipeline, data, tmp_path / name, tmp_path / "cache", *seq, *extra, steps=3))
        rows = metrics(tmp_path / name)
        assert all(math.isfinite(r["loss"]) for r in rows), name
        if name != "sft":
            assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7), name
        assert (tmp_path / name / "transformer" / "diffusion_pytorch_model.safetensors").is_file(), name
        assert not (tmp_path / name / "unet").exists()
    # caption dropout trains on the empty prompt's embedding: the pipeline's own unconditional branch (guidance)
    text_dir = json.loads((tmp_path / "spin" / "run_config.json").read_text())["cache"]["text"]  # the fp32 run's
    cached = load_file(str(Path(text_dir) / "shard-00000.safetensors"))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
    with torch.no_grad():
        _, uncond, _, uncond_pooled = pipe.encode_prompt(["a red circle"], None, None, max_sequence_length=16)
    torch.testing.assert_close(cached["text"][0].float(), uncond[0].half().float())
    torch.testing.assert_close(cached["pooled"][0].float(), uncond_pooled[0].half().float())
    record = json.loads((tmp_path / "spin" / "run_config.json").read_text())
    assert record["args"]["beta"] == ts.BETA["sd3"] == 100.0 and record["model"]["conditioning"] == "sd3"

    # LoRA: the adapter through the pipeline's own loader computes what the merged transformer/ computes
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "lora" / "transformer")
    base = copy.deepcopy(pipe.transformer)
    pipe.load_lora_weights(tmp_path / "lora" / "lora")
    x, text, pooled = torch.randn(1, *SHAPE), torch.randn(1, 20, 64), torch.randn(1, 64)
    kw = dict(encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([500.0]))
    with torch.no_grad():
        a, b, c = (m(x, **kw).sample for m in (pipe.transformer, merged, base))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapter trained

    # exact resume: interrupted after the checkpoint at step 2, resumed, the same weights bit for bit
    common = [*seq, "--synthetic_dir", synth, "--checkpointing_steps", "2", "--lr_warmup_steps", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*train_args(sd3_pipeline, data, straight, tmp_path / "cache", *common, steps=4))
    train(*train_args(sd3_pipeline, data, resumed, tmp_path / "cache", *common, steps=4))
    import shutil

    shutil.rmtree(resumed / "transformer")
    p = train(
        *train_args(
            sd3_pipeline, data, resumed, tmp_path / "cache", *common, "--resume_from_checkpoint", "latest", steps=4
        )
    )
    assert "resumed from" in p.stdout
    w1, w2 = (load_file(str(d / "transformer" / "diffusion_pytorch_model.safetensors")) for d in (straight, resumed))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # the checkpoint loads as the transformer of its step
    assert type(ts.load_unet(str(resumed / "checkpoint-2"), str(sd3_pipeline))).__name__ == "SD3Transformer2DModel"


def test_flux_and_mismatched_models_are_refused_in_one_line(sd3_pipeline, tiny_pipeline, tmp_path):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "x"]})
    )
    data = wide_pickapic(tmp_path / "wide.parquet")
    p = train(*train_args(flux, data, tmp_path / "o1", tmp_path / "cache", "--loss", "sft"), check=False)
    assert "FluxPipeline, which is not supported; supported: SD-1.x/2.x" in error_line(p) and "SD3/SD3.5" in p.stderr
    p = train(
        *train_args(sd3_pipeline, data, tmp_path / "o2", tmp_path / "cache", "--loss", "sft", "--unet", tiny_pipeline),
        check=False,
    )
    assert "UNet2DConditionModel" in error_line(p) and "does not fit the base's sd3" in error_line(p)
    args = train_args(sd3_pipeline, data, tmp_path / "o3", tmp_path / "cache", "--loss", "sft")
    args[args.index("--resolution") + 1] = "36"  # latents of 9x9 do not cut into the transformer's 2x2 patches
    assert "--resolution must be a multiple of 8" in error_line(train(*args, check=False))
    p = train(
        *train_args(tiny_pipeline, data, tmp_path / "o4", tmp_path / "cache", "--loss", "sft", "--no_t5"), check=False
    )
    assert error_line(p) == f"error: --no_t5: {tiny_pipeline} is not SD3; it has no T5 encoder"
    watch = ["--validation_prompts", "a red circle", "--validation_scheduler", "ddim"]
    p = train(
        *train_args(sd3_pipeline, data, tmp_path / "o5", tmp_path / "cache", "--loss", "sft", *watch), check=False
    )
    assert "--validation_scheduler: SD3 samples with its own flow-matching sampler" in error_line(p)
    p = train(
        *train_args(sd3_pipeline, data, tmp_path / "o6", tmp_path / "c", "--max_sequence_length", "0"), check=False
    )
    assert "--max_sequence_length must be 1 to 512" in error_line(p)
    from test_train import run

    p = run("generate.py", "--pretrained_model_name_or_path", tiny_pipeline, "--dataset", data, "--output_dir",
            tmp_path / "g", "--no_t5", check=False)  # fmt: skip
    assert "--no_t5: " in error_line(p) and "has no T5 encoder" in error_line(p)


def test_torchrun_two_processes_train_what_one_process_trains_sd3(sd3_pipeline, tmp_path):
    """torchrun on CPU (gloo): 2 processes x batch 1 train what 1 process x batch 2 trains on SD3 (the sigma and noise
    of a pair follow its place in the global batch), with the same text cache (three encoders, T5 included)."""
    from safetensors.torch import load_file

    data = wide_pickapic(tmp_path / "wide.parquet")
    synth = make_synthetic_dir(tmp_path / "synth", sd3_pipeline, shape=SHAPE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

    def launch(nproc, out, batch):
        cmd = [sys.executable] + (
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if nproc > 1 else []
        )
        args = train_args(
            sd3_pipeline,
            data,
            out,
            tmp_path / f"cache{nproc}",
            "--synthetic_dir",
            synth,
            "--max_sequence_length",
            "16",
            steps=3,
        )
        args[args.index("--train_batch_size") + 1] = str(batch)
        p = subprocess.run(
            [*cmd, str(ROOT / args[0]), *map(str, args[1:])], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))

    w1, w2 = launch(1, tmp_path / "one", 2), launch(2, tmp_path / "two", 1)
    w0 = load_file(str(sd3_pipeline / "transformer" / "diffusion_pytorch_model.safetensors"))
    moved = sum(((w1[k] - w0[k]) ** 2).sum() for k in w0).sqrt()
    apart = sum(((w1[k] - w2[k]) ** 2).sum() for k in w0).sqrt()
    assert moved > 0 and apart < 0.01 * moved, (apart / moved).item()
    assert [r["loss"] for r in metrics(tmp_path / "one")][0] == pytest.approx(math.log(2), abs=1e-6)
    (t1,), (t2,) = (list((tmp_path / f"cache{n}").glob("text-*")) for n in (1, 2))
    x, y = load_file(str(t1 / "shard-00000.safetensors")), load_file(str(t2 / "shard-00000.safetensors"))
    assert x.keys() == y.keys() == {"text", "pooled"} and all(torch.equal(x[k], y[k]) for k in x)


def test_sd3_loop_generate_train_two_lora_iterations(sd3_pipeline, tmp_path):
    """The loop on SD3 through the command lines: generate.py's folder feeds train_spin.py (the opponent check passes,
    first loss ln 2); step 0's validation pictures are generate.py's pictures of the same prompts and seeds; two LoRA
    iterations, and iter_2/lora_cumulative/ on the base pipeline (its own load_lora_weights) computes what
    iter_2/transformer/ computes; the model card loads the transformer."""
    import numpy as np
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from PIL import Image
    from test_train import CAPTIONS, run

    data = wide_pickapic(tmp_path / "wide.parquet")
    sampling = ["--num_inference_steps", "2", "--guidance_scale", "4.5", "--max_sequence_length", "16", "--seed", "5"]
    watch = ["--validation_prompts", *CAPTIONS[:2], "--validation_seed", "5", "--num_validation_images", "2"]
    watch += ["--validation_num_inference_steps", "2", "--validation_guidance_scale", "4.5", "--validation_steps", "9"]
    common = ["--max_sequence_length", "16", "--lora_rank", "4", "--lora_cumulative", "--learning_rate", "1e-2"]
    start = "base"
    for k in (1, 2):
        synth, out = tmp_path / f"synth_{k - 1}", tmp_path / f"iter_{k}"
        run(
            "generate.py",
            "--pretrained_model_name_or_path",
            sd3_pipeline,
            "--unet",
            start,
            "--dataset",
            data,
            "--output_dir",
            synth,
            "--num_images_per_prompt",
            "2",
            "--resolution",
            "32",
            *sampling,
        )
        extra = [*common, "--unet", start, "--synthetic_dir", synth] + (watch + ["--model_card"] if k == 1 else [])
        train(*train_args(sd3_pipeline, data, out, tmp_path / "cache", *extra, steps=2))
        assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
        start = str(out)
    synth = tmp_path / "synth_1"  # made at --max_sequence_length 16: training at the default 256 is refused
    p = train(
        *train_args(sd3_pipeline, data, tmp_path / "o", tmp_path / "cache", "--synthetic_dir", synth), check=False
    )
    assert (
        error_line(p)
        == "error: --synthetic_dir was generated with --max_sequence_length 16, --no_t5 False: train the same"
    )
    prompts = [
        json.loads(line)["prompt"] for line in (tmp_path / "synth_0" / "metadata.jsonl").read_text().splitlines()
    ]
    assert prompts[0::2] == CAPTIONS  # prompt p's images are p0000..._i000 and _i001, the captions in order
    for p in range(2):
        for i in range(2):
            ours = np.asarray(
                Image.open(tmp_path / "iter_1" / "validation" / "step-0" / "images" / f"p{p:07d}_i{i:03d}.png"),
                dtype=int,
            )
            gen = np.asarray(Image.open(tmp_path / "synth_0" / "images" / f"p{p:07d}_i{i:03d}.png"), dtype=int)
            assert np.abs(ours - gen).max() <= 1, (p, i)
    card = (tmp_path / "iter_1" / "README.md").read_text()
    assert 'SD3Transformer2DModel.from_pretrained("iter_1", subfolder="transformer"' in card

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
    pipe.load_lora_weights(tmp_path / "iter_2" / "lora_cumulative")
    theta_2 = SD3Transformer2DModel.from_pretrained(tmp_path / "iter_2" / "transformer")
    theta_1 = SD3Transformer2DModel.from_pretrained(tmp_path / "iter_1" / "transformer")
    x, text, pooled = torch.randn(2, *SHAPE), torch.randn(2, 20, 64), torch.randn(2, 64)
    kw = dict(encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([100.0, 700.0]))
    with torch.no_grad():
        a, b, c = (m(x, **kw).sample for m in (pipe.transformer, theta_2, theta_1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (b - c).abs().max() > 1e-3  # theta_2, not theta_1


def test_sd3_without_t5_as_the_pipeline_allows(sd3_pipeline, tmp_path):
    """--no_t5 (generate.py and train_spin.py): the pipeline loaded without its T5 encoder, whose part of every prompt
    embedding is then zeros; the cached embeddings are the pipeline's own encode_prompt without T5; a folder generated
    with T5 does not train a run without it (nor the reverse); the first loss is ln 2."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file
    from test_train import run

    data = wide_pickapic(tmp_path / "wide.parquet")
    synth, out = tmp_path / "synth", tmp_path / "out"
    flags = ["--max_sequence_length", "16", "--no_t5"]
    run("generate.py", "--pretrained_model_name_or_path", sd3_pipeline, "--dataset", data, "--output_dir", synth,
        "--num_inference_steps", "2", "--resolution", "32", *flags)  # fmt: skip
    assert json.loads((synth / "run_config.json").read_text())["settings"]["no_t5"] is True
    train(*train_args(sd3_pipeline, data, out, tmp_path / "cache", "--synthetic_dir", synth, *flags, steps=2))
    assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    (text_dir,) = (tmp_path / "cache").glob("text-*")
    cached = load_file(str(text_dir / "shard-00000.safetensors"))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(
            [""], None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
    assert not cached["text"][0, 77:].any()  # T5's 16 tokens: zeros
    torch.testing.assert_close(cached["text"][0].float(), text[0].half().float())
    torch.testing.assert_close(cached["pooled"][0].float(), pooled[0].half().float())
    p = train(*train_args(sd3_pipeline, data, tmp_path / "o", tmp_path / "cache", "--synthetic_dir", synth,
                          "--max_sequence_length", "16"), check=False)  # fmt: skip
    assert (
        error_line(p)
        == "error: --synthetic_dir was generated with --max_sequence_length 16, --no_t5 True: train the same"
    )
