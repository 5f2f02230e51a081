"""The report's time fit (tl_degeneracy/report/scope.py): costly sections scoped to a time per
section, in a fixed order, never touching what the user set, and said in the header; the
restricted LLC it falls back to."""

import warnings

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.report import degeneracy_report
from tl_degeneracy.report.cache import fingerprint
from tl_degeneracy.report.context import ReportContext
from tl_degeneracy.report.registry import SECTIONS
from tl_degeneracy.memory import MemoryBudget
from tl_degeneracy.report.report import memory_line, time_line
from tl_degeneracy.report.scope import (CUT_PASSES, LLC_CALIBRATION, MIN_IB_TOKENS, MIN_LLC_SEQ_LEN, MODULES_COST,
                                        fit_llc_memory, fit_time, llc_bytes)
from tl_degeneracy.report.settings import PRESETS, ReportSettings, resolve_settings
from tests.fixtures.toys import TINY_TOY_KWARGS, make_tiny_toy_transformer

SECTIONS_TIMED = ["interaction", "llc"]


def _tokens(n=8, length=64):
    return torch.randint(0, TINY_TOY_KWARGS["d_vocab"], (n, length), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def ctx():
    from tl_degeneracy.report.build import _resolve_data

    model = make_tiny_toy_transformer(n_ctx=64)
    c = ReportContext(label="tiny", adapter=tld.adapt(model), settings=resolve_settings("quick"),
                      data=_resolve_data(_tokens(), "tiny"))
    c.batches  # noqa: B018
    return c


def test_nothing_is_lowered_when_the_sections_fit(ctx):
    before = ctx.settings
    info = fit_time(ctx, set(), SECTIONS_TIMED)
    assert info["lowered"] == {} and info["fits"] is True and ctx.settings == before
    assert set(info["predicted"]) == {"interaction", "llc"} and all(t > 0 for t in info["predicted"].values())
    assert "lowered" not in time_line(info)


def test_an_impossible_time_lowers_everything_in_order_and_says_so(ctx):
    ctx.update_settings(section_time=1e-9)
    info = fit_time(ctx, set(), SECTIONS_TIMED)
    s = ctx.settings
    last = TINY_TOY_KWARGS["n_layers"] - 1
    assert info["lowered"] == {
        "ib_tokens": [512, MIN_IB_TOKENS], "llc_params": [None, f"blocks.{last}.attn"], "llc_sequences": [4, 1],
        "llc_seq_len": [32, MIN_LLC_SEQ_LEN], "loss_scales": [(1e-2, 1e-3, 1e-4), (1e-3,)]}
    assert list(info["lowered"]) == ["ib_tokens", "llc_params", "llc_sequences", "llc_seq_len", "loss_scales"]
    assert (s.ib_tokens, s.llc_params, s.llc_sequences, s.llc_seq_len, s.loss_scales) == (
        MIN_IB_TOKENS, f"blocks.{last}.attn", 1, MIN_LLC_SEQ_LEN, (1e-3,))
    assert info["fits"] is False
    # The batches follow the new settings.
    assert ctx.llc_batches.n_sequences == 1 and ctx.llc_batches.max_len == MIN_LLC_SEQ_LEN
    assert sum(len(q) for q in ctx.ib_batches.sequences) <= MIN_IB_TOKENS
    line = time_line(info)
    assert f"llc_params all → blocks.{last}.attn" in line and "loss_scales (0.01, 0.001, 0.0001) → (0.001)" in line
    assert "still over it" in line
    # what made the fit lower them (audit 13b F8: the header gave only the prediction after the fit)
    assert info["predicted_before"]["llc"] > info["predicted"]["llc"]
    assert info["predicted_before"]["interaction"] > info["predicted"]["interaction"]
    assert f"llc {info['predicted']['llc']:.0f} s ({info['predicted_before']['llc']:.0f} s before lowering)" in line


def test_no_setting_is_lowered_where_the_data_hold_less_than_it():
    """Three 12-token sequences: llc_seq_len 32 and 16 both read 12 tokens, ib_tokens 512 … 64 all read the
    36 there are, llc_sequences 4 reads 3. Halving such a setting changes nothing, so the fit starts from
    what the data hold (before, the header announced llc_seq_len 32 → 16 and ib_tokens 512 → 64 that cut
    nothing)."""
    from tl_degeneracy.report.build import _resolve_data

    c = ReportContext(label="short", adapter=tld.adapt(make_tiny_toy_transformer(n_ctx=64)),
                      settings=resolve_settings("quick"), data=_resolve_data(_tokens(n=3, length=12), "short"))
    c.update_settings(section_time=1e-9)
    info = fit_time(c, set(), SECTIONS_TIMED)
    assert "llc_seq_len" not in info["lowered"] and "ib_tokens" not in info["lowered"]
    assert info["lowered"]["llc_sequences"] == [4, 1]  # 3 held, halved once
    assert c.llc_batches.n_sequences == 1 and info["fits"] is False


def test_settings_the_user_gave_are_never_lowered(ctx):
    ctx.update_settings(section_time=1e-9, llc_params="blocks.0", ib_tokens=256, llc_seq_len=24)
    info = fit_time(ctx, {"llc_params", "ib_tokens", "llc_seq_len"}, SECTIONS_TIMED)
    assert ctx.settings.llc_params == "blocks.0" and ctx.settings.ib_tokens == 256 and ctx.settings.llc_seq_len == 24
    assert set(info["lowered"]) == {"llc_sequences", "loss_scales"}


def test_no_time_limit_and_unselected_sections_change_nothing(ctx):
    ctx.update_settings(section_time=None)
    assert fit_time(ctx, set(), SECTIONS_TIMED) == {"section_time": None, "predicted": {}, "predicted_before": {},
                                                        "lowered": {}}
    ctx.update_settings(section_time=1e-9)
    info = fit_time(ctx, set(), ["summary", "counts"])
    assert info["predicted"] == {} and info["lowered"] == {}
    assert PRESETS["thorough"].section_time is None and PRESETS["quick"].section_time == 300.0


def test_the_llc_prediction_counts_the_budget_and_the_calibration(ctx, monkeypatch):
    import tl_degeneracy.report.scope as scope

    monkeypatch.setattr(scope, "_chain_step_seconds", lambda c: 0.01)
    monkeypatch.setattr(scope, "_forward_seconds", lambda c: 0.0)
    s = ctx.settings  # 3 runs; 4 chains × (200 + 200) first block, up to 2000 draws but 80 s per run
    first = (s.chains * (s.burnin + s.draws) + LLC_CALIBRATION) * 0.01
    whole = (s.chains * (s.burnin + s.llc_max_draws) + LLC_CALIBRATION) * 0.01
    assert fit_time(ctx, set(), ["llc"])["predicted"]["llc"] == pytest.approx(3 * max(first, min(whole, 80.0)))


def test_the_interaction_prediction_counts_the_modules(monkeypatch):
    """The modules' Louvain runs take time whatever the forward costs (SmolLM2-135M: 68 s of the section's
    329 s, missing from the prediction before): with a free forward the prediction is theirs alone,
    MODULES_COST per entry of one edge matrix per pair of the section's adjacent nodes, each of
    min(D, n)² entries; with fewer positions than D (n here) the kept directions are n, and halving
    the tokens quarters the term."""
    import tl_degeneracy.report.scope as scope
    from tl_degeneracy.interaction.runner import default_transformer_nodes
    from tl_degeneracy.report.build import _resolve_data

    monkeypatch.setattr(scope, "_forward_seconds", lambda c: 0.0)
    monkeypatch.setattr(scope, "_cut_pass_seconds", lambda c, nodes: 0.0)
    c = ReportContext(label="short", adapter=tld.adapt(make_tiny_toy_transformer(n_ctx=64)),
                      settings=resolve_settings("quick"), data=_resolve_data(_tokens(n=2, length=6), "short"))
    n, pairs = c.ib_batches.n_samples, len(default_transformer_nodes(c.adapter)) - 1
    assert n < c.adapter.d_model and pairs == TINY_TOY_KWARGS["n_layers"]
    info = fit_time(c, set(), ["interaction"])
    assert info["predicted"]["interaction"] == pytest.approx(MODULES_COST * pairs * n**2)
    monkeypatch.setattr(scope, "MIN_IB_TOKENS", 4)
    c.update_settings(section_time=1e-9)  # the 12 tokens held are halved once, to 6
    info = fit_time(c, set(), ["interaction"])
    assert info["lowered"]["ib_tokens"] == [512, 6]
    assert info["predicted_before"]["interaction"] == pytest.approx(MODULES_COST * pairs * n**2)
    assert info["predicted"]["interaction"] == pytest.approx(MODULES_COST * pairs * (n / 2) ** 2)


def test_the_interaction_prediction_counts_the_cut_checks(ctx, monkeypatch):
    """The cut checks run CUT_PASSES gradient passes per node pair on a few tokens, whatever the token
    budget (SmolLM2-135M: 23 s of the section's 111 s, left out of the prediction before): a term that
    halving ib_tokens does not lower. The pass is timed for real here (the first test covers its
    running); its count is checked against the checks' own passes."""
    import tl_degeneracy.report.scope as scope
    import tl_degeneracy.stats.cuts as cuts
    from tl_degeneracy.interaction.compute import _check_cuts
    from tl_degeneracy.interaction.runner import build_runner

    passes = []
    real = cuts._gradient
    monkeypatch.setattr(cuts, "_gradient", lambda *a, **k: passes.append(1) or real(*a, **k))
    runner = build_runner(ctx.adapter, ctx.ib_batches.sequences, None, 4, None, None)
    _check_cuts(runner, "local", "outputs", True)
    pairs = len(runner.names) - 1
    assert len(passes) == CUT_PASSES * pairs + 1  # and one embedding pass for all the stream's hooks

    monkeypatch.setattr(scope, "_forward_seconds", lambda c: 0.0)
    monkeypatch.setattr(scope, "MODULES_COST", 0.0)
    monkeypatch.setattr(scope, "_cut_pass_seconds", lambda c, nodes: 0.25)
    info = fit_time(ctx, set(), ["interaction"])
    assert info["predicted"]["interaction"] == pytest.approx(CUT_PASSES * pairs * 0.25)
    ctx.update_settings(section_time=1e-9)
    info = fit_time(ctx, set(), ["interaction"])
    assert info["lowered"]["ib_tokens"] == [512, MIN_IB_TOKENS]
    assert info["predicted"]["interaction"] == info["predicted_before"]["interaction"] == pytest.approx(
        CUT_PASSES * pairs * 0.25)


def test_the_report_runs_a_restricted_llc_and_states_the_scope(tmp_path):
    model = make_tiny_toy_transformer(n_ctx=64)
    small = {"chains": 2, "draws": 12, "burnin": 4, "pilot_steps": 5, "llc_max_draws": 1, "loss_scales": (1e-3,)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = degeneracy_report(model, _tokens(), sections=["llc"], progress=False,
                                overrides={**small, "section_time": 1e-9}, out=tmp_path)
    sec = rep["llc"]
    assert sec.status == "ok", sec.reason
    last = TINY_TOY_KWARGS["n_layers"] - 1
    n_attn = tld.select_parameters(model, f"blocks.{last}.attn").numel
    assert sec.values["n_params"] == n_attn
    assert f"of blocks.{last}.attn =" in sec.headline and f"of {n_attn:,} parameters" in sec.headline
    assert any("Restricted LLC" in n and f"blocks.{last}.attn" in n for n in sec.notes)
    fit = rep.settings["time_fit"]
    assert fit["lowered"]["llc_params"] == [None, f"blocks.{last}.attn"]
    assert rep.settings["budgets"]["llc_params"] == f"blocks.{last}.attn"
    assert f"llc_params all → blocks.{last}.attn" in " ".join(rep.summary(width=400).split())
    assert "time fit" in (tmp_path / "report.html").read_text()


def _restricted_bytes(ctx) -> tuple[int, int]:
    """llc_bytes of the whole model's LLC and of its last layer's attention (ctx left as it was)."""
    whole = llc_bytes(ctx)
    ctx.update_settings(llc_params=f"blocks.{TINY_TOY_KWARGS['n_layers'] - 1}.attn")
    restricted = llc_bytes(ctx)
    ctx.update_settings(llc_params=None)
    return whole, restricted


def test_the_llc_is_scoped_to_the_memory_budget_in_the_time_fits_order(ctx):
    """The report's LLC was checked against the budget only, so an LLC over it failed where a restricted
    one would fit (carried since issue 19), and the time fit ran a chain-step of it first, unchecked.
    Now the memory fit lowers the same settings in the same order until the chains the LLC checks
    (``chains_memory`` of ⌈chains / ranks⌉) fit, and the header says so."""
    from tl_degeneracy.llc.estimate import chains_memory
    from tl_degeneracy.llc.layout import select_coordinates
    from tl_degeneracy.llc.targets import make_target

    whole, restricted = _restricted_bytes(ctx)
    assert restricted < whole
    target = make_target(ctx.adapter, ctx.llc_batches, None, None)
    assert whole == chains_memory(target, select_coordinates(target, None), ctx.settings.chains)
    last = f"blocks.{TINY_TOY_KWARGS['n_layers'] - 1}.attn"
    # A budget between the two: only the selection is lowered.
    budget = MemoryBudget((whole + restricted) // 2, "a test's budget")
    info = fit_llc_memory(ctx, budget, set(), ["summary", "llc"])
    assert info == {"needed": restricted, "fits": True, "lowered": {"llc_params": [None, last]}}
    assert ctx.settings.llc_params == last and ctx.settings.llc_sequences == 4 and ctx.settings.loss_scales == (
        1e-2, 1e-3, 1e-4)
    line = " ".join(memory_line({"budget": budget.bytes, "source": budget.source, "llc": info}).split())
    assert "the statistics passes (synchronization, counts, activations, sparsity) and the LLC's chains are fitted" in line
    assert f"for the LLC's chains; lowered to fit: llc_params all → {last}" in line and "NOT" not in line
    # A budget that fits the whole LLC lowers nothing.
    ctx.update_settings(llc_params=None)
    assert fit_llc_memory(ctx, MemoryBudget(whole, "t"), set(), ["llc"])["lowered"] == {}
    # One that nothing fits lowers the sequences and their length too (never the loss scales: they cost
    # time, not memory), then says the LLC does not fit.
    info = fit_llc_memory(ctx, MemoryBudget(1, "t"), set(), ["llc"])
    assert info["fits"] is False and info["needed"] == llc_bytes(ctx) > 1
    assert info["lowered"] == {"llc_params": [None, last], "llc_sequences": [4, 1], "llc_seq_len": [32, MIN_LLC_SEQ_LEN]}
    assert "does NOT fit with what may be lowered: the LLC fails" in memory_line(
        {"budget": 1, "source": "t", "llc": info})


def test_the_memory_fit_leaves_what_the_user_gave_and_reports_without_an_llc(ctx):
    ctx.update_settings(llc_sequences=2)
    info = fit_llc_memory(ctx, MemoryBudget(1, "t"), {"llc_params", "llc_sequences"}, ["llc"])
    assert list(info["lowered"]) == ["llc_seq_len"] and ctx.settings.llc_params is None
    assert ctx.settings.llc_sequences == 2
    assert fit_llc_memory(ctx, MemoryBudget(1, "t"), set(), ["summary", "counts"]) == {}
    # reports saved before the LLC was fitted have no "llc" entry: their sentence is the old one
    assert "the interaction basis and the LLC check their passes" in memory_line({"budget": 1, "source": "t"})


def test_the_report_runs_the_llc_that_fits_its_memory_budget(tmp_path):
    """End to end: a budget that the whole model's chains exceed ran no LLC before (MemoryBudgetError);
    now the report samples the last layer's attention, which fits, and the header and notes say so."""
    from tl_degeneracy.report.build import _resolve_data

    model = make_tiny_toy_transformer(n_ctx=64)
    small = {"chains": 2, "draws": 12, "burnin": 4, "pilot_steps": 5, "llc_max_draws": 1, "loss_scales": (1e-3,),
             "section_time": None}
    c = ReportContext(label="tiny", adapter=tld.adapt(model), settings=resolve_settings("quick", small),
                      data=_resolve_data(_tokens(), "tiny"))
    c.batches  # noqa: B018
    whole, restricted = _restricted_bytes(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = degeneracy_report(model, _tokens(), sections=["llc"], progress=False,
                                overrides={**small, "memory": (whole + restricted) // 2}, out=tmp_path)
    sec = rep["llc"]
    last = f"blocks.{TINY_TOY_KWARGS['n_layers'] - 1}.attn"
    assert sec.status == "ok", sec.reason
    assert sec.values["n_params"] == tld.select_parameters(model, last).numel
    assert any("Restricted LLC" in n for n in sec.notes)
    assert rep.settings["memory"]["llc"] == {"needed": restricted, "fits": True, "lowered": {"llc_params": [None, last]}}
    assert f"lowered to fit: llc_params all → {last}" in " ".join(rep.summary(width=400).split())


def test_llc_params_and_section_time_parse_from_the_command_line():
    s = resolve_settings("quick", {"llc_params": "blocks.0.attn", "section_time": "60"})
    assert s.llc_params == "blocks.0.attn" and s.section_time == 60.0
    s = resolve_settings("quick", {"llc_params": "all", "section_time": "none"})
    assert s.llc_params is None and s.section_time is None
    with pytest.raises(ValueError, match="section_time"):
        resolve_settings("quick", {"section_time": "-1"})


def test_the_llc_fingerprint_follows_gamma_and_the_selection(ctx):
    llc = SECTIONS["llc"]
    base = fingerprint(llc, ctx)
    for change in ({"gamma": 10.0}, {"min_gamma": 3.0}, {"gammas": (1e3,)}, {"llc_params": "blocks.0"}):
        saved = ctx.settings
        ctx.update_settings(**change)
        assert fingerprint(llc, ctx) != base, change
        ctx.settings = saved
