"""``behavioral_llc(compile=True)``: the compiled SGLD step computes the same loss and gradient.

Compiled kernels sum in another order than the uncompiled ones, so values agree to float32
rounding (relative 1e-5 per operation, a few hundred operations deep: 1e-4 is the tolerance), not
bit for bit; estimates then agree within their Monte-Carlo error and with theory as the uncompiled
ones do. TorchInductor on a CPU needs a C++ compiler; without one the tests of the compiled path
are skipped (the fallback test runs everywhere).
"""

import shutil
import warnings

import numpy as np
import pytest
import torch

from tl_degeneracy.llc import behavioral_llc
from tl_degeneracy.llc.layout import ParameterLayout, selection_masks
from tl_degeneracy.llc.targets import make_target
from tl_degeneracy.llc.loss_grad import LossGrad
from tl_degeneracy.theory import dln_learning_coefficient

from .test_llc import deep_linear_network, dln_inputs, linear_regression

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="TorchInductor on a CPU needs a C++ compiler",
)
pytestmark = pytest.mark.usefixtures("single_thread")


def _loss_grads(model, data, delta_scale: float, chains: int = 3):
    target = make_target(model, data, None, None)
    _, masks = selection_masks(target, None)
    layout = ParameterLayout(tuple(masks), tuple(tuple(target.star[n].shape) for n in masks))
    delta = delta_scale * torch.randn(chains, layout.numel, generator=torch.Generator().manual_seed(3))
    eager = LossGrad(target, layout)
    compiled = LossGrad(target, layout, compile=True)
    return [(eager(delta, b), compiled(delta, b)) for b in range(target.n_batches)], compiled


@needs_compiler
@pytest.mark.tl_agnostic  # the package's own toy (compiling it: about a minute): once, in the TransformerLens 4.x run
def test_compiled_loss_and_gradient_equal_uncompiled_on_toy_transformer(tiny_toy_transformer, tiny_toy_tokens):
    pairs, compiled = _loss_grads(tiny_toy_transformer, tiny_toy_tokens, 0.05)
    assert compiled.compiled and compiled.compile_error == "" and compiled.compile_s > 0
    for (loss_e, grad_e), (loss_c, grad_c) in pairs:
        assert loss_e.shape == loss_c.shape == (3,)
        assert bool((loss_e > 0).all())  # δ ≠ 0 moves the outputs: the comparison is not 0 = 0
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=0)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-4 * float(grad_e.abs().max()))


@needs_compiler
@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
def test_compiled_llc_of_deep_linear_network_matches_aoyagi_and_resumes(tmp_path):
    """One compilation serves three calls: the same shapes reuse the compiled step."""
    expected = dln_learning_coefficient((3, 2, 3), 1).llc  # 3.5
    kw = dict(compile=True, seed=4, checkpoint_every=256)
    full = behavioral_llc(deep_linear_network(1), dln_inputs(), **kw)
    d = full.diagnostics
    assert d["compiled"] and d["compile_error"] == "" and not full.failed
    assert abs(full.llc - expected) <= 0.10 * expected, (full.llc, expected)
    # Interrupted at step 300 and resumed: the compiled steps are deterministic, so the resumed
    # run equals the uninterrupted one exactly.
    partial = behavioral_llc(deep_linear_network(1), dln_inputs(), checkpoint_dir=tmp_path, _stop_after=300, **kw)
    assert partial.diagnostics["steps_done"] == 300
    resumed = behavioral_llc(deep_linear_network(1), dln_inputs(), checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(resumed.trace, full.trace)
    assert resumed.llc == full.llc


@needs_compiler
def test_compiled_and_uncompiled_estimates_agree_within_their_error():
    model, x = linear_regression(d=6, n=200)
    kw = dict(chains=4, draws=800, burnin=100, seed=2)
    eager = behavioral_llc(model, x, **kw)
    compiled = behavioral_llc(model, x, compile=True, **kw)
    assert compiled.diagnostics["compiled"] and not eager.diagnostics["compiled"]
    assert eager.step_size == compiled.step_size  # calibration is uncompiled in both
    # The same seeds and float32-rounding-close steps: the chains stay close, far closer than the
    # estimates' standard errors (this is a check of equality, not only of consistency).
    assert abs(compiled.llc - eager.llc) < 0.25 * eager.llc_stderr, (compiled.llc, eager.llc, eager.llc_stderr)


@needs_compiler
def test_reaching_the_recompile_limit_warns_and_runs_uncompiled(monkeypatch):
    """Dynamo would silently run uncompiled past its limit; here it says so and diagnostics agree."""
    import tl_degeneracy.llc.loss_grad as loss_grad

    monkeypatch.setattr(loss_grad, "RECOMPILE_LIMIT", 1)
    for d in (2, 3):
        model, x = linear_regression(d=d, n=20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pairs, compiled = _loss_grads(model, x, 0.1)
    # d = 3 is a new shape: the process holds at least one compilation (d = 2's, or earlier tests').
    assert not compiled.compiled and "recompile limit" in compiled.compile_error
    assert any("recompile limit" in str(w.message) for w in caught)
    (loss_e, grad_e), (loss_c, grad_c) = pairs[0]
    assert torch.equal(loss_c, loss_e) and torch.equal(grad_c, grad_e)  # the uncompiled computation itself


def test_compilation_failure_warns_and_runs_uncompiled(monkeypatch):
    model, x = linear_regression(d=4, n=50)
    kw = dict(chains=2, draws=40, burnin=10, seed=1, step_size=1e-4)
    eager = behavioral_llc(model, x, **kw)

    def broken_compile(fn, **_):
        def fails(*args):
            raise RuntimeError("InductorError: C++ compile error\nsecond line")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="not compiled .*torch.compile failed: RuntimeError: InductorError"):
        res = behavioral_llc(model, x, compile=True, **kw)
    assert not res.diagnostics["compiled"] and "InductorError" in res.diagnostics["compile_error"]
    # The failed call's step was recomputed uncompiled: the run is the uncompiled run.
    np.testing.assert_array_equal(res.trace, eager.trace)


def test_an_error_of_the_model_itself_is_raised_as_itself(monkeypatch):
    """The compiled call fails; so does the uncompiled one, with the model's own error."""

    class Broken(torch.nn.Linear):
        def forward(self, x):
            if torch.is_grad_enabled():  # the reference pass (no_grad) succeeds, sampling passes fail
                raise ValueError("the model's own bug")
            return super().forward(x)

    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    with pytest.raises(ValueError, match="the model's own bug"):
        behavioral_llc(Broken(3, 1), torch.randn(20, 3), chains=2, draws=5, burnin=1, step_size=1e-3,
                       compile=True)


def test_bridge_is_not_compiled_with_a_warning(tl_models):
    bridge = tl_models("gpt2", "bridge")
    tokens = torch.tensor([[1, 5, 17, 42, 9, 7]])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="at the end of sampling")
        with pytest.warns(RuntimeWarning, match="not compiled .*GeneralizedComponent"):
            res = behavioral_llc(bridge, tokens, chains=2, draws=3, burnin=1, step_size=1e-6, nbeta=10.0, compile=True)
    assert not res.diagnostics["compiled"] and "GeneralizedComponent" in res.diagnostics["compile_error"]
    assert np.isfinite(res.llc)


def test_compile_must_be_a_bool():
    model, x = linear_regression(d=3, n=20)
    with pytest.raises(ValueError, match="compile must be True or False"):
        behavioral_llc(model, x, compile="yes")
