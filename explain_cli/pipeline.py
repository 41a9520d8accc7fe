"""The run, stage by stage: config -> discover -> load -> explain -> render -> write.

``prepare`` does everything up to the first explanation (and is what ``validate`` runs);
``run`` streams the selected images through the explainer in steps, writing each image's
outputs as soon as it is explained, so memory stays flat and a killed job loses at most the
step in flight.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import platform
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from explain_cli import __version__
from explain_cli.config import Config, resolved_dict
from explain_cli.discover import discover_images
from explain_cli.errors import EXIT_IMAGES_FAILED, EXIT_OK, ImageError, UserError
from explain_cli.images import load_preprocessed
from explain_cli.progress import Progress
from explain_cli.write import (ERROR_COLUMNS, TOPK_COLUMNS, CsvLog, read_csv_images, save_values,
                               write_json)

log = logging.getLogger("explain_cli")

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): every ``count``-th image of the sorted list,
    starting at ``index`` (round-robin, so shards get similar mixes of folders)."""

    index: int
    count: int

    @property
    def suffix(self) -> str:
        return f".shard-{self.index}-of-{self.count}"

    @staticmethod
    def parse(text: str) -> "Shard":
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise UserError(f"--shard: expected I/N (e.g. 0/4), got {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise UserError(f"--shard: need 0 <= I < N, got {text!r}")
        return Shard(i, n)

    @staticmethod
    def from_slurm(env: dict[str, str] | None = None) -> "Shard | None":
        """The shard of a Slurm array task (arrays may start at 1: ids are offset by the minimum)."""
        env = os.environ if env is None else env
        task = env.get("SLURM_ARRAY_TASK_ID")
        count = env.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return None
        low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        high = env.get("SLURM_ARRAY_TASK_MAX")
        index, n = int(task) - low, int(count)
        if not 0 <= index < n or (high is not None and int(high) - low + 1 != n):
            # e.g. --array=0,2,5 or 0-7:2: task ids are not 0..N-1 (+MIN), shards would overlap
            raise UserError(f"Slurm array task {task} of {count} (ids {low}-{high}): explain-cli needs "
                            f"a contiguous array (--array=0-{n - 1} or 1-{n}, no gaps or steps); "
                            f"or give --shard I/N")
        return Shard(index, n)

    def select(self, items: list[str]) -> list[str]:
        return items[self.index::self.count]


@dataclass
class RunOptions:
    """Command-line settings that are not part of the config."""

    limit: int | None = None
    progress: bool = True
    overwrite: bool = False
    shard: Shard | None = None


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


@dataclass
class RunSummary:
    selected: int = 0
    skipped: int = 0
    explained: int = 0
    failed: int = 0
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
        return EXIT_IMAGES_FAILED if self.failed else EXIT_OK


def resolve_device(name: str):
    """'auto' picks CUDA when available. 'cuda' is the current device: the one Slurm or
    CUDA_VISIBLE_DEVICES exposes first."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device: '{name}' requested but CUDA is not available on this machine")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device: '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s) visible)")
        return dev
    return torch.device("cpu")


def image_seed(seed: int, rel_path: str) -> int:
    """A per-image seed from the run seed and the image's relative path: results do not depend
    on batch composition, --limit or sharding."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def output_names(images: list[str]) -> dict[str, str]:
    """Image -> output stem (relative path without extension). Where two inputs would collide
    (x.png and x.jpg in one folder) both keep their extension: x.png.svg, x.jpg.svg."""
    stems: dict[str, list[str]] = {}
    for rel in images:
        stems.setdefault(str(PurePosixPath(rel).with_suffix("")).lower(), []).append(rel)
    names = {}
    for group in stems.values():
        for rel in group:
            names[rel] = rel if len(group) > 1 else str(PurePosixPath(rel).with_suffix(""))
    return names


def prepare(config: Config, options: RunOptions, device: str | None = None) -> Prepared:
    """Resolve and check everything a run needs; raises UserError/ConfigError on problems."""
    import torch

    from explain_cli.explainers._utils import chunk_ranges  # noqa: F401  (fail early if torch is broken)
    from explain_cli import explainers
    from explain_cli.labels import load_labels
    from explain_cli.models import build_model, count_outputs, resolve_layer, to_channels_last

    input_dir = config.resolve(config.input.dir)
    if not input_dir.is_dir():
        from explain_cli.errors import ConfigError

        raise ConfigError("input.dir", f"not a folder: {input_dir}", config._source)
    output_dir = config.resolve(config.output.dir)
    all_images = discover_images(input_dir, config.input.include, config.input.exclude,
                                 skip_dirs=[output_dir])
    shard = options.shard
    images = shard.select(all_images) if shard else list(all_images)
    if options.limit is not None:
        images = images[: options.limit]

    dev = resolve_device(device or config.device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, lambda p: config.resolve(p))
    layer = resolve_layer(model, config.model.layer)
    explainer_class = explainers.get(config.explainer_settings.name).Explainer
    if layer is not None and explainer_class.input_only:
        from explain_cli.errors import ConfigError

        raise ConfigError("model.layer", f"the {explainer_class.name} explainer masks input pixels and cannot "
                                         f"explain layer '{config.model.layer}'; set model.layer: input",
                          config._source)
    num_outputs = count_outputs(model, config.preprocess.size)
    labels_path = config.resolve(config.labels) if config.labels else None
    labels = load_labels(labels_path, num_outputs)
    model = to_channels_last(model.to(dev))
    return Prepared(config, input_dir, output_dir, all_images, images, dev, model, layer, labels,
                    num_outputs, shard, explainer_class)


def load_background(prep: Prepared):
    """The background set: sampled with the seed from the whole input list (before sharding,
    so every shard uses the same one) or from background.dir. Warns when it is degenerate."""
    import torch

    cfg = prep.config
    bg_cfg = cfg.background
    if bg_cfg.dir is not None:
        root = cfg.resolve(bg_cfg.dir)
        if not root.is_dir():
            from explain_cli.errors import ConfigError

            raise ConfigError("background.dir", f"not a folder: {root}", cfg._source)
        pool = [root / p for p in discover_images(root, cfg.input.include, [])]
        want = bg_cfg.count
    else:
        pool = [prep.input_dir / p for p in prep.all_images]
        want = bg_cfg.from_input or 50
    rng = random.Random(cfg.seed)
    order = rng.sample(pool, len(pool))
    arrays = []
    for path in order:
        if len(arrays) >= want:
            break
        try:
            arrays.append(load_preprocessed(path, cfg.preprocess)[1])
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

    size = prep.config.preprocess.size
    return torch.zeros((0, 3, size, size), device=prep.device)


def make_explainer(prep: Prepared, background):
    from explain_cli.autobatch import initial_batch_size
    from explain_cli.explainers.base import ExplainContext

    cfg = prep.config
    batch_size, auto = initial_batch_size(cfg.batch_size, prep.device)
    context = ExplainContext(model=prep.model, layer=prep.layer, layer_name=cfg.model.layer,
                             background=background, mean=tuple(cfg.preprocess.mean),
                             std=tuple(cfg.preprocess.std), device=prep.device,
                             batch_size=batch_size, settings=cfg.explainer_settings,
                             precision=cfg.precision, batch_size_auto=auto)
    return prep.explainer_class(context)


def explain_with_backoff(explainer, batch, top_k: int, seeds: list[int]):
    """Explain a batch; on out-of-memory halve the model batch size and retry (explain_cli.autobatch)."""
    from explain_cli.autobatch import explain_with_backoff as explain

    return explain(explainer, batch, top_k, seeds)


class _StopFlag:
    """SIGTERM/SIGINT set a flag checked between steps; a second signal stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = name
        log.warning("%s received: finishing the current step, then stopping", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopFlag"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def output_lock(output_dir: Path, suffix: str) -> Iterator[None]:
    """One run per shard and output folder: a second one exits 2 instead of interleaving."""
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f".explain-cli{suffix}.lock"
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another explain-cli run is writing to {output_dir} "
                            f"(lock {path.name} is held); wait for it or use another output.dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"explain-cli": __version__, "python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "shap", "numpy", "pillow", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _load_step(input_dir: Path, rels: list[str], cfg) -> list[tuple[str, Any]]:
    """Decode a step's images; each item is (rel, (pixels, tensor)) or (rel, ImageError)."""
    out = []
    for rel in rels:
        try:
            out.append((rel, load_preprocessed(input_dir / rel, cfg.preprocess)))
        except ImageError as exc:
            out.append((rel, exc))
    return out


def _steps(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run(config: Config, options: RunOptions, prep: Prepared | None = None) -> RunSummary:
    """Explain every selected image and write the outputs; see the module docstring."""
    import torch

    from explain_cli.render import format_title, render_overlay

    started = time.monotonic()
    prep = prep or prepare(config, options)
    cfg = prep.config
    out_dir = prep.output_dir
    suffix = prep.shard.suffix if prep.shard else ""
    summary = RunSummary(selected=len(prep.images), output_dir=out_dir)
    fmt = cfg.output.format
    names = output_names(prep.all_images)

    def overlay_path(rel: str) -> Path:
        return out_dir / "overlays" / f"{names[rel]}.{fmt}"

    def values_path(rel: str) -> Path:
        return out_dir / "values" / f"{names[rel]}.npz"

    with output_lock(out_dir, suffix):
        topk_path = out_dir / f"topk{suffix}.csv"
        errors_path = out_dir / f"errors{suffix}.csv"
        if options.overwrite:
            for p in (topk_path, errors_path):
                p.unlink(missing_ok=True)
        listed = read_csv_images(topk_path)
        done = {rel for rel in prep.images if rel in listed and overlay_path(rel).exists()
                and (not cfg.output.save_values or values_path(rel).exists())}
        todo = [rel for rel in prep.images if rel not in done]
        summary.skipped = len(done)
        if done:
            log.info("resuming: %d of %d images already done", len(done), len(prep.images))
        topk_log = CsvLog(topk_path, TOPK_COLUMNS, drop_images=set(todo) & listed)
        errors_log = CsvLog(errors_path, ERROR_COLUMNS, drop_images=set(todo))
        run_info: dict[str, Any] = {
            "explain_cli": __version__, "status": "running", "started": _now(),
            "config_file": str(Path(cfg._source).resolve()) if cfg._source else None,
            "config": resolved_dict(cfg), "shard": None if prep.shard is None else
            {"index": prep.shard.index, "count": prep.shard.count},
            "images_found": len(prep.all_images), "limit": options.limit,
            "versions": _versions(), **_device_info(prep.device),
            "command": sys.argv, "host": platform.node(),
        }
        run_json = out_dir / f"run{suffix}.json"
        write_json(run_json, run_info)

        progress = Progress(len(todo), enabled=options.progress)
        stop = _StopFlag()
        explainer = None
        try:
            with stop.installed():
                if todo:
                    background = (load_background(prep) if prep.explainer_class.uses_background
                                  else empty_background(prep))
                    explainer = make_explainer(prep, background)
                    step = getattr(explainer, "images_per_step", 8)
                    top_k = min(cfg.output.top_k, prep.num_outputs)
                    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
                        steps = list(_steps(todo, step))
                        pending = pool.submit(_load_step, prep.input_dir, steps[0], cfg) if steps else None
                        for i in range(len(steps)):
                            loaded = pending.result()
                            pending = (pool.submit(_load_step, prep.input_dir, steps[i + 1], cfg)
                                       if i + 1 < len(steps) else None)
                            _explain_step(loaded, explainer, prep, top_k, topk_log, errors_log,
                                          summary, overlay_path, values_path,
                                          render_overlay, format_title, progress)
                            if stop.signal_name:
                                summary.interrupted = stop.signal_name
                                if pending is not None:
                                    pending.cancel()
                                break
        except KeyboardInterrupt:
            summary.interrupted = stop.signal_name or "SIGINT"
        finally:
            progress.close()
            topk_log.close()
            errors_log.close()
            summary.seconds = time.monotonic() - started
            run_info.update({
                "status": "interrupted" if summary.interrupted else "complete",
                "finished": _now(), "seconds": round(summary.seconds, 3),
                "counts": {"selected": summary.selected, "already_done": summary.skipped,
                           "explained": summary.explained, "failed": summary.failed},
            })
            if summary.interrupted:
                run_info["interrupted_by"] = summary.interrupted
            if explainer is not None:
                run_info["batch_size_used"] = explainer.context.batch_size
            if prep.device.type == "cuda":
                run_info["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(prep.device) / 2**20, 1)
            write_json(run_json, run_info)
    return summary


def _explain_step(loaded, explainer, prep: Prepared, top_k, topk_log, errors_log, summary,
                  overlay_path, values_path, render_overlay, format_title, progress) -> None:
    """Explain one step's decoded images and write each image's outputs."""
    import torch

    cfg = prep.config
    good = []
    for rel, item in loaded:
        if isinstance(item, ImageError):
            errors_log.append([[rel, str(item)]])
            summary.failed += 1
            progress.update(1)
            log.warning("%s: %s", rel, item)
        else:
            good.append((rel, item))
    if not good:
        return
    batch = torch.from_numpy(np.stack([t for _, (_, t) in good])).to(prep.device)
    seeds = [image_seed(cfg.seed, rel) for rel, _ in good]
    try:
        results = [(good, explain_with_backoff(explainer, batch, top_k, seeds))]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - isolate the failing image(s), keep the run going
        if len(good) == 1:
            results = [(good, exc)]
        else:
            log.warning("a batch failed (%s); retrying its images one by one", exc)
            results = []
            for one, seed in zip(good, seeds):
                try:
                    single = torch.from_numpy(one[1][1][None]).to(prep.device)
                    results.append(([one], explain_with_backoff(explainer, single, top_k, [seed])))
                except UserError:
                    raise
                except Exception as one_exc:  # noqa: BLE001
                    results.append(([one], one_exc))
    for items, attribution in results:
        if isinstance(attribution, Exception):
            for rel, _ in items:
                message = f"{type(attribution).__name__}: {attribution}"
                errors_log.append([[rel, message]])
                summary.failed += 1
                progress.update(1)
                log.warning("%s: %s", rel, message)
            continue
        for j, (rel, (pixels, _)) in enumerate(items):
            _write_image(rel, j, pixels, attribution, prep, topk_log, errors_log, summary,
                         overlay_path, values_path, render_overlay, format_title)
            progress.update(1)


def _write_image(rel, j, pixels, attribution, prep: Prepared, topk_log, errors_log, summary,
                 overlay_path, values_path, render_overlay, format_title) -> None:
    """Overlay (and values) first, then the CSV rows: a row means the image is complete."""
    cfg = prep.config
    classes = attribution.classes[j]
    names = [prep.labels[int(c)] for c in classes]
    probs = attribution.probabilities[j]
    try:
        if cfg.output.save_values:
            save_values(values_path(rel), attribution.values[j], classes)
        segments = attribution.segments
        render_overlay(pixels, attribution.values[j],
                       [format_title(n, float(p)) for n, p in zip(names, probs)],
                       overlay_path(rel), fmt=cfg.output.format, dpi=cfg.output.dpi,
                       segments=None if segments is None else segments[j])
    except Exception as exc:  # noqa: BLE001 - a file system or rendering failure loses this image only
        errors_log.append([[rel, f"cannot write outputs: {type(exc).__name__}: {exc}"]])
        summary.failed += 1
        return
    rows = []
    err = attribution.additivity_error[j]
    for r, c in enumerate(classes):
        rows.append([rel, r + 1, int(c), names[r], float(probs[r]), float(attribution.outputs[j, r]),
                     float(attribution.base_values[j, r]), float(attribution.shap_sum[j, r]),
                     float(err[r])])
    topk_log.append(rows)
    summary.explained += 1
