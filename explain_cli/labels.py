"""Class names for the model's outputs, from the label file formats people actually have.

The count must equal the model's outputs: a label file of another model would otherwise put wrong
names on every overlay without any error.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from explain_cli.errors import ConfigError


def load_labels(path: Path | None, num_outputs: int) -> list[str]:
    """``num_outputs`` class names, index order.

    Formats: ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"]}``), a JSON list of
    names, a JSON object ``{"0": "name"}``, a text file with one name per line, or CSV
    ``index,name`` (header row optional). Without a file: the ImageNet names torchvision ships
    when the model has 1000 outputs, else ``class 0``, ``class 1``, ...

    A one-output (sigmoid) model takes one name (its positive class) or two: negative, positive, so
    truth CSVs and the ``predicted`` column can name both classes.
    """
    if path is None:
        if num_outputs == 1000:
            return imagenet_names()
        return [f"class {i}" for i in range(num_outputs)]
    path = Path(path)
    if not path.is_file():
        raise ConfigError("labels", f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError("labels", f"{path} is not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError("labels", f"cannot read {path}: {exc}") from None
    suffix = path.suffix.lower()
    stripped = text.lstrip()
    if suffix == ".json" or (suffix not in (".txt", ".csv") and stripped[:1] in ("[", "{")):
        names = _from_json(text, path)
    elif suffix == ".csv":
        names = _from_csv(text, path)
    else:
        names = _from_lines(text, path)
    if num_outputs == 1 and len(names) == 2:  # a sigmoid model: negative, positive (targets.py: binary)
        if names[0] == names[1]:
            raise ConfigError("labels", f"{path} names both classes of the one-output model {names[0]!r}")
        return names
    if len(names) != num_outputs:
        raise ConfigError("labels", f"{path} has {len(names)} names but the model has {num_outputs} outputs "
                                    "(is it the label file of another model, or is model.num_classes wrong?)")
    return names


def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names (torchvision ships them; nothing is downloaded)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _name(value: Any, path: Path, where: str) -> str:
    """A name, or the last item of an imagenet_class_index entry ``[wnid, name]``."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[-1]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("labels", f"{path}: {where} is {value!r}, expected a class name (a non-empty string)")
    return value.strip()


def _indexed(pairs: list[tuple[str, Any]], path: Path, what: str) -> list[str]:
    """Names ordered by their integer index; the indices must be exactly 0..n-1."""
    by_index: dict[int, str] = {}
    for key, value in pairs:
        try:
            index = int(str(key).strip())
        except ValueError:
            raise ConfigError("labels", f"{path}: {what} {key!r} is not a class index (0, 1, 2, ...)") from None
        if index in by_index:
            raise ConfigError("labels", f"{path}: class index {index} appears twice")
        by_index[index] = _name(value, path, f"the name of class {index}")
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing or (by_index and min(by_index) < 0):
        first = missing[0] if missing else min(by_index)
        raise ConfigError("labels", f"{path}: class indices must be 0..{len(by_index) - 1}; index {first} is missing")
    return [by_index[i] for i in range(len(by_index))]


def _from_json(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("labels", f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, list):
        return [_name(v, path, f"item {i}") for i, v in enumerate(data)]
    if isinstance(data, dict):
        return _indexed(list(data.items()), path, "key")
    raise ConfigError("labels", f"{path}: expected a JSON list of names or an object {{\"0\": \"name\"}}, "
                                f"got {type(data).__name__}")


def _from_csv(text: str, path: Path) -> list[str]:
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    except csv.Error as exc:
        raise ConfigError("labels", f"{path} is not valid CSV: {exc}") from None
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        rows = rows[1:]  # a header row such as index,name
    for n, row in enumerate(rows, 1):
        if len(row) < 2:
            raise ConfigError("labels", f"{path}: row {n} has {len(row)} column(s); expected index,name")
    return _indexed([(r[0], r[1]) for r in rows], path, "index")


def _from_lines(text: str, path: Path) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line:
            raise ConfigError("labels", f"{path}: line {n} is blank (one class name per line, in index order)")
    return lines
