"""Statistics under torch.distributed (2 gloo processes on CPU) equal the single-process ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed_stats_worker import compute

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_process_stats_equal_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "distributed_stats_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
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
