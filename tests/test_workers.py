"""Writer processes (`workers`): usable cores, same outputs as in-process, failures, signals."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, gated_env, wait_for_gate, write_images
from explain_cli.cli import app
from explain_cli.job import AUTO_WORKERS_MIN_IMAGES, cgroup_cpu_limit, resolve_workers, torch_threads, usable_cores

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))[1:]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)


# --- usable cores ------------------------------------------------------------------------------

def _cgroup_v2(tmp_path: Path, own: str | None, parent: str | None = None) -> tuple[Path, Path]:
    root = tmp_path / "cg2"
    (root / "job" / "step").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    if parent is not None:
        (root / "job" / "cpu.max").write_text(parent + "\n")
    if own is not None:
        (root / "job" / "step" / "cpu.max").write_text(own + "\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    return root, proc


def test_slurm_task_with_4_cpus_on_a_64_core_node_starts_3_workers(tmp_path):
    node = set(range(64))
    cores = usable_cores(node, {"SLURM_CPUS_PER_TASK": "4"}, tmp_path / "none", tmp_path / "none")
    assert cores == 4
    assert resolve_workers("auto", cores, 1000) == 3
    assert torch_threads(cores, 3, {}) == 1
    # without Slurm the whole node counts
    assert usable_cores(node, {}, tmp_path / "none", tmp_path / "none") == 64


def test_usable_cores_is_the_smallest_of_affinity_slurm_and_quota(tmp_path):
    root, proc = _cgroup_v2(tmp_path, "300000 100000")
    assert usable_cores(set(range(8)), {}, root, proc) == 3  # the quota
    assert usable_cores({0, 1}, {"SLURM_CPUS_PER_TASK": "6"}, root, proc) == 2  # the affinity
    assert usable_cores(set(range(8)), {"SLURM_CPUS_PER_TASK": "1"}, root, proc) == 1  # Slurm
    assert usable_cores(set(range(8)), {"SLURM_CPUS_PER_TASK": "junk"}, root, proc) == 3


def test_cgroup_v2_quota_rounds_up_and_parents_count(tmp_path):
    root, proc = _cgroup_v2(tmp_path, "150000 100000")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    assert usable_cores(set(range(8)), {}, root, proc) == 2
    root, proc = _cgroup_v2(tmp_path / "b", "max 100000")
    assert cgroup_cpu_limit(root, proc) is None
    root, proc = _cgroup_v2(tmp_path / "c", "max 100000", parent="200000 100000")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(2.0)
    root, proc = _cgroup_v2(tmp_path / "d", "50000 100000")
    assert usable_cores(set(range(8)), {}, root, proc) == 1


def test_cgroup_v1_quota_and_a_container_view(tmp_path):
    root = tmp_path / "cg1"
    step = root / "cpu,cpuacct" / "slurm" / "job"
    step.mkdir(parents=True)
    (step / "cpu.cfs_quota_us").write_text("400000\n")
    (step / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("5:memory:/slurm/job\n4:cpu,cpuacct:/slurm/job\n0::/\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(4.0)
    assert usable_cores(set(range(16)), {}, root, proc) == 4
    # in a container the mount already is our cgroup: the host path in /proc/self/cgroup does
    # not exist under it, and the quota at the mount's top is the one that applies
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("200000\n")
    proc.write_text("4:cpu,cpuacct:/docker/0123abcd\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(2.0)
    # no quota anywhere, no cgroup file at all
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing") is None


def test_auto_workers_and_torch_threads():
    assert resolve_workers("auto", 1, 1000) == 0  # one core: write in the main process
    assert resolve_workers("auto", 2, 1000) == 1
    assert resolve_workers("auto", 16, AUTO_WORKERS_MIN_IMAGES) == 0  # a tiny run: not worth starting
    assert resolve_workers("auto", 16, AUTO_WORKERS_MIN_IMAGES + 1) == 15
    assert resolve_workers(4, 2, 3) == 3  # never more workers than images
    assert resolve_workers(0, 64, 1000) == 0
    assert torch_threads(8, 7, {}) == 1 and torch_threads(8, 0, {}) == 8 and torch_threads(2, 5, {}) == 1
    assert torch_threads(8, 2, {"OMP_NUM_THREADS": "3"}) is None


# --- config and command line -------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--set", "workers=-1"], "workers: must be auto or a whole number >= 0"),
    (["--workers", "-2"], "workers: must be auto or a whole number >= 0"),
    (["--workers", "two"], "workers: must be auto or a whole number >= 0"),
    (["--set", "workers=1.5"], "workers: must be auto or a whole number >= 0"),
])
def test_bad_workers_exit_2_naming_the_key(tiny_project, args, message):
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_workers_from_config_and_command_line_reach_run_json(tiny_project, monkeypatch):
    cfg = tiny_project / "config.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["workers"] = 0
    cfg.write_text(yaml.safe_dump(data))
    assert invoke("run", cfg, "--no-progress", "--output", tiny_project / "o0").exit_code == 0
    info = json.loads((tiny_project / "o0" / "run.json").read_text())
    assert info["workers"] == 0 and info["config"]["workers"] == 0
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = invoke("run", cfg, "--no-progress", "--output", tiny_project / "o1", "--workers", "1")
    assert result.exit_code == 0, result.output
    info = json.loads((tiny_project / "o1" / "run.json").read_text())
    assert info["workers"] == 1 and info["config"]["workers"] == 1
    assert info["torch_threads"] == max(1, info["usable_cores"] - 1)


# --- outputs ----------------------------------------------------------------------------------

def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_workers_write_the_same_files_as_in_process(tiny_project, monkeypatch):
    # same torch thread count in both runs, so float round-off is the same too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_images(tiny_project / "images", [f"many/im{i:02d}.png" for i in range(12)], seed=3)
    (tiny_project / "images" / "broken.png").write_bytes(b"not an image")
    cfg = tiny_project / "config.yaml"
    outs = {}
    for workers in (0, 2):
        out = tiny_project / f"w{workers}"
        result = invoke("run", cfg, "--no-progress", "--output", out, "--workers", workers,
                        "--set", "output.save_values=true")
        assert result.exit_code == 3, result.output  # the broken image
        assert json.loads((out / "run.json").read_text())["workers"] == workers
        outs[workers] = out
    assert (outs[0] / "topk.csv").read_bytes() == (outs[2] / "topk.csv").read_bytes()
    assert (outs[0] / "errors.csv").read_bytes() == (outs[2] / "errors.csv").read_bytes()
    in_process, workers = _files(outs[0] / "overlays"), _files(outs[2] / "overlays")
    assert len(in_process) == 16 and in_process == workers
    values0, values2 = _files(outs[0] / "values"), _files(outs[2] / "values")
    assert len(values0) == 16 and values0.keys() == values2.keys()
    for name in values0:
        a, b = np.load(outs[0] / "values" / name), np.load(outs[2] / "values" / name)
        assert np.array_equal(a["values"], b["values"]) and np.array_equal(a["classes"], b["classes"])
    assert [r[0] for r in read_rows(outs[2] / "errors.csv")] == ["broken.png"]


def test_a_render_failure_in_a_worker_is_an_errors_row(tiny_project):
    out = tiny_project / "out"
    (out / "overlays" / "a" / "one.png.svg").mkdir(parents=True)  # the overlay cannot be renamed into place
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--workers", "1")
    assert result.exit_code == 3, result.output
    errors = read_rows(out / "errors.csv")
    assert [e[0] for e in errors] == ["a/one.png"]
    assert errors[0][1].startswith("cannot write outputs: IsADirectoryError")
    assert {r[0] for r in read_rows(out / "topk.csv")} == {"a/two.jpg", "b/one.png", "three.bmp"}
    assert not list(out.rglob("*.tmp"))
    (out / "overlays" / "a" / "one.png.svg").rmdir()
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--workers", "1")
    assert result.exit_code == 0 and "explained 1, already done 3" in result.output
    assert read_rows(out / "errors.csv") == []


def test_images_in_flight_are_bounded(tmp_path):
    from explain_cli.stages import WriteJob, Writer

    class Log:
        def __init__(self):
            self.rows = []

        def append(self, rows):
            self.rows.extend(rows)

    class Count:
        explained = failed = 0

    class Progress:
        def update(self, n):
            pass

    topk, errors, summary = Log(), Log(), Count()
    writer = Writer(topk, errors, summary, Progress(), workers=1, max_pending=3)
    rng = np.random.default_rng(0)
    try:
        for i in range(10):
            job = WriteJob(rel=f"im{i}.png", pixels=rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                           values=rng.normal(size=(2, 3, 16, 16)).astype(np.float32), titles=["a", "b"],
                           overlay_path=str(tmp_path / f"im{i}.svg"), fmt="svg", dpi=50)
            writer.submit(job, [[f"im{i}.png", 1], [f"im{i}.png", 2]])
            assert len(writer._pending) <= 3
            # a row only once its overlay exists
            assert all((tmp_path / f"{r[0][:-4]}.svg").exists() for r in topk.rows)
        writer.drain()
    finally:
        writer.close()
    assert [r[0] for r in topk.rows] == [f"im{i}.png" for i in range(10) for _ in (1, 2)]
    assert summary.explained == 10 and errors.rows == []


# --- signals: no orphans, resume ---------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(project: Path, out: Path, *extra, gate: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(REPO)]), "MPLBACKEND": "Agg",
           **(gate or {})}
    return subprocess.Popen([sys.executable, "-m", "explain_cli", "run", str(project / "config.yaml"),
                             "--output", str(out), "--no-progress", *extra], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for_workers(proc: subprocess.Popen, timeout: float = 600) -> list[int]:
    """The worker pids, as soon as they exist: they are started (inside the signal handlers)
    before the first step, so a signal now stops the run after its first step or two, well
    before the end, however fast or slow the machine is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = []
        for pid in _children(proc.pid):
            try:
                if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
                    workers.append(pid)
            except OSError:
                pass
        if workers:
            return workers
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no worker in time")


def _many_images(project: Path, n: int = 30) -> None:
    write_images(project / "images", [f"many/im{i:02d}.png" for i in range(n)], seed=1)


def test_sigterm_to_the_whole_job_stops_cleanly_without_orphans_and_resume_completes(tiny_project):
    """Like Slurm's scancel or a Ctrl-C in a terminal: every process of the group gets the signal."""
    _many_images(tiny_project, 50)
    out, ref = tiny_project / "out", tiny_project / "ref"
    # held mid-run, after the first rows: neither before the first step nor after the last
    gate, hold = gated_env(tiny_project, out / "topk.csv")
    proc = _start(tiny_project, out, "--workers", "2", gate=gate)
    workers = _wait_for_workers(proc)
    wait_for_gate(proc, hold)
    os.killpg(proc.pid, signal.SIGTERM)
    hold.unlink()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert not [p for p in workers if _alive(p)]
    rows = read_rows(out / "topk.csv")
    done = {r[0] for r in rows}
    assert 0 < len(done) < 54 and len(rows) == 2 * len(done)
    for rel in done:
        assert (out / "overlays" / f"{rel}.svg").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["counts"]["explained"] == len(done)
    assert not list(out.rglob("*.tmp"))

    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", out, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert f"explained {54 - len(done)}, already done {len(done)}" in result.output
    assert invoke("run", tiny_project / "config.yaml", "--no-progress", "--output", ref,
                  "--workers", "0").exit_code == 0
    got, want = read_rows(out / "topk.csv"), read_rows(ref / "topk.csv")
    assert [r[:4] for r in got] == [r[:4] for r in want]  # every image once, in order, same classes
    for g, w in zip(got, want):  # the first part ran with another torch thread count: round-off
        assert [float(x) for x in g[4:9]] == pytest.approx([float(x) for x in w[4:9]], rel=1e-4, abs=1e-6)
    assert _files(out / "overlays").keys() == _files(ref / "overlays").keys()


def test_workers_exit_when_the_main_process_is_killed(tiny_project):
    _many_images(tiny_project)
    out = tiny_project / "out"
    proc = _start(tiny_project, out, "--workers", "1")
    workers = _wait_for_workers(proc)
    time.sleep(1.0)  # let them start working
    proc.kill()  # SIGKILL: nothing in the main process runs
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 300  # an orphan lives forever; a loaded machine only makes this slower
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]
