"""Worker for test_llc_checkpoint.py: behavioral LLC with chains sharded over 2 gloo ranks.

    torchrun --nproc_per_node=2 tests/llc_distributed_worker.py OUT_DIR [CHECKPOINT_DIR]

Each rank writes OUT_DIR/rank<r>.npz with its result or, when ``behavioral_llc`` refuses to run
(ValueError), OUT_DIR/rank<r>.txt with the message.
"""

import sys

import numpy as np
import torch
import torch.distributed as dist
from tests.fixtures.distributed import run_in_group  # noqa: E402


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


if __name__ == "__main__":
    run_in_group(lambda: main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
