"""Budgets of the degeneracy report: how much data each analysis reads and how long the LLC samples.

Two presets: ``quick`` (the default; ``tl-degeneracy report`` on the bundled ``toy:bytelm`` stays
well under two minutes on 2 CPU cores) and ``thorough`` (estimates worth quoting). Any field can be
overridden: ``degeneracy_report(..., overrides={"draws": 500})`` or ``tl-degeneracy report --set
draws=500``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..llc import DEFAULT_NBETA

__all__ = ["PRESETS", "ReportSettings", "resolve_settings"]


@dataclass(frozen=True)
class ReportSettings:
    """What the sections read and how hard they work.

    Statistics (synchronization, counts, activations) use the first ``n_sequences`` sequences of the
    data in batches of ``batch_size`` (``seq_len``: cut longer sequences into chunks of that length).
    The behavioral LLC (METHODS §1) samples on the first ``llc_sequences`` of them, each cut to its
    first ``llc_seq_len`` tokens (None: whole), full batch: ``chains`` chains of ``burnin`` SGLD
    steps and then blocks of ``draws`` draws, continued until the chains pass the convergence
    checks of METHODS §1 or the budget is spent (``behavioral_llc(draws="auto")``): at most
    ``llc_max_draws`` draws (the first block always runs: at most one block where it is ≤
    ``draws``), and no block that would end past ``llc_time_limit`` seconds per run
    (None: no limit); a run whose budget ran out is reported as not converged, a lower bound, with
    that reason. Pilot runs of ``pilot_steps`` steps choose the step size unless ``step_size`` (η)
    is given. It is estimated at ``loss_scale`` (ε = 1/nβ) and localization ``gamma`` (a number, or
    ``"auto"``: the smallest γ ≥ ``min_gamma`` at which the chains equilibrate within the burn-in,
    3/(η·burnin); METHODS §1), swept over ``loss_scales`` for N_eff(ε, γ), and, when ``gammas`` is
    not empty, over those γ at ``loss_scale`` (the γ-curve); each of these runs has the budget.
    ``llc_params``: restrict the LLC to a selection of parameters (``select_parameters`` spellings,
    e.g. ``"blocks.29.attn"``; None: every live parameter), a restricted LLC (METHODS §1).
    ``llc_compile``: compile the SGLD steps (``behavioral_llc(compile=True)``): faster per step
    after a one-off compilation, which pays off on the thorough preset's long chains.
    ``sync_tol``: the tolerance of head and neuron synchronization (METHODS §3): the heads' mean
    total-variation distance of attention patterns; for neurons, both the mean squared difference of
    their firing patterns and the relative energy by which their outputs would change on swapping
    patterns (paper eq. 20; 0.05 ≈ 22 % RMS);
    ``n_probes``: Jacobian probes per batch for the counts' K Grams (METHODS §4).

    The local interaction basis (METHODS §5) reads the first sequences, each cut to its first
    ``ib_seq_len`` tokens (None: whole), as many as fit in ``ib_tokens`` tokens (at least one; a
    token budget, since its cost grows with the tokens and toys' sequences differ in length from 3
    to 128 tokens), in batches of ``batch_size``, with ``ib_probes`` Jacobian probes per batch and
    pass; its edges are exact (one forward-mode JVP per direction) unless ``ib_edge_sources`` = r
    asks for the unbiased estimate with r random ±1 position sources where that is cheaper. Modules
    (METHODS §6) keep the edges holding ``ib_keep_share`` of each layer pair's edge mass and use
    modularity resolution ``ib_resolution``.

    ``section_time``: seconds that the interaction and LLC sections may each take (None: no limit).
    Their time is predicted from passes timed on the model (scope.py), and what the user did not
    set is lowered until it fits: the interaction basis's ``ib_tokens``, then the LLC's scope
    (``llc_params`` = the last layer's attention, fewer ``llc_sequences`` and ``llc_seq_len``, the
    main loss scale only); the report header says what changed. On small models nothing does.
    """

    n_sequences: int = 64
    batch_size: int = 16
    seq_len: int | None = None
    sync_tol: float = 0.05
    n_probes: int = 4
    loss_scale: float = 1.0 / DEFAULT_NBETA
    loss_scales: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    llc_sequences: int = 4
    llc_seq_len: int | None = 32
    chains: int = 4
    draws: int = 200
    burnin: int = 200
    pilot_steps: int = 20
    llc_max_draws: int = 2000
    llc_time_limit: float | None = 80.0
    step_size: float | None = None
    gamma: float | str = "auto"
    min_gamma: float = 1.0
    gammas: tuple[float, ...] = ()
    llc_params: str | None = None
    llc_compile: bool = False
    ib_tokens: int = 512
    ib_seq_len: int | None = 64
    ib_probes: int = 4
    ib_edge_sources: int | None = None
    ib_keep_share: float = 0.99
    ib_resolution: float = 1.0
    #: Run the sparsity section (``tld.sparsify``, METHODS §8; several passes over the data): thorough only.
    sparsity: bool = False
    #: Memory budget in bytes of every section (``--memory 8G``), beyond the loaded model and data;
    #: None: a share of the memory available on the model's device once they are loaded
    #: (``tld.memory.default_budget``). For the statistics sections, sequence length and batch size not
    #: set explicitly are lowered until each pass fits it (``ReportContext.fit_memory``); the interaction
    #: basis and the LLC fail first where a pass would not fit.
    memory: int | None = None
    section_time: float | None = 300.0

    def __post_init__(self) -> None:
        for name in ("n_sequences", "batch_size", "n_probes", "llc_sequences", "chains", "draws", "pilot_steps",
                     "llc_max_draws", "ib_tokens", "ib_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"report setting {name} must be an integer ≥ 1; got {value!r}")
        if isinstance(self.burnin, bool) or not isinstance(self.burnin, int) or self.burnin < 0:
            raise ValueError(f"report setting burnin must be an integer ≥ 0; got {self.burnin!r}")
        for name in ("seq_len", "llc_seq_len", "ib_seq_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"report setting {name} must be None or an integer ≥ 2; got {value!r}")
        if self.llc_params is not None and not (isinstance(self.llc_params, str) and self.llc_params.strip()):
            raise ValueError(f"report setting llc_params must be None or a parameter selection; got {self.llc_params!r}")
        for name in ("llc_time_limit", "step_size", "section_time"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"report setting {name} must be None or a finite number > 0; got {value!r}")
        if not isinstance(self.llc_compile, bool):
            raise ValueError(f"report setting llc_compile must be true or false; got {self.llc_compile!r}")
        e = self.ib_edge_sources
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise ValueError(f"report setting ib_edge_sources must be None (exact edges) or an integer ≥ 1; got {e!r}")
        if not (_number(self.ib_keep_share) and 0.0 < self.ib_keep_share < 1.0):
            raise ValueError(f"report setting ib_keep_share must lie in (0, 1); got {self.ib_keep_share!r}")
        if not (_number(self.ib_resolution) and math.isfinite(self.ib_resolution) and self.ib_resolution > 0):
            raise ValueError(f"report setting ib_resolution must be a finite number > 0; got {self.ib_resolution!r}")
        if not _number(self.sync_tol) or not 0.0 <= self.sync_tol <= 1.0:
            raise ValueError(f"report setting sync_tol must be a number in [0, 1]; got {self.sync_tol!r}")
        if not isinstance(self.sparsity, bool):
            raise ValueError(f"report setting sparsity must be true or false; got {self.sparsity!r}")
        if not (self.gamma == "auto" or (isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool)
                                         and math.isfinite(self.gamma) and self.gamma >= 0)):
            raise ValueError(f"report setting gamma must be \"auto\" or a finite number ≥ 0; got {self.gamma!r}")
        for name, values in (("min_gamma", (self.min_gamma,)), ("gammas", self.gammas)):
            if not all(_number(g) and math.isfinite(g) and g > 0 for g in values):
                raise ValueError(f"report setting {name} must hold finite numbers > 0; got {values!r}")
        for eps in (self.loss_scale, *self.loss_scales):
            if not (_number(eps) and math.isfinite(eps) and eps > 0):
                raise ValueError(f"loss scales must be finite numbers > 0; got {eps!r}")
        if self.memory is not None and (isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1):
            raise ValueError(f"report setting memory must be None or a number of bytes ≥ 1 (8G, 512M, …); got {self.memory!r}")
        if not self.loss_scales:
            raise ValueError("report setting loss_scales is empty")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> ReportSettings:
        """A copy with some fields changed; values may be strings (``"500"``, ``"1e-2,1e-3"``,
        ``"none"``) as they come from the command line."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown report setting(s) {unknown}; settings: {', '.join(fields)}")
        return dataclasses.replace(self, **{k: _parse(k, v, getattr(self, k)) for k, v in overrides.items()})


def _number(value) -> bool:
    """A real number (numpy's included), not a bool (True would pass as 1: audit 16b F7)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


#: Fields that may be None (``--set ib_seq_len=none``).
_OPTIONAL = ("seq_len", "llc_seq_len", "ib_seq_len", "ib_edge_sources", "llc_time_limit", "step_size", "llc_params",
             "section_time")
#: Optional fields that hold numbers with a fraction (their default None says nothing of the type).
_FLOATS = ("llc_time_limit", "step_size", "section_time")


def _value_kind(name: str, current) -> tuple[type | None, str]:
    """The type a setting's string converts to (None: kept as text) and how to name it in a message."""
    optional = " or none" if name in _OPTIONAL else ""
    if isinstance(current, tuple):
        return tuple, "numbers separated by commas"
    if name == "llc_params":
        return None, "a parameter selection or all"
    if isinstance(current, bool):
        return bool, "true or false"
    if isinstance(current, float) or name in _FLOATS or name == "gamma":
        return float, "a number" + (" or auto" if name == "gamma" else optional)
    return int, "an integer" + optional


def _parse(name: str, value, current):
    """Convert a command-line string to the type of the field it sets (ints, floats, None, tuples)."""
    if not isinstance(value, str):
        if not isinstance(current, tuple):
            return value
        # one number for a list of them is one scale (audit 16b F7: a raw "'float' object is not iterable")
        values = (value,) if _number(value) else value
        try:
            return tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise ValueError(f"report setting {name} must be a number or a list of numbers; got {value!r}") from None
    text = value.strip()
    if name == "memory":  # a size: 8G, 512M, 1.5GiB, or bytes; none/auto for the default share
        from ..memory import parse_memory

        return None if text.lower() in ("none", "auto") else parse_memory(text)
    kind, words = _value_kind(name, current)
    try:
        if kind is tuple:
            return tuple(float(v) for v in text.split(",") if v.strip())
        if text.lower() == "none" and name in _OPTIONAL or (name == "llc_params" and text.lower() == "all"):
            return None
        if kind is None:
            return text
        if name == "gamma" and text.lower() == "auto":
            return "auto"
        if kind is bool:
            return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
        return kind(text)
    except (ValueError, KeyError):
        raise ValueError(f"report setting {name}={value!r}: not a valid value: {words} (now {current!r})") from None


#: Named budgets. ``quick``: the numbers above (an LLC run starts no block that would end past 80 s,
#: pilots included; with γ = "auto" the chains equilibrate within the 200 burn-in steps, so on
#: toy:bytelm the main run converges: BENCHMARKS.md, "LLC presets"); ``thorough``: 8× the
#: statistics data, 8 chains on twice the LLC tokens (blocks of 500 draws after 500 burn-in, up to
#: 4000, at most 300 s per run), a finer sweep over ε, the γ-curve at 10³, 10⁴, 10⁵ beside the
#: automatic γ, an interaction basis on 8× the tokens with 4× the probes, and no time fit
#: (``section_time`` None: the whole model, however long it takes).
PRESETS: dict[str, ReportSettings] = {
    "quick": ReportSettings(),
    "thorough": ReportSettings(
        n_sequences=512, batch_size=32, n_probes=16, loss_scales=(1e-2, 3e-3, 1e-3, 3e-4, 1e-4),
        llc_sequences=8, llc_seq_len=32, chains=8, draws=500, burnin=500, pilot_steps=50, gammas=(1e3, 1e4, 1e5),
        llc_max_draws=4000, llc_time_limit=300.0, ib_tokens=4096, ib_seq_len=128, ib_probes=16,
        sparsity=True, section_time=None,
    ),
}


def resolve_settings(preset: str | ReportSettings, overrides: dict | None = None) -> ReportSettings:
    """The preset (a name in :data:`PRESETS`, or settings themselves) with ``overrides`` applied."""
    if isinstance(preset, ReportSettings):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return base.replace(**overrides) if overrides else base
