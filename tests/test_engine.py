"""The one engine (models/engine.py): one classifier decides, adapters and plain modules answer the
same protocol, and the LLC and the interaction basis drive both through it."""

import pytest
import torch
from torch import nn

from tl_degeneracy.models.adapter import ModelAdapter
from tl_degeneracy.models.engine import Engine, ModuleEngine, engine_for

from .interaction_models import HookedMLP, mlp_inputs


def test_engine_for_follows_model_kind(tiny_toy_transformer):
    adapter = engine_for(tiny_toy_transformer)
    assert isinstance(adapter, ModelAdapter) and isinstance(adapter, Engine)
    assert engine_for(adapter) is adapter
    for module in (nn.Linear(3, 2), HookedMLP([3, 4, 2])):
        engine = engine_for(module)
        assert isinstance(engine, ModuleEngine) and isinstance(engine, Engine) and engine.model is module
    with pytest.raises(TypeError, match="torch.nn.Module"):
        engine_for("gpt2")


def test_module_engine_perturbed_forward_is_the_model_at_the_shifted_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = ModuleEngine(model)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    live = engine.live_parameters()
    assert live.names == [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    deltas = {"0.weight": torch.randn(3, 4, 3, dtype=torch.float64, generator=g), "2.bias": torch.randn(3, 2, dtype=torch.float64, generator=g)}
    out = engine.perturbed_forward(deltas, x, chains=True)
    assert out.shape == (3, 5, 2)
    for c in range(3):
        shifted = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        shifted.load_state_dict(model.state_dict())
        with torch.no_grad():
            shifted[0].weight += deltas["0.weight"][c]
            shifted[2].bias += deltas["2.bias"][c]
        torch.testing.assert_close(out[c], shifted(x), rtol=0, atol=1e-12)
    # Unperturbed, and the model left as found (its parameters untouched, its training mode back).
    model.train()
    torch.testing.assert_close(engine.perturbed_forward({}, x), model(x), rtol=0, atol=0)
    assert model.training


def test_module_engine_lifts_inputs_without_a_position_axis():
    model = HookedMLP([3, 4, 2])
    engine = ModuleEngine(model)
    seen = []
    out = engine.run_with_hooks(mlp_inputs(6, 3), fwd_hooks=[("hook_h0", lambda act, hook: seen.append(act.shape))])
    assert seen == [torch.Size([6, 1, 4])] and out.shape == (6, 1, 2)
    # With a position axis nothing is lifted.
    x = mlp_inputs(12, 3).reshape(6, 2, 3)
    out = engine.run_with_hooks(x, fwd_hooks=[("hook_h0", lambda act, hook: seen.append(act.shape))])
    assert seen[-1] == torch.Size([6, 2, 4]) and out.shape == (6, 2, 2)
    with pytest.raises(TypeError, match="no hook points"):
        ModuleEngine(nn.Linear(3, 2)).run_with_hooks(torch.zeros(2, 3))


def test_interaction_basis_refuses_a_plain_module_without_hook_points():
    import tl_degeneracy as tld

    with pytest.raises(TypeError, match="HookedRootModule"):
        tld.interaction_basis(nn.Linear(3, 2), torch.zeros(4, 3))
