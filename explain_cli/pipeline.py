"""The run at a glance: prepare, then every selected image flows decode -> explain -> write.

``prepare`` does everything up to the first explanation (and is what ``validate`` runs). ``run``
streams the images in steps: a thread decodes step i+1 while step i is explained, and each
explained image goes to the write stage (``stages.Writer``), which writes its files and then its
CSV rows. Memory stays flat and a killed job loses at most the steps in flight. The job around
the stages (lock, signals, shard, device, run.json facts) lives in ``job``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explain_cli import __version__
from explain_cli import names as _names
from explain_cli import overlay_scale, resume, targets
from explain_cli.config import Config, check_output_dir, resolved_dict
from explain_cli.discover import discover_images, source_path
from explain_cli.errors import (EXIT_IMAGES_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, ImageError, NothingSelected,
                                UserError)
from explain_cli.images import load_preprocessed
from explain_cli.job import (Shard, StopFlag, StopRequested, device_info, earlier_runs, now, output_lock,  # noqa: F401
                             resolve_device, share_cpus, versions)  # (Shard, resolve_device: public here too)
from explain_cli.metrics import UNSTABLE, RunMetrics
from explain_cli.progress import Progress
from explain_cli.record import RunEntry, RunRecord
from explain_cli.report import write_report_or_warn
from explain_cli.stages import WriteJob, Writer, decoded_steps
from explain_cli.targets import BatchTargets, TargetSpec, Truth
from explain_cli.write import (ERROR_COLUMNS, TOPK_COLUMNS, CsvLog, nonfinite_result, read_csv_images,
                               remove_files, write_json)

log = logging.getLogger("explain_cli")

EXIT_SIGHUP = 129
EXIT_SIGUSR1 = 138
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


@dataclass
class RunOptions:
    """Command-line settings that are not part of the config."""

    limit: int | None = None
    progress: bool = True
    overwrite: bool = False
    shard: Shard | None = None
    relabel: bool = False  # redo done images whose truth-CSV label changed (resume.relabelled)


@dataclass
class Prepared:
    """Everything resolved before the first explanation."""

    config: Config
    input_dir: Path
    output_dir: Path
    all_images: list[str]
    images: list[str]
    device: Any
    model: Any
    layer: Any
    labels: list[str]
    num_outputs: int
    shard: Shard | None
    explainer_class: Any  # the registered Explainer subclass of explainer.name
    layer_tokens: dict | None = None  # a token layer's mapping onto the patch grid (run.json)
    targets: TargetSpec = field(default_factory=TargetSpec)  # which classes, which quantity (targets.py)
    truth: Truth | None = None  # each image's labels, from targets.from_csv
    walk_errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): errors.csv rows
    left_out: dict[str, int] = field(default_factory=dict)  # files the patterns left out: excluded, not_included
    slides: Any = None  # slides.plan.SlidePlans of a slide run: the images are its tiles
    overlay_limit: float | None = None  # output.scale's colour limit for every overlay (None: each its own)

    @property
    def source(self) -> Any:
        """What the decode stage reads images from: the input folder, or the slides' tiles."""
        return self.input_dir if self.slides is None else self.slides.source


@dataclass
class RunSummary:
    selected: int = 0
    skipped: int = 0
    explained: int = 0
    failed: int = 0
    excluded: int = 0  # images input.exclude left out (of the whole folder, before sharding)
    interrupted: str | None = None
    seconds: float = 0.0
    output_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.interrupted == "SIGINT":
            return EXIT_SIGINT
        if self.interrupted == "SIGTERM":
            return EXIT_SIGTERM
        if self.interrupted == "SIGHUP":
            return EXIT_SIGHUP
        if self.interrupted == "SIGUSR1":
            return EXIT_SIGUSR1
        return EXIT_IMAGES_FAILED if self.failed else EXIT_OK


def image_seed(seed: int, rel_path: str) -> int:
    """A per-image seed from the run seed and the image's relative path: results do not depend
    on batch composition, --limit or sharding."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def output_names(images: list[str], case_insensitive: bool = False) -> dict[str, str]:
    """Image -> output stem: the whole relative path (x.png -> overlays/x.png.svg); see names.output_stem."""
    return _names.output_names(images, case_insensitive)


def _select_images(config: Config, options: RunOptions) -> tuple[Path, Path, list[str], list[str],
                                                                  list[tuple[str, str]], dict[str, int], Any]:
    """The input and output folders (checked), every image of the input (a slide run's tiles), the
    ones this run selects (shard, --limit), the walk errors, the files the patterns left out and the
    slide plans (None without slides)."""
    from explain_cli.errors import ConfigError

    input_dir = config.resolve(config.input.dir)
    if not input_dir.is_dir():
        raise ConfigError("input.dir", f"not a folder: {input_dir}", config._source)
    output_dir = config.resolve(config.output.dir)
    check_output_dir(output_dir, input_dir, config._source)
    check_output_files(output_dir, options.shard.suffix if options.shard else "", config.output.save_values)
    if config.background.dir is not None and not config.resolve(config.background.dir).is_dir():
        raise ConfigError("background.dir", f"not a folder: {config.resolve(config.background.dir)}",
                          config._source)
    walk_errors: list[tuple[str, str]] = []
    left_out: dict[str, int] = {}
    all_images = discover_images(input_dir, config.input.include, config.input.exclude,
                                 skip_dirs=[output_dir], problems=walk_errors, skipped=left_out)
    if not all_images and not walk_errors:
        raise NothingSelected(f"nothing selected: no file under {input_dir} matches input.include "
                              f"{config.input.include} and not input.exclude {config.input.exclude} "
                              f"({left_out['excluded']} excluded by name; hidden files and folders holding an "
                              f"explain-cli run.json are skipped)")
    slide_plans = None
    if config.slides is not None:
        slide_plans = plan_slide_run(config, input_dir, all_images, walk_errors, left_out)
        all_images = slide_plans.images
    shard = options.shard
    images = shard.select(all_images) if shard else list(all_images)
    if options.limit is not None:
        images = images[: options.limit]
    return input_dir, output_dir, all_images, images, walk_errors, left_out, slide_plans


def _truth(config: Config, labels: list[str], all_images: list[str], images: list[str]) -> Truth | None:
    """The truth CSV's labels (targets.from_csv), None without one."""
    if config.targets.from_csv is None:
        return None
    truth = targets.load_truth(config.targets.from_csv, config.resolve(config.targets.from_csv.path), labels,
                               all_images, config._source)
    missing = sum(1 for rel in images if truth.of(rel) is None)
    log.info("truth labels: %d of %d images have a label in %s%s", len(images) - missing, len(images),
             truth.path.name, f" ({truth.unmatched_rows} CSV rows name no image of the input)"
             if truth.unmatched_rows else "")
    return truth


def prepare(config: Config, options: RunOptions, device: str | None = None, build=None) -> Prepared:
    """Resolve and check everything a run needs; raises UserError/ConfigError on problems.
    ``build``: builds the model instead of models.build_model (the Python API's cache, api.py)."""
    import torch

    from explain_cli.explainers._utils import chunk_ranges  # noqa: F401  (fail early if torch is broken)
    from explain_cli import explainers
    from explain_cli.labels import load_labels
    from explain_cli.models import (build_model, check_layer_input, count_outputs, resolve_layer,
                                    to_channels_last)

    input_dir, output_dir, all_images, images, walk_errors, left_out, slide_plans = _select_images(config, options)
    if slide_plans is None:
        check_intensity(config, input_dir, images)

    dev = resolve_device(device or config.device)
    from explain_cli.explainers import _precision

    _precision.check(config.precision, dev)  # so `validate` refuses a precision this device cannot run
    torch.manual_seed(config.seed)
    model = (build or build_model)(config.model, lambda p: config.resolve(p))
    if config.model.weights == "random":
        log.warning("model.weights: random: %s is untrained, its maps explain noise (meant for tests)",
                    config.model.arch)
    layer = resolve_layer(model, config.model.layer)
    explainer_class = explainers.get(config.explainer_settings.name).Explainer
    if layer is not None and explainer_class.input_only:
        from explain_cli.errors import ConfigError

        raise ConfigError("model.layer", f"the {explainer_class.name} explainer masks input pixels and cannot "
                                         f"explain layer '{config.model.layer}'; set model.layer: input",
                          config._source)
    num_outputs = count_outputs(model, config.preprocess.input_shape)
    layer_tokens = check_layer_input(model, layer, config.model.layer, config.preprocess.input_shape)
    labels_path = config.resolve(config.labels) if config.labels else None
    labels = targets.with_negative(load_labels(labels_path, num_outputs), config.targets, num_outputs, config._source)
    explainer_class.check_run(config, model, num_outputs)  # e.g. amortized: trained for another model
    spec = targets.resolve(config.targets, labels, min(config.output.top_k, num_outputs), config._source, num_outputs)
    truth = _truth(config, labels, all_images, images)
    model = to_channels_last(model.to(dev))
    return Prepared(config, input_dir, output_dir, all_images, images, dev, model, layer, labels,
                    num_outputs, options.shard, explainer_class, layer_tokens, spec, truth, walk_errors, left_out,
                    slide_plans)


def plan_slide_run(config: Config, input_dir: Path, files: list[str], walk_errors: list[tuple[str, str]],
                   left_out: dict[str, int]):
    """The selected files as slides (explain_cli/slides): their tiles become the run's images;
    a slide that cannot be read joins the walk errors (an errors.csv row naming it)."""
    from explain_cli.errors import ConfigError
    from explain_cli.slides.plan import plan_slides
    from explain_cli.slides.source import TileSource

    if config.preprocess.resize == "crop":
        raise ConfigError("preprocess.resize", "crop cuts each tile's border away, so the heatmap would not "
                                               "cover the slide: slides need preprocess.resize: stretch "
                                               "(a square tile to the model's square input)", config._source)
    if config.preprocess.channels not in (1, 3) and config.slides.from_names is None:
        raise ConfigError("preprocess.channels", f"a slide's regions are RGB: a {config.preprocess.channels}-channel "
                                                 "model needs pre-tiled files of its channels (slides.from_names)",
                          config._source)
    plans = plan_slides(input_dir, files, config.slides)
    walk_errors.extend(plans.errors)
    walk_errors.sort()
    if plans.unmatched:
        left_out["not_matched"] = plans.unmatched
    plans.source = TileSource(input_dir, plans)
    skipped = sum(p.tiles_no_tissue for p in plans.slides.values())
    log.info("slides: %d slide(s), %d tiles to explain, %d skipped (tissue < %g)", len(plans.slides),
             len(plans.images), skipped, config.slides.tissue.min_fraction)
    return plans


def check_output_files(output_dir: Path, suffix: str, save_values: bool) -> None:
    """Refuse, before any work, output paths of the wrong kind (exit 2 naming the path): a
    folder where a run file goes, a file where an output folder goes."""
    from explain_cli.errors import ConfigError

    for name in (f"topk{suffix}.csv", f"errors{suffix}.csv", f"run{suffix}.json", ".explain-cli.lock",
                 f".explain-cli{suffix}.lock"):
        path = output_dir / name
        if path.exists() and not path.is_file():
            raise ConfigError("output.dir", f"{path} exists and is not a file: move it away, or use another output.dir")
    for name in ("overlays", "values") if save_values else ("overlays",):
        path = output_dir / name
        if path.exists() and not path.is_dir():
            raise ConfigError("output.dir", f"{path} exists and is not a folder: move it away, or use another output.dir")


#: Images the up-front preprocessing check decodes (a folder is usually of one kind of file).
INTENSITY_PROBES = 3


def check_intensity(config: Config, input_dir: Path, images: list[str]) -> None:
    """Exit 2 naming ``preprocess.intensity`` when the first images are 16-bit or float and the key is
    unset (their 0-1 scale is unknown), before a folder of them becomes a folder of errors.csv rows;
    a later such image is that image's error row."""
    from explain_cli.images import intensity_problem

    for rel in images[:INTENSITY_PROBES]:
        problem = intensity_problem(source_path(input_dir, rel), config.preprocess)
        if problem is not None:
            raise ConfigError("preprocess.intensity", f"{rel}: {problem}", config._source)


def load_background(prep: Prepared):
    """The background set: sampled with the seed from the whole input list (before sharding,
    so every shard uses the same one) or from background.dir. Warns when it is degenerate."""
    import torch

    cfg = prep.config
    bg_cfg = cfg.background
    if bg_cfg.dir is not None:
        root = cfg.resolve(bg_cfg.dir)  # a folder: checked by prepare
        pool = [source_path(root, p) for p in discover_images(root, cfg.input.include, [])]
        want = bg_cfg.count
    else:
        pool = list(prep.all_images) if prep.slides is not None else \
            [source_path(prep.input_dir, p) for p in prep.all_images]
        want = bg_cfg.from_input or 50
    rng = random.Random(cfg.seed)
    order = rng.sample(pool, len(pool))
    arrays = []
    for path in order:
        if len(arrays) >= want:
            break
        try:
            arrays.append(prep.slides.source.decode(path, cfg.preprocess)[1] if isinstance(path, str)
                          else load_preprocessed(path, cfg.preprocess)[1])
        except ImageError as exc:
            log.warning("background: skipping %s (%s)", path, exc)
    if not arrays:
        raise UserError("background: no readable background image (check background.* and input.dir)")
    bg = np.stack(arrays)
    if len(arrays) == 1:
        log.warning("background has a single image: attributions of that image at the input are "
                    "all zero (x - background = 0); use more background images (background.from_input)")
    elif np.allclose(bg, bg[:1]):
        log.warning("background images are all identical: the explanation is relative to that one image")
    return torch.from_numpy(bg).to(prep.device)


def empty_background(prep: Prepared):
    """A zero-image background for explainers that define "absent" themselves (masking)."""
    import torch

    return torch.zeros((0,) + prep.config.preprocess.input_shape, device=prep.device)


def make_explainer(prep: Prepared, background):
    """The run's explainer; ``batch_size: auto`` on the CPU is planned here (autobatch.plan_cpu)."""
    import torch

    from explain_cli.autobatch import initial_batch_size, plan_cpu
    from explain_cli.explainers.base import ExplainContext
    from explain_cli.job import memory_headroom

    cfg = prep.config
    batch_size, auto = initial_batch_size(cfg.batch_size, prep.device)
    context = ExplainContext(model=prep.model, layer=prep.layer, layer_name=cfg.model.layer,
                             background=background, mean=cfg.preprocess.norm[0],
                             std=cfg.preprocess.norm[1], device=prep.device,
                             batch_size=batch_size, settings=cfg.explainer_settings,
                             precision=cfg.precision, batch_size_auto=auto)
    if cfg.batch_size == "auto" and prep.device.type == "cpu":
        example = torch.zeros((1,) + cfg.preprocess.input_shape, device=prep.device)
        plan_cpu(context, example, prep.explainer_class.backward, memory_headroom())
    return prep.explainer_class(context)


def explain_with_backoff(explainer, batch, batch_targets: BatchTargets, seeds: list[int]):
    """Explain a batch; on out-of-memory halve the model batch size and retry (explain_cli.autobatch)."""
    from explain_cli.autobatch import explain_with_backoff as explain

    return explain(explainer, batch, batch_targets, seeds)


def explain_step(explainer, good: list[tuple[str, np.ndarray, np.ndarray]], device, spec: TargetSpec,
                 seed: int, truth: Truth | None = None) -> list[tuple[list[tuple[str, np.ndarray, np.ndarray]], Any]]:
    """The explain stage for one step: [(images, Attribution or the exception)]. A batch that
    fails is retried image by image, so one bad image costs only itself."""
    import torch

    if not good:
        return []

    def asked(items: list) -> BatchTargets:
        return spec.for_batch(None if truth is None else [truth.of(rel) for rel, _, _ in items])

    batch = torch.from_numpy(np.stack([t for _, _, t in good])).to(device)
    seeds = [image_seed(seed, rel) for rel, _, _ in good]
    try:
        return [(good, explain_with_backoff(explainer, batch, asked(good), seeds))]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - isolate the failing image(s), keep the run going
        if len(good) == 1:
            return [(good, exc)]
        log.warning("a batch failed (%s); retrying its images one by one", exc)
    results: list[tuple[list, Any]] = []
    for one, one_seed in zip(good, seeds):
        try:
            single = torch.from_numpy(one[2][None]).to(device)
            results.append(([one], explain_with_backoff(explainer, single, asked([one]), [one_seed])))
        except UserError:
            raise
        except Exception as one_exc:  # noqa: BLE001
            results.append(([one], one_exc))
    return results


def write_job(prep: Prepared, rel: str, j: int, pixels: np.ndarray, attribution,
              overlay_path: Path | None, values_path: Path | None) -> tuple[WriteJob, list[list[Any]]]:
    """Image ``j`` of an explained batch as a write job (files) and its topk.csv rows."""
    from explain_cli.render import format_title

    spec = prep.targets
    slots = attribution.slots(j)  # the asked classes, without the batch's padding
    classes = attribution.classes[j][slots]
    names = [prep.labels[int(c)] for c in classes]
    probs = attribution.probabilities[j][slots]
    reasons = [attribution.reason(j, r) for r in slots]
    contrast = None if spec.contrast is None else prep.labels[spec.contrast]
    segments = attribution.segments
    job = WriteJob(rel=rel, pixels=pixels, values=attribution.values[j][slots],
                   titles=[format_title(n, float(p), label="label" in why.split("+"), contrast=contrast)
                           for n, p, why in zip(names, probs, reasons)],
                   overlay_path=None if overlay_path is None else str(overlay_path), fmt=prep.config.output.format, dpi=prep.config.output.dpi,
                   segments=None if segments is None else segments[j],
                   values_path=None if values_path is None else str(values_path), classes=classes,
                   style=prep.config.output.style, caption=overlay_caption(prep, rel),
                   value_std=None if attribution.value_std is None else attribution.value_std[j][slots],
                   limit=prep.overlay_limit, trust=overlay_trust(attribution, j, slots))
    err = attribution.additivity_error[j]
    used = getattr(attribution, "nsamples_used", None)
    used_cell = None if used is None else int(used[j])
    capped = getattr(attribution, "nsamples_capped", None)
    if capped is not None and bool(capped[j]):
        log.warning("%s: the map did not reach explainer.target_stability %s within max_nsamples %d "
                    "(stability %s); raise max_nsamples or accept a noisier map", rel,
                    getattr(prep.config.explainer_settings, "target_stability", "?"), used_cell,
                    ", ".join("-" if v is None else f"{v:.2f}" for v in (_cell(attribution.stability, j, r) for r in slots)))
    own = prep.truth.of(rel) if prep.truth is not None else None
    label = ";".join(prep.labels[c] for c in own) if own else None
    predicted = (spec.predicted(int(attribution.top_class[j]), float(probs[0]))
                 if attribution.top_class is not None else None)
    explained = spec.describe()
    rows = [[rel, attribution.rank(j, r), int(c), name, float(probs[i]), float(attribution.outputs[j, r]),
             float(attribution.base_values[j, r]), float(attribution.shap_sum[j, r]), float(err[r]),
             _cell(attribution.stability, j, r), _cell(attribution.deletion_auc, j, r),
             _cell(attribution.insertion_auc, j, r), reasons[i], explained, label, predicted, used_cell]
            + slide_cells(prep, rel, job.values[i])
            for i, (r, c, name) in enumerate(zip(slots, classes, names))]
    return job, rows


def overlay_trust(attribution, j: int, slots) -> list:
    """What the overlay says about each map's trust: its topk.csv stability, additivity error,
    output and base value (render.Trust)."""
    from explain_cli.render import Trust

    return [Trust(stability=_cell(attribution.stability, j, r), additivity_error=_cell(attribution.additivity_error, j, r),
                  output=_cell(attribution.outputs, j, r), base_value=_cell(attribution.base_values, j, r))
            for r in slots]


def slide_cells(prep: Prepared, rel: str, values: np.ndarray) -> list[Any]:
    """A tile row's slide, x, y, mpp and cells columns (blank outside slide runs)."""
    if prep.slides is None:
        return [None] * 5
    from explain_cli.slides.source import pool_cells

    plan, x, y = prep.slides.locate(rel)
    cells = pool_cells(values[None], plan.cells)[0]
    return [plan.id, x, y, plan.read_mpp, " ".join(f"{v:.6g}" for v in cells.ravel())]


def overlay_caption(prep: Prepared, rel: str) -> str:
    """The overlay's bottom line: which image, explainer and layer made the map."""
    cfg = prep.config
    if not cfg.output.caption:
        return ""
    return f"{rel}  \u00b7  {cfg.explainer_settings.name} explainer  \u00b7  layer {cfg.model.layer}"


def explainer_training(config: Config) -> dict[str, Any] | None:
    """run.json's ``explainer_training``: an amortized explainer's training and validation r (None for
    the explainers that need no training)."""
    if config.explainer_settings.name != "amortized":
        return None
    from explain_cli.explainers.amortized import training_record

    return training_record(config)


def describe_targets(prep: Prepared) -> dict[str, Any]:
    """run.json's ``targets``: the question the run answered, with names resolved."""
    spec = prep.targets
    return {
        "classes": [e if isinstance(e, str) else {"index": e, "name": prep.labels[e]} for e in spec.entries],
        "top_k": spec.top_k, "output": spec.output,
        "activation": targets.activation_for(spec.activation, prep.num_outputs),
        "contrast": None if spec.contrast is None else {"index": spec.contrast, "name": prep.labels[spec.contrast]},
        "explained": spec.describe(),
        "truth_csv": None if prep.truth is None else str(prep.truth.path),
        "images_with_label": None if prep.truth is None else sum(1 for rel in prep.images if prep.truth.of(rel)),
    }


def _cell(values, j: int, r: int) -> float | None:
    """One (image, rank) value of an optional (N, k) array; None (a blank cell) when absent or NaN."""
    if values is None:
        return None
    value = float(values[j, r])
    return value if np.isfinite(value) else None


def score_step(run_metrics: RunMetrics, explainer, items: list[tuple[str, np.ndarray, np.ndarray]],
               attribution, device, seed: int) -> None:
    """Faithfulness of an explained batch's maps (batched, on the model's device) and the run's
    metric totals; a failure here leaves the metric cells blank and never loses the maps."""
    import torch

    ctx = explainer.context
    try:
        # the batch goes to the device again only when faithfulness is asked for (stability needs none)
        batch = torch.from_numpy(np.stack([t for _, _, t in items])).to(device) if run_metrics.names else None
        run_metrics.score(ctx.model, batch, attribution, [image_seed(seed, rel) for rel, _, _ in items],
                          ctx.mean, ctx.std, ctx.batch_size)
    except Exception as exc:  # noqa: BLE001
        log.warning("metrics failed for %d image(s) (%s: %s); their metric cells stay blank",
                    len(items), type(exc).__name__, exc)


def stream(prep: Prepared, explainer, todo: list[str], step: int, writer: Writer, stop: StopFlag,
           run_metrics: RunMetrics, overlay_path, values_path) -> None:
    """decode -> explain -> write, a step at a time, until done or a signal."""
    if stop.signal_name:  # a stop during output.scale's calibration: not one model call more
        return
    cfg = prep.config
    spec, truth = prep.targets, prep.truth
    with contextlib.closing(decoded_steps(prep.source, todo, step, cfg.preprocess,
                                          stop=lambda: stop.signal_name is not None)) as steps:
        for decoded in steps:  # decode: a thread, one step ahead
            for rel, exc in decoded.failed:
                writer.failed(rel, str(exc))
            good = decoded.good
            if spec.uses_labels and truth is not None:  # asked for its label, an image needs one
                for rel, _, _ in good:
                    if truth.of(rel) is None:
                        writer.failed(rel, f"no label in {truth.path.name} (targets.classes asks for "
                                           f"the image's label)")
                good = [item for item in good if truth.of(item[0]) is not None]
            # explain: on the device, in this thread
            for items, result in explain_step(explainer, good, prep.device, spec, cfg.seed, truth):
                if not isinstance(result, Exception):
                    score_step(run_metrics, explainer, items, result, prep.device, cfg.seed)
                for j, (rel, pixels, _) in enumerate(items):  # write: here or in the workers
                    if isinstance(result, Exception):
                        writer.failed(rel, f"{type(result).__name__}: {result}")
                    elif problem := nonfinite_result(result, j):
                        writer.failed(rel, problem)
                    else:
                        writer.submit(*write_job(prep, rel, j, pixels, result, overlay_path(rel),
                                                 values_path(rel)))
            writer.end_step()
            if stop.signal_name:
                return


@dataclass
class _Plan:
    """What a run into the folder does, decided before the first explanation (plan and resume):
    its files, the images left to do, its CSV logs and its run.json record."""

    prep: Prepared
    suffix: str
    walk_errors: list[tuple[str, str]]
    names: dict[str, str] = field(default_factory=dict)
    todo: list[str] = field(default_factory=list)
    topk_log: Any = None
    errors_log: Any = None
    record: RunRecord = field(default_factory=RunRecord)
    runs: list[RunEntry] = field(default_factory=list)  # the earlier runs' records, newest last
    previous_scale: dict[str, Any] | None = None  # the overlay_scale of the run.json this run resumes

    @property
    def tile_overlays(self) -> bool:
        slides = self.prep.config.slides
        return slides is None or slides.overlays

    def path(self, kind: str) -> Path:
        """topk.csv, errors.csv or run.json of this run (a shard's: topk.shard-I-of-N.csv, ...)."""
        return self.prep.output_dir / f"{kind}{self.suffix}.{'json' if kind == 'run' else 'csv'}"

    def overlay_path(self, rel: str) -> Path | None:
        if not self.tile_overlays:
            return None
        return self.prep.output_dir / "overlays" / f"{self.names[rel]}.{self.prep.config.output.format}"

    def values_path(self, rel: str) -> Path | None:
        if not self.prep.config.output.save_values:
            return None
        return self.prep.output_dir / "values" / f"{self.names[rel]}.npz"

    def save_record(self) -> None:
        write_json(self.path("run"), self.record.dump())


@dataclass
class _Execution:
    """The stages of a run while it executes, for the clean-up and the record after it."""

    progress: Progress
    run_metrics: RunMetrics
    stop: StopFlag = field(default_factory=StopFlag)
    writer: Writer | None = None
    explainer: Any = None
    failure: str | None = None  # why the run failed (an exception), None when it did not
    exit_code: int | None = None  # the exit code of a failure


def run(config: Config, options: RunOptions, prep: Prepared | None = None) -> RunSummary:
    """Explain every selected image and write the outputs; see the module docstring. Three steps:
    plan and resume (:func:`_plan`), execute (:func:`_execute`), record (:func:`_finish`)."""
    import torch

    started = time.monotonic()
    prep = prep or prepare(config, options)
    suffix = prep.shard.suffix if prep.shard else ""
    # walk errors are reported once: by the unsharded run or shard 0
    walk_errors = prep.walk_errors if prep.shard is None or prep.shard.index == 0 else []
    summary = RunSummary(selected=len(prep.images) + len(walk_errors), output_dir=prep.output_dir,
                         excluded=prep.left_out.get("excluded", 0))
    with output_lock(prep.output_dir, suffix):
        plan = _plan(prep, options, _Plan(prep, suffix, walk_errors), summary)
        ex = _Execution(Progress(len(plan.todo), enabled=options.progress),
                        RunMetrics(prep.config.metrics, prep.config.metrics_steps, prep.config.metrics_baseline,
                                   targets.activation_for(prep.targets.activation, prep.num_outputs)))
        threads_before = torch.get_num_threads()
        try:
            with ex.stop.installed():
                if plan.todo:
                    _execute(prep, plan, ex, summary)
        except KeyboardInterrupt:
            summary.interrupted = ex.stop.signal_name or "SIGINT"
            if ex.writer is not None:
                ex.writer.close(force=True)
        except BaseException as exc:
            ex.failure = str(exc) or type(exc).__name__
            ex.exit_code = EXIT_USAGE if isinstance(exc, UserError) else 1
            raise
        finally:
            _close(prep, plan, ex, threads_before)
            summary.seconds = time.monotonic() - started
            _finish(prep, plan, ex, summary)
    return summary


def _plan(prep: Prepared, options: RunOptions, plan: _Plan, summary: RunSummary) -> _Plan:
    """Plan and resume: the output names, what an --overwrite removes, the check that the folder's
    results are of the same settings, the images left to do, the CSV logs and the first run.json."""
    cfg, out_dir = prep.config, prep.output_dir
    plan.names.update(output_names(prep.all_images, _names.is_case_insensitive(out_dir)))
    if prep.slides is not None:  # a tile's overlay: overlays/<slide file>/<x>_<y>.<fmt>, like any image's
        from explain_cli.slides.heatmap import write_slide_info

        write_slide_info(out_dir, prep.slides)
    topk_path, errors_path = plan.path("topk"), plan.path("errors")
    if options.overwrite:
        _remove_for_overwrite(plan)
    listed = read_csv_images(topk_path)
    failed_before = read_csv_images(errors_path)
    fingerprint, relabelled = _check_resume(prep, options, plan, listed, failed_before)
    done = {rel for rel in prep.images if rel in listed and rel not in relabelled and _files_exist(plan, rel)}
    plan.todo = [rel for rel in prep.images if rel not in done]
    summary.skipped = len(done)
    if done:
        log.info("resuming: %d of %d images already done", len(done), len(prep.images))
    plan.topk_log = CsvLog(topk_path, TOPK_COLUMNS, drop_images=set(plan.todo) & listed)
    # errors.csv lists exactly the images of this input that still fail: rows of images
    # retried now, already done, removed or excluded go; those this run did not select
    # (--limit) stay
    plan.errors_log = CsvLog(errors_path, ERROR_COLUMNS,
                             drop_images=failed_before - (set(prep.all_images) - set(prep.images)))
    for rel, reason in plan.walk_errors:
        log.warning("%s: %s", rel, reason)
    plan.errors_log.append([list(problem) for problem in plan.walk_errors])
    summary.failed += len(plan.walk_errors)
    plan.record = _start_record(prep, options, fingerprint)
    run_json = plan.path("run")
    plan.runs = earlier_runs(run_json)  # every run into this folder keeps its record, newest last
    plan.previous_scale = overlay_scale.stored(run_json) if listed or failed_before else None  # a resume keeps it
    if plan.previous_scale is not None:  # what the overlays already written were drawn with
        plan.record.overlay_scale = plan.previous_scale
    plan.record.runs = plan.runs + [plan.record.run_entry(None)]
    plan.save_record()
    return plan


def _remove_for_overwrite(plan: _Plan) -> None:
    """--overwrite: the CSV logs go, and the overlays of the other format (or, without tile
    overlays, every overlay) of the selected images."""
    prep = plan.prep
    cfg, out_dir = prep.config, prep.output_dir
    for p in (plan.path("topk"), plan.path("errors")):
        p.unlink(missing_ok=True)
    other = "png" if cfg.output.format == "svg" else "svg"  # stale overlays of the other format
    remove_files(out_dir / "overlays" / f"{plan.names[rel]}.{other}" for rel in prep.images)
    if not plan.tile_overlays:
        remove_files(out_dir / "overlays" / f"{plan.names[rel]}.{cfg.output.format}" for rel in prep.images)


def _check_resume(prep: Prepared, options: RunOptions, plan: _Plan, listed: set[str],
                  failed_before: set[str]) -> tuple[dict[str, Any], set[str]]:
    """This run's fingerprint and the done images to redo (their truth-CSV label changed); a
    UserError when the folder holds results of other settings (resume.check_resume)."""
    from explain_cli.models import checkpoint_path

    cfg, out_dir, run_json = prep.config, prep.output_dir, plan.path("run")
    ckpt = checkpoint_path(cfg.model.checkpoint, cfg.resolve) if cfg.model.checkpoint else None
    fingerprint = resume.fingerprint(cfg, ckpt, resume.stored_fingerprint(run_json), prep.targets,
                                     None if prep.truth is None else prep.truth.path)
    relabelled: set[str] = set()
    if listed or failed_before:
        resume.check_resume(run_json, fingerprint, out_dir)
        if prep.truth is not None:  # the truth CSV may have grown: its rows of done images are compared
            relabelled = resume.relabelled(plan.path("topk"), prep.truth, prep.labels, options.relabel)
        _names.migrate_legacy_outputs(out_dir, prep.all_images, listed, plan.names,
                                      [("overlays", cfg.output.format), ("values", "npz")])
    return fingerprint, relabelled


def _files_exist(plan: _Plan, rel: str) -> bool:
    """Whether a listed image's files (overlay, values) are all there."""
    overlay, values = plan.overlay_path(rel), plan.values_path(rel)
    return (overlay is None or overlay.exists()) and (values is None or values.exists())


def _start_record(prep: Prepared, options: RunOptions, fingerprint: dict[str, Any]) -> RunRecord:
    """run.json as a run starts: what it runs, where, with which settings."""
    from explain_cli.models import weights_info

    cfg = prep.config
    return RunRecord(
        explain_cli=__version__, status="running", started=now(),
        config_file=str(Path(cfg._source).resolve()) if cfg._source else None,
        config=resolved_dict(cfg),
        shard=None if prep.shard is None else {"index": prep.shard.index, "count": prep.shard.count},
        # a walk error is an entry too (errors.csv): merge checks every entry is listed once
        images_found=len(prep.all_images) + len(prep.walk_errors), limit=options.limit,
        layer_tokens=prep.layer_tokens, weights=weights_info(cfg.model, cfg.resolve),
        targets=describe_targets(prep), explainer_training=explainer_training(cfg),
        versions=versions(), **device_info(prep.device),
        command=sys.argv, host=platform.node(), fingerprint=fingerprint,
    )


def _execute(prep: Prepared, plan: _Plan, ex: _Execution, summary: RunSummary) -> None:
    """Explain the images left to do: the writer's workers, the background, the explainer, the
    colour scale, then the stream of steps until done or a signal."""
    cfg = prep.config
    cpus = share_cpus(cfg.workers, len(plan.todo))
    for key, value in cpus.items():
        setattr(plan.record, key, value)
    plan.save_record()
    # the workers start while the background loads
    ex.writer = writer = Writer(plan.topk_log, plan.errors_log, summary, ex.progress, workers=cpus["workers"])
    background = load_background(prep) if prep.explainer_class.uses_background else empty_background(prep)
    ex.explainer = explainer = make_explainer(prep, background)
    if plan.tile_overlays:  # the colour limit is known before the first overlay (overlay_scale.py)
        prep.overlay_limit, plan.record.overlay_scale = overlay_scale.resolve(
            prep, explainer, plan.previous_scale, ex.stop.check)
        plan.save_record()
    step = explainer.images_per_step
    writer.max_pending = 2 * step + cpus["workers"]  # two steps in flight, one image per worker
    ex.progress.set_evaluations_per_image(explainer.evaluations_per_image())
    from explain_cli.explainers._utils import counting_evaluations

    with counting_evaluations(ex.progress.evaluated), counting_evaluations(ex.stop.check):
        try:
            stream(prep, explainer, plan.todo, step, writer, ex.stop, ex.run_metrics, plan.overlay_path,
                   plan.values_path)
        except StopRequested:
            pass  # the step in flight is dropped (its images are redone by the rerun)
    writer.drain()
    # a signal after the last image changes nothing: every image is done or failed
    handled = summary.explained + summary.failed - len(plan.walk_errors)
    summary.interrupted = ex.stop.signal_name if handled < len(plan.todo) else None
    if ex.stop.signal_name and summary.interrupted is None:
        log.info("%s came after the last image: the run is complete", ex.stop.signal_name)


def _close(prep: Prepared, plan: _Plan, ex: _Execution, threads_before: int) -> None:
    """After the run, however it ended: the writer, torch's threads, the slides, the logs."""
    import torch

    if ex.writer is not None:
        ex.writer.close()
    torch.set_num_threads(threads_before)
    if prep.slides is not None:
        prep.slides.source.close()
    ex.progress.close()
    plan.topk_log.close()
    plan.errors_log.close()


def _finish(prep: Prepared, plan: _Plan, ex: _Execution, summary: RunSummary) -> None:
    """Record: run.json's final status, counts and metrics; then the slides' heatmaps and the report."""
    import torch

    record = plan.record
    record.status = "failed" if ex.failure else "interrupted" if summary.interrupted else "complete"
    record.finished = now()
    record.seconds = round(summary.seconds, 3)
    record.counts = {"selected": summary.selected, "already_done": summary.skipped,
                     "explained": summary.explained, "failed": summary.failed,
                     "excluded": summary.excluded, "not_included": prep.left_out.get("not_included", 0),
                     **({"not_matched": prep.left_out["not_matched"]} if "not_matched" in prep.left_out else {})}
    record.metrics = ex.run_metrics.summary()
    median = ex.run_metrics.median_stability()
    if median is not None and median < UNSTABLE:
        log.warning("median stability of the maps is %.2f (< %.1f): they would change a lot in a rerun "
                    "at another seed; raise explainer.nsamples (gradient, kernel) or the background "
                    "size (deep)", median, UNSTABLE)
    if summary.interrupted:
        record.interrupted_by = summary.interrupted
    if ex.failure:
        record.error = ex.failure
    if ex.explainer is not None:
        record.batch_size_used = ex.explainer.context.batch_size
        if ex.explainer.context.batch_probe is not None:
            record.batch_size_auto = ex.explainer.context.batch_probe.summary()
    if prep.device.type == "cuda":
        record.peak_gpu_memory_mb = round(torch.cuda.max_memory_allocated(prep.device) / 2**20, 1)
    record.runs = plan.runs + [record.run_entry(summary.exit_code if ex.failure is None else ex.exit_code)]
    plan.save_record()
    if prep.slides is not None and ex.failure is None and not summary.interrupted:
        write_slide_heatmaps(prep, prep.output_dir, plan.suffix, plan.todo)
    write_report_or_warn(prep.output_dir)


def write_slide_heatmaps(prep: Prepared, out_dir: Path, suffix: str, todo: list[str]) -> None:
    """Stitch the slides' heatmaps from topk.csv; a shard leaves that to ``merge`` (it holds
    only some tiles of each slide). Only slides with tiles in ``todo`` are drawn again (a rerun
    with nothing new draws nothing). A failure here is a warning: the tiles' rows are kept."""
    if suffix:
        log.info("slide heatmaps are stitched by `explain-cli merge` once every shard is done")
        return
    from explain_cli.slides.heatmap import write_heatmaps

    cfg = prep.config
    try:
        index = write_heatmaps(out_dir, out_dir / "topk.csv", out_dir / "errors.csv", cfg.explainer_settings.name,
                               cfg.model.layer, cfg.slides.heatmap.tiff,
                               redraw={prep.slides.locate(rel)[0].id for rel in todo})
        log.info("slide heatmaps: %d slide(s) under %s", len(index), out_dir / "slides")
    except Exception as exc:  # noqa: BLE001 - the explained tiles are safe in topk.csv; merge can redraw
        log.warning("could not draw the slide heatmaps (%s: %s); rerun or `explain-cli merge` redraws them "
                    "from topk.csv", type(exc).__name__, exc)
