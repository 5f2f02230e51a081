"""Cost of a float32 model's synchronization band (``_RoundingBand``): ``to_frame()`` counted at both
rank rules for the output weights (float64's and float32's) against one rule (the same result with
``weight_precision`` set to its precision: no band), on the bundled toys and their data, one thread.
Appends a table to BENCHMARKS.md under "## synchronization band".

    .venv/bin/python benchmarks/sync_band.py [--specs toy:modadd toy:bytelm] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_to_section, machine_line  # noqa: E402

import tl_degeneracy as tld  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=["toy:modadd", "toy:bytelm"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = ["| model | analysis | blocks | one rule | band | band / one | blocks whose count moves | extra freedom (band) |",
            "|---|---|---|---|---|---|---|---|"]
    for spec in args.specs:
        model, data = tld.load_model(spec), tld.toy_data(spec.removeprefix("toy:"))
        for analysis in (tld.head_synchronization, tld.neuron_synchronization):
            result = analysis(model, data, progress=False)
            one = dataclasses.replace(result, weight_precision=result.precision)
            start = time.perf_counter()
            one.to_frame()
            single = time.perf_counter() - start
            start = time.perf_counter()
            frame = result.to_frame()
            banded = time.perf_counter() - start
            moved = int((frame["extra_freedom_min"] != frame["extra_freedom_max"]).sum())
            rows.append(f"| {spec} | {analysis.__name__} | {len(frame)} | {single:.2f} s | {banded:.2f} s | "
                        f"{banded / max(single, 1e-9):.1f}× | {moved} | {result.extra_freedom} "
                        f"{tuple(result.extra_freedom_band or ())} |")
    block = f"### {machine_line()}\n\n" + "\n".join(rows)
    print(block)
    if not args.no_write:
        append_to_section("## synchronization band", "sync_band.py", block)


if __name__ == "__main__":
    main()
