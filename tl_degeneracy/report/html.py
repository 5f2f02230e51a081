"""``report.html`` (and ``comparison.html``, two reports side by side): one self-contained page that
opens offline; and the compact notebook view.

plotly.js (from the installed plotly package) is inlined once in the head; every figure is a div
plus a call to ``Plotly.newPlot``. Tables are plain HTML, so the numbers are readable with
JavaScript off. Nothing is loaded from the network: no CDN, no fonts, no MathJax.

The notebook view (``Report._repr_html_``, ``SectionResult._repr_html_``,
``ReportComparison._repr_html_``) is tables only, with no
script at all: a notebook that displays a report many times stays small, and it renders the same
offline, in JupyterLab, VS Code and on GitHub. The figures stay one call away (``.figures``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..llc.llc_result import value_with_error
from .report import Report, SectionResult, changed_settings, memory_line, settings_text, time_line
from .sections import METHODS_DOC, glossary, verdict

if TYPE_CHECKING:
    from .compare import ReportComparison

__all__ = ["flat_values", "render_comparison", "render_html", "render_notebook", "section_status", "value_text"]

#: Rows of a table shown in the page; the CSV next to it has them all.
MAX_ROWS = 60
#: Rows of a table shown in a notebook.
NOTEBOOK_ROWS = 12
#: Entries of a list shown in a table cell.
MAX_ITEMS = 4

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0b5cad;
        --ok:#1a7f37; --skip:#9a6700; --fail:#cf222e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif; color:var(--fg); }
header { background:#0d1b2a; color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:650; }
header .sub { color:#c9d4e0; margin:0; }
header .facts { display:flex; flex-wrap:wrap; gap:10px 28px; margin-top:16px; }
header .fact b { display:block; font-size:12px; font-weight:500; color:#9fb3c8; text-transform:uppercase; letter-spacing:.04em; }
header .fact span { font-size:16px; }
main { max-width:1180px; margin:0 auto; padding:10px 40px 60px; }
nav { background:var(--bg); border:1px solid var(--line); border-radius:8px; padding:12px 20px; margin:24px 0; }
nav h2 { font-size:15px; margin:0 0 6px; }
nav ol { margin:0; padding-left:22px; }
nav li { margin:3px 0; }
nav .time { color:var(--muted); font-variant-numeric:tabular-nums; }
nav .hl { color:var(--muted); font-size:13px; }
section { border-top:1px solid var(--line); padding:18px 0 8px; }
section h2 { font-size:21px; margin:6px 0 4px; }
section h3 { font-size:15px; margin:18px 0 6px; }
.meta { color:var(--muted); font-size:13px; margin:0 0 8px; }
.headline { font-size:16px; margin:6px 0 12px; }
.verdict { font-size:17px; font-weight:600; margin:4px 0 6px; }
dl.glossary { display:grid; grid-template-columns:max-content 1fr; gap:1px 14px; font-size:13px; color:var(--muted);
              margin:4px 0 10px; padding:6px 12px; border-left:3px solid var(--line); }
dl.glossary dt { font-weight:600; color:var(--fg); } dl.glossary dd { margin:0; }
nav .verdict-line { font-size:13px; }
.badge { display:inline-block; font-size:11px; font-weight:600; padding:1px 8px; border-radius:10px; color:#fff;
         text-transform:uppercase; letter-spacing:.03em; vertical-align:middle; }
.badge.ok { background:var(--ok); } .badge.skipped { background:var(--skip); } .badge.failed { background:var(--fail); }
.badge.cached, .badge.off { background:#6e7781; }
.note { background:#fff8c5; border:1px solid #eed888; border-radius:6px; padding:6px 12px; margin:6px 0; font-size:14px; }
.note.error { background:#ffebe9; border-color:#ffc1bc; }
pre { background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:10px; overflow:auto; font-size:12px; }
.figure { border:1px solid var(--line); border-radius:8px; margin:10px 0 14px; padding:4px; min-height:60px; }
.table-wrap { overflow-x:auto; max-width:100%; }
table.data { border-collapse:collapse; font-size:13px; font-variant-numeric:tabular-nums; margin:4px 0; }
table.data th, table.data td { border-bottom:1px solid var(--line); padding:3px 10px; text-align:right; white-space:nowrap; }
table.data th { background:var(--bg); position:sticky; top:0; font-weight:600; }
table.data td.text, table.data th.text { text-align:left; }
table.data tr:hover td { background:#eef4fb; }
table.kv { border-collapse:collapse; font-size:13px; margin:4px 0; }
table.kv th { text-align:left; color:var(--muted); font-weight:500; padding:2px 16px 2px 0; vertical-align:top; }
table.kv td { padding:2px 0; font-variant-numeric:tabular-nums; }
.more { color:var(--muted); font-size:12px; margin:2px 0 10px; }
details { margin:8px 0; } summary { cursor:pointer; color:var(--accent); font-size:14px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:20px; border-top:1px solid var(--line); }
"""

# Records script errors on the page itself (data-js-errors on <html>), so a headless browser can check them.
_ERROR_PROBE = ("<script>window.addEventListener('error',function(e){var h=document.documentElement;"
                "h.dataset.jsErrors=(parseInt(h.dataset.jsErrors||'0')+1)+'';h.dataset.jsLastError=String(e.message);});"
                "</script>")


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    """A cell or value as short text: 4 significant digits, long lists abbreviated."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}"
    if isinstance(v, complex):
        return f"{v.real:.3g}{v.imag:+.3g}i"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in list(v.items())[:MAX_ITEMS]) + (", …}" if len(v) > MAX_ITEMS else "}")
    if hasattr(v, "tolist") and not isinstance(v, str):  # numpy scalars and arrays
        return _fmt(v.tolist())
    if isinstance(v, (list, tuple)):
        items = ", ".join(_fmt(x) for x in v[:MAX_ITEMS])
        return f"[{items}{', …' if len(v) > MAX_ITEMS else ''}] ({len(v)})" if len(v) > MAX_ITEMS else f"[{items}]"
    try:
        if pd.isna(v):
            return "—"
    except (TypeError, ValueError):
        pass
    return str(v)


def _table(frame: pd.DataFrame, max_rows: int = MAX_ROWS) -> str:
    # Not ``dtype == object``: pandas ≥ 3 gives strings a dtype of their own.
    text_cols = {c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
                 and frame[c].map(lambda v: isinstance(v, (str, list, tuple)) or hasattr(v, "ndim")).any()}
    head = "".join(f'<th class="{"text" if c in text_cols else ""}">{_e(c)}</th>' for c in frame.columns)
    rows = []
    for rec in frame.head(max_rows).itertuples(index=False):
        cells = "".join(f'<td class="{"text" if c in text_cols else ""}">{_e(_fmt(v))}</td>' for c, v in zip(frame.columns, rec))
        rows.append(f"<tr>{cells}</tr>")
    return f'<div class="table-wrap"><table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _is_matrix(v) -> bool:
    """Arrays of two or more axes (e.g. pattern distances): shown as figures, not as text."""
    if hasattr(v, "ndim"):
        return v.ndim >= 2
    return isinstance(v, list) and bool(v) and isinstance(v[0], list)


def flat_values(values: Mapping) -> dict:
    """A section's values one level deep (a nested mapping's entries as "ov · rank"), without arrays
    of two or more axes: those are shown as figures, not as text."""
    flat = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            flat.update({f"{k} · {k2}": v2 for k2, v2 in v.items()})
        else:
            flat[k] = v
    return {k: v for k, v in flat.items() if not _is_matrix(v)}


def _kv(values: Mapping) -> str:
    """Key-value rows of :func:`flat_values`."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in flat_values(values).items())
    return f'<table class="kv">{rows}</table>'


def _figure(fig, div_id: str) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio

    fig = go.Figure(fig)  # a copy: the report's own figure keeps its layout
    fig.update_layout(template="plotly_white", margin=dict(l=60, r=30, t=60, b=50))
    if fig.layout.height is None:
        fig.update_layout(height=420)
    body = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})
    return f'<div class="figure">{body}</div>'


def methods_href() -> str | None:
    """The address of the methods page: a file:// address of docs/methods.md in the checkout the
    package runs from (a report lives in a directory of its own, so a relative link would not
    reach it), or None when the package is installed without it (the pages then name it only)."""
    path = Path(__file__).resolve().parents[2] / METHODS_DOC
    return path.as_uri() if path.is_file() else None


def _methods_link(n: int | None = None) -> str:
    """A link to section §n of the methods page (the whole page without ``n``), or its name where
    there is no page to link to."""
    text = METHODS_DOC if n is None else f"methods §{n}"
    href = methods_href()
    return _e(text) if href is None else f'<a href="{_e(href)}{"" if n is None else f"#s{n}"}">{_e(text)}</a>'


def _glossary(sec: SectionResult) -> str:
    """The section's terms with their definitions, each linking to where docs/methods.md defines it."""
    items = "".join(f"<dt>{_e(term)}</dt><dd>{_e(text)} ({_methods_link(n)})</dd>" for term, text, n in glossary(sec))
    return f'<dl class="glossary">{items}</dl>' if items else ""


def _changed(settings: Mapping) -> str:
    """Every setting that differs from the preset, as ``--set`` would write it ("" if none)."""
    return " ".join(f"{k}={v}" for k, v in changed_settings(settings).items())


def _section(sec: SectionResult, apart: dict) -> str:
    """One section of the page; ``apart``: its settings that differ from the header's (Report.settings_apart)."""
    badges = _badge(sec)
    if sec.cached or sec.kept:
        badges += f' <span class="badge cached">{"kept from an earlier run" if sec.kept else "from checkpoint"}</span>'
    when = f"{sec.wall_s:.1f} s" + (" (earlier run)" if sec.cached or sec.kept else "")
    other = ("computed with other settings than the header's (an earlier run into this directory): "
             + settings_text(apart)) if apart else ""
    meta = " · ".join(x for x in (when, sec.methods, other) if x)
    words = verdict(sec)
    parts = [f'<section id="sec-{_e(sec.name)}"><h2>{_e(sec.title)} {badges}</h2>'
             + (f'<p class="verdict">{_e(words)}</p>' if words else "") + _glossary(sec)
             + f'<p class="meta">{_e(meta)}</p>', *_outcome(sec)]
    for i, (name, fig) in enumerate(sec.figures.items()):
        parts.append(_figure(fig, f"fig-{sec.name}-{i}"))
    if sec.values:
        parts.append(("" if sec.name == "summary" else "<h3>Values</h3>") + _kv(sec.values))
    for name, table in sec.tables.items():
        parts.append(f"<h3>{_e(name.replace('_', ' '))}</h3>{_table(table)}")
        shown = f"first {MAX_ROWS} of {len(table)} rows; " if len(table) > MAX_ROWS else f"{len(table)} rows; "
        parts.append(f'<p class="more">{_e(shown)}all values in <code>{_e(sec.csv_name(name))}</code> and report.json</p>')
    details = {**sec.settings, **{f"version {k}": v for k, v in sec.versions.items()}}
    if details:
        parts.append(f"<details><summary>Settings and versions</summary>{_kv(details)}</details>")
    parts.append("</section>")
    return "\n".join(parts)


def _outcome(sec: SectionResult) -> list[str]:
    """What a section found: its headline (or why it has none, with the traceback of a failure),
    then its notes and warnings."""
    if sec.status == "ok":
        parts = [f'<p class="headline">{_e(sec.headline)}</p>']
    else:
        parts = [f'<div class="note{" error" if sec.status == "failed" else ""}">{_e(sec.status)}: {_e(sec.reason)}</div>']
        if sec.traceback:
            parts.append(f"<details><summary>Traceback</summary><pre>{_e(sec.traceback)}</pre></details>")
    parts += [f'<div class="note">{_e(n)}</div>' for n in sec.notes]
    parts += [f'<div class="note">warning: {_e(w)}</div>' for w in sec.warnings]
    return parts


def _facts(report: Report) -> dict[str, str]:
    """The header's facts about a report (the page's and the notebook's): backend, size, preset and
    seed, time, changed settings, the memory and time fits, data and where it came from."""
    m, s = report.model, report.settings
    facts = {"backend": f"{m.get('backend')} · {m.get('model_class')}",
             "live parameters": f"{m.get('n_live_parameters', 0):,}",
             "preset": f"{s.get('preset')}, seed {s.get('seed')}", "total time": f"{report.wall_s:.1f} s"}
    changed = _changed(s)
    if changed:
        facts["changed from preset"] = changed
    if s.get("memory"):
        facts["memory"] = memory_line(s["memory"])
    if (s.get("time_fit") or {}).get("lowered") or (s.get("time_fit") or {}).get("fits") is False:
        facts["time fit"] = time_line(s["time_fit"])
    if report.data:
        p = report.data["positions"]
        facts["data"] = f"{report.data.get('source')}: {p['n_sequences']} sequences · {p['n_samples']:,} positions"
    return facts


def _document(title: str, body: str, css: str = "") -> str:
    """A whole page: the styles, the script-error probe and plotly.js (inlined once) in the head."""
    from plotly.offline import get_plotlyjs

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}{css}</style>
{_ERROR_PROBE}
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
{body}
</body></html>
"""


def render_html(report: Report) -> str:
    """The report as one HTML page (see the module docstring)."""
    m, s = report.model, report.settings
    facts = _facts(report)
    facts_html = "".join(f'<div class="fact"><b>{_e(k)}</b><span>{_e(v)}</span></div>' for k, v in facts.items())
    toc = []
    for sec in report.sections.values():
        when = sec.when()
        hl = sec.headline if sec.status == "ok" else f"{sec.status}: {sec.reason}"
        words = verdict(sec) if sec.status == "ok" else ""
        line = f'<br><span class="verdict-line">{_e(words)}</span>' if words else ""
        toc.append(f'<li><a href="#sec-{_e(sec.name)}">{_e(sec.title)}</a> {_badge(sec)} '
                   f'<span class="time">{_e(when)}</span>{line}<br><span class="hl">{_e(hl)}</span></li>')
    settings = {k: v for k, v in s.items() if k != "budgets"}
    header_details = (f"<details><summary>Settings</summary>{_kv(settings)}{_kv(s.get('budgets', {}))}</details>"
                      f"<details><summary>Data</summary>{_kv(report.data or {'data': None})}"
                      f"{_kv((report.data or {}).get('positions', {}))}</details>"
                      f"<details><summary>Library versions</summary>{_kv(report.versions)}</details>")
    title = f"Degeneracy report — {m['label']}"
    return _document(title, f"""<header><h1>{_e(title)}</h1>
<p class="sub">tl-degeneracy {_e(report.versions.get("tl-degeneracy", ""))} · created {_e(report.created)}</p>
<div class="facts">{facts_html}</div></header>
<main>
<nav><h2>Contents</h2><ol>{"".join(toc)}</ol>{header_details}</nav>
{"".join(_section(sec, report.settings_apart(sec)) for sec in report.sections.values())}
</main>
<footer>Made by tl-degeneracy. Numbers: report.json and the CSV files beside this page. Methods:
{_methods_link()} in the tl-degeneracy repository ("METHODS §N" is its §N).</footer>""")


# ------------------------------------------------------------------------------ comparison.html
# Two reports side by side (compare.py): the report page's pieces, in two columns.
_COMPARE_CSS = """
header table.sides { border-collapse:collapse; margin-top:14px; font-size:14px; }
header table.sides th, header table.sides td { padding:2px 22px 2px 0; text-align:left; vertical-align:top; }
header table.sides th { color:#9fb3c8; font-weight:500; font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.pair { display:grid; grid-template-columns:minmax(0,1fr) minmax(0,1fr); gap:10px 24px; align-items:start; }
.side-label { font-size:12px; font-weight:600; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
.absent { color:var(--muted); font-style:italic; border:1px dashed var(--line); border-radius:8px; padding:10px 14px;
           margin:10px 0 14px; }
.pair .figure { margin:4px 0 10px; }
.badge.missing { background:#afb8c1; }
nav table.data td { white-space:normal; }
"""


def _badge(sec: SectionResult | None) -> str:
    """A section's status badge (:func:`section_status`)."""
    return f'<span class="badge {section_status(sec)}">{section_status(sec)}</span>'


def section_status(sec: SectionResult | None) -> str:
    """A section's status as the pages show it: "missing" where a report does not hold it, "off"
    for one that its preset does not run (audit 15b: the quick preset's sparsity showed a green
    "ok"), else its status."""
    if sec is None:
        return "missing"
    return "off" if sec.status == "ok" and sec.values.get("off") else sec.status


def _side_label(comparison: ReportComparison, i: int, sec: SectionResult | None) -> str:
    badge = " " + _badge(sec)
    return f'<div class="side-label">{"AB"[i]} · {_e(comparison.names[i])}{badge}</div>'


def _missing(comparison: ReportComparison, i: int, what: str) -> str:
    return f'<div class="absent">{_e(what)} is not in report {"AB"[i]} ({_e(comparison.names[i])})</div>'


def _compared_values(rows: pd.DataFrame) -> str:
    """A section's scalar values: A | B | B − A, estimates as value ± standard error with whether
    the difference lies outside two combined standard errors and the step sizes' biases
    (``compare.noise_interval``)."""
    from .compare import noise_interval  # compare builds on this module

    rows = rows[rows["value"] != "status"]
    if rows.empty:
        return ""
    has_se = rows["a_stderr"].notna() | rows["b_stderr"].notna()
    shown = pd.DataFrame({
        "value": rows["value"],
        "A": [value_text(v, se) for v, se in zip(rows["a"], rows["a_stderr"])],
        "B": [value_text(v, se) for v, se in zip(rows["b"], rows["b_stderr"])],
        "B − A": rows["difference"].map(lambda d: "" if pd.isna(d) else "0" if d == 0 else f"{d:+.4g}"),
    })
    if has_se.any():
        shown["beyond 2 SE"] = [
            f"not compared: {why}" if isinstance(why, str) and why != "yes" else
            "" if beyond is None or pd.isna(beyond) else
            f"{'yes' if beyond else 'no'}: B − A {'outside' if beyond else 'within'} "
            f"{noise_interval(a, b, sa, sb, None if pd.isna(ba) else ba, None if pd.isna(bb) else bb)}"
            for beyond, a, b, sa, sb, ba, bb, why in zip(rows["beyond_2se"], rows["a"], rows["b"], rows["a_stderr"],
                                                         rows["b_stderr"], rows["a_bias"], rows["b_bias"],
                                                         rows["comparable"])]
    note = ('<p class="more">± is the larger of the standard error of the mean over chains and ArviZ\'s Monte-Carlo '
            'standard error of all draws (METHODS §1); "beyond 2 SE": B − A lies outside ±2·√(se_A² + se_B²) widened by '
            "the step sizes' predicted biases (METHODS (1.8): a step size only raises λ̂, so |B|·bias_B above and "
            "|A|·bias_A below), more than chain-to-chain noise and the step size explain. Estimates are compared only at the same ε, γ, parameter selection and data, and "
            "when both converged (an unconverged λ̂ is a lower bound or uncertain beyond its ±); otherwise the column "
            "says why not.</p>" if has_se.any() else "")
    return f"<h3>Values</h3>{_table(shown, max_rows=len(shown))}{note}"


def value_text(value, stderr=None) -> str:
    """A value as the pages show it (4 significant digits, long lists abbreviated), ``± stderr``
    where it has a standard error (then to the error's decimal place: ``value_with_error``)."""
    if stderr is None or pd.isna(stderr):
        return _fmt(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value_with_error(float(value), float(stderr))
    return f"{_fmt(value)} ± {_fmt(float(stderr))}"


def _compared_section(comparison: ReportComparison, name: str, rows: pd.DataFrame) -> str:
    pair = comparison.section(name)
    present = next(sec for sec in pair if sec is not None)
    times = ", ".join(f"{side} {sec.when()}"
                      for side, sec in zip("AB", pair) if sec is not None)
    meta = " · ".join(x for x in (present.methods, times) if x)
    sides = []
    for i, sec in enumerate(pair):
        if sec is None:
            sides.append(f'<div>{_side_label(comparison, i, sec)}{_missing(comparison, i, f"Section {name!r}")}</div>')
            continue
        words = verdict(sec)
        sides.append(f"<div>{_side_label(comparison, i, sec)}"
                     + (f'<p class="verdict">{_e(words)}</p>' if words else "") + "".join(_outcome(sec)) + "</div>")
    parts = [f'<section id="sec-{_e(name)}"><h2>{_e(present.title)}</h2><p class="meta">{_e(meta)}</p>',
             f'<div class="pair">{"".join(sides)}</div>', _compared_values(rows)]
    figures = list(dict.fromkeys(f for sec in pair if sec is not None for f in sec.figures))
    for fig_name in figures:
        cells = []
        for i, sec in enumerate(pair):
            if sec is not None and fig_name in sec.figures:
                at = list(sec.figures).index(fig_name)
                cells.append(_figure(sec.figures[fig_name], f"fig-{'ab'[i]}-{name}-{at}"))
            elif sec is not None:
                cells.append(_missing(comparison, i, f"Figure {fig_name!r}"))
            else:
                cells.append("<div></div>")
        parts.append(f'<div class="pair">{"".join(cells)}</div>')
    parts.append("</section>")
    return "\n".join(parts)


def render_comparison(comparison: ReportComparison) -> str:
    """Two reports as one HTML page (compare.py): a header naming both models, data and settings,
    every setting that differs, then per section present in either both verdicts and headlines
    side by side, a table of its values A | B | B − A, and both reports' figures side by side."""
    a, b = comparison.a, comparison.b
    fa, fb = _facts(a), _facts(b)
    rows = {"report": comparison.names, "model": (a.model.get("label"), b.model.get("label")),
            "data": ((a.data or {}).get("source", "none"), (b.data or {}).get("source", "none")),
            "seed": (a.settings.get("seed"), b.settings.get("seed"))}
    rows.update({("positions" if k == "data" else k): (fa.get(k, ""), fb.get(k, ""))
                 for k in dict.fromkeys([*fa, *fb]) if k != "total time"})
    rows["tl-degeneracy"] = (a.versions.get("tl-degeneracy"), b.versions.get("tl-degeneracy"))
    rows["created"] = (a.created, b.created)
    facts = "".join(f"<tr><th>{_e(k)}</th><td>{_e(va)}</td><td>{_e(vb)}</td></tr>" for k, (va, vb) in rows.items())
    diff_html = _compared_settings(comparison, "h2")
    toc = []
    for name in comparison.sections:
        pair = comparison.section(name)
        title = next(sec for sec in pair if sec is not None).title
        badges = " ".join(f'{side} {_badge(sec)}'
                          for side, sec in zip("AB", pair))
        toc.append(f'<li><a href="#sec-{_e(name)}">{_e(title)}</a> {badges}</li>')
    frame = comparison.to_frame()
    sections = "".join(_compared_section(comparison, name, frame[frame["section"] == name])
                       for name in comparison.sections)
    sources = " · ".join(f"{side}: {_e(src or name)}" for side, src, name in zip("AB", comparison.sources, comparison.names))
    title = f"Degeneracy reports compared — {comparison.names[0]} vs {comparison.names[1]}"
    return _document(title, f"""<header><h1>{_e(title)}</h1>
<p class="sub">{sources}</p>
<table class="sides"><thead><tr><th></th><th>A</th><th>B</th></tr></thead><tbody>{facts}</tbody></table></header>
<main>
<nav>{diff_html}<h2>Contents</h2><ol>{"".join(toc)}</ol></nav>
{sections}
</main>
<footer>Made by tl-degeneracy. Numbers: comparison.csv beside this page, and each report's report.json. Methods:
{_methods_link()} in the tl-degeneracy repository ("METHODS §N" is its §N).</footer>""",
                     css=_COMPARE_CSS)

# Scoped to the view's own div: a notebook page has styles of its own.
_NOTEBOOK_CSS = """
.tld-report { font-size:13px; line-height:1.45; }
.tld-report .badge { display:inline-block; font-size:10px; font-weight:600; padding:0 7px; border-radius:9px; color:#fff;
                     text-transform:uppercase; }
.tld-report .badge.ok { background:#1a7f37; } .tld-report .badge.skipped { background:#9a6700; }
.tld-report .badge.failed { background:#cf222e; } .tld-report .badge.cached, .tld-report .badge.off { background:#6e7781; }
.tld-report table { border-collapse:collapse; margin:4px 0; font-variant-numeric:tabular-nums; }
.tld-report th, .tld-report td { padding:2px 10px; border-bottom:1px solid #d1d9e0; text-align:right; white-space:nowrap; }
.tld-report th.text, .tld-report td.text, .tld-report table.kv th, .tld-report table.sections td { text-align:left; }
.tld-report table.sections td { white-space:normal; vertical-align:top; }
.tld-report table.sections td.muted { white-space:nowrap; }
.tld-report details { margin:4px 0 4px 8px; } .tld-report summary { cursor:pointer; }
.tld-report .muted { color:#59636e; }
"""


def _notebook_section(sec: SectionResult, open_: bool = False, apart: dict | None = None) -> str:
    """One section as a <details> block: headline or reason, the settings it was computed with where
    they differ from the report's (``apart``, Report.settings_apart), notes, values and the first
    rows of each table."""
    when = sec.when()
    text = sec.headline if sec.status == "ok" else f"{sec.status}: {sec.reason}"
    words = verdict(sec)
    terms = ", ".join(f"{term} (methods §{n})" for term, _, n in glossary(sec))
    parts = [f'<details{" open" if open_ else ""}><summary><b>{_e(sec.title)}</b> '
             f'{_badge(sec)} <span class="muted">{_e(when)} · '
             f'{_e(sec.methods or sec.name)}</span></summary>'
             + (f"<p><b>{_e(words)}</b></p>" if words else "") + f"<p>{_e(text)}</p>"
             + (f'<p class="muted">terms: {_e(terms)}; definitions in {_e(METHODS_DOC)}</p>' if terms else "")]
    if apart:  # audit 15b: the notebook showed a kept section under the header's settings, unflagged
        parts.append(f"<p><b>computed with other settings than the header's (an earlier run into this directory): "
                     f"{_e(settings_text(apart))}</b></p>")
    parts += [f"<p>note: {_e(n)}</p>" for n in sec.notes]
    parts += [f"<p>warning: {_e(w)}</p>" for w in sec.warnings]
    if sec.values and sec.name != "summary":
        parts.append(_kv(sec.values))
    for name, table in sec.tables.items():
        more = f" (first {NOTEBOOK_ROWS} of {len(table)} rows)" if len(table) > NOTEBOOK_ROWS else ""
        parts.append(f'<p><code>.tables["{_e(name)}"]</code><span class="muted">{_e(more)}</span></p>'
                     f"{_table(table, NOTEBOOK_ROWS)}")
    if sec.figures:
        names = ", ".join(f'"{_e(n)}"' for n in sec.figures)
        parts.append(f'<p class="muted">figures (plotly; <code>.show()</code>): <code>.figures[…]</code> with {names}</p>')
    parts.append("</details>")
    return "".join(parts)


def _compared_settings(comparison: ReportComparison, heading: str) -> str:
    """The settings that differ, then those that sections kept from earlier runs share on both sides
    whatever their headers say (``settings_frame``'s ``differs``; review 37: the page listed them
    as differences), each under a ``heading`` ("h2" on the page, "p" in a notebook)."""
    frame = comparison.settings_frame().rename(columns={"a": "A", "b": "B"})
    diff, same = (frame[frame["differs"] == want].drop(columns="differs") for want in (True, False))

    def title(text: str) -> str:
        return f"<h2>{_e(text)}</h2>" if heading == "h2" else f"<p><b>{_e(text)}</b></p>"

    if not len(frame):
        return title("Settings") + "<p>The two reports were made with the same model, data, settings and versions.</p>"
    out = title(f"Settings that differ ({len(diff)})") + _table(diff, max_rows=len(diff)) if len(diff) else title(
        "Settings that differ (0)")
    if len(same):
        out += title(f"Computed alike on both sides, whatever the headers say ({len(same)})") + _table(same, max_rows=len(same))
    return out


def _notebook_comparison(comparison: ReportComparison) -> str:
    """Two reports compared, for a notebook: the settings that differ, one line per section with
    both statuses and verdicts, then each section folded with its values A | B | B − A (and, for
    estimates, whether B − A lies beyond the noise); figures stay in ``comparison.save``'s page."""
    settings = _compared_settings(comparison, "p")
    frame = comparison.to_frame()
    lines, folded = [], []
    for name in comparison.sections:
        pair = comparison.section(name)
        cells = "".join(f'<td>{_badge(sec)}</td>'
                        f'<td>{_e("" if sec is None else verdict(sec, with_reason=True) or sec.headline)}</td>' for sec in pair)
        lines.append(f"<tr><td><code>{_e(name)}</code></td>{cells}</tr>")
        values = _compared_values(frame[frame["section"] == name])
        if values:
            title = next(sec for sec in pair if sec is not None).title
            folded.append(f"<details><summary><b>{_e(title)}</b></summary>{values}</details>")
    names = " vs ".join(f"{side} = {n}" for side, n in zip("AB", comparison.names))
    return (f'<div class="tld-report"><style>{_NOTEBOOK_CSS}</style><h3>Degeneracy reports compared — {_e(names)}</h3>'
            f'{settings}<table class="sections"><tr><th class="text">section</th><th>A</th>'
            f'<th class="text">A: verdict</th><th>B</th><th class="text">B: verdict</th></tr>{"".join(lines)}</table>'
            f'{"".join(folded)}<p class="muted">Every value: <code>.to_frame()</code>; the settings that differ: '
            f"<code>.settings_frame()</code>; both reports' figures side by side: <code>.save(directory)</code> → "
            f"comparison.html.</p></div>")


def render_notebook(item: Report | SectionResult | ReportComparison) -> str:
    """The compact notebook view of a report (a header, one line per section, then each section
    folded), of one section (unfolded) or of a comparison of two reports; tables only, no script
    (see the module docstring)."""
    if isinstance(item, SectionResult):
        return f'<div class="tld-report"><style>{_NOTEBOOK_CSS}</style>{_notebook_section(item, open_=True)}</div>'
    if not isinstance(item, Report):
        return _notebook_comparison(item)
    m = item.model
    # the page's facts, the memory and time fits included (audit 15b: the notebook left out what they lowered)
    facts = [v if k in ("backend", "memory", "time fit") else f"{k} {v}" for k, v in _facts(item).items()]
    rows = "".join(
        f'<tr><td><code>{_e(sec.name)}</code></td><td>{_badge(sec)}</td>'
        f'<td class="muted">{_e(sec.when())}</td>'
        f'<td>{_e(verdict(sec) if sec.status == "ok" else "")}</td>'
        f'<td>{_e(sec.headline if sec.status == "ok" else f"{sec.status}: {sec.reason}")}</td></tr>'
        for sec in item.sections.values())
    return (f'<div class="tld-report"><style>{_NOTEBOOK_CSS}</style>'
            f"<h3>Degeneracy report — {_e(m['label'])}</h3><p class=\"muted\">{_e(' · '.join(facts))}</p>"
            f'<table class="sections">{rows}</table>'
            f"{''.join(_notebook_section(sec, apart=item.settings_apart(sec)) for sec in item.sections.values())}"
            f'<p class="muted">A section: <code>report["name"]</code>; its DataFrames: <code>.tables</code>; its plotly '
            f"figures: <code>.figures</code>; every plot in one page: <code>report.save(directory)</code> → report.html."
            f"</p></div>")
