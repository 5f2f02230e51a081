"""LIB and the edges need nodes that are cuts of the model's graph (METHODS §5): what reaches the
outputs from node l passes through node l+1. Audit 11a: a residual MLP with its hook points as nodes
(the default for a HookedRootModule) read hook_in's interaction rank 2 of 6 under LIB, 4 directions
counted degenerate that the outputs read through the skip connection (the global basis: 6 of 6).
And gradients at a residual-stream hook are the stream's only where the hook is a cut between the
embedding and the outputs (audit 13a: a TransformerBridge's hook_resid_mid is the MLP's input)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tests.fixtures.hf import ARCHS, BACKENDS
from tests.fixtures.toys import make_tiny_toy_transformer
from tests.interaction_models import HookedResidual
from tl_degeneracy.interaction import interaction_basis
from tl_degeneracy.stats.cuts import find_bypasses
from tl_degeneracy.interaction.runner import build_runner


def _inputs(n: int = 300) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("last", ["pca", "outputs"])
def test_lib_refuses_nodes_that_are_not_cuts(last):
    with pytest.raises(ValueError, match=r"'hook_in' around 'hook_h'.*not cuts.*kind='global'"):
        interaction_basis(HookedResidual(), _inputs(), kind="local", last=last, output="mse", exact=True,
                          progress=False)


class GatedSkip(HookedRootModule):
    """x(6) → h = tanh(W x)(2) → y = U h (6) → out = V y + relu(x₀)·c: the outputs read x around h
    only on rows where x₀ > 0 (audit 15a)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W, self.U, self.V = (nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))
                                  for shape in ((2, 6), (6, 2), (4, 6)))
        self.c = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        self.hook_in, self.hook_h, self.hook_y = HookPoint(), HookPoint(), HookPoint()
        self.setup()

    def forward(self, x):
        x = self.hook_in(x)
        y = self.hook_y(self.hook_h(torch.tanh(x @ self.W.mT)) @ self.U.mT)
        return y @ self.V.mT + torch.relu(x[..., :1]) * self.c


def test_a_skip_through_a_gate_is_found_whichever_row_comes_first():
    """Audit 15a: the check read the first row only; with x₀ < 0 there LIB ran and called 4 of
    hook_in's 6 directions degenerate where the outputs read 3 (the global basis), while the same
    rows in another order were refused. Rows spread over the data find the skip in either order."""
    x = _inputs()
    for first in ((x[:, 0] < 0).nonzero()[0], (x[:, 0] > 0).nonzero()[0]):
        rows = x.clone()
        rows[[0, int(first)]] = rows[[int(first), 0]]
        with pytest.raises(ValueError, match=r"'hook_in' around 'hook_h'.*not cuts"):
            interaction_basis(GatedSkip(), rows, kind="local", last="outputs", output="mse", exact=True, progress=False)
    # rows sorted by the gate, open only in the last batch, whatever the number of batches (review 37:
    # with fewer than 8 batches the sample left out the last ones)
    ordered = x[x[:, 0].argsort()]
    for batch_size in (150, 75, 43, 32):  # 2, 4, 7 and 10 batches
        with pytest.raises(ValueError, match=r"'hook_in' around 'hook_h'.*not cuts"):
            interaction_basis(GatedSkip(), ordered, kind="local", last="outputs", output="mse", exact=True,
                              batch_size=batch_size, progress=False)


def test_edges_over_nodes_that_are_not_cuts_are_flagged():
    with pytest.warns(RuntimeWarning, match=r"'hook_in' around 'hook_h'.*lack those paths"):
        ib = interaction_basis(HookedResidual(), _inputs(), kind="global", output="mse", exact=True, progress=False)
    assert ib.eigenvalues["hook_in"].interaction_rank == 6  # the global basis is not affected


def test_lib_over_cuts_finds_the_directions_the_outputs_read():
    """hook_in → hook_y is a cut (y = x + U tanh(W x) is all the outputs read): LIB with the outputs'
    Jacobian at the last node keeps all 6 directions of hook_in, as the global basis does (the
    Jacobian V (I + U diag(tanh′) W) has rank 4 at each sample, but its row space moves with x)."""
    model, x = HookedResidual(), _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        local = interaction_basis(model, x, kind="local", last="outputs", output="mse", exact=True,
                                  nodes=["hook_in", "hook_y"], progress=False)
    jac = torch.stack([torch.func.jacrev(lambda z: model(z[None])[0])(row) for row in x[:20]])
    assert int(torch.linalg.matrix_rank(jac[0])) == 4
    assert int(torch.linalg.matrix_rank(jac.flatten(0, 1))) == 6
    assert local.eigenvalues["hook_in"].interaction_rank == 6


def _check_default_nodes(model, tokens):
    runner = build_runner(model, tokens, None, batch_size=4, seq_len=None, skip_bos=None)
    assert find_bypasses(runner.engine, tokens[:1], runner.names, None) == []
    assert find_bypasses(runner.engine, tokens[:1], runner.names, runner.names[-1]) == []


def test_default_transformer_nodes_are_cuts():
    model = make_tiny_toy_transformer()
    _check_default_nodes(model, torch.randint(0, model.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(0)))


# TransformerLens 4 warns of every edit at a norm's output; the package's edits are meant (audit 13a F8)
@pytest.mark.filterwarnings("error:A forward hook edited")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_default_nodes_of_every_backend_are_cuts(tl_models, arch, backend):
    """The check holds a node by replacing its activation from a hook: every backend must pass that
    replacement on (or the default nodes would be refused for a bypass that is not there)."""
    model = tl_models(arch, backend)
    _check_default_nodes(model, torch.randint(3, 60, (4, 8), generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resid_mid_is_a_cut_only_where_the_backend_passes_edits_on(tl_models, backend):
    """Review 33: a TransformerBridge passes an edit at hook_resid_mid to the MLP branch only, so the
    residual path goes around it and LIB over [resid_pre, resid_mid, resid_post] would read the MLP's
    Jacobian alone; HookedTransformer's hook_resid_mid is the residual stream itself."""
    model = tl_models("gpt2", backend)
    nodes = ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
    tokens = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    runner = build_runner(model, tokens, ["blocks.0.hook_resid_pre", *nodes], batch_size=2, seq_len=None, skip_bos=None)
    found = find_bypasses(runner.engine, tokens[:1], runner.names, None)
    if backend.startswith("bridge"):
        assert [(b.node, b.skipped) for b in found] == [("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid")]
    else:
        assert found == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "neox"])  # NeoX's parallel blocks have no resid_mid
def test_gradients_at_resid_mid_only_where_it_is_the_stream(tl_models, arch, backend):
    """Audit 13a F1: a bridge's hook_resid_mid (ln2.hook_in) passes an edit to the MLP branch only, so
    the Jacobian read there was the MLP's alone (trace K 0.28 against 47.5 at resid_post on a GPT-2
    bridge; the global basis accepted the node): every gradient pass at it is refused; on
    HookedTransformer, where the hook is the stream, it runs, as does every backend at resid_post."""
    import tl_degeneracy as tld

    model = tl_models(arch, backend)
    tokens = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(progress=False, exact=True)
    assert tld.jacobian_stats(model, tokens, hooks=["resid_post"], **kw)["blocks.0.hook_resid_post"].count == 16
    calls = {
        "jacobian_stats": lambda: tld.jacobian_stats(model, tokens, hooks=["blocks.0.hook_resid_mid"], **kw),
        "interaction_basis(kind='global')": lambda: interaction_basis(model, tokens, kind="global",
                                                                      nodes=["blocks.0.hook_resid_mid"], **kw),
        "interaction_basis(kind='local')": lambda: interaction_basis(model, tokens, kind="local", last="outputs",
                                                                     nodes=["blocks.0.hook_resid_mid"], **kw),
    }
    for what, call in calls.items():
        if backend.startswith("bridge"):
            with pytest.raises(ValueError, match=rf"{re.escape(what)}: gradients at 'blocks.0.hook_resid_mid' would "
                                                 r"not be the residual stream's.*ln2.hook_in"):
                call()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 16 samples: data-limited ranks, said in warnings
                call()
    # PCA takes no gradients: the values at a bridge's hook_resid_mid are the stream's; its edges do (review 35)
    interaction_basis(model, tokens, kind="pca", nodes=["blocks.0.hook_resid_mid"], progress=False)
    edges = lambda: interaction_basis(model, tokens, kind="pca", nodes=["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid",
                                                                        "blocks.1.hook_resid_pre"], edges=True, progress=False)
    if backend.startswith("bridge"):
        with pytest.raises(ValueError, match="gradients at 'blocks.0.hook_resid_mid' would not be the residual stream's"):
            edges()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edges()
