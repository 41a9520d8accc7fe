"""Regenerate every committed figure that shows a run, from today's code and configs, and stamp each
with a hash of the code that draws it.

    .venv/bin/python scripts/figures.py                 # all figures (about 1-2 minutes on 2 idle cores)
    .venv/bin/python scripts/figures.py report overlay  # some of them (names: overlay, report, slide)
    .venv/bin/python scripts/figures.py --check         # only compare the stamps with the code (what the test does)

Figures (README.md and docs/ show them):

- ``docs/demo-overlay.png`` (overlay): ``explain-cli run configs/demo.yaml --set output.format=png``,
  the overlay of ``chelsea.jpg``;
- ``docs/report.png`` (report): the demo run with ``metrics: [deletion, insertion]``, its
  ``report.html`` photographed by headless Chromium (``/usr/bin/chromium``, Debian's package) at
  1280 x 980;
- ``docs/slide-heatmap.png`` (slide): the slide demo (``python -m explain_cli.slides.synthetic ...
  --size 4096x3072 --plant 1000,1000,120``, then ``explain-cli run configs/slide.yaml``), its
  ``heatmap-Band_Aid.png``.

The runs write under ``out/figures/`` (gitignored). Each PNG gets a tEXt chunk ``explain-cli-figure``
with a JSON object: ``sha256`` (of the figure's source files below, path and bytes, in order),
``files`` (each file's own sha256, 12 hex digits, so a stale figure names the file that changed)
and ``command`` (how to regenerate it). ``tests/test_figures.py`` recomputes the hashes and fails,
naming the figure, the changed files and this command, when a committed figure is older than its
code. The sources are kept narrow on purpose: the modules that *draw* the figure, its config and
this script, not all of explain_cli (a change to an explainer's numbers does not make a picture
stale by this test; rerun the script after such a change anyway). A folder in ``sources`` stands
for every file under it (``__pycache__`` left out); a path that does not exist counts as absent,
so ``explain_cli/report.py`` and the ``explain_cli/report/`` package that replaces it are both
listed and the move itself changes the hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "explain-cli-figure"
SCRIPT = "scripts/figures.py"


@dataclass(frozen=True)
class Figure:
    name: str
    path: str
    sources: tuple[str, ...]
    what: str

    @property
    def command(self) -> str:
        return f".venv/bin/python {SCRIPT} {self.name}"


FIGURES = (
    Figure("overlay", "docs/demo-overlay.png",
           ("explain_cli/render.py", "explain_cli/overlay_scale.py", "configs/demo.yaml", SCRIPT),
           "the demo's overlay of chelsea.jpg (README, Quick start)"),
    Figure("report", "docs/report.png",
           ("explain_cli/report.py", "explain_cli/report", "explain_cli/render.py", "configs/demo.yaml", SCRIPT),
           "the demo's report.html with the faithfulness metrics (README, Outputs; docs/outputs.md)"),
    Figure("slide", "docs/slide-heatmap.png",
           ("explain_cli/slides/heatmap.py", "explain_cli/slides/synthetic.py", "configs/slide.yaml", SCRIPT),
           "the slide demo's heatmap (README, Slides)"),
)


def source_files(sources: tuple[str, ...], root: Path = REPO) -> list[str]:
    """The files a figure's sources stand for, repository-relative, in a fixed order."""
    files: list[str] = []
    for src in sources:
        p = root / src
        if p.is_dir():
            files.extend(sorted(q.relative_to(root).as_posix() for q in p.rglob("*")
                                if q.is_file() and "__pycache__" not in q.parts and q.suffix != ".pyc"))
        elif p.is_file():
            files.append(src)
    return files


def code_hash(figure: Figure, root: Path = REPO) -> tuple[str, dict[str, str]]:
    """(sha256 of the figure's source files, {file: its own sha256[:12]})."""
    total = hashlib.sha256()
    files: dict[str, str] = {}
    for rel in source_files(figure.sources, root):
        data = (root / rel).read_bytes()
        files[rel] = hashlib.sha256(data).hexdigest()[:12]
        total.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return total.hexdigest(), files


# ---- PNG tEXt chunks, read and written without re-encoding the image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    out, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        out.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
        if kind == b"IEND":
            break
    return out


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def read_stamp(path: Path) -> dict | None:
    """The figure's stamp (the JSON of its ``explain-cli-figure`` tEXt chunk), or None."""
    for kind, body in _chunks(path.read_bytes()):
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            if key.decode("latin-1") == KEY:
                return json.loads(text.decode("latin-1"))
    return None


def write_stamp(path: Path, stamp: dict) -> None:
    """Put ``stamp`` into the PNG's ``explain-cli-figure`` tEXt chunk (replacing an older one), before IEND."""
    text = json.dumps(stamp, sort_keys=True, ensure_ascii=True)
    chunks = [(k, b) for k, b in _chunks(path.read_bytes())
              if not (k == b"tEXt" and b.partition(b"\0")[0] == KEY.encode())]
    body = KEY.encode() + b"\0" + text.encode("latin-1")
    chunks.insert(len(chunks) - 1, (b"tEXt", body))
    path.write_bytes(PNG_SIGNATURE + b"".join(_chunk(k, b) for k, b in chunks))


def stamp_for(figure: Figure) -> dict:
    sha, files = code_hash(figure)
    return {"sha256": sha, "files": files, "command": figure.command, "figure": figure.path}


def stale(figure: Figure, root: Path = REPO) -> str | None:
    """Why the committed figure is older than its code (a sentence naming it and the command), or None."""
    path = root / figure.path
    if not path.exists():
        return f"{figure.path} is missing: regenerate it with `{figure.command}`"
    stamp = read_stamp(path)
    sha, files = code_hash(figure, root)
    if stamp is None:
        return f"{figure.path} has no '{KEY}' stamp (drawn before scripts/figures.py): regenerate it with `{figure.command}`"
    if stamp.get("sha256") == sha:
        return None
    old = stamp.get("files", {})
    changed = sorted(f for f in set(old) | set(files) if old.get(f) != files.get(f))
    return (f"{figure.path} is older than the code that draws it ({', '.join(changed) or 'the source list'} changed "
            f"since it was drawn): regenerate it with `{figure.command}` and commit it")


# ---- drawing

def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, **kw)


def _cli(*args: str) -> None:
    _run([sys.executable, "-m", "explain_cli", *args])


def draw_overlay(work: Path) -> Path:
    out = work / "demo-png"
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: the report's time card would count earlier runs
    _cli("run", "configs/demo.yaml", "--overwrite", "--no-progress", "--set", f"output.dir={out}",
         "--set", "output.format=png")
    return out / "overlays" / "chelsea.jpg.png"


def draw_report(work: Path) -> Path:
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        raise SystemExit("docs/report.png needs headless Chromium at /usr/bin/chromium (Debian: apt-get install chromium)")
    out = work / "demo"
    shutil.rmtree(out, ignore_errors=True)
    _cli("run", "configs/demo.yaml", "--overwrite", "--no-progress", "--set", f"output.dir={out}",
         "--set", "metrics=[deletion,insertion]")
    shot = work / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        _run([str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
              f"--user-data-dir={profile}", f"--window-size=1280,{os.environ.get('HEIGHT', '980')}",
              f"--screenshot={shot}", f"file://{out / 'report.html'}"], stderr=subprocess.DEVNULL)
    return shot


def draw_slide(work: Path) -> Path:
    slide_in, out = work / "slide-input", work / "slide"
    shutil.rmtree(slide_in, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    slide_in.mkdir(parents=True)
    _run([sys.executable, "-m", "explain_cli.slides.synthetic", str(slide_in / "demo-slide.tif"),
          "--size", "4096x3072", "--plant", "1000,1000,120"])
    _cli("run", "configs/slide.yaml", "--overwrite", "--no-progress", "--set", f"input.dir={slide_in}",
         "--set", f"output.dir={out}")
    found = sorted((out / "slides").glob("*/heatmap-*.png"))
    if len(found) != 1:
        raise SystemExit(f"expected one heatmap under {out / 'slides'}, found {[str(p) for p in found]}")
    return found[0]


def _uncommitted(files: list[str]) -> list[str]:
    """Those of ``files`` whose working-tree bytes differ from HEAD's (git status), or [] without git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *sorted(set(files))], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


DRAW = {"overlay": draw_overlay, "report": draw_report, "slide": draw_slide}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="figures: " + ", ".join(f"{f.name} ({f.path})" for f in FIGURES))
    ap.add_argument("names", nargs="*", help="figures to redraw (default: all)")
    ap.add_argument("--check", action="store_true", help="only report figures older than their code (exit 1)")
    args = ap.parse_args(argv)
    by_name = {f.name: f for f in FIGURES}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"unknown figure(s) {unknown}; names: {sorted(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else list(FIGURES)
    if args.check:
        problems = [p for p in (stale(f) for f in chosen) if p]
        for p in problems:
            print(p)
        if not problems:
            print(f"{len(chosen)} figure(s) up to date")
        return 1 if problems else 0
    dirty = _uncommitted([s for f in chosen for s in source_files(f.sources)])
    if dirty:
        print(f"warning: uncommitted changes in {', '.join(dirty)}: the stamps are of the working tree, so the "
              f"committed figures match the committed code only once these are committed as they are now", flush=True)
    work = REPO / "out" / "figures"
    work.mkdir(parents=True, exist_ok=True)
    for figure in chosen:
        t0 = time.monotonic()
        drawn = DRAW[figure.name](work)
        target = REPO / figure.path
        shutil.copyfile(drawn, target)
        write_stamp(target, stamp_for(figure))
        print(f"wrote {figure.path} ({time.monotonic() - t0:.1f} s, load average "
              f"{' '.join(f'{v:.1f}' for v in os.getloadavg())})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
