"""A stop that stops: a signal ends the run at the next model call, not the end of the step; a
signal after the last image leaves a complete run (issue 32, item 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from conftest import REPO, SLURM_VARS, gated_env, wait_for_gate, write_images
from explain_cli.cli import app


def _long_steps(project) -> None:
    """8 images per step, 64 samples each, 8 rows per model call: 64 model calls per step."""
    write_images(project / "images", [f"many/im{i:02d}.png" for i in range(20)], seed=1)
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["explainer"] = {"name": "gradient", "nsamples": 64}
    config["batch_size"] = 8
    config["workers"] = 0
    (project / "config.yaml").write_text(yaml.safe_dump(config))


def test_sigterm_stops_at_the_next_model_call(tiny_project):
    _long_steps(tiny_project)
    out, calls = tiny_project / "out", tiny_project / "calls.bin"
    gate, hold = gated_env(tiny_project, out / "topk.csv")  # held in the second step's first call
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tiny_project), str(REPO)]), "MPLBACKEND": "Agg",
           "TINY_CALLS": str(calls), **gate}
    for name in SLURM_VARS:
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "explain_cli", "run", str(tiny_project / "config.yaml"),
                             "--no-progress"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_gate(proc, hold)
    at_signal = calls.stat().st_size
    proc.send_signal(signal.SIGTERM)
    hold.unlink()
    _, stderr = proc.communicate(timeout=300)
    after = calls.stat().st_size - at_signal
    assert proc.returncode == 143, stderr
    assert "finishing the current model call" in stderr and "Traceback" not in stderr
    # the held call finishes, then the run stops: not the ~60 calls left in the step
    assert after <= 2, f"{after} model calls after the signal"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted_by"] == "SIGTERM"
    done = info["counts"]["explained"]
    assert 0 < done < 24
    result = CliRunner().invoke(app, ["run", str(tiny_project / "config.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"already done {done}" in result.output or f"{done} of" in result.output


def test_a_signal_after_the_last_image_leaves_a_complete_run(tiny_project, monkeypatch):
    from explain_cli import stages

    real_drain = stages.Writer.drain

    def drain_after_a_signal(self):  # every image explained; the signal comes before the last writes
        os.kill(os.getpid(), signal.SIGTERM)
        return real_drain(self)

    monkeypatch.setattr(stages.Writer, "drain", drain_after_a_signal)
    result = CliRunner().invoke(app, ["run", str(tiny_project / "config.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "came after the last image" in result.output
    info = json.loads((tiny_project / "out" / "run.json").read_text())
    assert info["status"] == "complete" and "interrupted_by" not in info
    assert info["counts"]["explained"] == 4
