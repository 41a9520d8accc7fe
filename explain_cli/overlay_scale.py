"""``output.scale``: which colour limit the overlays of a run are drawn with.

``per_image`` gives each overlay its own limit (shap.image_plot's 99.9th percentile of |values|
over its panels): every map fills the colour scale, however small its values. ``run`` draws
every overlay of the run on one limit, so a weak map looks weak next to a strong one; a number
fixes that limit (comparable across runs too).

The run streams its images (each overlay is written as soon as its step is explained), so a
``run`` limit must be known before the first overlay. It comes from a calibration sample: up to
``CALIBRATION_IMAGES`` images drawn with the seed from the whole sorted input, before sharding
and ``--limit``, explained with the run's explainer and seeds before the first step; the limit
is the 99.9th percentile of |map| pooled over their maps (maps with no attribution left out).
Every shard draws the same sample and computes the same limit, so the overlays of a sharded
run share one scale after ``merge`` (which checks that the shards' limits agree) without the
shards talking to each other. The price is explaining the sample once more per run and per
shard (its images are explained again when their turn comes): 8 images, under 1 % of a run of
a thousand tiles, but twice the work of a 3-image run. The limit is recorded in run.json
(``overlay_scale``) and reused by a resume of the same folder, so a resumed run (on another
device, say) keeps the scale of the overlays already written. The alternative, the limit of
the run's own first step, costs nothing but differs per shard and per ``--limit``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("explain_cli")

#: Images explained to set a ``run`` limit: about one step, enough for a percentile of
#: hundreds of thousands of pixels; the sample's spread matters more than its size.
CALIBRATION_IMAGES = 8
#: The percentile of |map| the limit sits at (shap.image_plot's, per image).
PERCENTILE = 99.9


def calibration_sample(all_images: list[str], seed: int, n: int = CALIBRATION_IMAGES) -> list[str]:
    """The images a ``run`` limit is computed from: ``n`` drawn with the seed from the whole
    input (the same list for every shard), in input order."""
    rng = random.Random(f"{seed}:output.scale")  # str seeds hash with SHA-512: the same in every process
    picked = set(rng.sample(range(len(all_images)), min(n, len(all_images))))
    return [rel for i, rel in enumerate(all_images) if i in picked]


def pooled_limit(maps: list[np.ndarray]) -> float | None:
    """The ``PERCENTILE`` of |value| over all ``maps`` ((H, W) each, as drawn); None when there
    is nothing finite and non-zero to scale to."""
    from explain_cli.render import symmetric_limit

    if not maps:
        return None
    pooled = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    finite = pooled[np.isfinite(pooled)]
    if not np.any(finite):
        return None
    return symmetric_limit(finite)


def stored(run_json: Path) -> dict[str, Any] | None:
    """The ``overlay_scale`` entry of an earlier run.json, if any (read before it is rewritten)."""
    from explain_cli.record import RunRecord, RunRecordError

    try:
        return RunRecord.read(Path(run_json), lenient=True).overlay_scale
    except RunRecordError:
        return None


def resolve(prep, explainer, previous: dict[str, Any] | None, check: Callable[[int], None] | None = None
            ) -> tuple[float | None, dict[str, Any]]:
    """The colour limit for the run's overlays (None: each image its own) and run.json's
    ``overlay_scale`` entry. ``previous``: the entry of the run.json this run resumes (reused
    when it holds a ``run`` limit); ``check``: called at every model call of the calibration
    (the stop flag), a stop there leaves the limit unset for the stream to stop at once."""
    scale = prep.config.output.scale
    if scale == "per_image":
        return None, {"mode": "per_image"}
    if scale != "run":
        return float(scale), {"mode": "fixed", "limit": float(scale)}
    if previous and previous.get("mode") == "run" and isinstance(previous.get("limit"), (int, float)) \
            and previous["limit"] > 0:
        log.info("output.scale: run: reusing the colour limit %.3g of this folder's run.json", previous["limit"])
        return float(previous["limit"]), dict(previous)
    sample = calibration_sample(prep.all_images, prep.config.seed)
    from explain_cli.job import StopRequested

    try:
        limit, used = _calibrate(prep, explainer, sample, check)
    except StopRequested:
        return None, {"mode": "run", "limit": None, "calibration_images": sample, "stopped": True}
    entry = {"mode": "run", "limit": limit, "percentile": PERCENTILE, "calibration_images": used}
    if limit is None:
        log.warning("output.scale: run: no map of the %d calibration image(s) has any attribution; each "
                    "overlay gets its own colour limit instead", len(used))
        entry["fallback"] = "per_image"
    else:
        log.info("output.scale: run: colour limit %.3g from %d calibration image(s)", limit, len(used))
    return limit, entry


def _calibrate(prep, explainer, sample: list[str], check: Callable[[int], None] | None) -> tuple[float | None, list[str]]:
    """Explain ``sample`` as the run would and pool its drawable maps."""
    import contextlib

    from explain_cli.explainers._utils import counting_evaluations
    from explain_cli.pipeline import explain_step
    from explain_cli.render import Trust, channel_map, no_attribution, segment_fill
    from explain_cli.stages import decode_step

    cfg = prep.config
    decoded = decode_step(prep.source, sample, cfg.preprocess)
    good = decoded.good
    if prep.targets.uses_labels and prep.truth is not None:
        good = [item for item in good if prep.truth.of(item[0]) is not None]
    maps: list[np.ndarray] = []
    used: list[str] = []
    step = max(1, int(explainer.images_per_step))  # the run's step: its memory bound
    results = []
    with counting_evaluations(check) if check is not None else contextlib.nullcontext():
        for start in range(0, len(good), step):
            results += explain_step(explainer, good[start:start + step], prep.device, prep.targets, cfg.seed,
                                    prep.truth)
    for items, result in results:
        if isinstance(result, Exception):
            continue
        for j, (rel, pixels, _) in enumerate(items):
            used.append(rel)
            slots = result.slots(j)
            values = result.values[j][slots]
            drawn = channel_map(values, pixels.shape[:2])
            if result.segments is not None:
                drawn = segment_fill(drawn, result.segments[j])
            for i, r in enumerate(slots):
                trust = Trust(output=float(result.outputs[j, r]), base_value=float(result.base_values[j, r]))
                if not no_attribution(values[i], trust.scale):
                    maps.append(drawn[i])
    return pooled_limit(maps), used
