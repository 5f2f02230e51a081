"""Every public analysis leaves the model as it found it (issue 14, item 7).

After each analysis, on every backend available in this environment (TransformerBridge default and
compatibility mode, HookedTransformer on TransformerLens 3.x, a bundled toy), the model must
``copy.deepcopy`` and its state must be what it was: parameters, buffers, training flags, and every
tensor attribute of every module (caches a forward writes, such as the Hugging Face attention's
``_pattern`` under a TransformerLens 4.x bridge), compared by value; no attribute may hold a tensor
with an autograd graph (``grad_fn``) or a tensor that escaped ``vmap``. Models and data are tiny and
the LLC runs a few steps at a given step size, so the file stays well under a minute per env. The
mechanism itself (``models.adapter.forward_scope``) is tested on a module that writes such caches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

import tl_degeneracy as tld

from .fixtures.hf import BACKENDS, open_model
from .fixtures.toys import make_tiny_toy_transformer

pytestmark = pytest.mark.usefixtures("single_thread")

#: vars() entries of nn.Module's own bookkeeping (parameters and buffers are read through them).
_OWN = ("_parameters", "_buffers", "_modules")


def _tensors_in(value, where: str, depth: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Tensors held by an attribute value, also inside lists, tuples and dicts (three levels)."""
    if isinstance(value, Tensor):
        yield where, value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, f"{where}[{i}]", depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(v, f"{where}[{k!r}]", depth + 1)


def _value(t: Tensor) -> tuple:
    """A tensor's value as (dtype, shape, bytes) on the CPU; a tensor that escaped ``vmap`` has none."""
    if torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_gradtrackingtensor(t):
        return ("escaped a torch.func transform", type(t).__name__)
    t = t.detach()
    return (t.dtype, tuple(t.shape), t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(model: torch.nn.Module) -> dict[str, object]:
    """Everything the model holds, by value: parameters, buffers, training flags and every tensor
    attribute of every module (under every path that reaches it)."""
    out: dict[str, object] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        out[f"{path}:training"] = module.training
        for kind in ("_parameters", "_buffers"):
            for name, t in vars(module)[kind].items():
                out[f"{path}.{name}"] = None if t is None else _value(t)
        for key, value in vars(module).items():
            if key in _OWN:
                continue
            for where, t in _tensors_in(value, f"{path}.{key}"):
                out[where] = _value(t)
    return out


def graphs_held(model: torch.nn.Module) -> list[str]:
    """Module attributes holding a tensor with an autograd graph (it would keep the graph alive)."""
    found = []
    for path, module in model.named_modules(remove_duplicate=False):
        for key, value in vars(module).items():
            if key not in _OWN:
                found += [where for where, t in _tensors_in(value, f"{path}.{key}") if t.grad_fn is not None]
    return found


def _llc(model, tokens, vmap: bool):
    adapter = tld.adapt(model)
    if not vmap:
        adapter._chain_map.vmap_works = False  # the chain-by-chain fallback
    res = tld.behavioral_llc(adapter, tokens, chains=2, draws=3, burnin=1, step_size=1e-6)
    assert adapter._chain_map.vmap_works is vmap
    return res


def _interaction_and_modules(model, tokens):
    ib = tld.interaction_basis(model, tokens, nodes=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"],
                               n_probes=2, progress=False)
    return tld.find_modules(ib)


#: name → analysis(model, tokens); each as cheap as it can be made.
ANALYSES: dict[str, Callable] = {
    "activation_stats": lambda m, x: tld.activation_stats(m, x, hooks=["resid_pre", "v"], progress=False),
    "jacobian_stats": lambda m, x: tld.jacobian_stats(m, x, hooks=["resid_post"], n_probes=2, progress=False),
    "ov_invariants": lambda m, x: tld.ov_invariants(m),
    "qk_invariants": lambda m, x: tld.qk_invariants(m),
    "head_synchronization": lambda m, x: tld.head_synchronization(m, x),
    "neuron_synchronization": lambda m, x: tld.neuron_synchronization(m, x),
    "degeneracy_counts": lambda m, x: tld.degeneracy_counts(m, x, n_probes=2),
    "interaction_basis+find_modules": _interaction_and_modules,
    "sparsify": lambda m, x: tld.sparsify(m, x),
    "behavioral_llc (vmap)": lambda m, x: _llc(m, x, vmap=True),
    "behavioral_llc (chain loop)": lambda m, x: _llc(m, x, vmap=False),
}


@pytest.fixture(scope="module")
def models(hf_dirs):
    """backend → (model, tokens), each built once for this file."""
    cache: dict[str, tuple] = {}

    def get(backend: str):
        if backend not in cache:
            if backend == "toy":
                model, vocab = make_tiny_toy_transformer(), 20
            else:
                model, vocab = open_model(hf_dirs["gpt2"], backend), 100
            tokens = torch.randint(3, vocab, (3, 8), generator=torch.Generator().manual_seed(0))
            cache[backend] = model, tokens
        return cache[backend]

    return get


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a 4-step LLC is not converged, and says so
@pytest.mark.parametrize("analysis", list(ANALYSES))
@pytest.mark.parametrize("backend", [*BACKENDS, "toy"])
def test_analysis_leaves_the_model_as_it_found_it(models, backend, analysis):
    model, tokens = models(backend)  # HookedTransformer skips itself on TransformerLens 4
    before = fingerprint(model)
    ANALYSES[analysis](model, tokens)
    assert graphs_held(model) == []
    after = fingerprint(model)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, "absent") != after.get(k, "absent"))
    assert changed == [], f"{analysis} changed {changed[:8]}"
    copy.deepcopy(model)  # fails on a tensor that escaped vmap


class _Caching(torch.nn.Module):
    """A forward that writes caches the way Hugging Face attention does, and can fail midway."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.last = None  # set to a tensor by the forward (the ``_pattern`` case)
        self.kept = torch.zeros(2)  # rebound by the forward

    def forward(self, x, fail: bool = False):
        y = self.lin(x)
        self.last, self.kept, self.added = y, y.sum(0), y
        if fail:
            raise RuntimeError("failed after writing its caches")
        return y


def test_forward_scope_restores_rebound_added_and_none_attributes_also_on_error():
    from tl_degeneracy.models.adapter import forward_scope

    model = _Caching().train()
    kept = model.kept
    x = torch.randn(3, 2, requires_grad=True)
    with forward_scope(model):
        assert not model.training and not model.lin.training
        out = model(x)
        with forward_scope(model):  # nested on the same model: nothing of its own to restore
            model(x)
        assert model.added is not None  # restored only when the outermost scope ends
    assert model.training and model.lin.training
    assert model.last is None and model.kept is kept and "added" not in vars(model)
    assert out.grad_fn is not None  # the caller's output and graph are untouched
    with pytest.raises(RuntimeError, match="after writing"):
        with forward_scope(model):
            model(x, fail=True)
    assert model.last is None and model.kept is kept and "added" not in vars(model) and model.training


@pytest.mark.parametrize("backend", [*BACKENDS, "toy"])
def test_a_copy_shares_nothing_with_the_original(models, backend):
    """``copy_model`` (the copies random_gauge, canonicalize_heads and sparsify return): running the
    copy leaves the original as it was, gives the same outputs, and fires the hooks added to the
    copy's own hook points. A plain deepcopy of a TransformerLens 4 bridge fails both: its blocks'
    capture hooks still write into the original's attention and run the original's hook_mlp_in."""
    from tl_degeneracy.models.copying import copy_model

    model, tokens = models(backend)
    twin = copy_model(model)
    name = next(n for n, _ in twin.named_modules() if n.endswith("hook_mlp_in") or n.endswith("hook_resid_mid"))
    if hasattr(twin, "set_use_hook_mlp_in"):
        twin.set_use_hook_mlp_in(True)
    before, fired = fingerprint(model), []
    with torch.no_grad():
        out = twin.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: fired.append(act.shape))])
        torch.testing.assert_close(out, tld.adapt(model).forward(tokens), rtol=0, atol=0)
    assert fired, f"a hook on the copy's {name} did not fire"
    after = fingerprint(model)
    assert sorted(k for k in before.keys() | after.keys() if before.get(k, "absent") != after.get(k, "absent")) == []


def test_hooks_a_user_left_attached_are_named():
    """Audits 14a F12, 14b F6: a leftover hook (an ablation, a patch) ran inside every statistics pass
    and SGLD step and nothing said so. Now every analysis names where hooks are attached; the model's
    backends' own hooks (the bridge wires some to the modules it wraps) are not the user's and stay silent."""
    import warnings

    model = make_tiny_toy_transformer()
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))

    def attached(run) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        return [str(w.message) for w in caught if "hooks attached" in str(w.message)]

    assert attached(lambda: tld.activation_stats(model, tokens, progress=False)) == []
    model.add_hook("blocks.0.hook_resid_post", lambda act, hook: 0.5 * act)
    message, = attached(lambda: tld.activation_stats(model, tokens, progress=False))
    assert "'blocks.0.hook_resid_post'" in message and "reset_hooks(including_permanent=True)" in message
    model.reset_hooks(including_permanent=True)
    # review 36: a torch hook on a submodule of a TransformerLens-style model, not only on its hook points
    handle = model.blocks[0].mlp.register_forward_hook(lambda module, inputs, output: 0 * output)
    message, = attached(lambda: tld.activation_stats(model, tokens, progress=False))
    assert "'blocks.0.mlp'" in message
    handle.remove()
    # hooks that are part of the model (torch's weight_norm, pruning) are not the user's leftovers
    normed = torch.nn.Sequential(torch.nn.utils.weight_norm(torch.nn.Linear(3, 4)), torch.nn.Linear(4, 1))
    torch.nn.utils.prune.l1_unstructured(normed[1], "weight", 0.5)
    from tl_degeneracy.models.hooks import attached_hooks

    assert attached_hooks(normed) == []
    linear = torch.nn.Linear(3, 1)
    handle = linear.register_forward_hook(lambda module, inputs, output: output)
    run = lambda: tld.behavioral_llc(linear, torch.randn(40, 3), loss="mse", chains=2, draws=10, burnin=5,
                                     step_size=1e-5, progress=False)
    assert ["the model itself" in m for m in attached(run)] == [True]
    handle.remove()
    assert attached(run) == []
