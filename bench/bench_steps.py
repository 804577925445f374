#!/usr/bin/env python
"""pairs/s and peak GPU memory of train_spin.py's training step, per batch size and variant, through its command line.

    python bench/bench_steps.py --pipeline DIR --resolution 512 --batch_sizes 1,8,16 \
        --variants "adamw=;gc=--gradient_checkpointing;8bit=--use_8bit_adam" --common "--mixed_precision bf16" --json X

Every run is `train_spin.py --pretrained_model_name_or_path DIR ... --train_batch_size B --max_train_steps N` called
as its command line in this process (train_spin.cli(main(argv)), the path `python train_spin.py` takes: the only
internals used), so what is measured is what ships, whatever train_spin.py does inside. Importing once saves the
~5 s start of each run. Memory: torch.cuda's peak is reset when run_config.json appears (model loaded, cache built,
optimizer made: training starts) and read when metrics.jsonl has all N lines, so it is the training steps' peak
(allocated and reserved); the setup's peak (the one-time cache build included) is reported apart. A batch that runs
out of memory is recorded as OOM (and larger batches of that variant are skipped), not a crash. pairs/s: the steps
after --warmup, from metrics.jsonl. The data: a Pick-a-Pic-format parquet (tiny.py) of max(batch) rows and a
generate.py-format synthetic_dir with random latents (so --allow_opponent_mismatch: the weights are random anyway).
"""

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
GiB = 2**30
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]  # tiny.build_pickapic_parquet's


def build_data(work, pipe, n_rows, resolution):
    """A Pick-a-Pic parquet of n_rows at `resolution` and a synthetic_dir in generate.py's contract (run_config.json,
    metadata.jsonl, images/, latents/) with one random latent + PNG per caption; built once under `work`."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    import tiny

    data = work / f"data{resolution}x{n_rows}.parquet"
    if not data.is_file():
        tiny.build_pickapic_parquet(data, n_rows=n_rows, size=resolution, tie_rows=(), corrupt_rows=())
    vae = json.loads((Path(pipe) / "vae" / "config.json").read_text())
    lat = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    synth = work / f"synthetic{resolution}"
    if not (synth / "run_config.json").is_file():  # written last: its presence means complete
        for sub in ("images", "latents"):
            (synth / sub).mkdir(parents=True, exist_ok=True)
        g, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
        with open(synth / "metadata.jsonl", "w") as f:
            for i, cap in enumerate(CAPTIONS):
                key = f"p{i:07d}_i000"  # generate.py's image_key
                save_file(
                    {"latent": torch.randn((4, lat, lat), generator=g)}, str(synth / "latents" / f"{key}.safetensors")
                )
                Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(
                    synth / "images" / f"{key}.png"
                )
                f.write(
                    json.dumps(
                        {
                            "file_name": f"images/{key}.png",
                            "latent_file": f"latents/{key}.safetensors",
                            "prompt": cap,
                            "prompt_index": i,
                            "image_index": 0,
                            "seed": i,
                        }
                    )
                    + "\n"
                )
        (synth / "run_config.json").write_text(
            json.dumps(
                {
                    "stage": "generate",
                    "model": {"pretrained_model_name_or_path": str(pipe), "unet": "base", "unet_fingerprint": None},
                }
            )
        )
    return data, synth


def scratch(work):
    """Where each run's output_dir goes: RAM (/dev/shm) when it has room, since every run writes a whole UNet (3-10
    GiB) that is deleted right after; else under --work."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 16 * GiB:
        return shm / "spin_bench_out"
    return work / "out"


def load_train_spin(path):
    spec = importlib.util.spec_from_file_location("train_spin_measured", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def watch(out, steps, cuda, marks, stop):
    """Reset the peak at training start (run_config.json) and read it when all steps are logged."""
    cfg, metrics = out / "run_config.json", out / "metrics.jsonl"
    while not stop.is_set():
        if "setup" not in marks and cfg.is_file():
            marks["setup"] = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        if (
            "setup" in marks
            and "steps" not in marks
            and metrics.is_file()
            and len(metrics.read_text().splitlines()) >= steps
        ):
            marks["steps"] = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else None
            return
        time.sleep(0.02)


def run_one(ts, argv, out, steps, warmup):
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    AcceleratorState._reset_state(reset_partial_state=True)  # each run is a fresh launch
    shutil.rmtree(out, ignore_errors=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    marks, stop, log = {}, threading.Event(), io.StringIO()
    watcher = threading.Thread(target=watch, args=(out, steps, cuda, marks, stop), daemon=True)
    watcher.start()
    # what an earlier run left allocated (should be ~0: each run's models are freed when its main() returns)
    row, t0 = {"start_alloc_gib": torch.cuda.memory_allocated() / GiB if cuda else None}, time.time()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ts.cli(lambda: ts.main(argv))
    except SystemExit as e:
        row["error"] = f"exit {e.code}: " + log.getvalue().strip().splitlines()[-1][:300]
    except Exception as e:  # noqa: BLE001 -- out of memory comes as several types (torch, cuBLAS, bitsandbytes)
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "ALLOC_FAILED" in str(e)
        row["error"] = "OOM" if oom else f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        del e
    finally:
        stop.set()
        watcher.join()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    row["wall_s"] = time.time() - t0
    if marks.get("setup"):
        row["setup_peak_alloc_gib"], row["setup_peak_reserved_gib"] = (v / GiB for v in marks["setup"])
    if marks.get("steps"):
        row["peak_alloc_gib"], row["peak_reserved_gib"] = (v / GiB for v in marks["steps"])
    if "error" not in row:
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        timed = lines[warmup:] or lines[-1:]
        row["s_per_step"] = (
            sum(1 / r["pairs_per_s"] for r in timed) / len(timed) * int(argv[argv.index("--train_batch_size") + 1])
        )
        row["first_loss"] = lines[0]["loss"]
    shutil.rmtree(out, ignore_errors=True)  # the unet/ it wrote (3-10 GiB)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--pipeline", required=True, help="pipeline folder (bench/make_sd15.py, bench/make_sdxl.py or tiny.py)"
    )
    ap.add_argument("--train_spin", default=str(HERE.parent / "train_spin.py"))
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--batch_sizes", default="1,8,16")
    ap.add_argument("--variants", default="adamw=", help="name=train_spin.py flags, ';'-separated")
    ap.add_argument("--common", default="--mixed_precision bf16", help="flags for every run")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed (allocator, kernels, bnb state)")
    ap.add_argument("--work", default="/tmp/spin_bench/steps")
    ap.add_argument("--label", default=None, help="name of this table in the JSON")
    ap.add_argument("--deadline", type=float, default=None, help="unix time after which runs are skipped, not started")
    ap.add_argument("--json", default=None, help="append this table to the JSON file here (one key per --label)")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    data, synth = build_data(work, args.pipeline, max(batches), args.resolution)
    out = scratch(work)
    ts = load_train_spin(args.train_spin)
    os.environ["HF_HUB_OFFLINE"] = "1"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = {
        "device": device,
        "pipeline": str(args.pipeline),
        "resolution": args.resolution,
        "common": args.common,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "rows": [],
    }
    for spec in args.variants.split(";"):
        name, _, flags = spec.partition("=")
        oom = False
        for b in batches:
            row = {"variant": name.strip(), "flags": flags.strip(), "batch": b}
            if oom or (args.deadline and time.time() > args.deadline):
                row["error"] = "skipped (a smaller batch ran out of memory)" if oom else "skipped (out of time)"
            else:
                argv = [
                    "--pretrained_model_name_or_path",
                    str(args.pipeline),
                    "--dataset",
                    str(data),
                    "--synthetic_dir",
                    str(synth),
                    "--allow_opponent_mismatch",
                    "--output_dir",
                    str(out),
                    "--cache_dir",
                    str(work / "cache"),
                    "--resolution",
                    str(args.resolution),
                    "--train_batch_size",
                    str(b),
                    "--max_train_steps",
                    str(args.steps),
                    "--lr_warmup_steps",
                    "0",
                    "--checkpointing_steps",
                    str(10**9),
                    *args.common.split(),
                    *flags.split(),
                ]
                row.update(run_one(ts, argv, out, args.steps, args.warmup))
                oom = row.get("error") == "OOM"
                if "s_per_step" in row:
                    row["pairs_per_s"] = b / row["s_per_step"]
            table["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every run: a run killed by a time limit still leaves the rows before it
                path = Path(args.json)
                allj = json.loads(path.read_text()) if path.is_file() else {}
                allj[args.label or name] = table
                path.with_suffix(".tmp").write_text(json.dumps(allj, indent=1))
                os.replace(path.with_suffix(".tmp"), path)


if __name__ == "__main__":
    main()
