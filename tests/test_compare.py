"""Two reports side by side (issue 17): ``tld.compare_reports`` and ``tl-degeneracy compare``.

Two reports of the tiny toy with different weights (seeds 0 and 1), the second also with another
report seed and ``n_probes``, on the cheap sections (summary, invariants, synchronization, counts:
about a second each). The frame's values are the reports' own; estimates with standard errors (the
LLC) are checked on hand-made sections whose answer is known; the page names both sides, every
setting that differs and holds both reports' figures; bad input exits 2 with one paragraph; and
comparison.html renders in headless Chromium with both sides' figures and no script error.
"""

import dataclasses
import html
import json
import math
import re

import pandas as pd
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.cli import main
from tl_degeneracy.report import Report, SectionResult, degeneracy_report
from tl_degeneracy.report.compare import ReportInputError
from tl_degeneracy.report.report import ReportDirectoryError
from tl_degeneracy.report.sections import verdict
from tests.fixtures.toys import TINY_TOY_KWARGS, make_tiny_toy_transformer
from tests.test_report_html import CHROMIUM, _chromium, _console_errors
from tests.test_report_output import _one_paragraph

CHEAP = ["summary", "invariants", "synchronization", "counts"]


def _report(model_seed: int, seed: int, n_probes: int) -> Report:
    tokens = torch.randint(0, TINY_TOY_KWARGS["d_vocab"], (6, 12), generator=torch.Generator().manual_seed(0))
    return degeneracy_report(make_tiny_toy_transformer(model_seed), tokens, sections=CHEAP, seed=seed,
                             overrides={"n_probes": n_probes}, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Reports A (toy seed 0) and B (toy seed 1, report seed 1, n_probes 3), saved to a/ and b/."""
    base = tmp_path_factory.mktemp("reports")
    a, b = _report(0, 0, 2), _report(1, 1, 3)
    a.save(base / "a")
    b.save(base / "b")
    return a, b, base / "a", base / "b"


def _row(frame, section, value):
    rows = frame[(frame["section"] == section) & (frame["value"] == value)]
    assert len(rows) == 1, (section, value)
    return rows.iloc[0]


# ------------------------------------------------------------------------------------------- API
def test_the_frame_holds_both_reports_values_and_their_differences(saved):
    a, b, dir_a, dir_b = saved
    comparison = tld.compare_reports(dir_a, dir_b)
    assert comparison.names == ("a", "b") and comparison.sources == (str(dir_a.resolve()), str(dir_b.resolve()))
    frame = comparison.to_frame()
    assert list(frame.columns) == ["section", "value", "a", "b", "difference", "a_stderr", "b_stderr", "a_bias",
                                   "b_bias", "beyond_2se", "comparable"]
    assert list(dict.fromkeys(frame["section"])) == CHEAP == comparison.sections
    for name in CHEAP:
        status = _row(frame, name, "status")
        assert (status["a"], status["b"]) == ("ok", "ok")
    checks = [("counts", "n_eff_kfac", lambda r: r["counts"].values["n_eff_kfac"]),
              ("counts", "free", lambda r: r["counts"].values["free"]),
              ("invariants", "ov · mean_copying_score", lambda r: r["invariants"].values["ov"]["mean_copying_score"]),
              ("synchronization", "neurons_in_blocks", lambda r: r["synchronization"].values["neurons_in_blocks"]),
              ("summary", "n_live_parameters", lambda r: r["summary"].values["n_live_parameters"])]
    for section, value, get in checks:
        row = _row(frame, section, value)
        assert row["a"] == get(a) and row["b"] == get(b), (section, value)
        assert row["difference"] == get(b) - get(a)
        assert pd.isna(row["a_stderr"]) and row["beyond_2se"] is None  # no standard error: no verdict on it
    # the two toys differ in their weights, not in their shapes
    assert _row(frame, "summary", "n_live_parameters")["difference"] == 0
    assert _row(frame, "invariants", "ov · mean_copying_score")["difference"] != 0
    assert _row(frame, "counts", "n_probes")[["a", "b", "difference"]].tolist() == [2, 3, 1]
    text = _row(frame, "summary", "backend")
    assert (text["a"], text["b"]) == ("toy", "toy") and pd.isna(text["difference"])
    assert not (frame["value"] == "head_distance").any()  # matrices are figures, not values
    # Reports given as such compare as their saved directories do.
    pd.testing.assert_frame_equal(tld.compare_reports(a, b).to_frame(), frame)


def test_every_setting_that_differs_is_listed(saved):
    *_, dir_a, dir_b = saved
    comparison = tld.compare_reports(dir_a, dir_b)
    diff = comparison.settings_frame().set_index("setting")
    assert set(diff.index) == {"model sha256", "seed", "n_probes"}
    assert diff.loc["seed"].tolist() == [0, 1, True] and diff.loc["n_probes"].tolist() == [2, 3, True]
    a_digest, b_digest = (Report.load(d).identity["model"]["digest"] for d in (dir_a, dir_b))
    assert diff.loc["model sha256"].tolist() == [a_digest, b_digest, True]
    text = comparison.summary()
    assert "3 setting(s) differ" in text and "seed 0 → 1" in text and "n_probes 2 → 3" in text
    assert tld.compare_reports(dir_a, Report.load(dir_a)).settings_frame().empty


#: The positions a hand-made LLC section sampled (the section's settings["llc_data"]).
LLC_DATA = {"n_sequences": 6, "n_positions": 72, "digest": "0" * 64}


def _llc(llc: float, se: float, sweep: dict[float, tuple[float, float]], gamma: float = 100.0,
         converged: bool = True, llc_data: dict = LLC_DATA, bias: float | None = None) -> SectionResult:
    """A hand-made LLC section: λ̂ ± se at the default scale and a sweep ε → (λ̂, se), all at ``gamma``,
    sampled on ``llc_data`` with predicted step-size bias ``bias``."""
    quantity = {"loss": "kl", "gamma": gamma, "selection": None, "n_params": 1000, "converged": converged,
                **({} if bias is None else {"bias_bound": bias})}
    table = pd.DataFrame([{"loss_scale": eps, "llc": v, "llc_stderr": s, "n_eff": 2 * v, **quantity}
                          for eps, (v, s) in sweep.items()])
    return SectionResult(name="llc", title="Behavioral LLC and N_eff(ε)", status="ok", headline=f"λ̂_B = {llc} ± {se}",
                         values={"llc": llc, "llc_stderr": se, "n_eff": 2 * llc, "loss_scale": 1e-3, **quantity,
                                 "convergence_reason": None if converged else "split-R̂ 1.3 > 1.05"},
                         tables={"sweep": table}, settings={"llc_data": dict(llc_data)})


def test_estimates_compare_within_two_combined_standard_errors(saved, tmp_path):
    a, b, *_ = saved
    # λ̂: 13 − 10 = 3 > 2·√(1² + 1²) = 2.83; N_eff: 6 > 2·√(2² + 2²) = 5.66 (se(N_eff) = 2·se(λ̂))
    # sweep ε = 0.01: 6 − 4 = 2 < 2.83; ε = 0.1 only in B: no difference
    with_llc = lambda rep, sec: dataclasses.replace(rep, sections={**rep.sections, "llc": sec})
    comparison = tld.compare_reports(with_llc(a, _llc(10.0, 1.0, {1e-2: (4.0, 1.0)})),
                                     with_llc(b, _llc(13.0, 1.0, {1e-2: (6.0, 1.0), 1e-1: (1.0, 0.5)})))
    frame = comparison.to_frame()
    expected = {"llc": (10, 13, 1, 1, True), "n_eff": (20, 26, 2, 2, True), "llc_stderr": (1, 1, None, None, None),
                "sweep ε=0.01 · llc": (4, 6, 1, 1, False), "sweep ε=0.01 · n_eff": (8, 12, 2, 2, False)}
    for value, (va, vb, se_a, se_b, beyond) in expected.items():
        row = _row(frame, "llc", value)
        assert (row["a"], row["b"], row["difference"]) == (va, vb, vb - va), value
        assert [None if pd.isna(x) else x for x in (row["a_stderr"], row["b_stderr"])] == [se_a, se_b], value
        assert row["beyond_2se"] is beyond, value
    only_b = _row(frame, "llc", "sweep ε=0.1 · n_eff")
    assert only_b["a"] is None and only_b["b"] == 2 and pd.isna(only_b["difference"]) and only_b["beyond_2se"] is None
    summary = " ".join(comparison.summary().split())  # wrapped to the terminal's width
    assert "llc: 10.0 ± 1.0 vs 13.0 ± 1.0, beyond 2 combined standard errors and the step sizes' biases" in summary
    page = comparison.save(tmp_path / "cmp").read_text()
    band = f"[{-2 * math.sqrt(2):.3g}, {2 * math.sqrt(2):.3g}]"
    assert "10.0 ± 1.0" in page and "13.0 ± 1.0" in page and f"yes: B − A outside {band}" in page
    assert f"no: B − A within {band}" in page
    assert (frame[frame["a_stderr"].notna() & frame["b_stderr"].notna()]["comparable"] == "yes").all()


def test_the_larger_of_the_chain_spread_and_the_mcse_is_the_standard_error(saved):
    """With two chains the chains' spread (± 1 here) can under-state the uncertainty that ArviZ's MCSE of
    all draws shows (3): the comparison uses the larger, so 10 vs 13 is no longer called a difference."""
    a, b, *_ = saved
    with_llc = lambda rep, sec, mcse: dataclasses.replace(
        rep, sections={**rep.sections, "llc": dataclasses.replace(sec, values={**sec.values, "llc_mcse": mcse})})
    frame = tld.compare_reports(with_llc(a, _llc(10.0, 1.0, {}), 3.0), with_llc(b, _llc(13.0, 1.0, {}), 3.0)).to_frame()
    row = _row(frame, "llc", "llc")
    assert (row["a_stderr"], row["b_stderr"]) == (3.0, 3.0) and row["beyond_2se"] is False
    assert _row(frame, "llc", "n_eff")["a_stderr"] == 6.0


def test_estimates_of_other_quantities_or_unconverged_are_not_tested(saved, tmp_path):
    a, b, *_ = saved
    with_llc = lambda rep, sec: dataclasses.replace(rep, sections={**rep.sections, "llc": sec})
    # γ differs (gamma="auto" picks it per run): λ̂_B(ε, γ) is another quantity, however far apart
    comparison = tld.compare_reports(with_llc(a, _llc(10.0, 0.1, {1e-2: (4.0, 0.1)}, gamma=538.0)),
                                     with_llc(b, _llc(13.0, 0.1, {1e-2: (6.0, 0.1)}, gamma=64550.0, converged=False)))
    frame = comparison.to_frame()
    for value in ("llc", "n_eff", "sweep ε=0.01 · llc"):
        row = _row(frame, "llc", value)
        assert row["beyond_2se"] is None, value
        assert "gamma differs (538 vs 6.455e+04)" in row["comparable"] and "B not converged" in row["comparable"]
    text = comparison.summary()
    assert "beyond 2 combined" not in text and "llc: not compared (gamma differs" in text
    assert "not compared: gamma differs" in comparison.save(tmp_path / "cmp").read_text()
    # the convergence verdicts, as they are
    assert "not converged" in verdict(comparison.b["llc"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runs too short to converge, on purpose
def test_sweep_rows_of_different_selections_are_not_one_quantity(saved, tiny_toy_transformer, tiny_toy_tokens):
    """Restricted LLCs of two heads of one size: their sweep rows (llc_sweep's own) name the selection, so
    they are not tested against each other, while two sweeps of one head are. The runs are too short to
    converge; they are marked converged here, so that only the quantity decides."""
    from tl_degeneracy.llc import llc_sweep

    a, b, *_ = saved

    def with_sweep(rep, head):
        frame = llc_sweep(tiny_toy_transformer, tiny_toy_tokens, [1e-2], params=f"blocks.0.attn.head{head}", chains=2,
                          draws=10, burnin=2, step_size=1e-6, progress=False).assign(converged=True)
        sec = SectionResult(name="llc", title="Behavioral LLC and N_eff(ε)", status="ok", tables={"sweep": frame},
                            settings={"llc_data": dict(LLC_DATA)})
        return dataclasses.replace(rep, sections={**rep.sections, "llc": sec})

    head0, head1, head0_again = with_sweep(a, 0), with_sweep(b, 1), with_sweep(b, 0)
    frame = tld.compare_reports(head0, head1).to_frame()
    for value in ("sweep ε=0.01 · llc", "sweep ε=0.01 · n_eff"):
        row = _row(frame, "llc", value)
        assert row["comparable"] == "selection differs (blocks.0.attn.head0 vs blocks.0.attn.head1)", value
        assert row["beyond_2se"] is None and row["a_stderr"] > 0  # an estimate, with its error, yet not tested
    assert "sweep ε=0.01 · llc: not compared (selection differs" in tld.compare_reports(head0, head1).summary()
    same = _row(tld.compare_reports(head0, head0_again).to_frame(), "llc", "sweep ε=0.01 · llc")
    assert same["comparable"] == "yes" and same["beyond_2se"] is not None


def test_a_quantity_a_report_does_not_record_is_not_taken_as_the_same(saved):
    """Rows of an older report that record no selection (or loss) may be of different selections: the
    comparison says so instead of taking None == None for one quantity."""
    a, b, *_ = saved
    older = _llc(10.0, 1.0, {1e-2: (4.0, 1.0)})
    older.tables["sweep"] = older.tables["sweep"].drop(columns=["selection", "loss"])
    with_llc = lambda rep, sec: dataclasses.replace(rep, sections={**rep.sections, "llc": sec})
    frame = tld.compare_reports(with_llc(a, older), with_llc(b, _llc(10.0, 1.0, {1e-2: (4.0, 1.0)}))).to_frame()
    row = _row(frame, "llc", "sweep ε=0.01 · llc")
    assert row["comparable"] == ("loss not recorded in A (not known to be one quantity); "
                                 "selection not recorded in A (not known to be one quantity)")
    assert row["beyond_2se"] is None
    assert _row(frame, "llc", "llc")["comparable"] == "yes"  # the section values record both


def test_estimates_on_other_data_are_not_one_quantity(saved):
    """Audit 12b: B's LLC sampled 8 tokens where A's sampled 48 (the time fit lowers them on its own):
    0.00018 against 0.15 passed as one quantity, "beyond 2 SE". The positions sampled are part of it."""
    a, b, *_ = saved
    with_llc = lambda rep, sec: dataclasses.replace(rep, sections={**rep.sections, "llc": sec})
    frame = tld.compare_reports(with_llc(a, _llc(10.0, 1.0, {1e-2: (4.0, 1.0)})),
                                with_llc(b, _llc(13.0, 1.0, {1e-2: (6.0, 1.0)}, llc_data={"n_sequences": 1,
                                                                                          "n_positions": 8,
                                                                                          "digest": "1" * 64}))).to_frame()
    for value in ("llc", "sweep ε=0.01 · llc"):
        row = _row(frame, "llc", value)
        assert row["comparable"] == "llc_data differs" and row["beyond_2se"] is None, value


def test_the_step_sizes_predicted_biases_widen_the_test(saved):
    """Audit 12b: two runs that differ only in their step size are one quantity, but their estimates may
    differ by each one's predicted bias (METHODS (1.8)), which only raises λ̂: B − A = 3 lies outside
    ±2√2 = ±2.83 but within [−2.83 − 10·0.1, 2.83 + 13·0.1] = [−3.83, 4.13]; B − A = −3.9 with A's
    bias 0 and B's 0.1 lies outside [−2.83, 2.83 + 0.61] (review 34: one-sided, not both biases each way)."""
    from tl_degeneracy.report.compare import noise_interval

    a, b, *_ = saved
    with_llc = lambda rep, sec: dataclasses.replace(rep, sections={**rep.sections, "llc": sec})
    row = _row(tld.compare_reports(with_llc(a, _llc(10.0, 1.0, {}, bias=0.1)),
                                   with_llc(b, _llc(13.0, 1.0, {}, bias=0.1))).to_frame(), "llc", "llc")
    assert (row["a_bias"], row["b_bias"], row["comparable"]) == (0.1, 0.1, "yes") and row["beyond_2se"] is False
    band = noise_interval(10.0, 13.0, 1.0, 1.0, 0.1, 0.1)
    assert (round(band.low, 2), round(band.high, 2)) == (-3.83, 4.13)
    row = _row(tld.compare_reports(with_llc(a, _llc(10.0, 1.0, {}, bias=0.0)),
                                   with_llc(b, _llc(6.1, 1.0, {}, bias=0.1))).to_frame(), "llc", "llc")
    assert row["beyond_2se"] is True
    unrecorded = _row(tld.compare_reports(with_llc(a, _llc(10.0, 1.0, {})), with_llc(b, _llc(13.0, 1.0, {}))).to_frame(),
                      "llc", "llc")
    assert unrecorded["a_bias"] is None and unrecorded["beyond_2se"] is True


def test_a_section_kept_with_other_settings_says_so(saved):
    """Audit 12b: A's synchronization section was kept from an earlier run at sync_tol 0.3 while both
    headers say 0.05: the comparison listed no differing setting."""
    a, b, *_ = saved
    sync = a.sections["synchronization"]
    kept = dataclasses.replace(a, sections={**a.sections, "synchronization": dataclasses.replace(
        sync, settings={**sync.settings, "sync_tol": 0.3})})
    comparison = tld.compare_reports(kept, b)
    differ = comparison.settings_frame().set_index("setting")
    assert differ.loc["synchronization: sync_tol"].tolist() == [0.3, b.sections["synchronization"].settings["sync_tol"], True]
    assert "sync_tol 0.3 vs" in _row(comparison.to_frame(), "synchronization", "status")["comparable"]
    assert _row(tld.compare_reports(a, b).to_frame(), "synchronization", "status")["comparable"] is None


def test_sections_computed_alike_under_headers_that_differ_say_so(saved):
    """Audit 15b: B's synchronization was kept from a run at sync_tol 0.05 while B's header says 0.3;
    A's is 0.05 too. The comparison said "sync_tol 0.05 → 0.3" and nothing else, so the identical
    values read as "sync_tol changes nothing". Settings that only say where the checkpoints were, or
    what the time fit predicted, are not listed as differences (they buried the real ones); a
    skipped section's reason is printed."""
    a, *_ = saved
    budgets = dict(a.settings["budgets"], sync_tol=0.3)
    sync = a.sections["synchronization"]
    b2 = dataclasses.replace(a, settings={**a.settings, "budgets": budgets, "checkpoint_dir": "/elsewhere",
                                          "time_fit": {"predicted": {"llc": 2.3}}},
                             sections={**a.sections, "synchronization": dataclasses.replace(sync, kept=True),
                                       "counts": dataclasses.replace(a.sections["counts"], status="skipped",
                                                                     reason="MissingHookError: no 'q' hook")})
    comparison = tld.compare_reports(a, b2)
    settings = comparison.settings_frame().set_index("setting")
    assert settings.loc["synchronization: sync_tol"].tolist() == [sync.settings["sync_tol"]] * 2 + [False]
    assert "checkpoint_dir" not in settings.index and "time_fit" not in settings.index
    status = _row(comparison.to_frame(), "synchronization", "status")["comparable"]
    assert status.startswith(f"both computed at sync_tol={sync.settings['sync_tol']:g}")
    summary = " ".join(comparison.summary(width=200).split())
    assert f"computed alike on both sides: synchronization: sync_tol {sync.settings['sync_tol']:g}" in summary
    assert "1 setting(s) differ, A → B: sync_tol" in summary
    assert "does not apply to this model or data (MissingHookError: no 'q' hook)" in summary
    # the page and the notebook say the same (review 37: they listed it among the differences)
    from tl_degeneracy.report.html import render_comparison

    for view in (render_comparison(comparison), comparison._repr_html_()):
        assert "Settings that differ (1)" in view and "Computed alike on both sides, whatever the headers say (1)" in view


def test_gamma_curve_rows_are_keyed_by_their_gamma(saved):
    """Audit 12b: γ-curve rows were labelled with 3 significant digits, and γ = 1004 overwrote γ = 1000."""
    a, b, *_ = saved
    sec = _llc(10.0, 1.0, {})
    curve = pd.DataFrame([{"gamma": g, "llc": v, "llc_stderr": 0.1, "n_eff": 2 * v, "loss": "kl", "loss_scale": 1e-3,
                           "selection": None, "n_params": 1000, "converged": True} for g, v in ((1000.0, 1.0), (1004.0, 2.0))])
    sec.tables["gamma_curve"] = curve
    with_llc = lambda rep: dataclasses.replace(rep, sections={**rep.sections, "llc": sec})
    frame = tld.compare_reports(with_llc(a), with_llc(b)).to_frame()
    assert _row(frame, "llc", "γ-curve γ=1000 · llc")["a"] == 1.0 and _row(frame, "llc", "γ-curve γ=1004 · llc")["a"] == 2.0


def test_the_page_shows_both_sides(saved, tmp_path):
    a, b, dir_a, dir_b = saved
    from plotly.offline import get_plotlyjs

    comparison = tld.compare_reports(dir_a, dir_b)
    path = comparison.save(tmp_path / "cmp")
    assert sorted(p.name for p in path.parent.iterdir()) == ["comparison.csv", "comparison.html", "comparison.json"]
    page = path.read_text()
    assert "<title>Degeneracy reports compared — a vs b</title>" in page
    assert page.count(get_plotlyjs()) == 1 and not re.search(r"<script[^>]+src=", page)  # inlined once, offline
    assert "Settings that differ (3)" in page and "n_probes" in page and str(dir_a.resolve()) in page
    for rep in (a, b):
        for sec in rep.sections.values():
            assert html.escape(verdict(sec)) in page and html.escape(sec.headline) in page, sec.name
    for side, rep in (("a", a), ("b", b)):
        ids = [f"fig-{side}-{sec.name}-{i}" for sec in rep.sections.values() for i in range(len(sec.figures))]
        assert len(ids) == 4 and all(f'<div id="{i}"' in page for i in ids)  # OV, QK, head distances, counts
    assert '<th class="text">B − A</th>' in page
    stored = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert len(stored) == len(comparison.to_frame())
    assert _row(stored, "counts", "n_eff_kfac")["difference"] == b["counts"].values["n_eff_kfac"] - a["counts"].values["n_eff_kfac"]


def test_the_notebook_view_shows_settings_verdicts_and_values_without_script(saved):
    a, b, *_ = saved
    with_llc = lambda rep, sec: dataclasses.replace(rep, sections={**rep.sections, "llc": sec})
    partial = dataclasses.replace(b, sections={k: v for k, v in b.sections.items() if k != "counts"})
    comparison = tld.compare_reports(with_llc(a, _llc(10.0, 1.0, {})), with_llc(partial, _llc(13.0, 1.0, {})))
    view = comparison._repr_html_()
    assert "<script" not in view and "Degeneracy reports compared — A = ToyTransformer vs B = ToyTransformer" in view
    assert "Settings that differ (3)" in view and "n_probes" in view
    for rep in (a, b):
        for sec in rep.sections.values():
            if sec.name != "counts" or rep is a:
                assert html.escape(verdict(sec)) in view, sec.name
    assert '<span class="badge missing">missing</span>' in view  # counts: only in A
    band = f"[{-2 * math.sqrt(2):.3g}, {2 * math.sqrt(2):.3g}]"
    assert "10.0 ± 1.0" in view and "13.0 ± 1.0" in view and f"yes: B − A outside {band}" in view


def test_a_section_missing_from_one_report_says_so(saved, tmp_path):
    a, b, *_ = saved
    partial = dataclasses.replace(b, sections={k: v for k, v in b.sections.items() if k != "counts"})
    comparison = tld.compare_reports(a, partial)
    frame = comparison.to_frame()
    assert _row(frame, "counts", "status")[["a", "b"]].tolist() == ["ok", "missing"]
    row = _row(frame, "counts", "n_eff_kfac")
    assert row["a"] == a["counts"].values["n_eff_kfac"] and row["b"] is None and pd.isna(row["difference"])
    page = comparison.save(tmp_path / "cmp").read_text()
    assert "Section &#x27;counts&#x27; is not in report B" in page
    assert 'id="fig-a-counts-0"' in page and 'id="fig-b-counts-0"' not in page


# ------------------------------------------------------------------------------------------- CLI
def _compare(*argv):
    return main(["compare", *map(str, argv)])


def test_cli_writes_the_comparison_and_keeps_to_its_directory(saved, tmp_path, monkeypatch, capsys):
    *_, dir_a, dir_b = saved
    monkeypatch.chdir(tmp_path)
    assert _compare(dir_a, dir_b) == 0
    out = tmp_path / "compare-a-vs-b"  # default: in the current directory, inside neither report's
    assert {p.name for p in out.iterdir()} == {"comparison.csv", "comparison.html", "comparison.json"}
    printed = capsys.readouterr().out
    assert "tl-degeneracy comparison: A = a" in printed and f"wrote {out.name}/comparison.html" in printed
    # an earlier comparison of the same two is replaced, in either order
    assert _compare(dir_a, dir_b, "--out", out) == 0 and _compare(dir_b, dir_a, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    third = tmp_path / "c"
    _report(2, 0, 2).save(third)
    assert _compare(dir_a, third, "--out", out) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert f"{out} holds the comparison of b and a, not of a and c" in err and "another --out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written

    assert _compare(dir_a, dir_b, "--out", third) == 2  # a report's own directory
    err = _one_paragraph(capsys.readouterr().err)
    assert f"{third} holds other files (report.json: a report, " in err and "another --out" in err
    assert not (third / "comparison.html").exists()


def test_bad_input_exits_2_with_one_paragraph(saved, tmp_path, capsys):
    *_, dir_a, dir_b = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "report.json").write_text('{"format": "tl-degeneracy-report/1", "model": ')
    not_a_report = tmp_path / "other"
    not_a_report.mkdir()
    (not_a_report / "report.json").write_text(json.dumps({"hello": 1}))
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "nowhere", dir_b), f"report A: {tmp_path / 'nowhere'} does not exist"),
        ((dir_a, empty), f"report B: {empty} holds no report.json"),
        ((damaged, dir_b), f"report A: {damaged / 'report.json'} cannot be read (JSONDecodeError"),
        ((dir_a, not_a_report), f"report B: {not_a_report / 'report.json'} cannot be read (ValueError: format None"),
        ((dir_a, dir_a), f"A and B are the same report ({dir_a.resolve()})"),
        ((dir_a, dir_a / ".." / dir_a.name), "A and B are the same report"),
    ]
    for (x, y), message in cases:
        assert _compare(x, y, "--out", out) == 2, message
        err = _one_paragraph(capsys.readouterr().err)
        assert message in err, err
        assert not out.exists()  # refused before anything is written
    with pytest.raises(ReportInputError, match="holds no report.json"):
        tld.compare_reports(dir_a, empty)
    with pytest.raises(ReportDirectoryError, match="holds other files"):
        tld.compare_reports(dir_a, dir_b).save(dir_a)
    # --debug: the traceback, then the same paragraph
    assert _compare(damaged, dir_b, "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "JSONDecodeError" in err and "tl-degeneracy: error: report A:" in err


# ------------------------------------------------------------------------------- real browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run does)")
def test_comparison_page_renders_both_sides_figures_without_script_errors(saved, tmp_path):
    a, b, dir_a, dir_b = saved
    page = tld.compare_reports(dir_a, dir_b).save(tmp_path / "cmp")
    done = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "data-js-errors" not in dom, re.findall(r'data-js-last-error="[^"]*"', dom)
    assert not _console_errors(done.stderr), _console_errors(done.stderr)
    n_figures = {side: sum(len(s.figures) for s in rep.sections.values()) for side, rep in (("a", a), ("b", b))}
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom)) == sum(n_figures.values())
    rendered = {"a": 0, "b": 0}
    for fig_id in re.findall(r'<div id="(fig-[ab]-[\w-]+)" class="plotly-graph-div', dom):
        body = dom.split(f'id="{fig_id}"', 1)[1].split('<div class="figure">', 1)[0]
        # plotly draws its axes and traces into SVG: <g class="trace ..."> for scatter and bars, "hm" for heatmaps
        assert 'class="main-svg"' in body and re.search(r'class="(trace [\w ]+|hm)"', body), fig_id
        rendered[fig_id[4]] += 1
    assert rendered == n_figures
