"""``SamplerConfig``: the SGLD sampler's knobs for :func:`~tl_degeneracy.llc.behavioral_llc`, validated."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

SAMPLERS = ("sgld", "rmsprop")
#: Draws of each block of a ``draws="auto"`` run unless ``draws_block`` is given.
DEFAULT_DRAWS_BLOCK = 500
#: Floor of ``gamma="auto"`` unless ``min_gamma`` is given.
DEFAULT_MIN_GAMMA = 1.0
#: s·γ that ``gamma="auto"`` asks of the burn-in (s = η·burnin, the cumulative step): a direction
#: held only by the prior γ reaches 1 − e⁻³ ≈ 95 % of its equilibrium variance (METHODS §1).
GAMMA_RELAXATION = 3.0
#: Most draws of a ``draws="auto"`` run given neither ``max_draws`` nor ``time_limit`` (10× the fixed default).
DEFAULT_MAX_DRAWS = 20_000
#: The first burn-in of ``burnin="auto"`` (the default), before any extension.
DEFAULT_BURNIN = 500
#: Longest burn-in ``burnin="auto"`` extends to unless ``max_burnin`` is given (40× the first one):
#: it bounds the cost of a model whose traces never stop drifting at this γ.
DEFAULT_MAX_BURNIN = 20_000


def _positive_finite(name: str, value) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


@dataclass(frozen=True)
class SamplerConfig:
    """How the tempered posterior of METHODS §1 is sampled (``behavioral_llc`` documents each knob).

    Attributes:
        chains, draws, burnin: chains run together; each runs burnin + draws steps; the estimate
            averages the draws. ``draws="auto"``: a budget instead of a count (estimate.py): the
            chains run ``draws_block`` draws (default :data:`DEFAULT_DRAWS_BLOCK`), then further
            blocks of as many, continuing the same chains, until the convergence verdict of
            METHODS §1 holds, ``max_draws`` draws are reached (default :data:`DEFAULT_MAX_DRAWS`
            when no ``time_limit`` is given) or the next block would end past ``time_limit``
            seconds of the whole call. ``max_draws``, ``time_limit`` and ``draws_block`` are
            refused with a fixed number of draws. ``burnin="auto"`` (the default): a burn-in of
            :data:`DEFAULT_BURNIN` steps, extended while the draws still drift (estimate.py: when the
            verdict fails on drift or split-R̂, the draws become burn-in and the chains draw
            afresh), up to ``max_burnin`` steps (default :data:`DEFAULT_MAX_BURNIN`; refused with a
            given burn-in) and no further once the burn-in's cumulative step s has s·γ ≥
            ``FLAT_RELAXATION`` (convergence.py), past which no direction is still relaxing.
        step_size: η; None for the automatic one (stepsize.py: predicted bias of λ̂ at most
            ``bias_bound``, stiffest direction's η(nβ h_max + γ)/4 at most ``stiff_bound``).
        gamma: localization γ of the prior centred at θ*, or ``"auto"``: the smallest γ ≥
            ``min_gamma`` at which the directions only the prior holds equilibrate within the
            burn-in, γ = max(min_gamma, :data:`GAMMA_RELAXATION`/(η · burnin)) (the first block of
            draws stands in for a zero burn-in, the first burn-in for ``burnin="auto"``; :meth:`auto_gamma`).
        min_gamma: the floor of ``gamma="auto"`` (refused with a given γ).
        sampler: ``"sgld"`` or ``"rmsprop"`` (RMSProp-preconditioned SGLD, with ``rms_alpha`` and
            ``rms_eps``).
        bias_bound: target of the predicted relative step-size bias of λ̂ for the automatic step
            size (< 1; stepsize.py).
        stiff_bound: largest η (nβ h_max + γ)/4 of the automatic step size (< 1: stability of the
            stiffest direction).
        pilot_steps: length of each pilot run of the automatic step size; None (default): scaled to
            the budget, min(200, max(20, (burnin + draws)//10)) (:attr:`pilot_length`), so that
            the pilots do not dominate short runs. A given value is used as given.
        checkpoint_every: steps between checkpoints (with ``checkpoint_dir``).
        compile: compile the loss and gradient of the sampling steps with ``torch.compile``.

    Every value is checked when the config is made (ValueError with the rule it breaks).
    """

    chains: int = 8
    draws: int | str = 2000
    burnin: int | str = "auto"
    step_size: float | None = None
    gamma: float | str = 1.0
    sampler: str = "sgld"
    bias_bound: float = 0.05
    stiff_bound: float = 0.5
    rms_alpha: float = 0.99
    rms_eps: float = 0.1
    pilot_steps: int | None = None
    checkpoint_every: int = 512
    compile: bool = False
    max_draws: int | None = None
    time_limit: float | None = None
    draws_block: int | None = None
    min_gamma: float | None = None
    max_burnin: int | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}; got {self.sampler!r}")
        if isinstance(self.draws, str) and self.draws != "auto":
            raise ValueError(f"draws must be an integer ≥ 1 or \"auto\"; got {self.draws!r}")
        if isinstance(self.burnin, str) and self.burnin != "auto":
            raise ValueError(f"burnin must be an integer ≥ 0 or \"auto\"; got {self.burnin!r}")
        if self.max_burnin is not None and not self.auto_burnin:
            raise ValueError(f"max_burnin bounds burnin=\"auto\"; with burnin={self.burnin!r} the burn-in is fixed: "
                             "pass burnin=\"auto\" or leave max_burnin out")
        if not self.auto:
            given = [n for n in ("max_draws", "time_limit", "draws_block") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set a budget for draws=\"auto\"; with draws={self.draws!r} "
                                 "the run has a fixed length: pass draws=\"auto\" or leave them out")
        for name, low in (("chains", 1), ("draws", 1), ("burnin", 0), ("checkpoint_every", 1), ("pilot_steps", 1),
                          ("max_draws", 1), ("draws_block", 1), ("max_burnin", 0)):
            value = getattr(self, name)
            if ((name in ("pilot_steps", "max_draws", "draws_block", "max_burnin") and value is None)
                    or (name == "draws" and self.auto) or (name == "burnin" and self.auto_burnin)):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}; got {value!r}")
        gamma = self.gamma
        if isinstance(gamma, str):
            if gamma != "auto":
                raise ValueError(f"gamma must be a finite number ≥ 0 or \"auto\"; got {gamma!r}")
        elif not (isinstance(gamma, (int, float, np.floating, np.integer)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number ≥ 0 or \"auto\"; got {gamma!r}")
        if self.min_gamma is not None:
            if not self.auto_gamma_on:
                raise ValueError(f"min_gamma is the floor of gamma=\"auto\"; with gamma={gamma!r} it has no effect: "
                                 "pass gamma=\"auto\" or leave it out")
            _positive_finite("min_gamma", self.min_gamma)
        if self.step_size is not None:
            _positive_finite("step_size", self.step_size)
        _positive_finite("bias_bound", self.bias_bound)
        if not self.bias_bound < 1:
            # η(nβ h + γ)/4 ≥ 1 is past the stability limit of the stiffest direction (λ̂ ∝ 1/(1 − b)).
            raise ValueError(f"bias_bound must be < 1 (it is a relative bias of λ̂); got {self.bias_bound!r}")
        _positive_finite("stiff_bound", self.stiff_bound)
        if not self.stiff_bound < 1:
            # η(nβ h + γ)/4 ≥ 1 is past the stability limit of the stiffest direction.
            raise ValueError(f"stiff_bound must be < 1 (the stability limit of the stiffest direction); got {self.stiff_bound!r}")
        if not (isinstance(self.rms_alpha, (int, float, np.floating)) and 0 <= self.rms_alpha < 1):
            raise ValueError(f"rms_alpha must satisfy 0 ≤ rms_alpha < 1; got {self.rms_alpha!r}")
        _positive_finite("rms_eps", self.rms_eps)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False; got {self.compile!r}")
        if self.time_limit is not None:
            _positive_finite("time_limit", self.time_limit)

    @property
    def auto(self) -> bool:
        """Whether the draws are a budget (``draws="auto"``) rather than a count."""
        return isinstance(self.draws, str)

    @property
    def auto_burnin(self) -> bool:
        """Whether the burn-in is extended while the draws drift (``burnin="auto"``)."""
        return isinstance(self.burnin, str)

    @property
    def initial_burnin(self) -> int:
        """The burn-in before any extension: the given one, or :data:`DEFAULT_BURNIN` for ``"auto"``."""
        return DEFAULT_BURNIN if self.auto_burnin else int(self.burnin)

    @property
    def burnin_budget(self) -> int:
        """Longest burn-in of ``burnin="auto"``: ``max_burnin``, default :data:`DEFAULT_MAX_BURNIN`."""
        return DEFAULT_MAX_BURNIN if self.max_burnin is None else int(self.max_burnin)

    @property
    def auto_gamma_on(self) -> bool:
        """Whether γ is chosen from the budget (``gamma="auto"``)."""
        return isinstance(self.gamma, str)

    @property
    def gamma_floor(self) -> float:
        """The γ the pilots run at and ``gamma="auto"`` never goes below (the given γ otherwise)."""
        if self.auto_gamma_on:
            return DEFAULT_MIN_GAMMA if self.min_gamma is None else float(self.min_gamma)
        return float(self.gamma)

    def auto_gamma(self, step_size: float) -> float:
        """γ = max(floor, GAMMA_RELAXATION/(η · T)) with T the burn-in (the first block of draws when
        the burn-in is 0): the smallest γ at which a direction that only the prior holds — variance
        1 − exp(−γ s) of its equilibrium after cumulative step s = ηT (sampler.py; research/
        llc_convergence.md: plateaus at s·γ ≈ 2–5) — is within e⁻³ ≈ 5 % of equilibrium when the
        draws that λ̂ averages begin. Directions with curvature relax faster (rate nβh + γ) and
        would need no more than the floor, but the rule cannot tell them apart: with an automatic η
        (η·nβ about constant) it sets γ ∝ nβ for every model, and the prior then holds a share
        γ/(nβh + γ) of each direction (METHODS §1, corrected). The given γ for a number."""
        if not self.auto_gamma_on:
            return float(self.gamma)
        window = self.initial_burnin or self.first_draws
        return max(self.gamma_floor, GAMMA_RELAXATION / (step_size * window))

    @property
    def draw_budget(self) -> int | None:
        """Most draws of a ``draws="auto"`` run (None: only ``time_limit`` bounds it)."""
        if self.max_draws is not None or self.time_limit is not None:
            return self.max_draws
        return DEFAULT_MAX_DRAWS

    @property
    def first_draws(self) -> int:
        """Draws of the first (for a fixed count: the only) block."""
        if not self.auto:
            return int(self.draws)
        block = DEFAULT_DRAWS_BLOCK if self.draws_block is None else int(self.draws_block)
        return block if self.draw_budget is None else min(block, self.draw_budget)

    def fixed(self, draws: int, burnin: int | None = None) -> SamplerConfig:
        """This config with a fixed number of draws (a ``draws="auto"`` run's blocks so far) and a
        fixed burn-in (``burnin``, default the first: a ``burnin="auto"`` run's extended one)."""
        burnin = self.initial_burnin if burnin is None else int(burnin)
        return replace(self, draws=int(draws), burnin=burnin, max_draws=None, time_limit=None, draws_block=None,
                       max_burnin=None)

    @property
    def steps(self) -> int:
        """Steps per chain: burn-in and draws (for ``draws="auto"``: of the first block; for
        ``burnin="auto"``: the first burn-in)."""
        return self.initial_burnin + self.first_draws

    @property
    def pilot_length(self) -> int:
        """Steps of each pilot run: ``pilot_steps`` if given, else a tenth of the chains' steps
        between 20 and 200 (200 at the default budget of 2500 steps)."""
        if self.pilot_steps is not None:
            return int(self.pilot_steps)
        return min(200, max(20, self.steps // 10))

    @property
    def rmsprop(self) -> bool:
        return self.sampler == "rmsprop"

    @property
    def rms_factor(self) -> float:
        """What RMSProp's preconditioner (at most 1/rms_eps) asks of η: the automatic η is multiplied
        by it, so that the largest preconditioned step keeps the bias bound (1 for plain SGLD)."""
        return self.rms_eps if self.rmsprop else 1.0

    @classmethod
    def merged(cls, config: SamplerConfig | None, **given) -> SamplerConfig:
        """``config`` (default: the defaults) with every knob in ``given`` that is not None in its place."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"unknown sampler option(s) {unknown}; SamplerConfig has {sorted(known)}")
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a SamplerConfig; got {type(config).__name__}")
        return replace(config or cls(), **{k: v for k, v in given.items() if v is not None})
