"""docs/explainers.md, "Adding an explainer": the example there, registered and run end to end."""

from __future__ import annotations

import csv
import textwrap

import pytest
from typer.testing import CliRunner

from explain_cli import explainers
from explain_cli.cli import app

#: The docs' example, word for word (tests/test_adding_an_explainer.py keeps the two in step).
EXAMPLE = textwrap.dedent('''
    """Gradient x (input - mean background): exact SHAP for a linear model, one backward per class."""
    import numpy as np
    import torch

    from explain_cli.explainers import _utils, base
    from explain_cli.targets import as_targets


    class Settings(base.ExplainerSettings):
        name: str = "gradxinput"


    class Explainer(base.Explainer):
        name = "gradxinput"
        input_only = True  # explains pixels only: prepare refuses a layer

        def explain(self, images, targets, seeds):
            ctx, targets = self.context, as_targets(targets)
            reference = ctx.background.mean(0, keepdim=True)
            x = images.detach().requires_grad_(True)
            raw = ctx.model(x)
            selection = targets.select(raw.detach())
            classes = selection.classes.to(x.device)
            explained = targets.explained(raw, classes)  # (N, k): what the values sum to
            maps = [torch.autograd.grad(explained[:, r].sum(), x, retain_graph=True)[0] * (x - reference)
                    for r in range(classes.shape[1])]
            values = torch.stack(maps, 1).detach().float().cpu().numpy()
            with torch.no_grad():
                base_values = targets.explained(ctx.model(reference.expand_as(x)), classes)
            _utils.count_evaluations(2 * len(images))  # the progress heartbeat
            return base.Attribution(values=values, **selection.attribution_fields(),
                                    outputs=explained.detach().double().cpu().numpy(),
                                    base_values=base_values.double().cpu().numpy(),
                                    shap_sum=values.reshape(*values.shape[:2], -1).sum(2))
''')


def test_the_docs_example_explainer_runs_end_to_end(tiny_project, monkeypatch):
    (tiny_project / "gradxinput.py").write_text(EXAMPLE)
    monkeypatch.syspath_prepend(str(tiny_project))
    monkeypatch.setitem(explainers._MODULES, "gradxinput", "gradxinput")
    from conftest import REPO

    assert EXAMPLE.strip() in (REPO / "docs" / "explainers.md").read_text(), "docs/explainers.md's example changed"
    result = CliRunner().invoke(app, ["run", str(tiny_project / "config.yaml"), "--no-progress",
                                      "--explainer", "gradxinput", "--output", str(tiny_project / "gx")])
    assert result.exit_code == 0, result.output
    with open(tiny_project / "gx" / "topk.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["explained"] for r in rows} == {"logit"}
    assert all(float(r["output"]) != float(r["base_value"]) for r in rows)
    assert (tiny_project / "gx" / "overlays" / "three.bmp.svg").exists()
    refused = CliRunner().invoke(app, ["validate", str(tiny_project / "config.yaml"), "--explainer", "gradxinput",
                                       "--set", "model.layer=0"])
    assert refused.exit_code == 2 and "model.layer" in refused.output
