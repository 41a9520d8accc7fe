"""The Python API: ``explain`` (images -> shap.Explanation, nothing written), ``load_run`` (a run's
outputs -> the same Explanation) and ``run`` (the batch job, the CLI's ``run`` command).

It is a thin layer over ``pipeline``: ``explain`` calls ``pipeline.prepare`` and the pipeline's
explain stage (``explain_step``, ``score_step``) with the same per-image seeds as a run, so an
image gives the CLI's numbers bit for bit; ``run`` and the CLI's ``run`` command share
``run_config``. torch and shap are imported inside the functions: ``import explain_cli`` stays fast.

Why a cache and not a ``Session`` object: notebooks re-run cells with one setting changed, and the
natural call is ``explain("cfg.yaml", imgs, explainer={...})``. A module-level cache makes that call
fast the second time without an object to thread through the cells or to forget to rebuild after
editing the config: it is keyed by what each piece is built from (the model by its config section
and the checkpoint file's size and mtime; the background by its section, input images,
preprocessing and seed; the explainer by its settings), so changing the class or the explainer
reuses the loaded model, and a retrained checkpoint is reloaded. It holds one entry of each (one
model on the GPU at a time); ``clear_cache()`` frees them.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence, Union

from explain_cli.errors import ConfigError, ImageError, UserError

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image
    import torch

    from explain_cli.config import Config
    from explain_cli.explanation import ImageExplanation
    from explain_cli.pipeline import Prepared, RunOptions, RunSummary

log = logging.getLogger("explain_cli")

ConfigLike = Union[str, "os.PathLike[str]", Mapping[str, Any]]
ImagesLike = Union[None, str, "os.PathLike[str]", "PIL.Image.Image", "np.ndarray", "torch.Tensor",
                   Sequence[Union[str, "os.PathLike[str]", "PIL.Image.Image", "np.ndarray"]]]

#: The per-(image, class) fields that are integers (padding: -1); the others are floats (padding: NaN).
INT_FIELDS = ("class_index", "rank")

__all__ = ["ConfigError", "RunResult", "clear_cache", "explain", "iter_run", "load_config", "load_run", "run",
           "run_config"]


# --- config --------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Python values as the YAML loader would give them: paths as str, tuples as lists, numpy
    scalars as Python numbers, mappings as dicts."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return value.item()
    return value


def _flatten(overrides: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``explainer={"name": "partition"}`` -> [("explainer.name", "partition")]: nested dicts are
    merged key by key, like ``--set explainer.name=partition``; an empty dict is a value."""
    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            flat.append((prefix, _plain(value)))

    for key, value in overrides.items():
        walk(str(key), value)
    return flat


def load_config(config: ConfigLike, overrides: Mapping[str, Any] | None = None,
                base_dir: str | os.PathLike[str] | None = None) -> "Config":
    """A validated config from a YAML file or a dict, with ``--set``-style overrides.

    The same checks and messages as the CLI: any problem raises ``ConfigError`` whose ``key`` is
    the dotted path (``explainer.nsamples``). A dict's relative paths resolve against
    ``base_dir`` (default: the current folder), a file's against its folder.

    Example::

        cfg = load_config("configs/demo.yaml", {"explainer": {"nsamples": 8}, "device": "cpu"})
    """
    from explain_cli import config as _config

    flat = _flatten(overrides or {})
    for key, value in flat:
        _config.check_values(value, None, prefix=key)
    if isinstance(config, Mapping):
        return _config_from_dict(config, flat, Path(base_dir) if base_dir is not None else Path.cwd())
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError("", f"config: a path or a dict, got {type(config).__name__}")
    # every key as `--set KEY=null` (so the explainer switch sees it as given), then its value exactly
    return _config.load_config(config, [f"{key}=null" for key, _ in flat],
                               {key: value for key, value in flat if value is not None})


def _config_from_dict(data: Mapping[str, Any], flat: list[tuple[str, Any]], base_dir: Path) -> "Config":
    """``config.load_config`` after the file is read, for a dict: the same steps, in order."""
    from pydantic import ValidationError

    from explain_cli import config as _config

    tree = _plain(copy.deepcopy(dict(data)))
    _config.check_values(tree)
    section = tree.get("explainer")
    in_dict = dict(section) if isinstance(section, dict) else None
    for key, value in flat:
        _config.set_key(tree, key.split("."), value)
    if in_dict is not None:
        _config._switch_explainer(tree, in_dict, [f"{key}=" for key, _ in flat], "")
    try:
        cfg = _config.Config.model_validate(tree, strict=True)
    except ValidationError as exc:
        _config._raise_validation(exc, _config.Config, "")
    return _config.finish(cfg, base_dir.resolve(), "")


# --- what explain() keeps between calls -----------------------------------------------------------

def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _stat(path: Path | None) -> Any:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_size, st.st_mtime_ns)


class _Cache:
    """One loaded model, background and explainer, each with the key it was built from."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.clear()

    def clear(self) -> None:
        self.model: tuple[str, Any] | None = None
        self.background: tuple[str, Any] | None = None
        self.explainer: tuple[str, Any] | None = None

    def builder(self, cfg: "Config") -> Callable[..., Any]:
        """``pipeline.prepare``'s model builder: the cached model when its sources are unchanged."""
        from explain_cli.models import build_model, checkpoint_path

        def build(model_cfg: Any, resolve: Callable[[str], Path]) -> Any:
            ckpt = checkpoint_path(model_cfg.checkpoint, resolve) if model_cfg.checkpoint else None
            section = model_cfg.model_dump(mode="json", exclude={"layer"})  # the layer is chosen on the model
            key = _key(section, str(cfg._base_dir), str(ckpt), _stat(ckpt), cfg.seed)
            if self.model is None or self.model[0] != key:
                self.model = self.explainer = None  # free the old model (the explainer holds it too) first
                self.model = (key, build_model(model_cfg, resolve))
            return self.model[1]

        return build

    def background_for(self, prep: "Prepared") -> Any:
        from explain_cli import pipeline

        if not prep.explainer_class.uses_background:
            return pipeline.empty_background(prep)
        cfg = prep.config
        key = _key(cfg.background.model_dump(mode="json"), str(prep.input_dir), cfg.input.include,
                   cfg.preprocess.model_dump(mode="json"), cfg.seed, str(prep.device),
                   hash(tuple(prep.all_images)), None if cfg.background.dir is None else
                   str(cfg.resolve(cfg.background.dir)), None if cfg.slides is None else
                   cfg.slides.model_dump(mode="json"))
        if self.background is None or self.background[0] != key:
            self.background = self.explainer = None
            self.background = (key, pipeline.load_background(prep))
        return self.background[1]

    def explainer_for(self, prep: "Prepared", background: Any) -> Any:
        from explain_cli import pipeline

        cfg = prep.config
        key = _key(id(prep.model), id(background), prep.explainer_class.name,
                   cfg.explainer_settings.model_dump(mode="json"), cfg.batch_size, cfg.precision,
                   cfg.model.layer, cfg.preprocess.norm, str(prep.device))
        if self.explainer is None or self.explainer[0] != key:
            self.explainer = None
            self.explainer = (key, pipeline.make_explainer(prep, background))
        return self.explainer[1]


_CACHE = _Cache()


def clear_cache() -> None:
    """Forget the model, background and explainer ``explain`` keeps (frees their memory).

    Example::

        explain_cli.clear_cache()
    """
    with _CACHE.lock:
        _CACHE.clear()


# --- explain ---------------------------------------------------------------------------------------

def _inputs(prep: "Prepared", images: ImagesLike) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, str]]]:
    """(name, display pixels uint8 HxWx3, model input float32 3xHxW) for each image, and the
    (name, reason) of those that cannot be read. A file under input.dir is named (and seeded)
    by its relative path, as in a run; a PIL image or array by ``image[i]``, a tensor row by
    ``tensor[i]``."""
    import numpy as np

    from explain_cli.images import load_preprocessed
    from explain_cli.stages import decode_one

    cfg = prep.config
    if images is None:
        items = list(prep.images)
    elif _is_tensor(images):
        return _tensor_inputs(prep, images), []
    elif isinstance(images, (str, os.PathLike)) or _is_pil(images) or (
            isinstance(images, np.ndarray) and images.ndim == 3):
        items = [images]
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    else:
        items = list(images)
    known = set(prep.all_images)
    good: list[tuple[str, Any, Any]] = []
    failed: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        name = f"image[{i}]"
        try:
            if isinstance(item, str) and item in known:
                good.append(decode_one(prep.source, item, cfg.preprocess))
                continue
            if isinstance(item, (str, os.PathLike)):
                path, name = _image_path(prep.input_dir, Path(item))
                good.append((name,) + load_preprocessed(path, cfg.preprocess))
                continue
            good.append((name,) + _preprocess_picture(item, cfg.preprocess))
        except ImageError as exc:
            failed.append((name, str(exc)))
    return good, failed


def _image_path(input_dir: Path, path: Path) -> tuple[Path, str]:
    """The file, and its name: the path relative to input.dir when it is under it (a run's
    name, hence a run's seed), else the path as given. A relative path that is not a file
    here but is one under input.dir means that one."""
    from explain_cli.names import from_fs

    if not path.is_absolute() and not path.exists() and (input_dir / path).exists():
        path = input_dir / path
    try:
        rel = path.resolve().relative_to(input_dir.resolve())
        return path, from_fs(rel.as_posix())
    except ValueError:
        return path, from_fs(os.fspath(path))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


def _preprocess_picture(picture: Any, preprocess: Any) -> tuple[Any, Any]:
    """A PIL image or an array, resized and normalised like a decoded file: an (H, W, 3) or (H, W)
    uint8 array is a picture like a PNG's; any other array is raw data like a .npy file's ((H, W, C)
    or (C, H, W), scaled by preprocess.intensity)."""
    import numpy as np
    from PIL import Image, ImageOps

    from explain_cli.images import model_input, to_picture

    if isinstance(picture, np.ndarray):
        if picture.dtype == np.uint8 and (picture.ndim == 2 or picture.ndim == 3 and picture.shape[2] in (1, 3, 4)):
            picture = Image.fromarray(picture[..., 0] if picture.ndim == 3 and picture.shape[2] == 1 else picture)
        elif preprocess.transform is None:
            return model_input(to_picture(picture, preprocess), preprocess)
        else:
            return model_input(picture, preprocess)
    elif not _is_pil(picture):
        raise ImageError(f"not an image: {type(picture).__name__} (give paths, PIL images, arrays or a tensor)")
    return model_input(ImageOps.exif_transpose(picture), preprocess)


def _tensor_inputs(prep: "Prepared", batch: Any) -> list[tuple[str, Any, Any]]:
    """A tensor is the model input itself: (N, C, H, W) (or one image), normalised with
    preprocess.mean/std; its display pixels are un-normalised from it."""
    import numpy as np

    from explain_cli.images import display_pixels

    pre = prep.config.preprocess
    x = batch.detach().cpu().float()
    if x.dim() == 3:
        x = x[None]
    c, h, w = pre.input_shape
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise UserError(f"images: a tensor must be the model input, (N, {c}, {h}, {w}) normalised "
                        f"with preprocess.mean/std; got {tuple(batch.shape)} (give paths or PIL images to have "
                        f"them resized and normalised)")
    arrays = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    mean = np.asarray(pre.norm[0], np.float32)[:, None, None]
    std = np.asarray(pre.norm[1], np.float32)[:, None, None]
    unit = (arrays * std + mean).transpose(0, 2, 3, 1)
    return [(f"tensor[{i}]", display_pixels(unit[i], pre), arrays[i]) for i in range(len(arrays))]


def explain(config: ConfigLike, images: ImagesLike = None, *, limit: int | None = None,
            errors: Literal["raise", "skip"] = "raise", base_dir: str | os.PathLike[str] | None = None,
            **overrides: Any) -> "ImageExplanation":
    """Explain images and return a ``shap.Explanation``; nothing is written to disk.

    ``config``: a YAML path or a dict (checked like the CLI; problems raise ``ConfigError``
    naming the key). ``images``: paths (a file under input.dir gives the CLI run's numbers),
    names of the input, PIL images, (H, W, 3) uint8 arrays, or a tensor batch already
    preprocessed (N, 3, size, size); default: the config's input (``limit``: the first N).
    ``overrides``: config keys, as ``--set`` (``explainer={"name": "partition"}``,
    ``targets={"classes": ["tiger cat"]}``, ``device="cpu"``). An image that cannot be read
    or explained raises ``ImageError`` (``errors="skip"``: warned and left out).

    The result: ``values`` (N, H, W, C, k), ``data`` (N, size, size, 3) uint8, ``base_values``
    and ``output_names`` (N, k), ``instance_names`` the images, and per (image, class)
    ``class_index``, ``probability``, ``rank``, ``output``, ``shap_sum``, ``additivity_error``,
    ``stability``, ``deletion_auc``, ``insertion_auc``, ``nsamples_used``. The model,
    background and explainer are kept for the next call (``clear_cache()`` frees them).

    Example::

        import explain_cli, shap
        expl = explain_cli.explain("configs/demo.yaml", ["chelsea.jpg"], explainer={"nsamples": 32})
        shap.image_plot(expl)
        expl.stability, expl.additivity_error
    """
    from explain_cli import pipeline

    if errors not in ("raise", "skip"):
        raise UserError(f"errors: 'raise' or 'skip', got {errors!r}")
    cfg = load_config(config, overrides, base_dir)
    with _CACHE.lock:
        prep = pipeline.prepare(cfg, pipeline.RunOptions(limit=limit), build=_CACHE.builder(cfg))
        good, failed = _inputs(prep, images)
        if failed and errors == "raise":
            raise ImageError("; ".join(f"{name}: {why}" for name, why in failed))
        background = _CACHE.background_for(prep)
        explainer = _CACHE.explainer_for(prep, background)
        results = _explain_items(prep, explainer, good, failed)
    if failed:
        if errors == "raise":
            raise ImageError("; ".join(f"{name}: {why}" for name, why in failed))
        log.warning("explain: %d image(s) left out: %s", len(failed),
                    "; ".join(f"{name}: {why}" for name, why in failed))
    if not results:
        raise ImageError("no image was explained" + (f" ({failed[0][0]}: {failed[0][1]})" if failed else ""))
    return _explanation(results)


def _explain_items(prep: "Prepared", explainer: Any, good: list[tuple[str, Any, Any]],
                   failed: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The pipeline's explain stage over ``good`` in the run's steps; one dict per image."""
    import numpy as np

    from explain_cli import pipeline, targets
    from explain_cli.metrics import RunMetrics
    from explain_cli.write import nonfinite_result

    cfg = prep.config
    spec, truth = prep.targets, prep.truth
    if spec.uses_labels and truth is not None:  # asked for its label, an image needs one
        failed.extend((rel, f"no label in {truth.path.name}") for rel, _, _ in good if truth.of(rel) is None)
        good = [item for item in good if truth.of(item[0]) is not None]
    metrics = RunMetrics(cfg.metrics, cfg.metrics_steps, cfg.metrics_baseline,
                         targets.activation_for(spec.activation, prep.num_outputs))
    step = explainer.images_per_step
    results = []
    for start in range(0, len(good), step):
        for items, result in pipeline.explain_step(explainer, good[start:start + step], prep.device, spec,
                                                   cfg.seed, truth):
            if isinstance(result, Exception):
                failed.extend((rel, f"{type(result).__name__}: {result}") for rel, _, _ in items)
                continue
            pipeline.score_step(metrics, explainer, items, result, prep.device, cfg.seed)
            for j, (rel, pixels, _) in enumerate(items):
                problem = nonfinite_result(result, j)
                if problem:
                    failed.append((rel, problem))
                    continue
                slots = result.slots(j)
                classes = result.classes[j][slots]

                def cells(values: Any) -> Any:
                    return None if values is None else np.asarray(values, np.float64)[j][slots]

                used = getattr(result, "nsamples_used", None)
                results.append({
                    "name": rel, "pixels": pixels,
                    "values": result.values[j][slots].transpose(2, 3, 1, 0),
                    "class_index": classes.astype(np.int64),
                    "class_name": [prep.labels[int(c)] for c in classes],
                    "base_values": cells(result.base_values), "output": cells(result.outputs),
                    "shap_sum": cells(result.shap_sum), "additivity_error": result.additivity_error[j][slots],
                    "probability": cells(result.probabilities),
                    "rank": np.array([result.rank(j, r) for r in slots], np.float64),
                    "stability": cells(result.stability), "deletion_auc": cells(result.deletion_auc),
                    "insertion_auc": cells(result.insertion_auc),
                    "nsamples_used": None if used is None else np.full(len(slots), float(used[j])),
                })
    return results


def _explanation(results: list[dict[str, Any]]) -> "ImageExplanation":
    """Per-image results (values (h, w, C, k_i)) as one ImageExplanation; images asked fewer
    classes than others are padded with NaN (class_index and rank: -1; the name: empty)."""
    import numpy as np

    from explain_cli.explanation import FIELDS, ImageExplanation

    k = max(r["values"].shape[-1] for r in results)
    shapes = {r["values"].shape[:-1] for r in results}
    if len(shapes) > 1:
        raise UserError(f"the maps have different shapes {sorted(shapes)}: explain them separately")
    n = len(results)
    values = np.full((n,) + next(iter(shapes)) + (k,), np.nan, np.float32)
    names = np.full((n, k), "", dtype=object)
    columns = {name: np.full((n, k), -1, np.int64) if name in INT_FIELDS else np.full((n, k), np.nan)
               for name in ("base_values",) + FIELDS}
    for i, r in enumerate(results):
        kk = r["values"].shape[-1]
        values[i, ..., :kk] = r["values"]
        names[i, :kk] = r["class_name"]
        for name, column in columns.items():
            if r.get(name) is not None:
                column[i, :kk] = np.nan_to_num(r[name], nan=-1) if name in INT_FIELDS else r[name]
    names = names.astype(str)
    data = np.stack([r["pixels"] for r in results])
    fields = {name: (columns[name], [0, values.ndim - 1]) for name in FIELDS
              if any(r.get(name) is not None for r in results)}
    return ImageExplanation(values, base_values=columns["base_values"], data=data, output_names=names,
                            instance_names=[r["name"] for r in results], fields=fields)


# --- run -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunResult:
    """What a batch run did: its counts (as in run.json), the CLI's exit code and the folder.

    ``exit_code``: 0 every selected image explained (or already done); 3 at least one failed
    (errors.csv); 129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM (rerun to resume).
    Config and usage errors raise ``ConfigError`` / ``UserError`` instead (the CLI's 2 and 4:
    ``exc.exit_code``).
    """

    output_dir: Path
    exit_code: int
    selected: int
    explained: int
    already_done: int
    failed: int
    excluded: int
    interrupted: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the CLI would have exited 0."""
        return self.exit_code == 0


def run_config(cfg: "Config", options: "RunOptions", build: Callable[..., Any] | None = None) -> "RunSummary":
    """The batch job for a loaded config: the CLI's ``run`` command and ``run()`` both call it."""
    from explain_cli import pipeline
    from explain_cli.job import keep_freed_memory

    keep_freed_memory()  # before the first tensor: no page-fault storm per model call (glibc only)
    prep = pipeline.prepare(cfg, options, build=build) if build is not None else None
    return pipeline.run(cfg, options, prep)


def run(config: ConfigLike, *, limit: int | None = None, overwrite: bool = False, shard: str | None = None,
        relabel: bool = False,
        progress: bool = False, base_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> RunResult:
    """Run the batch job: the CLI's outputs (overlays, topk.csv, errors.csv, run.json,
    report.html) in output.dir, resumable, with the CLI's exit code in the result.

    ``limit``, ``overwrite``, ``shard`` ("I/N"), ``relabel`` and ``progress`` are the CLI's options; overrides
    are config keys as in ``explain``. A model ``explain`` loaded for the same config is reused.

    Example::

        result = explain_cli.run("configs/demo.yaml", output={"save_values": True})
        assert result.ok, f"exit {result.exit_code}: see {result.output_dir}/errors.csv"
        expl = explain_cli.load_run(result.output_dir)
    """
    from explain_cli.pipeline import RunOptions, Shard

    cfg = load_config(config, overrides, base_dir)
    options = RunOptions(limit=limit, progress=progress, overwrite=overwrite, relabel=relabel,
                         shard=Shard.parse(shard) if shard else None)
    with _CACHE.lock:
        summary = run_config(cfg, options, build=_CACHE.builder(cfg))
    return RunResult(output_dir=Path(summary.output_dir), exit_code=summary.exit_code, selected=summary.selected,
                     explained=summary.explained, already_done=summary.skipped, failed=summary.failed,
                     excluded=summary.excluded, interrupted=summary.interrupted, seconds=summary.seconds)


# --- load_run --------------------------------------------------------------------------------------

def _run_rows(output_dir: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """topk.csv rows (or every shard's, before a merge) and run.json (or the first shard's)."""
    from explain_cli.write import parse_csv, read_csv_text

    tables = [output_dir / "topk.csv"] if (output_dir / "topk.csv").is_file() else \
        sorted(output_dir.glob("topk.shard-*.csv"))
    infos = [output_dir / "run.json"] if (output_dir / "run.json").is_file() else \
        sorted(output_dir.glob("run.shard-*.json"))
    if not tables or not infos:
        raise UserError(f"{output_dir}: no run outputs (topk.csv and run.json, or a shard's)")
    rows: list[dict[str, str]] = []
    for table in tables:
        records = parse_csv(read_csv_text(table))
        if records:
            header = records[0]
            rows.extend(dict(zip(header, record)) for record in records[1:])
    info = json.loads(infos[0].read_text(encoding="utf-8"))
    return rows, info


def _number(cell: str | None) -> float:
    try:
        return float(cell) if cell not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def _values_file(output_dir: Path, rel: str) -> Path | None:
    from explain_cli.names import fs_name, output_stem

    for folded in (False, True):  # the stem on a case-sensitive folder, then on a case-insensitive one
        path = output_dir / "values" / f"{fs_name(output_stem(rel, folded))}.npz"
        if path.is_file():
            return path
    return None


def _input_folder(info: dict[str, Any], input_dir: str | os.PathLike[str] | None) -> Path:
    if input_dir is not None:
        return Path(input_dir)
    given = Path(os.path.expanduser(str((info.get("config") or {}).get("input", {}).get("dir", "."))))
    if given.is_absolute():
        return given
    base = Path(info["config_file"]).parent if info.get("config_file") else Path.cwd()
    return Path(os.path.normpath(base / given))


def _select(names: list[str], images: str | Sequence[str] | None) -> list[str]:
    if images is None:
        return names
    wanted = [images] if isinstance(images, str) else list(images)
    chosen = [n for n in names if any(n == w or fnmatch.fnmatchcase(n, w) for w in wanted)]
    missing = [w for w in wanted if not any(n == w or fnmatch.fnmatchcase(n, w) for n in names)]
    if missing:
        raise UserError(f"load_run: no explained image matches {', '.join(map(repr, missing))}")
    return chosen


def _load_images(output_dir: Path, rows_of: dict[str, list[dict[str, str]]], names: list[str],
                 info: dict[str, Any], ranks: Sequence[int] | None, pixels: bool,
                 input_dir: Path) -> "ImageExplanation":
    import numpy as np

    from explain_cli.config import PreprocessConfig
    from explain_cli.discover import source_path
    from explain_cli.images import load_preprocessed

    preprocess = PreprocessConfig.model_validate((info.get("config") or {}).get("preprocess") or {})
    if pixels and preprocess.transform is not None:
        from explain_cli.errors import ConfigError
        from explain_cli.transform import resolve

        try:  # the transform's module is looked up beside the images' folder, then on sys.path
            resolve(preprocess, input_dir)
        except ConfigError:
            pixels = False  # the maps load; the pictures under them are gray
    results = []
    unreadable = []
    for rel in names:
        path = _values_file(output_dir, rel)
        if path is None:
            raise UserError(f"{output_dir}: no values/ file for {rel!r}: the run must have output.save_values: "
                            f"true (topk.csv alone has the scores; rerun with --set output.save_values=true "
                            f"--overwrite to get the maps)")
        with np.load(path) as npz:
            values, classes = npz["values"], npz["classes"]
        by_class = {int(_number(r["class_index"])): r for r in rows_of[rel]}
        keep = [i for i, c in enumerate(classes)
                if ranks is None or int(_number(by_class.get(int(c), {}).get("rank"))) in ranks]
        rows = [by_class.get(int(classes[i]), {}) for i in keep]
        picture = np.full(values.shape[-2:] + (3,), 128, np.uint8)
        if pixels:
            try:
                picture = load_preprocessed(source_path(input_dir, rel), preprocess)[0]
            except ImageError:
                unreadable.append(rel)

        def column(name: str) -> Any:
            return np.array([_number(r.get(name)) for r in rows])

        results.append({
            "name": rel, "pixels": picture, "values": values[keep].transpose(2, 3, 1, 0),
            "class_index": classes[keep].astype(np.int64), "class_name": [r.get("class_name", "") for r in rows],
            "base_values": column("base_value"), "output": column("output"), "shap_sum": column("shap_sum"),
            "additivity_error": column("additivity_error"), "probability": column("probability"),
            "rank": column("rank"), "stability": column("stability"), "deletion_auc": column("deletion_auc"),
            "insertion_auc": column("insertion_auc"), "nsamples_used": column("nsamples_used"),
        })
    if unreadable:
        log.warning("load_run: %d image(s) not readable under %s (shown grey; pass input_dir=): %s",
                    len(unreadable), input_dir, ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""))
    if not results:
        raise UserError(f"{output_dir}: no explained image selected")
    return _explanation(results)


def _grouped(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    from explain_cli.names import unescape

    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault(unescape(row["image"]), []).append({k: unescape(v) for k, v in row.items()})
    return grouped


def load_run(output_dir: str | os.PathLike[str], images: str | Sequence[str] | None = None,
             ranks: Sequence[int] | None = None, *, pixels: bool = True,
             input_dir: str | os.PathLike[str] | None = None) -> "ImageExplanation":
    """A finished, interrupted or merged run (or its shards before the merge) as the Explanation
    ``explain`` returns, from topk.csv, run.json and values/*.npz; nothing is recomputed.

    The run needs ``output.save_values: true`` (the maps live in values/). ``images``: names or
    shell patterns (``"a/*"``) of the images to load (default: all; use ``iter_run`` for a large
    run); ``ranks``: which classes, by rank (``[1]``: each image's top class). ``data`` is
    decoded again from input.dir (``input_dir`` if the images moved; grey where unreadable,
    ``pixels=False`` to skip).

    Example::

        expl = explain_cli.load_run("out/demo", images=["chelsea.jpg"])
        shap.image_plot(expl)
    """
    output_dir = Path(output_dir)
    rows, info = _run_rows(output_dir)
    grouped = _grouped(rows)
    names = _select(list(grouped), images)
    return _load_images(output_dir, grouped, names, info, ranks, pixels, _input_folder(info, input_dir))


def iter_run(output_dir: str | os.PathLike[str], batch: int = 64, images: str | Sequence[str] | None = None,
             ranks: Sequence[int] | None = None, *, pixels: bool = True,
             input_dir: str | os.PathLike[str] | None = None) -> Iterator["ImageExplanation"]:
    """``load_run`` ``batch`` images at a time, for runs too large to hold in memory at once.

    Example::

        for expl in explain_cli.iter_run("out/big", batch=256, ranks=[1]):
            print(expl.instance_names[0], expl.stability.mean())
    """
    output_dir = Path(output_dir)
    rows, info = _run_rows(output_dir)
    grouped = _grouped(rows)
    names = _select(list(grouped), images)
    folder = _input_folder(info, input_dir)
    for start in range(0, len(names), max(1, batch)):
        yield _load_images(output_dir, grouped, names[start:start + batch], info, ranks, pixels, folder)

