"""Report sections as independent, registered units.

A section is one function ``compute(ctx) -> SectionOutput`` from the shared
:class:`~tl_degeneracy.report.context.ReportContext` (model, adapter, batches, settings, seed,
checkpoint directory) to its tables, figures and scalars. The report runs the registered sections in
order, times each, records its settings and library versions, and turns a failure into a skipped
or failed entry instead of a crash. Adding a section is one decorated function::

    @register_section("global_basis", "Global interaction basis", needs_data=True,
                      settings=("n_sequences", "batch_size", "seq_len"), before="llc",
                      methods="METHODS §5")
    def global_basis(ctx):
        ib = tld.interaction_basis(ctx.adapter, ctx.batches, kind="global", edges=False)
        return SectionOutput(tables={"dims": ib.dims}, figures={"spectra": ib.plot_spectra()},
                             headline=f"{int(ib.dims['degenerate'].sum())} degenerate directions")

(sections.py holds the built-in ones.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["SECTIONS", "Section", "SectionOutput", "register_section"]


@dataclass
class SectionOutput:
    """What a section computes. ``tables``: name → DataFrame (each saved as a CSV); ``figures``:
    name → plotly figure; ``values``: name → JSON-able scalars or small arrays; ``headline``: one
    line for the summary; ``notes``: remarks on the result (e.g. a part that does not apply to
    this model); ``settings``: choices the section made beyond the report settings it declared."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    headline: str = ""
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    """A registered section. ``needs_data``: it reads data (so the data must be valid before it
    runs); ``reads``: which of the context's batches it reads (``batches``, or the prefixes
    ``llc_batches`` / ``ib_batches`` cut from them), whose tokens enter its cache key;
    ``settings``: the :class:`ReportSettings` fields it reads (recorded with its result and part of
    its cache key); ``seeded``: its result depends on ``ctx.seed`` (its cache key holds the seed);
    ``methods``: where docs/methods.md states what it computes."""

    name: str
    title: str
    compute: Callable[..., SectionOutput]
    needs_data: bool
    settings: tuple[str, ...]
    methods: str
    reads: str = "batches"
    seeded: bool = True


#: The context's batches a section may read (``ReportContext``'s attributes of these names).
DATA_VIEWS = ("batches", "llc_batches", "ib_batches")

#: name → Section, in report order.
SECTIONS: dict[str, Section] = {}


def register_section(
    name: str,
    title: str,
    *,
    needs_data: bool,
    settings: tuple[str, ...] = (),
    methods: str = "",
    before: str | None = None,
    reads: str = "batches",
    seeded: bool = True,
) -> Callable[[Callable[..., SectionOutput]], Callable[..., SectionOutput]]:
    """Decorator registering ``compute(ctx) -> SectionOutput`` as section ``name`` (at the end, or
    just before section ``before``). Registering a name again replaces that section in place.
    ``reads`` and ``seeded`` (see :class:`Section`) narrow the section's cache key to what moves its
    result (audit 20a F4: the LLC was recomputed when only ``n_sequences`` changed, its tokens not);
    the defaults, all the data and the seed, are always safe."""
    if before is not None and before not in SECTIONS:
        raise ValueError(f"no section {before!r} to insert before; sections: {', '.join(SECTIONS)}")
    if reads not in DATA_VIEWS:
        raise ValueError(f"section {name!r}: reads={reads!r} is none of the context's batches {DATA_VIEWS}")

    def decorate(compute: Callable[..., SectionOutput]) -> Callable[..., SectionOutput]:
        from .settings import ReportSettings

        known = {f for f in ReportSettings.__dataclass_fields__}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"section {name!r} declares unknown settings {unknown}; settings: {sorted(known)}")
        section = Section(name, title, compute, needs_data, tuple(settings), methods, reads, seeded)
        if name in SECTIONS or before is None:
            SECTIONS[name] = section
        else:
            items = list(SECTIONS.items())
            at = [k for k, _ in items].index(before)
            items.insert(at, (name, section))
            SECTIONS.clear()
            SECTIONS.update(items)
        return compute

    return decorate
