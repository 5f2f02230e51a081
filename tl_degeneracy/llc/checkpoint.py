"""Checkpoints of the sampler state: written atomically every few steps, resumed bit for bit.

A checkpoint holds the whole :class:`~tl_degeneracy.llc.sampler.SamplerState` (chains, RMSProp
state, generators, trace, failures, norms, wall time and the run's step-size history in ``extra``)
and the *run key*: the settings that must agree for a resume (the target's description and
fingerprint, nβ, γ, chains, steps, seed, sampler, selection, η, ...). A checkpoint with another key
is refused, with a message that says which setting differs. Under torchrun each rank writes its
own file ``llc-rank<r>.pt`` and the ranks resume only together (:func:`agree_on_resume`).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from ..distributed import gather_objects
from .sampler import SamplerState


class Checkpointer:
    """This rank's checkpoint file in ``directory``: whether to resume, and when to write.

    ``resume_extra()`` decides with the other ranks whether the run resumes (:func:`agree_on_resume`);
    ``restore(state, key)`` then loads the state written under run key ``key`` (refusing any other);
    ``on_block`` (given to ``run_chains``) writes the state every ``every`` steps, at the end of the
    run and where a test interrupts it (``stop_after``); ``save`` writes it now.
    """

    def __init__(self, directory: str | os.PathLike, rank: int, world: int, every: int, steps: int,
                 stop_after: int | None = None):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(os.fspath(directory), f"llc-rank{rank}.pt")
        _remove_stale_writes(self.path)
        self.world, self.every, self.steps, self.stop_after = world, every, steps, stop_after
        self.key: dict = {}
        self._last_saved = 0
        #: perf_counter() at which the run's time began (earlier calls' time included): each write
        #: stores the time spent so far as ``extra["elapsed_s"]``, which a time budget counts on resume.
        self.started: float | None = None

    def resume_extra(self) -> dict | None:
        """This rank's saved ``extra`` when all ranks resume, None when all start afresh."""
        return agree_on_resume(self.path, self.world)

    def restore(self, state: SamplerState, key: dict, resume: bool) -> SamplerState:
        """Fix the run key (what later writes store) and, when resuming, load ``state`` under it."""
        self.key = key
        if resume:
            state = load_checkpoint(self.path, key, state)
        self._last_saved = state.step
        return state

    @property
    def on_block(self) -> Callable[[SamplerState], None]:
        def write_if_due(state: SamplerState) -> None:
            if state.step - self._last_saved >= self.every or state.step in (self.steps, self.stop_after):
                self.save(state)
                self._last_saved = state.step

        return write_if_due

    def save(self, state: SamplerState) -> None:
        if self.started is not None:
            state.extra["elapsed_s"] = time.perf_counter() - self.started
        save_checkpoint(self.path, state, self.key)


def _remove_stale_writes(path: str) -> None:
    """Delete the temporary files of writes to ``path`` (``<path>.tmp-<pid>``) whose process is gone:
    an interrupted write left them beside the checkpoint, which no run reads (audit 10b)."""
    for tmp in glob.glob(f"{glob.escape(path)}.tmp-*"):
        pid = tmp.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(tmp)
        except OSError:  # a process of another user holds that pid: not ours to judge
            pass


def save_checkpoint(path: str, state: SamplerState, key: dict) -> None:
    """Write the full sampler state and the run key atomically (write to a temporary file, then rename)."""
    payload = {
        "settings": _plain(key),
        "step": state.step,
        "delta": state.delta.cpu(),
        "v": None if state.v is None else state.v.cpu(),
        "generators": state.generator_states(),
        # tensors, not numpy arrays: the file is read back with weights_only=True (load_payload)
        "trace": torch.from_numpy(np.ascontiguousarray(state.trace)),
        "virial": torch.from_numpy(np.ascontiguousarray(state.virial)),
        "alive": state.alive.cpu(),
        "failed_at": state.failed_at.cpu(),
        "norms": state.norms.cpu(),
        "wall_s": state.wall_s,
        "extra": _plain(state.extra),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _plain(value):
    """``value`` with numpy scalars made Python numbers, in nested dicts, lists and tuples: what
    ``torch.load(weights_only=True)`` reads back (review 40: a step size taken from a sweep's frame,
    a numpy float, made a checkpoint that the same version refused)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


#: What every checkpoint holds (:func:`save_checkpoint`).
_PAYLOAD_KEYS = frozenset({"settings", "step", "delta", "v", "generators", "trace", "virial", "alive", "failed_at",
                           "norms", "wall_s", "extra"})


def load_payload(path: str) -> dict:
    """The payload of the checkpoint at ``path``, unpickled with ``weights_only=True``: tensors and plain
    containers only, so a file planted in a checkpoint directory cannot run code (audit 16b F4: with
    weights_only=False a crafted file ran a shell command on the report's rerun). A file that is not
    such a checkpoint, or one written before 0.4.7 (numpy arrays inside), is refused with what to do."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the unpickler refuses
        # torch's own message advises weights_only=False, which is what must not be done with it
        raise ValueError(
            f"{path} cannot be read as a checkpoint of this version of tl_degeneracy ({type(err).__name__}): it is "
            "not one of its checkpoints, or was written before 0.4.7, and it is not unpickled in full since that "
            "could run code it holds; delete it to start afresh"
        ) from None
    if not isinstance(payload, dict) or not _PAYLOAD_KEYS <= payload.keys() or not isinstance(payload["settings"], dict):
        raise ValueError(f"{path} is not a behavioral-LLC checkpoint of tl_degeneracy (not the fields it writes); "
                         "delete it to start afresh")
    for name in ("trace", "virial"):
        if isinstance(payload[name], torch.Tensor):
            payload[name] = payload[name].numpy()
    return payload


def load_checkpoint(path: str, key: dict, state: SamplerState) -> SamplerState:
    """Restore ``state`` from ``path``; refuse a checkpoint written under another run key."""
    payload = load_payload(path)
    saved = payload["settings"]
    diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    if "fingerprint" in diff:
        old, new = saved.get("fingerprint") or {}, key.get("fingerprint") or {}
        what = ", ".join(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)) or "fingerprint"
        raise ValueError(
            f"checkpoint {path} belongs to another model or other data (differs in: {what}); it cannot be "
            f"resumed for this one. Use another checkpoint_dir (one per model and data set) or delete the file"
        )
    if diff == ["my_chains"]:
        # the chains are split round-robin over the ranks: the rank's first two chains are world apart
        mine = list(saved.get("my_chains") or [])
        then = f"{mine[1] - mine[0]} processes" if len(mine) > 1 else "another number of processes"
        raise ValueError(
            f"checkpoint {path} was written by a run of {then} (this rank's chains then {mine}, now "
            f"{key.get('my_chains')}): resume with that number of processes, or delete the llc-rank*.pt files of "
            f"{os.path.dirname(path)} to sample this run afresh (a report keeps its other sections)"
        )
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {key.get(k)!r}" for k in diff[:6])
        raise ValueError(
            f"checkpoint {path} was written with different settings ({detail}); use another checkpoint_dir "
            f"or delete the file to start afresh"
        )
    device = state.delta.device
    state.step = int(payload["step"])
    state.delta = payload["delta"].to(device)
    state.v = None if payload["v"] is None else payload["v"].to(device)
    for g, s in zip(state.generators, payload["generators"]):
        g.set_state(s)
    state.trace = payload["trace"]
    state.virial = payload["virial"]
    state.alive = payload["alive"].to(device)
    state.failed_at = payload["failed_at"].to(device)
    state.norms = payload["norms"].to(device)
    state.wall_s = float(payload["wall_s"])
    state.extra = payload["extra"]
    return state


def agree_on_resume(path: str, world: int) -> dict | None:
    """Whether this run resumes from its checkpoints, decided by all ranks together.

    Returns this rank's checkpoint ``extra`` (step-size choice, adaptations) to resume from, or None
    to start afresh. Under torchrun every rank reads its own file and the ranks exchange what they
    found, so that all take the same decision: a rank that resumes skips the step-size calibration
    and burn-in adaptations that a fresh rank runs, and their collectives would wait for each other
    forever. Checkpoints on some ranks only, or written by different runs (settings) or at different
    points of the burn-in adaptation, are refused on every rank with the same message.
    """
    mine = None
    if os.path.exists(path):
        try:
            payload = load_payload(path)
        except ValueError as err:
            if world == 1:
                raise
            # every rank must hear of it, or the others wait in the gather below (review 40)
            mine = {"error": str(err)}
        else:
            extra = payload["extra"]
            settings = {k: v for k, v in payload["settings"].items() if k != "my_chains"}
            mine = {"extra": extra, "settings": settings, "step": int(payload["step"]),
                    "adapted": (extra.get("step_size"), [a["step"] for a in extra.get("adaptations", [])])}
    if world == 1:
        return None if mine is None else mine["extra"]
    found = gather_objects(mine)
    refused = [(r, f["error"]) for r, f in enumerate(found) if f is not None and "error" in f]
    if refused:
        rank, text = refused[0]
        raise ValueError(f"rank {rank}: {text}")
    have = [r for r, f in enumerate(found) if f is not None]
    where = os.path.dirname(path)
    if not have:
        return None
    if len(have) < world:
        raise ValueError(
            f"checkpoint_dir {where} holds checkpoints for ranks {have} only, of {world}: the ranks cannot resume "
            f"together (a rank would start afresh while the others resume). If a run of {len(have)} process(es) wrote "
            f"them, resume with that number; else delete the directory's llc-rank*.pt files to start afresh, or "
            f"restore the missing ones"
        )
    first = found[have[0]]
    if any(f["settings"] != first["settings"] for f in found):
        raise ValueError(f"checkpoint_dir {where}: the ranks' checkpoints were written by different runs (settings differ); "
                         f"delete its llc-rank*.pt files to start afresh")
    if any(f["adapted"] != first["adapted"] for f in found):
        steps = {r: f["step"] for r, f in enumerate(found)}
        raise ValueError(
            f"checkpoint_dir {where}: the ranks' checkpoints stopped at different points of the burn-in step-size "
            f"adaptation (steps per rank {steps}), so they cannot resume together; delete its llc-rank*.pt files "
            f"to start afresh"
        )
    return mine["extra"]
