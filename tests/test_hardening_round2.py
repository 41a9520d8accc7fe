"""Issue 31, the second adversarial probe of train, init and targets: a retrained explainer.pt is
refused on resume, unwritable outputs are refused before any model work, user errors are exit 2
(never 1), merge exits 3 after failed images, the explainer-switch refusal names the explainer
first, kernel's std is NaN where it cannot be estimated. Tiny model, 16 px: seconds per test."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from explain_cli.cli import app

from conftest import write_images

runner = CliRunner()

TRAIN = {"epochs": 1, "pairs": 2, "images_per_step": 4, "width": 4, "holdout": 0, "validate_nsamples": 0,
         "augment": False}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def amortized_config(project: Path, **explainer) -> Path:
    """The tiny project's config with the amortized explainer of a 2 x 2 grid (trained in ~1 s)."""
    data = yaml.safe_load((project / "config.yaml").read_text())
    data["explainer"] = {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": 2},
                         "train": dict(TRAIN), **explainer}
    data["workers"] = 0
    path = project / "amortized.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_usage_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, (word, result.output)


# -- 1. a retrained explainer.pt is not mixed into a run ----------------------------------------------

def test_a_retrained_explainer_is_refused_on_resume(tiny_project):
    cfg = amortized_config(tiny_project)
    write_images(tiny_project / "other", [f"o{i}.png" for i in range(6)], seed=5)
    assert invoke("train", cfg, "--input", tiny_project / "images").exit_code == 0
    first = invoke("run", cfg, "--no-progress", "--limit", "2")
    assert first.exit_code == 0, first.output
    fingerprint = json.loads((tiny_project / "out" / "run.json").read_text())["fingerprint"]
    assert fingerprint["explainer_checkpoint"]["sha256"]
    assert invoke("train", cfg, "--input", tiny_project / "other").exit_code == 0  # same path, other images
    again = invoke("run", cfg, "--no-progress")
    assert_usage_error(again, "explainer.checkpoint content")
    assert len((tiny_project / "out" / "topk.csv").read_text().splitlines()) == 1 + 2 * 2  # nothing added


# -- 4. outputs that cannot be written: exit 2 at once --------------------------------------------------

def test_train_output_below_a_file_or_a_folder_is_exit_2_before_the_model_is_built(tiny_project, monkeypatch):
    import explain_cli.models as models

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(models, "build_model", never)
    cfg = amortized_config(tiny_project)
    (tiny_project / "afile").write_text("x")
    assert_usage_error(invoke("train", cfg, "--output", tiny_project / "afile" / "e.pt"), "afile", "--output")
    assert_usage_error(invoke("train", cfg, "--output", tiny_project / "images"), "is a folder")
    # the default output (explainer.checkpoint) is named as such
    assert_usage_error(invoke("train", cfg, "--set", "explainer.checkpoint=afile/e.pt"), "explainer.checkpoint")


@contextlib.contextmanager
def _tmpfs(mnt, options: str):
    """A tmpfs mounted at ``mnt`` with ``options`` for the block (skips where mounting is not allowed)."""
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace')}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_train_and_init_into_a_read_only_mount_are_exit_2_naming_it(tiny_project, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as mnt:
        result = invoke("train", amortized_config(tiny_project), "--output", mnt / "sub" / "e.pt")
        assert_usage_error(result, "read-only file system", str(mnt))
        result = invoke("init", "python:tinynet:make", "-o", mnt / "c.yaml")
        assert_usage_error(result, "read-only file system", str(mnt))


# -- 5. user errors are exit 2 --------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--set", "explainer=[gradient]"], ["explainer"]),
    (["--set", "explainer=gradient"], ["explainer"]),
    (["--set", "explainer.name=[kernel]"], ["explainer.name"]),
    (["--class", "\u00b2"], ["unknown class"]),
    (["--class", "--1"], ["unknown class"]),
])
def test_odd_options_are_usage_errors(tiny_project, args, words):
    for command in ("validate", "run"):
        assert_usage_error(invoke(command, tiny_project / "config.yaml", *args), *words)
    assert not (tiny_project / "out").exists()


def test_train_with_a_one_patch_grid_is_exit_2(tiny_project):
    result = invoke("train", amortized_config(tiny_project), "--set", "explainer.segments.grid=1",
                    "--output", tiny_project / "e.pt")
    assert_usage_error(result, "explainer.segments.grid")
    assert not (tiny_project / "e.pt").exists()


@pytest.mark.parametrize("forge", [
    lambda fp: fp.update(settings=["a"]),
    lambda fp: fp.update(labels="abc"),
    lambda fp: fp.update(checkpoint={"sha256": 5}),
    lambda fp: fp.update(model_code=["x.py"]),
    lambda fp: fp.update(targets="top_k"),
    lambda fp: fp.update(truth_csv=[1]),
])
def test_a_run_json_with_a_malformed_fingerprint_is_refused_with_exit_2(tiny_project, forge):
    cfg = tiny_project / "config.yaml"
    assert invoke("run", cfg, "--no-progress", "--limit", "1").exit_code == 0
    run_json = tiny_project / "out" / "run.json"
    info = json.loads(run_json.read_text())
    forge(info["fingerprint"])
    run_json.write_text(json.dumps(info))
    assert_usage_error(invoke("run", cfg, "--no-progress"), "run.json is malformed", "--overwrite")
    assert invoke("run", cfg, "--no-progress", "--overwrite").exit_code == 0  # the way out works


@pytest.fixture
def trained(tiny_project):
    cfg = amortized_config(tiny_project)
    result = invoke("train", cfg)
    assert result.exit_code == 0, result.output
    return tiny_project, cfg


def _forged_explainers(data: dict) -> list[tuple[str, object]]:
    def without(key):
        return {k: v for k, v in data.items() if k != key}

    state = dict(data["state_dict"])
    name = next(iter(state))
    wrong_shape = {**data, "state_dict": {**state, name: torch.zeros(3, 2)}}
    extra = {**data, "state_dict": {**state, "extra.weight": torch.zeros(1)}}
    return [("a list", [data]), ("no players", without("players")), ("no state_dict", without("state_dict")),
            ("no network", without("network")), ("wrong shape", wrong_shape), ("extra tensor", extra),
            ("grid a string", {**data, "players": {"grid": "2"}}),
            ("huge network", {**data, "network": {**data["network"], "width": 10 ** 9}}),
            ("fill a dict", {**data, "fill": {"a": 1}}),
            ("outputs a bool", {**data, "model": {**data["model"], "outputs": True}})]


def test_forged_explainer_files_are_exit_2_for_validate_and_run(trained):
    project, cfg = trained
    path = project / "explainer.pt"
    data = torch.load(path, weights_only=True)
    for what, forged in _forged_explainers(data):
        torch.save(forged, path)
        for command in ("validate", "run"):
            result = invoke(command, cfg, "--no-progress") if command == "run" else invoke(command, cfg)
            assert result.exit_code == 2, (what, command, result.output)
            assert "explainer.checkpoint" in result.output and "unexpected" not in result.output, (what, result.output)
    assert not (project / "out" / "topk.csv").exists()


def test_forged_training_states_are_exit_2(trained, monkeypatch):
    """A `.train` file with the right signature but a missing key, a wrong tensor shape or wrong
    types: exit 2 saying to --restart, and --restart then trains."""
    import explain_cli.train as train_module

    project, cfg = trained
    real_save = train_module._save_atomic

    def stop_before_the_explainer(obj, path):
        if "format" in obj:  # the final explainer.pt: leave the .train state behind
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(train_module, "_save_atomic", stop_before_the_explainer)
    out = project / "e.pt"
    assert invoke("train", cfg, "--output", out).exit_code == 130
    monkeypatch.setattr(train_module, "_save_atomic", real_save)
    state_path = project / "e.pt.train"
    state = torch.load(state_path, weights_only=True)
    net = dict(state["net"])
    name = next(iter(net))
    forged = [{k: v for k, v in state.items() if k != "net"}, {k: v for k, v in state.items() if k != "epoch"},
              {**state, "net": {**net, name: torch.zeros(7)}}, {**state, "epoch": "1"}, {**state, "history": 3},
              {**state, "optimiser": []}, {**state, "seconds": None}, [state], {**state, "signature": torch.zeros(2)}]
    for i, bad in enumerate(forged):
        torch.save(bad, state_path)
        result = invoke("train", cfg, "--output", out)
        assert_usage_error(result, "--restart")
        assert not out.exists(), i
    assert invoke("train", cfg, "--output", out, "--restart").exit_code == 0
    assert out.exists() and not state_path.exists()


# -- 6. merge, the explainer-switch refusal, kernel's std ----------------------------------------------

def test_merge_exits_3_when_shards_had_failed_images(tiny_project):
    (tiny_project / "images" / "bad.png").write_bytes(b"not an image")
    cfg = tiny_project / "config.yaml"
    codes = [invoke("run", cfg, "--no-progress", "--shard", f"{i}/2").exit_code for i in range(2)]
    assert sorted(codes) == [0, 3]
    result = invoke("merge", tiny_project / "out")
    assert result.exit_code == 3, result.output
    assert "1 failed" in result.output
    assert (tiny_project / "out" / "errors.csv").read_text().count("bad.png") == 1


def test_the_explainer_switch_refusal_names_the_explainer_first(tiny_project):
    cfg = tiny_project / "config.yaml"
    assert invoke("run", cfg, "--no-progress", "--limit", "1", "--set", "explainer.nsamples=4").exit_code == 0
    result = invoke("run", cfg, "--no-progress", "--explainer", "kernel", "--set", "explainer.nsamples=8")
    assert_usage_error(result, "explainer.name: 'gradient' -> 'kernel'")
    shown = result.output.split("different settings (", 1)[1]
    assert shown.startswith("explainer.name") and "(unset)" not in shown, result.output


def test_kernel_std_is_nan_where_too_few_coalitions_were_drawn():
    from explain_cli.explainers import kernel
    from explain_cli.explainers.base import ExplainContext

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 16, 16)

    def explain(nsamples: int, grid: int = 4):
        context = ExplainContext(model=model, layer=None, layer_name="input", background=x[:0],
                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=torch.device("cpu"),
                                 batch_size=64, settings=kernel.Settings(segments={"grid": grid}, nsamples=nsamples))
        return kernel.Explainer(context).explain(x, 1, [0])

    for nsamples in (1, 2, 3, 8):  # one unit, one pair, or fewer draws than the 15 free values
        assert np.isnan(explain(nsamples).value_std).all(), nsamples
    assert np.all(explain(14, grid=2).value_std == 0)  # 2 x 2: every coalition enumerated, exact
    estimated = explain(200).value_std
    assert np.isfinite(estimated).all() and (estimated > 0).any()


def test_merge_and_report_in_a_read_only_folder_are_exit_2_naming_it(tiny_project, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=16m") as mnt:
        cfg = tiny_project / "config.yaml"
        for i in range(2):
            assert invoke("run", cfg, "--no-progress", "--output", mnt / "out", "--shard", f"{i}/2").exit_code == 0
        assert invoke("run", cfg, "--no-progress", "--output", mnt / "whole").exit_code == 0
        (mnt / "whole" / "report.html").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert_usage_error(invoke("merge", mnt / "out"), "read-only file system", str(mnt / "out"))
        assert_usage_error(invoke("report", mnt / "whole"), "read-only file system", str(mnt / "whole"))


def test_train_refuses_to_overwrite_the_model_checkpoint_or_the_config(tiny_project):
    cfg = amortized_config(tiny_project)
    weights = (tiny_project / "tiny.pt").read_bytes()
    assert_usage_error(invoke("train", cfg, "--output", tiny_project / "tiny.pt"), "model.checkpoint")
    assert_usage_error(invoke("train", cfg, "--output", cfg), "the config file")
    assert (tiny_project / "tiny.pt").read_bytes() == weights


def test_a_retrained_explainer_with_its_old_mtime_restored_is_still_refused(tiny_project):
    """The digest is reused only when size, mtime and ctime match: `touch -r` cannot hide a rewrite."""
    import os
    import zipfile

    cfg = amortized_config(tiny_project)
    assert invoke("train", cfg).exit_code == 0
    path = tiny_project / "explainer.pt"
    assert invoke("run", cfg, "--no-progress", "--limit", "1").exit_code == 0
    st = path.stat()
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:  # a tensor's bytes, changed in place: same size
        entry = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 4)
    start = entry.header_offset + 30 + int.from_bytes(raw[entry.header_offset + 26:entry.header_offset + 28], "little") \
        + int.from_bytes(raw[entry.header_offset + 28:entry.header_offset + 30], "little")
    raw[start:start + 4] = bytes(b ^ 0x55 for b in raw[start:start + 4])
    path.write_bytes(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert_usage_error(invoke("run", cfg, "--no-progress"), "explainer.checkpoint content")


def test_train_refuses_a_too_long_name_and_a_state_path_that_is_a_folder_at_once(tiny_project, monkeypatch):
    import explain_cli.models as models

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(models, "build_model", never)
    cfg = amortized_config(tiny_project)
    assert_usage_error(invoke("train", cfg, "--output", tiny_project / ("x" * 250 + ".pt")), "too long")
    assert_usage_error(invoke("train", cfg, "--output", tiny_project / "new" / ("x" * 250 + ".pt")), "too long")
    (tiny_project / "e.pt.train").mkdir()
    assert_usage_error(invoke("train", cfg, "--output", tiny_project / "e.pt"), "is a folder")
    assert sorted(p.name for p in tiny_project.iterdir() if p.name.startswith(".")) == []


def test_path_arguments_the_system_cannot_look_up_are_exit_2_for_every_command(tiny_project):
    long = tiny_project / ("x" * 300)
    (tiny_project / "loop1").symlink_to(tiny_project / "loop2")
    (tiny_project / "loop2").symlink_to(tiny_project / "loop1")
    cfg = tiny_project / "config.yaml"
    for bad in (long, tiny_project / "loop1"):
        for args, name in ((["run", bad], "CONFIG"), (["validate", bad], "CONFIG"), (["layers", bad], "CONFIG"),
                           (["train", bad], "CONFIG"), (["merge", bad], "OUTPUT_DIR"), (["report", bad], "OUTPUT_DIR"),
                           (["run", cfg, "--input", bad], "--input"), (["run", cfg, "--output", bad / "o"], "--output"),
                           (["validate", cfg, "--input", bad], "--input"), (["init", bad, "--arch", "x:y"], "MODEL"),
                           (["init", "python:tinynet:make", "--input", bad], "--input")):
            assert_usage_error(invoke(*args), name)


def test_config_paths_the_system_cannot_look_up_are_exit_2_naming_the_key(tiny_project):
    long = "x" * 300
    cfg = tiny_project / "config.yaml"
    for key, value in (("input.dir", long), ("labels", long), ("model.checkpoint", long), ("background", f"{{dir: {long}}}"),
                       ("targets.from_csv", f"{{path: {long}}}"), ("output.dir", f"{long}/o")):
        name = "background.dir" if key == "background" else "targets.from_csv.path" if key == "targets.from_csv" else key
        for command in ("validate", "run", "layers"):
            if command == "layers":
                data = yaml.safe_load(cfg.read_text())
                section, _, leaf = key.rpartition(".")
                (data.setdefault(section, {}) if section else data)[leaf] = yaml.safe_load(value)
                other = tiny_project / "layers.yaml"
                other.write_text(yaml.safe_dump(data))
                result = invoke("layers", other)
            else:
                result = invoke(command, cfg, "--set", f"{key}={value}")
            assert_usage_error(result, name)


def test_a_run_json_from_before_targets_negative_and_threshold_resumes():
    from explain_cli import resume

    old = {"settings": {"explainer.name": "gradient", "seed": 0}}
    new = {"settings": {**old["settings"], "targets.negative": None, "targets.threshold": 0.5}}
    assert resume.differences(old, new) == []
    assert resume.differences(old, {"settings": {**new["settings"], "targets.threshold": 0.7}}) == [
        "targets.threshold: '(unset)' -> 0.7"]
