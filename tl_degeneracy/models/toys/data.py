"""Bundled data for the bundled toys: ``toy_data(name)`` (``tld.toy_data``).

Each toy's data comes from a function registered under the toy's name in :data:`TOY_DATA`. A toy
module registers its own with one line, ``register_toy_data("name", fn)``; :func:`toy_data` imports
the modules of the bundled toys (``tl_degeneracy.models.toys.BUNDLED_TOYS``) the first time it
meets a name it does not know, so that line runs without anything else having to import the module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import resources

import torch
from jaxtyping import Int
from torch import Tensor

DATA_DIR = resources.files("tl_degeneracy.models.toys") / "samples"


def _bytelm_data(n: int | None = None, seed: int = 0, seq_len: int = 128) -> Int[Tensor, "n_seq seq_len"]:
    """Byte tokens (0..255) cut from the bundled held-out sample of Python stdlib source.

    ``n=None``: every non-overlapping window of ``seq_len`` bytes, in order (the canonical
    validation set; 64 KiB gives 511 windows of 128). ``n`` given: ``n`` windows at offsets drawn
    uniformly from a generator seeded with ``seed`` (they may overlap; ``n`` may exceed 511).
    """
    if not 2 <= seq_len <= 128:
        raise ValueError(f"seq_len must be in [2, 128] (toy:bytelm has n_ctx=128); got {seq_len}")
    raw = (DATA_DIR / "bytelm_val.txt").read_bytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if n is None:
        n_seq = len(data) // seq_len
        return data[: n_seq * seq_len].view(n_seq, seq_len).long()
    if n < 1:
        raise ValueError(f"n must be ≥ 1 (or None for every window); got {n}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len + 1, (n,), generator=gen)
    return data[starts[:, None] + torch.arange(seq_len)].long()


# ------------------------------------------------------------------------------------------
# name → function(n=None, seed=0, **kwargs) returning the toy's data. Add an entry from the
# toy's own module with register_toy_data(name, fn); "bytelm" lives here because its data is a
# bundled text file rather than something a toy task generates.
TOY_DATA: dict[str, Callable[..., object]] = {
    "bytelm": _bytelm_data,
}
# ------------------------------------------------------------------------------------------


def register_toy_data(name: str, fn: Callable[..., object]) -> None:
    """Make ``toy_data(name, ...)`` call ``fn(n=..., seed=..., **kwargs)``. Re-registering a name
    replaces it (a module reloaded in a notebook must not fail)."""
    if not callable(fn):
        raise TypeError(f"register_toy_data({name!r}, fn): fn must be callable; got {type(fn).__name__}")
    TOY_DATA[name] = fn


def _import_toy_modules() -> None:
    from . import BUNDLED_TOYS

    for module in dict.fromkeys(entry[1] for entry in BUNDLED_TOYS):
        importlib.import_module(f"tl_degeneracy.models.toys.{module}")


def toy_data(name: str, n: int | None = None, seed: int = 0, **kwargs):
    """The bundled data of toy ``name`` (e.g. ``"bytelm"``, ``"sma"``), deterministic given
    ``n`` and ``seed``; extra keyword arguments go to the toy's data function.

    ``"bytelm"``: LongTensor [n_seq, 128] of byte tokens from the held-out stdlib sample.
    """
    name = name.removeprefix("toy:")
    if name not in TOY_DATA:
        _import_toy_modules()
    if name not in TOY_DATA:
        raise ValueError(f"no bundled data named {name!r}; available: {sorted(TOY_DATA)}")
    return TOY_DATA[name](n=n, seed=seed, **kwargs)
