"""Worker for test_llc_checkpoint.py: behavioral LLC with chains sharded over 2 gloo ranks.

    torchrun --nproc_per_node=2 tests/llc_distributed_worker.py OUT_DIR [CHECKPOINT_DIR | --fail-on-rank-1]

Each rank writes OUT_DIR/rank<r>.npz with its result or, when ``behavioral_llc`` refuses to run
(ValueError), OUT_DIR/rank<r>.txt with the message. With ``--fail-on-rank-1`` rank 1's chains fail
and each rank writes OUT_DIR/rank<r>.json with the error it got.
"""

import sys

import numpy as np
import torch
import torch.distributed as dist
from tests.fixtures.distributed import run_in_group, save_outcome  # noqa: E402


def run(checkpoint_dir=None):
    from tests.test_llc import linear_regression
    from tl_degeneracy.llc import behavioral_llc

    torch.set_num_threads(1)
    model, x = linear_regression(d=4, n=60)
    return behavioral_llc(model, x, chains=5, draws=80, burnin=20, seed=3, checkpoint_dir=checkpoint_dir)


def main(out: str, checkpoint_dir: str | None) -> None:
    try:
        res = run(checkpoint_dir)
    except ValueError as err:
        with open(f"{out}/rank{dist.get_rank()}.txt", "w") as f:
            f.write(str(err))
    else:
        np.savez(f"{out}/rank{dist.get_rank()}.npz", trace=res.trace, llc_per_chain=res.llc_per_chain,
                 step_size=res.step_size, world_size=res.diagnostics["world_size"])


def fail_on_rank_1(out: str) -> None:
    """Rank 1's chains fail once sampling has begun (as a GPU that runs out of memory would), after
    the step-size choice's collectives and before the next: audit 16b F1 left rank 0 waiting there
    for good. Every rank must raise."""
    from tl_degeneracy.llc import estimate

    if dist.get_rank() == 1:
        def run_chains(*args, **kwargs):
            raise RuntimeError("out of memory on this rank's device (simulated)")

        estimate.run_chains = run_chains
    save_outcome(run, out)


if __name__ == "__main__":
    if sys.argv[2:] == ["--fail-on-rank-1"]:
        run_in_group(lambda: fail_on_rank_1(sys.argv[1]))
    else:
        run_in_group(lambda: main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
