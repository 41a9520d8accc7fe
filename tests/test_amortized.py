"""The amortized (FastSHAP) explainer and ``explain-cli train``: a trained explainer matches exact
Shapley values (enumerated) on held-out images, efficiency is exact, a mismatched explainer.pt is
refused, an interrupted training resumes to the same explainer."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from explain_cli import masking
from explain_cli.config import load_config
from explain_cli.explainers import amortized
from explain_cli.train import pearson_rows, shapley_masks, train

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
GRID = 4

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    def make(num_classes=3):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, {channels}, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d({pool}), nn.Flatten(), nn.Linear({features}, num_classes))
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(2)
        return net
''')
MODEL = MODEL_SOURCE.format(channels=8, pool=2, features=32)  # pools to 2 x 2: the pixels network


def smooth_pixels(n: int, seed: int) -> np.ndarray:
    """Smooth random 8-bit RGB images (n, SIZE, SIZE, 3)."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(0, 1, (n, 3, 4, 4)).astype(np.float32))
    up = torch.nn.functional.interpolate(low, size=SIZE, mode="bicubic", align_corners=True)
    return np.clip(np.rint(up.numpy() * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_folder(root: Path, n: int, seed: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(smooth_pixels(n, seed)):
        Image.fromarray(pixels).save(root / f"{i:03d}.png")


def write_config(root: Path, name: str, explainer: dict, input_dir: str = "train", module: str = "tinyamo",
                 **extra) -> Path:
    config = {"model": {"arch": f"python:{module}:make", "num_classes": 3, "checkpoint": "tiny.pt", "layer": "input"},
              "preprocess": {"size": SIZE}, "input": {"dir": input_dir}, "explainer": explainer,
              "output": {"dir": "out", "top_k": 2}, "batch_size": 1024, "device": "cpu", "workers": 0, **extra}
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


TRAIN = {"epochs": 20, "pairs": 16, "images_per_step": 16, "width": 32, "augment": False, "holdout": 0.1,
         "validate_nsamples": 600, "validate_images": 2}


@contextmanager
def trained_project(root: Path, name: str, source: str, settings: dict) -> Iterator[tuple[Any, Any]]:
    """Model file ``name``.py from ``source`` (importable while the block runs), its weights tiny.pt,
    320 training images, 3 held-out images (another folder), an explainer trained with ``settings``."""
    (root / f"{name}.py").write_text(source)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(name)
        torch.save(module.make().state_dict(), root / "tiny.pt")
        write_folder(root / "train", 320, seed=1)
        write_folder(root / "held", 3, seed=2)
        explainer = {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": GRID}, "fill": "mean",
                     "train": settings}
        yield module, train(load_config(write_config(root, "train.yaml", explainer, module=name)), root / "explainer.pt")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model, 320 training images, 3 held-out images (another folder), a trained explainer."""
    root = tmp_path_factory.mktemp("amortized")
    with trained_project(root, "tinyamo", MODEL, TRAIN) as (tinyamo, result):
        yield root, result, tinyamo


def exact_shapley(model: torch.nn.Module, image: torch.Tensor, fill: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """(M, outputs) exact Shapley values of the masking game, from all 2**M coalitions."""
    m = int(labels.max()) + 1
    codes = np.arange(2 ** m)
    coalitions = (codes[:, None] >> np.arange(m)) & 1  # bit j: player j shown
    labels_t = torch.from_numpy(labels.reshape(-1))
    outs = []
    with torch.no_grad():
        for a in range(0, len(codes), 4096):
            shown = torch.from_numpy(coalitions[a:a + 4096].astype(bool))
            outs.append(model(masking.compose(shown, labels_t, image, fill)).double())
    v = torch.cat(outs).numpy()
    sizes = coalitions.sum(1)
    weight = np.array([math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
                       if s < m else 0.0 for s in range(m + 1)])
    phi = np.zeros((m, v.shape[1]))
    for j in range(m):
        without = codes[(codes >> j) & 1 == 0]
        phi[j] = (weight[sizes[without]][:, None] * (v[without | (1 << j)] - v[without])).sum(0)
    return phi


def held_out_run(root: Path, module: str = "tinyamo"):
    from explain_cli.pipeline import RunOptions, empty_background, make_explainer, prepare

    cfg = load_config(write_config(root, "run.yaml", {"name": "amortized", "checkpoint": "explainer.pt"}, "held",
                                   module))
    prep = prepare(cfg, RunOptions())
    explainer = make_explainer(prep, empty_background(prep))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(root / "held" / name)) for name in prep.images]))
    x = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(cfg.preprocess.mean).view(1, 3, 1, 1)) \
        / torch.tensor(cfg.preprocess.std).view(1, 3, 1, 1)
    return cfg, x, explainer.explain(x, 2, [0] * x.shape[0])


def assert_matches_exact_shapley(root: Path, module: Any, name: str) -> None:
    cfg, x, attribution = held_out_run(root, name)
    model = module.make()
    model.load_state_dict(torch.load(root / "tiny.pt", weights_only=True))
    model.eval()
    labels = masking.grid_labels(SIZE, SIZE, GRID)
    fills = masking.fill_images(x, "mean", cfg.preprocess.mean, cfg.preprocess.std)
    rs = []
    for i in range(x.shape[0]):
        exact = exact_shapley(model, x[i], fills[i], labels)[:, attribution.classes[i]].T  # (k, M)
        assert np.abs(exact).max() > 0.02  # not vacuous
        ours = attribution.values[i].sum(1).reshape(2, -1)[:, [np.flatnonzero(labels.ravel() == j)[0]
                                                                for j in range(GRID * GRID)]]
        rs.extend(pearson_rows(ours, exact))
    assert np.median(rs) >= 0.9, rs
    np.testing.assert_allclose(attribution.shap_sum, attribution.outputs - attribution.base_values, atol=1e-5)


@pytest.mark.slow
def test_matches_exact_shapley_values_on_held_out_images(project):
    root, result, tinyamo = project
    assert result.kernel_pearson is not None and result.kernel_pearson > 0.5  # the training's own check ran
    # the model pools to 2 x 2 before its linear layer: network auto is the pixels network
    assert torch.load(root / "explainer.pt", weights_only=True)["network"]["kind"] == "pixels"
    assert_matches_exact_shapley(root, tinyamo, "tinyamo")


GAP_MODEL = MODEL_SOURCE.format(channels=16, pool=1, features=16)  # global average pooling: features


@pytest.mark.slow
def test_features_network_on_a_pooling_model(tmp_path):
    """A model that ends in global average pooling and a linear layer gets the features network
    (auto): a head on its 8 x 8 feature map whose values go through the model's own classifier; it
    matches the exact Shapley values on held-out images and its efficiency is exact. A model
    without that structure refuses network: features (exit 2 naming the key)."""
    from explain_cli.errors import ConfigError

    settings = {**TRAIN, "validate_nsamples": 0}
    with trained_project(tmp_path, "tinygap", GAP_MODEL, settings) as (tinygap, _):
        network = torch.load(tmp_path / "explainer.pt", weights_only=True)["network"]
        assert network["kind"] == "features" and network["dim"] == 16
        assert_matches_exact_shapley(tmp_path, tinygap, "tinygap")

        (tmp_path / "tinypool2.py").write_text(MODEL)  # pools to 2 x 2: no feature map to read
        torch.save(importlib.import_module("tinypool2").make().state_dict(), tmp_path / "pool2.pt")
        sys.modules.pop("tinypool2", None)
        forced = {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": GRID}, "fill": "mean",
                  "train": {**settings, "network": "features"}}
        with pytest.raises(ConfigError) as info:
            train(load_config(write_config(tmp_path, "bad.yaml", forced, module="tinypool2"), ["model.checkpoint=pool2.pt"]),
                  tmp_path / "x.pt")
        assert info.value.key == "explainer.train.network"


@pytest.mark.slow
def test_efficiency_is_exact(project):
    root, _, tinyamo = project
    cfg, x, attribution = held_out_run(root)
    np.testing.assert_allclose(attribution.shap_sum, attribution.outputs - attribution.base_values, atol=1e-5)
    model = tinyamo.make()
    model.load_state_dict(torch.load(root / "tiny.pt", weights_only=True))
    with torch.no_grad():
        fills = masking.fill_images(x, "mean", cfg.preprocess.mean, cfg.preprocess.std)
        expected = model.eval()(fills).gather(1, torch.from_numpy(attribution.classes)).numpy()
    np.testing.assert_allclose(attribution.base_values, expected, atol=1e-5)
    np.testing.assert_array_equal(attribution.segments[0], masking.grid_labels(SIZE, SIZE, GRID))
    assert attribution.stability is None


@pytest.mark.slow
def test_targets_choose_classes_and_a_contrast(project):
    """Any class can be explained (the network outputs all of them); a contrast is the difference of
    two classes' values, still exactly efficient; a quantity other than the logit is refused."""
    from explain_cli.errors import ConfigError
    from explain_cli.targets import TargetSpec

    root, _, _ = project
    cfg, x, top = held_out_run(root)
    from explain_cli.pipeline import RunOptions, empty_background, make_explainer, prepare

    prep = prepare(load_config(root / "run.yaml"), RunOptions())
    explainer = make_explainer(prep, empty_background(prep))
    chosen = explainer.explain(x, TargetSpec(entries=(2, 0)).for_batch(), [0] * x.shape[0])
    assert (chosen.classes == [2, 0]).all()
    contrast = explainer.explain(x, TargetSpec(entries=(2,), contrast=0).for_batch(), [0] * x.shape[0])
    np.testing.assert_allclose(contrast.values[:, 0], chosen.values[:, 0] - chosen.values[:, 1], atol=1e-5)
    np.testing.assert_allclose(contrast.shap_sum, contrast.outputs - contrast.base_values, atol=1e-5)
    with pytest.raises(ConfigError) as info:
        explainer.explain(x, TargetSpec(output="probability").for_batch(), [0] * x.shape[0])
    assert info.value.key == "targets.output"


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd)]), "OMP_NUM_THREADS": "1",
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "explain_cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_checkpoint_is_data_and_run_writes_exact_additivity(project):
    root, _, _ = project
    data = torch.load(root / "explainer.pt", weights_only=True)
    assert data["format"] == amortized.FORMAT and data["players"] == {"grid": GRID} and data["fill"] == "mean"
    assert data["preprocess"]["size"] == SIZE and data["model"]["outputs"] == 3
    assert len(data["model"]["fingerprint"]) == 64 and data["validation"]["holdout_images"] == 32
    config = write_config(root, "cli.yaml", {"name": "amortized", "checkpoint": "explainer.pt"}, "held",
                          metrics=["deletion"])
    done = cli("run", str(config), "--output", str(root / "out-cli"), cwd=root)
    assert done.returncode == 0, done.stderr
    lines = (root / "out-cli" / "topk.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert len(rows) == 6 and all(float(r["additivity_error"]) < 1e-5 for r in rows)
    assert all(r["stability"] == "" and r["deletion_auc"] != "" for r in rows)


@pytest.mark.slow
def test_mismatched_checkpoint_is_refused(project):
    from explain_cli.errors import ConfigError
    from explain_cli.pipeline import RunOptions, prepare

    root, _, tinyamo = project
    other = tinyamo.make()
    with torch.no_grad():
        other[0].bias.add_(0.1)
    torch.save(other.state_dict(), root / "other.pt")
    config = write_config(root, "bad.yaml", {"name": "amortized", "checkpoint": "explainer.pt"}, "held")
    prepare(load_config(config), RunOptions())  # the matching config is accepted
    for override, words in (("explainer.fill=128", "trained with 'mean'"),
                            ("explainer.segments={grid: 2}", "grid 4"),
                            ("preprocess.size=24", "preprocess.size"),
                            ("preprocess.mean=[0.4, 0.4, 0.4]", "preprocess.mean"),
                            ("model.checkpoint=other.pt", "other model weights"),
                            ("explainer.checkpoint=tiny.pt", "not an explainer"),
                            ("explainer.checkpoint=missing.pt", "not a file")):
        with pytest.raises(ConfigError) as info:
            prepare(load_config(config, [override]), RunOptions())
        assert info.value.key == "explainer.checkpoint" and words in info.value.message, (override, info.value)
    for command in ("run", "validate"):
        done = cli(command, str(config), "--set", "model.checkpoint=other.pt", cwd=root)
        assert done.returncode == 2 and "other model weights" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_training_resumes_after_kill(tmp_path, project):
    root, _, _ = project
    for name in ("tinyamo.py", "tiny.pt"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    write_folder(tmp_path / "train", 16, seed=3)
    small = {**TRAIN, "epochs": 20, "pairs": 4, "images_per_step": 8, "validate_nsamples": 0}
    config = write_config(tmp_path, "cfg.yaml", {"name": "amortized", "segments": {"grid": GRID}, "train": small})
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    state = tmp_path / "killed.pt.train"
    proc = subprocess.Popen([sys.executable, "-m", "explain_cli", "train", str(config), "--output", "killed.pt"],
                            cwd=tmp_path, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL; a no-op once the process has exited and been reaped (no stale pid)
        proc.wait()
    assert state.exists() and not (tmp_path / "killed.pt").exists()
    saved = torch.load(state, weights_only=True)
    assert 1 <= saved["epoch"] < 20
    resumed = cli("train", str(config), "--output", "killed.pt", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and not state.exists()
    straight = cli("train", str(config), "--output", "straight.pt", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    a = torch.load(tmp_path / "killed.pt", weights_only=True)
    b = torch.load(tmp_path / "straight.pt", weights_only=True)
    assert [h["loss"] for h in a["training"]["history"]] == pytest.approx([h["loss"] for h in b["training"]["history"]],
                                                                          rel=1e-5)
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    other = write_config(tmp_path, "other.yaml", {"name": "amortized", "segments": {"grid": 2}, "train": small})
    torch.save(saved, state)  # the state of the first config, found by a training of another
    refused = cli("train", str(other), "--output", "killed.pt", cwd=tmp_path)
    assert refused.returncode == 2 and "another config" in refused.stderr and "--restart" in refused.stderr


def test_coalitions_follow_the_shapley_kernel_in_complementary_pairs():
    rng = np.random.default_rng(0)
    masks = shapley_masks(rng, 50, 200, 10)
    assert masks.shape == (50, 400, 10)
    np.testing.assert_array_equal(masks[:, 200:], ~masks[:, :200])
    sizes = masks[:, :200].sum(-1).ravel()
    assert sizes.min() >= 1 and sizes.max() <= 9
    expected = np.array([9 / (s * (10 - s)) for s in range(1, 10)])
    observed = np.bincount(sizes, minlength=10)[1:] / sizes.size
    np.testing.assert_allclose(observed, expected / expected.sum(), atol=0.01)


def test_settings_refuse_slic_players():
    from explain_cli.config import validate_explainer
    from explain_cli.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_explainer({"name": "amortized", "segments": {"n_segments": 20}}, "cfg.yaml")
    assert "grid" in info.value.message


def test_validation_size_keeps_the_default_check_within_a_fifth_of_training():
    from explain_cli.train import validation_size

    assert validation_size(40, 8, "auto", 1_000_000) == (8, 2000)  # a large training: the full check
    images, nsamples = validation_size(40, 8, "auto", 50_000)  # 20 %: 10,000 evaluations
    assert images * nsamples <= 10_000 and nsamples == 2000 and images == 5
    images, nsamples = validation_size(40, 8, "auto", 5_000)  # 1,000: one image, fewer samples
    assert (images, nsamples) == (1, 1000)
    assert validation_size(40, 8, "auto", 100) == (1, 200)  # the floor: a noisier reference is no check
    assert validation_size(3, 8, 600, 100) == (3, 600)  # asked for: as asked


@pytest.mark.slow
def test_train_sigterm_line_named_refusal_changed_epochs_and_r_in_run_json_and_report(tmp_path):
    """SIGTERM says where the state is (exit 143); a resume with other pairs is refused naming the key;
    one with other epochs resumes; validation has progress lines; run.json and the report show r."""
    (tmp_path / "tinyamo.py").write_text(MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("tinyamo")
        torch.save(module.make().state_dict(), tmp_path / "tiny.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tinyamo", None)
    write_folder(tmp_path / "train", 24, seed=3)
    settings = {"epochs": 100_000, "pairs": 2, "images_per_step": 8, "width": 4, "augment": False,
                "holdout": 0.25}
    config = write_config(tmp_path, "cfg.yaml", {"name": "amortized", "checkpoint": "explainer.pt",
                                                 "segments": {"grid": GRID}, "train": settings})
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    state = tmp_path / "explainer.pt.train"
    proc = subprocess.Popen([sys.executable, "-m", "explain_cli", "train", str(config)], cwd=tmp_path, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM during epoch" in stderr and str(state) in stderr and "rerun" in stderr, stderr
    done = torch.load(state, weights_only=True)["epoch"]
    refused = cli("train", str(config), "--set", "explainer.train.pairs=3", cwd=tmp_path)
    assert refused.returncode == 2 and "explainer.train.pairs: 2 -> 3" in refused.stderr, refused.stderr
    resumed = cli("train", str(config), "--set", f"explainer.train.epochs={done + 1}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {state} after epoch {done} of {done + 1}" in resumed.stderr
    assert "train: validation image 1/1 against Kernel SHAP" in resumed.stderr  # 6 held out; the budget: 1
    data = torch.load(tmp_path / "explainer.pt", weights_only=True)
    assert data["training"]["epochs"] == done + 1 and not state.exists()
    r = data["validation"]["kernel_median_pearson"]
    assert data["validation"]["kernel_images"] == 1 and data["validation"]["kernel_nsamples"] == 200
    run_config = write_config(tmp_path, "run.yaml", {"name": "amortized", "checkpoint": "explainer.pt"}, "train")
    ran = cli("run", str(run_config), "--limit", "2", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["explainer_training"]["kernel_median_pearson"] == pytest.approx(r)
    assert info["explainer_training"]["epochs"] == done + 1
    assert "Explainer vs Kernel SHAP" in (tmp_path / "out" / "report.html").read_text()


# The pooling switches with an environment variable: the same weights (same fingerprint) with and
# without the global-average structure a features explainer reads. SEEN records the autocast dtype
# of every forward, to tell whether train ran the model under its precision.
SWITCH_MODEL = textwrap.dedent('''
    import os
    import torch
    from torch import nn

    SEEN = []

    class Pool(nn.Module):
        def forward(self, x):
            return x.amax((2, 3)) if os.environ.get("TINY_POOL") == "max" else x.mean((2, 3))

    class Net(nn.Sequential):
        def forward(self, x):
            SEEN.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
            return super().forward(x)

    def make(num_classes=3):
        torch.manual_seed(0)
        net = Net(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                  Pool(), nn.Linear(16, num_classes))
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(2)
        return net
''')


def test_feature_map_is_found_under_low_precision():
    """bfloat16 autocast (and a model whose own weights are bfloat16) finds the same feature map and
    classifier as float32: on the GAP test model and on an untrained torchvision resnet18."""
    import torchvision

    from explain_cli.explainers import _precision

    namespace: dict[str, Any] = {}
    exec(GAP_MODEL, namespace)
    for model, size, outputs in ((namespace["make"]().eval(), SIZE, 3),
                                 (torchvision.models.resnet18(num_classes=10).eval(), 64, 10)):
        plain = amortized.find_feature_map(model, size, 3, outputs)
        assert plain is not None
        low = amortized.find_feature_map(_precision.with_precision(model, "bfloat16", torch.device("cpu")),
                                         size, 3, outputs)
        assert low is not None and low[0] is plain[0] and low[1] is plain[1]
        halved = amortized.find_feature_map(model.to(torch.bfloat16), size, 3, outputs)
        assert halved is not None and halved[1] is plain[1]


def test_train_honours_precision_and_validate_probes_like_run(tmp_path):
    """train runs the model under the config's precision (and refuses float16 on the CPU, exit 2 naming
    ``precision``); a features explainer trained under bfloat16 runs under bfloat16; on the same weights
    without global average pooling, validate and run both refuse it for that reason (exit 2)."""
    from explain_cli.errors import ConfigError

    (tmp_path / "tinyswitch.py").write_text(SWITCH_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("tinyswitch")
        torch.save(module.make().state_dict(), tmp_path / "tiny.pt")
        write_folder(tmp_path / "train", 48, seed=1)
        write_folder(tmp_path / "held", 2, seed=2)
        explainer = {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": GRID}, "fill": "mean",
                     "train": {**TRAIN, "epochs": 1, "validate_nsamples": 0, "network": "features"}}
        config = write_config(tmp_path, "train.yaml", explainer, module="tinyswitch", precision="bfloat16")
        with pytest.raises(ConfigError) as info:
            train(load_config(config, ["precision=float16"]), tmp_path / "f16.pt")
        assert info.value.key == "precision"
        module.SEEN.clear()
        train(load_config(config), tmp_path / "explainer.pt")
        # float32: counting the outputs and the structure probe (find_feature_map); every game
        # evaluation after them under bfloat16
        assert module.SEEN[:2] == [torch.float32] * 2 and len(module.SEEN) > 4
        assert set(module.SEEN[2:]) == {torch.bfloat16}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tinyswitch", None)
    assert torch.load(tmp_path / "explainer.pt", weights_only=True)["network"]["kind"] == "features"
    run_config = write_config(tmp_path, "run.yaml", {"name": "amortized", "checkpoint": "explainer.pt"}, "held",
                              module="tinyswitch", precision="bfloat16")
    for command, extra in (("validate", ()), ("run", ("--output", str(tmp_path / "out-max")))):
        done = cli(command, str(run_config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        done = cli(command, str(run_config), *extra, cwd=tmp_path, env={"TINY_POOL": "max"})
        assert done.returncode == 2, (command, done.stderr)
        assert "not a linear layer of the global average of a feature map" in done.stderr, (command, done.stderr)
