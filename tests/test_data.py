"""Pick-a-Pic in the layouts its copies come in (the original was removed from the Hub in 2025): parquet with the
original columns, and webdataset tar shards (sayakpaul/pickapic_v2_webdataset's layout, built by tests/tiny.py with
tarfile), through every stage; dataset ids that do not resolve; splits named by the files of a local copy."""
import http.server
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import tiny
import train_spin as ts
from test_train import error_line, make_synthetic_dir, metrics, train, train_args

ROOT = Path(__file__).resolve().parent.parent
REMOVED = "removed from the Hugging Face Hub in 2025"
LAYOUTS = ("caption, jpg_0, jpg_1, label_0, label_1", "original_prompt.txt, jpg_0.jpg, jpg_1.jpg, label_0.txt, label_1.txt")


def cli(script, *args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def rows(ds, with_loser=True):
    stats = {}
    out = [(ex["caption"], bytes_of(ex["image"]), bytes_of(ex.get("image_lose")))
           for ex in ts.iter_examples(ds, with_loser=with_loser, stats=stats)]
    return out, stats


def bytes_of(image):
    return image["bytes"] if isinstance(image, dict) else image


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_shards_give_the_parquet_rows(pickapic_parquet, pickapic_webdataset, streaming):
    """The same Pick-a-Pic rows in both layouts: the same winner and loser bytes, captions, ties and counters."""
    want, want_stats = rows(ts.open_dataset(str(pickapic_parquet), "train"))
    got, stats = rows(ts.open_dataset(str(pickapic_webdataset), "train", streaming))
    assert got == want and stats == want_stats == {"rows_read": 12, "ties_dropped": 1}
    assert ts.unique_prompts(ts.open_dataset(str(pickapic_webdataset), "train", streaming)) == \
        ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def test_each_process_reads_only_its_shards(pickapic_parquet, pickapic_webdataset):
    """A streamed folder of tars is cut by shard file: piece i reads tar i alone, and the pieces together are the
    dataset's rows in order, with the counters split between them."""
    pieces = ts.dataset_pieces(ts.open_dataset(str(pickapic_webdataset), "train", streaming=True))
    assert len(pieces) == 2
    tars = sorted(str(f) for f in Path(pickapic_webdataset).glob("*.tar"))
    together, counts = [], []
    for i, piece in enumerate(pieces):
        assert {Path(r["__url__"]).name for r in piece().select_columns(["__url__"])} == {Path(tars[i]).name}
        got, stats = rows(piece())
        together += got
        counts.append(stats)
    assert together == rows(ts.open_dataset(str(pickapic_parquet), "train"))[0]
    assert counts == [{"rows_read": 6, "ties_dropped": 1}, {"rows_read": 6, "ties_dropped": 0}]


@pytest.mark.parametrize("names", ["with_extensions", "bare"])
def test_labels_as_text_and_bad_labels(tmp_path, names):
    """Labels written as "1"/"0"/"0.5" read as the floats of the parquet layout; a label that is no number is one line.
    Also tars whose files carry the original column names bare (<key>.caption, <key>.jpg_0, ...: webdataset's
    TarWriter fed the parquet rows as they are), which `datasets` hands over as bytes."""
    import io
    import tarfile

    fields = (("original_prompt.txt", "jpg_0.jpg", "jpg_1.jpg", "label_0.txt", "label_1.txt") if names == "with_extensions"
              else ("caption", "jpg_0", "jpg_1", "label_0", "label_1"))
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, (l0, l1) in enumerate([("1", "0"), ("0", "1"), ("0.5", "0.5"), ("x", "1")]):
            for name, data in zip(fields, (f"p{key}".encode(), b"a", b"b", l0.encode(), l1.encode())):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = ts.open_dataset(str(folder), "train")
    examples = ts.iter_examples(ds, with_loser=True, stats=(stats := {}))
    assert [(ex["caption"], bytes_of(ex["image"]), bytes_of(ex["image_lose"])) for ex in (next(examples), next(examples))] \
        == [("p0", b"a", b"b"), ("p1", b"b", b"a")]
    with pytest.raises(ts.UserError, match=r"row 4: Pick-a-Pic labels b?'x', b?'1' are not numbers"):
        next(examples)
    assert stats == {"rows_read": 4, "ties_dropped": 1}


@pytest.mark.parametrize("loss", ["spin", "sft", "dpo"])
def test_every_loss_trains_on_webdataset_shards_as_on_parquet(loss, tiny_pipeline, pickapic_parquet, pickapic_webdataset,
                                                             tmp_path):
    """train_spin.py on the tars (streamed: cut by shard) caches what it caches from the parquet of the same rows:
    the same counters, captions and latents (winner and, for dpo, loser), and trains from ln 2."""
    from safetensors.torch import load_file

    extra = ["--synthetic_dir", make_synthetic_dir(tmp_path / "synth", tiny_pipeline)] if loss == "spin" else []
    runs = {}
    for name, data, flags in (("parquet", pickapic_parquet, []), ("tars", pickapic_webdataset, ["--streaming"])):
        out, cache = tmp_path / name, tmp_path / f"cache_{name}"
        p = train(*train_args(tiny_pipeline, data, out, cache, "--loss", loss, *extra, *flags, steps=2))
        assert "10 usable rows of 12 read (1 ties dropped, 1 undecodable images skipped)" in p.stdout
        assert len(metrics(out)) == 2 and all(math.isfinite(r["loss"]) for r in metrics(out))
        if loss != "sft":
            assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        (lat,) = cache.glob("latents-*")
        shards = [load_file(str(f)) for f in sorted(lat.glob("shard-*.safetensors"))]
        runs[name] = {"data": json.loads((out / "run_config.json").read_text())["data"],
                      "captions": json.loads((lat / "captions.json").read_text()),
                      "tensors": {k: torch.cat([s[k] for s in shards]) for k in shards[0]}, "shards": len(shards)}
    a, b = runs["parquet"], runs["tars"]
    assert b["shards"] == 2 and a["shards"] == 1  # the tars were cut by file
    assert a["data"] == b["data"] and a["captions"] == b["captions"]
    assert a["tensors"].keys() == b["tensors"].keys() == ({"latents", "valid", "image_hw"} |
                                                            ({"latents_lose", "image_hw_lose"} if loss == "dpo" else set()))
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    # the cache key follows the tars' files: rewritten shards are another cache
    before = ts.source_fingerprint(str(tiny.build_pickapic_webdataset(tmp_path / "copy")))
    assert ts.source_fingerprint(str(tiny.build_pickapic_webdataset(tmp_path / "copy", seed=1))) != before


def test_image_column_on_pickapic_is_refused(tiny_pipeline, pickapic_webdataset, tmp_path):
    """--image_column jpg_0.jpg would train on jpg_0 whatever the labels say."""
    p = train(*train_args(tiny_pipeline, pickapic_webdataset, tmp_path / "out", tmp_path / "cache", "--loss", "sft",
                          "--image_column", "jpg_0.jpg"), check=False)
    assert "drop --image_column" in error_line(p) and not (tmp_path / "out" / "unet").exists()


def test_generate_and_sample_take_prompts_from_webdataset_shards(tiny_pipeline, pickapic_parquet, pickapic_webdataset,
                                                                  tmp_path):
    """generate.py's prompts from the tars (streamed) are the parquet's, with the same --max_train_samples cut as
    training; sample.py reads a split of the tars."""
    common = ["--pretrained_model_name_or_path", tiny_pipeline, "--resolution", "32", "--num_inference_steps", "2",
              "--num_images_per_prompt", "1", "--batch_size", "4"]
    p = cli("generate.py", *common, "--dataset", pickapic_webdataset, "--streaming", "--max_train_samples", "3",
            "--output_dir", tmp_path / "synth")
    assert p.returncode == 0, p.stderr[-2000:]
    prompts = [r["prompt"] for r in ts.read_jsonl(tmp_path / "synth" / "metadata.jsonl")]
    assert prompts == ts.unique_prompts(ts.open_dataset(str(pickapic_parquet), "train"), max_rows=3) == \
        ["a red circle", "a blue square", "a green triangle"]

    p = cli("sample.py", *common, "--dataset", pickapic_webdataset, "--split", "train", "--max_prompts", "2",
            "--grid_prompts", "0", "--output_dir", tmp_path / "samples")
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["prompt"] for r in ts.read_jsonl(tmp_path / "samples" / "base" / "metadata.jsonl")] == \
        ["a red circle", "a blue square"]


@pytest.mark.parametrize("layout", ["prefix", "folders"])
def test_a_split_is_the_files_named_by_it(tmp_path, layout):
    """A local copy with its splits in the file names (train_00000.tar, test_unique_00000.tar) or in folders
    (test_unique/00000.tar): --split test_unique reads those files alone and --split test does not take them too
    (`datasets`' own inference files both under 'test')."""
    root = tmp_path / "copy"
    for split, seed in (("train", 0), ("test", 1), ("test_unique", 2)):
        where, prefix = (root, f"{split}_") if layout == "prefix" else (root / split, "")
        tiny.build_pickapic_webdataset(where, n_rows=4, seed=seed, tie_rows=(), corrupt_rows=(), shards=1, prefix=prefix)
    for split, seed in (("test_unique", 2), ("test", 1), ("train", 0)):
        twin = tiny.build_pickapic_parquet(tmp_path / f"{split}.parquet", n_rows=4, seed=seed, tie_rows=(), corrupt_rows=())
        assert rows(ts.open_dataset(str(root), split, streaming=True))[0] == rows(ts.open_dataset(str(twin), "train"))[0]
    with pytest.raises(ts.UserError, match="Unknown split"):
        ts.open_dataset(str(root), "validation")


def not_found_hub():
    """A local stand-in for the Hub answering every request as it answers for a removed repository."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_dataset_id_that_does_not_resolve_is_one_line(tiny_pipeline, tmp_path):
    """Offline (not cached) and online (the Hub's 404): one line; for the removed Pick-a-Pic ids it says so and names
    the layouts of the copies that work. Through every stage that reads a dataset."""
    base = ["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", tmp_path / "out"]
    p = train(*train_args(tiny_pipeline, "yuvalkirstain/pickapic_v2", tmp_path / "out", tmp_path / "cache", "--loss", "sft"),
              check=False)
    line = error_line(p)
    assert "does not resolve" in line and REMOVED in line and all(layout in line for layout in LAYOUTS), line
    p = cli("sample.py", *base, "--dataset", "yuvalkirstain/pickapic_v1", "--split", "test_unique")
    assert p.returncode == 2 and REMOVED in error_line(p), p.stderr[-2000:]
    line = error_line(train(*train_args(tiny_pipeline, "nobody/no_such_dataset", tmp_path / "out", tmp_path / "cache",
                                        "--loss", "sft"), check=False))
    assert "nobody/no_such_dataset does not resolve" in line and REMOVED not in line
    assert not (tmp_path / "out" / "unet").exists()

    server = not_found_hub()
    try:
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf")}
        p = cli("generate.py", *base, "--dataset", "yuvalkirstain/pickapic_v2", "--streaming", env=env)
    finally:
        server.shutdown()
    line = error_line(p)
    assert "doesn't exist on the Hub" in line and REMOVED in line and all(layout in line for layout in LAYOUTS), line
