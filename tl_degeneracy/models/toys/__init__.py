"""Bundled toy models (METHODS §7) as TransformerLens ``HookedRootModule``s.

Importing this package registers every bundled toy with :mod:`.registry`, so that
``tld.load_model("toy:...")`` finds it. A toy's module is imported only when the toy is loaded
(or its data asked for through ``toy_data``), which keeps ``import tl_degeneracy`` cheap.
"""

from .registry import register

#: One line per bundled toy:
#: (spec, module under tl_degeneracy.models.toys, class in that module, file in weights/, description).
BUNDLED_TOYS: list[tuple[str, str, str, str, str]] = [
    ("toy:bytelm", "bytelm", "ToyTransformer", "bytelm.pt", "2-layer byte-level LM trained on Python stdlib source"),
    ("toy:sma", "sma", "SparseModularAddition", "sma.pt", "sparse modular addition (p=4, T=12, k=5), d=32, curriculum p=2→4: generalising solution"),
    ("toy:sma-scratch", "sma", "SparseModularAddition", "sma-scratch.pt", "sparse modular addition (p=4, T=12, k=5), d=32, trained from scratch: memorising solution"),
    ("toy:modadd", "modadd", "ToyTransformer", "modadd.pt", "modular addition (a+b) mod 31, Nanda et al. 1-layer config (d=128, 4 heads, ReLU, no LN): grokked"),
]

for _entry in BUNDLED_TOYS:
    register(*_entry)
del _entry
