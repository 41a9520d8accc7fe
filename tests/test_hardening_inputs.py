"""Hostile inputs without a model: generated names through the CSV and naming functions, and
generated configs through the loader (issue 10). Each test builds its cases; none is a list of
known answers."""

from __future__ import annotations

import csv
import errno
import io
import itertools
import os
import random
import time
from pathlib import Path

import pytest
import yaml

from explain_cli import names
from explain_cli.config import check_output_dir, check_slurm_env, load_config, parse_override
from explain_cli.errors import ConfigError, UserError
from explain_cli.write import CsvLog, complete_prefix, format_row, read_csv_images, read_csv_text

# Characters that have broken CSVs, shells or decoders: CR, LF, quotes, separators, a leading
# formula sign, tabs, backslash escapes, non-ASCII, lone surrogates (undecodable bytes or JSON).
TROUBLE = ["\r", "\n", "\r\n", '"', "'", ",", ";", "=", "+", "-", "@", "\t", " ", "\\", "\\x41", "\\u00e9",
           "é", "日本", "🙂", "\u200b", "\udce9", "\udc80", "\ud800", "\udfff", "x", "."]


def generated_strings(n: int, seed: int = 0, max_parts: int = 6) -> list[str]:
    rng = random.Random(seed)
    out = ["", *TROUBLE]
    for _ in range(n):
        out.append("".join(rng.choice(TROUBLE + ["a", "b", "1"]) for _ in range(rng.randint(1, max_parts))))
    return out


def test_escape_round_trips_every_generated_string_and_keeps_plain_names():
    seen: dict[str, str] = {}
    for s in generated_strings(20000):
        e = names.escape(s)
        e.encode("utf-8")  # always writable as UTF-8
        assert names.unescape(e) == s
        assert seen.setdefault(e, s) == s  # injective
    for plain in ("IMG_0001.JPG", "a/b c/ü.png", "x,y\r\n.png", "50%.png", "a\\b.png"):
        assert names.escape(plain) == plain


def test_fs_name_round_trips_bytes_under_this_locale():
    for raw in (b"caf\xe9.jpg", b"\xff\xfe.png", "日本.png".encode(), b"a\\x41.png"):
        rel = names.from_fs(raw)
        assert os.fsencode(names.fs_name(rel)) == raw


def test_csv_rows_round_trip_any_name_and_class_name(tmp_path):
    path = tmp_path / "topk.csv"
    images = generated_strings(300, seed=1)
    images = [s for s in dict.fromkeys(images) if s]
    log = CsvLog(path, ["image", "rank", "class_name"])
    for i, name in enumerate(images):
        log.append([[name, 1, images[-1 - i]]])
    log.close()
    assert read_csv_images(path) == set(images)
    with open(path, newline="", encoding="utf-8") as fh:  # any csv reader gets the escaped cells back
        rows = list(csv.reader(fh))
    assert [names.unescape(r[0]) for r in rows[1:]] == images
    assert [names.unescape(r[2]) for r in rows[1:]] == images[::-1]
    # reopening (resume) keeps every row, dropping only the ones asked for
    CsvLog(path, ["image", "rank", "class_name"], drop_images={images[0], images[5]}).close()
    assert read_csv_images(path) == set(images) - {images[0], images[5]}


def test_a_torn_last_record_is_dropped_wherever_the_kill_cut_it(tmp_path):
    head = format_row(["image", "class_name"]) + format_row(["ok.png", "fine"])
    last = format_row(["we\"ird\r\n,name.png", "multi\nline"])
    for cut in range(len(last)):
        text = head + last[:cut]
        assert complete_prefix(text) == head, cut
        path = tmp_path / f"t{cut}.csv"
        path.write_bytes(text.encode())
        CsvLog(path, ["image", "class_name"]).close()
        assert read_csv_text(path) == head
    assert complete_prefix(head + last) == head + last


def test_output_names_are_injective_and_stable_for_generated_sets():
    base = ["x", "X", "x.png", "x.jpg", "x.png.jpg", "X.PNG", "x.PNG", "x.Png", "ß.png", "SS.png", "ss.png",
            "a/x.png", "A/x.png", "a/X.png", "caf\udce9.png", "café.png", "n" * 300 + ".png", "n" * 301 + ".png",
            "é" * 200 + ".jpg", "d" * 300 + "/x.png"]
    rng = random.Random(3)
    sets = [base] + [rng.sample(base, rng.randint(2, len(base))) for _ in range(200)]
    for case_insensitive in (False, True):
        reference = {rel: names.output_stem(rel, case_insensitive) for rel in base}
        for images in sets:
            stems = names.output_names(images, case_insensitive)
            got = [os.fsencode(stems[rel]) for rel in images]
            key = (lambda b: b.decode("utf-8", "surrogateescape").casefold()) if case_insensitive else (lambda b: b)
            assert len({key(g) for g in got}) == len(images), images  # no two images share an output
            for rel in images:
                assert names.output_stem(rel, case_insensitive) == reference[rel]  # independent of the others
                assert len(os.fsencode(stems[rel]).split(b"/")[-1]) + len(b".svg") <= 255
    assert names.output_stem("a/x.png") == "a/x.png"  # today's form: the whole relative path


def test_probe_says_this_tmp_folder_is_case_sensitive(tmp_path):
    (tmp_path / "probe").mkdir()
    assert names.is_case_insensitive(tmp_path / "probe") is False
    assert list((tmp_path / "probe").iterdir()) == []


# -- configs ------------------------------------------------------------------------------------

BASE = {
    "model": {"arch": "torchvision:resnet18", "num_classes": 3, "weights": "random"},
    "input": {"dir": "."},
    "preprocess": {"size": 16},
    "explainer": {"name": "gradient", "nsamples": 4},
}

# Every numeric key, with a value inside its bound (used to check the bound is not too tight).
NUMERIC_KEYS = {
    "model.num_classes": 10, "preprocess.size": 64, "preprocess.crop_fraction": 0.9, "background.from_input": 5,
    "output.top_k": 3, "output.dpi": 100, "batch_size": 32, "seed": 7, "explainer.nsamples": 10,
    "explainer.local_smoothing": 0.1,
}
EXPLAINER_KEYS = {
    "partition": {"explainer.max_evals": 100, "explainer.batch_size": 10},
    "kernel": {"explainer.nsamples": 100, "explainer.segments.n_segments": 20,
               "explainer.segments.compactness": 10.0, "explainer.segments.sigma": 1.0},
    "deep": {"explainer.max_background": 4},
}
ABSURD = [True, False, 10**12, -(10**12), -1, 10**30, 1e300, float("inf"), float("nan"), "3", [1], {"a": 1}]


def _write(tmp_path: Path, data: dict | str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _with(key: str, value, explainer: str = "gradient") -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["explainer"] = {"name": explainer}
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def _all_numeric():
    for key, ok in NUMERIC_KEYS.items():
        yield "gradient", key, ok
    for name, keys in EXPLAINER_KEYS.items():
        for key, ok in keys.items():
            yield name, key, ok


@pytest.mark.parametrize("explainer,key,ok", list(_all_numeric()))
def test_every_numeric_key_refuses_absurd_values_naming_the_key(tmp_path, explainer, key, ok):
    load_config(_write(tmp_path, _with(key, ok, explainer)))  # a sane value passes
    if isinstance(ok, float):
        load_config(_write(tmp_path, _with(key, int(ok) or 1, explainer)))  # a YAML int is a valid float
    for value in ABSURD:
        if key == "seed" and value == 10**12:
            continue  # any 64-bit seed is valid
        if isinstance(ok, float) and isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**6:
            continue
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, _with(key, value, explainer)))
        assert key in str(info.value), (key, value, str(info.value))


def test_huge_integer_literals_and_deep_nesting_fail_fast_naming_the_key(tmp_path):
    for key in ("seed", "model.num_classes", "explainer.nsamples", "model.kwargs.depth"):
        data = _with(key, 0)
        text = yaml.safe_dump(data).replace(f"{key.split('.')[-1]}: 0", f"{key.split('.')[-1]}: {'9' * 5000}")
        t = time.process_time()  # CPU time: a loaded machine cannot make it fail
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, text))
        assert key in str(info.value) and "integer" in str(info.value)
        assert time.process_time() - t < 2
    for depth in (40, 5000, 200000):
        text = yaml.safe_dump(BASE) + "labels: " + "[" * depth + "]" * depth + "\n"
        t = time.process_time()  # CPU time: a loaded machine cannot make it fail
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, text))
        assert "nested" in str(info.value)
        assert time.process_time() - t < 2


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


BOMB_SITES = {
    "top": "",
    "labels": "labels: *l8\n",
    "model.kwargs": "model: {arch: 'torchvision:resnet18', num_classes: 3, kwargs: {x: *l8}}\n",
    "explainer": "explainer: {name: gradient, nsamples: *l8}\n",
    "input.include": "input: {dir: ., include: *l8}\n",
}


@pytest.mark.parametrize("where", list(BOMB_SITES))
def test_alias_bombs_are_refused_fast_wherever_they_are(tmp_path, where):
    top = where.split(".")[0]
    rest = yaml.safe_dump({k: v for k, v in BASE.items() if k != top})
    text = "_anchors:\n" + "".join("  " + line + "\n" for line in _bomb().splitlines()) + rest + BOMB_SITES[where]
    t = time.process_time()  # CPU time: a loaded machine cannot make it fail
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert time.process_time() - t < 2
    assert "expands to more than" in str(info.value)
    assert yaml.safe_load(text)  # plain PyYAML loads it (the blow-up comes when it is walked)


def test_recursive_alias_and_bomb_in_set_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="recursive"):
        load_config(_write(tmp_path, yaml.safe_dump(BASE) + "labels: &a [*a]\n"))
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_override("labels=" + "{" + _bomb().replace("\n", ", ").rstrip(", ") + "}")


def test_duplicate_keys_are_errors_naming_key_and_line(tmp_path):
    text = "model:\n  arch: torchvision:resnet18\n  num_classes: 3\n  num_classes: 4\ninput: {dir: .}\n"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert "'num_classes'" in str(info.value) and "line 4" in str(info.value) and "line 3" in str(info.value)
    text = yaml.safe_dump(BASE) + "seed: 1\nseed: 2\n"
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_config(_write(tmp_path, text))
    # merge keys are not duplicates
    text = "base: &b {arch: torchvision:resnet18, num_classes: 3}\n"
    load_config(_write(tmp_path, yaml.safe_dump({k: v for k, v in BASE.items() if k != "model"})
                       + "model:\n  <<: {arch: torchvision:resnet18}\n  num_classes: 3\n  weights: random\n"))


def test_non_finite_and_degenerate_preprocessing_is_refused(tmp_path):
    for key, value in [("preprocess.mean", [float("inf"), 0, 0]), ("preprocess.mean", [float("nan"), 0, 0]),
                       ("preprocess.std", [1e-300, 1, 1]), ("preprocess.std", [0, 1, 1]),
                       ("preprocess.std", [float("inf"), 1, 1]), ("preprocess.mean", [123.7, 116.3, 103.5]),
                       ("preprocess.crop_fraction", 1e-6), ("preprocess.size", 100000)]:
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, _with(key, value)))
        assert key.split(".")[-1] in str(info.value), (key, value, str(info.value))
    with pytest.raises(ConfigError, match="background"):
        load_config(_write(tmp_path, _with("background.from_input", 10000) | {"preprocess": {"size": 1024}}))
    load_config(_write(tmp_path, _with("preprocess.mean", [0, 1, 0])))  # ints for floats are fine


def test_nul_characters_and_huge_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="NUL"):
        load_config(_write(tmp_path, _with("input.dir", "a\x00b")))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="KiB"):
        load_config(big)


def test_output_dir_checks(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    (tmp_path / "file").write_text("x")
    for bad, what in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "sub" / "out", "which is a file"),
                      (inp, "is the input folder")]:
        with pytest.raises(ConfigError) as info:
            check_output_dir(bad, inp)
        assert "output.dir" in str(info.value) and what in str(info.value)
    (tmp_path / "link").symlink_to(inp)
    with pytest.raises(ConfigError, match="is the input folder"):
        check_output_dir(tmp_path / "link", inp)
    check_output_dir(inp / "out", inp)  # inside the input folder: allowed, discovery skips it
    check_output_dir(tmp_path / "new" / "deeper", inp)
    assert not (tmp_path / "new").exists()  # checking creates nothing

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("explain_cli.config.tempfile.mkstemp", refuse)
    with pytest.raises(ConfigError, match="read-only file system"):
        check_output_dir(tmp_path / "out", inp)


def test_slurm_variables_must_be_integers():
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"):
        for value in ("abc", "1.5", "", " ", "٣", "1e3", "9" * 40, "0x1"):
            env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", name: value}
            with pytest.raises(UserError, match=name):
                check_slurm_env(env)
    check_slurm_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"})


def test_csv_of_an_earlier_version_gets_the_new_columns(tmp_path):
    """Resuming into a topk.csv written with fewer columns pads the old rows with blanks instead of
    appending longer rows under the old header; a foreign header is refused."""
    from explain_cli.errors import UserError
    from explain_cli.write import CsvLog, parse_csv, read_csv_text

    path = tmp_path / "topk.csv"
    path.write_text("image,rank\r\na.png,1\r\n".replace("\r\n", "\n"))
    log = CsvLog(path, ["image", "rank", "stability"])
    log.append([["b.png", 1, 0.5]])
    log.close()
    rows = parse_csv(read_csv_text(path))
    assert rows == [["image", "rank", "stability"], ["a.png", "1", ""], ["b.png", "1", "0.5"]]

    other = tmp_path / "other.csv"
    other.write_text("file,score\nx,1\n")
    with pytest.raises(UserError, match="--overwrite"):
        CsvLog(other, ["image", "rank"])
    assert other.read_text() == "file,score\nx,1\n"
