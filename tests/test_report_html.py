"""report.html opens in headless Chromium, offline, with every plot rendered and no script error.

Needs a Chromium binary (Debian's ``chromium``; ``.ci/run`` installs it when missing); skipped with
a message when there is none. The screenshot is written to the test's tmp directory and, when the
environment variable ``TLD_KEEP_SCREENSHOT`` names a path, copied there (``.ci/run`` sets
``reports/screenshots/report.png``).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tl_degeneracy.report import degeneracy_report
from tests.fixtures.toys import TINY_TOY_KWARGS, make_tiny_toy_transformer

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run does)"),
              # the page renders what any report holds: once, in the TransformerLens 4.x run (its report: ~40 s)
              pytest.mark.tl_agnostic]

TINY = {"chains": 2, "draws": 10, "burnin": 4, "pilot_steps": 5, "loss_scales": (1e-2, 1e-3), "n_probes": 2}


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root in a container; own profile: parallel runs do not share one
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--enable-logging=stderr", "--v=0",
           *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


@pytest.fixture(scope="module")
def saved_report(tmp_path_factory):
    tokens = torch.randint(0, TINY_TOY_KWARGS["d_vocab"], (6, 12), generator=torch.Generator().manual_seed(0))
    rep = degeneracy_report(make_tiny_toy_transformer(), tokens, overrides=TINY, progress=False)
    out = tmp_path_factory.mktemp("html")
    return rep, rep.save(out)


def test_report_renders_with_its_plots_and_no_script_errors(saved_report, tmp_path):
    rep, page = saved_report
    n_figures = sum(len(s.figures) for s in rep.sections.values())
    # OV, QK spectra; head distances; counts; activation spectra; interaction spectra, edges (heatmaps) and
    # modules; N_eff(ε); LLC traces
    assert n_figures == 10
    done = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "data-js-errors" not in dom, re.findall(r'data-js-last-error="[^"]*"', dom)
    assert not _console_errors(done.stderr), _console_errors(done.stderr)
    # plotly marks each rendered graph div js-plotly-plot and draws its axes and traces into SVG
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom)) == n_figures
    for i, fig_id in enumerate(re.findall(r'<div id="(fig-[\w-]+)" class="plotly-graph-div', dom)):
        body = dom.split(f'id="{fig_id}"', 1)[1].split('<div class="figure">', 1)[0]
        # scatter and bar traces are <g class="trace ...">, a heatmap is <g class="hm">
        assert 'class="main-svg"' in body and re.search(r'class="(trace [\w ]+|hm)"', body), fig_id
    assert i + 1 == n_figures


def test_screenshot_is_kept(saved_report, tmp_path):
    _, page = saved_report
    shot = tmp_path / "report.png"
    done = _chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,6000")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page compresses to a few kB
    keep = os.environ.get("TLD_KEEP_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)
    print(f"screenshot: {keep or shot}")


def test_the_error_probe_sees_a_script_error(saved_report, tmp_path):
    """The check above is not vacuous: the same page with a broken script reports it."""
    _, page = saved_report
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>notDefinedAnywhere();</script></body>"))
    dom = _chromium(broken, tmp_path / "profile", "--dump-dom").stdout
    assert 'data-js-errors="1"' in dom and "notDefinedAnywhere" in dom
