"""The 15 failures of the adversarial probe (issue 18): results that were silently wrong or
missing, crashes and wrong exit codes, unclear messages, and a decode that hangs. Each test
reproduces one case with a tiny model and 24 px images."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, TINY_MODEL, gated_env, wait_for_gate, write_images
from explain_cli import stages
from explain_cli.cli import app
from explain_cli.config import load_config, parse_override
from explain_cli.errors import ConfigError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))[1:]


def images(path: Path) -> set[str]:
    return {r[0] for r in rows(path)}


def edit_config(project: Path, **sections) -> Path:
    cfg = yaml.safe_load((project / "config.yaml").read_text())
    for key, value in sections.items():
        cfg[key] = value
    path = project / "edited.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env_for(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(project), str(REPO)]), MPLBACKEND="Agg")
    return env


# --- 1. a python: factory's code is part of the resume fingerprint ----------------------------

def test_editing_a_checkpointless_factory_or_a_module_it_imports_refuses_the_resume(tiny_project):
    (tiny_project / "probe_blocks.py").write_text("WIDTH = 6\n")
    (tiny_project / "probe_net.py").write_text(TINY_MODEL.replace("import torch\n", "import torch\nimport probe_blocks\n", 1))
    for name in ("probe_net", "probe_blocks"):
        sys.modules.pop(name, None)
    model = {"arch": "python:probe_net:make", "num_classes": 3, "layer": "input"}  # no checkpoint
    cfg = edit_config(tiny_project, model=model)
    out = tiny_project / "out"
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    before = (out / "topk.csv").read_bytes()
    code = json.loads((out / "run.json").read_text())["fingerprint"]["model_code"]
    assert {"probe_net.py", "probe_blocks.py"} <= {Path(p).name for p in code}  # (+ tinynet.py, loaded here by the fixture)
    again = invoke("run", cfg, "--no-progress")
    assert again.exit_code == 0 and "already done 4" in again.output  # unchanged code resumes

    source = (tiny_project / "probe_net.py").read_text()
    (tiny_project / "probe_net.py").write_text(source.replace("manual_seed(0)", "manual_seed(1)"))
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 2, result.output
    assert "model code changed (probe_net.py)" in result.output and "--overwrite" in result.output
    assert (out / "topk.csv").read_bytes() == before  # nothing mixed in
    (tiny_project / "probe_net.py").write_text(source)

    (tiny_project / "probe_blocks.py").write_text("WIDTH = 7\n")
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 2 and "model code changed (probe_blocks.py)" in result.output, result.output
    assert invoke("run", cfg, "--no-progress", "--overwrite").exit_code == 0


# --- 2. walk errors are errors.csv rows -------------------------------------------------------

def _deep_folder(root: Path, levels: int = 18) -> str:
    """A chain of folders whose full path is longer than PATH_MAX (made with dir_fd), with an
    image at the bottom; returns the relative path of the first level that cannot be listed."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    parts = []
    try:
        for i in range(levels):
            name = f"{i:02d}" + "d" * 240
            os.mkdir(name, dir_fd=fd)
            parts.append(name)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        img = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(img, b"never listed")
        os.close(img)
    finally:
        os.close(fd)
    length = len(os.fsencode(root))
    for i, name in enumerate(parts):
        length += 1 + len(name)
        if length >= 4096:
            return "/".join(parts[:i + 1])
    raise AssertionError("not deep enough")


def test_unlistable_folders_and_unstatable_files_become_error_rows(tiny_project):
    unreadable = _deep_folder(tiny_project / "images" / "deep")
    os.symlink("loop.png", tiny_project / "images" / "loop.png")  # stat: too many levels of symlinks
    out = tiny_project / "out"
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 3, result.output
    errors = dict(rows(out / "errors.csv"))
    assert set(errors) == {"loop.png", "deep/" + unreadable}, errors
    assert "symbolic links" in errors["loop.png"]
    assert "File name too long" in errors["deep/" + unreadable]
    assert images(out / "topk.csv") == {"a/one.png", "a/two.jpg", "b/one.png", "three.bmp"}
    assert "failed 2 of 6" in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["failed"] == 2
    # a rerun reports them again, once
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 3 and sorted(dict(rows(out / "errors.csv"))) == sorted(errors)
    assert len(rows(out / "errors.csv")) == 2
    # shards: reported by shard 0 only, and the merge accepts them
    sharded = tiny_project / "sharded"
    for i in range(2):
        invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", sharded, "--shard", f"{i}/2")
    assert len(rows(sharded / "errors.shard-0-of-2.csv")) == 2 and not rows(sharded / "errors.shard-1-of-2.csv")
    merged = invoke("merge", sharded)
    assert merged.exit_code == 3, merged.output  # failed images: 3, as the runs said (issue 31)
    assert sorted(dict(rows(sharded / "errors.csv"))) == sorted(errors)


# --- 3. no run.json, no resume ----------------------------------------------------------------

def test_outputs_without_run_json_are_refused_unless_overwrite(tiny_project):
    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    before = (out / "topk.csv").read_bytes()
    (out / "run.json").unlink()
    result = invoke("run", cfg, "--no-progress", "--set", "output.top_k=3")
    assert result.exit_code == 2, result.output
    assert "run.json is missing or unreadable" in result.output and "--overwrite" in result.output
    assert (out / "topk.csv").read_bytes() == before
    (out / "run.json").write_text("{not json")
    assert invoke("run", cfg, "--no-progress").exit_code == 2
    result = invoke("run", cfg, "--no-progress", "--set", "output.top_k=3", "--overwrite")
    assert result.exit_code == 0, result.output
    assert {r[1] for r in rows(out / "topk.csv")} == {"1", "2", "3"} and len(rows(out / "topk.csv")) == 12


# --- 4. errors.csv after a rerun --------------------------------------------------------------

def test_errors_csv_lists_exactly_the_images_that_still_fail(tiny_project):
    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    for name in ("bad1.png", "bad2.png", "bad3.png"):
        (tiny_project / "images" / name).write_bytes(b"not an image")
    assert invoke("run", cfg, "--no-progress").exit_code == 3
    assert images(out / "errors.csv") == {"bad1.png", "bad2.png", "bad3.png"}
    (tiny_project / "images" / "bad1.png").unlink()                              # removed
    write_images(tiny_project / "images", ["bad2.png"], seed=3)                 # fixed
    result = invoke("run", cfg, "--no-progress", "--set", "input.exclude=['*-02*', 'bad3*']")  # excluded
    assert result.exit_code == 0, result.output
    assert images(out / "errors.csv") == set()
    assert "bad2.png" in images(out / "topk.csv")
    # an image this run did not select (--limit) keeps its row: it was not retried
    (tiny_project / "images" / "zzz-bad.png").write_bytes(b"broken")
    assert invoke("run", cfg, "--no-progress").exit_code == 3
    assert images(out / "errors.csv") == {"bad3.png", "zzz-bad.png"}
    assert invoke("run", cfg, "--no-progress", "--limit", "2").exit_code == 0
    assert images(out / "errors.csv") == {"bad3.png", "zzz-bad.png"}


# --- 5. --overwrite removes overlays of the other format --------------------------------------

def test_overwrite_after_switching_format_leaves_no_stale_overlays(tiny_project):
    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    assert len(list((out / "overlays").rglob("*.svg"))) == 4
    (out / "overlays" / "unrelated.svg").write_text("<svg/>")  # not an overlay of this input: kept
    result = invoke("run", cfg, "--no-progress", "--overwrite", "--set", "output.format=png")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "overlays").rglob("*.svg")) == ["unrelated.svg"]
    assert len(list((out / "overlays").rglob("*.png"))) == 4


# --- 6. an earlier run inside the input folder ------------------------------------------------

def test_a_folder_holding_an_explain_cli_run_is_not_input(tiny_project):
    cfg = tiny_project / "config.yaml"
    first = invoke("run", cfg, "--no-progress", "--output", tiny_project / "images" / "prev",
                   "--set", "output.format=png")
    assert first.exit_code == 0, first.output
    assert len(list((tiny_project / "images" / "prev" / "overlays").rglob("*.png"))) == 4
    (tiny_project / "images" / "prev" / "notes.png").write_bytes(b"")  # anything in that folder is skipped
    result = invoke("run", cfg, "--no-progress", "--output", tiny_project / "out2")
    assert result.exit_code == 0, result.output
    assert images(tiny_project / "out2" / "topk.csv") == {"a/one.png", "a/two.jpg", "b/one.png", "three.bmp"}
    assert "skipping" in result.output and "prev" in result.output and "run.json" in result.output
    # a folder with a run.json that is not explain-cli's is walked as usual
    write_images(tiny_project / "images" / "other", ["x.png"])
    (tiny_project / "images" / "other" / "run.json").write_text('{"epochs": 3}')
    result = invoke("run", cfg, "--no-progress", "--output", tiny_project / "out3")
    assert "other/x.png" in images(tiny_project / "out3" / "topk.csv")


# --- 7. --log-file on a full device -----------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_log_file_on_a_full_device_exits_1_with_a_clear_message(tiny_project):
    proc = subprocess.run([sys.executable, "-m", "explain_cli", "run", str(tiny_project / "config.yaml"),
                           "--no-progress", "--log-file", "/dev/full"], env=env_for(tiny_project),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "cannot write the log file /dev/full: No space left on device" in proc.stderr
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("cannot write the log file") == 2  # once when it happens, once at the end
    assert images(tiny_project / "out" / "topk.csv") == {"a/one.png", "a/two.jpg", "b/one.png", "three.bmp"}


# --- 8. output paths of the wrong kind --------------------------------------------------------

@pytest.mark.parametrize("what", ["topk.csv", "errors.csv", "run.json", "overlays"])
def test_output_paths_of_the_wrong_kind_exit_2_before_any_work(tiny_project, what):
    out = tiny_project / "out"
    out.mkdir()
    path = out / what
    if what == "overlays":
        path.write_text("a file")
    else:
        path.mkdir()
    for command in ("run", "validate"):
        result = invoke(command, tiny_project / "config.yaml", *(["--no-progress"] if command == "run" else []))
        assert result.exit_code == 2, result.output
        assert str(path) in result.output and "output.dir" in result.output
        assert "unexpected" not in result.output
    assert sorted(p.name for p in out.iterdir()) == [what]  # nothing written


# --- 9. SIGHUP --------------------------------------------------------------------------------

def test_sighup_stops_like_sigterm_and_the_run_resumes(tiny_project):
    write_images(tiny_project / "images", [f"many/im{i:02d}.png" for i in range(24)], seed=1)
    out = tiny_project / "out"
    gate, hold = gated_env(tiny_project, out / "topk.csv")  # held mid-run: the signal cannot come too late
    proc = subprocess.Popen([sys.executable, "-m", "explain_cli", "run", str(tiny_project / "config.yaml"),
                             "--output", str(out), "--workers", "0", "--no-progress"],
                            env={**env_for(tiny_project), **gate}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_gate(proc, hold)
    proc.send_signal(signal.SIGHUP)
    hold.unlink()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 129, stderr
    assert "SIGHUP received: finishing the current model call" in stderr and "stopped by SIGHUP" in stderr
    assert "Traceback" not in stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted_by"] == "SIGHUP"
    done = images(out / "topk.csv")
    assert 0 < len(done) < 28
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out)
    assert result.exit_code == 0 and f"already done {len(done)}" in result.output, result.output
    assert len(images(out / "topk.csv")) == 28


# --- 10. sharded and unsharded runs into one folder -------------------------------------------

HANG_SCRIPT = textwrap.dedent('''
    import sys, threading
    from explain_cli import stages
    from explain_cli.cli import main

    real = stages.decode_one
    def decode_one(input_dir, rel, preprocess):
        if rel.startswith("zz"):
            threading.Event().wait()   # holds the run (and its lock) until it is killed
        return real(input_dir, rel, preprocess)
    stages.decode_one = decode_one
    sys.argv = ["explain-cli"] + sys.argv[1:]
    main()
''')


def _hold(project: Path, out: Path, *extra: str) -> subprocess.Popen:
    script = project / "hold_run.py"
    script.write_text(HANG_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), "run", str(project / "config.yaml"), "--no-progress",
                             "--output", str(out), "--set", "background.from_input=2", *extra],
                            env=env_for(project), stderr=subprocess.PIPE, text=True)
    run_json = out / ("run.shard-0-of-2.json" if extra else "run.json")
    deadline = time.monotonic() + 120
    while not run_json.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    return proc


def test_an_unsharded_run_and_a_shard_run_never_share_a_folder(tiny_project):
    write_images(tiny_project / "images", ["zz-hold.png"])  # shard 0/2 of 5 images includes it
    out = tiny_project / "out"
    proc = _hold(tiny_project, out, "--shard", "0/2")
    try:
        result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out)
        assert result.exit_code == 2, result.output
        assert f"shard 0/2 (pid {proc.pid})" in result.output and "sharded and unsharded" in result.output
        other = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out, "--shard", "1/2")
        assert other.exit_code == 0, other.output  # another shard is fine
    finally:
        proc.kill()
        proc.wait()
    out2 = tiny_project / "out2"
    proc = _hold(tiny_project, out2)
    try:
        result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out2, "--shard", "1/2")
        assert result.exit_code == 2, result.output
        assert f"an unsharded run or a merge (pid {proc.pid})" in result.output
    finally:
        proc.kill()
        proc.wait()


# --- 11-14. messages ---------------------------------------------------------------------------

def _config_error(path: Path, text: str | bytes, overrides=()) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_a_top_level_typo_is_named_first_with_a_suggestion(tmp_path):
    message = _config_error(tmp_path / "c.yaml", "modle:\n  arch: torchvision:resnet18\ninput: {dir: x}\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}: modle: unknown key (did you mean 'model'?)"), message


def test_nothing_selected_exits_4_naming_folder_and_patterns(tiny_project):
    cfg = tiny_project / "config.yaml"
    (tiny_project / "empty").mkdir()
    for extra in (["--input", tiny_project / "empty"], ["--set", "input.include=['*.gif']"],
                  ["--set", "input.exclude=['*']"]):
        for command in ("run", "validate"):
            result = invoke(command, cfg, *extra)
            assert result.exit_code == 4, (extra, result.output)
            assert "nothing selected" in result.output and "input.include" in result.output, result.output
    result = invoke("run", cfg, "--no-progress", "--set", "input.include=['*.gif']")
    assert str(tiny_project / "images") in result.output and "'*.gif'" in result.output
    assert not (tiny_project / "out").exists()
    # everything already done is not "nothing selected"
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    again = invoke("run", cfg, "--no-progress")
    assert again.exit_code == 0 and "explained 0, already done 4" in again.output


def test_empty_path_overrides_and_a_missing_background_dir_exit_2(tiny_project):
    cfg = tiny_project / "config.yaml"
    for command in ("run", "validate"):
        result = invoke(command, cfg, "--set", "input.dir=")
        assert result.exit_code == 2 and "input.dir: is empty" in result.output, result.output
        result = invoke(command, cfg, "--set", "background={dir: nowhere}")
        assert result.exit_code == 2, result.output
        assert "background.dir: not a folder" in result.output and "nowhere" in result.output
    assert not (tiny_project / "out").exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_says_so_and_names_trust_checkpoint(tiny_project):
    import torch

    marker = tiny_project / "pwned"
    torch.save({"0.weight": torch.zeros(6, 3, 3, 3), "x": _Evil(marker)}, tiny_project / "evil.pt")
    with open(tiny_project / "evil.pkl", "wb") as fh:
        pickle.dump(_Evil(marker), fh)
    for name in ("evil.pt", "evil.pkl"):
        result = invoke("validate", tiny_project / "config.yaml", "--set", f"model.checkpoint={name}")
        assert result.exit_code == 2, result.output
        assert "model.trust_checkpoint" in result.output and "holds code" in result.output, result.output
        assert f"call {os.system.__module__}.system" in result.output
        assert "trust_checkpoint: true, which runs that code" in result.output
        assert "damaged" not in result.output
    assert not marker.exists()
    (tiny_project / "junk.pt").write_bytes(b"garbage" * 10)
    result = invoke("validate", tiny_project / "config.yaml", "--set", "model.checkpoint=junk.pt")
    assert result.exit_code == 2 and "damaged" in result.output and "holds code" not in result.output


def test_scientific_numbers_without_a_dot_are_numbers(tmp_path):
    base = "model: {arch: 'torchvision:resnet18', weights: random}\ninput: {dir: x}\n"
    message = _config_error(tmp_path / "c.yaml", base + "preprocess: {std: [1e-300, 1, 1]}\n")
    assert "std values must be within [0.001, 10]" in message and "valid number" not in message
    (tmp_path / "ok.yaml").write_text(base + "preprocess: {std: [2.5e-1, 25E-2, 1e0]}\n"
                                      "explainer: {name: kernel, nsamples: 1e3}\n")
    config = load_config(tmp_path / "ok.yaml")
    assert config.preprocess.std == [0.25, 0.25, 1.0]
    assert config.explainer_settings.nsamples == 1000
    assert parse_override("explainer.nsamples=2E3") == (["explainer", "nsamples"], 2000)
    assert parse_override("x=1.5e3")[1] == 1500.0 and parse_override("x=-1e-3")[1] == -0.001
    with pytest.raises(ConfigError, match="finite"):  # a float (inf), never a 400-digit integer
        parse_override("x=1e400")
    assert parse_override("x=1e3x")[1] == "1e3x" and parse_override("x=e3")[1] == "e3"


def test_empty_and_non_utf8_configs_say_what_is_wrong(tmp_path):
    for text in ("", "# nothing here\n"):
        assert _config_error(tmp_path / "c.yaml", text).endswith("config is empty: it needs at least "
                                                                  "model.arch and input.dir")
    message = _config_error(tmp_path / "c.yaml", b"model:\n  arch: caf\xe9\n")
    assert "not UTF-8" in message and "byte 0xe9 at offset 18 (line 2)" in message


# --- 15. a decode that hangs ------------------------------------------------------------------

def test_a_hung_decode_becomes_a_failed_image_and_the_steps_go_on(tmp_path, monkeypatch):
    release = threading.Event()
    calls = []

    def decode_one(input_dir, rel, preprocess):
        calls.append(rel)
        if rel.startswith("hang"):
            release.wait(30)
        return rel, rel, rel

    monkeypatch.setattr(stages, "decode_one", decode_one)
    todo = ["a", "hang1", "b", "c", "hang2", "d", "e"]
    try:
        t = time.monotonic()
        steps = list(stages.decoded_steps(tmp_path, todo, 3, None, poll=0.05, timeout=0.5))
        assert time.monotonic() - t < 10
    finally:
        release.set()
    assert [[g[0] for g in s.good] for s in steps] == [["a", "b"], ["c", "d"], ["e"]]
    assert [[f[0] for f in s.failed] for s in steps] == [["hang1"], ["hang2"], []]
    assert "took longer than 0.5 s" in str(steps[0].failed[0][1])
    time.sleep(0.2)
    assert calls.count("b") == 1 and calls.count("hang1") == 1  # each image decoded once


def test_a_run_whose_decode_hangs_writes_an_error_row_and_finishes(tiny_project, monkeypatch):
    release = threading.Event()
    real = stages.decode_one

    def decode_one(input_dir, rel, preprocess):
        if rel.startswith("zz"):
            release.wait(60)
        return real(input_dir, rel, preprocess)

    write_images(tiny_project / "images", ["zz-hang.png"])
    monkeypatch.setattr(stages, "decode_one", decode_one)
    monkeypatch.setattr(stages, "DECODE_TIMEOUT_S", 1.0)
    try:
        result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--workers", "0")
    finally:
        release.set()
    assert result.exit_code == 3, result.output
    out = tiny_project / "out"
    errors = dict(rows(out / "errors.csv"))
    assert list(errors) == ["zz-hang.png"] and "took longer than 1 s" in errors["zz-hang.png"]
    assert images(out / "topk.csv") == {"a/one.png", "a/two.jpg", "b/one.png", "three.bmp"}
