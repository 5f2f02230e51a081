"""Two degeneracy reports side by side: ``compare_reports(a, b)`` and ``tl-degeneracy compare``.

A :class:`ReportComparison` holds the two reports, A and B. ``to_frame()`` lists, for every section
present in either, its status and each scalar value (nested values one level deep, matrices left
out: html.flat_values) of A and of B, with the difference B − A where both are numbers.

Uncertainty: where a value is an estimate with a standard error — the behavioral LLC λ̂_B, N_eff =
2λ̂_B (standard error 2·se(λ̂_B)), the rows of the N_eff(ε) sweep and the restricted LLC of each
component (METHODS §1: the larger of the standard error of the mean over chains and ArviZ's
Monte-Carlo standard error of all draws, since with few chains the first under-states it) — the
frame gives both standard errors and whether |B − A| exceeds two combined standard errors,
2·√(se_A² + se_B²) beyond what the step sizes' predicted biases allow (METHODS (1.8), each
estimate's ``bias_bound``: the step size only raises λ̂, so of one quantity B − A may reach
|b|·bias_B above 0 and |a|·bias_A below; audit 12b: two runs that differed only in their step size
were called different; :func:`noise_interval`). That allowance is sampling noise and discretisation
bias only, not the bias of chains too short to converge, which each section's verdict states as it
is ("not converged": a lower bound, or uncertain in both directions). Two estimates are tested only
when they are of one quantity — the same loss, loss scale ε, localization γ, parameter selection
and data (the data set's digest and the positions the LLC sampled on: the report's time fit lowers
them on its own; audit 12b: 8 tokens against 48 passed as one quantity, 0.00018 vs 0.15) (METHODS
§1: λ̂_B(ε, γ) moves with γ, and ``gamma="auto"`` picks γ per run), each recorded on both sides (a
row that does not record one, as in reports of older versions, is not known to be the same
quantity) — and both converged; otherwise ``comparable`` says why not and ``beyond_2se`` is None.

A section kept from an earlier run into a report's directory may have been computed with other
settings than the report's header: ``settings_frame`` lists such a section's own settings that
differ between A and B, and the section's ``status`` row says so in ``comparable``.

``save(dir)`` writes ``comparison.html`` (one self-contained page, plotly.js inlined once, opens
offline: html.render_comparison), ``comparison.csv`` (the frame) and ``comparison.json`` (which two
reports it compares). A directory holds one comparison: ``save`` refuses a directory that holds
anything else, except an earlier comparison of the same two reports, which it replaces.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import TLDegeneracyError
from ..llc.llc_result import larger_stderr, unconverged_text
from ..llc.sweep import point_failed
from .html import flat_values, render_comparison, render_notebook, section_status, value_text
from .registry import SECTIONS
from .report import (Report, ReportDirectoryError, SectionResult, check_writable, identity_conflicts, settings_text,
                     stored_report, warn_incomplete, write_atomic)
from .serialize import csv_frame, to_jsonable

__all__ = ["NoiseInterval", "ReportComparison", "ReportInputError", "compare_reports", "default_directory", "noise_interval"]

#: What a comparison directory holds.
FILES = ("comparison.html", "comparison.csv", "comparison.json")
FORMAT = "tl-degeneracy-comparison/1"
#: Columns of ``ReportComparison.to_frame()``.
COLUMNS = ("section", "value", "a", "b", "difference", "a_stderr", "b_stderr", "a_bias", "b_bias", "beyond_2se",
           "comparable")

#: value → (the values holding its standard errors, factor): λ̂'s standard error is the larger of the
#: chains' spread and ArviZ's MCSE (METHODS §1), which ``llc_stderr`` holds since 0.4.4; reports saved
#: before held the spread alone there, so the larger is taken here again. N_eff = 2λ̂_B, so se(N_eff) = 2·se(λ̂_B).
STDERR = {"llc": (("llc_stderr", "llc_mcse"), 1.0), "n_eff": (("llc_stderr", "llc_mcse"), 2.0)}
#: Section → (table, the column naming each row, the row's name): tables whose rows are estimates
#: with standard errors (STDERR), compared row by row beside the section's values.
ESTIMATE_TABLES = {"llc": (("sweep", "loss_scale", "sweep ε={:.6g}"), ("gamma_curve", "gamma", "γ-curve γ={:.6g}"),
                           ("components", "component", "component {}"))}
#: What makes two LLC estimates one quantity (METHODS §1), as the section values and table rows name it
#: (selection None: the whole model), with the data they were sampled on: the data set's digest and
#: the section's record of the positions it sampled (``data_digest``, ``llc_data``: _scalars adds them).
QUANTITY = ("loss", "loss_scale", "gamma", "selection", "n_params", "data_digest", "llc_data")


class ReportInputError(TLDegeneracyError, ValueError):
    """A report that cannot be compared: no such directory, no report.json there, one that cannot be
    read, or the same report given twice."""


def compare_reports(a: Report | str | os.PathLike, b: Report | str | os.PathLike) -> ReportComparison:
    """Reports ``a`` and ``b`` (each a :class:`Report` or the directory a report was saved to) side
    by side: ``.to_frame()`` (section × value: A, B, B − A and, for estimates, their standard errors
    and whether the difference exceeds two combined standard errors), ``.settings_frame()`` (every
    setting that differs), ``.summary()`` and ``.save(dir)`` (comparison.html and comparison.csv).

    Raises:
        ReportInputError: a directory that does not exist, holds no report.json or one that cannot
            be read; or ``a`` and ``b`` are the same report (the same directory).
    """
    if a is b or (not isinstance(a, Report) and not isinstance(b, Report)
                  and Path(a).resolve() == Path(b).resolve()):
        where = "" if isinstance(a, Report) else f" ({Path(a).resolve()})"
        raise ReportInputError(f"A and B are the same report{where}: a comparison needs two different reports; give "
                               "the directories of two reports (the --out directories of two `tl-degeneracy report` "
                               "runs).")
    (ra, source_a), (rb, source_b) = _read(a, "A"), _read(b, "B")
    return ReportComparison(ra, rb, names=(_name(ra, source_a), _name(rb, source_b)), sources=(source_a, source_b))


def _read(source: Report | str | os.PathLike, side: str) -> tuple[Report, str | None]:
    """The report and the resolved directory it was read from (None for a Report given as such)."""
    if isinstance(source, Report):
        return source, None
    path = Path(source)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ReportInputError(f"report {side}: {path} {what}; give the directory a report was saved to (the --out "
                               "directory of `tl-degeneracy report`).")
    if not (path / "report.json").is_file():
        raise ReportInputError(f"report {side}: {path} holds no report.json, so it is not the directory of a saved "
                               f"report; give the --out directory of a `tl-degeneracy report` run (or run one: "
                               f"tl-degeneracy report --out {path}).")
    where = f"report {side}: {path / 'report.json'} cannot be read"
    try:
        stored = stored_report(path)
    except (OSError, ValueError) as e:
        # not the package's file: --fresh refuses to replace it (Report.check_directory), so no advice to rerun there
        raise ReportInputError(f"{where} ({type(e).__name__}: {e}): it is not a tl-degeneracy report (or is damaged "
                               "beyond telling). Give the --out directory of a `tl-degeneracy report` run.") from e
    warn_incomplete(stored, path)
    try:
        report = Report.from_dict(stored)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReportInputError(f"{where} ({type(e).__name__}: {e}): it is a damaged tl-degeneracy report. Write the "
                               f"report again (tl-degeneracy report --out {path} --fresh).") from e
    return report, str(path.resolve())


def _name(report: Report, source: str | None) -> str:
    """A report's short name: its directory's name, or its model's label."""
    return Path(source).name if source else str(report.model.get("label"))


def default_directory(comparison: ReportComparison) -> Path:
    """``compare-<A>-vs-<B>`` in the current directory (inside neither report's directory)."""
    a, b = (re.sub(r"[^\w.-]+", "_", n).strip("._") or "report" for n in comparison.names)
    return Path(f"compare-{a}-vs-{b}")


@dataclass
class ReportComparison:
    """Two reports side by side (:func:`compare_reports`). ``names``: their short names (directory
    names, or model labels); ``sources``: the directories they were read from (None for a Report
    given as such)."""

    a: Report
    b: Report
    names: tuple[str, str] = ("A", "B")
    sources: tuple[str | None, str | None] = (None, None)

    @property
    def sections(self) -> list[str]:
        """Every section present in either report, in report order."""
        present = [*self.a.sections, *self.b.sections]
        return [n for n in SECTIONS if n in present] + [n for n in dict.fromkeys(present) if n not in SECTIONS]

    def section(self, name: str) -> tuple[SectionResult | None, SectionResult | None]:
        """Section ``name`` of A and of B (None where a report does not hold it)."""
        return self.a.sections.get(name), self.b.sections.get(name)

    def to_frame(self) -> pd.DataFrame:
        """One row per (section, value), sections in report order: ``a``, ``b`` (None where a report
        lacks the value), ``difference`` = b − a where both are finite numbers, ``a_stderr`` and
        ``b_stderr`` for estimates (see the module docstring), ``a_bias`` and ``b_bias`` (their
        step sizes' predicted relative biases; None where not recorded), ``beyond_2se``: b − a
        outside :func:`noise_interval` (None where either standard error is unknown or the
        estimates are not comparable) and ``comparable`` for estimates: "yes", or why not (the loss, ε, γ or
        the parameter selection differ or are not recorded; a side did not converge). Each section
        starts with its ``status`` row: ok, skipped, failed, or missing (not in that report)."""
        rows = []
        for name in self.sections:
            sa, sb = self.section(name)
            status = _row(name, "status", (section_status(sa), None, None), (section_status(sb), None, None))
            apart = self._kept_apart(name)
            differ = {k: ab for k, ab in apart.items() if not _equal(*ab)}
            same = {k: ab[0] for k, ab in apart.items() if _equal(*ab)}
            # audit 15b: both sides computed at sync_tol 0.05, B's header 0.3: the headers' difference
            # must not read as one these sections saw
            status["comparable"] = "; ".join(
                [*(["section settings differ from the other side's: "
                    + "; ".join(f"{k} {value_text(a)} vs {value_text(b)}" for k, (a, b) in differ.items())] if differ else []),
                 *([f"both computed at {settings_text(same)}, whatever the headers say (a section kept from an "
                    "earlier run)"] if same else [])]) or None
            rows.append(status)
            va, vb = _scalars(sa, self.a), _scalars(sb, self.b)
            rows += [_row(name, k, va.get(k, (None, None, None)), vb.get(k, (None, None, None)))
                     for k in dict.fromkeys([*va, *vb])]
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def settings_frame(self) -> pd.DataFrame:
        """Every setting in which the two reports differ (columns setting, a, b): the model (label,
        sha256 of its weights, config and hooks, its summary), the data (source, sha256, the
        positions that counted), the report's settings and budgets, the library versions, and a section's own settings
        ("<section>: <setting>", both sides' values, equal or not) where a side's section was
        computed with other settings than its header (kept from an earlier run). ``differs``: False
        only for such a section setting that both sides' sections share, whatever their headers say."""
        fa, fb = _setup(self.a), _setup(self.b)
        rows = [{"setting": k, "a": fa.get(k), "b": fb.get(k), "differs": True}
                for k in dict.fromkeys([*fa, *fb]) if fa.get(k) != fb.get(k)]
        rows += [{"setting": f"{name}: {k}", "a": a, "b": b, "differs": not _equal(a, b)}
                 for name in self.sections for k, (a, b) in self._kept_apart(name).items()]
        return pd.DataFrame(rows, columns=["setting", "a", "b", "differs"])

    def _kept_apart(self, name: str) -> dict[str, tuple]:
        """Section ``name``'s own settings (A's, B's) where a side's section was computed with other
        settings than its report's header (a section kept from an earlier run: Report.settings_apart),
        equal or not: the headers do not show them (audit 12b: sync_tol 0.3 kept in A against 0.05
        in B, both headers 0.05, compared with no word; audit 15b: both computed at 0.05, the headers
        0.05 and 0.3, read as "sync_tol 0.05 → 0.3 changes nothing")."""
        sa, sb = self.section(name)
        if sa is None or sb is None:
            return {}
        keys = dict.fromkeys([*self.a.settings_apart(sa), *self.b.settings_apart(sb)])
        a, b = to_jsonable(dict(sa.settings)), to_jsonable(dict(sb.settings))
        return {k: (a.get(k), b.get(k)) for k in keys}

    def summary(self, width: int = 100) -> str:
        """One screen of text: both reports, every setting that differs, per section both verdicts,
        and the estimates whose difference exceeds two combined standard errors."""
        from .sections import verdict

        lines = [f"tl-degeneracy comparison: A = {self.names[0]} ({self.a.model.get('label')}), "
                 f"B = {self.names[1]} ({self.b.model.get('label')})"]
        settings = self.settings_frame()
        diff, same = settings[settings["differs"]], settings[~settings["differs"]]
        if len(diff):  # never clipped: a reader must see every setting that differs
            text = "; ".join(f"{r.setting} {value_text(r.a)} → {value_text(r.b)}" for r in diff.itertuples())
            lines += textwrap.wrap(text, width, initial_indent=f"  {len(diff)} setting(s) differ, A → B: ",
                                   subsequent_indent="    ", break_on_hyphens=False)
        else:
            lines.append("  same settings")
        if len(same):  # sections kept from earlier runs, computed alike whatever their headers say
            lines += textwrap.wrap("; ".join(f"{r.setting} {value_text(r.a)}" for r in same.itertuples()), width,
                                   initial_indent="  computed alike on both sides: ", subsequent_indent="    ",
                                   break_on_hyphens=False)
        frame = self.to_frame()
        for name in self.sections:  # wrapped, never clipped
            for side, sec in zip("AB", self.section(name)):
                words = "not in this report" if sec is None else (verdict(sec, with_reason=True) or sec.headline)
                lines += textwrap.wrap(words, width, initial_indent=f"  {name if side == 'A' else '':<16} {side}: ",
                                       subsequent_indent=" " * 22, break_on_hyphens=False)
            beyond = frame[(frame["section"] == name) & (frame["beyond_2se"] == True)]  # noqa: E712 (None too)
            for r in beyond.itertuples():
                lines += textwrap.wrap(f"{r.value}: {value_text(r.a, r.a_stderr)} vs {value_text(r.b, r.b_stderr)}, "
                                       "beyond 2 combined standard errors and the step sizes' biases", width,
                                       initial_indent=" " * 22,
                                       subsequent_indent=" " * 24, break_on_hyphens=False)
            apart = frame[(frame["section"] == name) & frame["comparable"].notna() & (frame["comparable"] != "yes")]
            for r in apart[apart["value"].isin(["llc", *[v for v in apart["value"] if v.endswith("· llc")]])].itertuples():
                lines += textwrap.wrap(f"{r.value}: not compared ({r.comparable})", width, initial_indent=" " * 22,
                                       subsequent_indent=" " * 24, break_on_hyphens=False)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        """Jupyter's view: the settings that differ, both verdicts per section and each section's
        values side by side (html.py); no plots, as for a Report."""
        return render_notebook(self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``comparison.html``, ``comparison.csv`` and ``comparison.json`` into ``directory``
        (created if needed); returns the path of ``comparison.html``.

        Raises:
            ReportDirectoryError: ``directory`` cannot be written, or holds anything but an earlier
                comparison of the same two reports.
        """
        out = Path(directory)
        self.check_directory(out)
        check_writable(out)
        write_atomic(out / "comparison.csv", csv_frame(self.to_frame()).to_csv(index=False))
        record = {"format": FORMAT, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                  "a": self._side(0), "b": self._side(1)}
        write_atomic(out / "comparison.json", json.dumps(to_jsonable(record), indent=1, allow_nan=False))
        html = out / "comparison.html"
        write_atomic(html, render_comparison(self))
        return html

    def check_directory(self, out: Path) -> None:
        """Refuse ``out`` unless it is absent, empty, or holds an earlier comparison of these two
        reports (same identities — model weights, data, package version — and, where both were read
        from directories, the same directories), in either order."""
        if not out.exists():
            return
        if not out.is_dir():
            raise ReportDirectoryError(f"the output directory {out} is a file; choose another --out directory.")
        # ".comparison.html.tmp-PID": left by a save that was interrupted (report._write)
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES and not p.name.startswith(".comparison."))
        if others:
            if "report.json" in others:  # the likeliest: --out given one of the reports' own directories
                others.remove("report.json")
                others.insert(0, "report.json: a report")
            shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
            raise ReportDirectoryError(
                f"{out} holds other files ({shown}), and a comparison would mix with them: a comparison's directory "
                f"holds only {', '.join(FILES)}. Choose another --out directory (a new one).")
        if not any(out.iterdir()):
            return
        try:
            stored = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
            there = (stored["a"], stored["b"])
            names = [str(s.get("name")) for s in there]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ReportDirectoryError(
                f"{out} holds a comparison whose comparison.json cannot be read ({type(e).__name__}: {e}), so it "
                f"cannot tell which two reports it compares. Delete {out} or choose another --out directory.") from None
        here = (self._side(0), self._side(1))
        if not ((_same(there[0], here[0]) and _same(there[1], here[1]))
                or (_same(there[0], here[1]) and _same(there[1], here[0]))):
            raise ReportDirectoryError(
                f"{out} holds the comparison of {names[0]} and {names[1]}, not of {self.names[0]} and "
                f"{self.names[1]}; a directory holds one comparison. Choose another --out directory, or delete "
                f"{out} first.")

    def _side(self, i: int) -> dict:
        """What comparison.json records of report A (0) or B (1)."""
        report = (self.a, self.b)[i]
        return {"name": self.names[i], "source": self.sources[i], "label": report.model.get("label"),
                "identity": report.identity}


def _same(there: dict, here: dict) -> bool:
    """Whether a report recorded in comparison.json is this one: the same identity and, where both
    were read from directories, the same directory; unknown (no identity) counts as another."""
    if there.get("identity") is None or here.get("identity") is None:
        return False
    if identity_conflicts(there["identity"], here["identity"]):
        return False
    return there.get("source") is None or here.get("source") is None or there["source"] == here["source"]


def _scalars(sec: SectionResult | None, report: Report) -> dict[str, tuple[object, float | None, dict | None]]:
    """A section's scalar values (html.flat_values, as JSON values) → (value, its standard error or
    None, the record that says which quantity an estimate is, or None), then the estimates of its
    ESTIMATE_TABLES, row by row. An estimate's record also holds the data it was sampled on: the
    report's data digest and the section's ``llc_data`` (the positions it sampled), where recorded."""
    if sec is None:
        return {}
    data = {"data_digest": ((report.identity or {}).get("data") or {}).get("digest")}
    if "digest" in (sec.settings.get("llc_data") or {}):  # older reports recorded positions, not which tokens
        data["llc_data"] = to_jsonable(sec.settings["llc_data"])
    if data["data_digest"] is None:  # not recorded: not known to be the same data
        del data["data_digest"]
    values = to_jsonable(flat_values(sec.values))
    out = {k: (v, _stderr(values, k), {**values, **data} if k in STDERR else None) for k, v in values.items()}
    for table, key, label in ESTIMATE_TABLES.get(sec.name, ()):
        frame = sec.tables.get(table)
        if frame is None or key not in frame:
            continue
        for record in to_jsonable(frame.to_dict(orient="records")):
            out.update({f"{label.format(record[key])} · {col}": (record[col], _stderr(record, col), {**record, **data})
                        for col in STDERR if col in record})
    return out


def _incomparable(qa: dict, qb: dict) -> str | None:
    """Why two LLC estimates (their section values or table rows) cannot be tested against each
    other — not one quantity (QUANTITY: a key differs, or a side does not record it), or a side not
    converged (a lower bound, or uncertain beyond its ±) — or None."""
    failed = [side for side, q in zip("AB", (qa, qb)) if point_failed(q)]
    if failed:  # a row without an estimate (every chain diverged): nothing to test
        return f"no estimate in {' and '.join(failed)} (every chain diverged)"
    reasons = []
    for key in QUANTITY:
        unrecorded = [side for side, q in zip("AB", (qa, qb)) if key not in q]
        if unrecorded:  # absent on both sides is no evidence of one quantity: None == None must not pass
            reasons.append(f"{key} not recorded in {' and '.join(unrecorded)} (not known to be one quantity)")
            continue
        a, b = qa[key], qb[key]
        na, nb = _number(a), _number(b)
        same = math.isclose(na, nb, rel_tol=1e-9) if na is not None and nb is not None else a == b
        if not same:
            reasons.append(f"{key} differs" + ("" if isinstance(a, dict) or isinstance(b, dict)
                                               else f" ({value_text(a)} vs {value_text(b)})"))
    reasons += [f"{side} not converged ({unconverged_text(q.get('lower_bound'), q.get('upper_bound'))})"
                for side, q in zip("AB", (qa, qb)) if q.get("converged") is False]
    return "; ".join(reasons) or None


def _stderr(values: dict, key: str) -> float | None:
    names, factor = STDERR.get(key, ((), 0.0))
    if not names:
        return None
    numbers = [_number(values.get(n)) for n in names]
    se = float(larger_stderr(*(math.nan if x is None else x for x in numbers)))
    return factor * se if math.isfinite(se) else None


def _number(v) -> float | None:
    """A stored value as a float (JSON's "inf"/"-inf" too), or None when it is not a number."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    return {"inf": math.inf, "-inf": -math.inf}.get(v) if isinstance(v, str) else None


def _row(section: str, value: str, a: tuple, b: tuple) -> dict:
    (va, se_a, qa), (vb, se_b, qb) = a, b
    na, nb = _number(va), _number(vb)
    difference = nb - na if na is not None and nb is not None and math.isfinite(na) and math.isfinite(nb) else None
    why_not = _incomparable(qa, qb) if qa is not None and qb is not None else None
    comparable = None if qa is None or qb is None else why_not or "yes"
    bias_a, bias_b = (_bias(q) if se is not None else None for q, se in ((qa, se_a), (qb, se_b)))
    beyond = None
    if difference is not None and se_a is not None and se_b is not None and why_not is None:
        beyond = not noise_interval(na, nb, se_a, se_b, bias_a, bias_b).holds(difference)
    return dict(zip(COLUMNS, (section, value, va, vb, difference, se_a, se_b, bias_a, bias_b, beyond, comparable)))


def _bias(record: dict | None) -> float | None:
    """An estimate's predicted relative step-size bias (``bias_bound``, METHODS (1.8)); None where
    not recorded or unknown."""
    b = _number((record or {}).get("bias_bound"))
    return None if b is None or math.isnan(b) else max(b, 0.0)


@dataclass(frozen=True)
class NoiseInterval:
    """The range [low, high] of B − A that two estimates of one quantity reach by chance and by
    their step sizes' biases (:func:`noise_interval`)."""

    low: float
    high: float

    def holds(self, difference: float) -> bool:
        return self.low <= difference <= self.high

    def __str__(self) -> str:
        return f"[{self.low:.3g}, {self.high:.3g}]"


def noise_interval(a: float, b: float, se_a: float, se_b: float, bias_a: float | None,
                   bias_b: float | None) -> NoiseInterval:
    """Where B − A of two estimates a, b of one quantity may lie without telling a difference:
    ±2·√(se_a² + se_b²), widened by each step size's predicted bias on its own side — the step size
    only raises λ̂, so B's bias |b|·bias_b raises B − A and A's |a|·bias_a lowers it (relative
    ``bias_bound``s, METHODS (1.8); None counts as 0, ∞ where unbounded)."""
    noise = 2 * math.hypot(se_a, se_b)
    return NoiseInterval(-noise - abs(a) * (bias_a or 0.0), noise + abs(b) * (bias_b or 0.0))


def _equal(a, b) -> bool:
    """Two settings' values are the same (lists and dicts compared whole)."""
    return to_jsonable(a) == to_jsonable(b)


def _setup(report: Report) -> dict:
    """Everything a report was made with, flat: model, data, settings and budgets, versions."""
    identity = report.identity or {}
    data = report.data or {}
    out = {"model": report.model.get("label"), "model sha256": (identity.get("model") or {}).get("digest")}
    out.update({f"model {k}": v for k, v in report.model.items() if k != "label"})
    out.update({"data": data.get("source"), "data sha256": (identity.get("data") or {}).get("digest")})
    out.update({f"data {k}": v for k, v in data.items() if k not in ("source", "positions")})
    out.update({f"data {k}": v for k, v in (data.get("positions") or {}).items()})
    # Not the numbers' settings: where the checkpoints were, the machine's budget and timings
    # (the settings they lowered are among the budgets) and threads (audit 15b: every comparison
    # listed checkpoint_dir and time_fit as differing, burying the setting that did)
    out.update({k: v for k, v in report.settings.items()
                if k not in ("budgets", "overrides", "checkpoint_dir", "time_fit", "memory", "torch_threads")})
    if isinstance(out.get("sections"), list):  # which sections, not their order
        out["sections"] = sorted(out["sections"])
    out.update(report.settings.get("budgets") or {})
    out.update({f"version {k}": v for k, v in report.versions.items()})
    return to_jsonable(out)

