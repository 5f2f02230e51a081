"""Static guard against CPU-only tensors meeting CUDA ones (issue 19), without a GPU.

A torch factory called without ``device=`` (``torch.zeros``, ``torch.eye``, ``torch.arange`` …)
builds its tensor on the CPU. Where that tensor then meets the model's weights or activations, the
package works on a CPU model and fails on a CUDA one, which a CPU-only CI never sees. This test
parses every module of the package with ``ast`` and lists those calls. A call passes when it names
``device=`` or its result is moved at once (``torch.randint(...).to(device)``); ``*_like`` and
``Tensor.new_*`` factories inherit a device and are not listed. Everything else must be an audited
CPU-only site below, counted per module or function, so that a new factory there fails the test too
and gets audited. To run the tests themselves on a GPU: ``TLD_TEST_DEVICE=cuda make test``.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import tl_degeneracy

PACKAGE = Path(tl_degeneracy.__file__).parent

#: torch functions that create a tensor on the default (CPU) device unless told otherwise.
FACTORIES = frozenset({
    "arange", "as_tensor", "empty", "empty_strided", "eye", "full", "linspace", "logspace", "normal",
    "ones", "rand", "randint", "randn", "randperm", "range", "scalar_tensor", "tensor", "tril_indices",
    "triu_indices", "zeros",
})

#: Audited CPU-only sites: "module" or "module::function" (relative to the package) →
#: (number of device-less factory calls there, why a CPU tensor is right).
ALLOWED: dict[str, tuple[int, str]] = {
    "data.py": (9, "the token data pipeline lives on the CPU; Batch.to(device) moves each batch"),
    "counts.py::_token_frequencies": (1, "a CPU histogram of token ids, filled from tokens moved with .cpu()"),
    "models/adapter.py::ModelAdapter.rotary_angles": (1, "rotation angles as CPU float64 (the others come .cpu()); eigenvectors are built from them on the CPU"),
    "invariants.py::_rotation_eigenspaces": (3, "eigenspace bases built on the CPU; _block_ranks moves them to the weights' device"),
    "invariants.py::_group_free_directions": (1, "the identity basis of a non-rotary head; _block_ranks moves it to the weights' device"),
    "models/selection.py::writable": (1, "a CPU coverage mask, filled from layout masks moved with .cpu()"),
    "gauge.py::_random_invertible": (4, "a CPU generator keeps gauges device-independent; random_gauge moves the result"),
    "gauge.py::_random_scalar": (3, "as _random_invertible"),
    "llc/targets.py::TransformerTarget._data_digest": (2, "hashed on the CPU, together with the CPU token data"),
    "theory.py::two_layer_linear_network": (2, "builds a new model on the CPU; the caller moves it"),
    "models/toys/transformer.py": (13, "nn.Module construction on the CPU; callers move the model"),
    "models/toys/sma.py": (7, "nn.Module construction and seeded initialisation on the CPU (copy_ crosses devices)"),
    "models/toys/modadd.py": (3, "token grid and seeded initialisation on the CPU (copy_ crosses devices)"),
    "models/toys/bytelm.py": (3, "training data windows on the CPU, moved with .to(device) by train_bytelm"),
    "models/toys/data.py": (2, "training data windows on the CPU, like bytelm.py"),
}


def _is_factory(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
        and node.func.attr in FACTORIES
        and not any(k.arg == "device" for k in node.keywords)
    )


def deviceless_factories(source: str) -> list[tuple[int, str, str]]:
    """(line, enclosing function's qualified name or "", factory) for each device-less factory call
    in ``source`` whose result is not moved at once with ``.to(...)``."""
    found: list[tuple[int, str, str]] = []

    def walk(node: ast.AST, scope: str, moved: set[int]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            # torch.f(...).to(...): the factory's result is moved before anything uses it.
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "to":
                moved = moved | {id(child.func.value)}
            if _is_factory(child) and id(child) not in moved:
                found.append((child.lineno, scope, child.func.attr))
            walk(child, inner, moved)

    walk(ast.parse(source), "", set())
    return found


def _key(module: str, scope: str) -> str:
    """The ALLOWED key covering a site: the module's own entry, else the nearest function entry
    (a nested function belongs to its outermost listed parent)."""
    if module in ALLOWED:
        return module
    parts = scope.split(".") if scope else []
    for n in range(1, len(parts) + 1):
        key = f"{module}::{'.'.join(parts[:n])}"
        if key in ALLOWED:
            return key
    return f"{module}::{scope or '<module>'}"


def test_finder_sees_factories_and_moves():
    src = (
        "import torch\n"
        "def f(x):\n"
        "    a = torch.eye(3)\n"
        "    b = torch.zeros(3, device=x.device)\n"
        "    c = torch.randint(0, 5, (2,)).to(x.device)\n"
        "    d = torch.ones_like(x)\n"
        "    return torch.arange(4, dtype=torch.long)\n"
    )
    assert deviceless_factories(src) == [(3, "f", "eye"), (7, "f", "arange")]


def test_no_unaudited_cpu_tensor_factories():
    counts: Counter[str] = Counter()
    where: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        for line, scope, name in deviceless_factories(path.read_text(encoding="utf-8")):
            key = _key(module, scope)
            counts[key] += 1
            where.setdefault(key, []).append(f"{module}:{line} torch.{name}")
    new = {k: where[k] for k in counts if k not in ALLOWED}
    assert not new, (
        "torch tensor factories without device= (they build CPU tensors that collide with a CUDA model): "
        f"{new}. Pass device= (the tensor it meets), move the result with .to(...), or, for a CPU-only "
        "site, add it to ALLOWED with a reason."
    )
    changed = {k: (counts[k], n) for k, (n, _) in ALLOWED.items() if counts[k] != n}
    assert not changed, (
        f"the number of device-less factories changed at audited sites (found, audited): {changed}: "
        f"{ {k: where.get(k, []) for k in changed} }. Audit the new ones and update ALLOWED."
    )
