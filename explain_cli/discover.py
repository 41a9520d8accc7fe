"""Find the images to explain: a sorted recursive walk with include/exclude patterns."""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

from explain_cli.names import from_fs, fs_name


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


def discover_images(root: Path, include: list[str], exclude: list[str],
                    skip_dirs: list[Path] | None = None, skipped: dict[str, int] | None = None) -> list[str]:
    """Relative POSIX paths of the matching regular files under ``root``, sorted.

    Names are read as bytes and decoded as UTF-8 with surrogateescape (``names.from_fs``), so a
    file has the same name under every locale, valid UTF-8 or not. Follows directory symlinks
    but never enters the same real directory twice (no symlink loops). Folders in ``skip_dirs``
    (e.g. an output folder inside the input folder) are not walked. Hidden files and folders
    (starting with '.') are skipped, and so is anything that is not a regular file (FIFOs,
    sockets, devices: reading them can block forever). ``skipped``, when given, receives the
    counts of regular files left out: ``excluded`` (matched include and exclude) and
    ``not_included`` (matched no include pattern).
    """
    counts = {"excluded": 0, "not_included": 0}
    root_b = os.fsencode(Path(root))
    skip = {os.path.realpath(os.fsencode(p)) for p in (skip_dirs or [])}
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root_b, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen or os.path.realpath(dirpath) in skip:
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        rel_dir = os.path.relpath(dirpath, root_b)
        for name in filenames:
            if name.startswith(b"."):
                continue
            rel_b = name if rel_dir == b"." else os.path.join(rel_dir, name)
            rel = from_fs(rel_b.replace(os.sep.encode(), b"/"))
            try:
                if not stat.S_ISREG(os.stat(os.path.join(dirpath, name)).st_mode):
                    continue
            except OSError:
                continue
            if not matches(rel, include):
                counts["not_included"] += 1
            elif matches(rel, exclude):
                counts["excluded"] += 1
            else:
                found.append(rel)
    if skipped is not None:
        skipped.update(counts)
    return sorted(found)


def source_path(root: Path, rel: str) -> Path:
    """The file of image ``rel`` (a name from ``discover_images``) under ``root``."""
    return Path(root) / fs_name(rel)
