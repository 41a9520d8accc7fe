"""Image names: how a file name of any bytes is held, written to CSV/JSON and turned into an
overlay name.

Inside explain-cli an image is its path relative to ``input.dir``, POSIX separators, decoded
from the file system's bytes as UTF-8 with ``surrogateescape`` whatever the locale: a name that
is not valid UTF-8 (``caf\\xe9.jpg`` from a Latin-1 machine) keeps each undecodable byte as a
lone surrogate, so the same file has the same name under ``LANG=C`` and ``LANG=en_US.UTF-8`` and
resume never duplicates it. ``fs_name`` turns such a name back into the exact bytes (as the
``str`` this process's ``os`` functions expect).

Text files (CSV, JSON) cannot hold lone surrogates, so ``escape`` writes each one as a backslash
escape: ``\\xHH`` for an undecodable byte, ``\\uHHHH`` for any other lone surrogate (a class name
read from JSON ``"\\ud800"``). Every valid UTF-8 name is written unchanged, except that a run of
backslashes directly before such an escape-looking text is doubled, so ``unescape`` is the exact
inverse for every string.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path, PurePosixPath

_SURROGATE = re.compile("[\ud800-\udfff]")
# On the escaped side: a run of backslashes followed by x + 2 hex digits or u + 4 hex digits.
_ESCAPE_LIKE = re.compile(r"(\\+)(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")
# On the plain side: a run of literal backslashes followed by escape-looking text or a surrogate.
_PLAIN_RUN = re.compile("(\\\\*)(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[\ud800-\udfff])")

#: Longest file name (bytes) most file systems accept.
NAME_MAX = 255
_HASH_CHARS = 12


def from_fs(name: bytes | str) -> str:
    """A file system name (bytes, or a str decoded by this process's locale) as explain-cli's
    locale-independent name: UTF-8 with surrogateescape."""
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    return raw.decode("utf-8", "surrogateescape")


def fs_name(name: str) -> str:
    """The inverse of ``from_fs``: the str whose ``os.fsencode`` is the file's exact bytes."""
    return os.fsdecode(name.encode("utf-8", "surrogateescape"))


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` as valid Unicode for CSV/JSON: lone surrogates become ``\\xHH``/``\\uHHHH``."""
    if "\\" not in text and not _SURROGATE.search(text):
        return text

    def one(m: re.Match) -> str:
        run, tail = m.group(1), m.group(2)
        if _SURROGATE.fullmatch(tail):
            return run * 2 + _escape_char(tail)
        return run * 2 + tail if run else tail

    return _PLAIN_RUN.sub(one, text)


def unescape(text: str) -> str:
    """The exact inverse of ``escape``."""
    if "\\" not in text:
        return text

    def one(m: re.Match) -> str:
        run, tail = m.group(1), m.group(2)
        literal = "\\" * (len(run) // 2)
        if len(run) % 2 == 0:
            return literal + tail
        value = int(tail[1:], 16)
        return literal + (chr(0xDC00 + value) if tail[0] == "x" else chr(value))

    return _ESCAPE_LIKE.sub(one, text)


def _digest(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_CHARS]


def _fit(file_name: str, rel: str, reserve: int) -> str:
    """``file_name`` cut (at a UTF-8 character boundary) and tagged with a hash of ``rel`` when
    it plus ``reserve`` bytes of suffix would exceed NAME_MAX."""
    raw = file_name.encode("utf-8", "surrogateescape")
    if len(raw) + reserve <= NAME_MAX:
        return file_name
    keep = NAME_MAX - reserve - _HASH_CHARS - 1
    while keep > 0 and raw[keep] & 0xC0 == 0x80:
        keep -= 1
    return f"{raw[:keep].decode('utf-8', 'surrogateescape')}~{_digest(rel)}"


def output_stem(rel: str, case_insensitive: bool = False, reserve: int = 8) -> str:
    """The overlay/values name of image ``rel`` without the format suffix: the whole relative
    path, extension included (``a/x.png`` -> ``a/x.png``, written ``a/x.png.svg``).

    It depends on ``rel`` alone, so adding files never renames an existing image's outputs, and
    distinct images never share one: on a case-sensitive output folder the relative path is
    unique; on a case-insensitive one a name holding upper-case letters also gets a hash of its
    exact spelling (``X.PNG~3f2a...``), so ``x.png`` and ``X.PNG`` stay apart. A file name that
    would exceed 255 bytes with the suffix is cut and tagged with the same hash. Returned in
    explain-cli's name form (see ``fs_name``).
    """
    parts = list(PurePosixPath(rel).parts)
    last = parts[-1]
    if case_insensitive and rel != rel.casefold():
        last = f"{last}~{_digest(rel)}"
    parts[-1] = _fit(last, rel, reserve)
    return "/".join(parts)


def output_names(images: list[str], case_insensitive: bool = False) -> dict[str, str]:
    """Image -> output stem in this process's file system form (append ``.svg``/``.png``/``.npz``)."""
    return {rel: fs_name(output_stem(rel, case_insensitive)) for rel in images}


def legacy_output_names(images: list[str]) -> dict[str, str]:
    """The stems explain-cli <= 0.1 used: the extension dropped unless another image of the
    same folder had the same stem (case-insensitively). Only for migrating old output folders:
    it is neither injective (x.png + x.png.jpg) nor stable (adding x.jpg renamed x.png's)."""
    stems: dict[str, list[str]] = {}
    for rel in images:
        stems.setdefault(str(PurePosixPath(rel).with_suffix("")).lower(), []).append(rel)
    names = {}
    for group in stems.values():
        for rel in group:
            names[rel] = rel if len(group) > 1 else str(PurePosixPath(rel).with_suffix(""))
    return names


def is_case_insensitive(folder: Path) -> bool:
    """Whether ``folder`` (which must exist) folds case: probed with a mixed-case temp file."""
    fd, probe = tempfile.mkstemp(prefix=".explain-cli-CaseProbe-", dir=folder)
    os.close(fd)
    try:
        head, tail = os.path.split(probe)
        return os.path.exists(os.path.join(head, tail.swapcase()))
    finally:
        os.unlink(probe)


def migrate_legacy_outputs(out_dir: Path, images: list[str], done_images: set[str],
                           new_stems: dict[str, str], suffixes: list[tuple[str, str]]) -> int:
    """Rename the outputs of an old run (``x.svg``) to today's names (``x.png.svg``) for images
    its topk.csv lists, so resuming an old folder does not redo them. Old names that two images
    shared (the old scheme's collisions) are left alone: those images are redone. Returns how
    many files were renamed."""
    legacy = legacy_output_names(images)
    owners: dict[str, int] = {}
    for stem in legacy.values():
        owners[stem.lower()] = owners.get(stem.lower(), 0) + 1
    moved = 0
    for rel in images:
        old = legacy[rel]
        if rel not in done_images or owners[old.lower()] > 1 or fs_name(old) == new_stems[rel]:
            continue
        for folder, suffix in suffixes:
            src = out_dir / folder / f"{fs_name(old)}.{suffix}"
            dst = out_dir / folder / f"{new_stems[rel]}.{suffix}"
            if src.is_file() and not dst.exists():
                try:
                    os.replace(src, dst)
                    moved += 1
                except OSError:
                    pass
    return moved
