"""Resume only what the same settings produced.

A rerun into an output folder skips images whose outputs exist. That is only right when the
earlier run used the same result-affecting settings, so ``run.json`` stores a fingerprint of
them: the resolved config (paths made absolute) without the keys below, plus the SHA-256 of the
label file and of the checkpoint. A rerun whose fingerprint differs, into a folder that already
holds results, is refused (exit 2) with the differing keys, and ``--overwrite`` or another
``output.dir`` as the way out.

Keys that never change an image's numbers or files do not block a resume: where the run
executes (``device``; like ``merge``, we accept its float-rounding differences), how it batches
(``batch_size``) and how many processes write its overlays (``workers``), which images it selects (``input.include/exclude``: the selection may grow),
where the outputs go (``output.dir``) and which files are written besides the CSV rows
(``output.format``, ``output.save_values``: missing files are simply redone), how overlays look
(``output.style``, ``output.caption``, ``output.scale``: overlays already written keep their look), and
``model.trust_checkpoint`` (it permits loading, it does not change the weights). Command-line
options (progress, log file, limit, shard, verbosity) are not part of the config at all.
``model.checkpoint``, ``labels`` and an amortized explainer's ``explainer.checkpoint``
(a retrained ``explainer.pt`` at the same path gives other maps) are compared by content, not by path.

The truth CSV (``targets.from_csv``) grows while a job is rerun nightly, so its file is not compared:
what it said about the images already done is, image by image, through the ``label`` column topk.csv
recorded for them (:func:`relabelled`). A row added for an image done without a label redoes that
image; a changed label of a done image is refused naming the image, or redone with ``--relabel``.

A ``python:`` factory's code decides the model as much as a checkpoint does (without one, its
weights come from the code, e.g. its ``manual_seed``): the fingerprint also holds the SHA-256 of
the factory's source file and of every module it imported from the config's folder. Editing any
of them refuses the resume like a changed checkpoint. A folder that holds results but no readable
run.json (deleted, say), or one whose fingerprint is not of the shape written here (edited by hand),
is refused too: its settings cannot be checked.

Not covered: installed packages a factory imports (their versions are in run.json), and images
replaced by other images under the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from explain_cli.errors import UserError

#: Resolved-config keys (dotted) that do not change results; see the module docstring.
IGNORED_KEYS = {"device", "batch_size", "workers", "input.include", "input.exclude", "output.dir",
                "output.format", "output.save_values", "output.style", "output.caption", "output.scale", "output.display_channels", "model.checkpoint", "model.trust_checkpoint",
                "labels", "targets.classes", "targets.contrast", "targets.from_csv.path", "explainer.checkpoint",
                "slides.overlays", "slides.heatmap.tiff"}  # slides: extra files, not other numbers
#: Fingerprint entries that are file digests ({'sha256', 'size', 'mtime_ns'}) or None.
DIGEST_KEYS = ("labels", "checkpoint", "truth_csv", "explainer_checkpoint")
#: Keys added after fingerprints existed, with the value that reproduces the older behaviour: an older
#: run.json lacks them, and that is no difference when the new value is this one.
NEW_KEY_DEFAULTS = {"targets.output": "logit", "targets.activation": "auto", "targets.from_csv": None,
                    "targets.from_csv.image": None, "targets.from_csv.class": None,
                    "targets.from_csv.separator": None, "targets.negative": None, "targets.threshold": 0.5,
                    "explainer.sampling": "shap",  # kernel: shap's coalitions (gradient's key predates no run.json of it)
                    "explainer.stability_from": "split_half",  # kernel: the stability column's estimate before it
                    "slides": None,  # runs before slides existed explained images
                    # preprocessing keys of issue 28: their defaults are the fixed preprocessing before them
                    "preprocess.channels": 3, "preprocess.interpolation": "bilinear", "preprocess.intensity": None,
                    "preprocess.transform": None, "preprocess.display": None}
#: Config paths compared as absolute paths.
PATH_KEYS = {"input.dir", "background.dir"}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _settings(config_dict: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    flat = _flatten(config_dict)
    out = {}
    for key, value in flat.items():
        if key in IGNORED_KEYS:
            continue
        if key == "model.weights" and value in (None, "checkpoint"):
            continue  # implied by the checkpoint (compared by content) or the factory; older run.json lack it
        if key in PATH_KEYS and isinstance(value, str) and base_dir is not None:
            p = Path(os.path.expanduser(value))
            value = os.path.normpath(str(p if p.is_absolute() else base_dir / p))
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def file_digest(path: Path | None, previous: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """{'sha256', 'size', 'mtime_ns', 'ctime_ns'} of a file; the previous digest is reused when size,
    mtime and ctime are unchanged (a multi-GB checkpoint is hashed once, not on every resume). The
    ctime is in because a file rewritten in place (a retrained explainer.pt of the same size) can
    have its mtime set back (``touch -r``, ``cp -p``), its ctime not."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if previous and previous.get("size") == st.st_size and previous.get("mtime_ns") == st.st_mtime_ns \
            and previous.get("ctime_ns") == st.st_ctime_ns and previous.get("sha256"):
        return dict(previous)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:  # unreadable: compared as absent (the run itself reports why it cannot read it)
        return None
    return {"sha256": h.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def model_code_files(config) -> list[Path]:
    """The source files that define a ``python:`` model or transform: their modules and every module
    loaded from the config's folder (what the factory imported there). Call after the model is
    built. Empty for torchvision, timm and torchscript."""
    specs = [spec for spec in (config.model.arch, config.preprocess.transform)  # a user transform: like a factory
             if spec and spec.startswith("python:")]
    if not specs:
        return []
    base = os.path.realpath(config._base_dir)
    own = os.path.dirname(os.path.realpath(__file__)) + os.sep  # explain-cli itself (a config at a repo root)
    files = set()
    for spec in specs:
        module_file = getattr(sys.modules.get(spec.split(":", 1)[1].rpartition(":")[0]), "__file__", None)
        if module_file:
            files.add(os.path.realpath(module_file))
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(".py"):
            real = os.path.realpath(path)
            if real.startswith(base + os.sep) and not real.startswith(own) and "site-packages" not in real:
                files.add(real)
    return [Path(f) for f in sorted(files)]


def fingerprint(config, checkpoint: Path | None, previous: dict[str, Any] | None = None,
                targets: Any = None, truth_csv: Path | None = None) -> dict[str, Any]:
    """The result-affecting settings of ``config`` (see the module docstring). ``targets`` (the resolved
    ``targets.TargetSpec``) is compared by class index, so ``--class 3`` and ``targets.classes: [3]``
    or a name and its index are the same question; the truth CSV by content."""
    from explain_cli.config import resolved_dict

    previous = previous or {}
    labels = config.resolve(config.labels) if config.labels else None
    old_code = previous.get("model_code") or {}
    result = {
        "settings": _settings(resolved_dict(config), config._base_dir),
        "labels": file_digest(labels, previous.get("labels")),
        "checkpoint": file_digest(checkpoint, previous.get("checkpoint")),
        "model_code": {str(p): file_digest(p, old_code.get(str(p))) for p in model_code_files(config)},
    }
    if targets is not None:
        result["targets"] = {"classes": list(targets.entries), "contrast": targets.contrast}
    if truth_csv is not None:
        result["truth_csv"] = file_digest(truth_csv, previous.get("truth_csv"))
    explainer_checkpoint = getattr(config.explainer_settings, "checkpoint", None)
    if explainer_checkpoint:
        result["explainer_checkpoint"] = file_digest(config.resolve(explainer_checkpoint),
                                                     previous.get("explainer_checkpoint"))
    return result


def _read_fingerprint(run_json: Path) -> tuple[dict[str, Any] | None, str]:
    """The stored fingerprint and, when there is none, why. Its shape is record.Fingerprint's: a
    hand-edited or foreign run.json must be refused, not crash the comparison."""
    from explain_cli.record import RunRecord, RunRecordError

    if not run_json.is_file():
        return None, f"{run_json.name} is missing or unreadable"
    try:
        info = RunRecord.read(run_json, lenient=True)
    except RunRecordError as exc:
        if "cannot read" in exc.problem:
            return None, f"{run_json.name} is missing or unreadable"
        return None, f"{run_json.name} is not a JSON object"
    if "fingerprint" in info.dropped:
        return None, f"{run_json.name} is malformed ({info.dropped['fingerprint']})"
    if info.fingerprint is not None:
        return info.fingerprint.dump(), ""
    if info.config is not None:
        base = Path(info.config_file).parent if info.config_file else None
        return {"settings": _settings(info.config, base)}, ""
    return None, f"{run_json.name} has no fingerprint and no config"


def stored_fingerprint(run_json: Path) -> dict[str, Any] | None:
    """The fingerprint of an earlier run.json; for one written before fingerprints existed, its
    config's settings (no file digests). None when there is no readable, well-formed run.json."""
    return _read_fingerprint(run_json)[0]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (keys the old one lacks are skipped
    for the file digests, so an old run.json compares on its settings alone): the settings, the
    targets, then the files by content."""
    return _setting_differences(old.get("settings") or {}, new.get("settings") or {}) + \
        _target_differences(old, new) + _file_differences(old, new)


def _setting_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The config keys whose values differ: changed values first, then added or removed keys; a
    switched explainer is one line (the keys of the other explainer follow from it)."""
    diffs, unset = [], []
    a = {k: v for k, v in a.items() if k not in IGNORED_KEYS}  # a run.json from before a key was ignored
    switched = a.get("explainer.name", "gradient") != b.get("explainer.name", "gradient")
    if switched:  # the one that matters; the keys of the other explainer follow from it
        diffs.append(f"explainer.name: {a.get('explainer.name', 'gradient')!r} -> {b.get('explainer.name', 'gradient')!r}")
    for key in sorted(set(a) | set(b)):
        if key not in a and key in NEW_KEY_DEFAULTS and b.get(key) == NEW_KEY_DEFAULTS[key]:
            continue  # a run.json from before the key existed: its behaviour was this default
        if (switched and key.startswith("explainer.")) or a.get(key, "(unset)") == b.get(key, "(unset)"):
            continue
        line = f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        (diffs if key in a and key in b else unset).append(line)  # changed values before added/removed keys
    return diffs + unset


def _target_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Other classes or contrast, or a truth CSV added or removed (its rows: relabelled(), per image)."""
    diffs = []
    default_targets = {"classes": ["top_k"], "contrast": None}
    if (old.get("targets") or default_targets) != (new.get("targets") or default_targets):
        diffs.append(f"targets: {old.get('targets') or default_targets} -> {new.get('targets') or default_targets}")
    if bool(old.get("truth_csv")) != bool(new.get("truth_csv")):
        diffs.append("targets.from_csv added or removed")
    return diffs


def _file_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The files compared by content: labels, checkpoint, explainer checkpoint, the model's code."""
    diffs = []
    for what, label in (("labels", "label file content"), ("checkpoint", "checkpoint content"),
                        ("explainer_checkpoint", "explainer.checkpoint content (a retrained explainer)")):
        if what in old and (old.get(what) or {}).get("sha256") != (new.get(what) or {}).get("sha256"):
            diffs.append(f"{label} changed")
    if "model_code" in old:
        a, b = old.get("model_code") or {}, new.get("model_code") or {}
        changed = sorted(f for f in set(a) | set(b)
                         if (a.get(f) or {}).get("sha256") != (b.get(f) or {}).get("sha256"))
        if changed:
            diffs.append(f"model code changed ({', '.join(Path(f).name for f in changed[:4])}"
                         f"{', ...' if len(changed) > 4 else ''})")
    return diffs


def relabelled(topk_path: Path, truth: Any, names: list[str], redo_changed: bool = False) -> set[str]:
    """The done images (rows in ``topk_path``) to explain again because the truth CSV ``truth`` now says
    something else about them than the ``label`` recorded in their rows: a label where there was none
    (a row added since). A changed or removed label is a UserError naming the images, unless
    ``redo_changed`` (``--relabel``) redoes them too."""
    from explain_cli.names import unescape
    from explain_cli.write import parse_csv, read_csv_text

    if not topk_path.exists():
        return set()
    rows = parse_csv(read_csv_text(topk_path))
    if not rows or "label" not in rows[0]:
        return set()
    column = rows[0].index("label")
    recorded: dict[str, str] = {}
    for row in rows[1:]:
        if row and len(row) > column:
            recorded.setdefault(unescape(row[0]), unescape(row[column]))
    redo, changed = set(), []
    for rel, was in recorded.items():
        own = truth.of(rel)
        now = ";".join(names[c] for c in own) if own else ""
        if now == was:
            continue
        if not was:
            redo.add(rel)
        else:
            changed.append((rel, was, now))
    if changed and not redo_changed:
        shown = "; ".join(f"{rel}: {was!r} -> {now or '(no row)'!r}" for rel, was, now in changed[:5])
        more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UserError(f"{topk_path.parent}: the truth CSV ({truth.path.name}) changed the label of "
                        f"{len(changed)} image(s) already explained ({shown}{more}); pass --relabel to "
                        f"explain those images again, or --overwrite to redo every image")
    return redo | {rel for rel, _, _ in changed}


def check_resume(run_json: Path, current: dict[str, Any], output_dir: Path) -> None:
    """UserError (exit 2) when ``output_dir`` holds results of other settings than ``current``.
    Call only when the folder already holds results (rows in topk/errors CSV)."""
    old, why = _read_fingerprint(run_json)
    if old is None:
        raise UserError(f"{output_dir} holds results but {why}, so the "
                        f"settings that made them cannot be checked and resuming could mix them. Use "
                        f"--overwrite to redo every image, or another output.dir")
    diffs = differences(old, current)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(f"{output_dir} holds results of different settings ({shown}); resuming would "
                        f"mix them. Use --overwrite to redo every image, or another output.dir")
