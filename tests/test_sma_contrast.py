"""README's `toy:sma` vs `toy:sma-scratch` row: the generalising (curriculum) model is the simpler one.

The row quotes the measurements of tutorial 06 at its end points, with the exact calls that make
them; this file runs those calls, at the README's settings (no reduction: the whole module takes
about 2.5 minutes on one thread, most of it the scratch model's burn-in and chains, run until
converged), and checks the claims:

* attention on the first k = 5 positions: curriculum well above the uniform 5/12, scratch near it;
* interaction rank of ``blocks.0.hook_attn_out`` (local interaction basis, METHODS §5, exact
  Jacobians, so no sampling error: the ranks 3 and 15 themselves are checked);
* behavioral LLC (METHODS §1) at ε = 10⁻³, γ = 10³, burn-in extended and drawn until the verdict says
  converged: both runs converge (so the values, not only their ordering, are quotable), and the
  curriculum model's is below the scratch model's by more than two combined standard errors. (With a
  given burn-in of 100 steps the scratch model's chains had not relaxed, mean δ·∇U at 90 % of its
  equilibrium: its 44.4 ± 0.8 was a lower bound then called converged; now 46.7 ± 0.7.) At γ = 1 neither model's
  chains equilibrate within such budgets (flat directions held only by γ), so γ = 10³ is stated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import tl_degeneracy as tld
from tl_degeneracy.models.toys.sma import sma_data

pytestmark = pytest.mark.tl_agnostic  # trains the toy SMA models (minutes): once, in the TransformerLens 4.x run

K = 5  # the label sums the first K of the T = 12 tokens
NODES = ["resid_pre", "attn_out", "resid_post"]
# The calls README's row states, keyword for keyword (checked against README below).
IB_SETTINGS = dict(kind="local", output="kl", nodes=NODES, exact=True, last="outputs", interaction_rtol=1e-3)
LLC_SETTINGS = dict(gamma=1e3, chains=4, draws="auto", pilot_steps=50)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tokens():
    """Fresh task inputs at p = 4 (seed 7: used neither for training nor for testing the models)."""
    return sma_data(256, 4, seed=7)[0]


def _measure(spec: str, tokens) -> dict:
    model = tld.load_model(spec)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    attention = float(cache["blocks.0.attn.hook_pattern"][:, 0, 0, :K].sum(-1).mean())
    ib = tld.interaction_basis(model, tokens, **IB_SETTINGS, edges=False, progress=False)
    ranks = {node.removeprefix("blocks.0.hook_"): int(r) for node, r in zip(ib.dims["node"], ib.dims["interaction_rank"])}
    llc = tld.behavioral_llc(model, tokens, seed=0, **LLC_SETTINGS)
    return {"attention": attention, "ranks": ranks, "llc": llc}


@pytest.fixture(scope="module")
def measured(tokens):
    return {spec: _measure(spec, tokens) for spec in ("toy:sma", "toy:sma-scratch")}


def test_curriculum_attends_to_the_summed_positions(measured):
    uniform = K / 12
    assert measured["toy:sma"]["attention"] > 0.9
    assert abs(measured["toy:sma-scratch"]["attention"] - uniform) < 0.05


def test_curriculum_has_lower_interaction_rank_at_attn_out(measured):
    curriculum, scratch = measured["toy:sma"]["ranks"], measured["toy:sma-scratch"]["ranks"]
    assert curriculum["attn_out"] < scratch["attn_out"]
    # Exact bases: the counts themselves are deterministic, so README's numbers are checked too.
    assert (curriculum["attn_out"], scratch["attn_out"]) == (3, 15)


def test_both_llcs_converge_and_curriculum_is_smaller_by_two_standard_errors(measured):
    curriculum, scratch = measured["toy:sma"]["llc"], measured["toy:sma-scratch"]["llc"]
    assert curriculum.gamma == scratch.gamma == 1e3 and curriculum.loss_scale == pytest.approx(1e-3)
    assert not curriculum.failed and not scratch.failed
    assert curriculum.converged and scratch.converged, (curriculum.convergence_reason, scratch.convergence_reason)
    combined = math.hypot(curriculum.llc_stderr, scratch.llc_stderr)
    assert scratch.llc - curriculum.llc > 2 * combined, (curriculum, scratch)


def test_readme_states_these_settings():
    """The row must name the calls this file runs, so that a reader can reproduce its numbers."""
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `toy:sma` vs"))
    compact = re.sub(r"\s+", "", row)
    for text in ("sma_data(256,4,seed=7)", 'kind="local"', 'output="kl"', '"attn_out"', "exact=True",
                 'last="outputs"', "interaction_rtol=1e-3", "gamma=1e3", "chains=4", 'draws="auto"',
                 "pilot_steps=50", "γ=10³", "ε=10⁻³"):
        assert text in compact, f"README's toy:sma row does not state {text}"
