"""Hostile-but-real runs of the CLI (issue 10): file names of every troublesome kind, locales,
stale resumes, full disks, umasks, bad output paths, FIFOs, extreme images, non-finite models,
closed pipes. Tiny model and 16-24 px images: each test takes seconds."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from explain_cli import names, write
from explain_cli.cli import app

runner = CliRunner()

# One name per troublesome class: CR, LF, CRLF, quote, comma, leading formula signs, tab, leading
# space, backslash escapes, non-ASCII, emoji, zero-width, colliding stems, case-only differences.
WEIRD = ["cr\rname.png", "nl\nname.png", "crlf\r\nname.png", 'quo"te.png', "com,ma.png", "=SUM(A1).png",
         "+plus.png", "-dash.png", "@at.png", "tab\tname.png", " lead space.png", "back\\x41slash.png",
         "ünï 日本.png", "emoji🙂.png", "zero\u200bwidth.png", "x.png", "x.jpg", "x.png.jpg", "X.PNG",
         "sub dir/x.png"]
# Names that are not UTF-8 (Latin-1 and random bytes), created from bytes.
NON_UTF8 = [b"caf\xe9.png", b"\xff\xfe\xfd.jpg", b"sub dir/r\xe9sum\xe9.png"]


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def make_image(path: bytes | str | Path, seed: int, size: tuple[int, int] = (20, 16)) -> None:
    raw = os.fsencode(path)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    tmp = os.path.join(os.path.dirname(raw), b".tmp.png")
    Image.fromarray(arr).save(os.fsdecode(tmp), format="PNG")
    os.replace(tmp, raw)


def weird_folder(root: Path) -> set[str]:
    """A folder of images with every troublesome name; returns their explain-cli names."""
    rels = set()
    for i, name in enumerate(WEIRD):
        make_image(root / name, i)
        rels.add(names.from_fs(os.fsencode(name)))
    for i, raw in enumerate(NON_UTF8):
        make_image(os.fsencode(root) + b"/" + raw, 100 + i)
        rels.add(names.from_fs(raw))
    return rels


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def images_of(path: Path) -> list[str]:
    return [names.unescape(r["image"]) for r in rows_of(path)]


def overlay(out: Path, rel: str, fmt: str = "svg") -> Path:
    return out / "overlays" / f"{names.fs_name(names.output_stem(rel))}.{fmt}"


@pytest.fixture
def weird_project(tiny_project):
    rels = weird_folder(tiny_project / "weird")
    labels = ["cat\r\ndog, \"the\" =1", "lone \ud800 surrogate", "back\\x41slash"]
    (tiny_project / "labels.json").write_text(json.dumps(labels))
    cfg = yaml.safe_load((tiny_project / "config.yaml").read_text())
    cfg["labels"] = "labels.json"
    cfg["input"] = {"dir": "weird"}
    cfg["explainer"]["nsamples"] = 4
    cfg["output"]["top_k"] = 3  # every class name, the lone surrogate included, reaches topk.csv
    (tiny_project / "weird.yaml").write_text(yaml.safe_dump(cfg))
    return tiny_project, rels, labels


def test_every_file_name_round_trips_through_csvs_resume_and_merge(weird_project):
    root, rels, labels = weird_project
    cfg = root / "weird.yaml"
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 0, result.output
    out = root / "out"
    topk = out / "topk.csv"
    got = images_of(topk)
    assert sorted(set(got)) == sorted(rels) and len(got) == 3 * len(rels)  # every name, one row per rank
    assert {names.unescape(r["class_name"]) for r in rows_of(topk)} == set(labels)
    for rel in rels:
        assert overlay(out, rel).is_file(), rel
    assert len(list((out / "overlays").rglob("*.svg"))) == len(rels)  # x.png, x.jpg, x.png.jpg, X.PNG apart
    page = (out / "report.html").read_text(encoding="utf-8")
    for rel in rels:  # the report links every overlay by its file's bytes, percent-encoded
        url = "overlays/" + quote(os.fsencode(names.fs_name(names.output_stem(rel))) + b".svg", safe="/")
        assert url in page, rel
    before = topk.read_bytes()
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 0 and f"already done {len(rels)}" in result.output, result.output
    assert topk.read_bytes() == before  # no duplicate rows on rerun

    sharded = root / "sharded"
    for i in range(2):
        result = invoke("run", cfg, "--no-progress", "--output", sharded, "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
    result = invoke("merge", sharded)
    assert result.exit_code == 0, result.output
    assert sorted(images_of(sharded / "topk.csv")) == sorted(got)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONCOERCECLOCALE"))}
    env.update(extra)
    return env


LOCALES = {
    "C, no UTF-8 mode (ASCII file names)": {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},
    "C.UTF-8": {"LC_ALL": "C.UTF-8"},
    "C (Python's UTF-8 mode)": {"LC_ALL": "C"},
}


def test_resume_is_stable_across_locales(tiny_project):
    rels = set()
    root = tiny_project / "loc"
    for i, raw in enumerate([b"caf\xe9.png", "ünï.png".encode(), b"plain.png"]):
        make_image(os.fsencode(root) + b"/" + raw, i)
        rels.add(names.from_fs(raw))
    encodings = {}
    for label, extra in LOCALES.items():
        probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"],
                               env=_clean_env(**extra), capture_output=True, text=True)
        encodings[label] = probe.stdout.strip()
    assert encodings["C, no UTF-8 mode (ASCII file names)"] == "ascii"  # the locale really differs
    assert encodings["C.UTF-8"] == "utf-8"
    assert encodings["C (Python's UTF-8 mode)"] == "utf-8"  # PEP 538/540: plain C is UTF-8 in 3.11
    out = tiny_project / "out"
    for n, (label, extra) in enumerate(list(LOCALES.items())[:2]):
        proc = subprocess.run([sys.executable, "-m", "explain_cli", "run", str(tiny_project / "config.yaml"),
                               "--input", str(root), "--output", str(out), "--no-progress"],
                              env=_clean_env(**extra), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (label, proc.stderr)
        expect = "explained 3, already done 0" if n == 0 else "explained 0, already done 3"
        assert expect in proc.stderr, (label, proc.stderr)
        got = images_of(out / "topk.csv")
        assert sorted(set(got)) == sorted(rels) and len(got) == 6, label
        for rel in rels:
            assert overlay(out, rel).is_file()


# -- stale resumes --------------------------------------------------------------------------------

def _snapshot(out: Path) -> tuple[bytes, dict]:
    return (out / "topk.csv").read_bytes(), json.loads((out / "run.json").read_text())


def test_a_rerun_with_other_settings_is_refused_and_neutral_settings_resume(tiny_project):
    import torch

    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    topk, info = _snapshot(out)
    assert info["fingerprint"]["checkpoint"]["sha256"] and info["fingerprint"]["labels"]["sha256"]
    refused = [["--set", "explainer.nsamples=8"], ["--set", "seed=1"], ["--set", "output.top_k=1"],
               ["--set", "explainer={name: deep}"], ["--set", "preprocess.resize=crop"],
               ["--set", "preprocess.size=20"], ["--set", "background.from_input=2"],
               ["--set", "model.layer='2'"], ["--set", "output.dpi=50"], ["--input", tiny_project / "images" / "a"]]
    for extra in refused:
        result = invoke("run", cfg, "--no-progress", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert "different settings" in result.output and "--overwrite" in result.output, result.output
        assert "Traceback" not in result.output
        assert _snapshot(out) == (topk, info)  # nothing was touched
    # file contents count, not paths
    labels = (tiny_project / "labels.txt").read_text()
    (tiny_project / "labels.txt").write_text(labels.replace("<bird>", "<parrot>"))
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 2 and "label file content changed" in result.output
    (tiny_project / "labels.txt").write_text(labels)
    original = (tiny_project / "tiny.pt").read_bytes()
    state = torch.load(tiny_project / "tiny.pt")
    torch.save({k: v + 0.01 for k, v in state.items()}, tiny_project / "tiny.pt")
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 2 and "checkpoint content changed" in result.output
    (tiny_project / "tiny.pt").write_bytes(original)  # same content, new mtime: accepted
    (tiny_project / "tiny2.pt").write_bytes(original)  # the same weights under another name
    for extra in [["--set", "batch_size=7"], ["--device", "cpu"], ["--log-file", tiny_project / "logs" / "x.log"],
                  ["--set", "output.format=png"], ["--set", "output.save_values=true"],
                  ["--set", "input.exclude=[]"], ["-q"], ["--set", "model.checkpoint=tiny2.pt"]]:
        result = invoke("run", cfg, *extra)
        assert result.exit_code == 0, (extra, result.output)
    result = invoke("run", cfg, "--no-progress", "--set", "seed=1", "--overwrite")
    assert result.exit_code == 0 and "explained 4, already done 0" in result.output, result.output
    assert json.loads((out / "run.json").read_text())["fingerprint"]["settings"]["seed"] == 1


def test_old_output_folders_resume_and_their_overlays_are_renamed(tiny_project):
    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    assert invoke("run", cfg, "--no-progress").exit_code == 0
    images = sorted(set(images_of(out / "topk.csv")))
    legacy = names.legacy_output_names(images)
    info = json.loads((out / "run.json").read_text())
    del info["fingerprint"]  # as written by explain-cli 0.1
    (out / "run.json").write_text(json.dumps(info))
    for rel in images:
        os.replace(overlay(out, rel), out / "overlays" / f"{legacy[rel]}.svg")
    result = invoke("run", cfg, "--no-progress", "--set", "explainer.nsamples=8")
    assert result.exit_code == 2 and "explainer.nsamples: 16 -> 8" in result.output  # old config compared too
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 0 and f"already done {len(images)}" in result.output, result.output
    for rel in images:
        assert overlay(out, rel).is_file() and not (out / "overlays" / f"{legacy[rel]}.svg").exists()


# -- full disks, umask, run.json status --------------------------------------------------------------

def _complete_rows(path: Path) -> list[list[str]]:
    text = write.read_csv_text(path)
    assert text.endswith("\n")
    rows = list(csv.reader(open(path, newline="", encoding="utf-8")))
    assert all(len(r) == len(rows[0]) for r in rows)
    return rows


def test_disk_full_while_appending_leaves_no_torn_row_and_a_rerun_completes(tiny_project, monkeypatch):
    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    real = write._write_all
    calls = {"n": 0}

    def fill_up(fd, data):
        calls["n"] += 1
        if calls["n"] == 3:  # the third image's rows: half of them reach the disk, then ENOSPC
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(write, "_write_all", fill_up)
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "rerun" in result.output
    assert "Traceback" not in result.output
    rows = _complete_rows(out / "topk.csv")
    assert len(rows) == 1 + 2 * 2  # header + the two complete images
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    monkeypatch.setattr(write, "_write_all", real)
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 0 and "explained 2, already done 2" in result.output, result.output
    assert sorted(images_of(out / "topk.csv")) == sorted(["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"] * 2)


def test_disk_full_while_writing_an_overlay_stops_the_run(tiny_project, monkeypatch):
    from explain_cli import render

    real = render.atomic_write_bytes
    calls = {"n": 0}

    def fill_up(path, data):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(render, "atomic_write_bytes", fill_up)
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    out = tiny_project / "out"
    assert len(_complete_rows(out / "topk.csv")) == 1 + 2
    assert _complete_rows(out / "errors.csv") == [["image", "error"]]  # not one error row per image
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/explain-cli-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


needs_mount = pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root (the simulated "
                                                           "full-disk and read-only tests above still run)")


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@needs_mount
def test_a_real_full_tmpfs(tiny_project, small_tmpfs):
    free = shutil.disk_usage(small_tmpfs).free
    assert invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", small_tmpfs / "ref").exit_code == 0
    # what a whole run takes on this tmpfs, without report.html (a report that does not fit only warns)
    need = free - shutil.disk_usage(small_tmpfs).free - (small_tmpfs / "ref" / "report.html").stat().st_size
    shutil.rmtree(small_tmpfs / "ref")
    out = small_tmpfs / "out"
    out.mkdir()
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - int(need * 0.7)))  # room for part of it
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out)
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert "Traceback" not in result.output
    _complete_rows(out / "topk.csv")
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "No space left" in info["error"]
    filler.unlink()
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out)
    assert result.exit_code == 0, result.output
    assert sorted(set(images_of(out / "topk.csv"))) == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]
    assert len(images_of(out / "topk.csv")) == 8


@needs_mount
def test_a_read_only_output_file_system_is_a_usage_error(tiny_project, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], check=True)
    try:
        for cmd in ("run", "validate"):
            args = [cmd, tiny_project / "config.yaml", "--set", f"output.dir={mnt / 'out'}"]
            result = invoke(*args)
            assert result.exit_code == 2, result.output
            assert "output.dir" in result.output and "read-only file system" in result.output
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_respect_the_umask(tiny_project, monkeypatch, mask):
    monkeypatch.setattr(write, "_UMASK", None)
    old = os.umask(mask)
    try:
        result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--set", "output.save_values=true")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    out = tiny_project / "out"
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {p.name for p in files} >= {"topk.csv", "errors.csv", "run.json", "one.png.svg", "one.png.npz"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    for p in [out / "overlays", out / "overlays" / "a", out / "values"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o777 & ~mask, p


def test_run_json_says_failed_after_a_usage_error_inside_the_run(tiny_project):
    broken = tiny_project / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b{i}.png").write_bytes(b"not an image")
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--input", broken)
    assert result.exit_code == 2 and "no readable background image" in result.output
    info = json.loads((tiny_project / "out" / "run.json").read_text())
    assert info["status"] == "failed" and "background" in info["error"]


# -- usage errors -----------------------------------------------------------------------------------

def test_bad_output_paths_log_files_and_slurm_variables_exit_2(tiny_project, monkeypatch):
    cfg = tiny_project / "config.yaml"
    (tiny_project / "afile").write_text("x")
    (tiny_project / "link-to-images").symlink_to(tiny_project / "images")
    cases = [
        (["--set", "output.dir=afile"], "is a file"),
        (["--set", "output.dir=afile/below/out"], "which is a file"),
        (["--set", "output.dir=images"], "is the input folder"),
        (["--output", tiny_project / "link-to-images"], "is the input folder"),
        (["--log-file", tiny_project], "is a folder"),
        (["--log-file", tiny_project / "afile" / "x.log"], "which is a file"),
    ]
    for extra, message in cases:
        result = invoke("run", cfg, "--no-progress", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
    for extra, message in cases[:3]:
        result = invoke("validate", cfg, *extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    assert not (tiny_project / "images" / "topk.csv").exists()
    for value in ("abc", "1.5", "", "٣", "9" * 30):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", value)
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
        result = invoke("run", cfg, "--no-progress")
        assert result.exit_code == 2 and "SLURM_ARRAY_TASK_ID" in result.output, (value, result.output)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "four")
    result = invoke("run", cfg, "--no-progress")
    assert result.exit_code == 2 and "SLURM_ARRAY_TASK_COUNT='four'" in result.output


def test_config_bombs_and_bools_exit_2_from_the_cli_fast(tiny_project):
    cfg = yaml.safe_load((tiny_project / "config.yaml").read_text())
    text = yaml.safe_dump(cfg)
    bomb = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 9) + "]\n" for i in range(9))
    cases = {"bomb.yaml": bomb.replace("l0:", "_l0:", 1) + text,
             "bool.yaml": text.replace("num_classes: 3", "num_classes: true"),
             "dup.yaml": text + "seed: 3\n"}
    for name, body in cases.items():
        (tiny_project / name).write_text(body)
        for cmd in ("validate", "run"):
            t = time.process_time()  # CPU time: a loaded machine cannot make it fail
            result = invoke(cmd, tiny_project / name)
            assert time.process_time() - t < 2
            assert result.exit_code == 2 and "Traceback" not in result.output, (name, result.output)
    assert "num_classes" in invoke("validate", tiny_project / "bool.yaml").output
    assert "duplicate key 'seed'" in invoke("validate", tiny_project / "dup.yaml").output


# -- hangs, memory, non-finite numbers ------------------------------------------------------------------

FIFO_SCRIPT = textwrap.dedent('''
    import os, sys
    from explain_cli import pipeline
    from explain_cli.cli import main

    real = pipeline.discover_images
    def discover(root, include, exclude, skip_dirs=None, problems=None, **kwargs):
        found = real(root, include, exclude, skip_dirs, problems, **kwargs)
        fifo = os.path.join(root, "late.png")
        os.mkfifo(fifo)            # replaced by a FIFO after discovery
        return sorted(found + ["late.png"])
    pipeline.discover_images = discover
    sys.argv = ["explain-cli"] + sys.argv[1:]
    main()
''')


def test_a_fifo_after_discovery_is_an_error_row_not_a_hang(tiny_project):
    script = tiny_project / "fifo_run.py"
    script.write_text(FIFO_SCRIPT)
    # a FIFO read blocks forever: the timeout is the hang check (a wall-clock bound below it only
    # measured the machine's load)
    proc = subprocess.run([sys.executable, str(script), "run", str(tiny_project / "config.yaml"), "--no-progress",
                           "--set", "background.from_input=2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr
    errors = rows_of(tiny_project / "out" / "errors.csv")
    assert [r["image"] for r in errors] == ["late.png"] and "not a regular file" in errors[0]["error"]
    assert len(set(images_of(tiny_project / "out" / "topk.csv"))) == 4


def test_discovery_skips_fifos_sockets_and_dangling_links(tmp_path):
    from explain_cli.discover import discover_images

    make_image(tmp_path / "ok.png", 0)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    import socket

    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "sock.png"))
        assert discover_images(tmp_path, ["*.png"], []) == ["ok.png"]
    finally:
        sock.close()


MEMORY_SCRIPT = textwrap.dedent('''
    import resource, sys, time
    from pathlib import Path
    from explain_cli.config import PreprocessConfig
    from explain_cli.images import load_preprocessed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = PreprocessConfig(size=224, resize=sys.argv[2])
    t = time.process_time()  # CPU time (all threads): a loaded machine cannot make it fail
    pixels, x = load_preprocessed(Path(sys.argv[1]), cfg)
    assert pixels.shape == (224, 224, 3) and x.shape == (3, 224, 224)
    print(time.process_time() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
''')


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (1, 100000), (3, 60000), (60000, 2)])
def test_extreme_aspect_images_cost_what_their_output_costs(tmp_path, size):
    path = tmp_path / "strip.png"
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    for mode in ("crop", "stretch"):
        proc = subprocess.run([sys.executable, str(script), str(path), mode], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        cpu_seconds, grown_mb = map(float, proc.stdout.split())
        # CPU seconds, not wall-clock: a decode of the whole strip at full size would cost far more
        assert cpu_seconds < 2 and grown_mb < 100, (mode, cpu_seconds, grown_mb)


def test_memory_error_on_one_image_is_an_error_row(tiny_project, monkeypatch):
    from explain_cli import images

    real = images.resize

    def resize(img, cfg):
        if img.size == (28, 24) and np.asarray(img)[0, 0, 0] == first_pixel:
            raise MemoryError
        return real(img, cfg)

    first_pixel = np.asarray(Image.open(tiny_project / "images" / "three.bmp"))[0, 0, 0]
    monkeypatch.setattr(images, "resize", resize)
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--set", "background.from_input=2",
                    "--set", "input.exclude=['*-02*', 'a/*']")
    assert result.exit_code == 3, result.output
    errors = rows_of(tiny_project / "out" / "errors.csv")
    assert [r["image"] for r in errors] == ["three.bmp"] and "out of memory" in errors[0]["error"]
    assert set(images_of(tiny_project / "out" / "topk.csv")) == {"b/one.png"}


def test_a_checkpoint_holding_nan_gives_error_rows_not_nan_rows(tiny_project):
    import torch

    sys.modules.pop("tinynet", None)
    import tinynet

    state = tinynet.make(3).state_dict()
    state["6.weight"] = torch.full_like(state["6.weight"], float("nan"))
    torch.save(state, tiny_project / "tiny.pt")
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 3, result.output
    errors = rows_of(tiny_project / "out" / "errors.csv")
    assert len(errors) == 4 and all("non-finite" in r["error"] for r in errors)
    assert rows_of(tiny_project / "out" / "topk.csv") == []


# -- closed pipes ------------------------------------------------------------------------------------

def test_closed_stdout_or_stderr_does_not_change_the_exit_code(tiny_project):
    cfg = str(tiny_project / "config.yaml")
    cmd = [sys.executable, "-m", "explain_cli"]
    # `explain-cli validate cfg | head -0`: the reader is gone before anything is printed
    proc = subprocess.Popen(cmd + ["validate", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    # a log collector that dies: stderr closed, one image broken -> still exit 3, outputs written
    (tiny_project / "images" / "bad.png").write_bytes(b"broken")
    proc = subprocess.Popen(cmd + ["run", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stderr.close()
    assert proc.wait(timeout=600) == 3
    assert [r["image"] for r in rows_of(tiny_project / "out" / "errors.csv")] == ["bad.png"]
    # started with stdout closed (>&-): merge (no torch, fast) still exits with its own code
    proc = subprocess.run(" ".join(cmd + ["merge", str(tiny_project / "out")]) + " >&-", shell=True,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 2 and "no shard files" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


HANG_SCRIPT = textwrap.dedent('''
    import sys, threading
    from explain_cli import stages
    from explain_cli.cli import main

    real = stages.decode_one
    def decode_one(input_dir, rel, preprocess):
        if rel.startswith("zz"):
            threading.Event().wait()   # a read that never returns (a stalled network file system)
        return real(input_dir, rel, preprocess)
    stages.decode_one = decode_one
    sys.argv = ["explain-cli"] + sys.argv[1:]
    main()
''')


def test_sigterm_ends_a_run_whose_decoder_hangs_within_seconds(tiny_project):
    import signal

    from conftest import write_images

    write_images(tiny_project / "images", [f"c{i}.png" for i in range(4)] + ["zz-hang.png"], seed=5)
    script = tiny_project / "hang_run.py"
    script.write_text(HANG_SCRIPT)
    out = tiny_project / "out"
    proc = subprocess.Popen([sys.executable, str(script), "run", str(tiny_project / "config.yaml"), "--no-progress",
                             "--set", "background.from_input=2"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        # the first step (8 images) is written, the second hangs; never signal before that (the
        # handlers would not be installed yet), however long a loaded machine takes to get there
        while not ((out / "topk.csv").exists() and len(set(images_of(out / "topk.csv"))) == 8):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the first step was not written in 10 minutes"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        # a hung run never exits; a finite wall-clock bound tighter than this timeout only
        # measured how loaded the machine was (it polls the stop flag every 0.25 s)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 143, proc.stderr.read()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["counts"]["explained"] == 8
