"""``explain-cli check``: the model-randomisation sanity check (Adebayo et al., "Sanity Checks for
Saliency Maps", NeurIPS 2018) as a command.

A map that explains the model must change when the model's learned weights are destroyed. The
check explains N images of the input with the trained model, then randomises the model's weights
cascading from the top (the output layer first, then each block below it, cumulatively) and, after
each step, explains the same images for the same classes (each image's top class under the trained
model) and compares the maps with the trained model's by Spearman rank correlation (over the
positions of the map summed over channels, signed; the absolute-value variant is reported too).

The verdict is read after the head and the last block are randomised (cascade step 2): a median
signed Spearman of :data:`THRESHOLD` or more in absolute value there (a map that only flipped its
sign kept its structure: randomising the head alone often gives -0.99) means the map is mostly
decided by something the learned weights do not control (the input's edges, a fixed filter, the
explainer itself), and the command exits :data:`EXIT_CHECK_FAILED` naming the explainer and the
layer. The Spearman of the absolute maps is reported but does not decide: expected gradients and
other "gradient x (input - reference)" maps carry the input's contrast ``|x - b|`` in their
magnitude whatever the weights (Adebayo et al. show the same for gradient x input), so it stays
near 0.5 for a trained CNN whose signed map has decorrelated (0.55 vs -0.09 in the tests). Randomisation
re-initialises each module with its own ``reset_parameters`` (torch's default initialisation),
seeded; parameters of modules without one are redrawn from a normal distribution of their own
standard deviation. Buffers other than normalisation statistics are left alone: a fixed filter
stored as a buffer is not a learned weight, which is the point of the planted failure in the tests.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("explain_cli")

#: Exit code of a failed check (0-4 and the signal codes 129/130/138/143 are taken).
EXIT_CHECK_FAILED = 5
#: A map whose median signed Spearman with the trained model's map stays at or above this in absolute
#: value after the decision step fails (Adebayo et al.'s insensitive methods stay above 0.5).
THRESHOLD = 0.5
#: The cascade step the verdict is read at: 1 = the head randomised, 2 = the head and the last block.
DECISION_STEP = 2

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def cascade_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's learned parts, top (output) first: its children with parameters, containers
    (Sequential, ModuleList, ModuleDict) opened into their members, a normalisation layer grouped
    with the layer below it, so a ResNet's steps are ``fc``, ``layer4.1``, ``layer4.0``, ...,
    ``bn1+conv1`` and an EfficientNet's ``classifier``, ``bn2+conv_head``, ``blocks.6.0``, ...
    (registration order is taken as forward order)."""
    units: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, _CONTAINERS):
                walk(full, child)
            elif any(True for _ in child.parameters()):
                units.append((full, child))

    walk("", model)
    if not units and any(True for _ in model.parameters(recurse=False)):
        units.append(("(model)", model))
    merged: list[tuple[str, nn.Module]] = []
    held: list[tuple[str, nn.Module]] = []
    for name, unit in units[::-1]:
        if _is_norm(unit):  # randomised with the layer below it, whose output it normalises
            held.append((name, unit))
            continue
        group = held + [(name, unit)]
        merged.append(("+".join(n for n, _ in group), nn.ModuleList([u for _, u in group]) if held else unit))
        held = []
    if held:
        merged.append(("+".join(n for n, _ in held), nn.ModuleList([u for _, u in held])))
    return merged


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer (torch's and timm's BatchNormAct2d, LayerNorm2d, ...)."""
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) \
        or "Norm" in type(module).__name__


def randomise(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` (seeded): ``reset_parameters`` where a submodule
    has one, else a normal draw with the parameter's own standard deviation."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        done: set[int] = set()
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset) and any(True for _ in sub.parameters(recurse=False)):
                reset()
                done.update(id(p) for p in sub.parameters(recurse=False))
        with torch.no_grad():
            for p in module.parameters():
                if id(p) not in done:
                    std = float(p.float().std()) if p.numel() > 1 else 1.0
                    p.copy_(torch.randn_like(p) * (std if std > 0 else 1.0))
    finally:
        torch.random.set_rng_state(generator_state)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two maps (flattened, ties ranked by their mean); None when
    either is constant (a map of zeros ranks nothing)."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


@dataclass
class Step:
    """One step of the cascade: the unit randomised last, and the maps' similarity to the trained ones."""

    step: int
    layer: str
    spearman: list[float | None]
    spearman_abs: list[float | None]
    seconds: float

    @staticmethod
    def _median(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return float(np.median(kept)) if kept else None

    @property
    def median(self) -> float | None:
        return self._median(self.spearman)

    @property
    def median_abs(self) -> float | None:
        return self._median(self.spearman_abs)


@dataclass
class CheckResult:
    """The cascade, the verdict and where the outputs are."""

    explainer: str
    layer: str
    images: list[str]
    steps: list[Step] = field(default_factory=list)
    threshold: float = THRESHOLD
    decision_step: int = DECISION_STEP
    output_dir: Path | None = None

    @property
    def decision(self) -> Step | None:
        """The step the verdict is read at (the last one when the model has fewer units)."""
        if not self.steps:
            return None
        return self.steps[min(self.decision_step, len(self.steps)) - 1]

    @property
    def passed(self) -> bool:
        step = self.decision
        return step is not None and (step.median is None or abs(step.median) < self.threshold)

    def verdict(self) -> str:
        step = self.decision
        if step is None:
            return "check: the model has no parameters to randomise; nothing was checked"
        value = "undefined (constant maps)" if step.median is None else f"{step.median:.3f}"
        what = f"explainer {self.explainer} at layer {self.layer}"
        if self.passed:
            return (f"check passed: {what}: maps change when the model is randomised (median Spearman "
                    f"{value} after step {step.step}, '{step.layer}' and above randomised; threshold {self.threshold})")
        return (f"check FAILED: {what}: maps stay similar with '{step.layer}' and every layer above it randomised "
                f"(median Spearman {value}, |r| >= {self.threshold} after step {step.step}): they do not depend on "
                f"the learned weights, do not read them as the model's reasons")


def _maps(explainer: Any, batch: torch.Tensor, targets: Any, seeds: list[int]) -> np.ndarray:
    """(N, H, W) maps summed over channels, for one class per image."""
    from explain_cli.pipeline import explain_with_backoff

    attribution = explain_with_backoff(explainer, batch, targets, seeds)
    values = np.asarray(attribution.values, dtype=np.float64)  # (N, k, C, H, W)
    return values[:, 0].sum(1)


def run_check(cfg: Any, images: int = 8, output_dir: Path | None = None, device: str | None = None,
              steps: int | None = None) -> CheckResult:
    """Run the cascade on the first ``images`` images of the config's input; write ``check.csv``
    (one row per step and image), ``check.png`` (the first image's map down the cascade),
    ``maps/step-*.png`` (the same maps one small PNG each, for report.html) and
    ``check.html`` (both on one offline page) to
    ``output_dir`` (default: ``output.dir``/check). ``steps`` stops the cascade early (at least
    the decision step is always run). With the default folder, a run's report.html beside it is
    rewritten with its Sanity check section."""
    from explain_cli import pipeline
    from explain_cli.errors import ConfigError
    from explain_cli.explainers import _precision
    from explain_cli.models import resolve_layer
    from explain_cli.stages import decode_one
    from explain_cli.targets import LABEL

    name = cfg.explainer_settings.name
    if name == "amortized":
        raise ConfigError("explainer.name", "the amortized explainer is trained for one model's weights and refuses "
                                            "a randomised model; check the explainer it was trained against "
                                            "(kernel with the same segments and fill) instead", cfg._source)
    prep = pipeline.prepare(cfg, pipeline.RunOptions(limit=images, progress=False), device=device)
    good = []
    for rel in prep.images:
        try:
            good.append(decode_one(prep.source, rel, cfg.preprocess))
        except Exception as exc:  # noqa: BLE001 - an unreadable image is skipped, as a run would
            log.warning("check: skipping %s (%s)", rel, exc)
    if not good:
        from explain_cli.errors import UserError

        raise UserError("check: no readable image in the input")
    batch = torch.from_numpy(np.stack([t for _, _, t in good])).to(prep.device)
    rels = [rel for rel, _, _ in good]
    seeds = [pipeline.image_seed(cfg.seed, rel) for rel in rels]
    background = pipeline.load_background(prep) if prep.explainer_class.uses_background \
        else pipeline.empty_background(prep)

    trained = _precision.unwrap(prep.model)
    with torch.no_grad():
        raw = _precision.with_precision(trained, cfg.precision, prep.device)(batch).float()
    top = prep.targets.outputs(raw).argmax(1).tolist()
    targets = dataclasses.replace(prep.targets, entries=(LABEL,)).for_batch([(int(c),) for c in top])

    def explain_with(model: nn.Module) -> np.ndarray:
        layer = resolve_layer(model, cfg.model.layer)
        explainer = pipeline.make_explainer(dataclasses.replace(prep, model=model, layer=layer), background)
        return _maps(explainer, batch, targets, seeds)

    t0 = time.monotonic()
    reference = explain_with(trained)
    result = CheckResult(explainer=name, layer=cfg.model.layer, images=rels)
    log.info("check: %d images, trained model explained in %.1f s", len(rels), time.monotonic() - t0)
    model = copy.deepcopy(trained)
    units = cascade_units(model)
    limit = len(units) if steps is None else min(len(units), max(steps, DECISION_STEP))
    gallery = [reference[0]]
    for i, (unit_name, unit) in enumerate(units[:limit], start=1):
        t0 = time.monotonic()
        randomise(unit, cfg.seed * 1_000 + i)
        maps = explain_with(model)
        gallery.append(maps[0])
        step = Step(i, unit_name, [spearman(a, b) for a, b in zip(reference, maps)],
                    [spearman(np.abs(a), np.abs(b)) for a, b in zip(reference, maps)], time.monotonic() - t0)
        result.steps.append(step)
        log.info("check: step %d/%d: %s randomised: median Spearman %s (abs %s), %.1f s", i, limit, unit_name,
                 _fmt(step.median), _fmt(step.median_abs), step.seconds)
    out = Path(output_dir) if output_dir is not None else cfg.resolve(cfg.output.dir) / "check"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / "check.csv")
    _figure(gallery, ["trained"] + [f"{s.step}: {s.layer}" for s in result.steps], out / "check.png", rels[0])
    write_map_pngs(gallery, out / MAPS_DIR)
    result.output_dir = out
    write_html(result, out / "check.html", out / "check.png")
    if output_dir is None and (out.parent / "report.html").exists():  # the run's report gains its Sanity check section
        from explain_cli.report import write_report_or_warn

        write_report_or_warn(out.parent)
    return result


#: The folder (in the check's output) of the first image's map after each step: ``step-0.png`` (the trained
#: model), ``step-1.png``, ...; report.html's Sanity check section shows them.
MAPS_DIR = "maps"
#: The longest side of those PNGs in pixels (a map is scaled up by whole pixels, or down, to about this).
MAP_PNG_SIZE = 128


def write_map_pngs(maps: list[np.ndarray], folder: Path) -> None:
    """Each map as a small PNG, red positive, blue negative, white 0, on its own symmetric colour
    limit (the Spearman compares ranks, not sizes); older ``step-*.png`` files are removed first."""
    from matplotlib import colormaps
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("step-*.png"):
        old.unlink()
    colours = colormaps["bwr"]
    for i, grid in enumerate(maps):
        grid = np.asarray(grid, dtype=np.float64)
        limit = float(np.abs(grid).max()) or 1.0
        rgb = (colours((grid / limit + 1) / 2)[..., :3] * 255).round().astype(np.uint8)
        picture = Image.fromarray(rgb)
        scale = MAP_PNG_SIZE / max(grid.shape)
        if scale >= 2:
            picture = picture.resize((grid.shape[1] * int(scale), grid.shape[0] * int(scale)), Image.NEAREST)
        elif scale < 1:
            picture = picture.resize((max(1, round(grid.shape[1] * scale)), max(1, round(grid.shape[0] * scale))),
                                     Image.BOX)
        picture.save(folder / f"step-{i}.png", optimize=True)


def write_html(result: CheckResult, path: Path, figure: Path) -> None:
    """One offline page: the verdict, the median per step and the first image's maps down the cascade."""
    import base64
    import html

    rows = "".join(
        f"<tr{' class=decision' if result.decision is s else ''}><td>{s.step}</td><td>{html.escape(s.layer)}</td>"
        f"<td>{_fmt(s.median)}</td><td>{_fmt(s.median_abs)}</td><td>{s.seconds:.1f}</td></tr>" for s in result.steps)
    image = base64.b64encode(figure.read_bytes()).decode("ascii")
    colour = "#1a7f37" if result.passed else "#cf222e"
    path.write_text(
        "<!doctype html><meta charset=utf-8><title>explain-cli check</title>"
        "<style>body{font:14px sans-serif;margin:2em}td,th{padding:2px 10px;text-align:right}"
        "tr.decision{font-weight:bold}</style>"
        f"<h1>Model-randomisation check</h1><p style='color:{colour}'>{html.escape(result.verdict())}</p>"
        f"<p>{len(result.images)} images; Spearman of each step's maps with the trained model's maps (median over "
        f"images; the verdict at step {result.decision_step}, threshold |r| &lt; {result.threshold}).</p>"
        "<table><tr><th>step</th><th>randomised (and everything above)</th><th>Spearman</th><th>abs maps</th>"
        f"<th>s</th></tr>{rows}</table><p><img src='data:image/png;base64,{image}' alt='maps down the cascade'></p>")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_csv(result: CheckResult, path: Path) -> None:
    """One row per cascade step and image, and one ``(median)`` row per step with the verdict's numbers."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "layer", "image", "spearman", "spearman_abs", "explainer", "explained_layer",
                    "threshold", "decision_step", "passed"])
        for s in result.steps:
            decides = result.decision is s
            for rel, a, b in zip(result.images, s.spearman, s.spearman_abs):
                w.writerow([s.step, s.layer, rel, _csv(a), _csv(b), result.explainer, result.layer, "", "", ""])
            w.writerow([s.step, s.layer, "(median)", _csv(s.median), _csv(s.median_abs), result.explainer,
                        result.layer, result.threshold, result.decision_step,
                        str(result.passed).lower() if decides else ""])


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _figure(maps: list[np.ndarray], titles: list[str], path: Path, image: str) -> None:
    """The first image's map (summed over channels) after each cascade step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(maps)
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, grid, title in zip(axes.ravel(), maps, titles):
        limit = float(np.abs(grid).max()) or 1.0
        ax.imshow(grid, cmap="bwr", vmin=-limit, vmax=limit)
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{image}: map down the randomisation cascade", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
