"""Find the images to explain: a sorted recursive walk with include/exclude patterns."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path


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
                    skip_dirs: list[Path] | None = None) -> list[str]:
    """Relative POSIX paths of the matching files under ``root``, sorted.

    Follows directory symlinks but never enters the same real directory twice (no symlink
    loops). Folders in ``skip_dirs`` (e.g. an output folder inside the input folder) are
    not walked. Hidden files and folders (starting with '.') are skipped.
    """
    root = Path(root)
    skip = {os.path.realpath(p) for p in (skip_dirs or [])}
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
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
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            rel = rel.replace(os.sep, "/")
            if not os.path.isfile(os.path.join(dirpath, name)):
                continue
            if matches(rel, include) and not matches(rel, exclude):
                found.append(rel)
    return sorted(found)
