"""The user's own photos: every stage reads an image as the RGB picture a viewer sees (decode_image / to_rgb, the same
text in every script): EXIF-rotated JPEGs upright, transparency over white, 16-bit greyscale scaled, palette, CMYK
and greyscale converted. Real files, written by Pillow's own encoders."""

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_spin

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 255)


def photo_files(d):
    """{kind: (path, expected HxWx3 uint8 picture)} for each kind of file users bring."""
    out = {}
    # a phone photo stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise): stored 32x16,
    # left half red, right half blue; shown 16x32, top red, bottom blue
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16], stored[:, 16:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(d / "rotated.jpg", exif=exif, quality=95)
    shown = np.zeros((32, 16, 3), np.uint8)
    shown[:16], shown[16:] = RED, BLUE
    out["exif_rotated_jpeg"] = (d / "rotated.jpg", shown)
    # RGBA: the left half fully transparent over black colour values, the right half opaque green
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = (*GREEN, 255)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    expect = np.zeros((16, 16, 3), np.uint8)
    expect[:, :8], expect[:, 8:] = WHITE, GREEN
    out["rgba_png"] = (d / "rgba.png", expect)
    # palette PNG whose index 0 (black) is transparent
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    pal.paste(1, (8, 0, 16, 16))
    pal.save(d / "palette.png", transparency=0)
    expect = np.zeros((16, 16, 3), np.uint8)
    expect[:, :8], expect[:, 8:] = WHITE, BLUE
    out["palette_png"] = (d / "palette.png", expect)
    # 16-bit greyscale at half scale: mid grey, not the white a plain convert gives
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(d / "grey16.png")
    out["grey16_png"] = (d / "grey16.png", np.full((16, 16, 3), 128, np.uint8))
    # CMYK JPEG (print workflows): C=0 M=255 Y=255 K=0 is red
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)
    out["cmyk_jpeg"] = (d / "cmyk.jpg", np.full((16, 16, 3), RED, np.uint8))
    # greyscale JPEG
    Image.new("L", (16, 16), 90).save(d / "grey.jpg", quality=95)
    out["grey_jpeg"] = (d / "grey.jpg", np.full((16, 16, 3), 90, np.uint8))
    return out


@pytest.mark.parametrize("module", [train_spin, evaluate], ids=lambda m: m.__name__)
def test_every_script_reads_the_picture_a_viewer_sees(tmp_path, module):
    for kind, (path, expected) in photo_files(tmp_path).items():
        for value in (str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": None}, Image.open(path)):
            img = module.decode_image(value)
            assert img is not None and img.mode == "RGB", (kind, type(value))
            got = np.asarray(img).astype(int)
            assert got.shape == expected.shape, (kind, got.shape)
            # JPEG is lossy (a few levels, more at colour edges); what this guards against is off by 100 or more
            # over half the picture
            assert np.abs(got - expected).mean() <= 8, (kind, type(value), np.abs(got - expected).mean())
    assert module.decode_image(b"not an image") is None


def test_training_data_path_encodes_the_upright_picture(tmp_path):
    """Through train_spin.py's own data path (a `datasets` image folder -> iter_examples -> encode_piece), the VAE is
    given the upright, white-backed pictures, and SDXL's original size is the displayed one."""
    import json
    from types import SimpleNamespace

    files = photo_files(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for kind, (path, _) in files.items():
            (folder / path.name).write_bytes(path.read_bytes())
            f.write(json.dumps({"file_name": path.name, "text": kind}) + "\n")
    seen = []

    def encode(imgs):
        seen.extend(imgs)
        return torch.zeros(len(imgs), 4, 2, 2)

    ds = train_spin.open_dataset(str(folder), "train")
    args = SimpleNamespace(loss="sft", caption_column="text", image_column=None, max_train_samples=None)
    tensors, metadata = train_spin.encode_piece(ds, args, encode)
    captions, hw = json.loads(metadata["captions"]), tensors["image_hw"].tolist()
    for kind, img, size in zip(captions, seen, hw):
        expected = files[kind][1]
        assert size == list(expected.shape[:2]), (kind, size)
        assert np.abs(np.asarray(img).astype(int) - expected).mean() <= 8, kind
    assert len(seen) == len(files)
