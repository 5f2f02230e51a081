"""Recording benchmark results: each script owns one ``## `` section of BENCHMARKS.md and appends
its newest run at the end of that section, leaving every other section as it is."""

from __future__ import annotations

import datetime as _dt
import os
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


def machine_line() -> str:
    """One line naming when and where a benchmark ran: UTC time, the accelerator (or CPU model),
    cores, torch version and threads, and the 1/5/15-minute load average."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "CPU")
    where = f"{torch.cuda.get_device_name()} (+ {cpu})" if torch.cuda.is_available() else cpu
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC — {where}, nproc {os.cpu_count()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), load {load}")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
