"""A real Slurm array job: configs/slurm/submit.sh submits 4 shards and a dependent merge; the
merged topk.csv must equal an unsharded run's.

Needs a single-node cluster: CI runs `bash .ci/slurm-up.sh` first; this module runs it too
(it is idempotent and returns at once when the cluster is up). Skipped only when the machine
cannot host one: not root, no apt-get / no package mirror, or sbatch missing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_images

pytestmark = pytest.mark.slurm

SLURM_UP = REPO / ".ci" / "slurm-up.sh"
SUBMIT = REPO / "configs" / "slurm" / "submit.sh"
TEMPLATE = REPO / "configs" / "slurm" / "explain-array.sbatch"
WAIT_S = int(os.environ.get("SLURM_TEST_TIMEOUT", "420"))


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Bring the single-node cluster up (or find it up); skip only where it cannot exist."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if shutil.which("sbatch") and _node_ready():
            return  # a cluster someone else runs, usable as this user
        pytest.skip("Slurm tests need root to set up the single-node cluster (.ci/slurm-up.sh)")
    proc = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:  # slurm-up.sh: this machine cannot host the cluster
        pytest.skip(f"no Slurm cluster: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0:
        pytest.fail(f".ci/slurm-up.sh failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    if not shutil.which("sbatch"):
        pytest.skip("sbatch is not on PATH after .ci/slurm-up.sh")


def _node_ready() -> bool:
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s.strip("*~#") in ("idle", "mixed", "allocated")
                                        for s in proc.stdout.split())


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))[1:]


def _job_field(job: str, key: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    values = re.findall(rf"\b{key}=(\S+)", out)
    return ",".join(values)


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted(out.glob("slurm-*.out")))


def _slurm_env(project: Path) -> dict[str, str]:
    """The documented CPU-only setting: the template as it is, and SBATCH_GRES=none (this node has
    no GPU: the template's --gres=gpu:1 alone is refused by sbatch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(project), str(REPO)]),
        "MPLBACKEND": "Agg",
        "EXPLAIN_CLI": f"{sys.executable} -m explain_cli",
        "SBATCH_GRES": "none",
        "MERGE_SBATCH_ARGS": "--mem=1G",
    })
    return env


def _submit_and_wait(config: Path, out: Path, tasks: int, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """configs/slurm/submit.sh CONFIG OUT TASKS, then wait until the array and its merge job have left
    the queue; fails with the jobs' logs when a task failed or time ran out. (array id, merge id)."""
    proc = subprocess.run(["bash", str(SUBMIT), str(config), str(out), str(tasks),
                           "--cpus-per-task=1", "--mem=1G", "--time=00:15:00"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    array_id = re.search(r"submitted array job (\d+)", proc.stdout).group(1)
    merge_id = re.search(r"submitted merge job (\d+)", proc.stdout).group(1)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            q = subprocess.run(["squeue", "-h", "-j", f"{array_id},{merge_id}", "-o", "%i %T %r"],
                               capture_output=True, text=True)
            if q.returncode == 0 and not q.stdout.strip():
                break
            if "DependencyNeverSatisfied" in q.stdout:
                pytest.fail(f"an array task failed, the merge cannot run:\n{q.stdout}\n{_logs(out)}")
            if time.monotonic() > deadline:
                pytest.fail(f"jobs not done after {WAIT_S}s:\n{q.stdout}\n{_logs(out)}")
            time.sleep(1)
    finally:
        subprocess.run(["scancel", array_id, merge_id], capture_output=True)
    assert _job_field(merge_id, "JobState") == "COMPLETED", _logs(out)
    assert set(_job_field(array_id, "ExitCode").split(",")) == {"0:0"}, _logs(out)
    return array_id, merge_id


def test_array_job_and_merge_equal_an_unsharded_run(tiny_project, slurm_cluster):
    write_images(tiny_project / "images", [f"many/im{i:02d}.png" for i in range(8)], seed=3)
    n_images = 12  # 4 of tiny_project + 8
    assert "#SBATCH --gres=gpu:1\n" in TEMPLATE.read_text()  # the template as it is
    out = tiny_project / "slurm-out"
    env = _slurm_env(tiny_project)
    started = time.monotonic()
    _submit_and_wait(tiny_project / "config.yaml", out, 4, env, cwd=tiny_project)
    elapsed = time.monotonic() - started
    print(f"slurm array (4 tasks) + merge: {elapsed:.1f} s")

    for i in range(4):
        info = json.loads((out / f"run.shard-{i}-of-4.json").read_text())
        assert info["status"] == "complete" and info["shard"] == {"index": i, "count": 4}
        assert info["counts"]["selected"] == n_images // 4
    merged = json.loads((out / "run.json").read_text())
    assert merged["merged"] is True and merged["counts"]["images"] == n_images
    assert merged["counts"]["explained"] == n_images
    assert "merged 4 shard(s)" in _logs(out)

    # The same run, unsharded and in one process.
    ref = tiny_project / "ref"
    from typer.testing import CliRunner

    from explain_cli.cli import app

    result = CliRunner().invoke(app, ["run", str(tiny_project / "config.yaml"), "--no-progress",
                                      "--output", str(ref)])
    assert result.exit_code == 0, result.output
    got, want = _read(out / "topk.csv"), _read(ref / "topk.csv")
    assert len(got) == 2 * n_images
    from test_batch_ops import assert_rows_close

    assert_rows_close(got, want)  # image, rank, class exactly; text cells exactly; numbers to 1e-4
    assert _read(out / "errors.csv") == []
    for rel in {r[0] for r in got}:
        assert (out / "overlays" / f"{rel}.svg").exists()


def test_slide_array_job_merges_to_the_unsharded_heatmaps(tmp_path, monkeypatch, slurm_cluster):
    """The Slurm template runs a slide config unchanged: tiles split over the tasks, the merge job
    stitches one heatmap per slide, equal to an unsharded run's."""
    import numpy as np

    from test_slides import project, spec
    from explain_cli.slides.synthetic import write_slide

    config = project(tmp_path, monkeypatch)
    for i in range(2):
        write_slide(tmp_path / "slides" / f"s{i}.tif", spec(seed=i, planted=[(64 * (i + 2), 128, 40)]))
    out = tmp_path / "slurm-out"
    _submit_and_wait(config, out, 2, _slurm_env(tmp_path), cwd=tmp_path)
    from typer.testing import CliRunner

    from explain_cli.cli import app

    ref = tmp_path / "ref"
    result = CliRunner().invoke(app, ["run", str(config), "--no-progress", "--output", str(ref)])
    assert result.exit_code == 0, result.output
    for i in range(2):
        with np.load(out / "slides" / f"s{i}" / "maps.npz") as got, np.load(ref / "slides" / f"s{i}" / "maps.npz") as want:
            np.testing.assert_allclose(got["attribution"], want["attribution"], rtol=1e-5, atol=1e-6)
        assert (out / "slides" / f"s{i}" / "heatmap-tumor.png").exists()
