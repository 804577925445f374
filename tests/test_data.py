"""Pick-a-Pic in the layouts its copies come in (the original was removed from the Hub in 2025): parquet with the
original columns, and webdataset tar shards (sayakpaul/pickapic_v2_webdataset's layout, built by tiny.py with
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
from test_train import error_line, make_synthetic_dir, metrics, train, train_args

import generate
import tiny
import train_spin as ts

ROOT = Path(__file__).resolve().parent.parent
REMOVED = "removed from the Hugging Face Hub in 2025"
LAYOUTS = (
    "caption, jpg_0, jpg_1, label_0, label_1",
    "original_prompt.txt, jpg_0.jpg, jpg_1.jpg, label_0.txt, label_1.txt",
)


def cli(script, *args, env=None):
    """A script in a process of its own, in an offline cluster's environment (the three offline variables users set)
    unless `env` says otherwise: LocalHub.env clears them."""
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = {**os.environ, **offline, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def rows(ds, with_loser=True):
    stats = {}
    out = [
        (ex["caption"], bytes_of(ex["image"]), bytes_of(ex.get("image_lose")))
        for ex in ts.iter_examples(ds, with_loser=with_loser, stats=stats)
    ]
    return out, stats


def bytes_of(image):
    return image["bytes"] if isinstance(image, dict) else image


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_shards_give_the_parquet_rows(pickapic_parquet, pickapic_webdataset, streaming):
    """The same Pick-a-Pic rows in both layouts: the same winner and loser bytes, captions, ties and counters."""
    want, want_stats = rows(ts.open_dataset(str(pickapic_parquet), "train"))
    got, stats = rows(ts.open_dataset(str(pickapic_webdataset), "train", streaming))
    assert got == want and stats == want_stats == {"rows_read": 12, "ties_dropped": 1}
    assert generate.unique_prompts(generate.open_dataset(str(pickapic_webdataset), "train", streaming)) == [
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow circle",
    ]


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

    fields = (
        ("original_prompt.txt", "jpg_0.jpg", "jpg_1.jpg", "label_0.txt", "label_1.txt")
        if names == "with_extensions"
        else ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
    )
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
    assert [
        (ex["caption"], bytes_of(ex["image"]), bytes_of(ex["image_lose"])) for ex in (next(examples), next(examples))
    ] == [("p0", b"a", b"b"), ("p1", b"b", b"a")]
    with pytest.raises(ts.UserError, match=r"row 4: Pick-a-Pic labels b?'x', b?'1' are not numbers"):
        next(examples)
    assert stats == {"rows_read": 4, "ties_dropped": 1}


@pytest.mark.parametrize("loss", ["spin", "sft", "dpo"])
def test_every_loss_trains_on_webdataset_shards_as_on_parquet(
    loss, tiny_pipeline, pickapic_parquet, pickapic_webdataset, tmp_path
):
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
        runs[name] = {
            "data": json.loads((out / "run_config.json").read_text())["data"],
            "captions": json.loads((lat / "captions.json").read_text()),
            "tensors": {k: torch.cat([s[k] for s in shards]) for k in shards[0]},
            "shards": len(shards),
        }
    a, b = runs["parquet"], runs["tars"]
    assert b["shards"] == 2 and a["shards"] == 1  # the tars were cut by file
    assert a["data"] == b["data"] and a["captions"] == b["captions"]
    assert (
        a["tensors"].keys()
        == b["tensors"].keys()
        == ({"latents", "valid", "image_hw"} | ({"latents_lose", "image_hw_lose"} if loss == "dpo" else set()))
    )
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    # the cache key follows the tars' files: rewritten shards are another cache
    before = ts.source_fingerprint(str(tiny.build_pickapic_webdataset(tmp_path / "copy")))
    assert ts.source_fingerprint(str(tiny.build_pickapic_webdataset(tmp_path / "copy", seed=1))) != before


def test_image_column_on_pickapic_is_refused(tiny_pipeline, pickapic_webdataset, tmp_path):
    """--image_column jpg_0.jpg would train on jpg_0 whatever the labels say."""
    p = train(
        *train_args(
            tiny_pipeline,
            pickapic_webdataset,
            tmp_path / "out",
            tmp_path / "cache",
            "--loss",
            "sft",
            "--image_column",
            "jpg_0.jpg",
        ),
        check=False,
    )
    assert "drop --image_column" in error_line(p) and not (tmp_path / "out" / "unet").exists()


def test_sample_takes_prompts_from_webdataset_shards(tiny_pipeline, pickapic_webdataset, tmp_path):
    """sample.py's evaluation prompts from a split of the tars, streamed (generate.py: test_from_a_hub_id...)."""
    p = cli(
        "sample.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--dataset",
        pickapic_webdataset,
        "--split",
        "train",
        "--streaming",
        "--max_prompts",
        "2",
        "--resolution",
        "32",
        "--num_inference_steps",
        "1",
        "--num_images_per_prompt",
        "1",
        "--grid_prompts",
        "0",
        "--output_dir",
        tmp_path / "samples",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["prompt"] for r in ts.read_jsonl(tmp_path / "samples" / "base" / "metadata.jsonl")] == [
        "a red circle",
        "a blue square",
    ]


@pytest.mark.parametrize("layout", ["prefix", "folders"])
def test_a_split_is_the_files_named_by_it(tmp_path, layout):
    """A local copy with its splits in the file names (train_00000.tar, test_unique_00000.tar) or in folders
    (test_unique/00000.tar): --split test_unique reads those files alone and --split test does not take them too
    (`datasets`' own inference files both under 'test')."""
    root = tmp_path / "copy"
    for split, seed in (("train", 0), ("test", 1), ("test_unique", 2)):
        where, prefix = (root, f"{split}_") if layout == "prefix" else (root / split, "")
        tiny.build_pickapic_webdataset(
            where, n_rows=4, seed=seed, tie_rows=(), corrupt_rows=(), shards=1, prefix=prefix
        )
    for split, seed in (("test_unique", 2), ("test", 1), ("train", 0)):
        assert rows(ts.open_dataset(str(root), split, streaming=True))[0] == twin_rows(tmp_path, seed), split
    with pytest.raises(ts.UserError, match="Unknown split"):
        ts.open_dataset(str(root), "validation")


def test_a_dataset_card_that_lists_the_files_wins(tmp_path):
    """A downloaded hub copy whose README.md names each split's files is read as its card says, not by file names."""
    root = tmp_path / "copy"
    tiny.build_pickapic_webdataset(root, n_rows=4, seed=0, tie_rows=(), corrupt_rows=(), shards=1, prefix="train_")
    tiny.build_pickapic_webdataset(root / "other", n_rows=4, seed=2, tie_rows=(), corrupt_rows=(), shards=1)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: other/*.tar\n---\n# a copy\n"
    )
    assert rows(ts.open_dataset(str(root), "train"))[0] == twin_rows(tmp_path, 2)


def twin_rows(tmp_path, seed):
    """The rows build_pickapic_webdataset(n_rows=4, seed=seed, no ties or corrupt images) writes, from a parquet "
    "twin."""
    twin = tiny.build_pickapic_parquet(
        tmp_path / f"twin_{seed}.parquet", n_rows=4, seed=seed, tie_rows=(), corrupt_rows=()
    )
    return rows(ts.open_dataset(str(twin), "train"))[0]


class LocalHub:
    """A local stand-in for the Hugging Face Hub serving folders as dataset repos (HF_ENDPOINT points the scripts at
    it): the repository info, file tree and file downloads (with byte ranges, for streaming) that `datasets` asks
    for, and for any other repository the Hub's answer for a missing one (404, RepoNotFound)."""

    SHA = "0" * 39 + "1"

    def __init__(self, repos):
        import hashlib

        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, code, body=b"", headers=None, ctype="application/json"):
                self.send_response(code)
                for k, v in {**(headers or {}), "Content-Type": ctype, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def missing(self, code="RepoNotFound"):
                self.reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": code, "X-Repo-Commit": hub.SHA})

            def do_GET(self):
                from urllib.parse import parse_qs, unquote, urlparse

                url = urlparse(self.path)
                parts = unquote(url.path).strip("/").split("/")
                api = parts[:2] == ["api", "datasets"]
                repo = "/".join(parts[2:4] if api else parts[1:3])
                root = Path(repos[repo]) if repo in repos else None
                if root is None:
                    return self.missing()
                if api and parts[4:5] in ([], ["revision"]):
                    files = [{"rfilename": str(f.relative_to(root))} for f in sorted(root.rglob("*")) if f.is_file()]
                    return self.reply(
                        200,
                        json.dumps(
                            {
                                "id": repo,
                                "sha": hub.SHA,
                                "siblings": files,
                                "cardData": {},
                                "tags": [],
                                "private": False,
                            }
                        ).encode(),
                    )
                if api and parts[4:5] == ["tree"]:
                    where = root.joinpath(*parts[6:])
                    if not where.is_dir():
                        return self.missing("EntryNotFound")
                    deep = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                    tree = [
                        {"type": "directory", "path": str(f.relative_to(root)), "oid": "0" * 40}
                        if f.is_dir()
                        else {
                            "type": "file",
                            "path": str(f.relative_to(root)),
                            "size": f.stat().st_size,
                            "oid": hashlib.sha1(f.read_bytes()).hexdigest(),
                        }
                        for f in sorted(where.rglob("*") if deep else where.iterdir())
                    ]
                    return self.reply(200, json.dumps(tree).encode())
                if not api and parts[3:4] == ["resolve"] and root.joinpath(*parts[5:]).is_file():
                    data = root.joinpath(*parts[5:]).read_bytes()
                    headers = {
                        "X-Repo-Commit": hub.SHA,
                        "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                        "Accept-Ranges": "bytes",
                    }
                    ranged = self.headers.get("Range", "")
                    if ranged.startswith("bytes="):
                        start, end = ranged[6:].split("-")
                        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
                        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                        return self.reply(206, data[start : end + 1], headers, "application/octet-stream")
                    return self.reply(200, data, headers, "application/octet-stream")
                return self.missing("EntryNotFound")

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, home):
        """The environment of a process that talks to this hub: online, whatever offline variables a user has set."""
        return {
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_ENDPOINT": f"http://127.0.0.1:{self.server.server_port}",
            "HF_HOME": str(home),
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_from_a_hub_id_streamed_and_not(tiny_pipeline, pickapic_parquet, pickapic_webdataset, tmp_path):
    """The tars as a hub repository: train_spin.py streams it cut by shard file, generate.py downloads it (with
    --max_train_samples, the same cut as training); both read the Pick-a-Pic rows the parquet gives."""
    with LocalHub({"someone/pickapic_v2_webdataset": pickapic_webdataset}) as hub:
        p = cli(
            "train_spin.py",
            *train_args(
                tiny_pipeline,
                "someone/pickapic_v2_webdataset",
                tmp_path / "iter_1",
                tmp_path / "cache",
                "--loss",
                "dpo",
                "--streaming",
            )[1:],
            env=hub.env(tmp_path / "hf"),
        )
        assert p.returncode == 0, p.stderr[-3000:]
        assert "10 usable rows of 12 read (1 ties dropped, 1 undecodable images skipped)" in p.stdout
        assert "2 piece(s) of the dataset" in p.stdout and metrics(tmp_path / "iter_1")[0]["loss"] == pytest.approx(
            math.log(2), abs=1e-6
        )
        p = cli(
            "generate.py",
            "--pretrained_model_name_or_path",
            tiny_pipeline,
            "--dataset",
            "someone/pickapic_v2_webdataset",
            "--max_train_samples",
            "3",
            "--resolution",
            "32",
            "--num_inference_steps",
            "1",
            "--num_images_per_prompt",
            "1",
            "--output_dir",
            tmp_path / "synth",
            env=hub.env(tmp_path / "hf"),
        )
        assert p.returncode == 0, p.stderr[-3000:]
    assert (
        [r["prompt"] for r in ts.read_jsonl(tmp_path / "synth" / "metadata.jsonl")]
        == generate.unique_prompts(generate.open_dataset(str(pickapic_parquet), "train"), max_rows=3)
        == ["a red circle", "a blue square", "a green triangle"]
    )


def test_a_dataset_id_that_does_not_resolve_is_one_line(tiny_pipeline, tmp_path):
    """Offline (not cached) and online (the Hub's 404): one line; for the removed Pick-a-Pic ids it says so and names
    the layouts of the copies that work. train_spin.py and generate.py (whose copy of open_dataset sample.py runs)."""
    base = ["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", tmp_path / "out"]
    p = train(
        *train_args(tiny_pipeline, "yuvalkirstain/pickapic_v2", tmp_path / "out", tmp_path / "cache", "--loss", "sft"),
        check=False,
    )
    line = error_line(p)
    assert "does not resolve" in line and REMOVED in line and all(layout in line for layout in LAYOUTS), line
    with pytest.raises(ts.UserError, match=f"pickapic_v1 does not resolve .*{REMOVED}"):
        ts.open_dataset("yuvalkirstain/pickapic_v1", "test_unique")
    line = error_line(
        train(
            *train_args(tiny_pipeline, "nobody/no_such_dataset", tmp_path / "out", tmp_path / "cache", "--loss", "sft"),
            check=False,
        )
    )
    assert "nobody/no_such_dataset does not resolve" in line and REMOVED not in line
    assert not (tmp_path / "out" / "unet").exists()

    with LocalHub({}) as hub:  # online: the Hub's own answer for a removed repository
        p = cli(
            "generate.py", *base, "--dataset", "yuvalkirstain/pickapic_v2", "--streaming", env=hub.env(tmp_path / "hf")
        )
    line = error_line(p)
    assert "doesn't exist on the Hub" in line and REMOVED in line and all(layout in line for layout in LAYOUTS), line
