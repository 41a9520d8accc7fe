"""The Sanity check section: what ``explain-cli check`` left in the run folder's ``check/``
(explain_cli/check.py, docs/trust.md): the verdict, the median Spearman per cascade step, and the
first image's map after each step (``check/maps/step-*.png``). '' when the folder has no
``check/check.csv`` (a check written elsewhere with ``--output`` is not looked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from explain_cli.report.outputs import _number, _read_csv
from explain_cli.report.summary import _e

CHECK_DIR = "check"
MEDIAN = "(median)"


def _fmt(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.3f}"


def _verdict(decision: dict[str, str] | None) -> tuple[str, str, str]:
    """(badge, tone, sentence) from the decisive median row of check.csv."""
    if decision is None:
        return "no verdict", "bad", ("check.csv has no decisive row (a check stopped before its decision step, "
                                     "or an older file): rerun explain-cli check")
    where = f"'{decision.get('layer', '')}' and every layer above it randomised"
    value, step, threshold = _fmt(decision.get("spearman")), decision.get("step", ""), decision.get("threshold", "")
    if decision.get("passed") == "true":
        return "passed", "", (f"The maps change when the model's weights are randomised: median Spearman {value} "
                              f"after step {step} ({where}); |r| below {threshold} passes.")
    return "FAILED", "bad", (f"The maps stay similar with {where}: median Spearman {value} after step {step}, "
                             f"|r| of {threshold} or more. They do not depend on the learned weights: do not read "
                             f"them as the model's reasons.")


def _steps_table(medians: list[dict[str, str]], decision: dict[str, str] | None) -> str:
    head = ("<tr><th>step</th><th>randomised (and every layer above)</th><th>median Spearman</th>"
            "<th>median Spearman, absolute maps</th></tr>")
    body = "".join(
        f"<tr><td>{'<b>' + _e(r.get('step')) + '</b> (verdict)' if r is decision else _e(r.get('step'))}</td>"
        f"<td class=\"file\">{_e(r.get('layer'))}</td><td>{_fmt(r.get('spearman'))}</td>"
        f"<td>{_fmt(r.get('spearman_abs'))}</td></tr>" for r in medians)
    return f'<table class="grid check">{head}{body}</table>'


def _maps_html(folder: Path, medians: list[dict[str, str]], image: str) -> str:
    """The first image's map after each step, as cards (those whose PNG exists)."""
    steps = [("0", "trained model")] + [(str(r.get("step", "")), f"step {r.get('step')}: {r.get('layer')}")
                                        for r in medians]
    cards = []
    for step, title in steps:
        if not step.isdigit() or not (folder / "maps" / f"step-{step}.png").is_file():
            continue
        url = f"{CHECK_DIR}/maps/step-{step}.png"
        cards.append(f'<div class="card"><div class="label">{_e(title)}</div>'
                     f'<a href="{url}" target="_blank" rel="noopener"><img src="{url}" alt="map of {_e(image)} '
                     f'after {_e(title)}"></a></div>')
    if not cards:
        return ""
    return (f'<h3>Map of <span class="file">{_e(image)}</span> down the cascade</h3>'
            '<p class="muted">Signed map summed over channels, red positive, blue negative, each on its own '
            "colour limit (the Spearman compares ranks).</p>"
            f'<div class="cards">{"".join(cards)}</div>')


def _check_html(output_dir: Path) -> str:
    """The Sanity check section ('' when ``output_dir/check/check.csv`` is absent or empty)."""
    folder = Path(output_dir) / CHECK_DIR
    if not (folder / "check.csv").is_file():
        return ""
    _, rows = _read_csv(folder / "check.csv")
    medians = [r for r in rows if r.get("image") == MEDIAN]
    if not medians:
        return ""
    decision = next((r for r in medians if r.get("passed")), None)
    images = list(dict.fromkeys(r.get("image", "") for r in rows if r.get("image") != MEDIAN))
    badge, tone, sentence = _verdict(decision)
    first = medians[0]
    about = (f"explain-cli check: the model's learned layers randomised from the top down, cumulatively, and "
             f"after each step the maps of {len(images):,} image(s) (explainer {first.get('explainer', '?')} at "
             f"layer {first.get('explained_layer', '?')}) compared with the trained model's by Spearman rank "
             "correlation (Adebayo et al. 2018). A map that explains the model must change.")
    links = " &middot; ".join(f'<a href="{CHECK_DIR}/{name}" target="_blank" rel="noopener">{name}</a>'
                              for name in ("check.html", "check.csv", "check.png") if (folder / name).is_file())
    badge_class = f"count {tone}" if tone else "badge"  # green, as the header's 'complete'; red otherwise
    return (f'<section id="check"><h2>Sanity check <span class="{badge_class}">{_e(badge)}</span></h2>'
            f'<p class="muted">{_e(about)} {links}</p><p>{_e(sentence)}</p>'
            f'{_steps_table(medians, decision)}{_maps_html(folder, medians, images[0] if images else "")}</section>')
