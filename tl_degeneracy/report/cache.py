"""Finished sections kept in the checkpoint directory, reused when their fingerprint matches.

A section's fingerprint is the sha256 of: its name, the report settings it declares, the seed,
the package version, the model's live parameters (values included), the device type, and — for
sections that read data — the token sequences. A rerun with the same fingerprint loads the section
instead of recomputing it. The section's own checkpoints (the LLC's sampler states) live in
``<checkpoint_dir>/<section>-<fingerprint[:12]>/``: an interrupted run resumes there, and a run with
other settings gets a directory of its own rather than a checkpoint it would have to refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .context import ReportContext
from .registry import Section
from .result import SectionResult
from .serialize import to_jsonable

__all__ = ["fingerprint", "load_cached", "store"]


def fingerprint(section: Section, ctx: ReportContext) -> str:
    from .. import __version__

    key = {
        "section": section.name,
        "settings": {k: getattr(ctx.settings, k) for k in section.settings},
        "seed": ctx.seed,
        "llc_components": ctx.llc_components if section.name == "llc" else None,
        "version": __version__,
        "model": ctx.model_digest,
        "device_type": ctx.adapter.device.type,
        "data": ctx.data_digest if section.needs_data else None,
    }
    return hashlib.sha256(json.dumps(to_jsonable(key), sort_keys=True).encode()).hexdigest()


def _path(ctx: ReportContext, name: str) -> Path:
    return Path(ctx.checkpoint_dir) / "sections" / f"{name}.json"


def load_cached(section: Section, ctx: ReportContext) -> SectionResult | None:
    """The stored result of ``section`` if its fingerprint matches, else None."""
    path = _path(ctx, section.name)
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a half-written or damaged file: recompute
    if stored.get("fingerprint") != fingerprint(section, ctx):
        return None
    result = SectionResult.from_dict(stored["result"])
    result.cached = True
    return result


def store(section: Section, ctx: ReportContext, result: SectionResult) -> None:
    """Write a finished (``ok``) section atomically."""
    path = _path(ctx, section.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": fingerprint(section, ctx), "result": result.to_dict()}, allow_nan=False))
    os.replace(tmp, path)
