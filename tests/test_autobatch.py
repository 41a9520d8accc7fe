"""``batch_size: auto``: the config key, the start values, and the search on a simulated GPU memory limit.

The search is the out-of-memory back-off started high; on the CPU it is tested with a model that
raises ``torch.cuda.OutOfMemoryError`` for batches above a limit, as a full GPU would.
"""

from __future__ import annotations

import json
import logging
import os

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
    assert autobatch.initial_batch_size("auto", CPU) == (0, False)  # the CPU: plan_cpu decides
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
    probe = info["batch_size_auto"]  # CPU: the probe's candidates, timings and choice
    assert probe["candidates"] == autobatch.probe_candidates(10**9)  # a tiny model: no memory bound
    assert info["batch_size_used"] in probe["candidates"]
    assert probe["activation_mb_per_row"] < 1 and probe["memory_budget_mb"] > 0


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


# ------------------------------------------------------------------ the CPU: memory bound and probe


class FakeClock:
    """A clock that only moves when the test says: the probe's timings come from a cost model."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(probe: autobatch.BatchProbe, clock: FakeClock, cost, total: int, loops: int, start_size: int):
    """Run ``loops`` loops of ``total`` rows through ``_utils.model_chunks`` with ``cost(rows)``
    seconds per call; returns the call sizes and the context."""
    from types import SimpleNamespace

    from explain_cli.explainers import _utils

    ctx = SimpleNamespace(batch_size=start_size, batch_probe=probe, device=CPU)
    calls = []
    for _ in range(loops):
        covered = []
        for a, b in _utils.model_chunks(ctx, total):
            clock.now += cost(b - a)
            calls.append(b - a)
            covered.extend(range(a, b))
        assert covered == list(range(total))  # every row once, in order, whatever the sizes
    return calls, ctx


def per_row_cost(ms: dict[int, float]):
    return lambda rows: ms.get(rows, 1.0) * rows / 1000


def test_probe_times_each_candidate_twice_interleaved_then_keeps_the_fastest(caplog):
    clock = FakeClock()
    probe = autobatch.BatchProbe([8, 16, 32], clock=clock)
    with caplog.at_level(logging.INFO, logger="explain_cli"):
        calls, ctx = drive(probe, clock, per_row_cost({8: 30.0, 16: 20.0, 32: 25.0}), total=208, loops=3,
                           start_size=32)
    assert calls[:6] == [8, 16, 32, 8, 16, 32]  # the plan: the candidates, two rounds
    assert probe.choice == 16 and ctx.batch_size == 16
    assert set(calls[6:]) == {16}  # after the choice every call is 16 rows (208 = 112 + 6 x 16 = 13 x 16)
    assert {size: pytest.approx(t) for size, t in probe.per_row.items()} == {8: [0.03] * 2, 16: [0.02] * 2, 32: [0.025] * 2}
    assert "batch_size auto: 16 rows per model call" in caplog.text
    assert probe.summary()["ms_per_row"] == {"8": 30.0, "16": 20.0, "32": 25.0}


def test_probe_prefers_the_smaller_size_within_the_tolerance():
    clock = FakeClock()
    probe = autobatch.BatchProbe([8, 16, 32], clock=clock, tolerance=0.05)
    drive(probe, clock, per_row_cost({8: 20.9, 16: 20.5, 32: 20.0}), total=200, loops=1, start_size=32)
    assert probe.choice == 8  # 4.5% slower than 32 per row: the memory is not worth it
    probe = autobatch.BatchProbe([8, 16, 32], clock=clock, tolerance=0.05)
    drive(probe, clock, per_row_cost({8: 21.1, 16: 20.5, 32: 20.0}), total=200, loops=1, start_size=32)
    assert probe.choice == 16


def test_probe_counts_each_sizes_best_round():
    """A size's first call pays one-off costs (page faults, kernel choice): its best round counts."""
    clock = FakeClock()
    probe = autobatch.BatchProbe([8, 16], clock=clock)
    seen: dict[int, int] = {}

    def cost(rows):
        seen[rows] = seen.get(rows, 0) + 1
        first = {8: 1.0, 16: 100.0}[rows] if seen[rows] == 1 else 0.0
        return (first + {8: 30.0, 16: 20.0}[rows]) * rows / 1000

    drive(probe, clock, cost, total=48, loops=1, start_size=16)
    assert probe.choice == 16


def test_probe_does_not_count_short_calls():
    clock = FakeClock()
    probe = autobatch.BatchProbe([8, 16], clock=clock)
    calls, ctx = drive(probe, clock, per_row_cost({}), total=12, loops=2, start_size=16)
    # loop 1: a measured 8-row call, then its 4-row tail (16 planned); loop 2: one call of all 12
    assert calls == [8, 4, 12]
    assert probe.per_row == {8: [0.001]} and probe.plan == [16, 8, 16] and not probe.done
    assert ctx.batch_size == 16  # undecided: the loops are single calls anyway


def test_a_single_candidate_needs_no_probe():
    probe = autobatch.BatchProbe([4])
    assert probe.done and probe.choice == 4 and probe.size(99) == 99


def test_candidates_respect_the_memory_bound_and_the_limits():
    assert autobatch.PROBE_MIN == 16
    assert autobatch.probe_candidates(1000) == [64, 128, 256]  # PROBE_MAX caps a tiny model's bound
    assert autobatch.probe_candidates(100) == [16, 32, 64]
    assert autobatch.probe_candidates(40) == [16, 32]
    assert autobatch.probe_candidates(21) == [16]
    assert autobatch.probe_candidates(9) == [9]  # below PROBE_MIN: the bound itself, no probe
    assert autobatch.probe_candidates(1) == [1]
    for bound in range(1, 600):
        assert max(autobatch.probe_candidates(bound)) <= bound


def test_memory_bound_from_bytes_per_row_and_the_jobs_headroom():
    mb = 2**20
    cap = autobatch.CPU_CALL_BYTES
    assert autobatch.memory_bound(10 * mb, None) == (cap // (10 * mb), cap)
    # a quarter of the headroom when that is tighter (a small Slurm allocation, a full node)
    assert autobatch.memory_bound(10 * mb, 400 * mb) == (10, 100 * mb)
    assert autobatch.memory_bound(10 * mb, 0) == (1, 0)  # never below one row
    assert autobatch.memory_bound(0, None)[0] == cap  # nothing measured: no division by zero


def test_activation_bytes_per_row_counts_in_place_outputs_once():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).eval()
    x = torch.zeros(1, 3, 8, 8)
    conv1, conv2 = 4 * 8 * 8 * 4, 2 * 8 * 8 * 4  # the ReLU writes into conv1's output
    assert autobatch.activation_bytes_per_row(net, x, backward=True) == conv1 + conv2
    assert autobatch.activation_bytes_per_row(net, x, backward=False) == 4 * conv1
    assert autobatch.activation_bytes_per_row(net, torch.zeros(2, 3, 8, 8), backward=True) == conv1 + conv2
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed


class LargestCall(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("name", ["gradient", "deep", "partition", "kernel"])
def test_cpu_auto_respects_the_memory_bound_and_equals_a_fixed_batch(data, name, monkeypatch, caplog):
    """A headroom that allows 9 rows (below PROBE_MIN: no probe): every model call stays at or below 9,
    and the numbers are those of a fixed batch size."""
    background, images = data
    net = LargestCall(tiny_net())
    ctx = context(net, name, background, 0)
    example = images[:1]
    per_row = autobatch.activation_bytes_per_row(ctx.model, example, get(name).Explainer.backward)
    headroom = int(9.5 * per_row / autobatch.MEMORY_SHARE)
    with caplog.at_level(logging.INFO, logger="explain_cli"):
        probe = autobatch.plan_cpu(ctx, example, get(name).Explainer.backward, headroom)
    assert probe.candidates == [9] and probe.done and ctx.batch_size == 9
    assert "batch_size auto: 9 rows per model call on the CPU (memory bound" in caplog.text
    explainer = get(name).Explainer(ctx)
    seeds = [11, 22, 33]
    net.calls.clear()
    auto = autobatch.explain_with_backoff(explainer, images, 2, seeds)
    assert net.calls and max(net.calls) <= 9
    fixed = get(name).Explainer(context(tiny_net(), name, background, 64)).explain(images, 2, seeds)
    np.testing.assert_array_equal(auto.classes, fixed.classes)
    np.testing.assert_allclose(auto.values, fixed.values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(auto.shap_sum, fixed.shap_sum, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gradient", "partition", "kernel", "deep"])
def test_cpu_probe_choice_gives_the_numbers_of_a_fixed_batch(data, name):
    """The probe's calls (8, 16, 32 rows, then its choice) change timings only: the attributions
    equal those of one fixed batch size. The clock is a cost model that makes 16 the best."""
    background, images = data
    clock = FakeClock()
    net = LargestCall(tiny_net())

    class Timed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x):
            clock.now += {8: 30.0, 16: 20.0, 32: 25.0}.get(x.shape[0], 40.0) * x.shape[0] / 1000
            return self.inner(x)

    ctx = context(Timed(), name, background, 32)
    ctx.batch_probe = autobatch.BatchProbe([8, 16, 32], clock=clock)
    explainer = get(name).Explainer(ctx)
    seeds = [11, 22, 33]
    results = [autobatch.explain_with_backoff(explainer, images, 2, seeds) for _ in range(4)]
    if name != "deep":  # deep: 3 images x 6 references = 18 rows per step, too few to probe 32
        assert ctx.batch_probe.done and ctx.batch_size == 16
        assert net.calls[-1] <= 16
    fixed = get(name).Explainer(context(tiny_net(), name, background, 5)).explain(images, 2, seeds)
    for result in results:
        np.testing.assert_array_equal(result.classes, fixed.classes)
        np.testing.assert_allclose(result.values, fixed.values, rtol=1e-4, atol=1e-6)


def test_memory_headroom_takes_the_tightest_known_limit(tmp_path):
    from explain_cli.job import memory_headroom

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    8000000 kB\n")
    none = tmp_path / "no-cgroup"
    gib = 2**30
    assert memory_headroom({}, meminfo, none, none) == 8000000 * 1024
    # Slurm: 4 GB per node, 1 GiB resident already
    assert memory_headroom({"SLURM_MEM_PER_NODE": "4096"}, meminfo, none, none, rss=gib) == 3 * gib
    assert memory_headroom({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_PER_TASK": "2"}, meminfo, none, none,
                           rss=gib) == gib
    # cgroup v2: the job's folder allows 3 GiB and uses 1 GiB; its parent has no limit
    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "job" / "memory.max").write_text(f"{3 * gib}\n")
    (root / "job" / "memory.current").write_text(f"{gib}\n")
    (root / "memory.max").write_text("max\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/job\n")
    assert memory_headroom({}, meminfo, root, proc) == 2 * gib
    assert memory_headroom({}, tmp_path / "none", none, none) is None  # nothing known


# ------------------------------------------------------------------ the allocator


RSS_AFTER_FREE = """
import os, sys
import numpy as np
from explain_cli import job
tuned = job.keep_freed_memory() if sys.argv[1] == "keep" else False
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
block = np.ones(3 * 2**20)  # 24 MB, written: below the 32 MB threshold, so it comes from the heap
held = rss() - before
del block
print(tuned, held, rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or not hasattr(os, "confstr")
                    or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                    reason="glibc on Linux only: other C libraries are left alone")
def test_keep_freed_memory_keeps_a_freed_block_for_the_next_call():
    """With glibc's defaults a freed 24 MB block goes back to the system (the next model call
    page-faults it in again); after keep_freed_memory() it stays in the process."""
    import subprocess
    import sys

    out = {}
    for arm in ("glibc", "keep"):
        done = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, arm], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        tuned, held, kept = done.stdout.split()
        out[arm] = (tuned == "True", int(held), int(kept))
    mb = 2**20
    assert out["keep"][0] and out["glibc"][1] > 20 * mb and out["keep"][1] > 20 * mb
    assert out["glibc"][2] < 4 * mb  # returned on free
    assert out["keep"][2] > 20 * mb  # kept


def test_keep_freed_memory_calls_mallopt_once_and_only_with_glibc(monkeypatch):
    import ctypes

    from explain_cli import job

    calls = []

    class Mallopt:  # ctypes' function object: attributes argtypes and restype, then calls
        def __call__(self, param, value):
            calls.append((param, value))
            return 1

    class FakeLibc:
        mallopt = Mallopt()

    monkeypatch.setattr(job, "_allocator_tuned", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(os, "confstr", lambda name: "musl")
    assert job.keep_freed_memory() is False and calls == []
    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.36")
    assert job.keep_freed_memory() is True
    assert calls == [(-3, job.MMAP_THRESHOLD), (-1, job.TRIM_THRESHOLD)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert job.keep_freed_memory() is True and len(calls) == 2  # once per process
