"""The progress heartbeat counts model evaluations inside an image; -q and --log-file."""

from __future__ import annotations

import io
import re
import time

import yaml
from typer.testing import CliRunner

from explain_cli import progress as progress_mod
from explain_cli.cli import app
from explain_cli.explainers import _utils
from explain_cli.progress import Progress

SLOW_MODEL = '''
import time
import torch
from torch import nn


class Slow(nn.Module):
    """The tiny net, 50 ms per call: one image of 100 samples takes about a second."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x):
        time.sleep(0.05)
        return self.net(x)


def make(num_classes=3):
    return Slow(num_classes)
'''


def test_line_counts_evaluations_and_estimates_the_rest():
    stream = io.StringIO()
    p = Progress(2, stream=stream)
    p.per_image = 100
    with _utils.counting_evaluations(p.evaluated):
        _utils.count_evaluations(30)
        _utils.count_evaluations(20)
    _utils.count_evaluations(99)  # outside: nobody listens
    line = p.line()
    assert line.startswith("progress: 0/2 images, 50/200 model evaluations, ")
    assert "evaluations/s" in line and re.search(r"ETA \d+:\d\d", line)
    p.update(2)
    assert p.line().endswith("ETA 0:00")


def test_heartbeat_prints_while_an_image_is_explained(tiny_project, monkeypatch):
    """One image, one slow model: lines come during the image, with evaluations counted exactly."""
    (tiny_project / "slownet.py").write_text(SLOW_MODEL)
    cfg = yaml.safe_load((tiny_project / "config.yaml").read_text())
    cfg["model"] = {"arch": "python:slownet:make", "num_classes": 3}
    cfg["explainer"] = {"name": "gradient", "nsamples": 100}
    cfg["batch_size"] = 8
    (tiny_project / "slow.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL", 0.02)
    result = CliRunner().invoke(app, ["run", str(tiny_project / "slow.yaml"), "--limit", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("progress:")]
    during = [line for line in lines if line.startswith("progress: 0/1 images, ")]
    counts = [int(m.group(1)) for m in (re.search(r"images, (\d+)/101 model evaluations", x) for x in during) if m]
    assert counts and max(counts) > 0, lines  # the heartbeat moved inside the image
    assert lines[-1].startswith("progress: 1/1 images, 101/101 model evaluations")  # 100 samples + ranking


def test_terminal_bar_moves_with_evaluations():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    p = Progress(2, stream=stream)
    p.set_evaluations_per_image(10)
    p.evaluated(5)
    assert p._bar.n == 5 and p._bar.total == 20 and p._bar.unit == "eval"  # moved inside image 1
    p.evaluated(100)  # more than announced (a retried batch): the bar stops at its total
    p.update(1)
    p.close()
    assert "20/20" in stream.getvalue() and "1/2 img" in stream.getvalue()


def test_quiet_silences_progress_and_the_log_file_gets_the_summary(tiny_project):
    log_file = tiny_project / "run.log"
    result = CliRunner().invoke(app, ["run", str(tiny_project / "config.yaml"), "-q", "--log-file", str(log_file)])
    assert result.exit_code == 0
    assert result.output.strip() == ""  # -q: no progress line, no summary (nothing failed)
    text = log_file.read_text()
    assert re.search(r"INFO: explained 4, already done 0, failed 0 of 4 images \(1 more skipped by input.exclude\) in [\d.]+ s", text), text
