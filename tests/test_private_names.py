"""Private names stay private (docs/architecture.md): no module of the package imports another
module's ``_underscore`` names or uses an ``_underscore`` attribute that it does not define itself
(``adapter._live``, ``adapter._layer_attention``, ...); each has a public entry point in the module
that owns it. Third-party privates (``torch._dynamo``) are not the package's to police."""

from __future__ import annotations

import ast
from pathlib import Path

import tl_degeneracy

PACKAGE = Path(tl_degeneracy.__file__).parent



def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _violations(source: str, rel: str) -> list[str]:
    """The private-name uses in ``source``, the text of the package file ``rel``."""
    tree = ast.parse(source)
    defined: set[str] = set()
    third_party: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_self(node.value):
            defined.add(node.attr)  # self._x = …: the module's own attribute (adapter._x = … is not)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Import):
            third_party |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("tl_degeneracy")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not (node.module or "").startswith("tl_degeneracy"):
            third_party |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("tl_degeneracy")):
            found += [f"{rel}:{node.lineno} imports {a.name}" for a in node.names
                      if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in defined:
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if not (isinstance(root, ast.Name) and root.id in third_party):
                found.append(f"{rel}:{node.lineno} uses {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [v for path in sorted(PACKAGE.rglob("*.py"))
             for v in _violations(path.read_text(), path.relative_to(PACKAGE).as_posix())]
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_the_check_catches_what_it_is_for():
    """The kinds of use the package had (gauge.py importing selection's helpers and reading
    ``adapter._live``) are found; a module's own privates and torch's are not."""
    source = (
        "import torch\n"
        "from .models.selection import _components, measure_parameter\n"
        "def _own(adapter):\n"
        "    saved, adapter._live = adapter._live, None\n"
        "    return torch._dynamo, _own\n"
    )
    assert _violations(source, "gauge.py") == [
        "gauge.py:2 imports _components", "gauge.py:4 uses adapter._live", "gauge.py:4 uses adapter._live"]
