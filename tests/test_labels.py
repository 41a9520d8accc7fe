"""Label files (explain_cli/labels.py): every format, the defaults, and the errors."""

from __future__ import annotations

import json

import pytest

from explain_cli.errors import ConfigError
from explain_cli.labels import load_labels

NAMES = ["tench", "goldfish, Carassius auratus", "great white shark"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name,text", [
    ("imagenet_class_index.json",
     json.dumps({"0": ["n01440764", NAMES[0]], "2": ["n01484850", NAMES[2]], "1": ["n01443537", NAMES[1]]})),
    ("list.json", json.dumps(NAMES)),
    ("dict.json", json.dumps({"1": NAMES[1], "0": NAMES[0], "2": NAMES[2]})),
    ("names.txt", "\n".join(NAMES) + "\n\n\n"),
    ("names_crlf.txt", "\r\n".join(NAMES)),
    ("with_header.csv", 'index,name\n0,tench\n1,"goldfish, Carassius auratus"\n2,great white shark\n'),
    ("no_header.csv", '2,great white shark\n0,tench\n1,"goldfish, Carassius auratus"\n'),
    ("bom.txt", "\ufeff" + "\n".join(NAMES)),
    ("labels", "\n".join(NAMES)),  # no extension: one name per line
])
def test_formats(tmp_path, name, text):
    assert load_labels(write(tmp_path, name, text), 3) == NAMES


def test_default_imagenet_names():
    names = load_labels(None, 1000)
    assert len(names) == 1000
    assert names[0] == "tench"
    assert names[285] == "Egyptian cat"


def test_default_generic_names():
    assert load_labels(None, 3) == ["class 0", "class 1", "class 2"]


def test_count_mismatch(tmp_path):
    path = write(tmp_path, "two.txt", "cat\ndog\n")
    with pytest.raises(ConfigError) as info:
        load_labels(path, 3)
    assert info.value.key == "labels"
    assert "has 2 names but the model has 3 outputs" in info.value.message


@pytest.mark.parametrize("name,text,fragment", [
    ("bad.json", '{"0": "cat", ', "not valid JSON"),
    ("gap.json", '{"0": "cat", "2": "dog", "3": "fish"}', "index 1 is missing"),
    ("notindex.json", '{"zero": "cat", "1": "dog", "2": "fish"}', "not a class index"),
    ("number.json", '["cat", 7, "fish"]', "expected a class name"),
    ("scalar.json", '"cat"', "expected a JSON list"),
    ("blank.txt", "cat\n\nfish\n", "line 2 is blank"),
    ("one_col.csv", "0\n1\n2\n", "expected index,name"),
    ("dup.csv", "0,cat\n0,dog\n2,fish\n", "appears twice"),
])
def test_bad_files(tmp_path, name, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_labels(write(tmp_path, name, text), 3)
    assert info.value.key == "labels"
    assert fragment in info.value.message


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_labels(tmp_path / "nope.txt", 3)
    assert info.value.key == "labels" and "not found" in info.value.message
    path = tmp_path / "bin.txt"
    path.write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(ConfigError) as info:
        load_labels(path, 3)
    assert info.value.key == "labels" and "UTF-8" in info.value.message
