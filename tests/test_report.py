"""report.html without a browser: what the page embeds, escaping, optional metric columns,
shards and merge, the `report` command. tests/test_report_browser.py drives it in Chromium."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.report import REPORT_NAME, _script_json, build_report

from conftest import write_images

runner = CliRunner()

HOSTILE_LABELS = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "a\u2028b & \"c\" 'd'"]
HOSTILE_FILE = "q\"><img src=x onerror=alert(3)> #1?x=%41&y 'é' 猫.png"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def embedded(page: str) -> dict:
    """The JSON the page's script renders the table from."""
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def topk_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_every_run_writes_a_self_contained_report(tiny_project):
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 0, result.output
    out = tiny_project / "out"
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    data = embedded(page)
    rows = topk_rows(out / "topk.csv")
    assert [im["f"] for im in data["images"]] == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]
    # gradient always has stability; faithfulness is opt-in (metrics: [])
    assert [c["key"] for c in data["columns"]] == ["probability", "additivity_error", "stability"]
    for im in data["images"]:
        mine = [r for r in rows if r["image"] == im["f"]]
        assert im["c"] == [r["class_name"] for r in mine]
        assert im["v"][0] == pytest.approx([float(r["probability"]) for r in mine])
        assert im["u"].startswith("overlays/") and (out / unquote(im["u"])).is_file()
    # nothing from the network, no inlined overlay, no row rendered server-side
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert "<svg" not in page and "<img" not in page and "@import" not in page
    assert "content=\"default-src &#x27;none&#x27;;" in page
    for text in ("gradient", "python:tinynet:make", "torch", "nsamples", "None: every selected image was explained"):
        assert text in page


def test_names_are_escaped_and_urls_percent_encoded(tiny_project):
    (tiny_project / "labels.json").write_text(json.dumps(HOSTILE_LABELS), encoding="utf-8")
    write_images(tiny_project / "images", [HOSTILE_FILE, "sub dir/x#y.png"], seed=3)
    (tiny_project / "images" / 'bad "<b>x<i>".png').write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = invoke("run", tiny_project / "config.yaml", "--no-progress", "--set", "labels=labels.json")
    assert result.exit_code == 3, result.output  # the broken file
    out = tiny_project / "out"
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    # only our two script elements and no markup from a name; no raw U+2028 (a JS line break)
    assert len(re.findall(r"<script", page, re.I)) == 2
    assert "<img" not in page.lower() and "<b>" not in page and "<i>" not in page and "\u2028" not in page
    assert "bad &quot;&lt;b&gt;x&lt;i&gt;&quot;.png" in page  # errors table, escaped
    data = embedded(page)
    by_file = {im["f"]: im for im in data["images"]}
    assert HOSTILE_FILE in by_file and "sub dir/x#y.png" in by_file
    assert {c for im in data["images"] for c in im["c"]} <= set(HOSTILE_LABELS)
    assert len({c for im in data["images"] for c in im["c"]}) >= 2
    for name, im in by_file.items():
        url = im["u"]
        assert not set(url) & set(" \"'<>#?&\u2028") and url.isascii(), url
        assert (out / unquote(url)).is_file()
    assert by_file["sub dir/x#y.png"]["u"] == "overlays/sub%20dir/x%23y.png.svg"


def test_script_json_cannot_close_the_script():
    tricky = ["</script><script>alert(1)</script>", "<!-- x", "a & b", "line\u2028sep\u2029", "]]>"]
    text = _script_json({"names": tricky})
    assert not set(text) & set("<>&\u2028\u2029")
    assert json.loads(text) == {"names": tricky}


def _write_run(out: Path, extra_columns: dict[str, list[str]], run_extra: dict | None = None) -> None:
    """A hand-made output folder: run.json, topk.csv (with extra columns), overlays."""
    out.mkdir(parents=True)
    info = {"status": "complete", "config": {"explainer": {"name": "gradient", "nsamples": 8},
                                             "model": {"arch": "x", "layer": "input"}, "output": {"format": "png"}},
            "seconds": 2.0, "counts": {"explained": 3, "failed": 0}, "device": "cpu", "versions": {"torch": "2"}}
    (out / "run.json").write_text(json.dumps({**info, **(run_extra or {})}))
    columns = ["image", "rank", "class_index", "class_name", "probability", "output", "base_value",
               "shap_sum", "additivity_error", *extra_columns]
    lines = [",".join(columns)]
    for i, image in enumerate(["a.png", "b.png", "c.png"]):
        for rank in (1, 2):
            row = [image, str(rank), str(rank), f"class{rank}", f"{0.9 - 0.1 * i - 0.5 * (rank - 1):.2f}",
                   "1", "0", "1", "0.001"]
            row += [values[2 * i + rank - 1] for values in extra_columns.values()]
            lines.append(",".join(row))
    (out / "topk.csv").write_text("\n".join(lines) + "\n")
    (out / "overlays").mkdir()
    for image in ("a", "b", "c"):
        (out / "overlays" / f"{image}.png").write_bytes(b"png")


def test_metric_columns_and_random_reference_are_shown_when_present(tmp_path):
    out = tmp_path / "out"
    _write_run(out, {
        "stability": ["0.9", "0.8", "0.2", "0.1", "0.4", ""],
        "deletion_auc": ["0.1", "0.2", "0.3", "0.4", "", ""],
        "insertion_auc": ["0.7", "0.6", "0.5", "0.4", "0.3", "0.2"],
        "faithfulness_x": ["1", "2", "3", "4", "5", "6"],   # a numeric column the report does not know
        "note": ["a", "b", "c", "d", "e", "f"],              # a text column: not a numeric column
        "empty_metric": ["", "", "", "", "", ""],            # never computed: not shown
    }, {"metrics": {"model_evaluations": 120,
                    "random_reference": {"deletion_auc": 0.412, "insertion_auc": 0.305, "bad": "x"}}})
    page = build_report(out)
    data = embedded(page)
    assert [c["key"] for c in data["columns"]] == ["probability", "additivity_error", "stability",
                                                   "deletion_auc", "insertion_auc", "faithfulness_x"]
    by_file = {im["f"]: im for im in data["images"]}
    assert by_file["a.png"]["v"][2] == [0.9, 0.8]
    assert by_file["c.png"]["v"][2] == [0.4, None] and by_file["c.png"]["v"][3] == [None, None]
    assert data["reference"] == {"deletion_auc": 0.412, "insertion_auc": 0.305}
    assert by_file["b.png"]["u"] == "overlays/b.png"  # run.json says png
    # summary cards: median over top-1 classes, with the random reference next to it
    assert re.search(r"Stability</div><div class=\"value\">0\.40<", page)
    assert re.search(r"Deletion AUC</div><div class=\"value\">0\.200<", page)
    assert "random pixel order: 0.412" in page and "random pixel order: 0.305" in page
    assert "median over top-1 classes; below 0.5" in page  # 0.4 < 0.5: the warning tone
    assert 'class="card warn"' in page


def test_metric_reference_of_merged_shards_is_their_weighted_mean(tmp_path):
    out = tmp_path / "out"
    _write_run(out, {"deletion_auc": ["0.1"] * 6}, {"merged": True, "shards": 2})
    for i, (ref, n) in enumerate([(0.2, 1), (0.5, 3)]):
        (out / f"run.shard-{i}-of-2.json").write_text(json.dumps({
            "status": "complete", "shard": {"index": i, "count": 2}, "counts": {"explained": n},
            "metrics": {"random_reference": {"deletion_auc": ref}}, "host": f"node{i}", "seconds": 1.5}))
    page = build_report(out)
    assert embedded(page)["reference"] == {"deletion_auc": pytest.approx((0.2 + 1.5) / 4)}
    assert "merged from 2 shards" in page and "node0" in page and "run.shard-1-of-2.json" in page


def test_sharded_runs_then_merge(tiny_project):
    cfg, out = tiny_project / "config.yaml", tiny_project / "out"
    assert invoke("run", cfg, "--no-progress", "--shard", "0/2").exit_code == 0
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    assert "sharded, not merged: 1 of 2 shards complete" in page
    assert [im["f"] for im in embedded(page)["images"]] == ["a/one.png", "b/one.png"]
    assert invoke("run", cfg, "--no-progress", "--shard", "1/2").exit_code == 0
    assert "2 of 2 shards complete" in (out / REPORT_NAME).read_text(encoding="utf-8")
    result = invoke("merge", out)
    assert result.exit_code == 0, result.output
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    assert "merged from 2 shards" in page and "run.shard-0-of-2.json" in page
    assert [im["f"] for im in embedded(page)["images"]] == ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp"]


def test_report_command(tiny_project, tmp_path):
    result = invoke("report", tmp_path / "nowhere")
    assert result.exit_code == 2 and "not a folder" in result.output
    (tmp_path / "empty").mkdir()
    result = invoke("report", tmp_path / "empty")
    assert result.exit_code == 2 and "no run outputs" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "empty" / REPORT_NAME).exists()

    assert invoke("run", tiny_project / "config.yaml", "--no-progress").exit_code == 0
    path = tiny_project / "out" / REPORT_NAME
    first = path.read_bytes()
    path.unlink()
    result = invoke("report", tiny_project / "out")
    assert result.exit_code == 0 and "report.html" in result.output
    assert path.read_bytes() == first  # no timestamp of its own: same folder, same page
    mtime = path.stat().st_mtime_ns
    assert invoke("report", tiny_project / "out").exit_code == 0
    assert path.stat().st_mtime_ns == mtime  # unchanged page: not rewritten
    assert not list(path.parent.glob(".report.html.*"))  # no temp file left behind


def test_a_report_failure_never_changes_the_run(tiny_project, monkeypatch):
    def broken(output_dir):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("explain_cli.report.build_report", broken)
    result = invoke("run", tiny_project / "config.yaml", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "could not write report.html" in result.output and "disk on fire" in result.output
    assert (tiny_project / "out" / "topk.csv").exists() and not (tiny_project / "out" / REPORT_NAME).exists()
    logging.getLogger("explain_cli").handlers.clear()


def test_a_run_without_explained_images_still_gets_a_page(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "interrupted", "interrupted_by": "SIGTERM", "shard": None}))
    (out / "errors.csv").write_text("image,error\nx.png,cannot decode image\n")
    page = build_report(out)
    assert embedded(page)["images"] == [] and "interrupted by SIGTERM" in page
    assert "x.png" in page and "cannot decode image" in page


def test_samples_column_marks_images_that_hit_the_cap(tmp_path):
    out = tmp_path / "out"
    _write_run(out, {"stability": ["0.95", "0.91", "0.6", "0.5", "0.93", "0.9"],
                     "nsamples_used": ["64", "64", "500", "500", "128", "128"]},
               {"config": {"explainer": {"name": "gradient", "nsamples": "auto", "max_nsamples": 500,
                                         "target_stability": 0.9},
                           "model": {"arch": "x", "layer": "input"}, "output": {"format": "png"}}})
    page = build_report(out)
    data = embedded(page)
    column = next(c for c in data["columns"] if c["key"] == "nsamples_used")
    assert column["label"] == "Samples" and column["warn_at"] == 500
    assert "1 image(s) hit max_nsamples 500 before target_stability" in page
    assert re.search(r"Samples \(auto\)</div><div class=\"value\">128<", page)

    fixed = tmp_path / "fixed"  # a fixed nsamples: the same count everywhere, no column
    _write_run(fixed, {"nsamples_used": ["8"] * 6})
    assert "nsamples_used" not in [c["key"] for c in embedded(build_report(fixed))["columns"]]
