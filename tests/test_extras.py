"""spin_extras.py, what a long train_spin.py run adds, through train_spin.py's command line: a scheduler's stop
signal (--checkpoint_on_signal), the model card and the upload (--model_card, --push_to_hub), theta_k as one adapter on
the base (--lora_cumulative); and train_spin.py copied alone: it trains, and an extras flag is one line naming the
file. The validation images are tests/test_watch.py's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import ROOT, error_line, metrics, train, train_args

import spin_extras as extras
import train_spin as ts

SIGNAL = "--checkpoint_on_signal"


def test_stop_signals_only_note_and_give_the_handlers_back():
    """The handler only notes the signal (twice is once: SLURM and torchrun may both deliver it); the previous
    handlers are back after the context, also after an error; off the main thread nothing is installed."""
    import signal
    import threading

    before = {s: signal.getsignal(s) for s in extras.STOP_SIGNALS}
    with extras.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.flags() == [0.0, 1.0] and stop.agreed is None
        stop.agree([0.0, 2.0])  # summed over the processes: two got SIGUSR1
        assert stop.agreed == signal.SIGUSR1
        stop.agree([1.0, 0.0])
        assert stop.agreed == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in extras.STOP_SIGNALS} == before
    with pytest.raises(RuntimeError), extras.StopSignals():
        raise RuntimeError
    assert {s: signal.getsignal(s) for s in extras.STOP_SIGNALS} == before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(extras.StopSignals().__enter__().previous))
    thread.start()
    thread.join()
    assert seen == [{}]


def test_a_stop_signal_saves_its_step_and_exits_but_in_the_last_step_the_run_finishes(
    tiny_pipeline, pickapic_parquet, synth, cache, tmp_path, monkeypatch
):
    """A signal in step 2 of 3: checkpoint-2, one line, exit status 128 + 15; resumed, a signal in the last step
    changes nothing: unet/ is written and the run finished (this process, the real signal, the handler only
    around the training loop)."""
    import signal

    step = ts.train_step

    plan = {}  # the step in which this process signals itself, and the signal

    def signalled_step(batch, args, run, models, data, trainer, sums):
        if trainer.global_step + 1 == plan["step"]:
            os.kill(os.getpid(), plan["signal"])
        return step(batch, args, run, models, data, trainer, sums)

    monkeypatch.setattr(ts, "train_step", signalled_step)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    args = train_args(tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, SIGNAL, steps=3)
    plan.update(step=2, signal=signal.SIGTERM)
    p = train(*args, check=False)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at step 2 of 3: saved {out}/checkpoint-2; "
        "run the same command with --resume_from_checkpoint latest to continue"
    )
    assert ts.list_checkpoints(out) == [out / "checkpoint-2"] and not (out / "unet").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2] and signal.getsignal(signal.SIGTERM) == before
    plan.update(step=3, signal=signal.SIGUSR1)
    p = train(*args, "--resume_from_checkpoint", "latest")
    assert "resumed from" in p.stdout and "stopped" not in p.stderr
    assert (out / "unet" / "config.json").is_file() and json.loads((out / "run_config.json").read_text())["finished"]
    assert ts.list_checkpoints(out) == [out / "checkpoint-2"] and [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_dataloader_workers_leave_stop_signals_to_training():
    """A scheduler's SIGTERM / SIGUSR1 (sent by another process) leaves DataLoader workers running, so the training
    process can save its stop checkpoint; the training process's own SIGTERM (multiprocessing's terminate, at exit)
    still ends one."""
    import multiprocessing

    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return os.getpid()

    loader = torch.utils.data.DataLoader(
        Pids(), batch_size=None, num_workers=1, worker_init_fn=extras.leave_stop_signals_to_training
    )
    batches = iter(loader)
    worker = next(batches)
    for sig in ("TERM", "USR1"):
        subprocess.run(["kill", f"-{sig}", str(worker)], check=True)
    assert [next(batches) for _ in range(50)] == [worker] * 50  # the same worker, still serving
    del batches

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=idle_worker, args=(ready,))
    p.start()
    assert ready.wait(30)
    p.terminate()
    p.join(10)
    assert p.exitcode == 0


def idle_worker(ready):
    import time

    extras.leave_stop_signals_to_training(0)
    ready.set()
    time.sleep(60)


def start_signalled(cmd, env, out, name, sig, *, after_step=0, group):
    """Run a training command in a session of its own, as a scheduler's job; once metrics.jsonl shows a step after
    `after_step`, send `sig` to the first process only (torchrun's agent) or to every process of the session
    (group=True, as SLURM signals a job); returncode, stdout and stderr once it has exited."""
    import signal
    import time

    logs = out.parent / f"{name}.stdout", out.parent / f"{name}.stderr"
    with open(logs[0], "w") as o, open(logs[1], "w") as e:  # files, not pipes: a full pipe would stall the run
        p = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=ROOT, start_new_session=True)
        try:
            rows = out / "metrics.jsonl"
            while not (rows.is_file() and rows.read_text().count("\n") > after_step):
                assert p.poll() is None, logs[1].read_text()[-3000:]
                time.sleep(0.02)
            (os.killpg if group else os.kill)(p.pid, sig)
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, p.returncode, logs[0].read_text(), logs[1].read_text())


def stop_line(p, sig):
    """The one stop line of a run (printed by the main process only) and the step it names."""
    import re

    lines = [line for line in p.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {sig} at step "), p.stderr[-3000:]
    return lines[0], int(re.match(r"stopped by \w+ at step (\d+) of", lines[0]).group(1))


def test_torchrun_stops_on_sigterm_and_sigusr1_and_resumes_bit_identical(
    tiny_pipeline, pickapic_parquet, synth, cache, tmp_path
):
    """2 processes under torchrun, signalled mid-run as schedulers do: SIGTERM to the agent only (it forwards it to
    its workers), then, resumed, SIGUSR1 to every process (SLURM's --signal; the agent told to forward it too, so a
    worker gets it twice, and its DataLoader worker gets it as well). Each time both processes stop after the same
    step with one checkpoint of it and a non-zero exit; resumed once more, the run ends bit-identical to an
    uninterrupted one."""
    import signal

    from safetensors.torch import load_file
    from torch.distributed.run import get_args_parser

    if "--signals_to_handle" not in get_args_parser().format_help():
        pytest.skip("this torch's torchrun cannot be told to forward SIGUSR1 (no --signals_to_handle)")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    torchrun += ["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    steps = 24  # ~0.1 s each here: the signals arrive mid-run (a stop comes 2-3 steps after its signal)

    def command(out, *extra):
        more = [
            "--synthetic_dir",
            synth,
            "--checkpointing_steps",
            "1000",
            "--dataloader_num_workers",
            "1",
            SIGNAL,
            *extra,
        ]
        return [*torchrun, *map(str, train_args(tiny_pipeline, pickapic_parquet, out, cache, *more, steps=steps))]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    straight, out = tmp_path / "straight", tmp_path / "out"
    p = subprocess.run(command(straight), capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]

    p = start_signalled(command(out), env, out, "term", signal.SIGTERM, group=False)
    line, first = stop_line(p, "SIGTERM")
    assert p.returncode != 0  # torchrun's own (1, after its SignalException); each worker's is 128 + 15
    assert line == (
        f"stopped by SIGTERM at step {first} of {steps}: saved {out}/checkpoint-{first}; "
        "run the same command with --resume_from_checkpoint latest to continue"
    )
    assert 1 <= first < steps and ts.list_checkpoints(out) == [out / f"checkpoint-{first}"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {f.name for f in (out / f"checkpoint-{first}").iterdir()}
    assert [r["step"] for r in metrics(out)] == list(range(1, first + 1)) and not (out / "unet").exists()

    resume = command(out, "--resume_from_checkpoint", "latest")
    p = start_signalled(resume, env, out, "usr1", signal.SIGUSR1, after_step=first, group=True)
    line, second = stop_line(p, "SIGUSR1")
    assert p.returncode != 0 and f"resumed from {out}/checkpoint-{first} at step {first}" in p.stdout
    assert line.endswith(
        f"at step {second} of {steps}: saved {out}/checkpoint-{second}; run the same command to continue"
    )
    assert first < second < steps
    assert ts.list_checkpoints(out) == [out / f"checkpoint-{first}", out / f"checkpoint-{second}"]

    p = subprocess.run(resume, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0 and f"resumed from {out}/checkpoint-{second}" in p.stdout, p.stderr[-3000:]

    def weights(d):
        return load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))

    def rows(d):  # pairs_per_s is a clock's
        return [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in metrics(d)]

    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows(out) == rows(straight) and len(rows(out)) == steps


def test_cumulative_lora_is_theta_k_on_the_base_pipeline(tiny_pipeline, pickapic_parquet, cache, tmp_path):
    """Each LoRA iteration's unet/ is its start with its adapter fused, so theta_2 = theta_0 + scale_1 B_1 A_1 +
    scale_2 B_2 A_2: iter_2/lora_cumulative/ (rank 4 + 2) loaded with load_lora_weights on the base pipeline predicts
    what iter_2/unet/ predicts, also when an iteration's lora_alpha is not its rank (its scale folded into B), and so
    does iter_2/lora/ on theta_1."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    common = ["--loss", "sft", "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--lora_cumulative"]
    it1, it2 = tmp_path / "iter_1", tmp_path / "iter_2"
    train(*train_args(tiny_pipeline, pickapic_parquet, it1, cache, *common, "--lora_rank", "4", steps=2))
    train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            it2,
            cache,
            *common,
            "--unet",
            it1,
            "--lora_rank",
            "2",
            "--lora_alpha",
            "4",
            steps=2,
        )
    )
    cumulative = load_file(str(it2 / "lora_cumulative" / extras.LORA_FILE))
    assert {v.shape[0] for k, v in cumulative.items() if k.endswith("lora_A.weight")} == {6}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    pipe.load_lora_weights(str(it2 / "lora_cumulative"))
    theta_2, theta_1 = ts.load_unet(str(it2), str(tiny_pipeline)), ts.load_unet(str(it1), str(tiny_pipeline))
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, theta_2.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        a = pipe.unet(x, t, encoder_hidden_states=text).sample
        b = theta_2(x, t, encoder_hidden_states=text).sample
        c = theta_1(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(b, c, atol=1e-3)  # theta_2, not theta_1
    # iter_2/lora/ alone (alpha 4, rank 2: scale 2) on theta_1, loaded by a loader that reads no alpha, is theta_2
    step = StableDiffusionPipeline.from_pretrained(tiny_pipeline, unet=theta_1, safety_checker=None)
    step.load_lora_weights(str(it2 / "lora"))
    with torch.no_grad():
        d = step.unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(d, b, atol=1e-5)
    # the first iteration's cumulative adapter is its own
    first = load_file(str(it1 / "lora_cumulative" / extras.LORA_FILE))
    own = load_file(str(it1 / "lora" / extras.LORA_FILE))
    assert first.keys() == own.keys() and all(torch.equal(first[k], own[k].float()) for k in own)
    # a start that is not the base UNet plus adapters (a full fine-tune) has no such adapter: none is written
    full, lora = tmp_path / "full", tmp_path / "lora_on_full"
    p = train(*train_args(tiny_pipeline, pickapic_parquet, full, cache, *common, steps=1), check=False)
    assert error_line(p) == "error: --lora_cumulative needs --lora_rank (it stacks the LoRA iterations' adapters)"
    train(*train_args(tiny_pipeline, pickapic_parquet, full, cache, *common[:-1], steps=1))  # a full fine-tune
    p = train(*train_args(tiny_pipeline, pickapic_parquet, lora, cache, *common, "--unet", full, "--lora_rank", "2"))
    assert (lora / "lora").is_dir() and not (lora / "lora_cumulative").exists() and "no lora_cumulative/" in p.stdout


def test_model_card_and_push_to_hub(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path, monkeypatch):
    """Every output folder gets a README.md model card in the released cards' form (hub metadata read back by
    huggingface_hub's own parser, which iteration of what, the hyperparameters, the loading snippet, an evaluation
    section evaluate.py fills); --push_to_hub uploads unet/ and the card through huggingface_hub's API once the run is
    finished, and a failed upload is one line that keeps the model."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    calls = []

    def create_repo(self, repo_id, exist_ok=False, **kw):
        calls.append(("create_repo", repo_id, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kw):
        cfg = json.loads((Path(folder_path) / "run_config.json").read_text())
        calls.append(
            (
                "upload_folder",
                repo_id,
                folder_path,
                tuple(allow_patterns),
                cfg["finished"],
                (Path(folder_path) / "unet" / "config.json").is_file(),
                (Path(folder_path) / "README.md").is_file(),
            )
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    it1 = tmp_path / "iter_1"
    train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            it1,
            cache,
            "--synthetic_dir",
            synth,
            "--push_to_hub",
            "--hub_model_id",
            "someone/spin-iter1",
            "--hub_token",
            "hf_x",
        )
    )
    assert calls[0] == ("create_repo", "someone/spin-iter1", True)
    assert calls[1][:2] == ("upload_folder", "someone/spin-iter1") and calls[1][4:] == (True, True, True)
    assert {"unet/*", "README.md"} <= set(calls[1][3])
    card = ModelCard((it1 / "README.md").read_text())
    # a local pipeline and dataset name no hub repository: the metadata leaves them out, the text links no hub page
    assert card.data.base_model is None and card.data.datasets is None and "huggingface.co//" not in card.text
    assert card.data.pipeline_tag == "text-to-image" and card.data.library_name == "diffusers"
    assert f"fine-tuned from `{tiny_pipeline}`" in card.text
    assert "spin-diffusion" in card.data.tags
    assert "iteration 1 of SPIN-Diffusion" in card.text and "- learning_rate: 0.0001" in card.text
    assert 'from_pretrained("someone/spin-iter1", subfolder="unet"' in card.text and extras.CARD_EVALUATION in card.text
    # iteration 2 counts from the run it starts from
    assert extras.iteration_of(str(it1)) == 2 and extras.iteration_of("base") == 1
    # a run from one of iteration 1's checkpoints is iteration 2 too (its run_config.json is the folder's above)
    (it1 / "checkpoint-1").mkdir()
    (it1 / "checkpoint-1" / "train_state.json").write_text("{}")
    assert extras.iteration_of(str(it1 / "checkpoint-1")) == 2

    def refused(self, *a, **kw):
        raise OSError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refused)
    sft = tmp_path / "sft"
    p = train(*train_args(tiny_pipeline, pickapic_parquet, sft, cache, "--loss", "sft", "--push_to_hub"), check=False)
    assert "--push_to_hub sft: 401 Client Error" in error_line(p) and f"the model is in {sft}" in error_line(p)
    assert (sft / "unet" / "config.json").is_file() and "the SFT baseline" in (sft / "README.md").read_text()


def test_the_card_names_hub_ids_only(tiny_pipeline, tiny_hub, pickapic_parquet, tmp_path):
    """The card's metadata holds hub ids only: a hub id as given; a local copy by what it records of its id (a hub
    cache snapshot's folder, models--org--name or datasets--org--name); anything else is left out."""
    from huggingface_hub import ModelCard, snapshot_download

    assert extras.hub_id("org/tiny", "model") == "org/tiny" and extras.hub_id(str(tiny_pipeline), "model") is None
    # the local copy huggingface_hub itself resolves from its cache (what `huggingface-cli download` leaves)
    assert extras.hub_id(snapshot_download("org/tiny", local_files_only=True), "model") == "org/tiny"
    snapshot = tmp_path / "hub" / "datasets--someone--pickapic_copy" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(pickapic_parquet, snapshot / "train.parquet")
    assert extras.hub_id(str(snapshot), "dataset") == "someone/pickapic_copy"
    assert extras.hub_id(str(snapshot / "train.parquet"), "dataset") == "someone/pickapic_copy"
    out = tmp_path / "sft"
    train(*train_args("org/tiny", snapshot, out, tmp_path / "cache", "--loss", "sft", "--model_card", steps=1))
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "org/tiny" and card.data.datasets == ["someone/pickapic_copy"]
    assert "fine-tuned from [org/tiny](https://huggingface.co/org/tiny)" in card.text


def test_train_spin_copied_alone_trains_and_names_the_module_an_extra_needs(
    tiny_pipeline, pickapic_parquet, synth, tmp_path
):
    """train_spin.py alone in an empty folder trains theta_k (SPIN), the same weights as beside spin_extras.py; a flag
    of spin_extras.py is one line naming the file to copy, before any work."""
    from safetensors.torch import load_file

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "train_spin.py", alone)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = train_args(tiny_pipeline, pickapic_parquet, tmp_path / "out", tmp_path / "cache", "--synthetic_dir", synth)
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=alone, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    train(
        *train_args(tiny_pipeline, pickapic_parquet, tmp_path / "beside", tmp_path / "cache", "--synthetic_dir", synth)
    )
    a, b = (load_file(str(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors")) for d in ("out", "beside"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    asked = {"--model_card": [], "--validation_prompts": ["a red circle"], "--synthetic_latent image": []}
    for named, values in asked.items():
        more = train_args(tiny_pipeline, pickapic_parquet, tmp_path / "x", tmp_path / "cache", "--synthetic_dir", synth)
        cmd = [sys.executable, *map(str, more), *named.split(), *values]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=alone, env=env)
        want = f"error: {named} needs spin_extras.py beside train_spin.py: copy it from the same repository"
        assert error_line(p) == want
        assert not (tmp_path / "x").exists()
