"""report.html without a browser: what the page embeds, escaping, optional metric columns,
shards and merge, the `report` command. tests/test_report_browser.py drives it in Chromium."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from urllib.parse import quote, unquote

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


# --- the Slides section (slides/index.json of a slide run) ----------------------------------------

SLIDE_ID = 'study/case "<b>1</b>" #2 é'     # a subfolder and markup in the slide's name
ODD_ID = "odd\\x41"                          # a literal backslash: topk.csv escapes it, index.json does not


def _slide_entry(ident: str, tiles: list[tuple[int, int, float, float]], kept: int, no_tissue: int,
                 failed: int = 0) -> dict:
    """An index.json entry as explain_cli/slides/heatmap.py writes it; tiles are (x, y, probability, attribution)."""
    rel = ident + ".tif"
    top = [{"image": f"{rel}/{x}_{y}", "x": x, "y": y, "probability": p} for x, y, p, _ in
           sorted(tiles, key=lambda t: -t[2])]
    by_attr = [{"image": f"{rel}/{x}_{y}", "x": x, "y": y, "attribution": a} for x, y, _, a in
               sorted(tiles, key=lambda t: -t[3])]
    entry = {"id": ident, "rel": rel, "kind": "file", "dimensions": [1024, 768], "mpp": 0.5,
             "tiles_total": kept + no_tissue, "tiles_no_tissue": no_tissue, "tiles_kept": kept,
             "tiles_explained": len(tiles), "tiles_failed": failed, "classes": [], "top_by_probability": {},
             "top_by_attribution": {}}
    if tiles:
        entry["classes"] = [{"name": "<tumour>", "index": 1, "heatmap": "heatmap-tumour.png",
                             "probability": "probability-tumour.png", "tiles": len(tiles)}]
        entry["top_by_probability"] = {"<tumour>": top}
        entry["top_by_attribution"] = {"<tumour>": by_attr}
    else:
        entry["warning"] = "no tile with enough tissue: nothing explained"
    return entry


def _slide_run(out: Path) -> None:
    """A hand-made slide run: topk.csv with slide columns, slides/index.json and the slides' PNGs."""
    from explain_cli.names import escape

    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"status": "complete", "config": {"output": {"format": "png"}}}))
    hostile = [(128, 0, 0.91, 3.5), (0, 64, 0.75, 7.25), (64, 64, 0.12, -1.0)]
    slides = [_slide_entry(SLIDE_ID, hostile, kept=4, no_tissue=9, failed=1),
              _slide_entry("empty", [], kept=0, no_tissue=12),
              _slide_entry(ODD_ID, [(0, 0, 0.5, 0.25)], kept=1, no_tissue=0)]
    slides[2]["classes"][0]["heatmap"] = "../../../etc/passwd"  # index.json is data: never a link out of slides/<id>
    with open(out / "topk.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "rank", "class_index", "class_name", "probability", "output", "base_value",
                         "shap_sum", "additivity_error", "slide", "x", "y", "mpp", "cells"])
        # the hostile slide's last top tile has no row (as in a shard's report): named, not linked
        for ident, tiles in ((SLIDE_ID, hostile[:2]), (ODD_ID, [(0, 0, 0.5, 0.25)])):
            for x, y, p, a in tiles:
                writer.writerow([escape(f"{ident}.tif/{x}_{y}"), 1, 1, "<tumour>", p, 1, 0, a, 0.001, escape(ident),
                                 x, y, 1.0, "0.1 0.2 0.3 0.4"])
    for ident in (SLIDE_ID, ODD_ID):
        (out / "slides" / ident).mkdir(parents=True)
        for name in ("heatmap-tumour.png", "probability-tumour.png", "thumbnail.png"):
            (out / "slides" / ident / name).write_bytes(b"\x89PNG")
    (out / "slides" / "index.json").write_text(json.dumps({"slides": slides}))


def _section(page: str, ident: str) -> str:
    """The HTML of the Slides section, or of one slide's card in it."""
    slides = re.search(r'<section id="slides">.*?</section>', page, re.S)
    assert slides, "no Slides section"
    if not ident:
        return slides.group(0)
    card = re.search(r'<article class="slide" data-slide="' + re.escape(ident) + r'">.*?</article>', slides.group(0), re.S)
    assert card, f"no card for {ident}"
    return card.group(0)


def test_slides_section_one_card_per_slide(tmp_path):
    from html import escape as h

    out = tmp_path / "out"
    _slide_run(out)
    page = build_report(out)
    section = _section(page, "")
    assert re.search(r'<h2>Slides <span class="count">3</span> <span class="count bad">1 without', section)
    assert section.count('<article class="slide"') == 3
    # the slide columns of topk.csv are the cards' business, not table columns
    assert [c["key"] for c in embedded(page)["columns"]] == ["probability", "additivity_error"]

    card = _section(page, h(SLIDE_ID))
    assert "<b>1</b>" not in card and "<tumour>" not in card and h(SLIDE_ID + ".tif") in card  # names are text
    assert re.search(r'<span class="n">3</span> tiles explained of 4 with tissue.*?<span class="n">9</span> skipped '
                     r'for no tissue.*?<span class="n bad">1</span> failed.*?13 in all', card)
    folder = "slides/study/case%20%22%3Cb%3E1%3C/b%3E%22%20%232%20%C3%A9/"
    assert re.search(f'<a class="map" href="{folder}heatmap-tumour.png"[^>]*><img loading="lazy" decoding="async" '
                     f'src="{folder}heatmap-tumour.png"', card)
    assert f'href="{folder}probability-tumour.png" target="_blank" rel="noopener">probability map</a>' in card
    assert f'href="{folder}thumbnail.png"' in card and "tissue mask" not in card  # tissue.png is missing
    assert "slide-warning" not in card
    # top tiles: best first, each a link to its table row by the name the table shows
    lists = re.findall(r"<h4[^>]*>(Top tiles by \w+)</h4><ol>(.*?)</ol>", card)
    assert [title for title, _ in lists] == ["Top tiles by probability", "Top tiles by attribution"]
    items = {title: re.findall(r"<li>(.*?)</li>", body) for title, body in lists}
    first = 'href="#image=' + quote(f"{SLIDE_ID}.tif/128_0", safe="") + '"'
    assert first in items["Top tiles by probability"][0] and "0.910" in items["Top tiles by probability"][0]
    assert '"#image=' + quote(f"{SLIDE_ID}.tif/0_64", safe="") in items["Top tiles by attribution"][0]
    assert "7.25" in items["Top tiles by attribution"][0]
    assert ">64_64</span>" in items["Top tiles by probability"][2] and "href" not in items["Top tiles by probability"][2]
    assert f'href="#q={quote(SLIDE_ID + ".tif/", safe="")}"' in card and "its 2 tile(s) in the table" in card

    empty = _section(page, "empty")
    assert '<p class="slide-warning">no tile with enough tissue: nothing explained</p>' in empty
    assert '<span class="n">0</span> tiles explained' in empty and "<img" not in empty
    assert "No heatmap: no tile of this slide was explained." in empty

    odd = _section(page, h(ODD_ID))
    assert "etc/passwd" not in odd and "heatmap not drawn" in odd  # the '..' name is not linked
    assert 'href="slides/odd%5Cx41/probability-tumour.png"' in odd
    # the table shows topk.csv's escaped name (odd\\x41.tif/0_0); the link names that row
    assert f'href="#image={quote(ODD_ID.replace(chr(92), chr(92) * 2) + ".tif/0_0", safe="")}"' in odd
    assert ODD_ID.replace("\\", "\\\\") + ".tif/0_0" in [im["f"] for im in embedded(page)["images"]]


def test_no_slides_section_without_a_readable_index(tmp_path):
    out = tmp_path / "out"
    _write_run(out, {})
    assert 'id="slides"' not in build_report(out)
    (out / "slides").mkdir()
    (out / "slides" / "index.json").write_text("{not json")
    assert 'id="slides"' not in build_report(out)  # a warning in the log, never a failed report
    (out / "slides" / "index.json").write_text(json.dumps({"slides": [{"rel": "no id"}, "x"]}))
    assert 'id="slides"' not in build_report(out)
