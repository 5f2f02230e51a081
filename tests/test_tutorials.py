"""Every notebook in tutorials/ runs from top to bottom in fast mode, so the tutorials cannot rot.

Each notebook is executed by nbclient on a copy (the stored, full-mode outputs are never rewritten)
with ``TLD_FAST=1``, which the notebooks read to shrink steps and data. The notebooks assert their
own ground truths (gauge invariance, Aoyagi's learning coefficients, ...), so a broken method fails
here too. The kernel is the interpreter running the tests, whatever environment that is (the
TransformerLens 4.x ``.venv`` or 3.x ``.venv-tl3``), through a kernel spec written for the test:
the kernel specs installed in a virtual environment name a bare ``python`` and would run whatever
interpreter is first on PATH.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorials need nbformat (pip install -e '.[dev]')")
nbclient = pytest.importorskip("nbclient", reason="the tutorials need nbclient (pip install -e '.[dev]')")
pytest.importorskip("ipykernel", reason="the tutorials need ipykernel (pip install -e '.[dev]')")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: Seconds one cell may take in fast mode (the slowest fast-mode cell takes about 20 s on one thread).
CELL_TIMEOUT = 300
KERNEL_NAME = "tld-tutorial-test"
KERNEL_ENV = {
    "TLD_FAST": "1",
    # One thread, as in the rest of the suite (conftest.py); the kernel is a separate process.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}


def _kernel_manager(kernel_dir: Path) -> KernelManager:
    """A kernel manager whose only kernel runs ``sys.executable`` with the fast-mode environment."""
    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"tutorial test ({sys.executable})",
        "language": "python",
        "env": KERNEL_ENV,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _failure_message(name: str, nb, index: int | None, error: Exception) -> str:
    if index is None:
        return f"{name}: the kernel failed before any cell ran: {type(error).__name__}: {error}"
    source = nb.cells[index].source
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the kernel's traceback comes with terminal colours
    return (f"{name}: cell {index} failed (fast mode, TLD_FAST=1)\n"
            f"---- cell {index} source ----\n{source}\n---- error ----\n{type(error).__name__}: {text}")


@pytest.mark.tl_agnostic  # the notebooks use the bundled toys only: once, in the TransformerLens 4.x run
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_in_fast_mode(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "run"
    workdir.mkdir()
    nbformat.write(nb, workdir / path.name)  # the copy the kernel runs beside; the stored file is left alone
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT, allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    current: dict[str, int | None] = {"index": None}

    def on_cell_start(cell, cell_index):
        current["index"] = cell_index

    client.on_cell_start = on_cell_start
    try:
        client.execute()
    except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError,
            nbclient.exceptions.DeadKernelError) as error:
        pytest.fail(_failure_message(path.name, nb, current["index"], error), pytrace=False)
    executed = [c for c in nb.cells if c.cell_type == "code"]
    assert executed and all(c.get("execution_count") for c in executed), f"{path.name}: not every code cell ran"
