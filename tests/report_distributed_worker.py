"""Worker for test_report_output.py: degeneracy_report under 2 gloo ranks writing one output directory.

    torchrun --nproc_per_node=2 tests/report_distributed_worker.py OUT_DIR [--llc-fails-on-rank-1 |
                                                                            --fails-before-the-sections-on-rank-1]

Rank 1's time fit is made to restrict the LLC, as a busier rank's timing can (audit 10b), and its free
memory smaller; every rank must still run rank 0's settings against the smallest budget. Each rank
writes OUT_DIR/rank<r>.json: the LLC scope it ran, its headline, its memory budget and what it saw of
rank 0 failing to write a shared file. The report goes to OUT_DIR/report.
"""

import json
import sys

import torch
import torch.distributed as dist
from tests.fixtures.distributed import run_in_group, save_outcome  # noqa: E402

#: Rank 1's free memory, made smaller than rank 0's: both must check their passes against it.
BUDGET = 512 * 2**20
SETTINGS = dict(n_sequences=8, batch_size=4, chains=2, draws=20, burnin=10, loss_scales=[1e-3], llc_max_draws=1,
                llc_time_limit=None, pilot_steps=10, llc_sequences=2, llc_seq_len=12)


def main(out: str) -> None:
    import tl_degeneracy as tld
    from tl_degeneracy.distributed import on_rank0
    from tl_degeneracy.memory import MemoryBudget
    from tl_degeneracy.report import build

    torch.set_num_threads(1)
    if dist.get_rank() == 1:
        fit = build.fit_time
        build.default_budget = lambda device: MemoryBudget(BUDGET, "rank 1's smaller free memory")

        def busier(ctx, explicit, chosen):
            timing = fit(ctx, explicit, chosen)
            ctx.update_settings(llc_params="blocks.0.attn")
            return {**timing, "lowered": {"llc_params": [None, "blocks.0.attn"]}}

        build.fit_time = busier
    report = tld.degeneracy_report("toy:sma", sections=["summary", "llc"], overrides=SETTINGS, progress=False,
                                   out=f"{out}/report")
    try:  # rank 0 fails writing a shared file: every rank hears of it
        on_rank0(lambda: open(f"{out}/no/such/dir/file", "w"))
        failed = None
    except Exception as err:
        failed = f"{type(err).__name__}: {err}"
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump({"llc_params": report.settings["budgets"]["llc_params"], "headline": report["llc"].headline,
                   "budget": report.settings["memory"]["budget"], "failed": failed}, f)


def llc_fails_on_rank_1(out: str) -> None:
    """The LLC section's code fails on rank 1 only, before any collective, while rank 0 goes on into
    the LLC's (audit 16b F1: rank 1 went on to the next section, and the ranks' collectives no longer
    paired up). Every rank must record the section as failed and go on together; each writes
    OUT_DIR/rank<r>.json with the statuses it got."""
    import dataclasses

    import tl_degeneracy as tld
    from tl_degeneracy.report.registry import SECTIONS

    torch.set_num_threads(1)
    if dist.get_rank() == 1:
        def compute(ctx):
            raise RuntimeError("this rank's LLC failed (simulated)")

        SECTIONS["llc"] = dataclasses.replace(SECTIONS["llc"], compute=compute)
    report = tld.degeneracy_report("toy:sma", sections=["llc", "summary"], overrides=SETTINGS, progress=False,
                                   out=f"{out}/report")
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump({name: [report[name].status, report[name].reason] for name in ("llc", "summary")}, f)


def fails_before_the_sections_on_rank_1(out: str) -> None:
    """Rank 1 fails in the report's own code before the first section (its output directory refused),
    rank 0 does not (review 41: rank 0 heard of it inside the first section, recorded it as that
    section's failure and went on alone, to wait for good). Both must raise from the report; each
    writes OUT_DIR/rank<r>.json with what it raised."""
    import tl_degeneracy as tld
    from tl_degeneracy.report.report import Report, ReportDirectoryError

    torch.set_num_threads(1)
    if dist.get_rank() == 1:
        def refuse(directory, identity, replace=False, sections=()):
            raise ReportDirectoryError("this rank's output directory is refused (simulated)")

        Report.check_directory = staticmethod(refuse)
    save_outcome(lambda: tld.degeneracy_report("toy:sma", sections=["llc", "summary"], overrides=SETTINGS,
                                               progress=False, out=f"{out}/report"), out)


if __name__ == "__main__":
    if sys.argv[2:] == ["--llc-fails-on-rank-1"]:
        run_in_group(lambda: llc_fails_on_rank_1(sys.argv[1]))
    elif sys.argv[2:] == ["--fails-before-the-sections-on-rank-1"]:
        run_in_group(lambda: fails_before_the_sections_on_rank_1(sys.argv[1]))
    else:
        run_in_group(lambda: main(sys.argv[1]))
