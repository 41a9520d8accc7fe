"""report.html's page files (explain_cli/report/page.css, page.js, page.html): shipped as package data,
inlined under the page's Content-Security-Policy, and page.js checked for syntax.

The JavaScript syntax check: ``node --check`` parses page.js when node is installed (it is on the
development machine, /usr/bin/node; CI's ``.ci/run`` does not install it). Without node the test does not
skip: it falls back to a Python-side check that brackets, braces and parentheses balance outside strings,
comments and regular-expression literals (it catches the usual slip of an edit, not every syntax error),
and tests/test_report_browser.py executes the script in headless Chromium, which ``.ci/run`` installs
(that test asserts the page finished rendering: ``document.body.dataset.ready``, set on the script's last
line). Failing outright without node would fail CI on machines where the rest of the suite passes, so
the fallback asserts instead of skipping.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from explain_cli.report import build_report

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ("page.css", "page.js", "page.html")


def asset(name: str) -> str:
    return resources.files("explain_cli.report").joinpath(name).read_bytes().decode("utf-8")


def unbalanced(js: str) -> str | None:
    """The first bracket problem in ``js`` outside strings, template literals, comments and regex
    literals ('' when balanced), as 'line N: ...'; a small lexer, not a parser."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[tuple[str, int]] = []
    i, line, prev = 0, 1, ""  # prev: the last significant character (a '/' after it starts a regex or divides)
    while i < len(js):
        ch = js[i]
        if ch == "\n":
            line += 1
        if js.startswith("//", i):
            i = js.find("\n", i) if "\n" in js[i:] else len(js)
            continue
        if js.startswith("/*", i):
            end = js.find("*/", i + 2)
            if end < 0:
                return f"line {line}: unterminated comment"
            line += js.count("\n", i, end)
            i = end + 2
            continue
        if ch in "'\"`" or (ch == "/" and (prev == "" or prev in "(,=:[!&|?{};+-*%<>~^" or
                                           re.search(r"\breturn\s*$", js[max(0, i - 10):i]))):
            quote, j, in_class = ch, i + 1, False
            while j < len(js) and (js[j] != quote or in_class):
                if js[j] == "\\":
                    j += 1
                elif quote == "/" and js[j] == "[":
                    in_class = True
                elif quote == "/" and js[j] == "]":
                    in_class = False
                elif js[j] == "\n" and quote != "`":
                    return f"line {line}: unterminated {'regex' if quote == '/' else 'string'}"
                j += 1
            if j >= len(js):
                return f"line {line}: unterminated literal"
            line += js.count("\n", i, j)
            i, prev = j + 1, "a"
            continue
        if ch in "([{":
            stack.append((ch, line))
        elif ch in ")]}":
            if not stack or stack[-1][0] != pairs[ch]:
                return f"line {line}: unexpected {ch!r}" + (f" (open {stack[-1][0]!r} from line {stack[-1][1]})"
                                                             if stack else "")
            stack.pop()
        if not ch.isspace():
            prev = ch if ch in "(,=:[!&|?{};+-*%<>~^)]}" else "a"
        i += 1
    return f"line {stack[-1][1]}: {stack[-1][0]!r} never closed" if stack else None


def test_page_js_is_valid_javascript(tmp_path):
    js = asset("page.js")
    assert unbalanced(js) is None, unbalanced(js)
    node = shutil.which("node")
    if node is None:  # see the module docstring: the browser test runs the script where Chromium is installed
        return
    path = tmp_path / "page.js"
    path.write_text(js, encoding="utf-8")
    done = subprocess.run([node, "--check", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"node --check page.js:\n{done.stderr}"


@pytest.mark.parametrize("broken", ["function f() { if (a) { return 1; }", "var x = [1, 2;", "f(a, b));",
                                    "var s = \"unterminated;\n"])
def test_the_fallback_check_finds_what_an_edit_breaks(broken):
    assert unbalanced(broken)


def test_the_fallback_check_reads_regexes_strings_and_comments():
    js = ("var r = /[(\\]]+$/.exec(s), t = \"({[\", u = '\\'}'; // ) unbalanced in a comment\n"
          "/* ( */ if (x) { y = a / b / c; return /\\(/.test(z); }\nvar w = `${a}(`;")
    assert unbalanced(js) is None


def test_page_files_are_package_data():
    """pyproject.toml ships every page file (a wheel without them writes no report)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = config["tool"]["setuptools"]["package-data"]["explain_cli.report"]
    on_disk = sorted(p.name for p in (ROOT / "explain_cli" / "report").iterdir() if p.suffix != ".py"
                     and p.is_file())
    assert sorted(shipped) == on_disk == sorted(ASSETS)


def test_the_page_inlines_the_files_under_its_csp(tmp_path):
    """The CSP's script hash is page.js's, the style is page.css, nothing else runs."""
    out = tmp_path / "out"
    out.mkdir()  # a folder with topk.csv only is a run output
    (out / "topk.csv").write_text("image,rank,class_index,class_name,probability\na.png,1,0,cat,0.9\n",
                                  encoding="utf-8")
    page = build_report(out)
    js, css = asset("page.js"), asset("page.css")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1)
    assert f"script-src &#x27;sha256-{digest}&#x27;" in csp
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert scripts == [js]
    assert f"<style>{css}</style>" in page
