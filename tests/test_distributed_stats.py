"""Statistics under torch.distributed (2 gloo processes on CPU) equal the single-process ones."""

from __future__ import annotations

import torch

from tests.distributed_stats_worker import compute
from tests.fixtures.distributed import run_two_processes


def test_two_process_stats_equal_single_process(tmp_path):
    run_two_processes("distributed_stats_worker.py", tmp_path)
    multi = torch.load(tmp_path / "distributed.pt", weights_only=True)
    other_rank = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = compute()

    assert int(multi["act/world_size"]) == 2 and int(single["act/world_size"]) == 1
    keys = [k for k in single if not k.endswith("world_size")]
    assert sorted(keys) == sorted(k for k in multi if not k.endswith("world_size"))
    for key in keys:
        a, b = multi[key].double(), single[key].double()
        scale = max(float(b.abs().max()), 1e-300)
        assert float((a - b).abs().max()) <= 1e-10 * scale, key
        assert torch.equal(multi[key], other_rank[key]), key  # both ranks hold the same result
    # the single-batch case: rank 1 had no batch of its own and still agreed
    assert int(multi["one/blocks.1.hook_resid_post/count"]) == 30


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    """Audit 16b F1: non-finite activations in rank 1's batch only. Rank 1 raised alone and rank 0
    waited in the reduction until gloo's timeout; now both raise NumericalError, rank 0 naming rank 1."""
    import json

    run_two_processes("distributed_stats_worker.py", tmp_path, "nonfinite")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["error"] for g in got] == ["NumericalError", "NumericalError"]
    assert "non-finite" in got[1]["message"] and "failed on rank 1 of 2" in got[0]["message"]
    assert got[1]["message"] in got[0]["message"]


def test_only_names_and_text_cross_between_ranks(monkeypatch):
    """Review 39: the failing error's class was pickled to the other ranks, so a class that does not
    pickle lost the real error. The other ranks now rebuild the package's classes by name, anything
    else as RuntimeError, with the failing rank's message."""
    import pickle

    import pytest

    from tl_degeneracy import distributed
    from tl_degeneracy.errors import DataError

    class Local(Exception):  # defined in a function: does not pickle
        pass

    def gather(parts, obj, group=None):  # what rank 0 receives: rank 1 fails, or not
        pickle.dumps(obj)  # what all_gather_object does with it
        parts[:] = [obj, obj if obj[0] is not None else (failing, None)]

    monkeypatch.setattr(distributed, "distributed_context", lambda group=None: distributed.DistributedContext(0, 2))
    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)

    def message(rank, name, text):  # as the statistics passes word it
        return f"the 'p' pass failed on rank {rank} of 2: {text}"

    for error, expected in ((Local("boom"), RuntimeError), (DataError("bad data"), DataError)):
        failing = (f"{type(error).__module__}.{type(error).__qualname__}", str(error))
        with pytest.raises(type(error), match=str(error)):  # the failing rank raises its own
            distributed.raise_on_every_rank(error, message)
        with pytest.raises(expected, match=f"the 'p' pass failed on rank 1 of 2: {error}"):
            distributed.raise_on_every_rank(None, message)


def test_nested_blocks_exchange_an_error_once(monkeypatch):
    """failing_together blocks nest (a pass inside behavioral_llc inside a report section): each ends
    with one exchange, and an error sends its failure once, in the innermost block it was raised in;
    the enclosing blocks let it through. A second send would pair with no other rank's collective."""
    import pytest

    from tl_degeneracy import distributed

    sent = []

    def gather(parts, obj, group=None):  # the other rank never fails here
        sent.append(obj[0])
        parts[:] = [obj, (None, obj[1])]

    monkeypatch.setattr(distributed, "distributed_context", lambda group=None: distributed.DistributedContext(0, 2))
    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    with distributed.failing_together("outer"), distributed.failing_together("inner"):
        pass
    assert sent == [None, None]  # one exchange per block, no failure
    sent.clear()
    with pytest.raises(ZeroDivisionError), distributed.failing_together("outer"):
        with distributed.failing_together("inner"):
            1 / 0
    assert sent == [("builtins.ZeroDivisionError", "division by zero")]
