"""Convergence verdict of an LLC run (METHODS §1, "Convergence").

λ̂ is reported as converged only when, over the post-burn-in traces nβ·L_B,b_t(θ_t) of the healthy
chains [C, T]:

(i) the split-R̂ is ≤ :data:`RHAT_MAX`: ArviZ's rank-normalised split-R̂ (Vehtari, Gelman, Simpson,
    Carpenter & Bürkner 2021: every chain split in halves, Gelman–Rubin on the rank-normalised
    draws and on their folded values, the larger of the two), ``arviz_stats.base.array_stats.rhat``;
(ii) the bulk effective sample size (same paper, ``array_stats.ess(method="bulk")``) is ≥
    :data:`ESS_MIN`;
(iii) no drift: the mean of the last half of the draws is within :data:`DRIFT_MAX` standard errors of
    the mean of the first half (module function :func:`assess_convergence` says how the standard
    errors are computed);
(iv) at most :data:`DIVERGED_MAX` of the chains diverged. Diverged chains are left out of λ̂, and
    chains diverge where the loss is large, so dropping many of them biases λ̂ low;
(v) relaxation (equipartition): with U = nβ·L_B + (γ/2)‖θ − θ*‖² the posterior's potential, the
    stationary distribution ∝ e^{−U} has E[(θ − θ*)·∇U] = d, the number of sampled coordinates
    (integration by parts), whatever the model. Every chain starts at θ*, and a direction of
    curvature a (nβh + γ) contributes a·δ² → 1 only after its variance has relaxed, as 1 − e^{−a·s}
    in the cumulative step s: the draws' mean of δ·∇U over d, the *relaxation* r, falls short of 1 by
    the share of directions still spreading from θ* (at a finite step it lies slightly above 1,
    METHODS (1.7)). r must be at least :data:`RELAXED_MIN` = 1 − e^{−3}, the equilibrium that
    ``gamma="auto"`` asks of the directions only γ holds (config.py, ``GAMMA_RELAXATION``).
    Split-R̂, ESS and the drift test cannot see this: every chain starts at θ* and shares the
    transient, and the slow directions move the loss too little for the drift test to notice (a
    linear regression with 30 weak directions read 7.46 ± 0.18 "converged" against an exact 8.71).
    An unrelaxed run is a lower bound only where its draws still rise, and uncertain in both
    directions otherwise: the directions still spreading may carry no loss at all, or less where the
    chains are headed than at θ* (audit 14a F4);
(vi) the step size: r at most :data:`RELAXED_MAX` (two standard errors allowed). Far above 1 it says
    the discretisation spreads the chains beyond the posterior, which more draws do not change: λ̂
    reads high, and only a smaller step fixes it.

R̂ and ESS come from ArviZ (the field's reference implementation), not from code of this package.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from jaxtyping import Float

from .config import GAMMA_RELAXATION

#: Largest split-R̂ of a converged run (METHODS §1).
RHAT_MAX = 1.05
#: Smallest bulk effective sample size of a converged run (METHODS §1).
ESS_MIN = 100.0
#: Largest |z| between the means of the draws' last and first halves (≈ 95 % two-sided).
DRIFT_MAX = 2.0
#: Largest fraction of diverged chains of a converged run.
DIVERGED_MAX = 0.25
#: Relaxation of a direction that only the prior γ holds: its variance reaches 1 − e^{−ηγt} of the
#: stationary 1/(nβ·0 + γ) after t steps, so ηγt = 5 leaves < 1 %. Directions with curvature relax faster.
FLAT_RELAXATION = 5.0
#: Smallest relaxation r = mean δ·∇U / d of a converged run (criterion (v)): within e⁻³ of equilibrium,
#: as ``gamma="auto"`` asks of the directions only γ holds.
RELAXED_MIN = 1 - math.exp(-GAMMA_RELAXATION)
#: Largest relaxation of a converged run (criterion (vi)): a finite step raises r above 1 by about its
#: relative excess of spread in the directions it samples (METHODS (1.7)); half again of equilibrium
#: means the chains sample a distribution far wider than the posterior, and λ̂ reads high (audit 17b F2:
#: a given η with b_max = 0.9 read 24.7 for λ = 5 at r = 4.95, "converged").
RELAXED_MAX = 1.5


class ConvergenceWarning(RuntimeWarning):
    """An LLC run that fails the convergence criteria of METHODS §1 (its λ̂ is a lower bound where
    the draws were still rising or many chains diverged, and uncertain beyond its ± otherwise)."""


@dataclass(frozen=True)
class Convergence:
    """The verdict on one run's traces (module docstring) and what would fix a failed one.

    ``failed`` maps each failed criterion (``"rhat"``, ``"ess"``, ``"drift"``, ``"diverged"``,
    ``"relaxation"``, ``"step_size"``) to a
    sentence with its numbers; ``suggestions`` are the budgets or settings that would address them.
    ``drift`` is z = (mean_last − mean_first)/√(se_first² + se_last²); ``drift_means`` and
    ``drift_stderrs`` are (first half, last half). ``divergence`` says how many chains diverged and
    what leaving them out does ("" when none did). ``mcse``: ArviZ's Monte-Carlo standard error of
    the mean of all the healthy chains' draws, sd/√ESS_mean (a second estimate of λ̂'s standard
    error, from every draw rather than from the spread of a few chain means). ``relaxation`` and
    ``relaxation_mcse``: r = mean δ·∇U / d of the healthy chains' draws and its Monte-Carlo standard
    error (criterion (v); NaN where the run recorded no δ·∇U).
    """

    converged: bool
    rhat: float
    ess: float
    drift: float
    drift_means: tuple[float, float]
    drift_stderrs: tuple[float, float]
    n_diverged: int
    diverged_chains: tuple[int, ...]
    chains: int
    draws: int
    failed: dict[str, str] = field(default_factory=dict)
    suggestions: tuple[str, ...] = ()
    suggested_draws: int | None = None
    suggested_burnin: int | None = None
    divergence: str = ""
    mcse: float = float("nan")
    relaxation: float = float("nan")
    relaxation_mcse: float = float("nan")

    @property
    def lower_bound(self) -> bool:
        """Whether the failure biases λ̂ low: draws still rising (a failed drift test with z > 0, or
        unfinished relaxation (v) while the draws' second half averages above the first), or many
        diverged chains, which are left out where the loss is largest. R̂ or ESS alone (too few
        draws for chains that disagree) leave λ̂ uncertain in both directions (audit 8a: 4 of 8 such
        runs of a regression above the exact value), and so does unfinished relaxation with draws
        that do not rise (corrected, audit 14a F4): the directions still spreading may carry no loss
        at all (exactly flat ones: 2.618 ± 0.056 against 2.611 exact) or cost less where the chains
        are headed than at θ* (a rank-2 deep linear network's gauge directions: 4.31, 4.18, 4.16 at
        burn-in 500, λ = 4). Never where the step size failed (vi): it raises λ̂."""
        if "step_size" in self.failed:  # (vi): the step raises λ̂ (with diverged chains dropped too: both ways)
            return False
        return "diverged" in self.failed or (self.drift > 0 and bool(self.failed.keys() & {"drift", "relaxation"}))

    @property
    def reason(self) -> str:
        """The failed criteria in words ("" when converged)."""
        return "; ".join(self.failed.values())

    @property
    def brief(self) -> str:
        """The failed criteria in a few words with their numbers, for one-line verdicts ("" when converged)."""
        # No "<" or ">": the words go into HTML pages and are compared there as text.
        words = {
            "rhat": (f"R̂ {apart_from(self.rhat, RHAT_MAX)} (max {RHAT_MAX})" if math.isfinite(self.rhat)
                     else "R̂ undefined"),
            "ess": (f"ESS {apart_from(self.ess, ESS_MIN)} (min {ESS_MIN:g})" if math.isfinite(self.ess)
                    else "ESS undefined"),
            "drift": f"drift z = {self.drift:+.2g} (max ±{DRIFT_MAX:g})" if not math.isnan(self.drift) else "drift undefined",
            "diverged": f"{self.n_diverged}/{self.chains} chains diverged",
            "relaxation": f"relaxation {self.relaxation:.1%} (min {RELAXED_MIN:.0%})",
            "step_size": f"relaxation {self.relaxation:.0%} (max {RELAXED_MAX:.0%}): step size too large",
        }
        return ", ".join(words[k] for k in self.failed)

    def to_dict(self) -> dict:
        d = asdict(self)
        # lower_bound here is the traces' reading alone; LLCResult.lower_bound also asks the step size's bias.
        d.update(reason=self.reason, brief=self.brief, lower_bound=self.lower_bound, thresholds={"rhat": RHAT_MAX, "ess": ESS_MIN, "drift": DRIFT_MAX,
                                                 "diverged_fraction": DIVERGED_MAX, "relaxation": RELAXED_MIN,
                                                 "relaxation_max": RELAXED_MAX})
        d["drift_means"], d["drift_stderrs"] = list(self.drift_means), list(self.drift_stderrs)
        d["diverged_chains"] = list(self.diverged_chains)
        return d

    def message(self, llc: float, quantity: str = "λ̂", step_biased: bool = False) -> str:
        """The text of the :class:`ConvergenceWarning`: which ``quantity`` (e.g. ``λ̂(ε = 0.001, γ = 1)``),
        what failed, with the numbers, and the budget. ``step_biased``: the step size is predicted to
        raise λ̂ beyond ``llc_result.BIAS_FLAG``, so a failure that reads low makes no lower bound."""
        how = ("so read it as too high" if self.failed.keys() & {"step_size", "diverged"} == {"step_size"} else
               "so it is uncertain beyond its ± in either direction (the step size raises it, the diverged chains "
               "left out lower it)" if "step_size" in self.failed else
               "so read it as a lower bound" if self.lower_bound and not step_biased else
               "so it is uncertain beyond its ± in either direction"
               + (" (it would read low, but the step size raises it: see the step size's warning)"
                  if self.lower_bound else ""))
        text = f"{quantity} = {llc:.4g} is not converged (METHODS §1), {how}: {self.reason}"
        if self.divergence and "diverged" not in self.failed:
            text += f"; {self.divergence}"
        if self.suggestions:
            text += ". Suggested: " + "; ".join(self.suggestions)
        return text


def _arviz(ary: np.ndarray) -> tuple[float, float]:
    """ArviZ's rank-normalised split-R̂ and bulk ESS of draws [chains, draws] (NaN where undefined:
    fewer than 2 chains or 4 draws, or a constant trace)."""
    from arviz_stats.base import array_stats

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # A constant or too short trace makes ArviZ divide by zero; its NaN is the answer.
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat = float(array_stats.rhat(ary, chain_axis=0, draw_axis=1))
        ess = float(array_stats.ess(ary, chain_axis=0, draw_axis=1, method="bulk"))
    return rhat, ess


def _mean_mcse(ary: np.ndarray) -> tuple[float, float]:
    """Mean of draws [chains, draws] and its Monte-Carlo standard error sd/√ESS_mean (ArviZ's mcse)."""
    from arviz_stats.base import array_stats

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        se = float(array_stats.mcse(ary, chain_axis=0, draw_axis=1, method="mean"))
    return float(ary.mean()), se



def apart_from(value: float, limit: float) -> str:
    """``value`` with 3 significant digits, or as many more as it takes not to print as ``limit``
    (R̂ 1.0517 reads "1.052 > 1.05", not "1.05 > 1.05")."""
    for digits in range(3, 10):
        text = f"{value:.{digits}g}"
        if float(text) != float(f"{limit:.{digits}g}"):
            return text
    return f"{value!r}"

def assess_convergence(
    draws: Float[np.ndarray, "C T"],
    diverged: Mapping[int, int] | None = None,
    *,
    virial: Float[np.ndarray, "C T"] | None = None,
    n_coordinates: int | None = None,
    step_size: float | None = None,
    gamma: float | None = None,
    burnin: int | None = None,
    divergence_advice: str = "",
    automatic_step: bool = False,
) -> Convergence:
    """The convergence verdict of METHODS §1 on the post-burn-in traces ``draws`` [chains, draws] of
    nβ·L_B (the values λ̂ averages).

    ``diverged`` maps diverged chains (rows of ``draws``; their NaNs are ignored) to the step they
    failed at; R̂, ESS and drift use the other chains only. The drift z compares the means of the
    first and the last ⌊T/2⌋ draws of those chains. Each half's standard error is ArviZ's
    Monte-Carlo standard error of the mean, sd/√ESS_mean, where ESS_mean (Vehtari et al. 2021)
    counts the draws as fewer by the chains' autocorrelation and by disagreement between chains, so
    a slowly mixing chain does not pass for many independent draws. The halves are treated as
    independent; their covariance is positive for a correlated chain, so this over-states the
    standard error of the difference and errs towards "no drift" (R̂ and ESS catch slow mixing).

    ``virial`` [chains, draws]: δ·∇U of the same draws and chains, with ``n_coordinates`` = d the
    sampled coordinates, for criterion (v) (skipped when None or not finite throughout: a run, or part of
    one resumed from an older checkpoint, that recorded none).

    ``step_size``, ``gamma`` and ``burnin`` (the run's η, γ and burn-in) make the suggested budget
    concrete: a burn-in of 5/(ηγ) steps, which equilibrates even the directions only the prior γ
    holds (:data:`FLAT_RELAXATION`), at least twice the burn-in that failed, or the γ that does so
    within the given burn-in (within as many steps as there are draws where the burn-in is 0). A
    burn-in whose cumulative step ηT already has ηγT ≥ 5 has relaxed every direction: chains that
    still disagree sit in different regions, which more draws or chains (or a larger γ) address.
    ``divergence_advice`` is what to change when too many chains diverged; ``automatic_step``: η was
    chosen for a bias bound, so a step too large (vi) is lowered through that bound.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim != 2:
        raise ValueError(f"draws must be [chains, draws]; got shape {draws.shape}")
    C, T = draws.shape
    diverged = {int(c): int(s) for c, s in (diverged or {}).items()}
    bad = [c for c in diverged if not 0 <= c < C]
    if bad:
        raise ValueError(f"diverged chains {bad} are not rows of draws (shape {draws.shape})")
    healthy = np.array([c for c in range(C) if c not in diverged], dtype=int)
    ok = draws[healthy]
    if not np.isfinite(ok).all():
        raise ValueError("draws of chains not marked as diverged must be finite")
    nan = float("nan")
    rhat, ess = _arviz(ok) if len(healthy) else (nan, nan)
    mcse = _mean_mcse(ok)[1] if len(healthy) and T >= 4 else nan
    half = T // 2
    if len(healthy) and half >= 4:  # ArviZ's ESS needs 4 draws per chain
        (m1, s1), (m2, s2) = _mean_mcse(ok[:, :half]), _mean_mcse(ok[:, T - half:])
        se = math.hypot(s1, s2)
        # se = 0: both halves constant (then equal means are no drift, different ones infinite drift).
        drift = (m2 - m1) / se if se > 0 else nan if not se == 0 else 0.0 if m2 == m1 else math.copysign(math.inf, m2 - m1)
    else:
        (m1, s1), (m2, s2), drift = (nan, nan), (nan, nan), nan

    relax, relax_se = nan, nan
    if virial is not None and n_coordinates and len(healthy):
        v = np.asarray(virial, dtype=np.float64)[healthy] / n_coordinates
        if np.isfinite(v).all() and T >= 4:
            relax, relax_se = _mean_mcse(v)

    failed: dict[str, str] = {}
    suggestions: list[str] = []
    if not rhat <= RHAT_MAX:
        failed["rhat"] = (f"split-R̂ {apart_from(rhat, RHAT_MAX)} > {RHAT_MAX}" if math.isfinite(rhat) else
                          f"split-R̂ undefined ({len(healthy)} healthy chains × {T} draws: it needs ≥ 2 chains and ≥ 4 "
                          "draws, and a trace that varies)")
    if not ess >= ESS_MIN:
        failed["ess"] = (f"effective sample size {apart_from(ess, ESS_MIN)} < {ESS_MIN:g}" if math.isfinite(ess) else
                         "effective sample size undefined (too few draws)")
    if not abs(drift) <= DRIFT_MAX:
        failed["drift"] = (f"drift: the last half of the draws averages {m2:.4g} against {m1:.4g} for the first "
                           f"(z = {drift:+.3g}, beyond ±{DRIFT_MAX:g} standard errors)" if not math.isnan(drift) else
                           f"drift undefined ({T} draws: it needs ≥ 8, and a trace that varies)")
    # One-sided: a finite step raises r above 1 (METHODS (1.7)); only a shortfall means unrelaxed directions.
    # The point estimate decides, as for R̂ and ESS: at equilibrium r ≈ 1 lies about one standard error
    # above the threshold for d = 40 coordinates and 4 chains × 2,000 draws (more for larger d), and a
    # false alarm costs a burn-in extension or a "not converged" label, never a wrong "converged".
    if relax < RELAXED_MIN:
        failed["relaxation"] = (
            f"relaxation: the draws' mean δ·∇U is {relax:.1%}"
            + (f" (± {relax_se:.1%})" if math.isfinite(relax_se) else "") + " of its equilibrium value d = "
            f"{n_coordinates:,} (the sampled coordinates; at least {RELAXED_MIN:.0%} needed): directions held only "
            "weakly, by γ or a small curvature, are still spreading from θ*, which may move λ̂ either way")
    if relax - 2 * (relax_se if math.isfinite(relax_se) else 0.0) > RELAXED_MAX:
        failed["step_size"] = (
            f"step size: the draws' mean δ·∇U is {relax:.1%}" + (f" (± {relax_se:.1%})" if math.isfinite(relax_se) else "")
            + f" of its equilibrium value d = {n_coordinates:,}, above {RELAXED_MAX:.0%}: the step spreads the chains "
            "far beyond the posterior (METHODS (1.7)), so λ̂ reads high; more draws do not change it, a smaller "
            "step size does")
    n_div = len(diverged)
    divergence = "" if not n_div else (
        f"{n_div} of {C} chains diverged and are excluded (chain: step {diverged}); chains diverge where the loss is "
        "large, so dropping them biases λ̂ low")
    if n_div > DIVERGED_MAX * C:
        failed["diverged"] = divergence + f" (more than {DIVERGED_MAX:.0%} of the chains)"
        if divergence_advice:
            suggestions.append(divergence_advice)

    suggested_draws = suggested_burnin = None
    if "ess" in failed and math.isfinite(ess) and ess > 0:
        # ESS grows in proportion to the draws once the chains mix: ESS per draw × draws ≥ ESS_MIN.
        suggested_draws = math.ceil(1.1 * T * ESS_MIN / ess)
        suggestions.append(f"draws ≥ {suggested_draws:,} (ESS {ess / T:.3g} per draw now; {ESS_MIN:g} needed)")
    elif "ess" in failed:
        suggested_draws = 4 * T
        suggestions.append(f"draws ≥ {suggested_draws:,}")
    if "rhat" in failed and len(healthy) < 2:
        # No burn-in or draws make R̂ defined on one chain (audit 14a F8: burn-in ran to its maximum, then
        # the advice was a longer one).
        suggestions.append(f"chains ≥ 2 (split-R̂ compares chains; {len(healthy)} healthy chain(s) here)")
    if failed.keys() & {"drift", "relaxation"} or ("rhat" in failed and len(healthy) >= 2):
        relaxed = step_size is not None and gamma is not None and (burnin or 0) * step_size * gamma >= FLAT_RELAXATION
        if relaxed and not failed.keys() & {"drift", "relaxation"}:
            suggestions.append(
                f"more draws or chains, or a larger γ: the burn-in's cumulative step has ηγ·burnin = "
                f"{burnin * step_size * gamma:.3g} ≥ {FLAT_RELAXATION:g}, so every direction has relaxed and the chains "
                "that still disagree sit in different regions of the posterior (no longer burn-in would change that)")
        elif step_size is not None and gamma is not None and gamma > 0:
            suggested_burnin = max(math.ceil(FLAT_RELAXATION / (step_size * gamma)), 2 * (burnin or 0))
            text = (f"longer chains: burnin ≈ {suggested_burnin:,} steps (5/(ηγ) equilibrates even the directions only "
                    "γ holds, an upper bound since curvature shortens it; at least twice the burn-in used)")
            # Without a burn-in, one as long as the draws.
            within = burnin or T
            text += (f", or a larger γ: γ ≈ {FLAT_RELAXATION / (step_size * within):.3g} does so within burnin = "
                     f"{within:,} at this η (a larger γ makes λ̂ more local)")
            suggestions.append(text)
        elif gamma == 0:
            suggestions.append("gamma > 0: with γ = 0 the directions the loss does not constrain never equilibrate")
        else:
            suggestions.append("longer chains (more burnin and draws) or a larger γ")
    if "step_size" in failed:
        # More draws or burn-in do not shrink the step's excess (vi): the other budgets would mislead.
        ceiling = step_size / (relax - 1) * 0.05 if step_size and relax > 1 else None
        smaller = (f" (≤ {ceiling:.2g}: r − 1 scales with it, and about 5 % is a small bias)" if ceiling else "")
        suggestions = [f"a smaller step size{smaller}: give it as step_size, or lower bias_bound or stiff_bound, "
                       "which set the automatic one" if automatic_step else
                       f"a smaller step_size{smaller}, or leave it unset (chosen for a bias bound)"]
        suggested_draws = suggested_burnin = None
    return Convergence(
        converged=not failed, rhat=rhat, ess=ess, drift=float(drift), drift_means=(m1, m2), drift_stderrs=(s1, s2),
        n_diverged=n_div, diverged_chains=tuple(sorted(diverged)), chains=C, draws=T, failed=failed,
        suggestions=tuple(suggestions), suggested_draws=suggested_draws, suggested_burnin=suggested_burnin,
        divergence=divergence, mcse=mcse, relaxation=float(relax), relaxation_mcse=float(relax_se),
    )
