"""Which classes are explained (targets.classes, --class, labels from a truth CSV), which quantity
(logit / probability / log-odds, a contrast) and sigmoid models, for every explainer and through run,
validate, merge and the report."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from explain_cli import targets
from explain_cli.errors import ConfigError
from explain_cli.explainers import deep, gradient, kernel, partition
from explain_cli.explainers.base import ExplainContext

from conftest import importable_module, write_images
from test_deep import calibrate

LABELS = ["normal", "tumor", "Necrosis"]


def spec(**kw) -> targets.TargetSpec:
    return targets.TargetSpec(names=tuple(LABELS), **kw)


# -- resolution of names, indices and the truth CSV --------------------------------------------------

def test_class_names_match_exactly_then_ignoring_case_and_unknown_names_exit_2():
    assert targets.class_index("tumor", LABELS, "k") == 1
    assert targets.class_index("necrosis", LABELS, "k") == 2  # case-insensitive fallback
    assert targets.class_index("2", LABELS, "k") == 2  # digits that name no class: an index
    assert targets.class_index(0, LABELS, "k") == 0
    with pytest.raises(ConfigError) as info:
        targets.class_index("tumour", LABELS, "targets.classes")
    assert info.value.key == "targets.classes" and "'tumour'" in info.value.message
    assert "'tumor'" in info.value.message  # the nearest name
    with pytest.raises(ConfigError, match="out of range"):
        targets.class_index(3, LABELS, "k")
    # a class literally named like a number is matched by name first
    assert targets.class_index("3", ["a", "3"], "k") == 1


def test_resolve_refuses_a_softmax_over_one_output_and_label_without_csv():
    with pytest.raises(ConfigError) as info:
        targets.resolve(targets.TargetsConfig(activation="softmax"), ["tumor"], 1)
    assert info.value.key == "targets.activation"
    with pytest.raises(ValueError, match="from_csv"):
        targets.TargetsConfig(classes=["label"])


def test_select_keeps_the_asked_order_each_class_once_with_ranks_and_padding():
    raw = torch.tensor([[0.1, 2.0, 1.0],    # ranks: tumor 1, Necrosis 2, normal 3
                        [3.0, 1.0, 2.0]])   # normal 1, Necrosis 2, tumor 3
    batch = spec(entries=("label", "top_k"), top_k=1).for_batch([(0,), (0,)])
    sel = batch.select(raw)
    # image 0: label normal (rank 3), then its top class tumor; image 1: normal is both -> one slot
    assert sel.classes.tolist()[0] == [0, 1]
    assert sel.valid.tolist() == [[True, True], [True, False]]
    assert sel.ranks[0].tolist() == [3, 1] and sel.ranks[1, 0] == 1
    assert sel.reasons[0] == ["label", "top_k"] and sel.reasons[1][0] == "label+top_k"
    assert sel.top_class.tolist() == [1, 0]
    np.testing.assert_allclose(sel.probabilities[0], torch.softmax(raw[0], 0)[[0, 1]].numpy(), rtol=1e-6)


def test_log_odds_are_finite_and_exact_for_a_confident_model():
    raw = torch.tensor([[60.0, 0.0, -5.0], [0.3, 0.2, 0.1]], dtype=torch.float64)
    classes = torch.tensor([[0, 1], [2, 0]])
    got = spec(output="log_odds").explained(raw, classes)
    p = torch.softmax(raw, 1)
    expect_row1 = torch.log(p[1, [2, 0]] / (1 - p[1, [2, 0]]))
    assert torch.isfinite(got).all()
    assert abs(got[0, 0].item() - (60.0 - math.log(1 + math.exp(-5.0)))) < 1e-9  # p ~ 1 - 1e-26
    torch.testing.assert_close(got[1], expect_row1)
    # sigmoid: the log-odds of class c are its logit
    torch.testing.assert_close(spec(output="log_odds", activation="sigmoid").explained(raw, classes),
                               raw.gather(1, classes))


def test_truth_csv_matches_relative_paths_file_names_and_stems(tmp_path):
    images = ["a/x1.png", "a/x2.png", "b/x2.png", "y.jpg"]
    path = tmp_path / "truth.csv"
    path.write_text("file,label,other\na/x1.png,tumor,1\nx2.png,normal,1\nb/x2.png,Necrosis,2\n"
                    "y,tumor,3\ny.jpg,normal,3\nmissing.png,tumor,4\n")
    truth = targets.load_truth(targets.TruthCsvConfig(path=str(path)), path, LABELS, images)
    # x2.png names two images: ambiguous, so that row counts as unmatched
    assert truth.labels == {"a/x1.png": (1,), "b/x2.png": (2,), "y.jpg": (1, 0)}
    assert truth.unmatched_rows == 2
    path.write_text("file,label\na/x1.png,tumor\ny.jpg,tumour\n")
    with pytest.raises(ConfigError) as info:
        targets.load_truth(targets.TruthCsvConfig(path=str(path)), path, LABELS, images)
    assert "line 3" in info.value.message and "'tumour'" in info.value.message
    with pytest.raises(ConfigError, match="no column 'lable'"):
        targets.load_truth(targets.TruthCsvConfig(path=str(path), **{"class": "lable"}), path, LABELS, images)



def test_truth_csv_exact_relative_path_wins_over_a_file_name_shared_with_a_subfolder(tmp_path):
    """Issue 31 (3): `a.jpg` is the relative path of the top-level image; `sub/a.jpg` sharing its
    file name does not make that row ambiguous."""
    images = ["a.jpg", "sub/a.jpg", ".hidden.png", "back\\slash.png", "win/x.png"]
    path = tmp_path / "truth.csv"
    path.write_text("file,label\na.jpg,tumor\n./sub/a.jpg,normal\n.hidden.png,Necrosis\na,normal\n"
                    "back\\slash.png,tumor\nwin\\x.png,normal\n")
    truth = targets.load_truth(targets.TruthCsvConfig(path=str(path)), path, LABELS, images)
    assert truth.labels == {"a.jpg": (1,), "sub/a.jpg": (0,), ".hidden.png": (2,), "back\\slash.png": (1,),
                            "win/x.png": (0,)}
    assert truth.unmatched_rows == 1  # the stem 'a' still names two images


@pytest.mark.parametrize("text", ["\u00b2", "\u0663", "--1", "1_000", "\uff11", "9" * 30])
def test_class_given_as_odd_digits_is_an_unknown_class_not_a_crash(text):
    """Issue 31 (5): `--class ²` passed isdigit() and then int() failed (exit 1)."""
    with pytest.raises(ConfigError, match="unknown class"):
        targets.class_index(text, LABELS, "targets.classes")


# -- every explainer explains the asked quantity -----------------------------------------------------

class TwoHead(nn.Module):
    """A small CNN with a configurable number of outputs (1 = a sigmoid / single-logit model)."""

    def __init__(self, outputs: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                                  nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16 * 16, outputs))

    def forward(self, x):
        return self.body(x) * 4.0


def make(module, model, background, **settings):
    context = ExplainContext(model=model, layer=None, layer_name="input", background=background,
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device=torch.device("cpu"),
                             batch_size=64, settings=module.Settings(**settings))
    return module.Explainer(context)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    """Images on the 8-bit grid (partition and kernel mask the 0-255 image the model saw)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g).float() / 255.0


QUESTIONS = [
    dict(output="probability"),
    dict(output="log_odds"),
    dict(output="logit", contrast=2),
    dict(output="probability", contrast=0),
]


@pytest.mark.parametrize("question", QUESTIONS, ids=lambda q: "-".join(f"{k}={v}" for k, v in q.items()))
@pytest.mark.parametrize("module,settings", [(partition, dict(name="partition", mask="blur(4,4)", max_evals=60)),
                                             (kernel, dict(name="kernel", nsamples=60,
                                                           segments={"n_segments": 8, "compactness": 10, "sigma": 0}))],
                         ids=["partition", "kernel"])
def test_masking_explainers_sum_exactly_to_the_explained_difference(module, settings, question):
    model = TwoHead().eval()
    images = _images(2)
    explainer = make(module, model, torch.zeros((0, 3, 16, 16)), **settings)
    batch = spec(entries=(1, "top_k"), top_k=2, **question).for_batch()
    result = explainer.explain(images, batch, [0, 1])
    with torch.no_grad():
        raw = model(images)
    expect = batch.explained(raw.double(), torch.from_numpy(result.classes)).numpy()
    np.testing.assert_allclose(result.outputs, expect, rtol=1e-5, atol=1e-6)
    assert np.max(result.additivity_error) < 1e-5
    np.testing.assert_allclose(result.shap_sum, result.outputs - result.base_values, atol=1e-5)
    assert result.classes[:, 0].tolist() == [1, 1]  # the asked class comes first


def test_gradient_at_the_input_converges_to_the_explained_difference():
    """Expected gradients are complete in expectation: with many samples the sum is within 5% of the
    scale S of the explained differences (as deep's bound: S = max(|e(x) - E e(b)|, E |e(x) - e(b)|))
    for probability, log-odds and contrasts (the documented tolerance)."""
    model = TwoHead().eval()
    images = _images(2)
    background = _images(6, seed=7)
    explainer = make(gradient, model, background, name="gradient", nsamples=1500)
    with torch.no_grad():
        fx, fb = model(images), model(background)
    for question in QUESTIONS:
        batch = spec(top_k=2, **question).for_batch()
        result = explainer.explain(images, batch, [0, 1])
        for i in range(2):
            cls = torch.from_numpy(result.classes[i])[None]
            diffs = batch.explained(fx[i:i + 1], cls) - batch.explained(fb, cls.expand(fb.shape[0], -1))
            scale = torch.maximum(diffs.mean(0).abs(), diffs.abs().mean(0)).numpy()
            # (a class contrasted with itself explains nothing: scale and error are both 0)
            assert np.all(result.additivity_error[i] <= 0.05 * scale + 1e-6), (question, result.additivity_error[i], scale)


def _resnet18():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    return model


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("build", [_resnet18, _vit], ids=["resnet18", "vit"])
@pytest.mark.parametrize("question", [dict(output="probability"), dict(output="log_odds"),
                                      dict(output="log_odds", contrast=3), dict(output="probability", activation="sigmoid")],
                         ids=["probability", "log_odds", "log_odds-contrast", "sigmoid-probability"])
def test_deep_is_additive_for_probability_and_log_odds(build, question):
    model = build().eval()
    g = torch.Generator().manual_seed(3)
    images = torch.randn((2, 3, 32, 32), generator=g)
    background = torch.randn((4, 3, 32, 32), generator=g)
    model = calibrate(model, torch.cat([images, background]))
    with torch.no_grad():  # make the head's outputs spread so the softmax is not flat
        head = model.fc if hasattr(model, "fc") else model.head
        head.weight.mul_(20.0)
    explainer = make(deep, model, background, name="deep")
    batch = targets.TargetSpec(top_k=2, **question).for_batch()
    result = explainer.explain(images, batch, [0, 1])
    with torch.no_grad():
        fx, fr = model(images).double(), model(background).double()
    scale = np.empty(result.classes.shape)
    for i, row in enumerate(result.classes):
        cls = torch.tensor(row)[None]
        e_x = batch.explained(fx[i:i + 1], cls)[0].numpy()
        e_r = batch.explained(fr, cls.expand(fr.shape[0], -1)).numpy()
        diffs = e_x[None] - e_r
        scale[i] = np.maximum(np.abs(diffs.mean(0)), np.abs(diffs).mean(0))
        # (float32 forward passes of other batch compositions: rounding of logits ~20 apart)
        np.testing.assert_allclose(result.outputs[i], e_x, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.base_values[i], e_r.mean(0), rtol=1e-4, atol=1e-6)
    same = result.classes == (question.get("contrast", -1))  # a class contrasted with itself: all zero
    assert np.all(result.additivity_error[same] <= 1e-9) and np.all(result.values[same] == 0)
    assert scale[~same].min() > 1e-4, "degenerate test: the explained quantity hardly differs"
    assert np.max(result.additivity_error[~same] / scale[~same]) <= 1e-3, result.additivity_error / scale


def test_integer_targets_still_mean_top_k_logits():
    model = TwoHead().eval()
    images = _images(2)
    explainer = make(partition, model, torch.zeros((0, 3, 16, 16)), name="partition", mask="blur(4,4)", max_evals=40)
    a = explainer.explain(images, 2, [0, 1])
    b = explainer.explain(images, spec(top_k=2).for_batch(), [0, 1])
    np.testing.assert_array_equal(a.values, b.values)
    with torch.no_grad():
        raw = model(images)
    assert a.classes.tolist() == torch.argsort(raw, 1, descending=True)[:, :2].tolist()
    np.testing.assert_allclose(a.outputs, raw.gather(1, torch.from_numpy(a.classes)).numpy(), rtol=1e-6)


# -- through the command line ----------------------------------------------------------------------

BINARY_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def make(num_classes=1):
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))
''')


@pytest.fixture
def binary_project(tmp_path, monkeypatch):
    """A one-logit (sigmoid) tumour model, tiles and a truth CSV beside them."""
    importable_module(tmp_path, "binnet", BINARY_MODEL, monkeypatch)
    (tmp_path / "labels.txt").write_text("tumor\n")
    write_images(tmp_path / "tiles", ["t1.png", "t2.png", "t3.png"], size=16)
    config = {
        "model": {"arch": "python:binnet:make", "num_classes": 1},
        "labels": "labels.txt", "preprocess": {"size": 16},
        "input": {"dir": "tiles"}, "background": {"from_input": 3},
        "explainer": {"name": "gradient", "nsamples": 8},
        "output": {"dir": "out", "top_k": 1}, "batch_size": 32, "device": "cpu", "workers": 0,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "explain_cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_single_logit_model_reports_the_sigmoid_probability(binary_project):
    proc = _cli("run", binary_project / "config.yaml", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(binary_project / "out" / "topk.csv")
    assert len(rows) == 3
    for row in rows:
        assert row["class_name"] == "tumor" and row["rank"] == "1"
        assert abs(float(row["probability"]) - 1 / (1 + math.exp(-float(row["output"])))) < 1e-6
        assert float(row["probability"]) < 1.0
        assert row["explained"] == "logit" and row["target"] == "top_k"
    info = json.loads((binary_project / "out" / "run.json").read_text())
    assert info["targets"]["activation"] == "sigmoid"


def test_binary_model_probability_output_and_truth_csv_errors(binary_project):
    (binary_project / "truth.csv").write_text("file,label\nt1.png,tumor\nt3.png,tumor\n")
    proc = _cli("run", binary_project / "config.yaml", "--no-progress", "--class", "label",
                "--set", "targets.output=probability", "--set", "explainer.nsamples=2000",
                "--set", "targets.from_csv={path: truth.csv}")
    assert proc.returncode == 3, proc.stderr  # t2.png has no label: an errors.csv row, the run goes on
    rows = _rows(binary_project / "out" / "topk.csv")
    assert sorted(r["image"] for r in rows) == ["t1.png", "t3.png"]
    for row in rows:
        p = float(row["probability"])
        assert abs(float(row["output"]) - p) < 1e-6  # the explained quantity is the probability
        assert row["target"] == "label" and row["label"] == "tumor" and row["predicted"] == "tumor"
        gap = float(row["output"]) - float(row["base_value"])
        assert abs(float(row["shap_sum"]) - gap) <= 0.05 * abs(gap) + 1e-4
    errors = _rows(binary_project / "out" / "errors.csv")
    assert [(e["image"], "no label in truth.csv" in e["error"]) for e in errors] == [("t2.png", True)]
    # a label that names no class: exit 2 before any work, naming the CSV line
    (binary_project / "truth.csv").write_text("file,label\nt1.png,tumor\nt2.png,normal\n")
    proc = _cli("validate", binary_project / "config.yaml", "--class", "label",
                "--set", "targets.from_csv={path: truth.csv}")
    assert proc.returncode == 2 and "line 3" in proc.stderr and "'normal'" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_chosen_classes_rows_in_order_with_ranks_and_class_option_equals_set(tiny_project):
    out_a, out_b = tiny_project / "out_a", tiny_project / "out_b"
    a = _cli("run", tiny_project / "config.yaml", "--no-progress", "--output", out_a, "--workers", "0",
             "--class", "fish $x$", "--class", "0")
    b = _cli("run", tiny_project / "config.yaml", "--no-progress", "--output", out_b, "--workers", "0",
             "--set", "targets.classes=[2, 'cat & dog']")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert (out_a / "topk.csv").read_bytes() == (out_b / "topk.csv").read_bytes()
    for overlay in (out_a / "overlays").rglob("*.svg"):
        assert overlay.read_bytes() == (out_b / "overlays" / overlay.relative_to(out_a / "overlays")).read_bytes()
    rows = _rows(out_a / "topk.csv")
    by_image: dict[str, list] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    import tinynet

    from explain_cli.config import load_config
    from explain_cli.images import load_preprocessed

    model = tinynet.make(3).eval()
    model.load_state_dict(torch.load(tiny_project / "tiny.pt"))
    preprocess = load_config(tiny_project / "config.yaml").preprocess
    assert len(by_image) == 4
    for image, got in by_image.items():
        assert [r["class_index"] for r in got] == ["2", "0"]
        assert [r["target"] for r in got] == ["class", "class"]
        _, x = load_preprocessed(tiny_project / "images" / image, preprocess)
        with torch.no_grad():
            logits = model(torch.from_numpy(x)[None])[0]
        order = torch.argsort(logits, descending=True).tolist()  # the model's ranking, 1 = top class
        assert [int(r["rank"]) for r in got] == [order.index(2) + 1, order.index(0) + 1], (image, logits)
    # an unknown name: exit 2 before any work, naming it and the nearest names
    proc = _cli("run", tiny_project / "config.yaml", "--no-progress", "--output", tiny_project / "out_c",
                "--class", "fish")
    assert proc.returncode == 2 and "unknown class 'fish'" in proc.stderr and "fish $x$" in proc.stderr
    assert not (tiny_project / "out_c" / "topk.csv").exists()
    # resuming with the same question by index instead of name is the same run; another question is refused
    again = _cli("run", tiny_project / "config.yaml", "--no-progress", "--output", out_a, "--class", "2",
                 "--class", "cat & dog")
    assert again.returncode == 0, again.stderr
    other = _cli("run", tiny_project / "config.yaml", "--no-progress", "--output", out_a, "--class", "1")
    assert other.returncode == 2 and "targets" in other.stderr


def test_contrast_titles_label_columns_report_and_merge(tiny_project):
    truth = tiny_project / "truth.csv"
    truth.write_text("file,label\na/one.png,<bird>\nb/one.png,fish $x$\ntwo.jpg,<bird>\nthree.bmp,cat & dog\n")
    out = tiny_project / "out"
    common = ["--no-progress", "--workers", "0", "--class", "label", "--class", "top_k",
              "--set", "targets.contrast=fish $x$", "--set", "targets.from_csv={path: truth.csv}",
              "--set", "output.top_k=1"]
    for shard in ("0/2", "1/2"):
        proc = _cli("run", tiny_project / "config.yaml", *common, "--shard", shard)
        assert proc.returncode == 0, proc.stderr
    merged = _cli("merge", out)
    assert merged.returncode == 0, merged.stderr
    rows = _rows(out / "topk.csv")
    one = [r for r in rows if r["image"] == "a/one.png"]
    assert one[0]["class_name"] == "<bird>" and "label" in one[0]["target"]  # the label first
    assert all(r["explained"] == "logit - logit(fish $x$)" for r in rows)
    assert all(r["label"] for r in rows) and all(r["predicted"] for r in rows)
    fish = [r for r in rows if r["class_name"] == "fish $x$"]
    for r in fish:  # "fish rather than fish" explains nothing: exactly zero
        assert float(r["output"]) == 0.0 and float(r["shap_sum"]) == 0.0
    svg = (out / "overlays" / "a" / "one.png.svg").read_text()
    assert "&lt;bird&gt; (label) rather than fish $x$: p = " in svg
    page = (out / "report.html").read_text()
    assert '"l":"\\u003cbird\\u003e"' in page and 'id="confusion"' in page


def test_sigmoid_model_names_both_classes_truth_of_both_and_thresholded_predicted(binary_project):
    """Two names for one output (negative, positive): a truth CSV may name either, the negative class
    is explained as 1 - p (logit -z), `predicted` follows targets.threshold, the report's table uses them."""
    (binary_project / "labels.txt").write_text("normal\ntumor\n")
    (binary_project / "truth.csv").write_text("file,label\nt1.png,tumor\nt2.png,normal\nt3.png,normal\n")
    common = ["--no-progress", "--class", "tumor", "--class", "label", "--set", "targets.output=probability",
              "--set", "targets.from_csv={path: truth.csv}"]
    proc = _cli("run", binary_project / "config.yaml", *common)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(binary_project / "out" / "topk.csv")
    by_image: dict[str, list] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    assert [r["class_name"] for r in by_image["t1.png"]] == ["tumor"]  # "why tumour?" = "why its label?": once
    p_tumor = {}
    for image in ("t2.png", "t3.png"):
        tumor, normal = by_image[image]
        assert (tumor["class_name"], tumor["class_index"], normal["class_name"], normal["class_index"]) == \
            ("tumor", "1", "normal", "0")
        assert normal["target"] == "label" and normal["label"] == "normal"
        assert abs(float(normal["probability"]) - (1 - float(tumor["probability"]))) < 1e-6
        assert abs(float(normal["output"]) - float(normal["probability"])) < 1e-6  # the explained p(normal)
        p_tumor[image] = float(tumor["probability"])
    p_tumor["t1.png"] = float(by_image["t1.png"][0]["probability"])
    for image, image_rows in by_image.items():
        want = "tumor" if p_tumor[image] >= 0.5 else "normal"
        assert {r["predicted"] for r in image_rows} == {want}
    # the threshold is a key: above every p, every tile is predicted normal (a new question: --overwrite)
    high = min(0.99, max(p_tumor.values()) + 1e-3)
    proc = _cli("run", binary_project / "config.yaml", *common, "--set", f"targets.threshold={high}",
                "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert {r["predicted"] for r in _rows(binary_project / "out" / "topk.csv")} == {"normal"}
    page = (binary_project / "out" / "report.html").read_text()
    assert 'id="confusion"' in page and '"p":"normal"' in page and '"l":"tumor"' in page


def test_sigmoid_negative_key_and_one_name_predicted(binary_project):
    """targets.negative names the negative class of a one-name labels file; without it, `predicted`
    says 'not tumor' below the threshold instead of 'tumor' on every row."""
    proc = _cli("run", binary_project / "config.yaml", "--no-progress", "--set", "targets.threshold=0.01")
    assert proc.returncode == 0, proc.stderr
    assert {r["predicted"] for r in _rows(binary_project / "out" / "topk.csv")} == {"tumor"}
    proc = _cli("run", binary_project / "config.yaml", "--no-progress", "--set", "targets.threshold=0.99",
                "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert {r["predicted"] for r in _rows(binary_project / "out" / "topk.csv")} == {"not tumor"}
    (binary_project / "truth.csv").write_text("file,label\nt1.png,tumor\nt2.png,normal\nt3.png,normal\n")
    proc = _cli("validate", binary_project / "config.yaml", "--class", "label",
                "--set", "targets.from_csv={path: truth.csv}")
    assert proc.returncode == 2 and "targets.negative" in proc.stderr, proc.stderr
    out = binary_project / "out_negative"
    proc = _cli("run", binary_project / "config.yaml", "--no-progress", "--output", out, "--class", "label",
                "--set", "targets.from_csv={path: truth.csv}", "--set", "targets.negative=normal")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out / "topk.csv")
    assert [(r["image"], r["class_name"], r["class_index"]) for r in rows] == \
        [("t1.png", "tumor", "1"), ("t2.png", "normal", "0"), ("t3.png", "normal", "0")]
    for row in rows:  # the logit of "normal" is minus the model's output
        assert abs(float(row["output"]) - math.log(float(row["probability"]) / (1 - float(row["probability"])))) < 1e-4


def test_truth_csv_that_grows_resumes_and_a_changed_label_is_refused_or_relabelled(tiny_project):
    """A nightly rerun whose truth CSV gained a row explains that image and skips the rest; a changed
    label of a done image is refused naming it, and --relabel redoes only that image."""
    truth = tiny_project / "truth.csv"
    truth.write_text("file,label\na/one.png,<bird>\nb/one.png,fish $x$\nthree.bmp,cat & dog\n")
    common = ["--no-progress", "--workers", "0", "--class", "label", "--set", "targets.from_csv={path: truth.csv}"]
    out = tiny_project / "out"
    first = _cli("run", tiny_project / "config.yaml", *common)
    assert first.returncode == 3, first.stderr  # a/two.jpg has no row: an errors.csv row
    assert [e["image"] for e in _rows(out / "errors.csv")] == ["a/two.jpg"]
    before = {r["image"]: r for r in _rows(out / "topk.csv")}
    with truth.open("a") as fh:
        fh.write("a/two.jpg,<bird>\n")  # the row errors.csv asked for
    second = _cli("run", tiny_project / "config.yaml", *common)
    assert second.returncode == 0, second.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["already_done"] == 3 and info["counts"]["explained"] == 1
    rows = _rows(out / "topk.csv")
    assert sorted(r["image"] for r in rows) == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]
    assert not _rows(out / "errors.csv")
    assert {r["image"]: r for r in rows}["a/one.png"] == before["a/one.png"]
    # a done image's label changed: refused naming the image, nothing redone
    truth.write_text(truth.read_text().replace("three.bmp,cat & dog", "three.bmp,<bird>"))
    refused = _cli("run", tiny_project / "config.yaml", *common)
    assert refused.returncode == 2 and "three.bmp" in refused.stderr and "--relabel" in refused.stderr, refused.stderr
    relabel = _cli("run", tiny_project / "config.yaml", *common, "--relabel")
    assert relabel.returncode == 0, relabel.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["already_done"] == 3 and info["counts"]["explained"] == 1
    rows = _rows(out / "topk.csv")
    assert len(rows) == 4 and {r["image"]: r for r in rows}["three.bmp"]["label"] == "<bird>"
    assert {r["image"]: r for r in rows}["three.bmp"]["class_name"] == "<bird>"
    import explain_cli  # the Python API takes the same flag

    truth.write_text(truth.read_text().replace("three.bmp,<bird>", "three.bmp,fish $x$"))
    same = {"targets": {"classes": ["label"], "from_csv": {"path": "truth.csv"}}, "workers": 0}
    from explain_cli.errors import UserError

    with pytest.raises(UserError, match="three.bmp"):
        explain_cli.run(tiny_project / "config.yaml", **same)
    result = explain_cli.run(tiny_project / "config.yaml", relabel=True, **same)
    assert result.exit_code == 0 and result.explained == 1 and result.already_done == 3


def test_class_entries_are_stripped_so_top_k_and_label_keep_their_meaning():
    assert targets.TargetsConfig(classes=["top_k ", " tumor"]).classes == ["top_k", "tumor"]
    with pytest.raises(ValueError, match="from_csv"):
        targets.TargetsConfig(classes=[" label"])  # still needs the truth CSV, not a class named ' label'


@pytest.mark.parametrize("explainer", ["deep", "partition"])
def test_sigmoid_negative_class_is_exact_for_deep_and_partition_with_metrics(binary_project, explainer):
    """The negative class of a two-name sigmoid model goes through deep's exact rules and the masked
    outputs of partition: values sum to the explained probability; the metrics read 1 - p for it."""
    (binary_project / "labels.txt").write_text("normal\ntumor\n")
    proc = _cli("run", binary_project / "config.yaml", "--no-progress", "--explainer", explainer,
                "--class", "normal", "--class", "tumor", "--set", "targets.output=probability",
                "--set", "metrics=[deletion]", "--set", "model.layer=input")
    assert proc.returncode == 0, proc.stderr
    assert "metrics failed" not in proc.stderr
    rows = _rows(binary_project / "out" / "topk.csv")
    assert len(rows) == 6
    for normal, tumor in zip(rows[::2], rows[1::2]):
        assert (normal["class_name"], tumor["class_name"]) == ("normal", "tumor")
        assert abs(float(normal["output"]) + float(tumor["output"]) - 1) < 1e-5  # p(normal) = 1 - p(tumour)
        for row in (normal, tumor):
            gap = float(row["output"]) - float(row["base_value"])
            assert abs(float(row["shap_sum"]) - gap) <= 1e-3 * max(abs(gap), 1e-3)
            assert row["deletion_auc"] != ""
