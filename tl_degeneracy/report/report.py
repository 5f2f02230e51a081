"""The degeneracy report as data: sections with their tables, figures, values, settings and timings.

``Report.save(dir)`` writes ``report.json`` (every number, strict JSON: serialize.py), one CSV per
table and ``report.html`` (self-contained, opens offline: html.py); ``Report.load(dir)`` reads the
JSON back.

A directory holds the report of one model on one data set, computed by one package version: the
report's ``identity`` (model weights digest, data digest, tl-degeneracy version) is stored in
report.json, and saving compares it with the report already there. The same identity merges —
sections of this report replace theirs, the others stay (a partial rerun keeps the finished
sections) — and any other identity is refused unless ``replace=True``, which removes the old
report's files first.
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
import textwrap
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import TLDegeneracyError
from .serialize import csv_frame, figure_from_dict, figure_to_dict, table_from_dict, table_to_dict, to_jsonable

__all__ = ["FORMAT", "Report", "ReportDirectoryError", "SectionResult", "check_writable", "identity_conflicts",
           "stored_report", "write_atomic"]

#: The marker in every report.json this package writes: what tells its own report from a file that
#: only has the name (a report is replaced by a fresh start, such a file never is).
FORMAT = "tl-degeneracy-report/1"


class ReportDirectoryError(TLDegeneracyError, ValueError):
    """An output or checkpoint directory the report cannot use: it holds another model's (data set's,
    package version's) report or a damaged checkpoint, or it cannot be written."""

#: Section status: ``ok``; ``skipped`` (the analysis does not apply to this model or data: a
#: MissingHookError, UnsupportedArchitectureError or DataError, with its message); ``failed`` (an
#: EstimateFailedError, a MemoryBudgetError or a NumericalError, a measurement its settings, the
#: memory budget or the model's non-finite numbers made fail, with what to change; or any other
#: error: a bug or an unexpected input, its traceback kept); a warning is issued for each.
STATUSES = ("ok", "skipped", "failed")


@dataclass
class SectionResult:
    """One section of the report. ``cached``: reused from the checkpoint directory of an earlier
    run with the same fingerprint (``wall_s`` is then that run's time); ``kept``: taken over from
    the report already in the output directory, which this run did not recompute (:meth:`Report.merge`)."""

    name: str
    title: str
    status: str
    methods: str = ""
    reason: str | None = None
    traceback: str | None = None
    headline: str = ""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)
    wall_s: float = 0.0
    versions: dict = field(default_factory=dict)
    cached: bool = False
    kept: bool = False

    def when(self, spec: str = ".1f") -> str:
        """Where the result came from where this run did not compute it ("kept": from the report
        already in the directory; "cached": from the checkpoint of an earlier run), else the seconds
        it took (audit 15b: a kept section showed its old time under a header of this run's)."""
        return "kept" if self.kept else "cached" if self.cached else f"{self.wall_s:{spec}} s"

    def csv_name(self, table: str) -> str:
        return f"{self.name}_{table}.csv"

    def __repr__(self) -> str:
        # One line: the dataclass default would print every table and figure.
        tables = ", ".join(f"{k} {t.shape[0]}×{t.shape[1]}" for k, t in self.tables.items())
        status = self.status + (" (kept from an earlier run)" if self.kept else " (cached)" if self.cached else "")
        return (f"<SectionResult {self.name!r} {status}, {self.wall_s:.1f} s: {self.headline or self.reason or ''}"
                f"{'; tables: ' + tables if tables else ''}>")

    def _repr_html_(self) -> str:
        """Jupyter's view: headline, values and the first rows of each table (html.py)."""
        from .html import render_notebook

        return render_notebook(self)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "title", "status", "methods", "reason", "traceback", "headline",
                                          "notes", "warnings", "settings", "values", "wall_s", "versions", "cached",
                                          "kept")}
        d = to_jsonable(d)
        d["tables"] = {name: {"csv": self.csv_name(name), **table_to_dict(t)} for name, t in self.tables.items()}
        d["figures"] = {name: figure_to_dict(f) for name, f in self.figures.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SectionResult:
        plain = {k: v for k, v in d.items() if k not in ("tables", "figures")}
        return cls(**plain, tables={k: table_from_dict(v) for k, v in d.get("tables", {}).items()},
                   figures={k: figure_from_dict(v) for k, v in d.get("figures", {}).items()})


@dataclass
class Report:
    """The degeneracy report of one model on one dataset (``degeneracy_report``).

    ``model``: the label and ``adapter.summary()``; ``data``: its source and the positions that
    counted (None without data); ``settings``: preset, budgets, seed, device, checkpoint directory;
    ``versions``: library versions; ``sections``: name → :class:`SectionResult`, in report order;
    ``identity``: what the numbers belong to — ``{"model": {"label", "digest"}, "data": {"source",
    "digest"} or None, "tl-degeneracy": version}`` (digests: sha256 of the model's parameters,
    buffers, configuration and hooks, and of the data; ``ReportContext.identity``) — compared by
    :meth:`save` with the report already in the directory.
    """

    model: dict
    data: dict | None
    settings: dict
    versions: dict
    created: str
    wall_s: float
    sections: dict[str, SectionResult]
    identity: dict | None = None

    def __getitem__(self, name: str) -> SectionResult:
        return self.sections[name]

    def _repr_html_(self) -> str:
        """Jupyter's view: the summary, then each section folded with its tables (html.py); no
        plots, so that displaying a report adds no plotly.js to the notebook."""
        from .html import render_notebook

        return render_notebook(self)

    def __repr__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """Everything, as strict JSON values (NaN → null, ±∞ → "inf"/"-inf", complex → [re, im])."""
        head = to_jsonable({k: getattr(self, k) for k in ("model", "data", "settings", "versions", "created", "wall_s",
                                                          "identity")})
        return {"format": FORMAT, **head,
                "sections": {name: s.to_dict() for name, s in self.sections.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(**{k: d[k] for k in ("model", "data", "settings", "versions", "created", "wall_s")},
                   sections={name: SectionResult.from_dict(s) for name, s in d["sections"].items()},
                   identity=d.get("identity"))

    def save(self, directory: str | Path, *, replace: bool = False) -> Path:
        """Write ``report.json``, ``report.html`` and ``<section>_<table>.csv`` into ``directory``
        (created if needed); returns the path of ``report.html``.

        A report of the same identity already there is merged (:meth:`merge`: its sections that
        this report does not hold stay, in the JSON, the HTML and as CSVs); one of another identity
        raises :class:`ReportDirectoryError` unless ``replace``, which deletes its files first.
        """
        from .html import render_html

        out = Path(directory)
        older = self.check_directory(out, self.identity, replace=replace)
        report = self.merge(older) if older is not None else self
        listed = set(_listed_tables(_stored_or_none(out)))
        _refuse_unlisted_tables(out, [s.csv_name(t) for s in report.sections.values() for t in s.tables], listed)
        if replace:
            _remove_report(out)
        stale = set() if older is None else listed
        # report.json first: a save interrupted after it leaves a directory that is recognisably the
        # report's (its CSVs then rewritten by the rerun); CSVs first left files that every rerun,
        # --fresh included, refused as foreign (review 32). It says it is being written until the CSVs and
        # the HTML are: an interrupted save left new totals beside an earlier run's CSVs and page,
        # without a word (audit 20a F3). It also names the earlier run's tables it is about to delete,
        # so that a rerun after an interruption knows them as the report's (_refuse_unlisted_tables).
        content = report.to_dict()
        write_atomic(out / "report.json", json.dumps({**content, INCOMPLETE: True, REPLACED: sorted(stale)}, indent=1,
                                                     allow_nan=False))
        for section in report.sections.values():
            for name, table in section.tables.items():
                write_atomic(out / section.csv_name(name), csv_frame(table).to_csv(index=False))
                stale.discard(section.csv_name(name))
        for name in stale:  # tables of a replaced section that its new result no longer has
            (out / name).unlink(missing_ok=True)
        html = out / "report.html"
        write_atomic(html, render_html(report))
        write_atomic(out / "report.json", json.dumps(content, indent=1, allow_nan=False))
        return html

    def merge(self, older: Report) -> Report:
        """This report with the sections of ``older`` (a report of the same identity) that it does
        not hold, in report order: what a partial rerun (``sections=[...]``) leaves in a directory.
        The header (settings, versions, time) is this run's; each section keeps its own settings
        and versions, and a section taken over from ``older`` is marked ``kept``. Data and identity
        are this report's, or ``older``'s where this run read none."""
        from .registry import SECTIONS

        names = [n for n in SECTIONS if n in self.sections or n in older.sections]
        names += [n for n in (*older.sections, *self.sections) if n not in names]
        sections = {n: self.sections[n] if n in self.sections else dataclasses.replace(older.sections[n], kept=True)
                    for n in names}
        identity = self.identity
        if identity is not None and older.identity is not None and identity.get("data") is None:
            identity = {**identity, "data": older.identity.get("data")}
        settings = {**self.settings, "sections": names}
        return Report(model=self.model, data=self.data if self.data is not None else older.data, settings=settings,
                      versions=self.versions, created=self.created, wall_s=self.wall_s, sections=sections,
                      identity=identity)

    @classmethod
    def check_directory(cls, directory: str | Path, identity: dict | None, *, replace: bool = False,
                        sections: Sequence[str] = ()) -> Report | None:
        """Whether a report of ``identity`` may be written to ``directory``; before any work.
        ``sections``: those the run computes, whose tables' names (``<section>_*.csv``) a file there
        that the report does not list must not have (:func:`_refuse_unlisted_tables`).

        Returns the report already there when it has the same identity (to :meth:`merge` with),
        else None (no report there, or ``replace``). Creates the directory.

        Raises:
            ReportDirectoryError: ``directory`` cannot be written; it holds no report.json but other
                files, or a report.json that is not a tl-degeneracy report (no FORMAT marker, not
                JSON; whatever ``replace``: a fresh start replaces a report, never foreign files);
                or (without ``replace``) it holds a report of another model, data set or package
                version, or one it cannot read.
        """
        out = Path(directory)
        check_writable(out)
        path = out / "report.json"
        if not path.exists():
            _refuse_foreign_files(out)
            return None
        try:
            stored = stored_report(out)
        except (OSError, ValueError) as e:
            # A report of ours damaged from outside (our writes are atomic) sits beside our checkpoints
            # (audit 23c F3: the message hid that deleting it recovers the directory).
            ours = (out / CHECKPOINTS / "sections").is_dir()
            raise ReportDirectoryError(
                f"{out} holds a report.json that is not a tl-degeneracy report ({type(e).__name__}: {e}); a report "
                "written there would overwrite it and its report.html. " + (
                    "The directory also holds tl-degeneracy's checkpoints: if report.json is a damaged report of "
                    "this package, delete it, report.html and the report's CSVs (<section>_<table>.csv) and rerun, "
                    "and the finished sections in checkpoints/ are reused; else write"
                    if ours else "Write") + " to a new or empty --out directory.") from None
        # Before any work (review 50: refused at the save, after --fresh had cleared the finished sections)
        names = [p.name for p in out.glob("*.csv") if any(p.name.startswith(f"{name}_") for name in sections)]
        _refuse_unlisted_tables(out, names, set(_listed_tables(stored)))
        if replace:
            return None
        try:
            older = cls.from_dict(stored)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ReportDirectoryError(
                f"{out} holds a tl-degeneracy report.json that cannot be read ({type(e).__name__}: {e}), so a new "
                f"report cannot be merged with it. {_WAY_OUT}") from None
        conflicts = identity_conflicts(older.identity, identity)
        if conflicts:
            there = older.identity or {}
            label = (there.get("model") or {}).get("label") or older.model.get("label")
            raise ReportDirectoryError(
                f"{out} holds the report of {label}, and this run's results would mix with it: "
                f"{'; '.join(conflicts)}. A directory holds one model on one data set. {_WAY_OUT}")
        return older

    @classmethod
    def load(cls, directory: str | Path) -> Report:
        """The report saved in ``directory`` (tables come back with lists for arrays, None for NaN)."""
        path = Path(directory) / "report.json"
        if not path.exists():
            raise FileNotFoundError(f"no report.json in {directory}")
        stored = json.loads(path.read_text())
        warn_incomplete(stored, directory)
        return cls.from_dict(stored)

    def summary(self, width: int = 100) -> str:
        """One screen of text: the model, the data, every setting changed from the preset, and per
        section its time, its verdict in words (sections.py) and its headline."""
        from .sections import verdict

        m = self.model
        lines = [f"tl-degeneracy report: {m['label']} ({m.get('backend')}, {m.get('model_class')}), "
                 f"{m.get('n_live_parameters', 0):,} live parameters"]
        if self.data:
            p = self.data["positions"]
            lines.append(f"  data: {self.data['source']}: {p['n_sequences']} sequences, {p['n_samples']:,} positions counted")
        s = self.settings
        lines.append(f"  preset {s['preset']}, seed {s['seed']}; {self.wall_s:.1f} s in all")
        if s.get("memory"):
            lines += textwrap.wrap(memory_line(s["memory"]), width, initial_indent="  ", subsequent_indent="    ",
                                   break_on_hyphens=False)
        if (s.get("time_fit") or {}).get("predicted"):
            lines += textwrap.wrap(time_line(s["time_fit"]), width, initial_indent="  ", subsequent_indent="    ",
                                   break_on_hyphens=False)
        changed = changed_settings(s)
        if changed:  # never clipped: a reader must see every setting that differs from the preset
            lines += textwrap.wrap(" ".join(f"{k}={v}" for k, v in changed.items()), width,
                                   initial_indent=f"  changed from {_base_name(s)}: ", subsequent_indent="    ",
                                   break_on_hyphens=False)
        for sec in self.sections.values():
            mark = {"ok": "  ", "skipped": "- ", "failed": "! "}[sec.status]
            when = sec.when("6.1f")
            words = verdict(sec) if sec.status == "ok" else ""
            text = sec.headline if sec.status == "ok" else f"{sec.status}: {sec.reason}"
            # Verdicts, reasons and warnings in full, wrapped (audit 23c: clipped, a sweep point's diverged
            # chain and a non-finite model's remedy never reached the terminal); the headline's numbers on
            # one line below a verdict, which says what they mean.
            if words:
                lines += textwrap.wrap(words, width, initial_indent=f"{mark}{sec.name:<16} {when:>8}  ",
                                       subsequent_indent=" " * 28, break_on_hyphens=False)
                if text:
                    lines.append(_clip(f"{'':28}{text}", width))
            else:  # a section with no words at all still has its line (review 62), its warnings below it
                lines += textwrap.wrap(" ".join(text.split()), width, initial_indent=f"{mark}{sec.name:<16} {when:>8}  ",
                                       subsequent_indent=" " * 28, break_on_hyphens=False) or [
                    f"{mark}{sec.name:<16} {when:>8}"]
            apart = self.settings_apart(sec)
            if apart:  # never clipped: the header's settings do not describe this section
                lines += textwrap.wrap(f"computed with other settings than the header's (an earlier run into this "
                                       f"directory): {settings_text(apart)}", width, initial_indent=" " * 28,
                                       subsequent_indent=" " * 30, break_on_hyphens=False)
            for w in sec.warnings:
                lines += textwrap.wrap(" ".join(w.split()), width, initial_indent=f"{'':28}warning: ",
                                       subsequent_indent=" " * 30, break_on_hyphens=False)
        return "\n".join(lines)

    def settings_apart(self, section: SectionResult) -> dict:
        """The settings of ``section`` that differ from this report's own budgets: a section kept
        from an earlier run into the same directory (:meth:`merge`) that other settings made. Only
        the budgets the section declares it reads count (``register_section(settings=...)``; all
        budgets for a section no longer registered), and the header's settings a section records
        where it reads them (:data:`SECTION_HEADER_SETTINGS`: the seed of a seeded section, the
        LLC's components; audit 15b: a rerun with another seed kept seed 0's LLC unflagged)."""
        from .registry import SECTIONS

        header = {k: self.settings.get(k) for k in SECTION_HEADER_SETTINGS}
        budgets = to_jsonable({**(self.settings.get("budgets") or {}), **header})
        own = to_jsonable(section.settings)
        declared = (set(SECTIONS[section.name].settings) if section.name in SECTIONS else set(budgets)) | set(header)
        return {k: v for k, v in own.items() if k in budgets and k in declared and budgets[k] != v}


#: Report-wide settings (not budgets) that a section which reads them records with its own.
SECTION_HEADER_SETTINGS = ("seed", "llc_components")


#: A number as it appears in a headline: sign, digits with thousands separators, a decimal point or
#: a fraction bar, exponent, percent ("−1,234.5e-3%", "119/128"), not inside a name ("L0H1",
#: "blocks.0"); a line is never cut inside one.
_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d(?:[\d,./]*\d)?(?:[eE][-+]?\d+)?%?")


_WAY_OUT = ("Rerun with --fresh (degeneracy_report(..., fresh=True), Report.save(..., replace=True)) to replace it "
            "whole, or write to another --out directory.")


def identity_conflicts(there: dict | None, here: dict | None) -> list[str]:
    """How the identity of the report in a directory (``there``) differs from this run's
    (``here``), one phrase each; empty when they may share the directory. Data differ only when
    both runs read data: a run without data (weights-only sections) fits any data set."""
    if there is None or here is None:
        which = "the report there" if there is None else "this report"
        return [f"{which} records no identity (written by an older tl-degeneracy or built by hand), so the two "
                "cannot be told apart"]
    out = []
    m0, m1 = there.get("model") or {}, here.get("model") or {}
    if m0.get("digest") != m1.get("digest"):
        # the dtype by name (audit 23c F4: one model loaded with another --dtype read as two of one label)
        dtypes = (f", its weights in {m0['dtype']} there and {m1['dtype']} now" if m0.get("dtype") and m1.get("dtype")
                  and m0["dtype"] != m1["dtype"] else "")  # absent from reports saved before 0.4.17
        out.append(f"model {m0.get('label')} (sha256 {str(m0.get('digest'))[:12]} of its weights, config and hooks) "
                   f"there, {m1.get('label')} ({str(m1.get('digest'))[:12]}) now{dtypes}")
    d0, d1 = there.get("data"), here.get("data")
    if d0 is not None and d1 is not None and d0.get("digest") != d1.get("digest"):
        out.append(f"data {d0.get('source')} (sha256 {str(d0.get('digest'))[:12]}) there, {d1.get('source')} "
                   f"({str(d1.get('digest'))[:12]}) now")
    if there.get("tl-degeneracy") != here.get("tl-degeneracy"):
        out.append(f"computed by tl-degeneracy {there.get('tl-degeneracy')} there, {here.get('tl-degeneracy')} now "
                   "(its results may differ)")
    return out


def memory_line(memory: dict) -> str:
    """The header's sentence on the memory budget (``ReportContext.fit_memory``,
    ``scope.fit_llc_memory``): the budget and where it comes from, the estimated peak of one batch of
    the statistics passes and of the LLC's chains, and what was lowered to fit them."""
    from ..memory import format_bytes

    # The interaction basis is not fitted: it checks its passes against the budget and fails first where
    # one would not fit. The header must not imply more (audit 12a). Reports saved before the LLC was
    # fitted (0.4.16) have no "llc" entry: theirs was checked only.
    llc = memory.get("llc")
    text = (f"memory budget {format_bytes(memory['budget'])} ({memory['source']}): the statistics passes "
            "(synchronization, counts, activations, sparsity)" + (" and the LLC's chains are" if llc else " are")
            + " fitted to it; " + ("the interaction basis checks its passes" if llc else
                                     "the interaction basis and the LLC check their passes") + " against it")
    if "needed" in memory:
        text += f"; about {format_bytes(memory['needed'])} per batch of the statistics passes"
    text += _lowered(memory)
    if memory.get("cut"):
        a, b = memory["cut"]["n_sequences"]
        text += f" (the same data: {a:,} sequences cut into up to {b:,} shorter ones)"
    if memory.get("fits") is False:
        text += "; does NOT fit: the passes that exceed it fail, saying what to lower"
    if llc:
        text += f"; about {format_bytes(llc['needed'])} for the LLC's chains"
        text += _lowered(llc)
        if llc.get("fits") is False:
            text += "; does NOT fit with what may be lowered: the LLC fails, saying what to lower"
    return text


def time_line(fit: dict) -> str:
    """The header's sentence on the time fit (``scope.fit_time``): the time per costly section, the
    predicted time of each after the fit (and before it, where it lowered something: audit 13b, a
    header that read "llc 240 s" under a 300 s limit did not say why the LLC had been restricted),
    and what was lowered to fit it."""
    text = f"time per costly section {fit['section_time']:g} s"
    before = fit.get("predicted_before") or {}  # absent from reports saved before it was recorded
    if fit.get("predicted"):
        text += "; predicted " + ", ".join(
            f"{k} {v:.0f} s" + (f" ({before[k]:.0f} s before lowering)" if k in before else "")
            for k, v in fit["predicted"].items())
    text += _lowered(fit)
    if fit.get("fits") is False:
        text += "; still over it with what may be lowered: set the scope yourself (--set) or a larger section_time"
    return text


def _lowered(fit: dict) -> str:
    """"; lowered to fit: name before → after, …" for a fit's ``lowered`` settings ("" if none)."""
    def text(value) -> str:
        if value is None:
            return "all"
        if isinstance(value, (list, tuple)):
            return "(" + ", ".join(f"{v:g}" for v in value) + ")"
        return str(value)

    lowered = fit.get("lowered") or {}
    return "; lowered to fit: " + ", ".join(f"{k} {text(a)} → {text(b)}" for k, (a, b) in lowered.items()) if lowered else ""


#: The key ``Report.save`` sets in report.json until the CSVs and report.html beside it are written.
INCOMPLETE = "incomplete"

#: Beside :data:`INCOMPLETE`: the CSVs of the report there before, which the save deletes.
REPLACED = "replaced_tables"


def warn_incomplete(stored: dict, directory: str | Path) -> None:
    """A RuntimeWarning where the report.json read from ``directory`` was saved by a run that stopped
    before its CSVs and report.html were written: those may hold an earlier run's numbers."""
    if stored.get(INCOMPLETE):
        warnings.warn(f"the report in {directory} was being saved when its run stopped: report.json holds its numbers, "
                      "but its CSVs and report.html may still be an earlier run's; rerun the same command to complete "
                      "them", RuntimeWarning, stacklevel=3)


def stored_report(directory: str | Path) -> dict:
    """The JSON of ``directory``/report.json, when it is a tl-degeneracy report: a JSON object with
    the FORMAT marker (its other contents are not checked: see :meth:`Report.from_dict`).

    Raises:
        OSError: it cannot be read.
        ValueError: it is not JSON, or has no FORMAT marker: a file this package did not write.
    """
    stored = json.loads((Path(directory) / "report.json").read_text(encoding="utf-8"))
    fmt = stored.get("format") if isinstance(stored, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"format {fmt!r}, not {FORMAT!r}")
    return stored


def check_writable(out: Path) -> None:
    """Create ``out`` and write a file there, or raise :class:`ReportDirectoryError` saying why not."""
    # os.path: Path.exists raises on a parent that cannot be searched (review 50), mkdir below says so
    existing = next((p for p in (out, *out.parents) if os.path.lexists(p)), None)
    if existing is not None and not os.path.isdir(existing):  # audit 20a F5: this read "(File exists)"
        raise ReportDirectoryError(f"the output directory {out} cannot be written: {existing} is a file, not a "
                                   "directory; choose another --out directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tld-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ReportDirectoryError(f"the output directory {out} cannot be written ({e.strerror or e}); "
                                   "choose another --out directory") from None


def write_atomic(path: Path, text: str) -> None:
    """Write atomically: an interrupted save leaves the old file, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _remove_report(out: Path) -> None:
    """Delete the report in ``out`` (a tl-degeneracy report: :meth:`Report.check_directory` refused any
    other): report.json, report.html and the CSVs report.json lists. When a damaged report.json
    lists none, no CSV is deleted: which files it wrote cannot be told, and a file that is not the
    report's must never be lost (the new report overwrites its own names)."""
    for path in (*(out / name for name in _listed_tables(_stored_or_none(out))), out / "report.json",
                 out / "report.html"):
        path.unlink(missing_ok=True)


def _stored_or_none(out: Path) -> dict | None:
    """:func:`stored_report` of ``out``, or None where there is none or it is not one."""
    try:
        return stored_report(out)
    except (OSError, ValueError):
        return None


def _listed_tables(stored) -> list[str]:
    """The CSV names a stored report.json lists (none when it lists none readably), with those of an
    earlier report that its interrupted save was replacing (:data:`REPLACED`). The report writes
    its CSVs beside report.json under plain names: a listed path elsewhere ("../x.csv", a hand-edited
    file) is not one of them (audit 10b)."""
    try:
        names = [t["csv"] for s in stored["sections"].values() for t in s["tables"].values()]
        names += list(stored.get(REPLACED) or [])
    except (KeyError, TypeError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and Path(n).name == n and n.endswith(".csv")]


def _refuse_unlisted_tables(out: Path, names: list[str], listed: set[str]) -> None:
    """Raise :class:`ReportDirectoryError`, before anything in ``out`` is written or deleted, when a
    CSV named in ``names`` is there but not the report's: the report.json there does not list it
    (``listed``; audit 20a F5: a user's file under a table's name was overwritten silently). The
    report checks every CSV under the names of the sections it will run before any work
    (:meth:`Report.check_directory`), and those it writes again before saving."""
    clashes = sorted(n for n in set(names) if (out / n).exists() and n not in listed)
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise ReportDirectoryError(
            f"{out} holds {shown}, which the report did not write (report.json does not list it) but may "
            "overwrite with its own table of that name. Move or rename it and rerun, or write to another --out "
            "directory.")


#: The folder of ``out`` that holds a report's checkpoints unless ``checkpoint_dir`` is given.
CHECKPOINTS = "checkpoints"


def _refuse_foreign_files(out: Path) -> None:
    """Raise :class:`ReportDirectoryError` when ``out``, which holds no report.json, holds files the
    report would overwrite or mix with: anything but hidden files and the run's own checkpoints (an
    interrupted first run resumes from them), a ``checkpoints`` folder holding only what the report
    writes there (``cache.foreign_entries``)."""
    from .cache import foreign_entries  # cache reads this module's SectionResult

    foreign = sorted(p.name for p in out.iterdir() if p.name != CHECKPOINTS and not p.name.startswith("."))
    foreign += [f"{CHECKPOINTS}/{name}" for name in foreign_entries(out / CHECKPOINTS)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ReportDirectoryError(
            f"{out} holds files that are not a tl-degeneracy report ({shown}); a report written there could "
            "overwrite them or be mixed up with them. Write to a new or empty --out directory.")


def _clip(line: str, width: int) -> str:
    """``line`` on one line of at most ``width`` characters; a longer one is cut at a space (else at
    the start of a number) before ``width`` − 2, so that no number is ever shown truncated, and
    marked with " …"."""
    line = " ".join(line.splitlines())
    if len(line) <= width:
        return line
    cut = max(width - 2, 0)
    for match in _NUMBER.finditer(line):
        if match.start() >= cut:
            break
        if cut < match.end():
            cut = match.start()
    space = line.rfind(" ", 0, cut + 1)
    if space > width // 2:
        cut = space
    return line[:cut].rstrip() + " …"


def _base_name(settings: dict) -> str:
    preset = settings.get("preset")
    return f"preset {preset}" if preset in _presets() else "the quick defaults"


def _presets() -> dict:
    from .settings import PRESETS

    return PRESETS


def _setting_text(value) -> str:
    """A setting as ``--set`` writes it: 1e-2,1e-3 for tuples, none, true/false, %g for floats."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_setting_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_text(settings: dict) -> str:
    """Settings as ``--set`` writes them: ``k=v`` separated by spaces."""
    return " ".join(f"{k}={_setting_text(v)}" for k, v in settings.items())


def changed_settings(settings: dict) -> dict[str, str]:
    """The budget fields of a report's ``settings`` that differ from its preset's (settings given as a
    ``ReportSettings``, preset "custom": from the quick defaults), as ``--set`` text, in field order."""
    from .settings import ReportSettings

    base = _presets().get(settings.get("preset"), ReportSettings()).to_dict()
    budgets = settings.get("budgets") or {}

    def same(a, b) -> bool:  # a loaded report has lists where the settings have tuples
        return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

    return {k: _setting_text(v) for k, v in budgets.items() if k in base and not same(v, base[k])}
