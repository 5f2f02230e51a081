"""The main job: ``tl-degeneracy report`` writes its files, prints a summary, resumes, fails clearly."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tl_degeneracy import cli
from tl_degeneracy.cli import SECTIONS, main

#: CI-sized budgets for the sections that sample (see tl_degeneracy/report/settings.py).
TINY = ["--set", "chains=2", "draws=10", "burnin=4", "pilot_steps=5", "loss_scales=1e-2,1e-3", "n_sequences=16",
        "n_probes=2", "llc_max_draws=1"]  # one block of draws per LLC run: no continuation


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_help_lists_sections_presets_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("examples:", "--only", "--preset", "--set", "--seed", "--device", "--out", "--data", "thorough", *SECTIONS):
        assert word in text, word


def test_cli_sections_are_the_registered_ones():
    from tl_degeneracy.report import SECTIONS as REGISTERED

    assert list(SECTIONS) == list(REGISTERED)


def test_default_model_report_without_sampling(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--quiet", "--only", "summary", "parameters", "activations"]) == 0
    report = _report(out)
    assert report["model"]["label"] == "toy:bytelm" and report["model"]["backend"] == "toy"
    assert report["model"]["n_live_parameters"] == 478_976
    assert list(report["sections"]) == ["summary", "parameters", "activations"]
    rows = report["sections"]["activations"]["tables"]["hooks"]["records"]
    # resid_pre of both layers and resid_post of both layers, full rank on real text
    assert {r["hook"] for r in rows} == {
        "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    }
    assert all(r["count"] == 64 * 128 and r["dim"] == 128 and r["rank"] == 128 for r in rows)
    assert (out / "activations_hooks.csv").exists() and (out / "parameters_live.csv").exists()
    assert (out / "report.html").exists()
    printed = capsys.readouterr().out
    assert "478,976 live parameters" in printed and "activations" in printed


def test_full_report_on_sma_then_rerun_reuses_it(tmp_path, capsys):
    """resid_pre of SMA is E[x] + P_t with 4 tokens and 12 positions. The vectors e_x + p_t span
    span{e_x - e_0} + span{p_t - p_0} + span{e_0 + p_0}: 3 + 11 + 1 = 15 dimensions (d = 32 > 16, so
    generic weights reach it). The uncentred Gram over all sequences has exactly that rank."""
    out = tmp_path / "sma"
    argv = ["report", "--model", "toy:sma", "--out", str(out), "--quiet", *TINY]
    assert main(argv) == 0
    report = _report(out)
    status = {name: s["status"] for name, s in report["sections"].items()}
    # SMA's query is a learned vector, not a projection of the input: the counts do not apply
    assert status == {**{s: "ok" for s in SECTIONS}, "counts": "skipped"}
    assert "MissingHookError" in report["sections"]["counts"]["reason"]
    rows = {r["hook"]: r for r in report["sections"]["activations"]["tables"]["hooks"]["records"]}
    assert rows["blocks.0.hook_resid_pre"]["rank"] == 15
    assert rows["blocks.0.hook_resid_post"]["unit"] == "sequence"
    assert not any(s["cached"] for s in report["sections"].values())
    assert len(list((out / "checkpoints").glob("llc-*/default/llc-rank0.pt"))) == 1
    first = capsys.readouterr().out
    assert "counts" in first and "skipped: MissingHookError" in first

    assert main(argv) == 0  # same --out: finished sections come from the checkpoint directory
    again = _report(out)
    assert all(again["sections"][s]["cached"] for s in status if status[s] == "ok")
    assert again["sections"]["llc"]["values"] == report["sections"]["llc"]["values"]
    assert "cached" in capsys.readouterr().out

    assert main([*argv, "--fresh", "--only", "invariants"]) == 0  # --fresh drops the checkpoints
    assert not _report(out)["sections"]["invariants"]["cached"]


def test_only_runs_the_named_sections_and_needs_no_data_for_weights(tmp_path, hf_dirs):
    out = tmp_path / "s"
    model = str(hf_dirs["gpt2"])  # a non-toy model, no --data: the weight sections still run
    assert main(["report", "--model", model, "--only", "summary", "invariants", "--out", str(out), "--quiet"]) == 0
    report = _report(out)
    assert list(report["sections"]) == ["summary", "invariants"] and report["data"] is None
    assert report["sections"]["invariants"]["status"] == "ok"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "toy:nope"], "--model 'toy:nope': unknown bundled model"),
        (["--set", "draws=10", "--set", "draws=20"], "draws twice"),
        (["--model", "/nonexistent/model-dir"], "no such file"),
        (["--data", "/nonexistent/file.txt"], "no such file"),
        (["--set", "draws"], "KEY=VALUE"),
        (["--set", "nope=1"], "unknown report setting"),
        (["--set", "chains=0"], "chains must be"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main(["report", "--out", str(tmp_path / "x"), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # the directory this run made is not left behind


def test_an_interrupt_says_how_to_resume(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_report", interrupted)
    assert main(["report", "--out", str(tmp_path / "x"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the same command resumes" in err
    # audit 15b F7: a time fit under another load may scope the costly sections otherwise
    assert "give the lowered values with --set to resume them" in " ".join(err.split())
    # audit 16b F11: SIGTERM ends it the same way, and the handler before is put back
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_report", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["report", "--out", str(tmp_path / "y"), "--quiet"]) == 143  # 128 + SIGTERM, not Ctrl-C's 130
    assert "the same command resumes" in capsys.readouterr().err and signal.getsignal(signal.SIGTERM) is before
    # review 40: run in a thread (no signals there), an error carries no "signal only works in main thread"
    import threading

    monkeypatch.setattr(cli, "_report", lambda args: 0)
    done = []
    worker = threading.Thread(target=lambda: done.append(main(["report", "--out", str(tmp_path / "z"), "--quiet"])))
    worker.start()
    worker.join()
    assert done == [0]


def test_repeated_set_and_only_add_up(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "_report", lambda args: seen.update(only=args.only, set=args.set) or 0)
    assert main(["report", "--out", str(tmp_path / "x"), "--only", "summary", "--only", "invariants", "counts",
                 "--set", "chains=2", "draws=50", "--set", "n_probes=2"]) == 0
    assert seen == {"only": ["summary", "invariants", "counts"], "set": ["chains=2", "draws=50", "n_probes=2"]}


def test_token_ids_out_of_range_exit_2(tmp_path, capsys):
    tokens = tmp_path / "tokens.pt"
    torch.save(torch.full((2, 8), 300), tokens)  # toy:bytelm has 256 byte tokens
    assert main(["report", "--data", str(tokens), "--out", str(tmp_path / "x"), "--quiet", "--only", "activations"]) == 2
    err = capsys.readouterr().err
    assert "300" in err and "256" in err


def test_a_tokenizer_dict_file_is_read_with_its_padding(tmp_path, capsys):
    """Audit 3: a .pt holding a tokenizer's output ({input_ids, attention_mask}) was refused; it is read
    as token_batches reads the dict, padding left out; a dict without token ids is refused by name."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 10:] = 0  # right padding of the second sequence
    path = tmp_path / "encoded.pt"
    torch.save({"input_ids": ids, "attention_mask": mask}, path)
    out = tmp_path / "d"
    assert main(["report", "--data", str(path), "--out", str(out), "--quiet", "--only", "activations"]) == 0
    rows = _report(out)["sections"]["activations"]["tables"]["hooks"]["records"]
    assert rows[0]["count"] == int(mask.sum()) == 58
    other = tmp_path / "other.pt"
    torch.save({"labels": ids}, other)
    assert main(["report", "--data", str(other), "--out", str(tmp_path / "e"), "--quiet", "--only", "activations"]) == 2
    assert "keys ['labels']" in capsys.readouterr().err


def test_text_file_data(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    out = tmp_path / "t"
    assert main(["report", "--data", str(text), "--seq-len", "64", "--out", str(out), "--quiet",
                 "--only", "activations"]) == 0
    rows = _report(out)["sections"]["activations"]["tables"]["hooks"]["records"]
    assert len(text.read_bytes()) == rows[0]["count"]


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "tl_degeneracy.cli", "report", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "tl-degeneracy report" in done.stdout


@pytest.mark.parametrize("load, available, expected", [(0.0, 2, 2), (0.4, 2, 2), (1.0, 2, 1), (1.6, 2, 1),
                                                       (5.0, 2, 1), (3.0, 16, 13), (0.0, 1, 1)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, load, available, expected):
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
    assert cli._idle_threads(available) == expected


def test_a_shorter_fitted_sequence_length_keeps_the_data(tmp_path):
    """--memory small enough to cut the sequences: they are cut shorter, not dropped (the positions
    counted stay those of the unfitted run), and both the summary and the page say so."""
    argv = ["--quiet", "--only", "activations", "--set", "n_sequences=8"]
    assert main(["report", "--out", str(tmp_path / "a"), *argv]) == 0
    # 3 MiB: a batch of one sequence of 128 tokens needs about 4 (the forward and the hooks' Grams;
    # audit 12a F9: the counts' Grams were charged to this pass too, and at 8M it was skipped)
    assert main(["report", "--out", str(tmp_path / "b"), *argv, "--memory", "3M"]) == 0
    a, b = _report(tmp_path / "a"), _report(tmp_path / "b")
    assert b["sections"]["activations"]["status"] == "ok"
    memory = b["settings"]["memory"]
    t0, t = memory["lowered"]["seq_len"]
    assert t < t0 and memory["cut"] == {"n_sequences": [8, 8 * -(-t0 // t)]}
    assert b["data"]["positions"]["n_samples"] == a["data"]["positions"]["n_samples"] == 8 * 128
    page = (tmp_path / "b" / "report.html").read_text()
    assert "memory budget 3.0 MiB" in page and "8 sequences cut into up to" in page


def test_memory_budget_lowers_the_batch_size_and_the_header_says_so(tmp_path, capsys):
    """--memory: the batch size not set explicitly is halved until a batch of the counts' Jacobian
    pass fits (its estimate at 8 × 128 tokens is above the budget, at 4 × 128 below)."""
    import tl_degeneracy as tld
    from tl_degeneracy.memory import counts_held, estimate

    adapter = tld.adapt(tld.load_model("toy:bytelm"))
    held = counts_held(adapter)
    budget = estimate(adapter, "jacobian", 4, 128, n_cotangents=2, held=held) + 1
    assert estimate(adapter, "jacobian", 8, 128, n_cotangents=2, held=held) > budget
    out = tmp_path / "m"
    argv = ["report", "--out", str(out), "--quiet", "--only", "counts", "--memory", str(budget),
            "--set", "n_sequences=8", "n_probes=2"]
    assert main(argv) == 0
    report = _report(out)
    memory = report["settings"]["memory"]
    assert memory["budget"] == budget and memory["source"] == "the memory setting" and memory["fits"]
    # The setting is lowered (16, the preset's, of which 8 sequences fill one batch, → 4).
    assert memory["lowered"] == {"batch_size": [16, 4]} and report["settings"]["budgets"]["batch_size"] == 4
    assert report["sections"]["counts"]["status"] == "ok"
    assert report["sections"]["counts"]["settings"]["batch_size"] == 4
    printed = " ".join(capsys.readouterr().out.split())
    assert "memory budget" in printed and "lowered to fit: batch_size 16 → 4" in printed


def test_memory_budget_too_small_for_explicit_batches_fails_with_what_to_lower(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["report", "--out", str(out), "--quiet", "--only", "synchronization", "--memory", "1M",
            "--set", "n_sequences=8", "batch_size=8", "--seq-len", "128"]
    # a pass that does not fit fails (it applies; the budget stops it: audit 15b F12, exit 0 with
    # nothing computed) and the report is written
    assert main(argv) == 1
    report = _report(out)
    section = report["sections"]["synchronization"]
    assert section["status"] == "failed" and "MemoryBudgetError" in section["reason"] and section["traceback"] is None
    assert "lower batch_size (now 8) or seq_len (now 128)" in section["reason"]
    assert report["settings"]["memory"]["fits"] is False and not report["settings"]["memory"]["lowered"]
    printed = capsys.readouterr()
    assert "does NOT fit: the passes that exceed it fail" in " ".join(printed.out.split())
    assert "section(s) synchronization failed (synchronization: MemoryBudgetError" in " ".join(printed.err.split())
    # a section that does not apply, even the only one asked for, is skipped with exit 0 (README)
    assert main(["report", "--out", str(tmp_path / "sma"), "--quiet", "--model", "toy:sma", "--only", "counts"]) == 0
    assert _report(tmp_path / "sma")["sections"]["counts"]["status"] == "skipped"


def test_an_llc_that_does_not_fit_the_budget_fails_first_and_says_what_to_lower(tmp_path, capsys):
    """The LLC section checks its chains against the report's budget (issue 19) before sampling:
    failed, no traceback, exit 1, with the report settings to lower; the header says which passes
    are fitted and which are only checked, what the fit lowered and that the LLC still does not fit."""
    out = tmp_path / "llc"
    assert main(["report", "--out", str(out), "--quiet", "--only", "llc", "--memory", "2M"]) == 1
    section = _report(out)["sections"]["llc"]
    assert section["status"] == "failed" and "MemoryBudgetError" in section["reason"] and section["traceback"] is None
    assert "behavioral LLC with" in section["reason"] and "llc_sequences" in section["reason"]
    printed = " ".join(capsys.readouterr().out.split())
    assert "the LLC's chains are fitted to it; the interaction basis checks its passes against it" in printed
    assert "for the LLC's chains; lowered to fit: llc_params all → blocks.1.attn, llc_sequences 4 → 1" in printed
    assert "does NOT fit with what may be lowered: the LLC fails, saying what to lower" in printed


def test_default_memory_budget_is_stated(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["report", "--out", str(out), "--quiet", "--only", "summary"]) == 0
    memory = _report(out)["settings"]["memory"]
    assert memory["source"].startswith("50% of ") and memory["budget"] > 0 and "lowered" not in memory
    assert main(["report", "--out", str(out), "--quiet", "--memory", "lots"]) == 2
    assert "memory must be a size" in capsys.readouterr().err


def test_a_gguf_model_in_bfloat16_runs_every_section(tmp_path, tiny_gguf):
    """--dtype bfloat16 end to end on a GGUF Llama (GQA, gated MLP, rotary): the weights stay in
    bfloat16 and every section runs to finite numbers (the float64 accumulation of bfloat16
    activations and Jacobians is tested in test_stats.py and test_counts.py)."""
    path, _ = tiny_gguf
    tokens = tmp_path / "tokens.pt"
    torch.save(torch.randint(3, 100, (16, 12), generator=torch.Generator().manual_seed(0)), tokens)
    out = tmp_path / "bf16"
    argv = ["report", "--model", str(path), "--data", str(tokens), "--dtype", "bfloat16", "--out", str(out), "--quiet",
            *TINY, "ib_tokens=48", "ib_seq_len=12"]
    assert main(argv) == 0
    report = _report(out)
    assert report["model"]["dtype"] == "bfloat16"
    status = {name: s["status"] for name, s in report["sections"].items()}
    assert status == {s: "ok" for s in SECTIONS}, {n: s.get("reason") for n, s in report["sections"].items()
                                                  if s["status"] != "ok"}
    llc = report["sections"]["llc"]["values"]
    assert math.isfinite(llc["llc"]) and llc["llc"] > 0 and math.isfinite(llc["llc_stderr"])
    rows = report["sections"]["activations"]["tables"]["hooks"]["records"]
    assert all(r["count"] == 16 * 12 and 0 < r["rank"] <= r["dim"] for r in rows)
    counts = report["sections"]["counts"]["values"]
    assert 0 < counts["n_eff_kfac"] <= counts["n_params"]


def test_text_that_is_not_utf8_is_read_with_a_warning(tmp_path):
    from tl_degeneracy.report.context import load_data_spec

    path = tmp_path / "latin1.txt"
    path.write_bytes("def f(): return 'café'\n".encode("latin-1") * 20)
    with pytest.warns(UserWarning, match="20 byte sequence"):
        loaded = load_data_spec(path)
    assert "\ufffd" in loaded.data[0]


def test_an_unreadable_tensor_file_does_not_advise_unsafe_loading(tmp_path, capsys):
    path = tmp_path / "tokens.pt"
    path.write_bytes(b"not a tensor file")
    assert main(["report", "--data", str(path), "--out", str(tmp_path / "x"), "--quiet", "--only", "activations"]) == 2
    err = capsys.readouterr().err
    assert "cannot read it as a file of one torch tensor" in err and "weights_only=False" not in err


def test_files_that_are_not_text_are_not_read_as_text(tmp_path):
    """Audit 12a F3: any file that was not .pt/.pth (in lower case) was read as text: a .json of 512
    token ids ran as 19 sequences of text, a .npy's only word was to re-encode it as UTF-8."""
    import numpy as np

    from tl_degeneracy.errors import DataError
    from tl_degeneracy.report.context import load_data_spec

    (tmp_path / "ids.json").write_text(json.dumps(list(range(512))))
    np.save(tmp_path / "ids.npy", np.arange(512))
    (tmp_path / "noise.dat").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "utf16.txt").write_text("some text\n" * 4, encoding="utf-16")
    for name, words in (("ids.json", "a JSON file"), ("ids.npy", "a NumPy file"), ("noise.dat", "NUL bytes"),
                        ("blank.txt", "only whitespace"), ("utf16.txt", "UTF-16 text; re-encode it as UTF-8")):
        with pytest.raises(DataError, match=words):
            load_data_spec(tmp_path / name)
    torch.save(torch.randint(0, 20, (2, 8)), tmp_path / "IDS.PT")  # a tensor file whatever the suffix's case
    assert load_data_spec(tmp_path / "IDS.PT").source.startswith("tensor file")


@pytest.mark.parametrize("argv, message", [(["--seed", str(2**64)], "seed must be an integer in [0, 2**63)"),
                                           (["--memory", "1e309"], "memory must be a positive, finite size")])
def test_seeds_and_sizes_out_of_range_are_refused_clearly(tmp_path, capsys, argv, message):
    """Audit 16b F6: raw OverflowError tracebacks."""
    assert main(["report", "--out", str(tmp_path / "r"), "--quiet", "--only", "summary", *argv]) == 2
    assert message in capsys.readouterr().err


def test_progress_bars_are_off_without_a_terminal_and_the_section_lines_stay(tmp_path, capsys, monkeypatch):
    """Audit 23c F5: without a terminal (a log, a pipe) every redraw of a progress bar was kept, hundreds
    of lines with cursor codes; there the bars are off, the section lines stay, and the environment is
    left as it was."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main(["report", "--out", str(tmp_path / "r"), "--model", "toy:sma", "--only", "summary", "activations",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "[1/2] Model summary …" in err and "batch/s" not in err and "\x1b[A" not in err
    assert "TQDM_DISABLE" not in os.environ
