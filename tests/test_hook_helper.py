"""The explainers' one forward pre-hook helper (explainers/_utils.layer_input_hook: the hook is removed
whatever the body raised) and the guard on torch's private ``torch._C._nn`` (deep/dispatch.private_nn:
a missing or changed module is a clear error naming the installed torch, not rules silently dropped)."""

from __future__ import annotations

import re
import types

import pytest
import torch
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.errors import UserError
from explain_cli.explainers._utils import capture_layer_input, layer_input_hook, replace_layer_input
from explain_cli.explainers.deep import dispatch


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_capture_and_replace_record_the_layers_input():
    net, x = model(), torch.randn(5, 3)
    with capture_layer_input(net[2]) as seen:
        out = net(x)
    assert torch.equal(seen.value, net[1](net[0](x)))
    with capture_layer_input(net[2], make_leaf=True) as leaf:
        out = net(x)
    assert leaf.value.is_leaf and leaf.value.requires_grad and out.requires_grad
    with replace_layer_input(net[2], torch.zeros_like) as replaced:
        out = net(x)
    assert torch.equal(replaced.value, torch.zeros(5, 4)) and torch.allclose(out, net[2].bias.expand(5, 2))
    assert not net[2]._forward_pre_hooks  # every helper removed its hook


@pytest.mark.parametrize("enter", [lambda layer: capture_layer_input(layer, make_leaf=True),
                                   lambda layer: replace_layer_input(layer, torch.neg),
                                   lambda layer: layer_input_hook(layer, lambda h: h)])
def test_the_hook_is_removed_when_the_body_raises(enter):
    net = model()
    with pytest.raises(RuntimeError, match="inside"):
        with enter(net[2]):
            net(torch.randn(2, 3))
            raise RuntimeError("inside")
    assert not net[2]._forward_pre_hooks


def test_private_torch_api_missing_names_the_installed_torch(monkeypatch):
    assert dispatch.private_nn() is torch._C._nn  # present in the installed (supported) torch
    monkeypatch.delattr(torch._C, "_nn")
    with pytest.raises(UserError, match=re.escape(f"torch {torch.__version__} has no torch._C._nn")) as info:
        dispatch.build_rules()
    assert "explain_cli/explainers/deep/dispatch.py" in str(info.value) and "torch<=" in str(info.value)


def test_private_torch_api_changed_names_what_is_missing(monkeypatch):
    changed = types.SimpleNamespace(**{n: getattr(torch._C._nn, n) for n in dispatch.PRIVATE_NN if n != "gelu"})
    monkeypatch.setattr(torch._C, "_nn", changed)
    with pytest.raises(UserError, match=re.escape(f"torch {torch.__version__} has a torch._C._nn without gelu")):
        dispatch.build_rules()


def test_a_deep_run_on_a_changed_private_api_exits_2_saying_why(tiny_project, monkeypatch):
    """(torch._C._nn itself stays: the model's own layers call it.)"""
    monkeypatch.setattr(dispatch, "PRIVATE_NN", dispatch.PRIVATE_NN + ("gone_in_this_torch",))
    result = CliRunner().invoke(app, ["run", str(tiny_project / "config.yaml"), "--no-progress",
                                      "--set", "explainer.name=deep"])
    assert result.exit_code == 2, result.output
    assert f"torch {torch.__version__} has a torch._C._nn without gone_in_this_torch" in " ".join(result.output.split())
