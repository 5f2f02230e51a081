"""Finished sections kept in the checkpoint directory, reused when their fingerprint matches.

A section's fingerprint is the sha256 of: its name, the report settings it declares, the seed (for
seeded sections), the package's and the libraries' versions, the model (``ReportContext.model_digest``:
its live parameters and buffers, values included, its configuration and the hooks on its modules),
the device type, and — for sections that read data — the token sequences they read, with the rule
for which positions count (``ReportContext.data_key``). A rerun with the same fingerprint loads the section
instead of recomputing it. The section's own checkpoints (the LLC's sampler states) live in
``<checkpoint_dir>/<section>-<fingerprint[:12]>/``: an interrupted run resumes there, and a run with
other settings gets a directory of its own rather than a checkpoint it would have to refuse.
A damaged sampler checkpoint there (truncated by a full disk or a killed copy) is refused before any
section runs, and ``clear`` removes everything this module and the sections wrote (``--fresh``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

from .context import ReportContext, library_versions
from .registry import SECTIONS, Section
from .report import ReportDirectoryError, SectionResult
from .serialize import to_jsonable

__all__ = ["check_checkpoints", "clear", "fingerprint", "load_cached", "store"]


def fingerprint(section: Section, ctx: ReportContext) -> str:
    from .. import __version__

    key = {
        "section": section.name,
        "settings": {k: getattr(ctx.settings, k) for k in section.settings},
        "seed": ctx.seed if section.seeded else None,
        "llc_components": ctx.llc_components if section.name == "llc" else None,
        "version": __version__,
        "libraries": library_versions(),  # audit 20a F2: another torch or TransformerLens can move the numbers
        "model": ctx.model_digest,
        "device_type": ctx.adapter.device.type,
        "data": ctx.data_key(section.reads) if section.needs_data else None,
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
    if not isinstance(stored, dict) or stored.get("fingerprint") != fingerprint(section, ctx):
        return None
    try:
        result = SectionResult.from_dict(stored["result"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # the right fingerprint over a damaged result (audit 16b F5: a raw traceback): recompute
    result.cached = True
    return result


def store(section: Section, ctx: ReportContext, result: SectionResult) -> None:
    """Write a finished (``ok``) section atomically."""
    path = _path(ctx, section.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"fingerprint": fingerprint(section, ctx), "result": result.to_dict()}, allow_nan=False))
        os.replace(tmp, path)
    finally:  # a write cut short (a full disk) leaves nothing behind (audit 16b F10)
        tmp.unlink(missing_ok=True)


def check_checkpoints(section_dir: Path) -> None:
    """Refuse a damaged checkpoint under ``section_dir`` before any section runs.

    torch writes its checkpoints as zip archives with a CRC per record: a truncated file has no
    central directory, and a corrupted one fails its CRC — both found here without unpickling,
    where torch.load would fail deep inside a section (or, for a flipped byte in a tensor, not at all).

    Raises:
        ReportDirectoryError: the damaged file, and ``--fresh`` or deleting it as the way out.
    """
    for path in sorted(Path(section_dir).rglob("*.pt")) if Path(section_dir).is_dir() else ():
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            problem = None if bad is None else f"record {bad} fails its checksum"
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            raise ReportDirectoryError(
                f"the checkpoint {path} is damaged (truncated or corrupted: {problem}), so its run cannot resume. "
                "Rerun with --fresh (degeneracy_report(..., fresh=True)) to start the checkpointed sections afresh, "
                "or delete that file")


#: A section's own checkpoint directory: ``<section>-<fingerprint[:12]>``.
_SECTION_DIR = re.compile(r"^(?P<name>.+)-[0-9a-f]{12}$")


#: A finished section (:func:`store`): ``sections/<section>.json``, or its write in progress.
_SECTION_FILE = re.compile(r"^(?P<name>.+)\.(json|tmp-[0-9]+)$")


def _own_section_file(path: Path) -> bool:
    m = _SECTION_FILE.match(path.name)
    return path.is_file() and m is not None and m["name"] in SECTIONS


def _own_section_dir(path: Path) -> bool:
    m = _SECTION_DIR.match(path.name)
    return path.is_dir() and m is not None and m["name"] in SECTIONS


def foreign_entries(checkpoint_dir: Path) -> list[str]:
    """What ``checkpoint_dir`` holds that the report does not write there (hidden files aside): the
    report writes finished sections as ``sections/<section>.json`` and each registered section's
    checkpoints under ``<section>-<fingerprint[:12]>/``. A folder called ``checkpoints`` is a common
    name for other programs' output (audit 10b: ``--fresh`` deleted a user's files in one)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return [root.name] if root.exists() else []
    foreign = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name == "sections" and entry.is_dir():
            foreign += [f"sections/{p.name}" for p in sorted(entry.iterdir()) if not _own_section_file(p)]
        elif not _own_section_dir(entry):
            foreign.append(entry.name)
    return foreign


def clear(checkpoint_dir: Path) -> None:
    """Delete what the report wrote under ``checkpoint_dir``: the finished sections and each
    registered section's checkpoint directory (nothing else: the directory may be shared)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return
    sections = root / "sections"
    if sections.is_dir():
        for path in sections.iterdir():
            if _own_section_file(path):
                path.unlink()
        if not any(sections.iterdir()):
            sections.rmdir()
    for entry in root.iterdir():
        if _own_section_dir(entry):
            _clear_section_dir(entry)


#: What a section writes in its checkpoint directory (the LLC's per-rank checkpoints and their writes).
_CHECKPOINT_FILE = re.compile(r"^llc-rank[0-9]+\.pt(\.tmp-[0-9]+)?$")


def _clear_section_dir(directory: Path) -> None:
    """Delete the checkpoints a section wrote under ``directory`` and the folders they leave empty;
    anything else stays, with its folders (audit 16b F9: --fresh deleted a user's files placed there)."""
    for folder, _, files in os.walk(directory, topdown=False):
        for name in files:
            if _CHECKPOINT_FILE.match(name):
                os.remove(os.path.join(folder, name))
        if not os.listdir(folder):
            os.rmdir(folder)
