"""The Python API (explain_cli.api): explain() against the CLI, load_run() of runs and merged shards,
shap.image_plot on the returned Explanation, config errors, the cache, the example script."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import explain_cli
from explain_cli.cli import app

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def npz_values(out: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "values" / f"{rel}.npz") as npz:
        return npz["values"], npz["classes"]


def assert_equals_npz(expl, out: Path) -> None:
    """Every image of ``expl`` has exactly the values and classes its values/*.npz holds."""
    for i, rel in enumerate(expl.instance_names):
        values, classes = npz_values(out, rel)
        k = len(classes)
        # npz: (k, C, H, W); the Explanation: (H, W, C, k) per image, as shap's image explainers
        assert np.array_equal(expl.values[i, ..., :k], values.transpose(2, 3, 1, 0)), rel
        assert expl.class_index[i, :k].tolist() == classes.tolist(), rel


@pytest.fixture(autouse=True)
def _fresh_cache():
    explain_cli.clear_cache()
    yield
    explain_cli.clear_cache()


def test_explain_gives_the_cli_values_bit_for_bit(tiny_project):
    cfg = tiny_project / "config.yaml"
    cli("run", cfg, "--no-progress", "--set", "output.save_values=true")
    out = tiny_project / "out"
    expl = explain_cli.explain(cfg)  # the config's input: the run's images, steps and seeds
    assert list(expl.instance_names) == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]
    assert expl.values.shape == (4, 16, 16, 3, 2) and expl.data.shape == (4, 16, 16, 3)
    assert expl.data.dtype == np.uint8
    assert_equals_npz(expl, out)
    # one image by path, from the cache this time, and by name: the same numbers
    again = explain_cli.explain(cfg, [tiny_project / "images" / "b" / "one.png", "a/two.jpg"])
    assert list(again.instance_names) == ["b/one.png", "a/two.jpg"]
    assert_equals_npz(again, out)
    rows = {(r["image"], int(r["rank"])): r for r in _csv(out / "topk.csv")}
    for i, rel in enumerate(expl.instance_names):
        for r in range(2):
            row = rows[(rel, r + 1)]
            assert expl.output_names[i, r] == row["class_name"]
            np.testing.assert_allclose(expl.base_values[i, r], float(row["base_value"]), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(expl.stability[i, r], float(row["stability"]), rtol=1e-5)
            np.testing.assert_allclose(expl.additivity_error[i, r], float(row["additivity_error"]),
                                       rtol=1e-4, atol=1e-7)
            assert expl.rank[i, r] == r + 1


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_explain_takes_pil_images_arrays_tensors_and_overrides(tiny_project):
    import torch
    from PIL import Image

    cfg = tiny_project / "config.yaml"
    path = tiny_project / "images" / "a" / "one.png"
    by_path = explain_cli.explain(cfg, path)
    picture = Image.open(path)
    by_pil = explain_cli.explain(cfg, [picture, np.asarray(picture.convert("RGB"))])
    assert list(by_pil.instance_names) == ["image[0]", "image[1]"]
    assert np.array_equal(by_pil.data[0], by_path.data[0]) and np.array_equal(by_pil.data[1], by_path.data[0])
    # a tensor batch is the model input itself
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((by_path.data[0] / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
    by_tensor = explain_cli.explain(cfg, x)
    assert by_tensor.instance_names == ["tensor[0]"] and np.array_equal(by_tensor.data[0], by_path.data[0])
    with pytest.raises(explain_cli.UserError, match=r"\(N, 3, 16, 16\)"):
        explain_cli.explain(cfg, torch.zeros(1, 3, 8, 8))
    # overrides: the --set keys, nested dicts merged key by key; the explainer switch drops nsamples
    one = explain_cli.explain(cfg, path, explainer={"name": "partition", "max_evals": 64},
                              targets={"classes": ["<bird>"]}, output={"top_k": 1})
    assert one.output_names.tolist() == [["<bird>"]]
    assert one.stability is None  # partition is deterministic: no split-half stability
    with pytest.raises(explain_cli.ImageError, match="missing.png"):
        explain_cli.explain(cfg, [path, tiny_project / "missing.png"])
    skipped = explain_cli.explain(cfg, [path, tiny_project / "missing.png"], errors="skip")
    assert len(skipped.instance_names) == 1


def test_a_dict_config_resolves_against_base_dir(tiny_project):
    config = yaml.safe_load((tiny_project / "config.yaml").read_text())
    from_dict = explain_cli.explain(config, ["a/one.png"], base_dir=tiny_project)
    from_file = explain_cli.explain(tiny_project / "config.yaml", ["a/one.png"])
    assert np.array_equal(from_dict.values, from_file.values)


@pytest.mark.parametrize("config_change, overrides, key", [
    ({"explainer": {"name": "gradient", "nsamples": 0}}, {}, "explainer.nsamples"),
    ({"modle": {}}, {}, "modle"),
    ({}, {"output": {"top_k": "two"}}, "output.top_k"),
    ({}, {"explainer": {"name": "gradiant"}}, "explainer.name"),
    ({}, {"explainer": {"nsamples": float("nan")}}, "explainer.nsamples"),
    ({}, {"preprocess": {"size": 16.5}}, "preprocess.size"),
    ({"input": {"dir": "nowhere"}}, {}, "input.dir"),
])
def test_bad_configs_raise_config_error_naming_the_key(tiny_project, config_change, overrides, key):
    config = yaml.safe_load((tiny_project / "config.yaml").read_text())
    config.update(config_change)
    with pytest.raises(explain_cli.ConfigError) as err:
        explain_cli.explain(config, base_dir=tiny_project, **overrides)
    assert err.value.key == key and key in str(err.value)
    if not config_change:  # the same override on the file: the same key, as `--set` reports it
        with pytest.raises(explain_cli.ConfigError) as err:
            explain_cli.explain(tiny_project / "config.yaml", **overrides)
        assert err.value.key == key


def test_load_run_of_a_run_and_of_merged_shards_equals_the_values_written(tiny_project):
    cfg = tiny_project / "config.yaml"
    cli("run", cfg, "--no-progress", "--set", "output.save_values=true")
    out = tiny_project / "out"
    whole = explain_cli.load_run(out)
    assert list(whole.instance_names) == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]
    assert_equals_npz(whole, out)
    assert np.array_equal(whole.data, explain_cli.explain(cfg).data)  # the images, decoded again
    top = explain_cli.load_run(out, images="a/*", ranks=[1])
    assert list(top.instance_names) == ["a/one.png", "a/two.jpg"] and top.values.shape[-1] == 1
    assert np.array_equal(top.values[..., 0], whole.values[:2, ..., 0])
    assert [e.values.shape[0] for e in explain_cli.iter_run(out, batch=3)] == [3, 1]
    with pytest.raises(explain_cli.UserError, match="nope"):
        explain_cli.load_run(out, images=["nope.png"])

    sharded = tiny_project / "sharded"
    for shard in ("0/2", "1/2"):
        cli("run", cfg, "--no-progress", "--shard", shard, "--output", sharded, "--set", "output.save_values=true")
    before_merge = explain_cli.load_run(sharded)  # the shards' CSVs, not merged yet
    assert sorted(before_merge.instance_names) == sorted(whole.instance_names)
    assert_equals_npz(before_merge, sharded)
    cli("merge", sharded)
    merged = explain_cli.load_run(sharded)
    assert list(merged.instance_names) == list(whole.instance_names)
    assert_equals_npz(merged, sharded)
    assert np.array_equal(merged.values, whole.values)


def test_load_run_without_saved_values_says_how_to_get_them(tiny_project):
    cli("run", tiny_project / "config.yaml", "--no-progress", "--limit", "1")
    with pytest.raises(explain_cli.UserError, match="output.save_values"):
        explain_cli.load_run(tiny_project / "out")


def test_run_is_the_cli_run(tiny_project):
    result = explain_cli.run(tiny_project / "config.yaml", limit=2, output={"save_values": True})
    assert result.ok and result.exit_code == 0
    assert (result.selected, result.explained, result.already_done, result.failed) == (2, 2, 0, 0)
    assert result.output_dir == tiny_project / "out" and (result.output_dir / "report.html").is_file()
    again = explain_cli.run(tiny_project / "config.yaml", output={"save_values": True})  # resumes
    assert (again.explained, again.already_done) == (2, 2)
    (tiny_project / "images" / "bad.png").write_bytes(b"not a png")
    failed = explain_cli.run(tiny_project / "config.yaml", output={"save_values": True})
    assert failed.exit_code == 3 and failed.failed == 1 and not failed.ok
    assert_equals_npz(explain_cli.load_run(result.output_dir), result.output_dir)
    with pytest.raises(explain_cli.UserError) as err:
        explain_cli.run(tiny_project / "config.yaml", input={"exclude": ["*"]})
    assert err.value.exit_code == 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shap_image_plot_renders_the_explanation(tiny_project, k):
    import matplotlib.pyplot as plt
    import shap

    # 3 images of 3 channels: the shape shap's own output-axis guess gets wrong (explanation.py)
    expl = explain_cli.explain(tiny_project / "config.yaml", limit=3, output={"top_k": k})
    assert expl.values.shape == (3, 16, 16, 3, k) and expl.output_dims == (4,)
    for shown in (expl, expl[:1], expl[1]):
        shap.image_plot(shown, show=False)
        figure = plt.gcf()
        rows = 1 if shown is not expl else 3
        assert len(figure.axes) == rows * (k + 1) + 1  # image + k maps per row, and the colour bar
        titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
        assert titles[:k] == list(np.atleast_2d(shown.output_names)[0])
        plt.close(figure)
    assert expl[1:].stability.shape == (2, k) and expl[1].additivity_error.shape == (k,)
    assert np.array_equal(expl[1:].stability, expl.stability[1:])


def test_a_layer_map_plots_at_its_resolution(tiny_project):
    import matplotlib.pyplot as plt
    import shap

    expl = explain_cli.explain(tiny_project / "config.yaml", ["a/one.png"], model={"layer": "2"})
    assert expl.values.shape == (1, 16, 16, 6, 2)  # the input of module 2: 6 channels
    shap.image_plot(expl, show=False)
    plt.close("all")


SECOND_CALL = textwrap.dedent('''
    import sys, time
    import torch  # a notebook has its own model's torch loaded already
    import explain_cli, explain_cli.models as models
    built = []
    build = models.build_model
    models.build_model = lambda *a, **k: built.append(1) or build(*a, **k)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        expl = explain_cli.explain(sys.argv[1], ["a/one.png"])
        times.append(time.perf_counter() - started)
    print(times[0], times[1], len(built))
''')


def test_a_second_call_reuses_the_model_and_is_much_faster(tiny_project):
    """A fresh interpreter, as a new notebook kernel: the first call pays shap's import and
    loads the model, background and explainer; the second reuses them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tiny_project), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SECOND_CALL, str(tiny_project / "config.yaml")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second, builds = out.stdout.split()
    print(f"first call {float(first):.3f} s, second {float(second):.3f} s")
    assert int(builds) == 1
    assert float(first) >= 5 * float(second)


def test_the_cache_keeps_the_model_across_class_and_explainer_changes(tiny_project, monkeypatch):
    import explain_cli.models as models

    built = []
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(1) or build(*a, **k))
    cfg = tiny_project / "config.yaml"
    explain_cli.explain(cfg, ["a/one.png"])
    explain_cli.explain(cfg, ["a/one.png"], targets={"classes": ["<bird>"]})
    explain_cli.explain(cfg, ["a/one.png"], explainer={"name": "partition", "max_evals": 32})
    assert len(built) == 1
    (tiny_project / "tiny.pt").write_bytes((tiny_project / "tiny.pt").read_bytes())  # "retrained"
    os.utime(tiny_project / "tiny.pt", ns=(1, 1))
    explain_cli.explain(cfg, ["a/one.png"])
    assert len(built) == 2
    explain_cli.clear_cache()
    explain_cli.explain(cfg, ["a/one.png"])
    assert len(built) == 3


def test_import_loads_neither_torch_nor_shap():
    code = ("import sys, explain_cli; explain_cli.explain; explain_cli.ConfigError; "
            "print(sorted(m for m in ('torch', 'shap', 'numpy', 'PIL', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_example_runs(tmp_path):
    """examples/notebook.py end to end, with EXAMPLE_FAST (64 px, few samples) to keep it fast."""
    env = {**os.environ, "MPLBACKEND": "Agg", "EXAMPLE_OUT": str(tmp_path), "EXAMPLE_FAST": "1"}
    out = subprocess.run([sys.executable, str(REPO / "examples" / "notebook.py")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded back" in out.stdout
    assert len(list(tmp_path.glob("*.png"))) >= 3


def test_a_slide_run_explains_and_loads_back_by_tile(tmp_path, monkeypatch):
    from explain_cli.slides.synthetic import write_slide
    from test_slides import project, spec

    config = project(tmp_path, monkeypatch)
    write_slide(tmp_path / "slides" / "slide01.tif", spec())
    result = explain_cli.run(config, output={"save_values": True})
    assert result.ok and result.explained > 2
    back = explain_cli.load_run(result.output_dir, pixels=False)
    assert all(name.startswith("slide01.tif/") for name in back.instance_names)
    tiles = list(back.instance_names[:2])
    expl = explain_cli.explain(config, tiles)  # tiles by name, read from the slide as in the run
    assert list(expl.instance_names) == tiles
    assert np.array_equal(expl.values, back.values[:2])
    assert_equals_npz(expl, result.output_dir)


def test_images_asked_fewer_classes_are_padded():
    import matplotlib.pyplot as plt
    import shap

    from explain_cli.api import _explanation

    def image(name: str, k: int) -> dict:
        return {"name": name, "pixels": np.zeros((4, 4, 3), np.uint8), "values": np.ones((4, 4, 3, k), np.float32),
                "class_index": np.arange(k), "class_name": [f"c{c}" for c in range(k)],
                "base_values": np.zeros(k), "rank": np.arange(1, k + 1), "stability": None}

    expl = _explanation([image("a", 2), image("b", 1)])
    assert expl.values.shape == (2, 4, 4, 3, 2) and np.isnan(expl.values[1, ..., 1]).all()
    assert expl.output_names.tolist() == [["c0", "c1"], ["c0", ""]]
    assert expl.class_index.tolist() == [[0, 1], [0, -1]] and expl.rank.tolist() == [[1, 2], [1, -1]]
    assert expl.stability is None and np.isnan(expl.base_values[1, 1])
    shap.image_plot(expl, show=False)
    plt.close("all")


def test_load_run_of_a_partial_run(tiny_project):
    cli("run", tiny_project / "config.yaml", "--no-progress", "--limit", "2", "--set", "output.save_values=true")
    part = explain_cli.load_run(tiny_project / "out")
    assert list(part.instance_names) == ["a/one.png", "a/two.jpg"]
    assert_equals_npz(part, tiny_project / "out")


def test_the_cli_run_command_goes_through_the_api(tiny_project, monkeypatch):
    import explain_cli.api as api

    calls = []
    shared = api.run_config
    monkeypatch.setattr(api, "run_config", lambda *a, **k: calls.append(a) or shared(*a, **k))
    cli("run", tiny_project / "config.yaml", "--no-progress", "--limit", "1")
    assert len(calls) == 1 and calls[0][1].limit == 1
