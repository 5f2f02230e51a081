"""Loss-scale sweeps and per-component restricted LLCs."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tl_degeneracy.llc import LLCResult, llc_by_component, llc_sweep, plot_llc_sweep
from tl_degeneracy.llc.convergence import ConvergenceWarning
from tl_degeneracy.llc.sweep import point_texts


class QuadraticPlusQuartic(nn.Module):
    """One parameter w (θ* = 0) with mse behavioral loss ½‖f(w) − f(0)‖² = c²w² + w⁴.

    Finite-data SLT: the volume {L < ε} ~ √ε/c for ε ≪ c⁴ (λ = 1/2) and ~ ε^{1/4} for ε ≫ c⁴ (λ = 1/4).
    """

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        f = torch.cat([np.sqrt(2) * self.c * self.w, np.sqrt(2) * self.w**2])
        return f.expand(x.shape[0], 2)


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
def test_llc_sweep_crosses_over_from_half_to_quarter():
    c = 0.03  # c⁴ = 8.1e-7; the end points below are 4 decades away on either side
    model = QuadraticPlusQuartic(c)
    x = torch.zeros(1, 1, dtype=torch.float64)
    # gamma = 0: at ε = 0.1 the posterior reaches |w| ≈ 0.5, where a unit prior would change the volume.
    frame = llc_sweep(model, x, loss_scales=[1e-10, 1e-1], gamma=0.0, seed=0)
    assert list(frame["loss_scale"]) == [1e-10, 1e-1]
    assert np.allclose(frame["nbeta"], [1e10, 10.0])
    assert np.allclose(frame["n_eff"], 2 * frame["llc"])
    for expected, row in zip([0.5, 0.25], frame.itertuples()):
        tolerance = expected * row.bias_bound + 4 * row.llc_stderr + 0.01  # bias_bound: relative to the true λ
        assert abs(row.llc - expected) < tolerance, (row.llc, expected, tolerance)
    fig = plot_llc_sweep(frame)
    assert fig.layout.xaxis.type == "log"


def test_llc_sweep_checkpoints_each_scale_in_its_own_directory(tmp_path):
    from .test_llc import linear_regression

    model, x = linear_regression(d=3, n=40)
    kw = dict(loss_scales=[1e-2, 1e-3], chains=2, draws=20, burnin=5, checkpoint_dir=tmp_path)
    first = llc_sweep(model, x, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_scale_0.001", "loss_scale_0.01"]
    # Rerunning reads every scale back from its own finished checkpoint (one shared file would be refused).
    again = llc_sweep(model, x, **kw)
    assert np.array_equal(first["llc"], again["llc"])


def test_sweep_rows_carry_the_stderr_caveat_and_their_error_bars_the_standard_error():
    from tl_degeneracy.llc import behavioral_llc

    from .test_llc import linear_regression

    model, x = linear_regression(d=3, n=40)
    kw = dict(chains=2, draws=200, burnin=50, step_size=1e-3)
    frame = llc_sweep(model, x, loss_scales=[1e-2, 1e-3], **kw)
    # Each row is the run behavioral_llc makes at its scale, with the same MCSE and caveat: two
    # chain means give a ± that is itself uncertain (METHODS §1, "Standard error").
    for row in frame.itertuples():
        single = behavioral_llc(model, x, loss_scale=row.loss_scale, **kw)
        assert row.llc == single.llc and row.llc_stderr == single.llc_stderr
        assert row.llc_mcse == single.diagnostics["llc_mcse"] and np.isfinite(row.llc_mcse)
        assert row.stderr_caveat == single.diagnostics["stderr_caveat"]
        assert "only 2 healthy chain(s)" in row.stderr_caveat
        assert (row.loss, row.selection) == (single.loss, None)  # the whole model's, named (report.compare)
    # ±2 standard errors of N_eff = 2λ̂, each the larger of the chains' spread and the MCSE.
    assert (frame["llc_stderr"] >= frame["llc_mcse"]).all()
    bars = np.concatenate([np.asarray(trace.error_y.array) for trace in plot_llc_sweep(frame).data])
    np.testing.assert_allclose(bars, 4 * frame["llc_stderr"])


def _result(llc: float, mcse: float, converged: bool, gamma: float = 1130.0, nbeta: float = 1000.0) -> LLCResult:
    """A finished run of 4 healthy chains: λ̂ = ``llc``, chains' spread 0.05 over √4, MCSE ``mcse``."""
    return LLCResult(llc=llc, llc_std=0.1, llc_stderr=max(0.05, mcse), llc_per_chain=np.full(4, llc), trace=np.full((4, 20), llc),
                     nbeta=nbeta, step_size=1e-3, gamma=gamma, chains=4, draws=10, burnin=10, n_params=50, loss="kl",
                     sampler="sgld", diagnostics={"llc_chain_stderr": 0.05, "llc_mcse": mcse, "convergence": {"brief": "" if converged else
                                                                                     "split-R̂ 1.13 > 1.05; ESS 21 < 100"}},
                     converged=converged)


def test_figures_state_each_estimate_with_its_error_and_verdict():
    """The trace's annotation quotes λ̂ ± the larger standard error and the verdict; unconverged points of
    the sweep and the component chart are drawn apart (open markers, hatched bars), say "not converged" in
    their hover text, and the component chart names each bar's γ."""
    from tl_degeneracy.report.plots import plot_component_llc

    unconverged, converged = _result(0.969, 0.069, False), _result(1.2, 0.01, True, nbeta=100.0)
    (line,) = [a.text for a in unconverged.plot().layout.annotations if a.text != "burn-in"]
    assert line == "λ̂(ε = 0.001, γ = 1.13e+03) = 0.969 ± 0.069 (not converged)"
    (line,) = [a.text for a in converged.plot().layout.annotations if a.text != "burn-in"]
    assert line == "λ̂(ε = 0.01, γ = 1.13e+03) = 1.200 ± 0.050 (converged)"  # the chains' spread, here the larger

    sweep = pd.DataFrame([{"loss_scale": r.loss_scale, "nbeta": r.nbeta, **r.summary()} for r in (converged, unconverged)])
    fig = plot_llc_sweep(sweep)
    (trace,) = fig.data
    assert list(trace.marker.symbol) == ["circle", "circle-open"] and fig.layout.legend.title.text == "open markers: not converged"
    # the relation and verdict the report's text gives, and what the bars are (audit 15b)
    assert list(trace.text) == ["γ = 1.13e+03<br>N_eff = 2.40 ± 0.10<br>bars: ±2 standard errors<br>converged",
                                "γ = 1.13e+03<br>N_eff ≥ 1.94 ± 0.14<br>bars: ±2 standard errors<br>not converged — "
                                "lower bound: split-R̂ 1.13 > 1.05; ESS 21 < 100"]
    assert plot_llc_sweep(sweep.iloc[:1]).layout.legend.title.text is None  # all converged: nothing to explain

    components = pd.DataFrame([{"component": name, **r.summary(), "n_eff_fraction": r.n_eff / r.n_params}
                               for name, r in (("blocks.0.attn.head0", _result(1.0, 0.02, True, gamma=19.0)),
                                               ("blocks.0.attn.head1", _result(1.3, 0.02, False, gamma=34.6)))])
    fig = plot_component_llc(components)
    (bars,) = fig.data
    assert list(bars.marker.pattern.shape) == ["", "/"] and fig.layout.legend.title.text == "hatched: not converged"
    assert list(fig.layout.xaxis.ticktext) == ["blocks.0.attn.head0<br>γ = 19", "blocks.0.attn.head1<br>γ = 34.6"]
    assert bars.hovertext[0].startswith("γ = 19<br>") and bars.hovertext[0].endswith("<br>converged")
    assert bars.hovertext[1].startswith("γ = 34.6<br>N_eff ≥ 2.60 ± 0.10<br>bars: ±2 standard errors<br>not converged — "
                                        "lower bound: split-R̂ 1.13")


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
def test_a_point_whose_chains_all_diverge_keeps_the_others():
    """Audit 17b F1: a given η stable at ε = 10⁻² and 10⁻³ diverges at 10⁻⁵ (nβ η h_max far past 4);
    the sweep raised and lost the two points it had. Now that point's row has no estimate and says
    why, the others are kept, a warning says so, and the figure names it."""
    from tests.test_llc import linear_regression

    model, x = linear_regression()
    with pytest.warns(RuntimeWarning, match=r"llc_sweep: λ̂\(ε = 1e-05, γ = 1\): all 2 chains diverged .*the other "
                                            r"points are kept"):
        frame = llc_sweep(model, x, [1e-2, 1e-3, 1e-5], step_size=1e-4, chains=2, burnin=50, draws=100, seed=0,
                          progress=False)
    assert list(frame["loss_scale"]) == [1e-2, 1e-3, 1e-5] and list(frame["nbeta"]) == pytest.approx([1e2, 1e3, 1e5])
    assert frame["error"].iloc[:2].isna().all() and np.isfinite(frame["llc"].iloc[:2]).all()
    lost = frame.iloc[2]
    assert "all 2 chains diverged" in lost["error"] and "reduce step_size" in lost["error"]
    assert np.isnan(lost["llc"]) and np.isnan(lost["n_eff"]) and not lost["converged"]
    assert (lost["chains"], lost["n_failed"], lost["gamma"]) == (2, 2, 1.0)
    assert point_texts(frame)[2].startswith("no estimate: λ̂(ε = 1e-05, γ = 1): all 2 chains diverged")
    fig = plot_llc_sweep(frame)
    assert sum(len(t.y) for t in fig.data) == 2 and "no estimate (every chain diverged) at ε = 1e-05" in \
        fig.layout.legend.title.text
    every = llc_sweep(model, x, [1e-5], step_size=1e-4, chains=2, burnin=50, draws=100, progress=False)
    assert plot_llc_sweep(every).layout.title.text.endswith("no point has an estimate (every chain diverged)")


def test_llc_sweep_refuses_a_fixed_scale():
    with pytest.raises(ValueError, match="loss_scales"):
        llc_sweep(QuadraticPlusQuartic(1.0), torch.zeros(1, 1), loss_scales=[1e-2], nbeta=10)


def test_llc_by_component_one_row_per_head(tiny_toy_transformer, tiny_toy_tokens, tmp_path):
    import tl_degeneracy as tld

    frame = llc_by_component(tiny_toy_transformer, tiny_toy_tokens, components="heads",
                             chains=2, draws=10, burnin=2, step_size=1e-6, nbeta=100)
    assert list(frame["component"]) == [f"blocks.{l}.attn.head{h}" for l in range(2) for h in range(2)]
    for row in frame.itertuples():
        assert row.n_params == tld.select_parameters(tiny_toy_transformer, row.component).numel
        assert np.isfinite(row.llc) and row.llc > 0
        assert row.n_eff_fraction == pytest.approx(row.n_eff / row.n_params)
        assert "only 2 healthy chain(s)" in row.stderr_caveat and np.isfinite(row.llc_mcse)
        # the quantity each row is (report.compare tests only rows of one quantity)
        assert (row.selection, row.loss_scale, row.nbeta) == (row.component, pytest.approx(1e-2), 100.0)
    # With a checkpoint directory every component gets its own subdirectory (sanitised name).
    ckpt = llc_by_component(tiny_toy_transformer, tiny_toy_tokens, components=["blocks.0.attn.head0", "blocks.1.attn.head1"],
                            chains=2, draws=5, burnin=1, step_size=1e-6, nbeta=100, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.0.attn.head0", "blocks.1.attn.head1"]
    assert np.isfinite(ckpt["llc"]).all()
    layers = llc_by_component(tiny_toy_transformer, tiny_toy_tokens, components="layers",
                              chains=2, draws=5, burnin=1, step_size=1e-6, nbeta=100)
    assert list(layers["component"]) == ["blocks.0", "blocks.1"]


def _biased_rows() -> pd.DataFrame:
    """Two sweep rows as ``llc_sweep`` writes them: one whose step size may bias λ̂ by 50 % and whose
    N_eff exceeds its 10 parameters by more than that (audit 11b's regression at a given step size,
    N_eff 17.2), one clean."""
    common = dict(gamma=1.0, gamma_source="given", chains=4, n_failed=0, llc_mcse=0.1, stderr_caveat=None,
                  convergence_reason="", converged=True, lower_bound=None, n_params=10)
    return pd.DataFrame([
        dict(common, loss_scale=6e-4, llc=8.6, llc_stderr=0.07, n_eff=17.2, n_eff_stderr=0.14, bias_bound=0.5),
        dict(common, loss_scale=1e-2, llc=4.9, llc_stderr=0.05, n_eff=9.8, n_eff_stderr=0.1, bias_bound=0.02),
    ])


def test_sweep_points_say_what_the_step_size_may_have_done():
    """Audit 11b F1: the main run's verdict said "the step size may raise λ̂ by up to X %" and "N_eff
    above the parameter count", its sweep points (headline, hover text, markers) said nothing."""
    from tl_degeneracy.report.plots import plot_component_llc
    from tl_degeneracy.report.sections import _sweep_point

    frame = _biased_rows()
    biased, clean = (_sweep_point(r) for r in frame.itertuples())
    assert "may raise λ̂ by up to 50%" in biased and "N_eff above the parameter count" in biased
    assert "step size" not in clean and "parameter count" not in clean
    texts = point_texts(frame)
    assert "by up to 50%" in texts[0] and "step size" not in texts[1]
    # audit 14a F10: a regular model sits at N_eff = d, so the predicted bias and ± may carry it above d
    regular = _biased_rows().assign(n_eff=[17.2, 10.54], n_eff_stderr=[0.14, 0.12], bias_bound=[0.72, 0.041])
    assert all("parameter count" not in _sweep_point(r) for r in regular.itertuples())
    fig = plot_llc_sweep(frame)
    assert list(fig.data[0].marker.symbol) == ["diamond", "circle"]
    assert "step size may bias" in fig.layout.legend.title.text
    bars = plot_component_llc(frame.assign(component=["a", "b"], n_eff_fraction=frame["n_eff"] / 10))
    assert list(bars.data[0].marker.pattern.shape) == [".", ""]


def test_sweep_points_at_automatic_gammas_are_not_joined():
    """Audit 11b F3: with γ = "auto" every ε has its own γ, different quantities (METHODS §1): the plot
    joined them into one curve "over loss scales"; now markers only, lines for a fixed γ."""
    fixed = plot_llc_sweep(_biased_rows())
    auto = plot_llc_sweep(_biased_rows().assign(gamma_source="auto", gamma=[9.6, 95.0]))
    assert fixed.data[0].mode == "lines+markers" and auto.data[0].mode == "markers"


def test_step_size_caveats_read_numpy_numbers():
    """Review 33: a table's cells are numpy scalars; isinstance(x, (int, float)) rejected np.int64."""
    from tl_degeneracy.llc.llc_result import step_size_caveats

    assert len(step_size_caveats(np.float64(0.5), np.float32(17.2), np.int64(10), np.float32(0.14))) == 2
    assert step_size_caveats(float("nan"), None, 10) == [] and step_size_caveats(True, 17.2, 10) == [step_size_caveats(0, 17.2, 10)[0]]


def test_every_warning_of_a_component_table_names_its_component(tiny_toy_transformer, tiny_toy_tokens):
    """Audit 13b F3: llc_by_component gave 12 warnings for 4 heads, none naming its head (nor ε or γ)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llc_by_component(tiny_toy_transformer, tiny_toy_tokens, components=["blocks.0.attn.head0", "blocks.1.attn.head1"],
                         chains=2, draws=10, burnin=2, step_size=1e-6, nbeta=100, progress=False)
    convergence = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(convergence) == 2
    for text, head in zip(convergence, ["blocks.0.attn.head0", "blocks.1.attn.head1"]):
        assert re.match(rf"λ̂\(ε = 0.01, γ = \S+\) of {re.escape(head)} = \S+ is not converged", text), text
    llc_warnings = [str(w.message) for w in caught if "ε = 0.01" in str(w.message)]
    assert all(t.startswith("λ̂(ε = 0.01") for t in llc_warnings) and len(llc_warnings) >= 4  # + the 2-chain caveats


def test_a_component_whose_chains_all_diverge_is_named_in_its_figure_and_not_compared(tiny_toy_transformer,
                                                                                     tiny_toy_tokens, monkeypatch):
    """Review 41: a failed component's bar was labelled with its γ like the others and not named in the
    legend; compare read its row as another quantity "not converged (a lower bound)"."""
    from tl_degeneracy.errors import EstimateFailedError
    from tl_degeneracy.llc import sweep
    from tl_degeneracy.report.compare import _incomparable
    from tl_degeneracy.report.plots import plot_component_llc

    real = sweep.behavioral_llc

    def second_fails(model, data, params=None, **kwargs):
        if params == "blocks.1.attn":
            raise EstimateFailedError("λ̂(ε = 0.01, γ = 5, blocks.1.attn): all 2 chains diverged; reduce step_size",
                                      dict(chains=2, gamma=5.0, gamma_source="given", loss="kl", n_params=96,
                                           selection="blocks.1.attn"))
        return real(model, data, params=params, **kwargs)

    monkeypatch.setattr(sweep, "behavioral_llc", second_fails)
    with pytest.warns(RuntimeWarning, match="llc_by_component: .*the other points are kept"):
        frame = llc_by_component(tiny_toy_transformer, tiny_toy_tokens, components=["blocks.0.attn", "blocks.1.attn"],
                                 chains=2, draws=5, burnin=1, step_size=1e-6, nbeta=100, gamma=5.0, progress=False)
    lost = frame.iloc[1]
    assert np.isnan(lost["llc"]) and (lost["n_params"], lost["selection"], lost["loss_scale"]) == (96, "blocks.1.attn", 1e-2)
    assert frame["n_params"].dtype.kind == "i"  # no NaN turned the counts into floats
    fig = plot_component_llc(frame)
    assert list(fig.layout.xaxis.ticktext)[1] == "blocks.1.attn<br>no estimate"
    assert fig.layout.legend.title.text.endswith("no estimate (every chain diverged): blocks.1.attn")
    records = frame.to_dict(orient="records")
    assert _incomparable(records[0], records[1]) == "no estimate in B (every chain diverged)"
