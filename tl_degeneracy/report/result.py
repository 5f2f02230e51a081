"""The degeneracy report as data: sections with their tables, figures, values, settings and timings.

``Report.save(dir)`` writes ``report.json`` (every number, strict JSON: serialize.py), one CSV per
table and ``report.html`` (self-contained, opens offline: html.py); ``Report.load(dir)`` reads the
JSON back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .serialize import csv_frame, figure_from_dict, figure_to_dict, table_from_dict, table_to_dict, to_jsonable

__all__ = ["Report", "SectionResult"]

#: Section status: ``ok``; ``skipped`` (the analysis does not apply to this model or data: a
#: MissingHookError, DataError or NumericalError, with its message); ``failed`` (any other error: a
#: bug or an unexpected input; the traceback is kept and a warning issued).
STATUSES = ("ok", "skipped", "failed")


@dataclass
class SectionResult:
    """One section of the report. ``cached``: reused from the checkpoint directory of an earlier
    run with the same fingerprint (``wall_s`` is then that run's time)."""

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

    def csv_name(self, table: str) -> str:
        return f"{self.name}_{table}.csv"

    def __repr__(self) -> str:
        # One line: the dataclass default would print every table and figure.
        tables = ", ".join(f"{k} {t.shape[0]}×{t.shape[1]}" for k, t in self.tables.items())
        status = self.status + (" (cached)" if self.cached else "")
        return (f"<SectionResult {self.name!r} {status}, {self.wall_s:.1f} s: {self.headline or self.reason or ''}"
                f"{'; tables: ' + tables if tables else ''}>")

    def _repr_html_(self) -> str:
        """Jupyter's view: headline, values and the first rows of each table (html.py)."""
        from .html import render_notebook

        return render_notebook(self)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "title", "status", "methods", "reason", "traceback", "headline",
                                          "notes", "warnings", "settings", "values", "wall_s", "versions", "cached")}
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
    ``versions``: library versions; ``sections``: name → :class:`SectionResult`, in report order.
    """

    model: dict
    data: dict | None
    settings: dict
    versions: dict
    created: str
    wall_s: float
    sections: dict[str, SectionResult]

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
        head = to_jsonable({k: getattr(self, k) for k in ("model", "data", "settings", "versions", "created", "wall_s")})
        return {"format": "tl-degeneracy-report/1", **head,
                "sections": {name: s.to_dict() for name, s in self.sections.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(**{k: d[k] for k in ("model", "data", "settings", "versions", "created", "wall_s")},
                   sections={name: SectionResult.from_dict(s) for name, s in d["sections"].items()})

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json``, ``report.html`` and ``<section>_<table>.csv`` into ``directory``
        (created if needed); returns the path of ``report.html``."""
        from .html import render_html

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for section in self.sections.values():
            for name, table in section.tables.items():
                csv_frame(table).to_csv(out / section.csv_name(name), index=False)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        html = out / "report.html"
        html.write_text(render_html(self), encoding="utf-8")
        return html

    @classmethod
    def load(cls, directory: str | Path) -> Report:
        """The report saved in ``directory`` (tables come back with lists for arrays, None for NaN)."""
        path = Path(directory) / "report.json"
        if not path.exists():
            raise FileNotFoundError(f"no report.json in {directory}")
        return cls.from_dict(json.loads(path.read_text()))

    def summary(self, width: int = 100) -> str:
        """One screen of text: the model, the data, and one line per section with its time."""
        m = self.model
        lines = [f"tl-degeneracy report: {m['label']} ({m.get('backend')}, {m.get('model_class')}), "
                 f"{m.get('n_live_parameters', 0):,} live parameters"]
        if self.data:
            p = self.data["positions"]
            lines.append(f"  data: {self.data['source']}: {p['n_sequences']} sequences, {p['n_samples']:,} positions counted")
        s = self.settings
        lines.append(f"  preset {s['preset']}, seed {s['seed']}; {self.wall_s:.1f} s in all")
        for sec in self.sections.values():
            mark = {"ok": "  ", "skipped": "- ", "failed": "! "}[sec.status]
            when = "cached" if sec.cached else f"{sec.wall_s:6.1f} s"
            text = sec.headline if sec.status == "ok" else f"{sec.status}: {sec.reason}"
            lines.append(_clip(f"{mark}{sec.name:<16} {when:>8}  {text}", width))
            lines += [_clip(f"{'':28}warning: {w}", width) for w in sec.warnings]
        return "\n".join(lines)


def _clip(line: str, width: int) -> str:
    line = " ".join(line.splitlines())
    return line if len(line) <= width else line[: width - 2] + " …"
