"""Issue 22, a researcher's first hour: switching explainers from the command line, run history in
run.json, counts of skipped images, and the superpixel count of kernel."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.config import load_config
from explain_cli.errors import ConfigError
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- item 3: --explainer / --set explainer.name= ------------------------------------------------

def test_switching_explainer_drops_the_keys_the_new_one_lacks(caplog):
    with caplog.at_level(logging.INFO, logger="explain_cli"):
        cfg = load_config(DEMO, ["explainer.name=deep"])
    assert cfg.explainer_settings.name == "deep" and "nsamples" not in cfg.explainer
    assert "dropped the explainer.nsamples key" in caplog.text
    # a key the new explainer has is kept (kernel has nsamples too)
    cfg = load_config(DEMO, [], {"explainer.name": "kernel"})
    demo_nsamples = yaml.safe_load(DEMO.read_text())["explainer"]["nsamples"]
    assert cfg.explainer_settings.name == "kernel" and cfg.explainer_settings.nsamples == demo_nsamples


def test_a_key_of_another_explainer_is_named_as_such_not_a_look_alike(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["explainer.name=deep", "explainer.nsamples=3"])  # given on purpose: kept
    assert info.value.key == "explainer.nsamples"
    assert "gradient and kernel explainers, not of deep" in info.value.message
    assert "did you mean" not in info.value.message
    data = yaml.safe_load(DEMO.read_text())
    data["explainer"] = {"name": "deep", "nsamples": 8}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="explainer.nsamples: a key of the gradient and kernel explainers"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="unknown key"):  # a plain typo still gets its hint
        load_config(DEMO, ["explainer.nsampels=3"])


def test_explainer_option_on_validate_and_run(tiny_project):
    result = invoke("validate", tiny_project / "config.yaml", "--explainer", "deep")
    assert result.exit_code == 0, result.output
    assert "name: deep" in result.output and "nsamples" not in result.output.split("explainer:")[1].split("output:")[0]
    result = invoke("run", tiny_project / "config.yaml", "--explainer", "partition", "--set",
                    "explainer.max_evals=20", "--no-progress", "--limit", "1")
    assert result.exit_code == 0, result.output
    info = json.loads((tiny_project / "out" / "run.json").read_text())
    assert info["config"]["explainer"]["name"] == "partition" and info["config"]["explainer"]["max_evals"] == 20
    result = invoke("run", tiny_project / "config.yaml", "--explainer", "shapley", "--no-progress")
    assert result.exit_code == 2 and "unknown explainer 'shapley'" in result.output


# --- item 4: layers shows what is explained ----------------------------------------------------

def test_layer_table_shows_the_explained_input_its_map_and_what_cannot_be_explained():
    import timm
    import torch
    import torchvision

    from explain_cli.models import layer_table

    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    model.unused = torch.nn.Conv2d(3, 3, 1)
    rows = {r.name: r for r in layer_table(model, 64)}
    assert rows["input"].input_shape == (1, 3, 64, 64) and rows["input"].map_size == (64, 64)
    # conv1 explains the pixels it takes (a map at pixels), not its 64x32x32 output
    assert rows["conv1"].input_shape == (1, 3, 64, 64) and rows["conv1"].output_shape == (1, 64, 32, 32)
    assert rows["conv1"].map_size == (64, 64) and rows["conv1"].problem is None
    assert rows["layer4"].input_shape == (1, 256, 4, 4) and rows["layer4"].map_size == (4, 4)
    assert rows["fc"].map_size is None and "2-D" in rows["fc"].problem
    assert rows["unused"].problem == "not called in the forward pass"

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=3).eval()
    rows = {r.name: r for r in layer_table(vit, 32)}
    assert rows["blocks.1"].input_shape == (1, 17, 192) and rows["blocks.1"].map_size == (4, 4)


def test_layers_command_prints_the_table(tiny_project):
    result = invoke("layers", tiny_project / "config.yaml")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["layer", "type", "explained", "(input)", "map", "output"]
    row = next(line for line in lines if line.startswith("2 "))  # the second conv: takes 6x16x16
    assert row.split()[:5] == ["2", "Conv2d", "6x16x16", "16x16", "8x16x16"]
    row = next(line for line in lines if line.startswith("6 "))  # the Linear head
    assert "cannot be explained: takes a 2-D tensor" in row


# --- item 6: every run keeps its record ---------------------------------------------------------

def _info(out):
    return json.loads((out / "run.json").read_text())


def test_run_json_keeps_every_runs_record_newest_last(tiny_project):
    cfg, out = tiny_project / "config.yaml", tiny_project / "out"
    assert invoke("run", cfg, "--no-progress", "--limit", "2").exit_code == 0
    first = _info(out)["runs"]
    assert len(first) == 1 and first[0]["status"] == "complete" and first[0]["exit_code"] == 0
    assert first[0]["counts"]["explained"] == 2 and first[0]["host"] and first[0]["shard"] is None
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    assert invoke("run", cfg, "--no-progress").exit_code == 0  # a no-op rerun
    runs = _info(out)["runs"]
    assert len(runs) == 3 and runs[0] == first[0]  # earlier records are kept as they were
    assert [(r["counts"]["explained"], r["counts"]["already_done"]) for r in runs] == [(2, 0), (2, 2), (0, 4)]
    assert runs[0]["started"] <= runs[1]["started"] <= runs[2]["started"]
    html = (out / "report.html").read_text()
    assert "Runs into this folder" in html and "the last of 3 runs" in html

    (tiny_project / "images" / "broken.png").write_bytes(b"not an image")
    assert invoke("run", cfg, "--no-progress").exit_code == 3
    assert _info(out)["runs"][-1]["exit_code"] == 3 and len(_info(out)["runs"]) == 4

    sharded = tiny_project / "sharded"
    # sorted: a/one, a/two, b/one, broken, three: shard 1 of 2 takes images 1 and 3, so broken.png
    assert invoke("run", cfg, "--no-progress", "--output", sharded, "--shard", "1/2").exit_code == 3
    info = json.loads((sharded / "run.shard-1-of-2.json").read_text())
    assert info["runs"][-1]["shard"] == "1/2"
    assert invoke("run", cfg, "--no-progress", "--output", sharded, "--shard", "0/2").exit_code == 0
    assert invoke("merge", sharded).exit_code == 3  # broken.png failed, as in the unsharded run
    assert sorted(r["shard"] for r in _info(sharded)["runs"]) == ["0/2", "1/2"]  # the merge keeps them


def test_a_run_json_from_before_records_becomes_the_first_record(tiny_project):
    cfg, out = tiny_project / "config.yaml", tiny_project / "out"
    assert invoke("run", cfg, "--no-progress", "--limit", "1").exit_code == 0
    old = _info(out)
    del old["runs"]
    (out / "run.json").write_text(json.dumps(old))
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    runs = _info(out)["runs"]
    assert len(runs) == 2 and runs[0]["started"] == old["started"] and runs[0]["counts"]["explained"] == 1


# --- item 7: counts users need ------------------------------------------------------------------

def test_images_skipped_by_exclude_are_counted_everywhere(tiny_project):
    cfg, out = tiny_project / "config.yaml", tiny_project / "out"
    (tiny_project / "images" / "a" / "other+02.png").write_bytes((tiny_project / "images" / "a" / "one.png").read_bytes())
    (tiny_project / "images" / "notes.txt").write_text("not an image")
    result = invoke("validate", cfg, "--set", "input.exclude=['*-02*', '*+02*']")
    assert result.exit_code == 0 and "; 2 more skipped by input.exclude)" in result.output
    result = invoke("run", cfg, "--no-progress", "--set", "input.exclude=['*-02*', '*+02*']")
    assert result.exit_code == 0, result.output
    assert "of 4 images (2 more skipped by input.exclude)" in result.output
    counts = _info(out)["counts"]
    assert counts["excluded"] == 2 and counts["not_included"] == 1 and counts["selected"] == 4
    assert "2 skipped by input.exclude" in (out / "report.html").read_text()


def test_kernel_values_file_has_the_superpixels_it_used(tiny_project):
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--explainer", "kernel", "--limit", "2",
                    "--set", "explainer.nsamples=30", "--set", "explainer.segments.n_segments=12",
                    "--set", "output.save_values=true")
    assert result.exit_code == 0, result.output
    for path in sorted((tiny_project / "out" / "values").rglob("*.npz"))[:2]:
        data = np.load(path)
        segments = data["segments"]
        assert segments.shape == data["values"].shape[-2:]
        assert int(data["superpixels"]) == len(np.unique(segments)) >= 2
        assert data["std"].shape == (data["values"].shape[0],) + segments.shape  # Covert & Lee's std, per class
        assert data["std"].min() >= 0 and data["std"].max() > 0
        for label in np.unique(segments):  # the map is one value per superpixel, and so is its std
            cell = data["values"][0].sum(0)[segments == label]
            assert np.allclose(cell, cell[0], atol=1e-6)
            assert np.all(data["std"][0][segments == label] == data["std"][0][segments == label][0])
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--limit", "1", "--output",
                    tiny_project / "grad", "--set", "output.save_values=true")
    assert result.exit_code == 0
    data = np.load(next((tiny_project / "grad" / "values").rglob("*.npz")))
    assert "superpixels" not in data.files and "std" not in data.files  # gradient has no superpixels


# --- item 10: the config reference (docs/config-reference.md) shows the defaults ---------------------------------

def _flat(data, prefix=""):
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def test_readme_config_reference_shows_the_defaults(tmp_path):
    import re

    from explain_cli.config import resolved_dict

    text = (REPO / "docs" / "config-reference.md").read_text()
    block = re.search(r"# Config reference.*?```yaml\n(.*?)```", text, re.S).group(1)
    shown = _flat(yaml.safe_load(block))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"arch": "python:m:f"}, "input": {"dir": "."}}))
    defaults = _flat(resolved_dict(load_config(tmp_path / "c.yaml")))
    required = {"model.arch", "input.dir"}  # no default: the reference shows an example
    compared = [k for k in shown if k in defaults and k not in required]
    assert len(compared) >= 30 and "input.exclude" in compared and "model.weights" in compared
    wrong = {k: (shown[k], defaults[k]) for k in compared if shown[k] != defaults[k]
             and not (isinstance(shown[k], str) and shown[k].rstrip("/") == defaults[k])}
    assert not wrong, wrong


def test_folders_written_before_the_new_keys_still_resume(tiny_project):
    """model.weights (implied by the checkpoint), output.style and output.caption change no number:
    a folder whose run.json predates them, or a rerun with another style, resumes."""
    cfg, out = tiny_project / "config.yaml", tiny_project / "out"
    assert invoke("run", cfg, "--no-progress", "--limit", "2").exit_code == 0
    settings = _info(out)["fingerprint"]["settings"]
    assert not {"model.weights", "output.style", "output.caption"} & set(settings)  # as in older run.json
    assert "explainer.nsamples" in settings
    result = invoke("run", cfg, "--no-progress", "--set", "output.style=heat")
    assert result.exit_code == 0, result.output
    assert "explained 2, already done 2" in result.output
    result = invoke("run", cfg, "--no-progress", "--set", "explainer.nsamples=8")  # a result-affecting key
    assert result.exit_code == 2 and "explainer.nsamples" in result.output


@pytest.mark.slow
def test_ci_smoke_recipe_of_the_docs_is_quiet_and_checks_the_top_class(tmp_path):
    """The CI smoke recipe of docs/first-hour.md, run as written (explain-cli from this venv): exit 0
    and nothing on stderr under -q; its checks fail when the top class is not the demo's."""
    import os
    import re
    import subprocess
    import sys

    from tests.conftest import REPO

    text = (REPO / "docs" / "first-hour.md").read_text()
    section = text[text.index("## CI smoke run"):]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
    out = next(p for p in tmp_path.iterdir() if p.is_dir())
    check = next(line for line in script.splitlines() if line.startswith("grep"))
    assert subprocess.run(["bash", "-c", check], cwd=REPO, env={**env, "out": str(out)}).returncode == 0
    wrong = check.replace("Egyptian cat", "tabby")  # the check is real: another top class fails it
    assert subprocess.run(["bash", "-c", wrong], cwd=REPO, env={**env, "out": str(out)}).returncode != 0
