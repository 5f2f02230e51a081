"""The main job: ``tl-degeneracy report`` writes its files, prints a summary, fails clearly."""

import json

import pytest

from tl_degeneracy.cli import main


def test_default_report_on_bundled_model(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "toy:bytelm"
    assert report["summary"]["backend"] == "toy"
    assert report["summary"]["n_live_parameters"] == 478_976
    rows = report["activations"]["table"]
    # resid_pre of both layers and resid_post of both layers, full rank on real text
    assert {r["hook"] for r in rows} == {
        "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    }
    assert all(r["count"] == 64 * 128 and r["dim"] == 128 for r in rows)
    assert (out / "activation_stats.csv").exists() and (out / "parameters.csv").exists()
    assert "live parameters 478,976" in capsys.readouterr().out


def test_sma_report_sees_the_embedding_rank(tmp_path):
    """resid_pre of SMA is E[x] + P_t with 4 tokens and 12 positions. The vectors e_x + p_t span
    span{e_x - e_0} + span{p_t - p_0} + span{e_0 + p_0}: 3 + 11 + 1 = 15 dimensions (d = 32 > 16, so
    generic weights reach it). The uncentred Gram over all sequences has exactly that rank."""
    out = tmp_path / "sma"
    assert main(["report", "--model", "toy:sma", "--out", str(out), "--quiet"]) == 0
    rows = {r["hook"]: r for r in json.loads((out / "report.json").read_text())["activations"]["table"]}
    assert rows["blocks.0.hook_resid_pre"]["rank"] == 15
    assert rows["blocks.0.hook_resid_post"]["unit"] == "sequence"


def test_only_summary_needs_no_data(tmp_path):
    out = tmp_path / "s"
    assert main(["report", "--only", "summary", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "activations" not in report and "parameters" not in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "toy:nope"], "bundled"),
        (["--data", "/nonexistent/file.txt"], "no such file"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main(["report", "--out", str(tmp_path / "x"), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_text_file_data(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    out = tmp_path / "t"
    assert main(["report", "--data", str(text), "--seq-len", "64", "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "report.json").read_text())["activations"]["table"]
    assert sum(1 for _ in text.read_bytes()) == rows[0]["count"]
