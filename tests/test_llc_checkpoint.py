"""Checkpoint/resume of the sampler and chains sharded over torch.distributed ranks."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tl_degeneracy.llc import behavioral_llc
from tl_degeneracy.distributed import DistributedContext

from .test_llc import linear_regression

ROOT = Path(__file__).resolve().parents[1]
KW = dict(chains=3, draws=600, burnin=100, seed=5, checkpoint_every=256)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, sampler):
    model, x = linear_regression(d=5, n=100)
    full = behavioral_llc(model, x, sampler=sampler, **KW)
    # Stop at step 300 (not a block or checkpoint multiple), then resume from the checkpoint.
    partial = behavioral_llc(model, x, sampler=sampler, checkpoint_dir=tmp_path, _stop_after=300, **KW)
    assert partial.diagnostics["steps_done"] == 300
    assert os.listdir(tmp_path) == ["llc-rank0.pt"]
    resumed = behavioral_llc(model, x, sampler=sampler, checkpoint_dir=tmp_path, **KW)
    assert resumed.diagnostics["step_size_source"] == "automatic (from checkpoint)"
    assert resumed.step_size == full.step_size
    np.testing.assert_array_equal(resumed.trace, full.trace)
    assert resumed.llc == full.llc
    np.testing.assert_array_equal(resumed.diagnostics["norms"], full.diagnostics["norms"])
    # where each took up its chains (audit 16b F11: nothing recorded that a run was resumed)
    assert full.diagnostics["resumed_at_step"] is None and resumed.diagnostics["resumed_at_step"] == 300
    # A finished checkpoint is read back without sampling again.
    again = behavioral_llc(model, x, sampler=sampler, checkpoint_dir=tmp_path, **KW)
    np.testing.assert_array_equal(again.trace, full.trace)
    assert again.diagnostics["resumed_at_step"] == 700


def test_a_draws_auto_checkpoint_resumes_under_a_larger_first_block(tmp_path):
    """Audit 8a: draws="auto" checkpoints resume under another budget (the block size is not in the
    run key), but a larger first block overflowed the checkpoint's trace (a numpy broadcast error).
    Resumed, the run equals one that used the larger block from the start."""
    model, x = linear_regression(d=5, n=100)
    kw = dict(chains=3, burnin=100, seed=5, draws="auto", pilot_steps=20, progress=False)  # η not from the budget
    fresh = behavioral_llc(model, x, draws_block=300, **kw)
    behavioral_llc(model, x, draws_block=150, checkpoint_dir=tmp_path, _stop_after=200, **kw)
    resumed = behavioral_llc(model, x, draws_block=300, checkpoint_dir=tmp_path, **kw)
    assert resumed.draws == fresh.draws >= 300
    np.testing.assert_array_equal(resumed.trace, fresh.trace)


def test_a_run_that_stopped_on_its_time_limit_is_not_extended_on_resume(tmp_path):
    """Audit 10b F4: time_limit counted from each call's start, so calling a finished time-limited run
    again with its checkpoint_dir extended it by a fresh budget (1,900 → 3,700 draws; a report rerun
    after an interruption read another λ̂ and verdict). The checkpoint now carries the time spent."""
    model, x = linear_regression(d=5, n=100)
    kw = dict(chains=2, burnin=20, draws="auto", draws_block=20, max_draws=10**6, time_limit=1.5, pilot_steps=10,
              gamma=100.0, seed=1, progress=False, checkpoint_dir=tmp_path)
    first = behavioral_llc(model, x, **kw)
    assert first.diagnostics["budget"]["stopped"] == "time_limit"
    again = behavioral_llc(model, x, **kw)
    assert again.draws == first.draws and again.llc == first.llc
    # The time spent is carried over: the checkpoint's, saved after the last block (the first run's own
    # figure adds its closing diagnostics, so under load it can be the larger: 1.4902 against 1.4886),
    # where a fresh count would read the near-zero time of a call that samples nothing.
    assert again.diagnostics["budget"]["elapsed_s"] >= kw["time_limit"] / 2


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    model, x = linear_regression(d=3, n=30)
    behavioral_llc(model, x, chains=2, draws=20, burnin=5, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different settings.*gamma"):
        behavioral_llc(model, x, chains=2, draws=20, burnin=5, gamma=2.0, checkpoint_dir=tmp_path)


def test_a_checkpoint_whose_step_size_other_pilots_chose_is_refused(tmp_path):
    """Audit 21a F1: a run with 3-step pilots (η far too small) was resumed by one asking for 200-step
    pilots, which returned its λ̂ and reported 200; a step size given makes the pilots' length moot."""
    model, x = linear_regression(d=3, n=30)
    behavioral_llc(model, x, chains=2, draws=20, burnin=5, pilot_steps=3, checkpoint_dir=tmp_path / "auto")
    with pytest.raises(ValueError, match="different settings.*pilot_steps"):
        behavioral_llc(model, x, chains=2, draws=20, burnin=5, pilot_steps=50, checkpoint_dir=tmp_path / "auto")
    first = behavioral_llc(model, x, chains=2, draws=20, burnin=5, step_size=1e-3, pilot_steps=3,
                           checkpoint_dir=tmp_path / "given")
    again = behavioral_llc(model, x, chains=2, draws=20, burnin=5, step_size=1e-3, pilot_steps=50,
                           checkpoint_dir=tmp_path / "given")
    assert again.llc == first.llc


def test_an_rmsprop_checkpoint_of_the_old_schedule_is_refused(tmp_path):
    """Review 43 F5: a checkpoint written while the preconditioner adapted at every step (before
    0.4.9, run key ``rms`` = (α, eps)) was resumed at its step and its draws kept. Its key now
    differs (the step the metric is frozen at) and it is refused, the file left as it was."""
    model, x = linear_regression(d=3, n=40)
    kw = dict(chains=2, draws=20, burnin=10, sampler="rmsprop", progress=False, checkpoint_dir=tmp_path)
    behavioral_llc(model, x, _stop_after=15, **kw)
    path = tmp_path / "llc-rank0.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["settings"]["rms"][2] == 5  # half of the first burn-in
    payload["settings"]["rms"] = payload["settings"]["rms"][:2]
    torch.save(payload, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"different settings \(rms: checkpoint"):
        behavioral_llc(model, x, **kw)
    assert path.read_bytes() == before


def test_a_minibatch_checkpoint_of_the_old_step_size_rule_is_refused(tmp_path):
    """Review 31 F6: a 0.4.0 checkpoint saved an automatic η chosen without the minibatches' gradient
    spread (its choice has no ``gradient_spread``); resuming it kept that η. Now it is refused and the
    file is left as it was; a full-batch one (the rule did not change there) still resumes."""
    model, x = linear_regression(d=3, n=40)
    kw = dict(chains=2, draws=20, burnin=5, pilot_steps=20, progress=False)
    for batch_size, refused in ((10, True), (None, False)):
        where = tmp_path / str(batch_size)
        behavioral_llc(model, x, batch_size=batch_size, checkpoint_dir=where, _stop_after=10, **kw)
        path = where / "llc-rank0.pt"
        payload = torch.load(path, weights_only=True)
        del payload["extra"]["step_size_choice"]["gradient_spread"]
        torch.save(payload, path)
        before = path.read_bytes()
        if refused:
            with pytest.raises(ValueError, match=r"chosen by tl_degeneracy < 0\.4\.1.*gradient spread.*delete"):
                behavioral_llc(model, x, batch_size=batch_size, checkpoint_dir=where, **kw)
            assert path.read_bytes() == before
        else:
            resumed = behavioral_llc(model, x, batch_size=batch_size, checkpoint_dir=where, **kw)
            assert resumed.diagnostics["step_size_source"] == "automatic (from checkpoint)"


def test_a_checkpoint_of_another_number_of_processes_says_so(tmp_path):
    """Audit 16b F3: a run interrupted under 2 ranks and resumed in 1 process read "my_chains: checkpoint
    [0, 2] vs now [0, 1, 2, 3]"; the message now names the number of processes and what to delete."""
    model, x = linear_regression(d=3, n=30)
    kw = dict(chains=4, draws=20, burnin=5, pilot_steps=20, progress=False)
    behavioral_llc(model, x, checkpoint_dir=tmp_path, _stop_after=10, **kw)
    path = tmp_path / "llc-rank0.pt"
    payload = torch.load(path, weights_only=True)
    payload["settings"]["my_chains"] = [0, 2]  # rank 0's chains in a run of 2 processes
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"written by a run of 2 processes .*delete the llc-rank\*\.pt files"):
        behavioral_llc(model, x, checkpoint_dir=tmp_path, **kw)


def test_numpy_settings_resume_and_one_ranks_unreadable_checkpoint_stops_every_rank(tmp_path, monkeypatch):
    """Review 40: a step size taken from a sweep's frame (a numpy float) went into the run key, and the
    file it made was refused on resume (weights_only loading); and a rank that could not read its
    checkpoint raised alone while the others waited in the gather."""
    from tl_degeneracy.llc import checkpoint

    model, x = linear_regression(d=3, n=30)
    kw = dict(chains=2, draws=20, burnin=5, progress=False, step_size=np.float64(1e-4), seed=np.int64(3))
    full = behavioral_llc(model, x, **kw)
    behavioral_llc(model, x, checkpoint_dir=tmp_path, _stop_after=10, **kw)
    resumed = behavioral_llc(model, x, checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(resumed.trace, full.trace)
    planted = tmp_path / "planted.pt"
    torch.save({"a": 1}, planted)
    good = {"extra": {}, "settings": {}, "step": 1, "adapted": (None, [])}
    for mine, other, rank in ((planted, good, 0), (tmp_path / "llc-rank0.pt", {"error": "unreadable"}, 1)):
        monkeypatch.setattr(checkpoint, "gather_objects", lambda obj: [obj, other] if rank == 0 else [good, other])
        with pytest.raises(ValueError, match=f"rank {rank}: "):
            checkpoint.agree_on_resume(str(mine), 2)


class _Planted:
    """Unpickling it runs ``touch <marker>``: what a crafted file in a checkpoint directory could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_is_not_a_checkpoint_is_refused_without_running_it(tmp_path):
    """Audit 16b F4: checkpoints were unpickled in full (weights_only=False), so a planted file ran a
    command when the run resumed, and foreign files failed with KeyError/IndexError. Both are refused
    with what to do, nothing runs and the file stays."""
    model, x = linear_regression(d=3, n=30)
    kw = dict(chains=2, draws=20, burnin=5, pilot_steps=20, progress=False)
    marker = tmp_path / "ran"
    for name, content in (("planted", {"settings": {}, "extra": _Planted(str(marker))}), ("foreign", {"a": 1})):
        where = tmp_path / name
        where.mkdir()
        torch.save(content, where / "llc-rank0.pt")
        before = (where / "llc-rank0.pt").read_bytes()
        with pytest.raises(ValueError, match="checkpoint.*delete it to start afresh"):
            behavioral_llc(model, x, checkpoint_dir=where, **kw)
        assert not marker.exists() and (where / "llc-rank0.pt").read_bytes() == before


def test_checkpoint_from_another_model_or_other_data_is_refused(tmp_path):
    # Same class, same sizes, same settings: only θ* (or the data) differs, which the fingerprint catches.
    model_a, x = linear_regression(d=3, n=30)
    model_b, _ = linear_regression(d=3, n=30)
    with torch.no_grad():
        model_b.weight.add_(0.1)
    kw = dict(chains=2, draws=20, burnin=5, step_size=1e-4, checkpoint_dir=tmp_path)
    behavioral_llc(model_a, x, **kw)
    with pytest.raises(ValueError, match=r"another model or other data \(differs in: parameters_sha256\)"):
        behavioral_llc(model_b, x, **kw)
    with pytest.raises(ValueError, match=r"another model or other data \(differs in: data_sha256\)"):
        behavioral_llc(model_a, x + 1.0, **kw)
    with pytest.raises(ValueError, match=r"differs in: .*dtype"):
        behavioral_llc(model_a.double(), x.double(), **kw)
    # The original model and data still resume (here: read the finished run back).
    model_a.float()
    assert behavioral_llc(model_a, x, **kw).diagnostics["steps_done"] == 25


def test_more_ranks_than_chains_is_refused(monkeypatch):
    import sys

    api = sys.modules["tl_degeneracy.llc.estimate"]
    monkeypatch.setattr(api, "distributed_context", lambda group=None: DistributedContext(0, 4))
    model, x = linear_regression(d=3, n=30)
    with pytest.raises(ValueError, match="4 ranks but only 2 chains"):
        behavioral_llc(model, x, chains=2, draws=5, burnin=0)


def test_collectives_use_the_backend_device(monkeypatch):
    """Under NCCL the tensors reduced across ranks must be CUDA tensors (NCCL rejects CPU ones):
    tl_degeneracy.distributed places them with reduce_device, and the LLC's scalars (η, curvature,
    clocks) travel as objects, which all_gather_object places itself. Simulated on the CPU: a fake
    two-rank world in which a tensor collective fails the test."""
    import sys

    from tl_degeneracy import distributed

    api = sys.modules["tl_degeneracy.llc.estimate"]

    def tensor_collective(t, *args, **kwargs):
        raise AssertionError("the LLC reduced a tensor across ranks (NCCL would need it on the GPU)")

    def gather(parts, local, group=None):
        # Rank 1 holds the odd chains; its traces (and its Hessian-trace samples) are stand-ins
        # (this test is about devices).
        failure, obj = local
        parts[0] = local
        parts[1] = (failure, {**obj, "chains": [c + 1 for c in obj["chains"]]} if isinstance(obj, dict) else obj)

    two = lambda group=None: DistributedContext(0, 2)  # noqa: E731
    monkeypatch.setattr(api, "distributed_context", two)
    monkeypatch.setattr(distributed, "distributed_context", two)
    monkeypatch.setattr(dist, "broadcast", tensor_collective)
    monkeypatch.setattr(dist, "all_reduce", tensor_collective)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    model, x = linear_regression(d=3, n=30)
    res = behavioral_llc(model, x, chains=4, draws=10, burnin=4, pilot_steps=10)
    assert res.diagnostics["world_size"] == 2
    # And the tensor helper sends CPU tensors to the current GPU under NCCL only.
    t = torch.zeros(1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.reduce_device(t) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.reduce_device(t) == torch.device("cuda", 0)


def test_checkpoint_files_are_written_atomically(tmp_path):
    model, x = linear_regression(d=3, n=30)
    behavioral_llc(model, x, chains=2, draws=600, burnin=0, checkpoint_dir=tmp_path, checkpoint_every=256)
    assert sorted(os.listdir(tmp_path)) == ["llc-rank0.pt"]  # no temporary file left behind
    payload = torch.load(tmp_path / "llc-rank0.pt", weights_only=True)  # no pickled code
    assert payload["step"] == 600 and payload["delta"].shape == (2, 3) and len(payload["generators"]) == 2
    # A write interrupted by a process that is gone left its temporary file (audit 10b): the next run removes it.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"llc-rank0.pt.tmp-{int(gone.stdout)}"
    stale.write_bytes(b"partial")
    behavioral_llc(model, x, chains=2, draws=600, burnin=0, checkpoint_dir=tmp_path, checkpoint_every=256)
    assert sorted(os.listdir(tmp_path)) == ["llc-rank0.pt"]


def _torchrun(out_dir, *args):
    os.makedirs(out_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "llc_distributed_worker.py"), str(out_dir), *map(str, args)]
    # A bounded wait: ranks that disagree about resuming used to hang in their collectives.
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_ranks_give_the_single_process_chains_and_resume_only_together(tmp_path):
    from tests.llc_distributed_worker import run

    ckpt = tmp_path / "ckpt"
    proc = _torchrun(tmp_path / "first", ckpt)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = run()
    for rank in (0, 1):
        multi = np.load(tmp_path / "first" / f"rank{rank}.npz")
        assert int(multi["world_size"]) == 2
        np.testing.assert_allclose(multi["trace"], single.trace, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(multi["llc_per_chain"], single.llc_per_chain, rtol=1e-6)
        assert float(multi["step_size"]) == single.step_size
    assert sorted(os.listdir(ckpt)) == ["llc-rank0.pt", "llc-rank1.pt"]
    # Rank 1's checkpoint lost: rank 0 alone would resume (skipping the step-size calibration)
    # while rank 1 calibrated afresh, and their collectives would wait for each other forever.
    # Both ranks must refuse, with the same message.
    os.remove(ckpt / "llc-rank1.pt")
    proc = _torchrun(tmp_path / "second", ckpt)
    assert proc.returncode == 0, proc.stderr[-4000:]
    messages = [(tmp_path / "second" / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1] and "checkpoints for ranks [0] only, of 2" in messages[0]


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_chains_failing_on_one_rank_raise_on_every_rank(tmp_path):
    """Audit 16b F1's remainder: rank 1's chains raised (a GPU out of memory) and rank 0 waited in its
    next gather until gloo's 30-minute timeout. Now both raise at once: rank 1 its own error, rank 0
    one that names rank 1 and quotes it."""
    import json

    proc = _torchrun(tmp_path, "--fail-on-rank-1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert got[1] == {"error": "RuntimeError", "message": "out of memory on this rank's device (simulated)"}
    # rank 0 hears of it in the collective it waits in (here a gather of the chains' curvature or traces)
    assert got[0] == {"error": "RuntimeError", "message": "rank 1 of 2 failed with RuntimeError: "
                                                          "out of memory on this rank's device (simulated)"}


def _fake_world(monkeypatch, found):
    """A two-rank world whose all_gather_object returns ``found`` (this rank's entry is its own; each
    goes with no failure, as distributed.gather_objects sends it)."""
    import sys

    from tl_degeneracy import distributed

    api = sys.modules["tl_degeneracy.llc.checkpoint"]

    def gather(parts, local, group=None):
        parts[:] = [local if f == "mine" else (None, f) for f in found]

    monkeypatch.setattr(distributed, "distributed_context", lambda group=None: DistributedContext(0, 2))
    monkeypatch.setattr(dist, "all_gather_object", gather)
    return api


def test_ranks_agree_on_resuming(tmp_path, monkeypatch):
    """The collective resume decision (checkpoint.agree_on_resume), with the other rank simulated."""
    model, x = linear_regression(d=3, n=30)
    kw = dict(chains=2, draws=20, burnin=8, seed=1)
    behavioral_llc(model, x, checkpoint_dir=tmp_path, **kw)
    path = str(tmp_path / "llc-rank0.pt")
    payload = torch.load(path, weights_only=True)
    extra = payload["extra"]
    other = {"extra": extra, "settings": {k: v for k, v in payload["settings"].items() if k != "my_chains"},
             "step": payload["step"], "adapted": (extra.get("step_size"), [a["step"] for a in extra["adaptations"]])}
    api = _fake_world(monkeypatch, ["mine", other])  # both ranks hold consistent checkpoints: resume
    assert api.agree_on_resume(path, 2)["step_size_choice"] == extra["step_size_choice"]
    # The other rank has none: refused (on every rank: each sees the same gathered list).
    api = _fake_world(monkeypatch, ["mine", None])
    # review 40 F3: a run of 1 process resumed with 2 is told to resume with 1
    with pytest.raises(ValueError, match=r"checkpoints for ranks \[0\] only, of 2.*If a run of 1 process\(es\) wrote them, "
                                         r"resume with that number"):
        api.agree_on_resume(path, 2)
    # This rank has none but the other has one: refused too.
    with pytest.raises(ValueError, match=r"ranks \[0\] only"):
        _fake_world(monkeypatch, [other, "mine"]).agree_on_resume(str(tmp_path / "absent.pt"), 2)
    # Another run's checkpoint, or one that stopped before a burn-in adaptation the other has done.
    with pytest.raises(ValueError, match="different runs"):
        _fake_world(monkeypatch, ["mine", {**other, "settings": {**other["settings"], "gamma": 2.0}}]).agree_on_resume(path, 2)
    with pytest.raises(ValueError, match="different points of the burn-in"):
        _fake_world(monkeypatch, ["mine", {**other, "adapted": (None, []), "step": 1}]).agree_on_resume(path, 2)
    # Nobody has one: start afresh.
    assert _fake_world(monkeypatch, ["mine", None]).agree_on_resume(str(tmp_path / "absent.pt"), 2) is None
