"""Overlays that say how far to trust them: "no attribution" for maps of numeric noise, faded
and noted maps below the trust threshold, the trust numbers in the caption, and output.scale
(per_image, run, a fixed limit) with run limits that resume and shards agree on."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.overlay_scale import calibration_sample
from explain_cli.render import Trust, compose_panels, no_attribution, overlay_bytes, trust_caption

SVG = "{http://www.w3.org/2000/svg}"
RED = (255, 13, 87)


def _image(size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _texts(svg: bytes) -> dict[str, ET.Element]:
    return {t.get("id"): t for t in ET.fromstring(svg).iter(f"{SVG}text") if t.get("id")}


def _ticks(svg: bytes) -> list[str]:
    root = ET.fromstring(svg)
    return [t.text for t in root.iter(f"{SVG}text") if not t.get("id") and t.text not in (None, "SHAP value")]


def _half_red(k: int = 1, value: float = 1.0) -> np.ndarray:
    values = np.zeros((k, 3, 16, 16), dtype=np.float32)
    values[:, 0, :, :8] = value  # left half positive, right half zero
    return values


# --- no attribution -------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [np.zeros((1, 3, 16, 16)),
                                    np.random.default_rng(1).normal(scale=1e-9, size=(1, 3, 16, 16))],
                         ids=["zeros", "noise-1e-9"])
def test_a_map_of_zeros_or_noise_says_no_attribution(values):
    empty, _ = compose_panels(_image(), np.zeros((1, 3, 16, 16)))
    panels, _ = compose_panels(_image(), values)
    np.testing.assert_array_equal(panels[1], empty[1])  # drawn empty: no saturated noise
    svg = overlay_bytes(_image(), values, ["tumor: p = 0.00"])
    note = _texts(svg)["note-1"]
    assert note.text == "no attribution" and note.get("class") == "empty"
    png = Image.open(io.BytesIO(overlay_bytes(_image(), values, ["tumor: p = 0.00"], fmt="png")))
    plain = Image.open(io.BytesIO(overlay_bytes(_image(), _half_red(), ["tumor: p = 0.00"], fmt="png")))
    assert png.height > plain.height  # the note's line


def test_noise_is_judged_against_the_explained_output():
    rng = np.random.default_rng(2)
    noise = rng.normal(scale=1e-8, size=(3, 224, 224)).astype(np.float32)  # partition's ~1e-8 of a normal tile
    assert no_attribution(noise)
    small = np.full((3, 100, 100), 1e-6 / 3, dtype=np.float32)  # |values| sum to 0.01
    assert no_attribution(small, scale=100.0)  # a ten-thousandth of a logit of 100
    assert not no_attribution(small, scale=1.0)  # a probability moved by 0.01: drawn
    assert not no_attribution(small, scale=1e-3)  # the scale never goes below 1
    # a real effect spread thin: 0.02 over 224 x 224 pixels is 4e-7 a pixel, and still drawn
    assert not no_attribution(np.full((1, 224, 224), 0.02 / 224**2, dtype=np.float32))
    assert Trust(output=-250.0, base_value=3.0).scale == 250.0 and Trust().scale == 1.0


def test_a_noise_map_does_not_set_the_limit_of_the_others():
    values = np.concatenate([_half_red(value=0.5), np.full((1, 3, 16, 16), 1e-9, np.float32)])
    panels, limit = compose_panels(_image(), values)
    assert limit == 0.5
    assert _texts(overlay_bytes(_image(), values, ["a", "b"]))["note-2"].text == "no attribution"
    assert "note-1" not in _texts(overlay_bytes(_image(), values, ["a", "b"]))


# --- trust threshold ------------------------------------------------------------------------------

def _redness(panel: np.ndarray) -> float:
    """How far the positive half is from the plain panel towards full red, 0..1."""
    return float(panel[0, 0, 0] - panel[0, 0, 1]) / (RED[0] - RED[1])


def test_a_low_stability_map_is_faded_and_noted():
    values = _half_red(2)
    trust = [Trust(stability=0.91), Trust(stability=0.36)]
    panels, _ = compose_panels(_image(), values, trust=trust)
    assert tuple(panels[1][0, 0]) == RED  # the trusted map at full colour
    assert _redness(panels[2]) < 0.5  # the unstable one faded...
    assert tuple(panels[2][0, 0]) != tuple(_image()[0, 0])  # ...but still drawn
    texts = _texts(overlay_bytes(_image(), values, ["good", "shaky"], trust=trust))
    assert "note-1" not in texts
    assert texts["note-2"].text == "faded: unstable (stability 0.36)" and texts["note-2"].get("class") == "warning"


def test_additivity_error_beyond_output_minus_base_is_faded():
    values = _half_red(2)
    bad = Trust(stability=0.95, additivity_error=0.79, output=1.65, base_value=1.0)  # |output - base| 0.65
    good = Trust(stability=0.95, additivity_error=0.5, output=1.65, base_value=1.0)
    assert bad.not_additive and not good.not_additive
    panels, _ = compose_panels(_image(), values, trust=[good, bad])
    assert tuple(panels[1][0, 0]) == RED and _redness(panels[2]) < 0.5
    note = _texts(overlay_bytes(_image(), values, ["a", "b"], trust=[good, bad]))["note-2"].text
    assert note == "faded: additivity error 122%"  # of |output - base|, as the caption says
    both = Trust(stability=0.36, additivity_error=0.79, output=1.65, base_value=1.0)
    note = _texts(overlay_bytes(_image(), values, ["a", "b"], trust=[good, both]))["note-2"].text
    assert note == "faded: unstable (0.36), additivity error 122%"  # whole: it fits under the panel


# --- caption --------------------------------------------------------------------------------------

def test_caption_shows_stability_and_additivity_error():
    trust = [Trust(stability=0.912, additivity_error=0.05, output=3.0, base_value=2.0),
             Trust(stability=None, additivity_error=0.79, output=1.65, base_value=1.0)]
    assert trust_caption(trust) == ("stability 0.91, \u2013  \u00b7  additivity error 5.0%, 122% "
                                    "of |output \u2212 base|")
    caption = "a/one.png  \u00b7  gradient explainer  \u00b7  layer input"
    svg = overlay_bytes(_image(), _half_red(2), ["a", "b"], caption=caption, trust=trust)
    assert _texts(svg)["caption"].text == caption + "  \u00b7  " + trust_caption(trust)
    # a long image name is cut, the numbers are kept
    long = overlay_bytes(_image(), _half_red(2), ["a", "b"], caption="x/" * 200 + caption, trust=trust)
    text = _texts(long)["caption"].text
    assert "\u2026" in text and text.endswith(trust_caption(trust))
    # unknown numbers: nothing is added
    assert trust_caption([Trust(), Trust()]) == ""
    assert _texts(overlay_bytes(_image(), _half_red(), ["a"], caption=caption))["caption"].text == caption


def test_files_stay_byte_identical_with_trust_and_a_limit():
    trust = [Trust(stability=0.3, additivity_error=0.1, output=2.0, base_value=1.0)]
    for fmt in ("svg", "png"):
        one = overlay_bytes(_image(), _half_red(), ["a"], fmt=fmt, caption="c", limit=0.25, trust=trust)
        assert one == overlay_bytes(_image(), _half_red(), ["a"], fmt=fmt, caption="c", limit=0.25, trust=trust)


# --- output.scale ---------------------------------------------------------------------------------

def test_a_fixed_limit_gives_two_images_the_same_scale():
    weak, strong = _half_red(value=0.01), _half_red(value=2.0)
    assert compose_panels(_image(), weak)[1] != compose_panels(_image(), strong)[1]  # per image: own limits
    assert compose_panels(_image(), weak, limit=0.5)[1] == compose_panels(_image(), strong, limit=0.5)[1] == 0.5
    ticks = [_ticks(overlay_bytes(_image(), v, ["a"], limit=0.5)) for v in (weak, strong)]
    assert ticks[0] == ticks[1] == ["\u22120.4", "\u22120.2", "0", "0.2", "0.4"]
    assert ticks[0] != _ticks(overlay_bytes(_image(), weak, ["a"]))
    # on one scale the weak map is faint and the strong one full red (clipped)
    panels_weak, _ = compose_panels(_image(), weak, limit=0.5)
    panels_strong, _ = compose_panels(_image(), strong, limit=0.5)
    assert tuple(panels_strong[1][0, 0]) == RED and _redness(panels_weak[1]) < 0.05
    with pytest.raises(ValueError, match="positive"):
        compose_panels(_image(), weak, limit=0.0)


def test_calibration_sample_is_seeded_and_independent_of_sharding():
    images = [f"tile_{i:03d}.png" for i in range(100)]
    sample = calibration_sample(images, 0)
    assert len(sample) == 8 and sample == sorted(sample) and sample == calibration_sample(list(images), 0)
    assert sample != calibration_sample(images, 1)
    assert sample != images[:8]  # spread over the input, not its first (often one slide's) tiles
    assert calibration_sample(images[:3], 0) == images[:3]


def _svg_ticks(path) -> list[str]:
    return _ticks(path.read_bytes())


def test_run_scale_shared_resumed_and_agreed_by_shards(tiny_project):
    runner = CliRunner()
    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--set", "output.scale=run"])
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "run.json").read_text())["overlay_scale"]
    assert entry["mode"] == "run" and entry["limit"] > 0 and len(entry["calibration_images"]) == 4
    overlays = sorted((out / "overlays").rglob("*.svg"))
    assert len(overlays) == 4 and len({tuple(_svg_ticks(p)) for p in overlays}) == 1  # one colour bar
    # per_image: the same maps get their own bars
    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--output", str(tiny_project / "own")])
    assert result.exit_code == 0, result.output
    own = sorted((tiny_project / "own" / "overlays").rglob("*.svg"))
    assert len({tuple(_svg_ticks(p)) for p in own}) > 1
    assert json.loads((tiny_project / "own" / "run.json").read_text())["overlay_scale"] == {"mode": "per_image"}
    # a resume keeps the recorded limit (set by hand here, so reuse is visible): the redone
    # overlay is drawn on it, not on a recomputed one
    data = json.loads((out / "run.json").read_text())
    data["overlay_scale"]["limit"] = 0.5
    (out / "run.json").write_text(json.dumps(data))
    overlays[0].unlink()
    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--set", "output.scale=run"])
    assert result.exit_code == 0, result.output
    assert _svg_ticks(overlays[0]) == ["\u22120.4", "\u22120.2", "0", "0.2", "0.4"]
    assert json.loads((out / "run.json").read_text())["overlay_scale"]["limit"] == 0.5
    # shards: each computes the limit from the same calibration sample, merge records it once
    shard_dir = tiny_project / "sharded"
    for i in range(2):
        result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--set", "output.scale=run", "--output",
                                     str(shard_dir), "--shard", f"{i}/2"])
        assert result.exit_code == 0, result.output
    limits = {json.loads(p.read_text())["overlay_scale"]["limit"] for p in shard_dir.glob("run*.json")}
    assert limits == {entry["limit"]}
    assert runner.invoke(app, ["merge", str(shard_dir)]).exit_code == 0
    assert json.loads((shard_dir / "run.json").read_text())["overlay_scale"]["limit"] == entry["limit"]
    shard_overlays = sorted((shard_dir / "overlays").rglob("*.svg"))
    assert {tuple(_svg_ticks(p)) for p in shard_overlays} == {tuple(_svg_ticks(overlays[1]))}


def test_fixed_scale_in_a_run_and_bad_values_exit_2(tiny_project):
    runner = CliRunner()
    cfg = tiny_project / "config.yaml"
    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--limit", "2", "--set", "output.scale=0.5"])
    assert result.exit_code == 0, result.output
    assert json.loads((tiny_project / "out" / "run.json").read_text())["overlay_scale"] == {"mode": "fixed", "limit": 0.5}
    for path in (tiny_project / "out" / "overlays").rglob("*.svg"):
        assert _svg_ticks(path) == ["\u22120.4", "\u22120.2", "0", "0.2", "0.4"]
    for bad in ("0", "-1", "per-image", "true", ".nan"):
        result = runner.invoke(app, ["validate", str(cfg), "--set", f"output.scale={bad}"])
        assert result.exit_code == 2 and "output.scale" in result.output, (bad, result.output)
    data = yaml.safe_load(cfg.read_text())
    data["output"]["scale"] = "runn"
    cfg.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", str(cfg)])
    assert result.exit_code == 2 and "output.scale" in result.output and "per_image, run" in result.output


def test_a_stop_during_calibration_stops_the_run_before_any_overlay(tiny_project, monkeypatch):
    """SIGTERM while the calibration sample is explained: no overlay on an unknown scale, exit 143,
    and the rerun calibrates and finishes."""
    from explain_cli import job

    calls = []
    original = job.StopFlag.check

    def term_at_first_call(self, rows: int = 0) -> None:
        calls.append(rows)
        self.signal_name = "SIGTERM"  # as the handler would
        original(self, rows)

    monkeypatch.setattr(job.StopFlag, "check", term_at_first_call)
    runner = CliRunner()
    cfg = tiny_project / "config.yaml"
    out = tiny_project / "out"
    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--set", "output.scale=run"])
    assert result.exit_code == 143, result.output
    assert len(calls) == 1  # the first model call of the calibration
    assert not list(out.rglob("*.svg"))
    assert json.loads((out / "run.json").read_text())["overlay_scale"]["limit"] is None
    monkeypatch.setattr(job.StopFlag, "check", original)
    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--set", "output.scale=run"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["overlay_scale"]["limit"] > 0
    assert len(list(out.rglob("*.svg"))) == 4
