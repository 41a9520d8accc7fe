"""A seeded property test of every command (issue 31): random config values and options, valid and
hostile, must give exit 0, 2, 3 or 4, never 1 (a bug) and never a traceback, and a command that
exits 2 (a usage error) must leave every file as it was. The cases are drawn from fixed seeds, so a
failure is reproducible: the assertion message holds the command line. A few dozen cases per
command on the tiny model of conftest.py; the whole file takes well under a minute on 2 cores."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from explain_cli.cli import app

runner = CliRunner()
#: Cases per command; EXPLAIN_CLI_FUZZ_CASES=500 EXPLAIN_CLI_FUZZ_SEED=7 for a longer hunt.
CASES = int(os.environ.get("EXPLAIN_CLI_FUZZ_CASES", "24"))
SEED = os.environ.get("EXPLAIN_CLI_FUZZ_SEED", "issue-31")

#: --set values per key: valid ones, wrong types, out of range, YAML look-alikes, missing files.
VALUES = {
    "explainer.name": ["gradient", "kernel", "partition", "deep", "amortized", "nope", "[gradient]", "1", "null"],
    "explainer.nsamples": ["1", "4", "0", "-1", "auto", "1.5", "[4]", "'4'", "true", "99999999999999999999999"],
    "explainer": ["[gradient]", "gradient", "null", "{}", "{name: kernel, nsamples: 4}", "{name: deep}"],
    "explainer.segments": ["{grid: 2}", "{grid: 0}", "{grid: x}", "[2]", "{n_segments: 4}"],
    "model.layer": ["input", "0", "2", "nope", "''", "[input]", "null", "6"],
    "model.num_classes": ["3", "2", "0", "-3", "x", "null", "1.0"],
    "model.arch": ["python:tinynet:make", "python:tiny", "torchvision:", "timm:", "python:nope:make", "torchscript",
                   "3"],
    "model.checkpoint": ["tiny.pt", "labels.txt", "nope.pt", "images", "''", "null", "'~'", "truth.csv", "x" * 300],
    "labels": ["labels.txt", "tiny.pt", "nope.txt", "null", "config.yaml", "images", "[a, b, c]", "x" * 300],
    "preprocess.size": ["16", "8", "1", "0", "-1", "x", "100000", "1.5"],
    "preprocess.mean": ["[0.5, 0.5, 0.5]", "[0.5]", "[]", "x", "[1, 2]", "[.nan, 0, 0]", "[1e400, 0, 0]"],
    "preprocess.std": ["[0.5, 0.5, 0.5]", "[0, 0, 0]", "[-1, 1, 1]"],
    "preprocess.resize": ["crop", "stretch", "x", "null"],
    "input.dir": ["images", "nope", "tiny.pt", "''", "'photos #1'", "images/a", "empty", "x" * 300],
    "input.exclude": ["['*']", "[]", "'*'", "[1]", "['[']"],
    "input.include": ["['*.png']", "['*.nope']", "[]", "x"],
    "background.from_input": ["1", "2", "0", "-1", "1000", "x"],
    "output.dir": ["out", "images", "tiny.pt", "tiny.pt/sub", "''", "out2", "x" * 300],
    "output.format": ["svg", "png", "jpg", "[svg]"],
    "output.top_k": ["1", "2", "3", "4", "0", "-1", "x"],
    "targets.classes": ["[top_k]", "[0, 2]", "['fish $x$']", "[label]", "[]", "[-1]", "['\u00b2']", "x", "[3]",
                        "[label, top_k]"],
    "targets.output": ["logit", "probability", "log_odds", "x"],
    "targets.contrast": ["0", "2", "5", "'<bird>'", "x", "null"],
    "targets.from_csv": ["{path: truth.csv}", "{path: nope.csv}", "{path: labels.txt}", "x",
                         "{path: truth.csv, image: nope}", "{path: truth.csv, separator: ';'}"],
    "batch_size": ["1", "32", "auto", "0", "-1", "x"],
    "device": ["cpu", "auto", "cuda", "cuda:9", "tpu", "''"],
    "seed": ["0", "1", "-1", "x", "1.5", "99999999999999999999"],
    "workers": ["0", "-1", "x", "[0]"],
    "precision": ["float32", "bfloat16", "x"],
    "metrics": ["[]", "x", "[nope]"],
    "nope": ["1"],
    "model.nope": ["1"],
}
#: Options of run and validate, with values.
OPTIONS = {
    "--class": ["0", "fish $x$", "\u00b2", "--1", "99", "", "label", "top_k", "<BIRD>"],
    "--explainer": ["gradient", "kernel", "partition", "deep", "amortized", "nope", "[x]", ""],
    "--device": ["cpu", "cuda", "x", ""],
    "--input": ["images", "nope", "tiny.pt", "images/a"],
}
RUN_OPTIONS = {
    **OPTIONS,
    "--limit": ["0", "1", "-1", "x"],
    "--workers": ["0", "-1", "x"],
    "--shard": ["0/2", "1/2", "2/2", "x", "1/0", "-1/2", "0/1"],
    "--output": ["out", "tiny.pt", "images", "out3", "x" * 300],
    "--log-file": ["out/log.txt", "images", "tiny.pt/log", "x" * 300, "x" * 300 + "/log"],
    "--overwrite": [None],
    "--quiet": [None],
}
#: Training keys: cheap ones (one epoch on a 2 x 2 grid) and wrong ones.
TRAIN_VALUES = {
    "explainer.train.epochs": ["1", "0", "-1", "x", "1.5"],
    "explainer.train.pairs": ["1", "2", "0", "x"],
    "explainer.train.images_per_step": ["1", "4", "0"],
    "explainer.train.width": ["4", "3", "x"],
    "explainer.train.holdout": ["0", "0.5", "1", "-0.1", "x"],
    "explainer.train.network": ["auto", "pixels", "features", "x"],
    "explainer.train.validate_nsamples": ["0", "8", "-1"],
    "explainer.segments": ["{grid: 2}", "{grid: 1}", "{grid: 0}", "{grid: 17}", "{n_segments: 4}", "[2]"],
    "explainer.fill": ["mean", "[0, 0, 0]", "[300, 0, 0]", "x", "blur(3,3)", "null"],
    "explainer.checkpoint": ["e.pt", "tiny.pt/e.pt", "images", "null"],
    "explainer.name": ["amortized", "gradient", "x"],
    "model.layer": ["input", "2"],
    "preprocess.size": ["16", "8", "1"],
    "targets.output": ["logit", "probability"],
    "input.dir": ["images", "nope", "empty"],
    "device": ["cpu", "cuda"],
    "seed": ["0", "x"],
}


def invoke(args: list) -> "object":
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time, every folder (its mtime aside:
    a write test leaves no file but touches it), bytecode caches aside. A lock file counts by its
    existence: each run that takes it writes its holder (pid, host) there, refused or not."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = (-1, 0)
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (0, 0) if name.endswith(".lock") else (st.st_size, st.st_mtime_ns)
    return out


def check(root: Path, args: list, before: dict) -> int:
    """Run the command; assert the exit code, the output and (on exit 2) that nothing changed."""
    result = invoke(args)
    where = f"explain-cli {' '.join(map(repr, map(str, args)))}\n{result.output}"
    if result.exit_code == 1:  # a bug: its traceback (-v) for the message
        where += invoke([*args, "-v"]).output
    assert result.exit_code in (0, 2, 3, 4), where
    assert "Traceback" not in result.output and "unexpected" not in result.output, where
    if result.exit_code == 2:
        after = snapshot(root)
        assert after == before, (where, sorted(set(after.items()) ^ set(before.items())))
    return result.exit_code


def draw_sets(rng: random.Random, table: dict[str, list[str]], most: int = 3) -> list[str]:
    out = []
    for key in rng.sample(sorted(table), rng.randint(0, most)):
        out += ["--set", f"{key}={rng.choice(table[key])}"]
    return out


def draw_options(rng: random.Random, table: dict[str, list], root: Path, most: int = 2) -> list[str]:
    out = []
    for option in rng.sample(sorted(table), rng.randint(0, most)):
        value = rng.choice(table[option])
        if value is None:
            out.append(option)
            continue
        if option in ("--input", "--output", "--log-file") and value:
            value = str(root / value)
        out += [option, value]
    return out


@pytest.fixture
def project(tiny_project):
    """The tiny project with a truth CSV, an empty folder and workers: 0 (no subprocesses)."""
    (tiny_project / "truth.csv").write_text("file,label\none.png,<bird>\nthree.bmp,fish $x$\na/two.jpg,0\n")
    (tiny_project / "empty").mkdir()
    data = yaml.safe_load((tiny_project / "config.yaml").read_text())
    data["workers"] = 0
    data["explainer"]["nsamples"] = 4
    (tiny_project / "config.yaml").write_text(yaml.safe_dump(data))
    return tiny_project


def _reset(root: Path) -> None:
    for name in ("out", "out2", "out3", "photos #1"):
        shutil.rmtree(root / name, ignore_errors=True)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_fuzz_run_and_validate(project, command):
    rng = random.Random(f"{SEED}-{command}")
    codes = []
    for _ in range(CASES):
        _reset(project)
        if command == "run" and rng.random() < 0.3:  # into a folder holding results: the resume check
            assert invoke([command, project / "config.yaml", "--no-progress", "--limit", "1"]).exit_code == 0
        args = [command, project / "config.yaml", *draw_sets(rng, VALUES)]
        args += draw_options(rng, RUN_OPTIONS if command == "run" else OPTIONS, project)
        if command == "run":
            args += ["--no-progress", "--limit", "2"]
        codes.append(check(project, args, snapshot(project)))
    assert 0 in codes and 2 in codes, codes  # the cases reach both real work and refusals


def test_fuzz_layers(project):
    rng = random.Random(f"{SEED}-layers")
    codes = []
    for i in range(CASES):
        data = yaml.safe_load((project / "config.yaml").read_text())
        for key in rng.sample(sorted(VALUES), rng.randint(0, 2)):
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[last] = yaml.safe_load(rng.choice(VALUES[key]))
        cfg = project / f"layers-{i}.yaml"
        cfg.write_text(yaml.safe_dump(data))
        choice = rng.random()
        if choice < 0.6:
            args = ["layers", cfg]
        elif choice < 0.9:
            args = ["layers", "--arch", rng.choice(["python:tinynet:make", "python:tiny", "torchvision:", "x",
                                                    "timm:nope", "python:tinynet:nope", "torchscript"])]
        else:
            args = ["layers", cfg, "--arch", "python:tinynet:make"]
        if rng.random() < 0.4:
            args += ["--size", rng.choice(["8", "16", "0", "-1", "x", "5000"])]
        codes.append(check(project, args, snapshot(project)))
    assert 0 in codes and 2 in codes, codes


def test_fuzz_init(project):
    rng = random.Random(f"{SEED}-init")
    names = ["c.yaml", "sub/c.yaml", "photos #1.yaml", "yes", "tiny.pt/c.yaml", "images", "config.yaml", "~x.yaml",
             "x" * 240 + ".yaml", "x" * 300 + "/c.yaml"]
    codes = []
    for i in range(CASES):
        model = rng.choice(["python:tinynet:make", "python:tiny", "torchvision:", "timm:", "tiny.pt", "labels.txt",
                            "nope.pt", "python:tinynet:nope", "torchvision:resnet18"])
        args = ["init", model if ":" in model else project / model, "-o", project / f"{i}-{rng.choice(names)}"]
        if rng.random() < 0.3:
            args[-1] = project / rng.choice(names)
        if rng.random() < 0.5:
            args += ["--input", project / rng.choice(["images", "photos #1", "a: b", "[x]", "~", "nope", "%p"])]
        if rng.random() < 0.4:
            args += ["--arch", rng.choice(["python:tinynet:make", "torchvision:resnet18", "python:tiny", "x"])]
        if rng.random() < 0.3:
            args += ["--num-classes", rng.choice(["3", "2", "0", "x"])]
        if rng.random() < 0.3:
            args += ["--weights", rng.choice(["random", "pretrained", "x"])]
        if rng.random() < 0.2:
            args.append("--force")
        before = snapshot(project)
        codes.append(check(project, args, before))
        if codes[-1] == 0:  # what init wrote validates or is a clear usage error (weights, a missing folder)
            config = Path(args[args.index("-o") + 1])
            assert config.is_file(), args
            check(project, ["validate", config], snapshot(project))
    assert 0 in codes and 2 in codes, codes


def test_fuzz_train(project):
    data = yaml.safe_load((project / "config.yaml").read_text())
    data["explainer"] = {"name": "amortized", "checkpoint": "e.pt", "segments": {"grid": 2},
                         "train": {"epochs": 1, "pairs": 2, "images_per_step": 4, "width": 4, "holdout": 0,
                                   "validate_nsamples": 0, "augment": False}}
    cfg = project / "train.yaml"
    cfg.write_text(yaml.safe_dump(data))
    rng = random.Random(f"{SEED}-train")
    codes = []
    for _ in range(CASES):
        for leftover in ("e.pt", "e.pt.train", "x.pt"):
            (project / leftover).unlink(missing_ok=True)
        args = ["train", cfg, *draw_sets(rng, TRAIN_VALUES)]
        if rng.random() < 0.3:
            args += ["--output", project / rng.choice(["x.pt", "images", "tiny.pt/x.pt", "new/x.pt", "tiny.pt",
                                                       "x" * 250 + ".pt", "x" * 300 + "/x.pt"])]
        if rng.random() < 0.2:
            args += ["--input", project / rng.choice(["images", "nope", "empty", "tiny.pt"])]
        if rng.random() < 0.2:
            args += ["--device", rng.choice(["cpu", "cuda", "x"])]
        if rng.random() < 0.2:
            args.append("--restart")
        codes.append(check(project, args, snapshot(project)))
        shutil.rmtree(project / "new", ignore_errors=True)
    assert 0 in codes and 2 in codes, codes


@pytest.fixture
def sharded(project):
    """An output folder of a run in two shards (one image fails), not merged yet."""
    (project / "images" / "bad.png").write_bytes(b"not an image")
    codes = [invoke(["run", project / "config.yaml", "--no-progress", "--shard", f"{i}/2"]).exit_code
             for i in range(2)]
    assert sorted(codes) == [0, 3], codes  # the shard that drew bad.png exits 3 (images failed), the other 0
    return project


def _forge(rng: random.Random, out: Path) -> None:
    """One random damage to a run's or a shard's files: text, types, or a file removed."""
    files = sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".csv", ".json"))
    if not files:
        return
    target = rng.choice(files)
    kind = rng.choice(["truncate", "types", "remove", "garbage", "row", "status"])
    if kind == "remove":
        target.unlink()
    elif kind == "truncate":
        target.write_bytes(target.read_bytes()[: rng.randint(0, 40)])
    elif kind == "garbage":
        target.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    elif kind == "row" and target.suffix == ".csv":
        with target.open("a") as fh:
            fh.write(rng.choice(["x\n", "a,b,c\n", '"unclosed\n', "one.png,1,2,3,4,5,6,7,8,9,10,11,12,13,14\n"]))
    elif target.suffix == ".json":
        try:
            info = json.loads(target.read_text())
        except ValueError:  # damaged already
            return
        key = rng.choice(sorted(info))
        info[key] = rng.choice([None, "x", 5, [], {}, -1, True])
        if kind == "status":
            info["status"] = rng.choice(["running", "failed", 3])
        target.write_text(json.dumps(info))


@pytest.mark.parametrize("command", ["merge", "report"])
def test_fuzz_merge_and_report(sharded, command):
    out = sharded / "out"
    if command == "report":  # an unsharded run's folder beside the shards' (report reads both kinds)
        assert invoke(["run", sharded / "config.yaml", "--no-progress", "--output", out / "whole"]).exit_code == 3
    pristine = sharded / "pristine"
    shutil.copytree(out, pristine)
    rng = random.Random(f"{SEED}-{command}")
    codes = []
    for i in range(CASES):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        folder = out / "whole" if command == "report" and rng.random() < 0.5 else out
        if i % 4:  # every fourth case untouched: the command works on a good folder
            for _ in range(rng.randint(1, 2)):
                _forge(rng, folder)
        args = [command, folder] + (["--quiet"] if rng.random() < 0.3 else [])
        if rng.random() < 0.1:
            args[1] = sharded / rng.choice(["nope", "tiny.pt", "images"])
        codes.append(check(sharded, args, snapshot(sharded)))
    assert 2 in codes and (3 in codes if command == "merge" else 0 in codes), codes


def test_fuzz_forged_checkpoints_and_label_files(project):
    """Files a run reads that it did not write: a checkpoint and a label file of random damage."""
    rng = random.Random(f"{SEED}-files")
    good_ckpt = (project / "tiny.pt").read_bytes()
    state = torch.load(project / "tiny.pt", weights_only=True)
    codes = []
    truth = (project / "truth.csv").read_text()
    for _ in range(CASES):
        kind = rng.choice(["list", "missing", "shape", "bytes", "labels", "labels-bytes", "truth", "truth-bytes"])
        (project / "tiny.pt").write_bytes(good_ckpt)
        (project / "labels.txt").write_text("cat & dog\n<bird>\nfish $x$\n")
        (project / "truth.csv").write_text(truth)
        name = rng.choice(sorted(state))
        if kind == "list":
            torch.save([state], project / "tiny.pt")
        elif kind == "missing":
            torch.save({k: v for k, v in state.items() if k != name}, project / "tiny.pt")
        elif kind == "shape":
            torch.save({**state, name: torch.zeros(rng.randint(1, 5))}, project / "tiny.pt")
        elif kind == "bytes":
            (project / "tiny.pt").write_bytes(good_ckpt[: rng.randint(0, len(good_ckpt))])
        elif kind == "labels":
            (project / "labels.txt").write_text(rng.choice(["", "a\n", "a\nb\nc\nd\n", "[1, 2, 3]", "{}", "a\n\nb\n",
                                                            '{"0": "a", "1": "b", "x": 3}', "a,b\n1,2\n"]))
        elif kind == "labels-bytes":
            (project / "labels.txt").write_bytes(bytes(rng.randrange(256) for _ in range(32)))
        elif kind == "truth":
            (project / "truth.csv").write_text(rng.choice(["", "file\n", "label,file\n", "file,label\none.png,\n",
                                                           'file,label\n"one.png,0\n', "file,label\none.png,9\n",
                                                           "file,label\n,0\n", "\ufefffile,label\none.png,0\n",
                                                           "file,label\none.png\n", "file;label\none.png;0\n"]))
        else:
            (project / "truth.csv").write_bytes(bytes(rng.randrange(256) for _ in range(48)))
        _reset(project)
        command = rng.choice(["run", "validate"])
        args = [command, project / "config.yaml"] + (["--no-progress", "--limit", "1"] if command == "run" else [])
        if kind.startswith("truth"):
            args += ["--set", "targets.from_csv={path: truth.csv}", "--class", "label", "--class", "top_k"]
        codes.append(check(project, args, snapshot(project)))
    assert 2 in codes, codes
