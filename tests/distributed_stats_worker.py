"""Worker for tests/test_distributed_stats.py, launched with ``python -m torch.distributed.run``.

Every rank computes the same statistics under a gloo process group (each rank takes the batches
``rank::world_size``) and rank 0 saves what it got to ``<out_dir>/distributed.pt``. The test
computes the same statistics in one process and compares. ``compute()`` is shared by both sides.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.toys import make_tiny_toy_transformer  # noqa: E402
from tl_degeneracy.stats import activation_stats, jacobian_stats  # noqa: E402
from tests.fixtures.distributed import run_in_group, save_outcome  # noqa: E402

HOOKS = ["resid_pre", "v", "q", "mlp_post"]


def compute() -> dict[str, torch.Tensor]:
    """Statistics of a tiny toy on 5 batches (3 on rank 0, 2 on rank 1), and on 1 batch (rank 1
    then has none and must still join the reductions)."""
    model = make_tiny_toy_transformer().double()
    g = torch.Generator().manual_seed(21)
    toks = torch.randint(0, 20, (9, 10), generator=g)
    out: dict[str, torch.Tensor] = {}
    acts = activation_stats(model, toks, hooks=HOOKS, batch_size=2, progress=False)
    jac = jacobian_stats(model, toks, hooks=HOOKS, output="kl", n_probes=4, seed=5, batch_size=2, progress=False)
    one = activation_stats(model, toks[:3], hooks="resid_post", batch_size=8, progress=False)
    for prefix, res in (("act", acts), ("jac", jac), ("one", one)):
        for name, s in res.items():
            key = f"{prefix}/{name}"
            out[f"{key}/count"] = torch.tensor(s.count)
            out[f"{key}/gram"] = s.head_gram if not s.has_full else s.gram
            if prefix != "jac":
                out[f"{key}/mean"] = s.mean
        out[f"{prefix}/world_size"] = torch.tensor(res.world_size)
    return out


def main(out_dir: str) -> None:
    import torch.distributed as dist

    result = compute()
    if dist.get_rank() == 0:
        torch.save(result, os.path.join(out_dir, "distributed.pt"))
    else:  # every rank holds the complete, identical result
        torch.save(result, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


def non_finite_on_rank1(out_dir: str) -> None:
    """Only rank 1's batch holds the token whose embedding is inf: every rank must raise (audit 16b:
    rank 0 waited in the reduction for good); each saves the error it got."""
    model = make_tiny_toy_transformer().double()
    with torch.no_grad():
        model.embed.W_E[19] = float("inf")
    toks = torch.randint(0, 19, (4, 6), generator=torch.Generator().manual_seed(0))
    toks[2:, 3] = 19  # batch 1 of batch_size 2: rank 1's
    save_outcome(lambda: activation_stats(model, toks, hooks="resid_pre", batch_size=2, progress=False), out_dir)


if __name__ == "__main__":
    if sys.argv[2:] == ["nonfinite"]:
        run_in_group(lambda: non_finite_on_rank1(sys.argv[1]))
    else:
        run_in_group(lambda: main(sys.argv[1]))
