"""Worker for tests/test_counts.py::test_two_processes_one_batch, launched with ``python -m
torch.distributed.run``: ``degeneracy_counts`` on data of a single batch under a gloo process group
of two ranks, so rank 1 has no batch of its own and must still join every reduction (the input
moments once raised KeyError there). Each rank saves its frame's rank columns and how many
SampleLimitedWarnings it gave (15 positions of a 16-wide residual stream: every input Gram is at the
samples' limit): warnings about the shared result come from rank 0 alone.

With ``--fail-between-passes-on-rank-1`` rank 1 raises between two of ``degeneracy_counts``' passes
(after the activation pass's collectives, as running out of memory in its post-processing would) and
each rank saves what it raised as ``rank<r>.json`` (review 41 #3: rank 0 waited in the next pass)."""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.toys import make_tiny_toy_transformer  # noqa: E402
from tl_degeneracy.counts import SampleLimitedWarning, degeneracy_counts  # noqa: E402


def compute() -> dict[str, torch.Tensor]:
    """rank_G and rank_K of every map of a float64 tiny toy on one batch of 3 sequences, and the
    number of SampleLimitedWarnings given."""
    model = make_tiny_toy_transformer(n_layers=1).double()
    tokens = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = degeneracy_counts(model, tokens, n_probes=4, batch_size=8, output="mse")
    given = sum(issubclass(w.category, SampleLimitedWarning) for w in caught)
    return {"rank_G": torch.tensor(frame["rank_G"].tolist()), "rank_K": torch.tensor(frame["rank_K"].tolist()),
            "warnings": torch.tensor(given)}


def fail_between_passes_on_rank_1(out: str) -> None:
    import torch.distributed as dist

    from tests.fixtures.distributed import save_outcome
    from tl_degeneracy import counts

    if dist.get_rank() == 1:
        real = counts.activation_stats

        def activation_stats(*args, **kwargs):
            real(*args, **kwargs)
            raise RuntimeError("out of memory after the activation pass (simulated)")

        counts.activation_stats = activation_stats
    save_outcome(compute, out)


if __name__ == "__main__":
    from tests.fixtures.distributed import run_in_group, worker_main

    if sys.argv[2:] == ["--fail-between-passes-on-rank-1"]:
        run_in_group(lambda: fail_between_passes_on_rank_1(sys.argv[1]))
    else:
        worker_main(compute, sys.argv[1])
