"""Images as the model saw them (issue 28): 1 and N channels through every explainer, 16-bit data
under a fixed window, non-square inputs, torchvision-exact resizing, a user eval transform, DICOM."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import importable_module
from explain_cli.cli import app
from explain_cli.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, load_config
from explain_cli.errors import ConfigError, ImageError
from explain_cli.images import IntensityNeeded, load_preprocessed, model_input

runner = CliRunner()

CHANNEL_NET = textwrap.dedent('''
    import torch
    from torch import nn

    def make(channels=3, num_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))
''')

EXPLAINERS = {
    "gradient_input": ({"name": "gradient", "nsamples": 8}, "input"),
    "gradient_layer": ({"name": "gradient", "nsamples": 8, "path": "layer"}, "2"),
    "deep_input": ({"name": "deep"}, "input"),
    "deep_layer": ({"name": "deep"}, "2"),
    "partition_blur": ({"name": "partition", "max_evals": 40, "batch_size": 10, "mask": "blur(4,4)"}, "input"),
    "partition_inpaint": ({"name": "partition", "max_evals": 40, "batch_size": 10, "mask": "inpaint_telea"}, "input"),
    "kernel_slic": ({"name": "kernel", "nsamples": 30, "segments": {"n_segments": 6}}, "input"),
    "kernel_grid": ({"name": "kernel", "nsamples": 30, "segments": {"grid": 3}, "fill": 128}, "input"),
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def project(root: Path, monkeypatch, channels: int, preprocess: dict, explainer: dict, layer: str = "input",
            **extra) -> Path:
    importable_module(root, "chnet", CHANNEL_NET, monkeypatch)
    config = {"model": {"arch": "python:chnet:make", "num_classes": 3, "kwargs": {"channels": channels},
                        "layer": layer},
              "preprocess": preprocess, "input": {"dir": "images"}, "background": {"from_input": 3},
              "explainer": explainer, "output": {"dir": "out", "format": "png", "top_k": 2, "save_values": True},
              "batch_size": 64, "device": "cpu", "seed": 0, "workers": 0, **extra}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def gray16_images(folder: Path, n: int = 3, size=(20, 24), top: int = 4095) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, top, size, dtype=np.uint16)).save(folder / f"g{i}.png")
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(folder / "eight_bit.png")


def five_channel_images(folder: Path) -> None:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(2):
        np.save(folder / f"a{i}.npy", rng.integers(0, 65535, (5, 18, 22), dtype=np.uint16))  # (C, H, W)
    np.save(folder / "hwc.npy", rng.integers(0, 65535, (18, 22, 5), dtype=np.uint16))  # (H, W, C)
    tifffile.imwrite(folder / "pages.tif", rng.integers(0, 65535, (5, 18, 22), dtype=np.uint16))


CHANNEL_CASES = {
    1: ({"size": 16, "channels": 1, "mean": [0.5], "std": [0.25], "intensity": {"range": [0, 4095]}}, gray16_images, 4),
    5: ({"size": 16, "channels": 5, "mean": [0.5] * 5, "std": [0.25] * 5, "intensity": {"range": [0, 65535]}},
        five_channel_images, 4),
}


@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("case", sorted(EXPLAINERS))
def test_every_explainer_runs_on_one_and_n_channel_models(tmp_path, monkeypatch, channels, case):
    settings, layer = EXPLAINERS[case]
    preprocess, make_images, count = CHANNEL_CASES[channels]
    make_images(tmp_path / "images")
    extra = {"metrics": ["deletion", "insertion"], "metrics_steps": 4, "metrics_baseline": 128} \
        if case == "gradient_input" else {}  # a grey level fills any channel count
    cfg = project(tmp_path, monkeypatch, channels, preprocess, settings, layer, **extra)
    result = invoke("run", cfg, "--no-progress")
    if case == "partition_inpaint" and channels == 5:
        # OpenCV inpaints 1 or 3 channels: the refusal names the key, nothing is half-written
        assert result.exit_code == 2 and "explainer.mask" in result.output, result.output
        return
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "topk.csv")
    assert len({r["image"] for r in rows}) == count
    for image in {r["image"] for r in rows}:
        with np.load(tmp_path / "out" / "values" / f"{image}.npz") as npz:
            values = npz["values"]
        assert values.shape[0] == 2 and np.isfinite(values).all()
        if layer == "input":  # a map per input channel, at the model's input size
            assert values.shape[1:] == (channels, 16, 16), values.shape
        assert np.abs(values).sum() > 0
        assert (tmp_path / "out" / "overlays" / f"{image}.png").is_file()
    if extra:
        assert all(r["deletion_auc"] not in ("", None) and r["insertion_auc"] not in ("", None) for r in rows)


def test_amortized_trains_and_explains_a_one_channel_model(tmp_path, monkeypatch):
    gray16_images(tmp_path / "images", n=12)
    preprocess = CHANNEL_CASES[1][0]
    explainer = {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": 2}, "fill": "mean",
                 "train": {"epochs": 2, "pairs": 4, "images_per_step": 8, "width": 8, "augment": True,
                           "holdout": 0.2, "validate_nsamples": 0, "network": "pixels"}}
    cfg = project(tmp_path, monkeypatch, 1, preprocess, explainer)
    trained = invoke("train", cfg)
    assert trained.exit_code == 0, trained.output
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 0, result.output
    with np.load(next((tmp_path / "out" / "values").glob("*.npz"))) as npz:
        assert npz["values"].shape[1:] == (1, 16, 16)


# -- what the model is fed ------------------------------------------------------------------------

def test_grayscale_files_feed_a_one_channel_model_directly(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    cfg = PreprocessConfig(size=16, channels=1, mean=[0.5], std=[0.25])
    pixels, x = load_preprocessed(tmp_path / "g.png", cfg)
    assert x.shape == (1, 16, 16) and pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(x[0], (gray.astype(np.float32) / 255 - np.float32(0.5)) / np.float32(0.25))
    # an RGB file for a 1-channel model: luma as torchvision's Grayscale gives it
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    rgb.save(tmp_path / "c.png")
    want = T.Compose([T.Grayscale(), T.Resize((16, 16)), T.ToTensor(), T.Normalize([0.5], [0.25])])(rgb).numpy()
    np.testing.assert_array_equal(load_preprocessed(tmp_path / "c.png", cfg)[1], want)


def test_sixteen_bit_fixed_window_gives_equal_pixels_equal_inputs(tmp_path):
    low = np.full((12, 12), 300, np.uint16)
    low[0, 0] = 500
    high = np.full((12, 12), 4000, np.uint16)
    high[0, 0] = 500
    Image.fromarray(low).save(tmp_path / "low.png")
    Image.fromarray(high).save(tmp_path / "high.png")
    fixed = PreprocessConfig(size=12, channels=1, mean=[0.0], std=[1.0], intensity={"range": [0, 4095]})
    a, b = (load_preprocessed(tmp_path / n, fixed)[1] for n in ("low.png", "high.png"))
    assert a[0, 0, 0] == b[0, 0, 0] == pytest.approx(500 / 4095, abs=1e-7)
    stretched = fixed.model_copy(update={"intensity": "per_image"})
    a, b = (load_preprocessed(tmp_path / n, stretched)[1] for n in ("low.png", "high.png"))
    assert a[0, 0, 0] == pytest.approx(1.0) and b[0, 0, 0] == pytest.approx(0.0)  # today's old behaviour, now explicit
    with pytest.raises(IntensityNeeded, match="preprocess.intensity"):
        load_preprocessed(tmp_path / "low.png", PreprocessConfig(size=12))


def test_sixteen_bit_folder_without_intensity_is_exit_2_naming_the_key(tmp_path, monkeypatch):
    gray16_images(tmp_path / "images")
    preprocess = {k: v for k, v in CHANNEL_CASES[1][0].items() if k != "intensity"}
    cfg = project(tmp_path, monkeypatch, 1, preprocess, {"name": "gradient", "nsamples": 8})
    for command in ("validate", "run"):
        result = invoke(command, cfg, *(["--no-progress"] if command == "run" else []))
        assert result.exit_code == 2, result.output
        assert "preprocess.intensity" in result.output and "16-bit" in result.output
    assert not (tmp_path / "out" / "topk.csv").exists()


def test_channel_count_mismatch_is_an_error_row_not_a_crash(tmp_path, monkeypatch):
    five_channel_images(tmp_path / "images")
    np.save(tmp_path / "images" / "three.npy", np.zeros((3, 18, 22), np.uint16))
    cfg = project(tmp_path, monkeypatch, 5, CHANNEL_CASES[5][0], {"name": "gradient", "nsamples": 8})
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 3, result.output
    errors = read_csv(tmp_path / "out" / "errors.csv")
    assert [e["image"] for e in errors] == ["three.npy"] and "5 channels" in errors[0]["error"]


def test_display_channels_choose_what_the_overlay_shows(tmp_path):
    arr = np.zeros((5, 8, 8), np.float32)
    arr[4] = 1.0  # only channel 4 is bright
    np.save(tmp_path / "x.npy", arr)
    cfg = PreprocessConfig(size=8, channels=5, mean=[0] * 5, std=[1] * 5, intensity={"range": [0, 1]})
    assert load_preprocessed(tmp_path / "x.npy", cfg)[0].max() == 0  # default: channels 0-2
    cfg._display_channels = (4,)
    assert (load_preprocessed(tmp_path / "x.npy", cfg)[0] == 255).all()
    with pytest.raises(ConfigError, match="display_channels"):
        _load_dict(tmp_path, {"preprocess": {"channels": 5, "mean": [0] * 5, "std": [1] * 5},
                              "output": {"display_channels": [5]}})


def _load_dict(root: Path, extra: dict):
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "torchvision:resnet18", "weights": "random"},
                                    "input": {"dir": "."}, **extra}))
    return load_config(path)


def test_config_refuses_mean_of_the_wrong_length_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="preprocess") as info:
        _load_dict(tmp_path, {"preprocess": {"channels": 1}})
    assert "mean and std" in str(info.value)
    with pytest.raises(ConfigError, match="preprocess"):
        _load_dict(tmp_path, {"preprocess": {"channels": 4, "mean": [0.5] * 3, "std": [0.2] * 3}})


# -- size and interpolation -----------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_resizing_equals_torchvision(tmp_path, interpolation):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (150, 211, 3), dtype=np.uint8))
    mode = getattr(T.InterpolationMode, interpolation.upper())
    stretch = PreprocessConfig(size=[96, 160], interpolation=interpolation)
    want = T.Compose([T.Resize((96, 160), interpolation=mode), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    np.testing.assert_allclose(model_input(img, stretch)[1], want(img).numpy(), atol=1e-6, rtol=0)
    crop = PreprocessConfig(size=64, resize="crop", crop_fraction=0.9, interpolation=interpolation)  # floor(64/0.9) = 71
    want = T.Compose([T.Resize(71, interpolation=mode), T.CenterCrop(64), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    np.testing.assert_allclose(model_input(img, crop)[1], want(img).numpy(), atol=1e-6, rtol=0)
    if interpolation != "nearest":
        other = "bicubic" if interpolation == "bilinear" else "bilinear"
        assert not np.allclose(model_input(img, stretch)[1],
                               model_input(img, stretch.model_copy(update={"interpolation": other}))[1])


def test_non_square_input_runs_end_to_end(tmp_path, monkeypatch):
    from conftest import write_images

    write_images(tmp_path / "images", ["a.png", "b.png", "c.png"], size=40)
    for settings in ({"name": "gradient", "nsamples": 8}, {"name": "kernel", "nsamples": 30, "segments": {"grid": 4}}):
        cfg = project(tmp_path, monkeypatch, 3, {"size": [24, 40]}, settings)
        result = invoke("run", cfg, "--no-progress", "--overwrite")
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / "out" / "values" / "a.png.npz") as npz:
            assert npz["values"].shape == (2, 3, 24, 40)


# -- a user transform ------------------------------------------------------------------------------

EVAL_TRANSFORM = textwrap.dedent('''
    import torchvision.transforms as T

    IMAGENET = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    SMALL = T.Compose([T.Resize(20), T.CenterCrop(16), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
    BARE = T.Compose([T.Resize((16, 16)), T.ToTensor()])
''')


def test_user_transform_reproduces_the_imagenet_eval_transform(tmp_path, monkeypatch):
    from conftest import write_images

    importable_module(tmp_path, "evaltf", EVAL_TRANSFORM, monkeypatch)
    write_images(tmp_path / "images", ["a.jpg"], size=300)
    cfg = _load_dict(tmp_path, {"preprocess": {"transform": "python:evaltf:IMAGENET"}}).preprocess
    assert cfg.input_shape == (3, 224, 224) and cfg.norm == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    import evaltf

    path = tmp_path / "images" / "a.jpg"
    _, x = load_preprocessed(path, cfg)
    np.testing.assert_array_equal(x, evaltf.IMAGENET(Image.open(path).convert("RGB")).numpy())
    ours = PreprocessConfig(size=224, resize="crop", crop_fraction=0.875)  # our keys give the same tensor
    np.testing.assert_array_equal(load_preprocessed(path, ours)[1], x)


def test_user_transform_runs_and_its_source_is_in_the_resume_fingerprint(tmp_path, monkeypatch):
    from conftest import write_images

    importable_module(tmp_path, "evaltf", EVAL_TRANSFORM, monkeypatch)
    write_images(tmp_path / "images", ["a.png", "b.png", "c.png"], size=30)
    cfg = project(tmp_path, monkeypatch, 3, {"transform": "python:evaltf:SMALL"}, {"name": "partition", "max_evals": 40,
                                                                                   "batch_size": 10, "mask": "blur(4,4)"})
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out" / "values" / "a.png.npz") as npz:
        assert npz["values"].shape == (2, 3, 16, 16)
    (tmp_path / "evaltf.py").write_text(EVAL_TRANSFORM.replace("[0.25] * 3", "[0.3] * 3"))
    rerun = invoke("run", cfg, "--no-progress")
    assert rerun.exit_code == 2 and "evaltf.py" in rerun.output, rerun.output


def test_user_transform_refusals_name_the_key(tmp_path, monkeypatch):
    importable_module(tmp_path, "evaltf", EVAL_TRANSFORM, monkeypatch)
    with pytest.raises(ConfigError, match="preprocess") as info:
        _load_dict(tmp_path, {"preprocess": {"transform": "python:evaltf:SMALL", "size": 32}})
    assert "transform replaces preprocess.size" in str(info.value)
    with pytest.raises(ConfigError, match="preprocess.display"):
        _load_dict(tmp_path, {"preprocess": {"transform": "python:evaltf:BARE"}})
    bare = _load_dict(tmp_path, {"preprocess": {"transform": "python:evaltf:BARE",
                                                "display": {"mean": [0, 0, 0], "std": [1, 1, 1]}}}).preprocess
    assert bare.input_shape == (3, 16, 16) and bare.norm == ((0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ConfigError, match="preprocess.transform"):
        _load_dict(tmp_path, {"preprocess": {"transform": "python:evaltf:MISSING"}})


# -- DICOM -----------------------------------------------------------------------------------------

def write_dicom(path: Path, pixels: np.ndarray, *, window: tuple[float, float] | None = (40.0, 400.0),
                photometric: str = "MONOCHROME2", with_pixels: bool = True) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_rescale_and_window_as_the_header_says(tmp_path):
    hu_row = np.array([-1024, 0, 40, 240, -200, 1976, -170, 230])  # around the window 40 +- 200 and beyond
    raw = np.tile(hu_row + 1024, (8, 1)).astype(np.uint16)
    write_dicom(tmp_path / "ct.dcm", raw)
    cfg = PreprocessConfig(size=8, channels=1, mean=[0.0], std=[1.0])  # 8 x 8: no resampling
    x = load_preprocessed(tmp_path / "ct.dcm", cfg)[1][0]
    hu = raw.astype(np.float64) - 1024
    want = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)  # DICOM's linear VOI function
    np.testing.assert_allclose(x, want, atol=1e-6)
    write_dicom(tmp_path / "inv.dcm", raw, photometric="MONOCHROME1")
    np.testing.assert_allclose(load_preprocessed(tmp_path / "inv.dcm", cfg)[1][0], 1 - want, atol=1e-6)
    lung = cfg.model_copy(update={"intensity": PreprocessConfig(intensity={"range": [-1000, 400]}).intensity})
    np.testing.assert_allclose(load_preprocessed(tmp_path / "ct.dcm", lung)[1][0],
                               np.clip((hu + 1000) / 1400, 0, 1), atol=1e-6)
    write_dicom(tmp_path / "nowindow.dcm", raw, window=None)
    with pytest.raises(IntensityNeeded, match="preprocess.intensity"):
        load_preprocessed(tmp_path / "nowindow.dcm", cfg)


def test_dicom_folder_runs_and_one_without_pixel_data_is_an_error_row(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        write_dicom(folder / f"s{i}.dcm", rng.integers(800, 1400, (20, 20)))
    write_dicom(folder / "report.dcm", np.zeros((20, 20)), with_pixels=False)
    preprocess = {"size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}
    cfg = project(tmp_path, monkeypatch, 1, preprocess, {"name": "gradient", "nsamples": 8})
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 3, result.output
    errors = read_csv(tmp_path / "out" / "errors.csv")
    assert [e["image"] for e in errors] == ["report.dcm"] and "pixel data" in errors[0]["error"]
    assert len({r["image"] for r in read_csv(tmp_path / "out" / "topk.csv")}) == 3


def test_broken_array_files_are_image_errors(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "rank4.npy", np.zeros((2, 2, 4, 4)))
    cfg = PreprocessConfig(size=8, channels=5, mean=[0] * 5, std=[1] * 5, intensity="per_image")
    for name in ("bad.npy", "rank4.npy"):
        with pytest.raises(ImageError):
            load_preprocessed(tmp_path / name, cfg)


def test_python_api_takes_raw_arrays_and_c_channel_tensors(tmp_path, monkeypatch):
    import explain_cli

    importable_module(tmp_path, "chnet", CHANNEL_NET, monkeypatch)
    gray16_images(tmp_path / "images")
    config = {"model": {"arch": "python:chnet:make", "num_classes": 3, "kwargs": {"channels": 1}},
              "preprocess": CHANNEL_CASES[1][0], "input": {"dir": "images"}, "background": {"from_input": 3},
              "explainer": {"name": "deep"}, "device": "cpu", "seed": 0}  # deterministic: the name seeds nothing
    raw = np.random.default_rng(5).integers(0, 4095, (30, 20), dtype=np.uint16)
    from_array = explain_cli.explain(config, [raw], base_dir=tmp_path)
    assert from_array.values.shape[1:4] == (16, 16, 1)
    pre = PreprocessConfig(**CHANNEL_CASES[1][0])
    tensor = torch.from_numpy(model_input(raw.astype(np.float32)[..., None] / 4095, pre)[1])[None]
    from_tensor = explain_cli.explain(config, tensor, base_dir=tmp_path)
    np.testing.assert_allclose(from_tensor.values, from_array.values, rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match=r"\(N, 1, 16, 16\)"):
        explain_cli.explain(config, torch.zeros(1, 3, 16, 16), base_dir=tmp_path)
