"""Recording benchmark results: each script owns one ``## `` section of BENCHMARKS.md and appends
its newest run at the end of that section, leaving every other section as it is."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def append_to_section(section: str, script: str, block: str, path: Path = BENCHMARKS) -> None:
    """Append ``block`` to ``section`` (a ``## `` heading) of ``path``, creating either if missing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\nWritten by `benchmarks/{script}`; newest run last.\n"
    start = text.index(section)
    nxt = text.find("\n## ", start + len(section))
    end = len(text) if nxt < 0 else nxt + 1
    body = text[start:end].rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    path.write_text(text[:start] + body + ("\n" + text[end:] if end < len(text) else ""))
