"""degeneracy_report: every section on a tiny toy, saved and read back; skipped and failed sections;
the section registry; the checkpoint cache and LLC resume; bad input refused before any work."""

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.llc.llc_result import value_with_error
from tl_degeneracy.report import SECTIONS, Report, SectionOutput, SectionResult, degeneracy_report, register_section
from tl_degeneracy.report.serialize import to_jsonable
from tl_degeneracy.report.settings import PRESETS, resolve_settings
from tests.fixtures.toys import TINY_TOY_KWARGS, make_tiny_toy_transformer

#: CI-sized LLC: far too short for converged estimates, long enough for finite positive ones. The
#: interaction basis reads 5 of the 8 sequences, cut to 10 tokens: 50 tokens fit 5 of them whole.
TINY = {"chains": 2, "draws": 12, "burnin": 4, "pilot_steps": 5, "loss_scales": (1e-2, 1e-3), "n_probes": 2,
        "ib_tokens": 54, "ib_seq_len": 10, "llc_max_draws": 1}  # one block of draws: no continuation


def _tokens(n=8, length=12, seed=0):
    return torch.randint(0, TINY_TOY_KWARGS["d_vocab"], (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    model = make_tiny_toy_transformer()
    with warnings.catch_warnings(record=True) as caught:  # the short chains may warn about their bias bound
        warnings.simplefilter("always")
        rep = degeneracy_report(model, _tokens(), overrides=TINY, llc_components=["blocks.1.attn"], progress=False)
    out = tmp_path_factory.mktemp("report")
    rep.save(out)
    return rep, out, [str(w.message) for w in caught]


def test_every_section_runs_on_the_tiny_toy(full_report):
    rep, _, caught = full_report
    assert list(rep.sections) == list(SECTIONS)
    assert {s.status for s in rep.sections.values()} == {"ok"}, {s.name: s.reason for s in rep.sections.values()}
    # only the LLC's own may fire, synchronization's on 8 short sequences (blocks and input ranks that half
    # of them give otherwise, audit 13b F1/F4) and the modules' restarts that disagree on the count (F7)
    data_limited = ("report section 'synchronization': head_synchronization: ",
                    "report section 'synchronization': neuron_synchronization: ")
    restarts = "report section 'interaction': find_modules: the 5 restarts of louvain found"
    # and, on so few samples, the modules of each half of the data and interaction eigenvalues the data
    # do not tell apart (audit 23b F1/F2)
    sampling = ("report section 'interaction': find_modules: the edges of the data's even- and odd-numbered",
                "report section 'interaction': interaction_basis: at ")
    assert all(w.startswith(("report section 'llc'", restarts, *data_limited, *sampling)) for w in caught), caught
    assert all("half" in w for w in caught if w.startswith(data_limited)), caught
    for s in rep.sections.values():
        assert s.wall_s >= 0 and s.versions["torch"] == torch.__version__ and s.headline
        assert set(SECTIONS[s.name].settings) <= set(s.settings)
    assert rep.model["n_live_parameters"] == tld.adapt(make_tiny_toy_transformer()).live_parameters().numel
    assert rep.data["positions"]["n_samples"] == 8 * 12


def test_sections_hold_the_analyses_numbers(full_report):
    from tl_degeneracy.report.sections import _sweep_point

    rep, _, _ = full_report
    model, tokens = make_tiny_toy_transformer(), _tokens()
    ov = tld.ov_invariants(model)
    assert rep["invariants"].tables["ov"]["rank"].tolist() == ov["rank"].tolist()
    counts = rep["counts"]
    assert counts.values["n_eff_kfac"] == int(counts.tables["maps"]["kfac"].sum())
    assert counts.tables["totals"]["n_params"].sum() == counts.values["n_params"]
    # the totals carry their band and verdicts, as the maps do (audit 13b F19: the CSV is read on its own)
    totals, maps = counts.tables["totals"], counts.tables["maps"]
    assert [totals["kfac_min"].sum(), totals["kfac_max"].sum()] == counts.values["n_eff_kfac_band"]
    assert totals["data_limited_maps"].sum() == maps["data_limited"].sum() == counts.values["data_limited_maps"]
    assert totals["probe_limited_maps"].sum() == counts.values["probe_limited_maps"]
    direct = tld.head_synchronization(model, tokens, tol=PRESETS["quick"].sync_tol)
    np.testing.assert_allclose(rep["synchronization"].values["head_distance"], direct.distance)
    llc = rep["llc"]
    sweep = llc.tables["sweep"]
    assert sorted(sweep["loss_scale"]) == sorted({1e-2, 1e-3, PRESETS["quick"].loss_scale})
    default = sweep[np.isclose(sweep["loss_scale"], llc.values["loss_scale"])].iloc[0]
    assert default["llc"] == llc.values["llc"] and math.isclose(llc.values["n_eff"], 2 * llc.values["llc"])
    assert np.all(np.isfinite(sweep["llc"])) and np.all(sweep["llc"] > 0) and (sweep["n_failed"] == 0).all()
    assert len(llc.tables["chains"]) == TINY["chains"]
    assert llc.tables["components"]["component"].tolist() == ["blocks.1.attn"]
    # a digest of the very tokens the LLC sampled, so that a comparison tests only LLCs of the same data (review 34)
    assert re.fullmatch(r"[0-9a-f]{64}", llc.settings["llc_data"]["digest"])
    # audit 8a: each component ran at its own automatic γ, 30–60× below the whole model's, side by side
    assert (llc.tables["components"]["gamma"] == llc.values["gamma"]).all()
    assert set(llc.figures) == {"n_eff_sweep", "trace", "components"}
    # every N_eff(ε, γ) of the headline carries its ± and, unconverged, reads as a lower bound
    points = llc.headline.split("N_eff(ε, γ): ", 1)[1].split("), ")
    assert len(points) == len(sweep) and all(" ± " in p for p in points)
    for p, r in zip(points, sweep.itertuples()):  # a lower bound only where the failure biases λ̂ low
        assert ("(not converged" in p) == (not r.converged)
        assert p.startswith("≥ ") == (not r.converged and r.lower_bound)
        assert p.startswith("≈ ") == (not r.converged and not r.lower_bound)
    # Two chains: every ± is flagged (METHODS §1, "Standard error"), and every ± printed or drawn is the
    # larger of the chains' spread and the ESS-based standard error (audit 11b F4: the text quoted the spread).
    assert all("only 2 healthy chain(s)" in c for c in sweep["stderr_caveat"])
    assert all("only 2 healthy chain(s)" in c for c in llc.tables["components"]["stderr_caveat"])
    assert (sweep["llc_stderr"] >= sweep["llc_mcse"]).all() and llc.values["llc_stderr"] >= llc.values["llc_mcse"]
    # each value to its ±'s decimal place (audit 15b: 1234.6 ± 2.2 printed "1.23e+03 ± 2.2")
    for p, r in zip(points, sweep.itertuples()):
        assert f"{value_with_error(r.n_eff, 2 * r.llc_stderr, '.3g')} (± uncertain: 2 healthy chains)" in p, p
    head = llc.headline.split("N_eff(ε, γ): ", 1)[0]
    assert f"{value_with_error(llc.values['llc'], llc.values['llc_stderr'])} (± uncertain: 2 healthy chains)" in head, head
    # every component's estimate with its verdict, as the sweep points, in the verdict the terminal wraps
    # (audit 15b: tables and clipped warnings only; review 37: not the headline, which the terminal clips)
    listed = [f"{r.component} {_sweep_point(r)}" for r in llc.tables["components"].itertuples()]
    assert llc.values["component_points"] == listed
    assert " ".join(rep.summary(width=100).split()).count(f"components: {', '.join(listed)}") == 1
    bars = np.concatenate([np.asarray(t.error_y.array) for t in llc.figures["n_eff_sweep"].data])
    assert np.allclose(np.sort(bars), np.sort(4 * sweep["llc_stderr"]))


def test_an_llc_without_a_spread_says_so_instead_of_nan():
    from tl_degeneracy.llc.llc_result import estimate_text

    assert estimate_text(341.6, float("nan"), 1) == "341.6 ± unknown (1 healthy chain: no spread to measure)"
    assert estimate_text(50.7213, 0.391, 4) == "50.72 ± 0.39"


def test_saved_report_round_trips_and_has_a_csv_per_table(full_report, tmp_path):
    rep, out, _ = full_report
    stored = json.loads((out / "report.json").read_text())  # strict JSON: json.loads would accept NaN, so check
    assert not re.search(r"\bNaN\b|\bInfinity\b", (out / "report.json").read_text())
    assert stored == json.loads(json.dumps(rep.to_dict()))
    loaded = Report.load(out)
    assert loaded.to_dict() == stored
    again = loaded.save(tmp_path / "again")  # a loaded report renders again, with its figures
    assert again.read_text().count("Plotly.newPlot") == (out / "report.html").read_text().count("Plotly.newPlot")
    n_tables = 0
    for name, sec in stored["sections"].items():
        for table, t in sec["tables"].items():
            csv = pd.read_csv(out / t["csv"])
            assert list(csv.columns) == t["columns"] and len(csv) == len(t["records"]), (name, table)
            n_tables += 1
    assert n_tables == len(list(out.glob("*.csv"))) == 15  # llc components and 4 interaction tables included
    # complex eigenvalues are stored as [re, im] pairs, every one of them
    ev = stored["sections"]["invariants"]["tables"]["ov"]["records"][0]["eigenvalues"]
    assert all(len(pair) == 2 for pair in ev) and len(ev) == rep["invariants"].tables["ov"]["rank"].iloc[0]


def test_html_is_self_contained(full_report):
    import plotly

    rep, out, _ = full_report
    page = (out / "report.html").read_text()
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    assert page.count(bundle) == 1  # plotly.js inlined exactly once
    rest = page.replace(bundle, "")
    assert not re.search(r"<script[^>]*\bsrc=", rest) and not re.search(r"<link[^>]*\bhref=", rest)
    # Base64 figure data may spell "cdn" by chance but never contains "." or ":".
    assert not re.search(r"cdn\.|https?://", rest.lower())
    n_figures = sum(len(s.figures) for s in rep.sections.values())
    assert rest.count("Plotly.newPlot") == n_figures
    for sec in rep.sections.values():  # table of contents and one anchor per section
        assert f'href="#sec-{sec.name}"' in rest and f'id="sec-{sec.name}"' in rest
    assert f"v{plotly.__version__}" in page or plotly.__version__ in page
    assert "<table class=\"data\">" in rest  # tables are HTML, readable without JavaScript


def test_interaction_section_equals_a_direct_call(full_report):
    """Ground truth: the same functions on the same tokens with the same seed give the same numbers."""
    rep, _, _ = full_report
    sec = rep["interaction"]
    direct = tld.interaction_basis(make_tiny_toy_transformer(), _tokens()[:5, :10], kind="local", output="kl",
                                   last="outputs", n_probes=PRESETS["quick"].ib_probes, seed=0, progress=False)
    modules = tld.find_modules(direct, seed=0)
    assert list(sec.tables["dims"].columns) == ["node", "D", "rank_G", "interaction_rank", "degenerate", "n", "distinct",
                                                "M", "M_method", "probe_stability", "estimated", "sample_limited", "rank_G_half",
                                                "interaction_rank_half", "data_limited", "limited_within_band", "unresolved", "rank_G_min",
                                                "rank_G_max", "interaction_rank_min", "interaction_rank_max"]
    pd.testing.assert_frame_equal(sec.tables["dims"], direct.dims, check_exact=True)
    assert (sec.tables["dims"]["n"] == 5 * 10).all()  # the ib_tokens budget: 5 whole sequences of 10 tokens
    pd.testing.assert_frame_equal(sec.tables["edges"], direct.edge_summary(), check_exact=True)
    assert len(sec.tables["edges"]) == len(direct.nodes) - 1 == 2
    # the modules' table also says what its edges rest on (audit 13b F19)
    pd.testing.assert_frame_equal(sec.tables["modules"], modules.to_frame().assign(
        basis_estimated_nodes=int(direct.dims["estimated"].sum()), data_limited_nodes=int(direct.dims["data_limited"].sum())),
        check_exact=True)
    pd.testing.assert_frame_equal(sec.tables["members"], modules.members_frame(), check_exact=True)
    assert sec.values["degenerate_directions"] == int(direct.dims["degenerate"].sum())
    assert (sec.values["n_modules"], sec.values["modularity"], sec.values["inside_share"]) == \
        (modules.n_modules, modules.modularity, modules.inside_share)
    assert (sec.values["mass_inside_share"], sec.values["half_modules"], sec.values["half_agreement"]) == \
        (modules.mass_inside_share, list(modules.half_modules), list(modules.half_agreement))
    assert sec.settings["kind"] == "local" and sec.settings["output"] == "kl" and sec.settings["nodes"] == direct.nodes
    # the last node read by the outputs: a PCA node's "degenerate" directions are only those without variance
    assert sec.settings["basis"]["last"] == "outputs" and direct.dims["M"].iloc[-1] == "outputs"
    assert sec.values["data_limited_nodes"] == int(direct.dims["data_limited"].sum())
    assert sec.values["limited_within_band_nodes"] == int(direct.dims["limited_within_band"].sum())
    # unresolved pairs out of all adjacent pairs of kept directions (review 59: 318 alone read as alarming)
    dims, adjacent = direct.dims, int((direct.dims["interaction_rank"] - 1).clip(lower=0).sum())
    assert (sec.values["unresolved_pairs"], sec.values["adjacent_pairs"]) == (int(dims["unresolved"].sum()), adjacent)
    if dims["unresolved"].any():
        from tl_degeneracy.report.sections import verdict

        assert f"{int(dims['unresolved'].sum())} of {adjacent} pairs of adjacent directions" in sec.headline
        assert f"{int(dims['unresolved'].sum())} of {adjacent} pairs of adjacent directions" in verdict(sec)
    assert sec.settings["ib_tokens"] == 54 and sec.settings["ib_data"]["n_sequences"] == 5
    assert set(sec.values["timings"]) == {"gram_s", "jacobian_s", "edges_s", "modules_s"}
    assert set(sec.figures) == {"spectra", "edges", "modules"}
    # ranks from probes are labelled estimates, with the half-probe agreement (audit 4)
    probed = direct.dims[direct.dims["M_method"] == "probes"]
    assert sec.values["probe_nodes"] == len(probed)
    if len(probed):
        assert f"estimated from {PRESETS['quick'].ib_probes} Jacobian probes per batch" in sec.headline
        assert sec.values["min_probe_stability"] == pytest.approx(float(probed["probe_stability"].min()))
        from tl_degeneracy.report.sections import verdict

        assert "(estimated: M from" in verdict(sec)
    # the split-half error of ΣE: each half's bases fitted to it alone (0.4.16), a scale and not a bound
    from tl_degeneracy.report.sections import verdict

    assert sec.values["edge_sampling_refit"] == "whole recursion"
    assert sec.values["edge_sampling"] > 0
    assert "each half's bases fitted to it alone; one degree of freedom, a scale and not a bound" in verdict(sec)
    # review 60 F9: a 0.4.15 report's halves read the whole data's next basis, and its verdict still says so
    old = dataclasses.replace(sec, values={k: v for k, v in sec.values.items() if k != "edge_sampling_refit"})
    assert "a LIB node's through the whole data's next basis" in verdict(old)
    names = list(SECTIONS)
    assert names.index("interaction") == names.index("llc") - 1


def test_interaction_tables_survive_save_and_load(full_report):
    rep, out, _ = full_report
    loaded = Report.load(out)["interaction"]
    for name in ("dims", "edges", "modules", "members"):
        table = rep["interaction"].tables[name]
        csv = pd.read_csv(out / f"interaction_{name}.csv")
        for frame in (csv, loaded.tables[name]):
            assert list(frame.columns) == list(table.columns) and len(frame) == len(table), name
            for col in table.columns:
                if pd.api.types.is_numeric_dtype(table[col]):  # CSV text keeps 17 digits: floats come back exactly
                    np.testing.assert_array_equal(pd.to_numeric(frame[col]).to_numpy(float),
                                                  table[col].to_numpy(float, na_value=np.nan), err_msg=f"{name}.{col}")
                else:
                    assert frame[col].tolist() == table[col].tolist(), (name, col)


@pytest.mark.filterwarnings("ignore:report section 'interaction'. A forward hook edited")  # the bridge's own note
@pytest.mark.parametrize("which", ["toy:modadd", "llama-bridge"])
def test_interaction_section_on_other_models(which, request):
    if which == "llama-bridge":
        model, data = request.getfixturevalue("tl_models")("llama", "bridge"), torch.randint(3, 100, (4, 8))
    else:
        model, data = which, None  # the toy's own data
    sec = degeneracy_report(model, data, sections=["interaction"], progress=False, errors="raise")["interaction"]
    dims = sec.tables["dims"]
    assert sec.status == "ok" and dims["node"].iloc[-1] in ("ln_final.hook_normalized", "blocks.0.hook_resid_post")
    assert (dims["interaction_rank"] <= dims["rank_G"]).all() and (dims["degenerate"] == dims["D"] - dims["interaction_rank"]).all()
    assert len(sec.tables["edges"]) == len(dims) - 1 and np.isfinite(sec.tables["edges"]["total"]).all()


def test_notebook_view_shows_every_section_with_its_tables_and_no_script(full_report):
    rep, _, _ = full_report
    page = rep._repr_html_()
    for sec in rep.sections.values():
        assert sec.title in page and sec.headline.split(";")[0].replace("'", "&#x27;") in page
    assert "<script" not in page and 'class="tld-report"' in page
    one = rep["interaction"]._repr_html_()
    assert rep["interaction"].title in one and all(f'.tables["{name}"]' in one for name in rep["interaction"].tables)
    assert "<script" not in one and len(one) < len(page)
    assert repr(rep) == rep.summary()
    counts = rep["counts"]
    line = repr(counts)
    assert "\n" not in line and counts.status in line and all(f"{k} {t.shape[0]}×{t.shape[1]}" in line
                                                              for k, t in counts.tables.items())
    assert rep.data["source"] == "Tensor [8, 12]"


def test_an_llc_point_whose_chains_all_diverge_keeps_the_section(tmp_path):
    """Audit 17b F1: a step_size stable at the main ε diverges at a sweep's smaller one; the sweep
    raised, and the report recorded the whole LLC section as failed, the main run's λ̂ lost. Now the
    section is ok, its headline and a note name the point without an estimate and what to change,
    and the report saves (NaN as null)."""
    overrides = dict(chains=2, draws=10, burnin=2, pilot_steps=2, loss_scales=[1e-3, 1e-9], llc_max_draws=10,
                     step_size=1e-4, n_sequences=8, llc_sequences=2, llc_seq_len=12, llc_time_limit=None)
    with pytest.warns(RuntimeWarning, match="the other points are kept"):
        report = degeneracy_report("toy:sma", sections=["llc"], overrides=overrides, progress=False, out=tmp_path / "r")
    section = report["llc"]
    assert section.status == "ok" and math.isfinite(section.values["llc"])
    assert re.search(r"no estimate at \(ε = 1e-09, γ = \S+\): every chain diverged \(the table's error column says "
                     r"what to change\)$", section.headline)
    assert "over loss scales" in section.figures["n_eff_sweep"].layout.title.text  # review 41: not drawn as a γ-curve
    assert re.match(r"No estimate: λ̂\(ε = 1e-09, γ = \S+\): all 2 chains diverged .*reduce step_size \(now 0.0001\)",
                    section.notes[-1])
    sweep = section.tables["sweep"]
    assert list(sweep["loss_scale"]) == [1e-3, 1e-9] and sweep["error"].iloc[0] is None
    assert math.isnan(sweep["llc"].iloc[1]) and sweep["error"].iloc[1] in section.notes[-1]
    saved = json.loads((tmp_path / "r" / "report.json").read_text())["sections"]["llc"]
    assert saved["status"] == "ok" and saved["tables"]["sweep"]["columns"][-1] == "error"


def test_per_component_llcs_run_at_the_main_run_s_loss_scale():
    """Review 41: the per-component LLCs ran at the default ε whatever loss_scale said, while the note
    called them comparable with the main run (values compare only at equal ε and γ, METHODS §1)."""
    overrides = dict(chains=2, draws=10, burnin=2, pilot_steps=2, loss_scale=1e-2, loss_scales=[1e-2], llc_max_draws=10,
                     n_sequences=8, llc_sequences=2, llc_seq_len=12, llc_time_limit=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        section = degeneracy_report("toy:sma", sections=["llc"], overrides=overrides, progress=False,
                                    llc_components=["blocks.0.attn"])["llc"]
    assert section.values["loss_scale"] == 1e-2 and list(section.tables["components"]["loss_scale"]) == [1e-2]
    assert list(section.tables["components"]["gamma"]) == [section.values["gamma"]]
    assert any(n.startswith("The per-component LLCs are sampled at the main run's ε = 0.01 and γ = ") for n in section.notes)


def test_a_loaded_toy_brings_its_name_and_data():
    # A model from tld.load_model keeps its spec, so the report reads the toy's own data, as for the spec.
    model = tld.load_model("toy:sma")
    assert model.tld_spec == "toy:sma"
    rep = degeneracy_report(model, sections=["activations"], overrides={"n_sequences": 8}, progress=False)
    assert rep.model["label"] == "toy:sma" and rep.data["source"] == "toy:sma"


def test_a_section_that_does_not_apply_is_skipped_with_its_reason():
    # toy:sma has no query projection, so the counts (which need hook_q) do not apply; the rest run.
    rep = degeneracy_report("toy:sma", sections=["invariants", "counts"], overrides={"n_sequences": 8}, progress=False)
    assert rep["invariants"].status == "ok"
    counts = rep["counts"]
    assert counts.status == "skipped" and counts.reason.startswith("MissingHookError") and "query" in counts.reason
    assert counts.traceback is None and "skipped: MissingHookError" in rep.summary()


@pytest.fixture
def temporary_section():
    added = []

    def add(name, compute, **kwargs):
        register_section(name, name.title(), needs_data=False, **kwargs)(compute)
        added.append(name)

    yield add
    for name in added:
        SECTIONS.pop(name, None)


def test_a_failing_section_is_recorded_with_its_traceback_and_a_warning(temporary_section):
    def broken(ctx):
        return {"not": "a SectionOutput"}["missing"]

    temporary_section("broken", broken)
    with pytest.warns(RuntimeWarning, match="section 'broken' failed with KeyError"):
        rep = degeneracy_report(make_tiny_toy_transformer(), sections=["summary", "broken"], progress=False)
    sec = rep["broken"]
    assert sec.status == "failed" and sec.reason == "KeyError: 'missing'" and "broken" in sec.traceback
    assert rep["summary"].status == "ok"
    with pytest.raises(KeyError):
        degeneracy_report(make_tiny_toy_transformer(), sections=["broken"], progress=False, errors="raise")


def test_a_registered_section_slots_in_before_another(temporary_section):
    def weights(ctx):
        n = ctx.adapter.live_parameters().numel
        return SectionOutput(values={"n": n}, headline=f"{n} parameters", tables={"t": pd.DataFrame({"n": [n]})})

    temporary_section("weights", weights, before="llc", settings=("chains",))
    names = list(SECTIONS)
    assert names.index("weights") == names.index("llc") - 1
    rep = degeneracy_report(make_tiny_toy_transformer(), sections=["weights"], progress=False)
    assert rep["weights"].values == {"n": 5396} and rep["weights"].settings == {"chains": PRESETS["quick"].chains}
    with pytest.raises(ValueError, match="unknown settings"):
        register_section("bad", "Bad", needs_data=False, settings=("nope",))(weights)


@pytest.mark.filterwarnings("ignore:report section 'llc'")
def test_rerun_reuses_finished_sections_and_resumes_the_llc(tmp_path):
    model, tokens = make_tiny_toy_transformer(), _tokens(4)
    kwargs = dict(sections=["invariants", "llc"], overrides={**TINY, "loss_scales": (1e-3,)}, checkpoint_dir=tmp_path,
                  progress=False)
    first = degeneracy_report(model, tokens, **kwargs)
    assert not first["llc"].cached and first["llc"].values["diagnostics"]["step_size_source"] == "automatic"
    second = degeneracy_report(model, tokens, **kwargs)
    assert second["invariants"].cached and second["llc"].cached
    assert second["llc"].to_dict() == {**first["llc"].to_dict(), "cached": True}
    # Without the finished-section cache the LLC resumes from its own sampler checkpoint.
    (tmp_path / "sections" / "llc.json").unlink()
    third = degeneracy_report(model, tokens, **kwargs)
    assert not third["llc"].cached
    assert third["llc"].values["diagnostics"]["step_size_source"] == "automatic (from checkpoint)"
    assert third["llc"].values["llc"] == first["llc"].values["llc"]
    # Other settings: a new fingerprint and checkpoint directory, so nothing is reused (nor refused).
    other = degeneracy_report(model, tokens, **{**kwargs, "overrides": {**kwargs["overrides"], "draws": 14}})
    assert other["llc"].status == "ok" and not other["llc"].cached and other["llc"].values["draws"] == 14
    assert len(list(tmp_path.glob("llc-*/default/llc-rank0.pt"))) == 2
    # Other weights: a new fingerprint too.
    with torch.no_grad():
        model.blocks[0].attn.W_V[0, 0, 0] += 1.0
    assert not degeneracy_report(model, tokens, **{**kwargs, "sections": ["invariants"]})["invariants"].cached


@pytest.mark.filterwarnings("ignore:report section 'llc'")
def test_a_section_is_recomputed_only_for_what_moves_it(tmp_path):
    # Audit 20a F4: more statistics sequences recomputed the LLC although it samples the same first
    # llc_sequences, and another seed recomputed the sections that draw nothing at random.
    model, tokens = make_tiny_toy_transformer(), _tokens(8)
    overrides = {**TINY, "loss_scales": (1e-3,), "llc_sequences": 2, "n_sequences": 4}
    kwargs = dict(sections=["activations", "counts", "llc"], checkpoint_dir=tmp_path, progress=False)
    first = degeneracy_report(model, tokens, overrides=overrides, **kwargs)
    more = degeneracy_report(model, tokens, overrides={**overrides, "n_sequences": 8}, **kwargs)
    assert more["llc"].cached and more["llc"].to_dict() == {**first["llc"].to_dict(), "cached": True}
    # its record of the data it sampled holds no count of the whole data (review 50: n_dropped went stale)
    assert "n_dropped" not in more["llc"].settings["llc_data"] and "n_padding" not in more["llc"].settings["llc_data"]
    assert not more["activations"].cached and not more["counts"].cached
    reseeded = degeneracy_report(model, tokens, overrides={**overrides, "n_sequences": 8}, seed=1, **kwargs)
    assert reseeded["activations"].cached
    assert not reseeded["counts"].cached and not reseeded["llc"].cached
    # Other tokens within the LLC's prefix do move it.
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % TINY_TOY_KWARGS["d_vocab"]
    assert not degeneracy_report(model, changed, overrides=overrides, **kwargs)["llc"].cached


def test_a_section_reads_one_of_the_contexts_batches():
    with pytest.raises(ValueError, match="none of the context's batches"):
        register_section("bad", "Bad", needs_data=True, reads="tokens")(lambda ctx: SectionOutput())
    assert "bad" not in SECTIONS


def test_a_new_package_version_recomputes_cached_sections(tmp_path, monkeypatch):
    # Results computed under an older rule (e.g. padding counted, dtype-dependent ranks) must not be
    # reused by a version that computes them differently: the version is part of the fingerprint.
    model = make_tiny_toy_transformer()
    kwargs = dict(sections=["invariants"], checkpoint_dir=tmp_path, progress=False)
    assert not degeneracy_report(model, None, **kwargs)["invariants"].cached
    assert degeneracy_report(model, None, **kwargs)["invariants"].cached
    monkeypatch.setattr(tld, "__version__", tld.__version__ + ".post1")
    assert not degeneracy_report(model, None, **kwargs)["invariants"].cached


def test_bad_data_is_refused_before_any_section_runs(temporary_section):
    ran = []
    temporary_section("probe", lambda ctx: ran.append(1) or SectionOutput())
    model = make_tiny_toy_transformer()
    with pytest.raises(tld.DataError, match="outside|out of|vocab"):
        degeneracy_report(model, torch.full((2, 5), 999), sections=["probe", "activations"], progress=False)
    with pytest.raises(tld.DataError, match="needs data"):
        degeneracy_report(model, None, sections=["probe", "counts"], progress=False)
    with pytest.raises(tld.DataError, match="no such file"):
        degeneracy_report(model, "/nonexistent/corpus.txt", sections=["counts"], progress=False)
    assert not ran
    rep = degeneracy_report(model, None, sections=["probe"], progress=False)  # no data needed, none given
    assert rep.data is None and ran == [1]


def test_settings_presets_and_overrides():
    s = resolve_settings("quick", {"draws": "400", "loss_scales": "1e-2, 1e-3", "llc_seq_len": "none", "sync_tol": 0.1})
    assert (s.draws, s.loss_scales, s.llc_seq_len, s.sync_tol) == (400, (1e-2, 1e-3), None, 0.1)
    assert PRESETS["thorough"].draws > PRESETS["quick"].draws
    for bad in ({"nope": 1}, {"draws": "many"}, {"chains": 0}, {"loss_scales": "0"}):
        with pytest.raises(ValueError):
            resolve_settings("quick", bad)
    ib = resolve_settings("quick", {"ib_edge_sources": "2", "ib_seq_len": "none", "ib_keep_share": "0.9"})
    assert (ib.ib_edge_sources, ib.ib_seq_len, ib.ib_keep_share) == (2, None, 0.9)
    assert resolve_settings("quick", {"ib_edge_sources": "none"}).ib_edge_sources is None
    assert not PRESETS["quick"].llc_compile
    assert resolve_settings("quick", {"llc_compile": "true"}).llc_compile is True
    assert resolve_settings("quick", {"llc_compile": "0"}).llc_compile is False
    with pytest.raises(ValueError, match="llc_compile='maybe': not a valid value"):
        resolve_settings("quick", {"llc_compile": "maybe"})
    with pytest.raises(ValueError, match="report setting llc_compile must be true or false"):
        resolve_settings("quick", {"llc_compile": 1})
    for bad in ({"ib_tokens": 0}, {"ib_probes": "0"}, {"ib_seq_len": 1}, {"ib_edge_sources": 0},
                {"ib_keep_share": 1.0}, {"ib_resolution": "-1"}, {"ib_resolution": "nan"}):
        with pytest.raises(ValueError, match=f"report setting {next(iter(bad))} must"):
            resolve_settings("quick", bad)
    assert PRESETS["thorough"].ib_tokens > PRESETS["quick"].ib_tokens
    # audit 16b F7: Python values of the wrong type, given to the API, gave raw TypeErrors or passed
    assert resolve_settings("quick", {"loss_scales": 1e-3, "gammas": 1e3}).loss_scales == (1e-3,)
    for bad in ({"sync_tol": None}, {"sync_tol": True}, {"sparsity": -1}, {"ib_resolution": True},
                {"loss_scales": [1e-3, "a"]}):
        with pytest.raises(ValueError, match=f"report setting {next(iter(bad))} must"):
            resolve_settings("quick", bad)
    with pytest.raises(ValueError, match="loss scales must be finite numbers"):
        resolve_settings("quick", {"loss_scale": True})
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_settings("slow")
    with pytest.raises(ValueError, match="unknown report section"):
        degeneracy_report(make_tiny_toy_transformer(), sections=["nope"], progress=False)


def test_json_values_are_strict():
    assert to_jsonable({"a": float("nan"), "b": float("inf"), "c": np.complex128(1 - 2j), "d": np.arange(2),
                        "e": (np.int64(3), np.bool_(True)), "f": torch.tensor([0.5])}) == \
        {"a": None, "b": "inf", "c": [1.0, -2.0], "d": [0, 1], "e": [3, True], "f": [0.5]}
    with pytest.raises(TypeError, match="cannot store"):
        to_jsonable(object())


# ------------------------------------------------------------------ a report that explains itself

def _methods_anchors() -> set[int]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    return {int(n) for n in re.findall(r'<a id="s(\d)"></a>', text)}


def test_every_section_opens_with_a_verdict_and_a_glossary(full_report):
    import html as html_lib

    from tl_degeneracy.report.html import methods_href
    from tl_degeneracy.report.sections import glossary, verdict

    rep, out, _ = full_report
    page = (out / "report.html").read_text()
    href = methods_href()  # the checkout's docs/methods.md: reachable from any report directory
    assert href.startswith("file://") and Path(href.removeprefix("file://")).is_file()
    anchors = _methods_anchors()
    assert anchors == set(range(9))  # docs/methods.md keeps METHODS §0–§8
    summary = rep.summary(width=200)
    for sec in rep.sections.values():
        words, terms = verdict(sec), glossary(sec)
        assert words and "\n" not in words and terms, sec.name
        body = page.split(f'id="sec-{sec.name}"', 1)[1].split("</section>", 1)[0]
        # the verdict comes first, right under the title, then the glossary, before any number
        assert body.index(f'<p class="verdict">{html_lib.escape(words)}</p>') < body.index('<dl class="glossary">') \
            < body.index('<p class="meta">'), sec.name
        for term, text, n in terms:
            assert n in anchors and text
            assert f"<dt>{html_lib.escape(term)}</dt>" in body and f'href="{href}#s{n}"' in body
        # (the summary wraps a long verdict onto indented lines)
        assert " ".join(words.split()) in " ".join(summary.split()) and words in rep._repr_html_().replace("&#x27;", "'")
    # loaded from report.json the verdicts are the same (they are made from stored values only)
    loaded = Report.load(out)
    assert [verdict(s) for s in loaded.sections.values()] == [verdict(s) for s in rep.sections.values()]


def test_verdicts_say_what_the_numbers_mean():
    from tl_degeneracy.report.report import SectionResult
    from tl_degeneracy.report.sections import verdict

    def sec(name, **values):
        return SectionResult(name=name, title=name, status="ok", values=values)

    full = {"heads": 8, "full_rank_heads": 8}
    assert verdict(sec("invariants", ov=full, qk=full)) == \
        "every head full rank: no weight-space degeneracy beyond the GL(d_head) gauge"
    # audit 16a F4: rotary QK has only the gauges that commute with the rotations, not GL(d_head)
    rotary = verdict(sec("invariants", ov=full, qk={**full, "rotary": True}))
    assert "GL(d_head) gauge and the QK circuits' gauges that commute with the rotations" in rotary
    # audit 16a F3, review 39: an approximate block's count is an upper estimate, and reads so first
    sync = verdict(sec("synchronization", head_synchronized_blocks=2, head_extra_freedom=1534,
                       head_sync_approximation="attention patterns in blocks differ"))
    assert sync.startswith("2 synchronized head block(s), up to 1,534 extra free directions (approximate: ")
    exact = verdict(sec("synchronization", head_synchronized_blocks=1, head_extra_freedom=432))
    assert exact.startswith("1 synchronized head block(s), 432 extra free directions")
    low = verdict(sec("invariants", ov={"heads": 8, "full_rank_heads": 6}, qk=full))
    assert low.startswith("2 of 8 OV circuits rank-deficient") and "QK" not in low
    llc = {"n_eff": 43.81, "loss_scale": 1e-3, "gamma": 1.0, "n_params": 478976}
    assert verdict(sec("llc", **llc)).startswith("λ̂ not checked for convergence")  # no R̂/ESS recorded
    assert verdict(sec("llc", **llc, converged=False)) == "λ̂ not converged — lower bound; N_eff ≥ 43.8 at ε = 0.001, γ = 1"
    assert verdict(sec("llc", **llc, converged=False, convergence_reason="R̂ 1.76 (max 1.05)")) == (
        "λ̂ not converged — lower bound: R̂ 1.76 (max 1.05); N_eff ≥ 43.8 at ε = 0.001, γ = 1")
    assert verdict(sec("llc", **llc, converged=True)).startswith("λ̂ converged: N_eff = 43.8 of 478,976")
    more = verdict(sec("llc", **llc, converged=False, lower_bound=False, gamma_curve_points=["≈ 1 at (ε = 0.001, γ = 10)"],
                       component_points=["blocks.0.attn 2 at (ε = 0.001, γ = 1)"]))
    assert more.endswith("; γ-curve: ≈ 1 at (ε = 0.001, γ = 10); components: blocks.0.attn 2 at (ε = 0.001, γ = 1)")
    assert "N_eff ≈ 43.8" in more
    restricted = verdict(sec("llc", **llc, converged=True, llc_stderr=0.05, selection="blocks.1.attn"))
    assert restricted.startswith("λ̂ converged: N_eff = 43.81 ± 0.10 of 478,976") and \
        restricted.endswith("restricted to blocks.1.attn (478,976 parameters; the rest held at θ*)")
    assert verdict(sec("counts", free=0, n_params=10, n_eff_kfac=10)).startswith("no activation or Jacobian degeneracy")
    assert verdict(sec("interaction", degenerate_directions=0, inside_share=None)).endswith("no modules (no edge above the cut-off)")
    limited = verdict(sec("interaction", degenerate_directions=900, sample_limited_nodes=2, min_samples=126,
                          min_distinct_samples=117, inside_share=0.5, n_modules=3))
    assert "at 2 node(s) only as many as their distinct samples allow (as few as 117)" in limited and "raise ib_tokens" in limited
    # audit 18b F3: no band to point at (0–0) in half precision, and F1: a synchronization band is for the
    # blocks found in half precision, not a range the float32 count must lie in ("up to 1,700, between 1,700 and 8,698")
    flat = verdict(sec("interaction", degenerate_directions=0, degenerate_band=[0, 0], half_precision="bfloat16",
                       inside_share=None))
    assert "computes in bfloat16" in flat and "band above" not in flat
    from tl_degeneracy.report.sections import _rounding_band_text

    assert _rounding_band_text([1700, 8698], 1700, "smooth activation") == (
        " at float32's rank cut-off, up to 8,698 at the half-precision rounding level, in the blocks the "
        "half-precision patterns form — a float32 forward may form other blocks, whose count can lie outside both")
    # audit 23a F1: a float32 model's band is its output weights' rule, not a half-precision rounding level
    assert _rounding_band_text([80, 128], 128, "", "float32's rank rule for the output weights") == (
        " with float64's rank rule for the output weights, 80 at float32's rank rule for the output weights: known "
        "only to lie between")
    # review 47 F4/F5: a data-limited node inside its band says the difference may be the cut-off's; silent removals
    within = verdict(sec("interaction", degenerate_directions=9, data_limited_nodes=2, limited_within_band_nodes=1,
                         inside_share=0.5, n_modules=3))
    assert "at 1 of them the half-data ranks lie inside the ranks' cut-off bands" in within
    silent = verdict(sec("sparsity", free_directions=10, zeros_added=20, removed_silent=3, output_drift=0.0, kl=0.0))
    assert "3 removed neuron(s) never fire on these data" in silent
    # review 46 L4: a total strictly inside the band is neither cut-off's other total
    assert _rounding_band_text([1000, 3000], 2000, "").startswith(
        " at float32's rank cut-off, block by block between 1,000 and 3,000 at either cut-off, in the blocks")
    # a report saved before 0.4.9 recorded all of its samples only (review 44 L5)
    old = verdict(sec("interaction", degenerate_directions=900, sample_limited_nodes=2, min_samples=126,
                      inside_share=0.5, n_modules=3))
    assert "at 2 node(s) only as many as their samples allow (as few as 126)" in old
    few = verdict(sec("activations", n_samples=16, min_rank=16, dim=128))
    assert few.startswith("residual stream rank 16 of 128") and "the data's limit, not the model's" in few
    assert verdict(sec("activations", n_samples=1024, min_rank=127, dim=128)).startswith("residual stream rank-deficient")
    # audit 15b: each hook read with its own flags — a hook at its sample count is the data's limit
    # even where another hook has more samples, and half precision makes every rank an upper bound
    act = dict(n_samples=96, min_rank=8, dim=32, deficient_hooks=1, min_model_rank=15, sample_limited_hooks=1, min_samples=8,
               min_distinct_samples=8)
    both = verdict(sec("activations", **act, half_precision=None))
    assert both.startswith("residual stream rank-deficient at 1 hook(s) (lowest rank 15 of 32): 17 unused directions")
    assert "1 hook(s) at the rank their distinct samples allow (as few as 8)" in both and "upper bounds" not in both
    half = verdict(sec("activations", **dict(act, deficient_hooks=0, min_model_rank=None), half_precision="float16"))
    assert half.startswith("residual stream full rank at every hook with more samples than dimensions — in float16 "
                           "these ranks are upper bounds") and "unused directions there" not in half
    assert verdict(SectionResult(name="counts", title="c", status="skipped", reason="MissingHookError: x")).startswith(
        "does not apply")


def test_activations_read_each_hook_with_its_own_sample_limit():
    """Audit 15b: toy:sma reads resid_post once per sequence; at 8 sequences its rank 8 is the data's
    limit, while resid_pre (96 samples) is truly deficient (15 of 32): the section says each."""
    from tl_degeneracy.report.sections import verdict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample-limit warning, which this test is about
        sec = degeneracy_report("toy:sma", sections=["activations"], overrides={"n_sequences": 8}, progress=False)["activations"]
    v = sec.values
    assert (v["deficient_hooks"], v["min_model_rank"], v["sample_limited_hooks"], v["min_samples"]) == (1, 15, 1, 8)
    assert "0.hook_resid_post 8/32 (= its 8 distinct samples)" in sec.headline and "upper bounds" not in sec.headline
    assert verdict(sec).startswith("residual stream rank-deficient at 1 hook(s) (lowest rank 15 of 32)")


def test_header_states_every_setting_changed_from_the_preset(full_report):
    import html as html_lib

    from tl_degeneracy.report.report import changed_settings

    rep, out, _ = full_report
    expected = {"n_probes": "2", "loss_scales": "0.01,0.001", "chains": "2", "draws": "12", "burnin": "4",
                "pilot_steps": "5", "ib_tokens": "54", "ib_seq_len": "10", "llc_max_draws": "1"}
    assert changed_settings(rep.settings) == expected
    assert changed_settings(Report.load(out).settings) == expected  # lists in JSON, tuples in settings
    header = (out / "report.html").read_text().split("</header>", 1)[0]
    summary = rep.summary()
    for k, v in expected.items():
        assert html_lib.escape(f"{k}={v}") in header and f"{k}={v}" in summary
    assert "changed from preset quick" in summary
    # an override that repeats the preset's value changes nothing, so nothing is listed
    same = {**rep.settings, "overrides": {"draws": 80}, "budgets": PRESETS["quick"].to_dict()}
    assert changed_settings(same) == {}
    thorough = {"preset": "thorough", "budgets": {**PRESETS["thorough"].to_dict(), "llc_seq_len": 16}}
    assert changed_settings(thorough) == {"llc_seq_len": "16"}


def test_a_clipped_headline_never_ends_inside_a_number():
    from tl_degeneracy.report.report import _NUMBER, _clip

    lines = ["llc  51.1 s  λ̂_B = 21.9 ± 1.6 (N_eff = 43.81 of 478,976 parameters) at ε = 0.001; "
             "N_eff(ε): 39.1 at 0.01, 43.8 at 0.001, 50 at 0.0001",
             "interaction rank per node 119/128, 127/128, 87/128 (51 degenerate directions); 3 modules hold 40%",
             "Σ n_eff_kfac = 391,552 of 393,216 linear-map parameters (1,664 free, 0.4%) −1.5e-07 L0H1"]
    for line in lines:
        whole = {(m.start(), m.end()) for m in _NUMBER.finditer(line)}
        for width in range(12, len(line) + 1):
            clipped = _clip(line, width)
            assert len(clipped) <= width, (width, clipped)
            if clipped == line:
                continue
            kept = clipped.removesuffix(" …")
            assert clipped.endswith(" …") and line.startswith(kept)
            for m in _NUMBER.finditer(kept):  # every number shown is a whole number of the line
                assert (m.start(), m.end()) in whole, (width, clipped)


def test_spectra_legend_names_every_head_of_every_layer():
    from tl_degeneracy.plots import plot_spectra

    frame = tld.ov_invariants(make_tiny_toy_transformer())
    fig = plot_spectra(frame)
    shown = {t.name for t in fig.data if t.showlegend is not False}
    assert shown == {f"L{r.layer}H{r.head}" for r in frame.itertuples()} and frame["layer"].nunique() > 1
    assert {t.legendgroup for t in fig.data} == {f"layer {layer}" for layer in frame["layer"].unique()}


def test_report_figures_name_every_trace_and_heatmaps_have_integer_ticks(full_report):
    rep, _, _ = full_report
    n_heatmaps = 0
    for sec in rep.sections.values():
        for name, fig in sec.figures.items():
            lines = [t for t in fig.data if t.type != "heatmap"]
            if len(lines) > 1:  # a legend is shown: it must name each trace
                named = {(t.legendgroup, t.name) for t in lines if t.showlegend is not False and t.name}
                for t in lines:
                    assert t.name and (t.showlegend is not False or any(g == t.legendgroup and n == t.name
                                                                        for g, n in named)), (sec.name, name)
            if any(t.type == "heatmap" for t in fig.data):
                n_heatmaps += 1
                layout = fig.to_plotly_json()["layout"]
                axes = [v for k, v in layout.items() if re.fullmatch(r"[xy]axis\d*", k)]
                assert axes, (sec.name, name)
                for ax in axes:
                    assert ax.get("tickmode") == "linear" and float(ax["dtick"]).is_integer() and ax["dtick"] >= 1
                    assert float(ax["tick0"]).is_integer(), (sec.name, name, ax)
    assert n_heatmaps == 2  # head pattern distances, interaction edges


def test_an_llc_whose_chains_all_diverge_fails_the_section():
    """Audit 8a: a step size that made every chain diverge was reported as "skipped" (an analysis that
    does not apply) and the command exited 0; it is a failed measurement."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = degeneracy_report(make_tiny_toy_transformer(), _tokens(), sections=["llc"],
                                overrides={**TINY, "step_size": 10.0}, progress=False)
    section = rep["llc"]
    assert section.status == "failed" and "EstimateFailedError: λ̂(ε = 0.001, γ = 1): all 2 chains diverged" in section.reason


def test_a_model_whose_activations_overflow_fails_its_sections_and_says_why_in_full():
    """Audit 23c F1: finite weights whose activations overflow to ±∞ made four sections "skipped" (an
    analysis that does not apply) and the command exit 0, each reason clipped to one line before its
    remedy. A NumericalError in a section is a failed measurement now, and the terminal shows the
    whole reason; warnings too (F2: a sweep point's diverged chain was clipped away)."""
    model = make_tiny_toy_transformer()
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(1e30)
        model.blocks[0].mlp.W_out.mul_(1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = degeneracy_report(model, _tokens(), sections=["activations", "counts"], progress=False)
    for section in rep.sections.values():
        assert section.status == "failed" and section.reason.startswith("NumericalError: non-finite"), section.reason
    flat = " ".join(rep.summary(width=80).split())
    assert flat.count("Check the model's weights and dtype (float16 overflow?) and the input tokens.") == 2
    long = SectionResult(name="llc", title="t", status="ok", headline="h", warnings=["RuntimeWarning: " + "x " * 80 + "end"])
    rep.sections = {"llc": long}
    assert "x end" in " ".join(rep.summary(width=80).split())


def test_a_section_read_back_writes_the_same_csv():
    """Audit 15b: a section reused from the checkpoint came back from JSON with its nullable integer
    columns as floats, so a resumed report's CSVs read "0.0" where the first run wrote "0"."""
    from tl_degeneracy.report import SectionResult
    from tl_degeneracy.report.serialize import csv_frame

    table = pd.DataFrame({"head": pd.array([0, None, 2], dtype="Int64"), "layer": [0, 1, 1], "ok": [True, False, True],
                          "x": [0.5, None, 1.5]})
    sec = SectionResult(name="counts", title="c", status="ok", tables={"maps": table})
    back = SectionResult.from_dict(json.loads(json.dumps(sec.to_dict())))
    assert csv_frame(back.tables["maps"]).to_csv(index=False) == csv_frame(table).to_csv(index=False)
    assert list(back.tables["maps"].dtypes.astype(str)) == ["Int64", "int64", "bool", "float64"]


def test_a_failure_its_settings_made_is_not_called_unexpected():
    """A section that failed for its settings or the memory budget (no traceback: an LLC whose chains
    all diverged, a pass the budget cannot hold) was called "failed with an unexpected error"."""
    from tl_degeneracy.report import SectionResult
    from tl_degeneracy.report.sections import verdict

    budget = SectionResult(name="counts", title="c", status="failed", reason="MemoryBudgetError: lower batch_size")
    assert verdict(budget) == "failed: no result, its settings, the memory budget or non-finite numbers stopped it (reason below)"
    crash = SectionResult(name="counts", title="c", status="failed", reason="KeyError: 'x'", traceback="Traceback …")
    assert verdict(crash) == "failed with an unexpected error: no result (traceback below)"
    assert verdict(budget, with_reason=True).endswith("(MemoryBudgetError: lower batch_size)")


def test_every_section_of_a_half_precision_model_records_its_dtype_warning():
    """Review 47 F6's fix shows the dtype's HalfPrecisionWarning once per call from the caller's line;
    every section runs from the one call of the report, yet each records it among its own warnings."""
    model = make_tiny_toy_transformer().to(torch.bfloat16)
    rep = degeneracy_report(model, _tokens(4), sections=["activations", "counts"], progress=False,
                            overrides={"n_probes": 2})
    for name in ("activations", "counts"):
        assert any("computes in bfloat16" in w for w in rep[name].warnings), (name, rep[name].warnings)
