"""Worker for test_llc_checkpoint.py: behavioral LLC with chains sharded over 2 gloo ranks."""

import sys

import numpy as np
import torch
import torch.distributed as dist


def run():
    from tests.test_llc import linear_regression
    from tl_degeneracy.llc import behavioral_llc

    torch.set_num_threads(1)
    model, x = linear_regression(d=4, n=60)
    return behavioral_llc(model, x, chains=5, draws=80, burnin=20, seed=3)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        res = run()
        np.savez(f"{sys.argv[1]}/rank{dist.get_rank()}.npz", trace=res.trace, llc_per_chain=res.llc_per_chain,
                 step_size=res.step_size, world_size=res.diagnostics["world_size"])
        # A rank that tears gloo down while its peer still talks to it can abort at exit
        # ("terminate called without an active exception"): leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()
