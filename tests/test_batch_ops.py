"""Batch operation: signals and resume, sharding and merge, the lock, logging, OOM back-off."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, gated_env, wait_for_gate, write_images
from explain_cli.cli import app
from explain_cli.pipeline import Shard
from explain_cli.write import TOPK_COLUMNS

runner = CliRunner()

SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
              "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_JOB_ID")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))[1:]


def assert_rows_close(got: list[list[str]], want: list[list[str]], rel: float = 1e-4, abs_: float = 1e-6) -> None:
    """topk rows equal: image, rank, class exactly; the floats up to the last printed digits
    (a batch of other images can change float32 round-off, not the seeded draws)."""
    numeric = slice(4, TOPK_COLUMNS.index("insertion_auc") + 1)  # probability .. insertion_auc
    text = slice(numeric.stop, None)  # target, explained, label, predicted
    assert [r[:4] + r[text] for r in got] == [r[:4] + r[text] for r in want]
    for g, w in zip(got, want):
        assert [x == "" for x in g[numeric]] == [x == "" for x in w[numeric]], (g, w)  # blank: not computed
        assert [float(x) for x in g[numeric] if x] == pytest.approx([float(x) for x in w[numeric] if x],
                                                                    rel=rel, abs=abs_), (g, w)


def images_of(path: Path) -> set[str]:
    return {r[0] for r in read_rows(path)}


def add_images(project: Path, n: int, folder: str = "many") -> list[str]:
    names = [f"{folder}/im{i:02d}.png" for i in range(n)]
    write_images(project / "images", names, seed=1)
    return names


# --- shards -------------------------------------------------------------------------------

def test_shards_cover_each_image_exactly_once():
    items = [f"img{i:03d}.png" for i in range(23)]
    for n in (1, 2, 3, 4, 7, 23, 30):
        parts = [Shard(i, n).select(items) for i in range(n)]
        flat = [x for p in parts for x in p]
        assert sorted(flat) == items and len(flat) == len(set(flat))
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1  # round-robin: balanced


def test_shard_from_slurm_arrays_starting_at_0_or_1():
    assert Shard.from_slurm({}) is None
    assert Shard.from_slurm({"SLURM_ARRAY_TASK_ID": "3"}) is None  # not an array job with a count
    env0 = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}
    assert [Shard.from_slurm({**env0, "SLURM_ARRAY_TASK_ID": str(t)}) for t in range(4)] == \
        [Shard(i, 4) for i in range(4)]
    env1 = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}
    assert [Shard.from_slurm({**env1, "SLURM_ARRAY_TASK_ID": str(t)}) for t in range(1, 5)] == \
        [Shard(i, 4) for i in range(4)]
    assert Shard.from_slurm({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == Shard(2, 3)
    assert Shard(1, 4).suffix == ".shard-1-of-4"


def test_shard_from_slurm_refuses_arrays_with_gaps_or_steps():
    from explain_cli.errors import UserError

    gaps = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",  # --array=0,2,5
            "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "5"}
    steps = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",  # --array=0-6:2
             "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6"}
    for env in (gaps, steps):
        with pytest.raises(UserError, match="contiguous array"):
            Shard.from_slurm(env)
    # a throttled array (--array=0-7%2) is contiguous
    assert Shard.from_slurm({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "8",
                             "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "7"}) == Shard(7, 8)


def test_shard_option_parsing():
    assert Shard.parse("2/5") == Shard(2, 5)
    for bad in ("5/5", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(Exception, match="--shard"):
            Shard.parse(bad)


def test_run_picks_the_shard_from_slurm_env(tiny_project, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 0, result.output
    out = tiny_project / "out"
    assert images_of(out / "topk.shard-1-of-2.csv") == {"a/two.jpg", "three.bmp"}
    info = json.loads((out / "run.shard-1-of-2.json").read_text())
    assert info["shard"] == {"index": 1, "count": 2} and info["status"] == "complete"
    assert not (out / "topk.csv").exists()


# --- merge --------------------------------------------------------------------------------

def run_shards(project: Path, n: int, out: Path, *extra, only=None, failing=()) -> None:
    """Run shards ``only`` (default all) of ``n``; each exits 0, or 3 for those in ``failing`` (a shard
    holding an unreadable image: shards take every n-th image of the sorted list)."""
    for i in range(n) if only is None else only:
        result = invoke("run", project / "config.yaml", "--no-progress", "--output", out,
                        "--shard", f"{i}/{n}", *extra)
        assert result.exit_code == (3 if i in failing else 0), result.output


def test_sharded_run_merges_to_the_unsharded_result_and_merge_is_idempotent(tiny_project):
    (tiny_project / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = tiny_project / "config.yaml"
    full, sharded = tiny_project / "full", tiny_project / "sharded"
    assert invoke("run", cfg, "--no-progress", "--output", full).exit_code == 3
    # shards may differ in batch size and device (results are seeded per image)
    # sorted: a/one, a/two, b/one, broken, three; shard 0 of 3 takes images 0 and 3, so broken.png
    run_shards(tiny_project, 3, sharded, only=[0, 2], failing=[0])
    run_shards(tiny_project, 3, sharded, "--set", "batch_size=5", "--device", "cpu", only=[1])
    for i in range(3):
        assert (sharded / f"topk.shard-{i}-of-3.csv").exists()
    result = invoke("merge", sharded)
    assert result.exit_code == 3, result.output  # an image failed, as the unsharded run says (issue 31)
    assert "merged 3 shard(s): 5 images, 4 explained, 1 failed" in result.output
    assert_rows_close(read_rows(sharded / "topk.csv"), read_rows(full / "topk.csv"))
    assert read_rows(sharded / "errors.csv") == read_rows(full / "errors.csv")
    rows = read_rows(sharded / "topk.csv")
    assert rows == sorted(rows, key=lambda r: (r[0], int(r[1])))
    for stem in ("a/one.png", "a/two.jpg", "b/one.png", "three.bmp"):
        assert (sharded / "overlays" / f"{stem}.svg").exists()
    info = json.loads((sharded / "run.json").read_text())
    assert info["merged"] is True and info["shards"] == 3 and info["status"] == "complete"
    assert info["counts"] == {"images": 5, "explained": 4, "failed": 1, "topk_rows": 8}
    assert [s["index"] for s in info["per_shard"]] == [0, 1, 2]

    before = {p: p.read_bytes() for p in (sharded / "topk.csv", sharded / "errors.csv", sharded / "run.json")}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    result = invoke("merge", sharded)
    assert result.exit_code == 3 and "already up to date" in result.output
    assert {p: p.read_bytes() for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes
    # a shard rerun (everything already done) and a new merge: still the same files
    run_shards(tiny_project, 3, sharded, only=[1])
    assert invoke("merge", sharded).exit_code == 3
    assert {p: p.read_bytes() for p in before if p.suffix == ".csv"} == \
        {p: b for p, b in before.items() if p.suffix == ".csv"}


def test_merge_refuses_missing_or_unfinished_shards(tiny_project):
    out = tiny_project / "out"
    run_shards(tiny_project, 4, out, only=[0, 1, 3])
    result = invoke("merge", out)
    assert result.exit_code == 2
    assert "shard 2 of 4 is missing" in result.output and "topk.shard-2-of-4.csv" in result.output
    assert "--shard 2/4" in result.output and "Traceback" not in result.output
    assert not (out / "topk.csv").exists()

    run_shards(tiny_project, 4, out, only=[2])
    run_json = out / "run.shard-1-of-4.json"
    info = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**info, "status": "interrupted", "interrupted_by": "SIGTERM"}))
    result = invoke("merge", out)
    assert result.exit_code == 2
    assert "run.shard-1-of-4.json" in result.output and "interrupted by SIGTERM" in result.output
    run_json.write_text(json.dumps({**info, "status": "running"}))  # killed by SIGKILL
    result = invoke("merge", out)
    assert result.exit_code == 2 and "did not finish" in result.output and "run.shard-1-of-4.json" in result.output
    run_json.write_text(json.dumps(info))
    (out / "errors.shard-3-of-4.csv").unlink()
    result = invoke("merge", out)
    assert result.exit_code == 2 and "errors.shard-3-of-4.csv" in result.output
    run_shards(tiny_project, 4, out, only=[3])  # the rerun writes the missing file again
    result = invoke("merge", out)
    assert result.exit_code == 0, result.output


def test_merge_refuses_a_shard_still_running(tiny_project):
    out = tiny_project / "out"
    run_shards(tiny_project, 2, out)
    with open(out / ".explain-cli.shard-1-of-2.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke("merge", out)
    assert result.exit_code == 2 and "shard 1 of 2 is still running" in result.output
    assert invoke("merge", out).exit_code == 0


def test_merge_refuses_different_configs(tiny_project):
    out = tiny_project / "out"
    run_shards(tiny_project, 3, out, only=[0, 2])
    run_shards(tiny_project, 3, out, "--set", "explainer.nsamples=8", only=[1])
    result = invoke("merge", out)
    assert result.exit_code == 2
    assert "run.shard-1-of-3.json and run.shard-0-of-3.json have different configs" in result.output
    assert "explainer.nsamples: 16 vs 8" in result.output


def test_merge_refuses_mixed_shard_counts(tiny_project):
    out = tiny_project / "out"
    run_shards(tiny_project, 2, out)
    run_shards(tiny_project, 4, out, only=[0])
    result = invoke("merge", out)
    assert result.exit_code == 2 and "different N" in result.output
    assert "N=2: " in result.output and "N=4: " in result.output
    assert "topk.shard-0-of-4.csv" in result.output and "run.shard-1-of-2.json" in result.output


def test_merge_refuses_limit_and_duplicate_images(tiny_project):
    out = tiny_project / "out"
    run_shards(tiny_project, 2, out, "--limit", "1")
    result = invoke("merge", out)
    assert result.exit_code == 2 and "--limit 1" in result.output and "run.shard-0-of-2.json" in result.output
    run_shards(tiny_project, 2, out)  # without --limit: the rest of each shard
    assert invoke("merge", out).exit_code == 0
    # an image in two shards (e.g. files copied from another run)
    row = (out / "topk.shard-0-of-2.csv").read_text().splitlines()[1]
    with open(out / "topk.shard-1-of-2.csv", "a") as fh:
        fh.write(row + "\n")
    result = invoke("merge", out)
    assert result.exit_code == 2
    assert "in two shards: topk.shard-0-of-2.csv and topk.shard-1-of-2.csv" in result.output


def test_merge_refuses_to_overwrite_an_unsharded_run(tiny_project):
    out = tiny_project / "out"
    assert invoke("run", tiny_project / "config.yaml", "--no-progress").exit_code == 0
    result = invoke("merge", out)
    assert result.exit_code == 2 and "nothing to merge" in result.output
    run_shards(tiny_project, 2, out)
    result = invoke("merge", out)
    assert result.exit_code == 2 and "unsharded run" in result.output and "move them away" in result.output
    assert invoke("merge", tiny_project / "nowhere").exit_code == 2
    empty = tiny_project / "empty"
    empty.mkdir()
    result = invoke("merge", empty)
    assert result.exit_code == 2 and "no shard files" in result.output


def test_merge_help_and_no_torch_at_import():
    result = invoke("merge", "--help")
    assert result.exit_code == 0 and "Exit codes" in result.output
    code = ("import sys, explain_cli.cli, explain_cli.merge; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}).returncode == 0


# --- the lock -------------------------------------------------------------------------------

def test_second_run_of_the_same_shard_exits_2(tiny_project):
    out = tiny_project / "out"
    out.mkdir()
    with open(out / ".explain-cli.shard-0-of-2.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--shard", "0/2")
        assert result.exit_code == 2
        assert "another explain-cli run is writing to" in result.output and "shard-0-of-2.lock" in result.output
        # another shard of the same folder is not blocked
        result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--shard", "1/2")
        assert result.exit_code == 0, result.output
    assert not (out / "topk.shard-0-of-2.csv").exists()
    assert invoke("run", tiny_project / "config.yaml", "--no-progress", "--shard", "0/2").exit_code == 0


# --- logging and progress ---------------------------------------------------------------------

def test_log_file_quiet_verbose_and_progress_lines(tiny_project):
    cfg = tiny_project / "config.yaml"
    (tiny_project / "images" / "broken.png").write_bytes(b"not an image")
    log_file = tiny_project / "logs" / "run.log"
    result = invoke("run", cfg, "--log-file", log_file)
    assert result.exit_code == 3
    assert "progress: 5/5 images" in result.output and "ETA" in result.output  # not a terminal: lines
    text = log_file.read_text()
    assert "WARNING: broken.png" in text
    assert text.splitlines()[0][:4].isdigit()  # timestamped

    result = invoke("run", cfg, "-q", "--no-progress", "--log-file", log_file)
    assert result.exit_code == 3
    assert "resuming" not in result.output          # -q: no INFO on the terminal...
    assert "resuming: 4 of 5 images already done" in log_file.read_text()  # ...but in the log file
    assert "failed 1" in result.output              # the summary still says what failed

    (tiny_project / "images" / "broken.png").unlink()
    result = invoke("run", cfg, "-q", "--no-progress")
    assert result.exit_code == 0 and result.output.strip() == ""  # quiet and nothing to report
    result = invoke("run", cfg, "-v", "--no-progress")
    assert "resuming: 4 of 4 images already done" in result.output
    assert "progress:" not in result.output


# --- OOM back-off ---------------------------------------------------------------------------

class _OomAbove:
    """Wraps an explainer: raises CUDA OOM while context.batch_size is above ``limit``."""

    def __init__(self, inner, limit: int) -> None:
        self.inner = inner
        self.context = inner.context
        self.limit = limit
        self.calls: list[int] = []

    def __getattr__(self, name):  # the explainer hooks the pipeline calls (check_run, images_per_step, ...)
        return getattr(self.inner, name)

    def explain(self, images, top_k, seeds):
        import torch

        self.calls.append(self.context.batch_size)
        if self.context.batch_size > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.explain(images, top_k, seeds)


def test_explain_with_backoff_halves_down_to_1(caplog):
    from types import SimpleNamespace

    from explain_cli.pipeline import explain_with_backoff

    class Fake:
        def __init__(self, limit):
            self.context = SimpleNamespace(batch_size=48)
            self.limit, self.calls = limit, []

        def explain(self, images, top_k, seeds):
            import torch

            self.calls.append(self.context.batch_size)
            if self.context.batch_size > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return "ok"

    fake = Fake(limit=10)
    with caplog.at_level(logging.WARNING, logger="explain_cli"):
        assert explain_with_backoff(fake, None, 2, [0]) == "ok"
    assert fake.calls == [48, 24, 12, 6] and fake.context.batch_size == 6
    assert "out of memory at batch_size 48; retrying with 24" in caplog.text
    assert "retrying with 6" in caplog.text

    never = Fake(limit=0)
    import torch

    with pytest.raises(torch.cuda.OutOfMemoryError):
        explain_with_backoff(never, None, 2, [0])
    assert never.calls == [48, 24, 12, 6, 3, 1]

    class Other(Fake):
        def explain(self, images, top_k, seeds):
            self.calls.append(self.context.batch_size)
            raise ValueError("not an OOM")

    other = Other(limit=0)
    with pytest.raises(ValueError):
        explain_with_backoff(other, None, 2, [0])
    assert other.calls == [48]  # other errors are not retried here


def test_oom_in_a_run_backs_off_then_gives_the_same_numbers(tiny_project, monkeypatch):
    from explain_cli import pipeline

    cfg = tiny_project / "config.yaml"
    assert invoke("run", cfg, "--no-progress", "--output", tiny_project / "ref").exit_code == 0
    real = pipeline.make_explainer
    made = []

    def oom_explainer(prep, background, limit):
        made.append(_OomAbove(real(prep, background), limit))
        return made[-1]

    monkeypatch.setattr(pipeline, "make_explainer", lambda p, b: oom_explainer(p, b, 5))
    log_file = tiny_project / "oom.log"
    result = invoke("run", cfg, "--no-progress", "--output", tiny_project / "oom", "--log-file", log_file)
    assert result.exit_code == 0, result.output
    assert made[0].calls[:4] == [32, 16, 8, 4]
    assert "out of memory at batch_size 32; retrying with 16" in log_file.read_text()
    assert_rows_close(read_rows(tiny_project / "oom" / "topk.csv"), read_rows(tiny_project / "ref" / "topk.csv"))

    # still out of memory at batch size 1: those images become errors, the run goes on
    monkeypatch.setattr(pipeline, "make_explainer", lambda p, b: oom_explainer(p, b, 0))
    result = invoke("run", cfg, "--no-progress", "--output", tiny_project / "oom0")
    assert result.exit_code == 3
    errors = read_rows(tiny_project / "oom0" / "errors.csv")
    assert sorted(e[0] for e in errors) == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]
    assert all("OutOfMemoryError" in e[1] for e in errors)


# --- signals and resume ---------------------------------------------------------------------

def _start(project: Path, out: Path, *extra, gate: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(REPO)]), "MPLBACKEND": "Agg",
           **(gate or {})}
    for name in SLURM_VARS:
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "explain_cli", "run", str(project / "config.yaml"),
                             "--output", str(out), *extra], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _check_csv_whole(path: Path) -> list[list[str]]:
    text = path.read_text()
    assert text.endswith("\n")  # no torn last line
    rows = read_rows(path)
    assert all(len(r) == len(TOPK_COLUMNS) for r in rows)
    keys = [(r[0], r[1]) for r in rows]
    assert len(keys) == len(set(keys))  # no image twice
    return rows


def test_sigterm_stops_cleanly_and_a_rerun_finishes_the_rest(tiny_project):
    names = add_images(tiny_project, 24)
    out, ref = tiny_project / "out", tiny_project / "ref"
    # in-process writing: rows appear step by step (tests/test_workers.py signals a run with workers)
    gate, hold = gated_env(tiny_project, out / "topk.csv")  # held mid-run: the signal cannot come too late
    proc = _start(tiny_project, out, "--workers", "0", gate=gate)
    wait_for_gate(proc, hold)
    proc.send_signal(signal.SIGTERM)
    hold.unlink()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr
    assert "SIGTERM received: finishing the current model call" in stderr
    assert "stopped by SIGTERM after" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    rows = _check_csv_whole(out / "topk.csv")
    done = {r[0] for r in rows}
    assert 0 < len(done) < 28
    for rel in done:  # a row means the image's overlay exists
        assert (out / "overlays" / f"{rel}.svg").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted_by"] == "SIGTERM"
    assert info["counts"]["explained"] == len(done)
    assert not list(out.rglob("*.tmp"))

    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out)
    assert result.exit_code == 0, result.output
    assert f"explained {28 - len(done)}, already done {len(done)}" in result.output
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", ref)
    assert result.exit_code == 0
    assert_rows_close(_check_csv_whole(out / "topk.csv"), read_rows(ref / "topk.csv"))
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    for rel in names + ["a/one.png", "b/one.png", "three.bmp"]:
        assert (out / "overlays" / f"{rel}.svg").exists()


def test_sigint_stops_with_130(tiny_project):
    add_images(tiny_project, 24)
    out = tiny_project / "out"
    gate, hold = gated_env(tiny_project, out / "topk.shard-0-of-1.csv")
    proc = _start(tiny_project, out, "--shard", "0/1", "--workers", "0", gate=gate)
    wait_for_gate(proc, hold)
    proc.send_signal(signal.SIGINT)
    hold.unlink()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    _check_csv_whole(out / "topk.shard-0-of-1.csv")
    info = json.loads((out / "run.shard-0-of-1.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted_by"] == "SIGINT"
    result = invoke("merge", out)  # an interrupted shard is not merged
    assert result.exit_code == 2 and "interrupted by SIGINT" in result.output


def test_merge_pads_a_shard_of_an_earlier_version(tmp_path):
    """A shard CSV written before a column was added (nsamples_used) is read with blank cells for it,
    as CsvLog pads on resume; a foreign header is still refused."""
    from explain_cli.errors import UserError
    from explain_cli.merge import _read_csv

    old = tmp_path / "topk.shard-0-of-2.csv"
    old.write_text(",".join(TOPK_COLUMNS[:-1]) + "\n" + ",".join(["a.png", "1"] + ["0"] * (len(TOPK_COLUMNS) - 3)) + "\n")
    rows = _read_csv(old, TOPK_COLUMNS)
    assert len(rows) == 1 and len(rows[0]) == len(TOPK_COLUMNS) and rows[0][-1] == ""
    foreign = tmp_path / "topk.shard-1-of-2.csv"
    foreign.write_text("image,score\na.png,1\n")
    with pytest.raises(UserError, match="not an explain-cli CSV"):
        _read_csv(foreign, TOPK_COLUMNS)
