"""End-to-end CLI runs: outputs, exit codes, errors.csv, resume, validate, layers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from explain_cli import __version__
from explain_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    """Same images, ranks and classes; numeric columns equal up to float32 summation order."""
    key = lambda r: (r["image"], int(r["rank"]))  # noqa: E731
    rows, expected = sorted(rows, key=key), sorted(expected, key=key)
    assert [(r["image"], r["rank"], r["class_index"], r["class_name"]) for r in rows] == \
        [(r["image"], r["rank"], r["class_index"], r["class_name"]) for r in expected]
    for column in ("probability", "output", "base_value", "shap_sum", "additivity_error"):
        np.testing.assert_allclose([float(r[column]) for r in rows], [float(r[column]) for r in expected],
                                   rtol=1e-4, atol=1e-6, err_msg=column)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output
    for cmd in (["--help"], ["run", "--help"], ["validate", "--help"], ["layers", "--help"]):
        result = invoke(*cmd)
        assert result.exit_code == 0, result.output
        assert "Exit codes" in result.output


def test_run_writes_overlays_csvs_and_run_json(tiny_project):
    cfg = tiny_project / "config.yaml"
    result = invoke("run", cfg, "--no-progress", "--set", "output.save_values=true")
    assert result.exit_code == 0, result.output
    out = tiny_project / "out"
    rows = read_csv(out / "topk.csv")
    assert list(rows[0])[:5] == ["image", "rank", "class_index", "class_name", "probability"]
    images = sorted({r["image"] for r in rows})
    assert images == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]  # skip-02 excluded
    assert len(rows) == 8 and {r["rank"] for r in rows} == {"1", "2"}
    for r in rows:
        assert r["class_name"] in {"cat & dog", "<bird>", "fish $x$"}
        assert 0.0 <= float(r["probability"]) <= 1.0
    # probabilities are ranked descending per image
    for img in images:
        p = [float(r["probability"]) for r in rows if r["image"] == img]
        assert p[0] >= p[1]
    for stem in ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]:
        svg = out / "overlays" / f"{stem}.svg"
        ET.parse(svg)  # well-formed XML even with '&' and '<' in class names
        data = np.load(out / "values" / f"{stem}.npz")
        assert data["values"].shape == (2, 3, 16, 16) and data["values"].dtype == np.float32
        assert data["classes"].shape == (2,)
    assert read_csv(out / "errors.csv") == []
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["counts"]["explained"] == 4 and info["counts"]["failed"] == 0
    assert info["config"]["explainer"]["nsamples"] == 16
    assert "torch" in info["versions"]


def test_broken_image_exits_3_and_others_are_explained(tiny_project):
    (tiny_project / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tiny_project / "images" / "empty.jpg").write_bytes(b"")
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 3, result.output
    out = tiny_project / "out"
    errors = read_csv(out / "errors.csv")
    assert sorted(e["image"] for e in errors) == ["broken.png", "empty.jpg"]
    assert all(e["error"] for e in errors)
    assert len({r["image"] for r in read_csv(out / "topk.csv")}) == 4


def test_bad_config_exits_2_naming_the_key(tiny_project):
    result = invoke("run", tiny_project / "config.yaml", "--set", "explainer.nsamples=0")
    assert result.exit_code == 2
    assert "explainer.nsamples" in result.output and ">= 1" in result.output
    assert "Traceback" not in result.output
    result = invoke("run", tiny_project / "config.yaml", "--set", "model.layer=conv9")
    assert result.exit_code == 2 and "model.layer" in result.output


def test_rerun_skips_done_images_and_overwrite_redoes(tiny_project):
    cfg = tiny_project / "config.yaml"
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    first = read_csv(tiny_project / "out" / "topk.csv")
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 0 and "already done 4" in result.output
    assert read_csv(tiny_project / "out" / "topk.csv") == first
    (tiny_project / "out" / "overlays" / "a" / "one.png.svg").unlink()
    result = invoke("run", cfg, "--no-progress")
    assert "explained 1, already done 3" in result.output
    rows = read_csv(tiny_project / "out" / "topk.csv")
    assert_same_rows(rows, first)  # the redone image alone: same classes, numbers to float tolerance
    result = invoke("run", cfg, "--no-progress", "--overwrite")
    assert "explained 4, already done 0" in result.output


def test_same_config_same_numbers_and_png(tiny_project):
    cfg = tiny_project / "config.yaml"
    a, b = tiny_project / "o1", tiny_project / "o2"
    assert invoke("run", cfg, "--no-progress", "--output", a, "--set", "batch_size=7").exit_code == 0
    assert invoke("run", cfg, "--no-progress", "--output", b, "--set", "output.format=png").exit_code == 0
    ra, rb = read_csv(a / "topk.csv"), read_csv(b / "topk.csv")
    assert [r["shap_sum"] for r in ra] == [r["shap_sum"] for r in rb]
    assert (b / "overlays" / "three.bmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_limit_and_input_override(tiny_project):
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--limit", "2")
    assert result.exit_code == 0
    assert len({r["image"] for r in read_csv(tiny_project / "out" / "topk.csv")}) == 2


def test_validate_prints_resolved_config_and_count(tiny_project):
    result = invoke("validate", tiny_project / "config.yaml")
    assert result.exit_code == 0, result.output
    assert "images to process: 4" in result.output
    assert "nsamples: 16" in result.output


def test_validate_reports_missing_input_dir(tiny_project):
    result = invoke("validate", tiny_project / "config.yaml", "--set", "input.dir=nowhere")
    assert result.exit_code == 2 and "input.dir" in result.output


def test_layers_lists_dotted_names_with_shapes(tiny_project):
    result = invoke("layers", tiny_project / "config.yaml")
    assert result.exit_code == 0, result.output
    assert "6x16x16" in result.output  # output of module '0' (first conv)
    result = invoke("layers", "--arch", "torchvision:resnet18")
    assert result.exit_code == 0 and "layer4.1.conv2" in result.output


def test_label_count_mismatch_is_a_config_error(tiny_project):
    (tiny_project / "labels.txt").write_text("only\ntwo\n")
    result = invoke("run", tiny_project / "config.yaml")
    assert result.exit_code == 2 and "labels" in result.output


def test_python_dash_m_entry_point(tiny_project):
    proc = subprocess.run([sys.executable, "-m", "explain_cli", "run", str(tiny_project / "config.yaml"),
                           "--limit", "1"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tiny_project)})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # not a terminal: no tqdm bar, plain progress line
    assert "progress: 1/1 images" in proc.stderr


def test_demo_config_on_sample_images(tmp_path):
    """The README demo, end to end on the real pretrained model (fewer samples to keep CI quick)."""
    out = tmp_path / "demo"
    result = invoke("run", REPO / "configs" / "demo.yaml", "--output", out, "--no-progress", "--device", "cpu",
                    "--set", "explainer.nsamples=4")
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "topk.csv")
    top1 = {r["image"]: (int(r["class_index"]), r["class_name"]) for r in rows if r["rank"] == "1"}
    assert set(top1) == {"chelsea.jpg", "coffee.jpg", "more/rocket.jpg"}  # astronaut-02.jpg is excluded
    assert 281 <= top1["chelsea.jpg"][0] <= 285, top1  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top1["coffee.jpg"] == (967, "espresso")
    assert top1["more/rocket.jpg"][0] in (657, 744, 812), top1  # missile / projectile / space shuttle
    for image in top1:
        svg = out / "overlays" / f"{image}.svg"
        ET.parse(svg)
        assert top1[image][1] in svg.read_text()
    assert not (out / "errors.csv").exists() or read_csv(out / "errors.csv") == []


@pytest.mark.parametrize("settings", [
    {"name": "gradient", "nsamples": 8},
    {"name": "deep"},
    {"name": "partition", "mask": "blur(4,4)", "max_evals": 40, "batch_size": 10},
    {"name": "kernel", "nsamples": 40, "segments": {"n_segments": 8, "compactness": 10, "sigma": 1}},
])
def test_every_explainer_writes_the_same_outputs(tiny_project, settings):
    config = yaml.safe_load((tiny_project / "config.yaml").read_text())
    config["explainer"] = settings
    path = tiny_project / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("run", path, "--no-progress", "--set", "output.save_values=true")
    assert result.exit_code == 0, result.output
    assert "background" not in result.output.lower() or settings["name"] in ("gradient", "deep")
    rows = read_csv(tiny_project / "out" / "topk.csv")
    assert len(rows) == 4 * 2
    for row in rows:
        assert float(row["additivity_error"]) == pytest.approx(
            abs(float(row["shap_sum"]) - (float(row["output"]) - float(row["base_value"]))), abs=1e-5)
        if settings["name"] != "gradient":  # exact methods: the values add up to output - base_value
            assert float(row["additivity_error"]) <= 1e-3 * max(1.0, abs(float(row["output"])))
    for image in ("a/one.png", "a/two.jpg", "b/one.png", "three.bmp"):
        ET.parse(tiny_project / "out" / "overlays" / f"{image}.svg")
        with np.load(tiny_project / "out" / "values" / f"{image}.npz") as npz:
            assert npz["values"].shape == (2, 3, 16, 16) and npz["values"].dtype == np.float32
            assert list(npz["classes"]) == [int(r["class_index"]) for r in rows if r["image"] == image]


@pytest.mark.parametrize("name", ["partition", "kernel"])
def test_masking_explainers_refuse_a_layer_in_validate(tiny_project, name):
    config = yaml.safe_load((tiny_project / "config.yaml").read_text())
    config["explainer"] = {"name": name}
    config["model"]["layer"] = "0"
    (tiny_project / "config.yaml").write_text(yaml.safe_dump(config))
    result = invoke("validate", tiny_project / "config.yaml")
    assert result.exit_code == 2, result.output
    assert "model.layer" in result.output and "input" in result.output and "Traceback" not in result.output


def _broken_pipeline(*args, **kwargs):
    raise RuntimeError("simulated bug deep inside")


@pytest.mark.parametrize("command", ["run", "validate"])
def test_unexpected_error_traceback_only_with_v(tiny_project, monkeypatch, command):
    """README: exit 1 is 'anything unexpected (a bug: run with -v for the traceback)'."""
    import explain_cli.pipeline

    monkeypatch.setattr(explain_cli.pipeline, "run" if command == "run" else "prepare", _broken_pipeline)
    cfg = tiny_project / "config.yaml"
    extra = ["--no-progress"] if command == "run" else []
    plain = invoke(command, cfg, *extra)
    assert plain.exit_code == 1, plain.output
    assert "unexpected RuntimeError: simulated bug deep inside (run with -v for the traceback)" in plain.output
    assert "Traceback" not in plain.output
    verbose = invoke(command, cfg, *extra, "-v")
    assert verbose.exit_code == 1, verbose.output
    assert "Traceback (most recent call last)" in verbose.output and "_broken_pipeline" in verbose.output
    assert "run with -v" not in verbose.output
