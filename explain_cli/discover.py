"""Find the images to explain: a sorted recursive walk with include/exclude patterns."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import stat
from pathlib import Path

from explain_cli.names import from_fs, fs_name

log = logging.getLogger("explain_cli")

_RUN_JSON = re.compile(rb"^run(\.shard-\d+-of-\d+)?\.json$")


def matches(rel_path: str, patterns: list[str]) -> bool:
    """fnmatch on the relative POSIX path, case-insensitively ('*.jpg' also matches 'A/B.JPG').

    A pattern without '/' is also tried against the file name alone, so '*-02*' skips
    'slides/x-02.png' and '*.png' matches at any depth.
    """
    lowered = rel_path.lower()
    name = lowered.rsplit("/", 1)[-1]
    for pattern in patterns:
        p = pattern.lower()
        if fnmatch.fnmatchcase(lowered, p) or ("/" not in p and fnmatch.fnmatchcase(name, p)):
            return True
    return False


def _is_run_folder(dirpath: bytes, filenames: list[bytes]) -> bool:
    """Whether a folder holds an explain-cli run's outputs (a run.json it wrote)."""
    for name in filenames:
        if _RUN_JSON.match(name):
            try:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    info = json.loads(fh.read(1 << 20))
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and "explain_cli" in info:
                return True
    return False


def _reason(exc: OSError) -> str:
    return f"cannot read: {exc.strerror or exc}" if exc.strerror else f"cannot read: {exc}"


def discover_images(root: Path, include: list[str], exclude: list[str],
                    skip_dirs: list[Path] | None = None,
                    problems: list[tuple[str, str]] | None = None,
                    skipped: dict[str, int] | None = None) -> list[str]:
    """Relative POSIX paths of the matching regular files under ``root``, sorted.

    Names are read as bytes and decoded as UTF-8 with surrogateescape (``names.from_fs``), so a
    file has the same name under every locale, valid UTF-8 or not. Follows directory symlinks
    but never enters the same real directory twice (no symlink loops). Folders in ``skip_dirs``
    (e.g. an output folder inside the input folder) are not walked, nor is any folder holding an
    explain-cli run.json (an earlier run's outputs: its overlays are not input; logged). Hidden
    files and folders (starting with '.') are skipped, and so is anything that is not a regular
    file (FIFOs, sockets, devices: reading them can block forever).

    A folder that cannot be listed or a matching file that cannot be stat'ed (permissions, a path
    longer than PATH_MAX) is not silently dropped: ``(relative path, reason)`` is appended to
    ``problems`` (the run makes it an errors.csv row), unless its path is excluded.

    ``skipped``, when given, receives how many files the patterns left out (by name, before any
    stat): ``excluded`` (matched include and exclude) and ``not_included`` (matched no include).
    """
    counts = {"excluded": 0, "not_included": 0}
    root_b = os.fsencode(Path(root))
    skip = {os.path.realpath(os.fsencode(p)) for p in (skip_dirs or [])}
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    issues: list[tuple[str, str]] = []

    def rel_of(path_b: bytes) -> str:
        return from_fs(os.path.relpath(path_b, root_b).replace(os.sep.encode(), b"/"))

    def folder_problem(path_b: bytes, exc: OSError) -> None:
        rel = rel_of(path_b)
        if not (matches(rel, exclude) or matches(rel + "/", exclude)):
            issues.append((rel, f"folder {_reason(exc)} (its images, if any, were not explained)"))

    def on_error(exc: OSError) -> None:
        folder_problem(os.fsencode(exc.filename) if exc.filename is not None else root_b, exc)

    for dirpath, dirnames, filenames in os.walk(root_b, onerror=on_error, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            dirnames[:] = []
            folder_problem(dirpath, exc)
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen or os.path.realpath(dirpath) in skip:
            dirnames[:] = []
            continue
        seen.add(key)
        if _is_run_folder(dirpath, filenames):
            dirnames[:] = []
            log.warning("skipping %s: it holds an explain-cli run's outputs (run.json), not input images",
                        from_fs(dirpath))
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        rel_dir = os.path.relpath(dirpath, root_b)
        for name in filenames:
            if name.startswith(b"."):
                continue
            rel_b = name if rel_dir == b"." else os.path.join(rel_dir, name)
            rel = from_fs(rel_b.replace(os.sep.encode(), b"/"))
            if not matches(rel, include):
                counts["not_included"] += 1
                continue
            if matches(rel, exclude):
                counts["excluded"] += 1
                continue
            try:
                if not stat.S_ISREG(os.stat(os.path.join(dirpath, name)).st_mode):
                    continue
            except FileNotFoundError:
                continue  # removed since the folder was listed (or a dangling symlink)
            except OSError as exc:
                issues.append((rel, _reason(exc)))
                continue
            found.append(rel)
    if problems is not None:
        problems.extend(sorted(issues))
    if skipped is not None:
        skipped.update(counts)
    return sorted(found)


def source_path(root: Path, rel: str) -> Path:
    """The file of image ``rel`` (a name from ``discover_images``) under ``root``."""
    return Path(root) / fs_name(rel)
