"""``batch_size: auto``: the config key, the start values, and the search on a simulated GPU memory limit.

The search is the out-of-memory back-off started high; on the CPU it is tested with a model that
raises ``torch.cuda.OutOfMemoryError`` for batches above a limit, as a full GPU would.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from explain_cli import autobatch
from explain_cli.config import load_config
from explain_cli.errors import ConfigError
from explain_cli.explainers import deep, get, gradient, kernel, partition
from explain_cli.explainers.base import ExplainContext

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CPU = torch.device("cpu")


class OomAbove(nn.Module):
    """Wraps a model; a call with more than ``limit`` rows raises CUDA's out-of-memory error."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.largest_call = 0
        self.refused = 0

    def forward(self, x):
        if x.shape[0] > self.limit:
            self.refused += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows (simulated)")
        self.largest_call = max(self.largest_call, x.shape[0])
        return self.inner(x)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    return net


SETTINGS = {
    "gradient": gradient.Settings(nsamples=40),
    "deep": deep.Settings(),
    "partition": partition.Settings(mask="blur(4,4)", max_evals=60, batch_size=20),
    "kernel": kernel.Settings(nsamples=60, segments={"n_segments": 8, "compactness": 10, "sigma": 1}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    background = torch.randn(6, 3, 16, 16, generator=g) * 0.5
    images = torch.randn(3, 3, 16, 16, generator=g) + torch.randn(3, 3, 1, 1, generator=g)
    return background, images


def context(model, name, background, batch_size, auto=False) -> ExplainContext:
    return ExplainContext(model=model, layer=None, layer_name="input", background=background, mean=MEAN, std=STD,
                          device=CPU, batch_size=batch_size, settings=SETTINGS[name], batch_size_auto=auto)


# ------------------------------------------------------------------ the search


@pytest.mark.parametrize("name", ["gradient", "deep", "partition", "kernel"])
def test_auto_settles_on_the_largest_halving_that_fits_and_results_equal_fixed(data, name, caplog):
    background, images = data
    net = tiny_net()
    limit = 12  # below every explainer's rows per step; 4096 -> 2048 -> ... -> 16 -> 8 fits
    guarded = OomAbove(net, limit)
    start, auto = autobatch.initial_batch_size("auto", torch.device("cuda"))
    assert (start, auto) == (autobatch.CUDA_START, True)
    explainer = get(name).Explainer(context(guarded, name, background, start, auto))
    seeds = [11, 22, 33]
    with caplog.at_level(logging.INFO, logger="explain_cli"):
        first = autobatch.explain_with_backoff(explainer, images, 2, seeds)
    expected = start
    while expected > limit:
        expected //= 2
    assert expected == 8
    assert explainer.context.batch_size == expected and not explainer.context.batch_size_auto
    assert guarded.refused >= 1 and guarded.largest_call <= limit
    assert f"batch_size auto: {expected} rows per model call" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the search is no warning

    # remembered for the run: the next batch runs at once at the settled size, nothing refused
    refused = guarded.refused
    again = autobatch.explain_with_backoff(explainer, images, 2, seeds)
    assert guarded.refused == refused and explainer.context.batch_size == expected
    np.testing.assert_array_equal(again.values, first.values)

    # the numbers are those of a run with a fixed batch size and no memory limit
    fixed = get(name).Explainer(context(net, name, background, 64)).explain(images, 2, seeds)
    np.testing.assert_array_equal(first.classes, fixed.classes)
    np.testing.assert_allclose(first.values, fixed.values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first.shap_sum, fixed.shap_sum, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first.base_values, fixed.base_values, rtol=1e-5, atol=1e-6)


def test_oom_after_the_search_halves_again_with_a_warning(data, caplog):
    background, images = data
    guarded = OomAbove(tiny_net(), 100)
    explainer = gradient.Explainer(context(guarded, "gradient", background, 4096, auto=True))
    autobatch.explain_with_backoff(explainer, images, 2, [1, 2, 3])
    settled = explainer.context.batch_size
    assert settled == 64  # 3 images x 40 samples = 120 rows: calls of 120 rows (batch 128) do not fit
    guarded.limit = 20  # memory got tighter (another process on the card)
    with caplog.at_level(logging.INFO, logger="explain_cli"):
        autobatch.explain_with_backoff(explainer, images, 2, [1, 2, 3])
    assert explainer.context.batch_size == 16
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["out of memory at batch_size 64; retrying with 32",
                        "out of memory at batch_size 32; retrying with 16"]


def test_other_errors_are_not_retried(data):
    background, images = data

    class Broken(nn.Module):
        calls = 0

        def forward(self, x):
            Broken.calls += 1
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    explainer = gradient.Explainer(context(Broken(), "gradient", background, 4096, auto=True))
    with pytest.raises(RuntimeError, match="shapes"):
        autobatch.explain_with_backoff(explainer, images, 2, [1, 2, 3])
    assert Broken.calls == 1 and explainer.context.batch_size == 4096


def test_out_of_memory_at_one_row_is_raised(data):
    background, images = data
    explainer = gradient.Explainer(context(OomAbove(tiny_net(), 0), "gradient", background, 8))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        autobatch.explain_with_backoff(explainer, images, 2, [1, 2, 3])
    assert explainer.context.batch_size == 1


def test_is_oom_recognises_cuda_library_allocation_failures():
    assert autobatch.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert autobatch.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not autobatch.is_oom(ValueError("out of memory"))
    too_large = RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")
    assert autobatch.is_oom(too_large, searching=True) and not autobatch.is_oom(too_large)


def test_initial_batch_size():
    assert autobatch.initial_batch_size("auto", CPU) == (64, False)  # the CPU keeps today's value
    assert autobatch.initial_batch_size("auto", torch.device("cuda", 1)) == (autobatch.CUDA_START, True)
    assert autobatch.initial_batch_size(7, torch.device("cuda")) == (7, False)
    assert autobatch.initial_batch_size(300, CPU) == (300, False)


# ------------------------------------------------------------------ config and run


BASE = {"model": {"arch": "torchvision:resnet18", "num_classes": 3, "weights": "random"}, "input": {"dir": "imgs"}}


def load(tmp_path, **top):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, **top}))
    return load_config(path)


def test_config_batch_size_auto_is_the_default(tmp_path):
    assert load(tmp_path).batch_size == "auto"
    assert load(tmp_path, batch_size="auto").batch_size == "auto"
    assert load(tmp_path, batch_size=256).batch_size == 256


@pytest.mark.parametrize("value", [0, -3, "big", 1.5, True, None, "64"])
def test_config_bad_batch_size_names_the_key(tmp_path, value):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, batch_size=value)
    assert info.value.key == "batch_size"
    assert "'auto'" in str(info.value) and "integer >= 1" in str(info.value)


def test_run_json_records_the_batch_size_used(tiny_project):
    from typer.testing import CliRunner

    from explain_cli.cli import app

    cfg = yaml.safe_load((tiny_project / "config.yaml").read_text())
    cfg.pop("batch_size")  # the default: auto
    (tiny_project / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(tiny_project / "config.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    info = json.loads((tiny_project / "out" / "run.json").read_text())
    assert info["config"]["batch_size"] == "auto"
    assert info["batch_size_used"] == 64  # CPU: today's value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_settles_and_matches_a_fixed_batch(data):
    background, images = (t.cuda() for t in data)
    net = tiny_net().cuda()
    start, auto = autobatch.initial_batch_size("auto", torch.device("cuda"))
    ctx = ExplainContext(model=net, layer=None, layer_name="input", background=background, mean=MEAN, std=STD,
                         device=torch.device("cuda"), batch_size=start, settings=SETTINGS["gradient"],
                         batch_size_auto=auto)
    explainer = gradient.Explainer(ctx)
    result = autobatch.explain_with_backoff(explainer, images, 2, [1, 2, 3])
    assert not ctx.batch_size_auto and 1 <= ctx.batch_size <= start
    fixed = gradient.Explainer(ExplainContext(
        model=net, layer=None, layer_name="input", background=background, mean=MEAN, std=STD,
        device=torch.device("cuda"), batch_size=64, settings=SETTINGS["gradient"])).explain(images, 2, [1, 2, 3])
    np.testing.assert_allclose(result.values, fixed.values, rtol=1e-3, atol=1e-5)
