# %% [markdown]
# # explain-cli from a notebook
#
# Explain the demo photos interactively, look at them with `shap.image_plot`, change the class and
# the explainer, then run the same config as a batch job and load its values back.
#
# This file is a notebook in the percent format: open it in Jupyter (with jupytext) or VS Code and
# run it cell by cell, or run it whole: `.venv/bin/python examples/notebook.py` (figures are then
# saved to out/notebook/). tests/test_api.py runs it with EXAMPLE_FAST=1 (64 px, few samples).
# The API: docs/python-api.md.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import shap

import explain_cli

REPO = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd().parent
CONFIG = REPO / "configs" / "demo.yaml"
OUT = Path(os.environ.get("EXAMPLE_OUT", REPO / "out" / "notebook"))
FAST = bool(os.environ.get("EXAMPLE_FAST"))
# CPU, for the same numbers in the explanation and in the batch run below; EXAMPLE_FAST: smaller and fewer samples
SETTINGS = {"device": "cpu", "batch_size": 32, **({"preprocess": {"size": 64}} if FAST else {})}
NSAMPLES = 4 if FAST else 32
OUT.mkdir(parents=True, exist_ok=True)


def show(name: str) -> None:
    """In a notebook the figure is shown below the cell; as a script it is saved."""
    plt.savefig(OUT / name, bbox_inches="tight")
    if "__file__" in globals():
        plt.close("all")


# %% [markdown]
# ## Explain the demo photos
# The config's input (sample_images/, without astronaut-02.jpg), its top-2 classes, the gradient
# explainer at `blocks.3`. The first call loads the model; later calls reuse it.

# %%
expl = explain_cli.explain(CONFIG, explainer={"nsamples": NSAMPLES}, **SETTINGS)
print(expl.instance_names)            # the images, as named in a run's topk.csv
print(expl.output_names)              # (N, k) explained classes
print(expl.values.shape)              # (N, H, W, C, k): blocks.3's 28 x 28 x 40 map per class (8 x 8 at 64 px)
print(np.round(expl.stability, 2))    # how far to trust each map (docs/trust.md)
shap.image_plot(expl, show=False)
show("gradient.png")

# %% [markdown]
# ## Another class: "why Egyptian cat, and why tabby?"

# %%
cat = explain_cli.explain(CONFIG, ["chelsea.jpg"], explainer={"nsamples": NSAMPLES},
                          targets={"classes": ["Egyptian cat", "tabby"]}, **SETTINGS)
print(cat.output_names, cat.probability)
shap.image_plot(cat, show=False)
show("classes.png")

# %% [markdown]
# ## Another explainer: partition (Owen values on pixels, as shap.PartitionExplainer)

# %%
part = explain_cli.explain(CONFIG, ["chelsea.jpg"], explainer={"name": "partition", "max_evals": 32 if FAST else 500},
                           model={"layer": "input"}, **SETTINGS)
print(part.values.shape, part.additivity_error)
shap.image_plot(part, show=False)
show("partition.png")

# %% [markdown]
# ## The same config as a batch job, and its values loaded back
# `run` writes what `explain-cli run` writes (overlays, topk.csv, run.json, report.html) and
# returns the counts and the CLI's exit code; `output.save_values` keeps the maps for `load_run`.

# %%
result = explain_cli.run(CONFIG, explainer={"nsamples": NSAMPLES}, output={"dir": str(OUT / "run"), "save_values": True},
                         overwrite=True, **SETTINGS)
print(result)
assert result.ok, f"exit code {result.exit_code}: see {result.output_dir / 'errors.csv'}"
back = explain_cli.load_run(result.output_dir)
same = np.array_equal(back.values, expl.values)
print(f"loaded back {len(back.instance_names)} images from {result.output_dir}; the same values as explain(): {same}")
shap.image_plot(back[:1], show=False)
show("loaded.png")
