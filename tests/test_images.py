"""Decoding: any Pillow mode to RGB, EXIF orientation, broken files become ImageError."""

import numpy as np
import pytest
from PIL import Image

from explain_cli.config import PreprocessConfig
from explain_cli.errors import ImageError
from explain_cli.images import load_image, load_preprocessed, normalise, resize


def save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode, name", [
    ("L", "l.png"), ("LA", "la.png"), ("P", "p.png"), ("RGBA", "rgba.png"),
    ("CMYK", "cmyk.tif"), ("I;16", "i16.png"), ("I", "i32.tif"), ("F", "f.tif"), ("1", "bw.png"),
])
def test_modes_become_rgb(tmp_path, mode, name):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    out = load_image(save(tmp_path, img, name))
    assert out.mode == "RGB" and out.size == (30, 20)
    arr = np.asarray(out)
    assert arr.std() > 0  # real content, not a blank conversion


def test_sixteen_bit_uses_full_range(tmp_path):
    arr = np.linspace(1000, 3000, 600, dtype=np.uint16).reshape(20, 30)
    out = np.asarray(load_image(save(tmp_path, Image.fromarray(arr), "g.png")))
    assert out.min() == 0 and out.max() == 255


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_broken_files_raise_image_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = save(tmp_path, Image.new("RGB", (64, 64), (1, 2, 3)), "good.jpg", quality=90)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    for name in ["empty.png", "text.jpg", "trunc.jpg", "missing.png"]:
        with pytest.raises(ImageError):
            load_image(tmp_path / name)


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    path = save(tmp_path, Image.new("RGB", (100, 100)), "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_resize_modes_and_normalise():
    img = Image.fromarray(np.zeros((100, 200, 3), np.uint8))
    stretch = resize(img, PreprocessConfig(size=32))
    crop = resize(img, PreprocessConfig(size=32, resize="crop"))
    assert stretch.shape == crop.shape == (32, 32, 3)
    x = normalise(np.full((2, 2, 3), 255, np.uint8), PreprocessConfig(mean=[0.5] * 3, std=[0.5] * 3))
    assert x.shape == (3, 2, 2) and np.allclose(x, 1.0)


def test_load_preprocessed_shapes(tmp_path):
    path = save(tmp_path, Image.new("RGB", (50, 40), (10, 20, 30)), "a.png")
    pixels, tensor = load_preprocessed(path, PreprocessConfig(size=16))
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
    assert tensor.dtype == np.float32 and tensor.shape == (3, 16, 16)
