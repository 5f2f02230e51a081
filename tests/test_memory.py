"""Memory budgets (tl_degeneracy.memory, issue 19): sizes parse, analyses that would not fit fail
before their first forward pass with a message saying what to lower, and the estimate of a
Jacobian pass bounds the peak-RSS increase it causes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy import counts as counts_module
from tl_degeneracy.distributed import DistributedContext
from tl_degeneracy.llc import estimate as llc_estimate
from tl_degeneracy.memory import (
    MemoryBudgetError, current_budget, estimate, format_bytes, memory_limit, parse_memory, sgld_bytes,
)

from .fixtures.toys import make_tiny_toy_transformer


def test_parse_and_format_sizes():
    assert parse_memory("8G") == parse_memory("8GiB") == parse_memory("8gb") == 8 << 30
    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5K") == 1536 and parse_memory(4096) == 4096
    for bad in ("lots", "-1G", "0", "", True, "1e309", float("inf"), 10**400):
        with pytest.raises(ValueError, match="memory must be"):
            parse_memory(bad)
    assert format_bytes(8 << 30) == "8.0 GiB" and format_bytes(900) == "900 B"


def test_the_default_cpu_budget_is_split_between_the_ranks_on_the_machine(monkeypatch):
    """Audit 16b F2: under torchrun each CPU rank took the whole default share of the RAM."""
    from tl_degeneracy.memory import default_budget

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("tl_degeneracy.memory.available_memory", lambda device: (8 << 30, "available RAM"))
    assert default_budget("cpu").bytes == 4 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    split = default_budget("cpu")
    assert split.bytes == 1 << 30 and "split between 4 ranks on this machine" in split.source
    # direct calls (no memory_limit in force) too (review 39)
    assert current_budget("cpu").bytes == 2 << 30 and "split between 4 ranks" in current_budget("cpu").source


def test_memory_limit_sets_the_budget_in_force():
    outside = current_budget("cpu")
    assert outside.bytes > 0 and "RAM" in outside.source
    with memory_limit("2G") as budget:
        assert current_budget("cpu") == budget and budget.bytes == 2 << 30
    assert current_budget("cpu").source == outside.source


def _never(*args, **kwargs):
    raise AssertionError("a pass ran although the budget was known to be too small")


def test_analyses_fail_before_their_first_forward(monkeypatch):
    model = make_tiny_toy_transformer()
    tokens = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(counts_module, "_input_moments", _never)
    with memory_limit(1024):
        for run in (lambda: tld.head_synchronization(model, tokens, batch_size=8),
                    lambda: tld.neuron_synchronization(model, tokens, batch_size=8),
                    lambda: tld.jacobian_stats(model, tokens, batch_size=8, progress=False),
                    lambda: tld.degeneracy_counts(model, tokens, batch_size=8, progress=False)):
            with pytest.raises(MemoryBudgetError, match=r"lower batch_size \(now 8\) or seq_len \(now 12\)"):
                run()
    # the same calls run under a budget they fit (the estimate of 8 × 12 tokens is far below 1 GiB)
    with memory_limit("1G"):
        tld.head_synchronization(model, tokens, batch_size=8)


def test_the_llc_fails_before_its_first_step_when_its_chains_do_not_fit(monkeypatch):
    """behavioral_llc checks its chains against the budget before any forward (issue 19: on a CPU an
    LLC that does not fit is killed by the kernel without a word), naming what to lower; a module
    target, whose activations are not known from its shape, is not checked."""
    model = make_tiny_toy_transformer()
    tokens = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(llc_estimate, "check_finite_at_reference", _never)
    adapter = tld.adapt(model)
    numel = sum(p.numel() for p in model.parameters())
    need = sgld_bytes(adapter, 4, 8, 12, numel)
    with memory_limit(need // 2), pytest.raises(MemoryBudgetError) as err:
        tld.behavioral_llc(model, tokens, chains=4, draws=4, burnin=2, step_size=1e-4, progress=False)
    text = str(err.value)
    assert "4 chain(s) per process on batches of 8 × 12 tokens" in text and f"sampling {numel:,} parameter entries" in text
    assert "lower chains (now 4)" in text and "llc_seq_len" in text and "llc_params" in text
    # each term grows the estimate: chains, tokens, parameters
    assert sgld_bytes(adapter, 8, 8, 12, numel) > need and sgld_bytes(adapter, 4, 8, 24, numel) > need
    assert sgld_bytes(adapter, 4, 8, 12, 2 * numel) > need
    # a restricted LLC is charged the layers its parameters feed (review 39: every layer, per chain)
    assert sgld_bytes(adapter, 4, 8, 12, numel, layers=1) < need
    # under torchrun each rank is charged ⌈chains / ranks⌉ and every rank raises where one would not fit
    monkeypatch.setattr(llc_estimate, "distributed_context", lambda: DistributedContext(0, 2))
    monkeypatch.setattr(llc_estimate, "gather_objects", lambda mine: [mine, (1, need, "rank 1's budget")])
    with memory_limit("1G"), pytest.raises(MemoryBudgetError, match="3 chain.s. per process.*budget of rank 1's budget"):
        tld.behavioral_llc(model, tokens, chains=5, draws=4, burnin=2, step_size=1e-4, progress=False)
    monkeypatch.undo()
    with memory_limit(need + (need >> 2)):
        assert tld.behavioral_llc(model, tokens, chains=4, draws=4, burnin=2, step_size=1e-4, progress=False).chains == 4
    regression = torch.nn.Linear(3, 1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    with memory_limit(1024):
        assert tld.behavioral_llc(regression, x, chains=2, draws=4, burnin=2, step_size=1e-4, progress=False).chains == 2


def test_the_layers_a_selection_feeds_are_read_from_its_names():
    """Review 40: how the estimate maps sampled parameter names (toys, bridges, HookedTransformer) to
    the top layers whose activations carry a graph."""
    from tl_degeneracy.llc.estimate import _layers_sampled
    from tl_degeneracy.llc.layout import ParameterLayout, Selection

    def layers(*names):
        layout = ParameterLayout(tuple(names), tuple((1,) for _ in names))
        return _layers_sampled(Selection(None, layout, torch.ones(len(names), dtype=torch.bool)), 4)

    assert layers("blocks.3.attn.W_Q", "blocks.3.attn.b_O") == 1
    assert layers("blocks.2.attn.q.weight", "blocks.3.mlp.gate.weight") == 2  # a bridge's names
    assert layers("blocks.0.ln1.w") == 4 and layers("embed.W_E") == 4 and layers("pos_embed.W_pos") == 4
    assert layers("unembed.W_U", "ln_final.w") == 0 and layers("something.else") == 4


def test_sgld_estimate_bounds_the_measured_peak_of_an_llc_run():
    """In a fresh process, a whole behavioral_llc run on toy:bytelm (4 chains, 8 × 32 tokens, the
    end-of-run curvature included) raises the peak resident set by less than sgld_bytes and by more
    than a third of it."""
    got = _peak_in_fresh_process(
        setup="""
            import warnings
            warnings.simplefilter("ignore")
            from tl_degeneracy.memory import sgld_bytes
            model = tld.load_model("toy:bytelm")
            tokens = tld.toy_data("bytelm")[:8, :32]
            run = dict(draws=20, burnin=10, step_size=1e-4, progress=False)
            tld.behavioral_llc(model, tokens[:1, :4], chains=1, **run)  # lazy loads
        """,
        measured="r = tld.behavioral_llc(model, tokens, chains=4, **run)",
        estimate="sgld_bytes(tld.adapt(model), 4, 8, 32, r.n_params, 8 * 32 * 256 * 4)",
    )
    assert got["estimate"] / 3 < got["measured"] <= got["estimate"], got


def _peak_in_fresh_process(setup: str, measured: str, estimate: str) -> dict:
    """In a fresh process (peak RSS is per process): run ``setup``, reset the peak resident set to the
    current one (Linux ≥ 4.0, so that the imports' and warm-ups' peaks do not hide the pass's own),
    run ``measured``; the rise of the peak less the file-backed pages it read in, and the value of
    ``estimate`` (code, ``tld`` imported)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    code = textwrap.dedent("""
        import json, os
        os.environ["TQDM_DISABLE"] = "1"

        def status_kb(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

        import torch
        torch.set_num_threads(1)
        import tl_degeneracy as tld
    """) + textwrap.dedent(setup) + textwrap.dedent(f"""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, file_before = status_kb("VmRSS"), status_kb("RssFile")
        {measured}
        after, file_after = status_kb("VmHWM"), status_kb("RssFile")
        # Less the code and data pages of libraries the pass touched first (file-backed, read in
        # lazily, and kept): not the pass's memory, and what a cold page cache adds varies (CI once
        # measured 1.004× the estimate where 0.81–0.87× is usual).
        print(json.dumps({{"measured": after - before - max(file_after - file_before, 0), "estimate": {estimate},
                          "file_pages": file_after - file_before}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # The file pages are counted at the end, not at the peak: a large subtraction could hide an
    # overrun of the pass's own memory (review 43 F7; 0–1 MiB here with a warm page cache, more with
    # a cold one), so it may hide no more than a fifth of the estimate.
    assert got["file_pages"] < 0.2 * got["estimate"], got
    return got


def test_estimate_grows_with_the_batch_and_the_square_of_positions():
    adapter = tld.adapt(make_tiny_toy_transformer(n_ctx=256))
    for analysis in ("forward", "head_sync", "neuron_sync", "jacobian"):
        small, wide, long = (estimate(adapter, analysis, b, t) for b, t in ((2, 64), (4, 64), (2, 256)))
        assert small < wide <= 2 * small + (1 << 26) and long > 4 * small
    with pytest.raises(ValueError, match="analysis must be"):
        estimate(adapter, "backward", 2, 8)


def test_estimate_bounds_the_measured_peak_of_a_jacobian_pass():
    """In a fresh process (peak RSS is per process), degeneracy_counts on toy:bytelm at 16 × 128
    tokens raises the peak resident set by less than the Jacobian pass's estimate, and by more than
    a third of it (so the estimate is not vacuous)."""
    got = _peak_in_fresh_process(
        setup="""
            from tl_degeneracy.memory import counts_held, estimate
            model = tld.load_model("toy:bytelm")
            tokens = tld.toy_data("bytelm")[:16, :128]
            adapter = tld.adapt(model)
            tld.degeneracy_counts(model, tokens[:1, :4], batch_size=1, n_probes=4, progress=False)  # lazy loads
        """,
        measured="tld.degeneracy_counts(model, tokens, batch_size=16, n_probes=4, progress=False)",
        estimate='estimate(adapter, "jacobian", 16, 128, n_cotangents=4, held=counts_held(adapter))',
    )
    assert got["estimate"] / 3 < got["measured"] <= got["estimate"], got


def test_the_report_fit_counts_the_sequences_that_shorter_cuts_make():
    """Two long sequences cut to a quarter of their length are eight, and fill a batch of eight: the
    fit must size that batch, not the two it started from (SmolLM2 on a text file: fitted at 2 × 512,
    run at 16 × 512, and the counts' Jacobian pass then refused at 44.5 GiB)."""
    from tl_degeneracy.memory import MemoryBudget, counts_held
    from tl_degeneracy.report.build import _resolve_data
    from tl_degeneracy.report.context import MIN_FITTED_SEQ_LEN, ReportContext
    from tl_degeneracy.report.settings import resolve_settings

    length = 4 * MIN_FITTED_SEQ_LEN
    model = make_tiny_toy_transformer(n_ctx=length)
    adapter = tld.adapt(model)
    tokens = torch.randint(0, 20, (2, length), generator=torch.Generator().manual_seed(0))
    ctx = ReportContext(label="tiny", adapter=adapter, settings=resolve_settings("quick", {"seq_len": length}),
                        data=_resolve_data(tokens, "tiny"))
    assert (ctx.batches.n_sequences, ctx.batches.max_len) == (2, length)
    held = counts_held(adapter)
    kw = dict(n_cotangents=ctx.settings.n_probes, held=held)
    budget = estimate(adapter, "jacobian", 8, MIN_FITTED_SEQ_LEN, **kw) + 1
    assert estimate(adapter, "jacobian", 2, 2 * MIN_FITTED_SEQ_LEN, **kw) <= budget  # two sequences would fit
    assert estimate(adapter, "jacobian", 4, 2 * MIN_FITTED_SEQ_LEN, **kw) > budget  # the four they become do not
    info = ctx.fit_memory(MemoryBudget(budget, "test"), set(), ["counts"])
    b = ctx.batches
    assert info["fits"] and b.max_len == MIN_FITTED_SEQ_LEN and b.n_sequences == 8
    assert estimate(adapter, "jacobian", min(b.batch_size, b.n_sequences), b.max_len, **kw) <= budget


def _bos_context(rows: list[torch.Tensor], n_ctx: int = 1024, **settings):
    """A report context of the tiny toy with BOS id 1 (its tokenizer's) on token rows that start with it."""
    import types

    from tl_degeneracy.report.build import _resolve_data
    from tl_degeneracy.report.context import ReportContext
    from tl_degeneracy.report.settings import resolve_settings

    model = make_tiny_toy_transformer(n_ctx=n_ctx)
    model.tokenizer = types.SimpleNamespace(bos_token_id=1, pad_token_id=0)
    return ReportContext(label="tiny", adapter=tld.adapt(model), settings=resolve_settings("quick", settings),
                         data=_resolve_data(rows, "tiny"))


def _tokens_read(batches) -> list[int]:
    """Every token a TokenBatches reads, BOS left out, in order."""
    return [int(t) for q in batches.sequences for t in (q[1:] if batches.bos else q)]


@pytest.mark.parametrize("lengths", [[1024] * 6, [1024, 300, 700, 1024, 517, 290]])
def test_a_shorter_cut_reads_the_same_data(lengths):
    """Audit 12a F1/F6: cut from 1024 to 256 tokens, a BOS-led row's body of 1023 tokens makes 5 pieces
    of BOS + 255, not 1024/256 = 4: counting 4 dropped the last fifth of the data, and on rows of other
    lengths took pieces of rows not read before. Now the tokens read are the same, in the same order."""
    from tl_degeneracy.memory import MemoryBudget
    from tl_degeneracy.report.context import MIN_FITTED_SEQ_LEN

    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.tensor([1]), torch.randint(3, 20, (n - 1,), generator=g)]) for n in lengths]
    rows += [torch.cat([torch.tensor([1]), torch.randint(3, 20, (1023,), generator=g)]) for _ in range(4)]  # not read
    ctx = _bos_context(rows, n_sequences=len(lengths))
    before = _tokens_read(ctx.batches)
    assert ctx.batches.bos and len(before) == sum(lengths) - len(lengths)
    budget = estimate(ctx.adapter, "forward", ctx.settings.batch_size, MIN_FITTED_SEQ_LEN) + 1
    info = ctx.fit_memory(MemoryBudget(budget, "test"), set(), ["activations"])
    assert info["lowered"]["seq_len"] == [1024, MIN_FITTED_SEQ_LEN] and ctx.batches.max_len == MIN_FITTED_SEQ_LEN
    assert _tokens_read(ctx.batches) == before
    assert info["cut"]["n_sequences"] == [len(lengths), ctx.batches.n_sequences]


def test_the_fit_sizes_the_batches_the_cut_makes():
    """Audit 12a F2: with 8 sequences the fit capped its batch at 8 (the number before the cut) while
    the 40 pieces filled batches of 16: the header said it fit, and the pass then refused its batch."""
    from tl_degeneracy.memory import MemoryBudget

    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.tensor([1]), torch.randint(3, 20, (1023,), generator=g)]) for _ in range(8)]
    ctx = _bos_context(rows, n_sequences=8)
    budget = estimate(ctx.adapter, "forward", 8, 512) + 1  # 8 sequences of 512 would fit, 16 would not
    assert estimate(ctx.adapter, "forward", 16, 512) > budget
    info = ctx.fit_memory(MemoryBudget(budget, "test"), set(), ["activations"])
    b = ctx.batches
    assert info["fits"] and estimate(ctx.adapter, "forward", min(b.batch_size, b.n_sequences), b.max_len) <= budget


def test_the_sparsity_section_is_fitted_too():
    """Audit 12a F8: the memory fit left the sparsity section out: alone, it was skipped for want of
    memory that a smaller batch would have given it."""
    from tl_degeneracy.memory import MemoryBudget

    rows = [torch.cat([torch.tensor([1]), torch.randint(3, 20, (63,), generator=torch.Generator().manual_seed(i))])
            for i in range(16)]
    ctx = _bos_context(rows, n_ctx=64)
    budget = estimate(ctx.adapter, "neuron_sync", 4, 64) + 1
    info = ctx.fit_memory(MemoryBudget(budget, "test"), set(), ["sparsity"])
    assert info["fits"] and info["lowered"]["batch_size"][1] <= 4


def test_a_shorter_cut_reads_no_further_row():
    """Review 34: after the cut the batches were rebuilt from as many source rows as there are pieces, so
    rows never read before were tokenized too: 4 BOS-led rows followed by 20 without turned BOS detection
    off (bos True → False, 4 → 20 sequences, 4,092 → 5,120 tokens)."""
    from tl_degeneracy.memory import MemoryBudget
    from tl_degeneracy.report.context import MIN_FITTED_SEQ_LEN

    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.tensor([1]), torch.randint(3, 20, (1023,), generator=g)]) for _ in range(4)]
    rows += [torch.randint(3, 20, (1024,), generator=g) for _ in range(20)]
    ctx = _bos_context(rows, n_sequences=4)
    before = _tokens_read(ctx.batches)
    assert ctx.batches.bos
    budget = estimate(ctx.adapter, "forward", ctx.settings.batch_size, MIN_FITTED_SEQ_LEN) + 1
    ctx.fit_memory(MemoryBudget(budget, "test"), set(), ["activations"])
    assert ctx.batches.bos and ctx.batches.max_len == MIN_FITTED_SEQ_LEN and _tokens_read(ctx.batches) == before


def test_interaction_edges_chunk_their_directions_within_the_budget(monkeypatch):
    """Under a budget that leaves room for three directions beside what the edge pass holds (its
    nodes' Grams and one batch's forward), every edge JVP carries at most three (audit 12a F4: all
    128 directions of toy:bytelm at once took 737 MiB under a 150 MiB budget; review 37: chunks that
    filled the whole budget took the pass to 1.66× it), and the edges equal those of unbounded chunks."""
    from tl_degeneracy.interaction import interaction_basis
    from tl_degeneracy.memory import DIRECTION_HEADROOM, direction_bytes, direction_chunk

    model = make_tiny_toy_transformer().double()
    tokens = torch.randint(0, 20, (4, 10), generator=torch.Generator().manual_seed(0))
    free = interaction_basis(model, tokens, kind="pca", batch_size=4, progress=False)
    adapter = tld.adapt(model)
    D = adapter.cfg.d_model
    one = direction_bytes(adapter, 4, 10, D, D)
    base = estimate(adapter, "forward", 4, 10) + len(free.nodes) * 3 * 8 * D * D  # a forward; the Grams, whole and of each half
    sizes = []
    vmap = torch.func.vmap

    def spy(f, *args, **kwargs):
        inner = vmap(f, *args, **kwargs)

        def call(tangents):
            sizes.append(tangents.shape[0])
            return inner(tangents)

        return call

    monkeypatch.setattr(torch.func, "vmap", spy)
    with memory_limit(base + 3 * DIRECTION_HEADROOM * one):
        assert direction_chunk(adapter, 4, 10, D, D, held=base) == 3
        bounded = interaction_basis(model, tokens, kind="pca", batch_size=4, progress=False)
    with memory_limit(base + one // 2), pytest.raises(MemoryBudgetError, match="edge pass on batches of 4 × 10 tokens"):
        interaction_basis(model, tokens, kind="pca", batch_size=4, progress=False)  # PCA: no Jacobian pass checked it
    assert sizes and max(sizes) == 3 and max(bounded.basis[n].shape[0] for n in bounded.nodes) > 3
    for pair, e in free.edges.items():
        assert torch.allclose(bounded.edges[pair], e, rtol=1e-12, atol=1e-14 * float(e.abs().max()))


def test_interaction_jacobian_passes_fail_before_they_start(monkeypatch):
    """A LIB or global pass whose batch does not fit the budget fails before its first forward with
    the message saying what to lower, after only the Gram pass."""
    from tl_degeneracy.interaction import compute

    model = make_tiny_toy_transformer()
    tokens = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(compute, "jacobian_pass", _never)
    for kind in ("local", "global"):
        with memory_limit(1 << 16), pytest.raises(MemoryBudgetError, match=r"lower batch_size \(now 8\) or seq_len \(now 12\)"):
            compute.interaction_basis(model, tokens, kind=kind, batch_size=8, progress=False)
