"""Peer agreement with devinterp 2.0.1 (METHODS §1, "Relation to devinterp"; issue 15 item 5).

Relation to devinterp. devinterp samples the same posterior with the same plain SGLD update,
w ← w − (η/2)[nβ ∇L_b(w) + γ(w − w*)] + √η ξ, ξ ~ N(0, I) (``SGMCMC.sgld``, ``noise_level`` σ = 1),
where L_b is the *mean* loss over the minibatch's samples or tokens, as ours is (not a sum). The
arguments therefore map one to one: ``nbeta`` is its ``n_beta`` (it has no default and recommends
``devinterp.utils.default_nbeta(m) = m / ln m``, m = batch size × gradient-accumulation steps; ours
is 1000, loss scale 10⁻³); ``gamma`` is its ``localization`` (the precision of the Gaussian prior
centred at the initial weights: (γ/2)‖w − w*‖² in the potential, γ(w − w*) in the drift; its
default 0 means no localization); ``step_size`` η is its ``lr`` (drift η/2, noise √η; no default).
Its estimate is nβ · (mean loss − ``init_loss``) averaged over every step, burn-in included; ours
averages the post-burn-in draws and needs no baseline, since L_B(θ*) = 0. So
``behavioral_llc(…, nbeta=b, gamma=g, step_size=η, burnin=0, draws=T)`` and devinterp's
``llc(…, loss_fn=<the same behavioral loss>, n_beta=b, localization=g, lr=η, num_burnin_steps=0,
num_draws=T)`` are the same estimator. Other differences: devinterp's default loss is next-token
cross-entropy minus a baseline estimated on 32 minibatches at w*; it runs the model in train mode
(dropout on), drops an incomplete last batch, and reports the population std (ddof 0) across chains
where we report ddof 1 and a standard error; its ``rmsprop_sgld`` averages the squared gradient of
the mean loss where ours averages that of nβ times it, so our (``step_size`` η, ``rms_eps`` e) is
its (``lr`` = η/nβ, ``rmsprop_eps`` = e/nβ); its ``llc_weight_decay`` and ``bounding_box_size``
have no counterpart here.

The test: both libraries sample two models with a known λ at devinterp's default temperature
(nβ = ``default_nbeta(1000)`` = 144.8, full batch of 1000) and localization (γ = 0), with the same η,
steps and behavioral loss ½‖f_w(x) − f_w*(x)‖² (devinterp's ``loss_fn``, written here apart from ours):
reduced-rank regression (the two-layer linear network (3, 2, 3) at a rank-1 teacher, λ = 3.5, Aoyagi &
Watanabe 2005) and the normal crossing f_w(x) = x · w1 · w2² at w* = 0, L_B = ½ E[x²] w1² w2⁴
(λ = min_j 1/(2k_j) = 1/4 for exponents 2k = (2, 4), Watanabe 2009). If both run the same chain, the
per-chain estimates are draws of one distribution: the means may differ by at most
t_{0.995, C₁+C₂−2} combined (pooled) standard errors. Measured power: our chains at half / twice the
temperature (a mean-versus-sum or η-versus-η/2 mismatch) are rejected at −14 / +4.8 combined
standard errors on the regression, −6.8 / +2.2 on the normal crossing (limit 2.65: its chains vary
most); 2× or ½× the step size (the same posterior) moves them by +1.7 / −0.9 and −0.5 / −1.6.
Theory is a sanity check only: at γ = 0 the flat directions are unbounded and still spreading, and
the estimate averages from the first step, so it approaches λ from below; within 25% of λ excludes
the regular values d/2 (6 and 1) and a factor of 2.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import tl_degeneracy as tld
from tl_degeneracy.theory import rrr_learning_coefficient, two_layer_linear_network

pytest.importorskip("devinterp", reason="devinterp is the `bench` extra (pip install -e '.[bench]')")
if importlib.metadata.version("devinterp") != "2.0.1":
    pytest.skip(f"the agreement test is written against devinterp 2.0.1, found {importlib.metadata.version('devinterp')}",
                allow_module_level=True)

from datasets import Dataset  # noqa: E402  (devinterp's own dependency: its data sets are HF Datasets)
from devinterp.slt.llc import llc as devinterp_llc  # noqa: E402
from devinterp.utils import default_nbeta  # noqa: E402

N_SAMPLES = 1000
#: Two-sided level of the agreement test.
ALPHA = 0.01
#: Sanity band around the theory value (module docstring).
THEORY_BAND = 0.25


class NormalCrossing(nn.Module):
    """f_w(x) = x · w1 · w2², at w* = 0: L_B(w) = ½ E[x²] w1² w2⁴ (λ = 1/4)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x[:, 0] * self.w[0] * self.w[1] ** 2


@dataclass(frozen=True)
class Case:
    """One model sampled by both libraries: its data, theory λ, step size η, steps, chains of each."""

    model: nn.Module
    x: torch.Tensor
    theory: float
    step_size: float
    steps: int
    devinterp_chains: int
    our_chains: int


def _inputs(n_features: int) -> torch.Tensor:
    return torch.randn(N_SAMPLES, n_features, generator=torch.Generator().manual_seed(1))


CASES = {
    # devinterp's default of 4 chains; η nβ h_max/4 ≈ 0.04 (h_max ≈ 2 at the teacher).
    "reduced_rank_regression": lambda: Case(two_layer_linear_network((3, 2, 3), rank=1), _inputs(3),
                                            rrr_learning_coefficient(3, 2, 3, 1).llc, 5e-4, 500, 4, 32),
    # More chains: along the unbounded axes each chain's excursion, hence its estimate, varies by ≈ 35%.
    # At η = 6e-3 chains diverge within 1000 steps (w2's curvature grows with |w1| as they spread).
    "normal_crossing": lambda: Case(NormalCrossing(), _inputs(1), 0.25, 2e-3, 1000, 8, 64),
}


def _devinterp_per_chain(case: Case, nbeta: float, out_dir) -> np.ndarray:
    """devinterp's per-chain λ̂ with the behavioral mse loss ½‖f_w(x) − f_w*(x)‖² as its ``loss_fn``.

    devinterp takes token rows ("input_ids" of length ≥ 2; its per-token loss has shape
    [batch, len − 1]): row i is [0, i], and the loss looks sample i up by that index (rows are
    shuffled), giving one loss per sample.
    """
    x = case.x
    with torch.no_grad():
        reference = case.model(x).reshape(len(x), -1)

    def loss_fn(model, ids):
        i = ids[:, -1]
        return 0.5 * (model(x[i]).reshape(len(i), -1) - reference[i]).square().sum(-1, keepdim=True)

    rows = torch.stack([torch.zeros(len(x), dtype=torch.long), torch.arange(len(x))], 1)
    data = Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    out = devinterp_llc(case.model, data, {}, lr=case.step_size, n_beta=nbeta, loss_fn=loss_fn,
                        num_chains=case.devinterp_chains, num_draws=case.steps, batch_size=len(x), device="cpu",
                        output_path=out_dir / "samples.zarr")
    assert float(out["init_loss"]) == 0.0  # the behavioral loss vanishes at w*: no baseline error
    return np.asarray(out["llc_per_chain"].values, dtype=float)


def _our_per_chain(case: Case, nbeta: float) -> np.ndarray:
    """Our per-chain λ̂ under devinterp's conventions: γ = 0, given η, every step averaged (burnin=0)."""
    with warnings.catch_warnings():
        # At γ = 0 the flat directions never equilibrate and no burn-in is discarded, so the verdict
        # is "not converged" by design here; the comparison is of the same finite-time estimator.
        warnings.simplefilter("ignore", tld.ConvergenceWarning)
        # The normal crossing's chains end where w2 is stiff (η nβ h/4 ≈ 0.15): the same discretised
        # chain as devinterp's, so the warning about the step-size bias says nothing about agreement.
        warnings.filterwarnings("ignore", "at the end of sampling", RuntimeWarning)
        res = tld.behavioral_llc(case.model, case.x, loss="mse", nbeta=nbeta, gamma=0.0, step_size=case.step_size,
                                 chains=case.our_chains, draws=case.steps, burnin=0, seed=0, progress=False)
    assert not res.failed, f"chains diverged: {res.failed}"
    return np.asarray(res.llc_per_chain, dtype=float)


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_devinterp(name, tmp_path):
    case = CASES[name]()
    nbeta = default_nbeta(len(case.x))  # devinterp's default temperature for a full batch
    ours = _our_per_chain(case, nbeta)
    theirs = _devinterp_per_chain(case, nbeta, tmp_path)
    assert np.isfinite(theirs).all(), f"devinterp chains failed: {theirs}"

    df = len(ours) + len(theirs) - 2
    pooled_sd = np.sqrt(((len(ours) - 1) * ours.var(ddof=1) + (len(theirs) - 1) * theirs.var(ddof=1)) / df)
    combined_se = pooled_sd * np.sqrt(1 / len(ours) + 1 / len(theirs))
    diff = ours.mean() - theirs.mean()
    pooled = np.concatenate([ours, theirs]).mean()
    limit = stats.t.ppf(1 - ALPHA / 2, df) * combined_se
    summary = (f"{name} (nβ = {nbeta:.1f}, γ = 0, η = {case.step_size:g}, {case.steps} steps): "
               f"ours {ours.mean():.3f} ± {ours.std(ddof=1) / np.sqrt(len(ours)):.3f} ({len(ours)} chains), "
               f"devinterp {theirs.mean():.3f} ± {theirs.std(ddof=1) / np.sqrt(len(theirs)):.3f} "
               f"({len(theirs)} chains), difference {diff:+.3f} = {diff / combined_se:+.2f} combined se "
               f"(limit {limit / combined_se:.2f}); both pooled {pooled:.3f}, theory {case.theory:g}")
    print(summary)
    assert abs(diff) <= limit, summary
    assert abs(pooled - case.theory) <= THEORY_BAND * case.theory, summary
