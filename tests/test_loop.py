"""spin_loop.sh's settings, through --dry_run 1 (every stage's command printed, nothing run): per-iteration values,
the sd15 recipe's Appendix A.1 schedule, the baselines, validation and the launch. The demo runs it for real (CI)."""

import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every setting the loop and its recipes read from the environment (VAR=${VAR:-default}): a user's own (an exported
# ITERATIONS=2, say) would change every command these tests expect, so they are left out; the offline variables pass.
SETTINGS = {
    name
    for f in [ROOT / "spin_loop.sh", *ROOT.glob("recipes/*.sh")]
    for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)[:-]", f.read_text())
    if not name.startswith(("HF_", "TRANSFORMERS_"))
}


def clean_env(**env):
    return {**{k: v for k, v in os.environ.items() if k not in SETTINGS}, "HF_HUB_OFFLINE": "1", **env}


def loop(tmp_path, *flags, **env):
    e = clean_env(**env)
    return subprocess.run(
        ["bash", str(ROOT / "spin_loop.sh"), "--dry_run", "1", "--run_dir", str(tmp_path / "run"), *flags],
        capture_output=True,
        text=True,
        env=e,
        cwd=ROOT,
        timeout=120,
    )


def commands(p, script):
    """The printed commands of one script, each as {flag: value} plus its launcher words."""
    assert p.returncode == 0, p.stderr
    out = []
    for line in p.stdout.splitlines():
        if line.startswith("+ ") and f" {script} " in line:
            words = shlex.split(line[2:])
            i = words.index(script)
            flags, rest = {}, words[i + 1 :]
            for j, w in enumerate(rest):
                if w.startswith("--"):
                    value = rest[j + 1] if j + 1 < len(rest) and not rest[j + 1].startswith("--") else True
                    flags.setdefault(w[2:], []).append(value)
            out.append({"launch": words[:i], **{k: v[0] if len(v) == 1 else v for k, v in flags.items()}})
    return out


def test_sd15_recipe_is_appendix_a1_per_iteration(tmp_path):
    p = loop(tmp_path, "--recipe", "sd15")
    train = commands(p, "train_spin.py")
    assert [c["learning_rate"] for c in train] == ["2e-5", "2e-5", "5e-8"]
    assert [c["beta"] for c in train] == ["2000", "5000", "5000"]
    assert [c["max_train_steps"] for c in train] == ["50", "500", "200"]
    assert [c["seed"] for c in train] == ["0", "1", "2"]  # each iteration its own data order
    assert all(c["lr_warmup_steps"] == "200" and c["lr_scheduler"] == "linear" for c in train)
    assert all(int(c["train_batch_size"]) * int(c["gradient_accumulation_steps"]) == 2048 for c in train)
    # plain AdamW and no gradient checkpointing by default (80 GB cards); each is one setting
    assert not any("use_8bit_adam" in c or "gradient_checkpointing" in c for c in train)
    train = commands(
        loop(tmp_path, "--recipe", "sd15", "--gradient_checkpointing", "1", "--adam8bit", "1"), "train_spin.py"
    )
    assert all("use_8bit_adam" in c and "gradient_checkpointing" in c for c in train)
    # the model card's single recipe is one setting away
    card = commands(loop(tmp_path, "--recipe", "sd15", "--schedule", "card"), "train_spin.py")
    assert [(c["learning_rate"], c["beta"], c["max_train_steps"]) for c in card] == [("2e-5", "5000", "500")] * 3


def test_per_iteration_values_and_their_count(tmp_path):
    train = [
        c
        for c in commands(loop(tmp_path, ITERATIONS="2", BETA="100,200", STEPS="7", TRAIN_SEED="5"), "train_spin.py")
        if "synthetic_dir" in c
    ]  # the SPIN iterations (the demo also trains its baselines)
    assert [(c["beta"], c["max_train_steps"], c["seed"]) for c in train] == [("100", "7", "5"), ("200", "7", "5")]
    for bad in ("1,2", "1,,3", "1,2,3,4"):
        p = loop(tmp_path, "--beta", bad)
        assert p.returncode == 2 and p.stdout == "", p.stdout
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: --beta"), p.stderr
    p = loop(tmp_path, "--recipe", "sd15", "--iterations", "2")  # A.1 has three: the error says how to proceed
    assert p.returncode == 2 and "SCHEDULE=card" in p.stderr, p.stderr


def test_baselines_validation_and_launch(tmp_path):
    launch = "accelerate launch --num_processes 8"
    p = loop(tmp_path, "--recipe", "sd15", "--baselines", "sft,dpo", "--launch", launch, "--grad_accum", "32")
    train = commands(p, "train_spin.py")
    sft = next(c for c in train if c.get("loss") == "sft")
    dpo = next(c for c in train if c.get("loss") == "dpo")
    assert (sft["learning_rate"], sft["lr_scheduler"], sft["lr_warmup_steps"], sft["unet"]) == (
        "1e-5",
        "constant_with_warmup",
        "500",
        "base",
    )
    assert int(sft["train_batch_size"]) * int(sft["gradient_accumulation_steps"]) * 8 == 512
    assert "checkpoints_total_limit" not in sft and sft["checkpointing_steps"] == "500"  # every candidate kept
    assert (dpo["learning_rate"], dpo["beta"], dpo["max_train_steps"], dpo["unet"]) == ("2e-5", "2000", "350", "base")
    val, test = commands(p, "sample.py")
    assert val["split"] == "validation_unique" and val["seed"] != test["seed"]
    assert "sft-2000=" + str(tmp_path / "run" / "sft" / "checkpoint-2000") in val["unet"]
    assert [u.split("=")[0] for u in test["unet"]] == ["base", "sft", "dpo", "iter_1", "iter_2", "iter_3"]
    # sample.py joins the loop's launch (it shards prompts over processes); evaluate.py runs in one process
    assert val["launch"] == test["launch"] == shlex.split(launch)
    assert all(c["launch"] == ["python"] for c in commands(p, "evaluate.py"))
    assert loop(tmp_path, "--baselines", "ppo").returncode == 2


def test_per_row_generation_is_one_setting(tmp_path):
    gen = commands(loop(tmp_path, "--gen_per_row", "1"), "generate.py")
    assert all(c.get("per_row") is True for c in gen)
    assert not any("per_row" in c for c in commands(loop(tmp_path), "generate.py"))


def test_recipes_use_dataloader_workers_and_lora_sft_checkpoints_are_candidates(tmp_path):
    train = commands(loop(tmp_path, "--recipe", "sd15"), "train_spin.py")
    assert all(c["dataloader_num_workers"] == "4" for c in train)
    # a LoRA run's checkpoint-N loads as its UNet (the adapter fused): SDXL's SFT checkpoints are validation candidates
    p = loop(tmp_path, "--recipe", "sdxl", "--baselines", "sft")
    val = [c for c in commands(p, "sample.py") if "val_samples" in c["output_dir"]][0]
    assert [u for u in val["unet"] if u.startswith("sft-")] == [
        f"sft-{n}={tmp_path / 'run' / 'sft' / f'checkpoint-{n}'}" for n in (500, 1000, 1500)
    ] + [f"sft-2000={tmp_path / 'run' / 'sft'}"]


def test_sd35_recipe_is_flow_grpos_dpo_setting_sampled_as_sd35_samples(tmp_path):
    """SD3.5-Medium: flow_grpo's SD3.5-M Diffusion-DPO LoRA (rank 32, alpha 64, lr 3e-4, beta 100), sampled with the
    model's guidance 4.5 and 40 steps by its own sampler; every iteration also as one adapter on the base."""
    p = loop(tmp_path, "--recipe", "sd35")
    train = commands(p, "train_spin.py")
    assert {(c["lora_rank"], c["lora_alpha"], c["learning_rate"], c["beta"]) for c in train} == {
        ("32", "64", "3e-4", "100")
    }
    assert all(c["resolution"] == "1024" and "use_8bit_adam" in c and "gradient_checkpointing" in c for c in train)
    assert all("lora_cumulative" in c for c in train)
    sampling = commands(p, "generate.py") + commands(p, "sample.py")
    assert all(c["guidance_scale"] == "4.5" and c["num_inference_steps"] == "40" for c in sampling)
    assert not any("scheduler" in c for c in sampling)


def test_recipes_are_files_a_user_copies_and_edits(tmp_path):
    """--recipe NAME reads recipes/NAME.sh; --recipe FILE reads a copy of one, relative to where the loop was called;
    --schedule FILE the same for the per-iteration schedule; an unknown one is one line."""
    for name in ("demo", "sd15", "sd21", "sdxl", "sd35"):
        assert (ROOT / "recipes" / f"{name}.sh").is_file()
    mine = tmp_path / "my_sdxl.sh"
    mine.write_text(
        (ROOT / "recipes" / "sdxl.sh").read_text().replace("LORA_RANK=${LORA_RANK:-8}", "LORA_RANK=${LORA_RANK:-4}")
    )
    p = subprocess.run(
        [
            "bash",
            str(ROOT / "spin_loop.sh"),
            "--dry_run",
            "1",
            "--run_dir",
            str(tmp_path / "run"),
            "--recipe",
            "my_sdxl.sh",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=clean_env(),
    )
    train = commands(p, "train_spin.py")
    assert [c["lora_rank"] for c in train] == ["4"] * 3 and train[0]["resolution"] == "1024"
    schedule = tmp_path / "slow.sh"
    schedule.write_text("LR=${LR:-1e-6}; BETA=${BETA:-9000}; STEPS=${STEPS:-10,20,30}\n")
    train = commands(loop(tmp_path, "--recipe", "sd15", "--schedule", str(schedule)), "train_spin.py")
    assert [(c["learning_rate"], c["beta"], c["max_train_steps"]) for c in train] == [
        ("1e-6", "9000", s) for s in ("10", "20", "30")
    ]
    for flags, what in ((("--recipe", "nope"), "--recipe"), (("--recipe", "sd15", "--schedule", "nope"), "--schedule")):
        p = loop(tmp_path, *flags)
        assert p.returncode == 2 and p.stderr.startswith(f"error: {what} must be") and len(p.stderr.splitlines()) == 1


def test_validation_selects_the_best_of_each_family(tmp_path):
    """loop_report.py select: the best model per family (iter_k: spin, sft-N: sft, dpo) and overall by the mean over
    prompts, written to selection.json; the chosen SFT's path is printed for the test samples."""
    import json

    (tmp_path / "val_eval").mkdir()
    scores = {"base": 1.0, "iter_1": 2.0, "iter_2": 1.5, "sft-100": 2.5, "sft-200": 0.5, "dpo": 0.1}
    summary = {
        "metrics": ["pickscore"],
        "summary": {n: {"pickscore": {"mean": {"mean": s}}} for n, s in scores.items()},
    }
    (tmp_path / "val_eval" / "summary.json").write_text(json.dumps(summary))
    unets = [w for n in scores for w in ("--unet", f"{n}=/models/{n}")]
    p = subprocess.run(
        ["python", str(ROOT / "loop_report.py"), "select", str(tmp_path), "pickscore", *unets],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "/models/sft-100"
    best = json.loads((tmp_path / "val_eval" / "selection.json").read_text())["best"]
    assert best == {"spin": "iter_1", "sft": "sft-100", "dpo": "dpo", "overall": "sft-100"}
    p = subprocess.run(
        ["python", str(ROOT / "loop_report.py"), "select", str(tmp_path), "hps", *unets],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and p.stderr.startswith("error: --val_metric hps was not scored")


def test_every_training_stage_is_watched(tmp_path):
    """Each training stage samples the recipe's watch prompts (train_spin.py --validation_prompts_file) with the
    recipe's sampling settings; a file of one's own is found from where the loop was called; empty: none."""
    for recipe, every, steps, sampler in (("demo", "50", "10", "ddim"), ("sd15", "50", "50", None),
                                          ("sdxl", "250", "50", None), ("sd35", "250", "40", None)):  # fmt: skip
        train = commands(loop(tmp_path, "--recipe", recipe, "--baselines", "sft,dpo"), "train_spin.py")
        assert len(train) == 5, recipe  # 3 iterations and 2 baselines
        for c in train:
            assert (ROOT / c["validation_prompts_file"]).is_file() and c["validation_steps"] == every, recipe
            assert c["validation_num_inference_steps"] == steps and c.get("validation_scheduler") == sampler, recipe
    (tmp_path / "mine.txt").write_text("a purple hexagon\n")
    p = subprocess.run(
        ["bash", str(ROOT / "spin_loop.sh"), "--dry_run", "1", "--run_dir", str(tmp_path / "run"),
         "--watch_prompts_file", "mine.txt", "--watch_steps", "7"],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    train = commands(p, "train_spin.py")
    assert all(
        c["validation_prompts_file"] == str(tmp_path / "mine.txt") and c["validation_steps"] == "7" for c in train
    )
    off = commands(loop(tmp_path, "--watch_prompts_file", ""), "train_spin.py")
    assert not any("validation_prompts_file" in c for c in off)


def test_revision_and_variant_reach_every_stage_that_loads_the_base(tmp_path):
    p = loop(tmp_path, "--recipe", "sd15", "--baselines", "sft,dpo", "--revision", "v2", "--variant", "fp16")
    stages = [c for script in ("generate.py", "train_spin.py", "sample.py") for c in commands(p, script)]
    assert len(stages) == 3 + 5 + 2  # 3 generations, 3 iterations and 2 baselines, validation and test sampling
    assert all(c["revision"] == "v2" and c["variant"] == "fp16" for c in stages)
    assert not any(
        "revision" in c or "variant" in c for c in commands(loop(tmp_path, "--recipe", "sd15"), "train_spin.py")
    )
