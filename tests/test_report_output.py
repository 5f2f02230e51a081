"""The output directory and the errors of ``tl-degeneracy report`` (issue 17).

A directory holds one model on one data set computed by one package version: another one is refused
before any work (exit 2, naming what is there and the way out), ``--fresh`` replaces it whole, and a
partial rerun (``--only``) of the same one keeps the finished sections. Bad input — an option, a
device, an --out, a damaged checkpoint, non-finite weights, text for a model without a tokenizer —
exits 2 with one paragraph saying what to do, before anything is computed.
"""

import json
import shutil
import warnings

import pandas as pd
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.cli import main
from tl_degeneracy.report import Report, SectionResult, degeneracy_report
from tl_degeneracy.report.report import ReportDirectoryError

#: Weights-only sections: no data read, no sampling (a fraction of a second on the bundled toys).
CHEAP = ["--only", "summary", "invariants"]


def _run(out, *argv):
    return main(["report", "--out", str(out), "--quiet", *argv])


def _stored(out):
    return json.loads((out / "report.json").read_text())


def _csvs(out):
    return {p.name for p in out.glob("*.csv")}


def _listed_csvs(out):
    return {t["csv"] for s in _stored(out)["sections"].values() for t in s["tables"].values()}


def _one_paragraph(err: str) -> str:
    """The error as printed: one line on stderr, no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tl-degeneracy: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------- directory
@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_a_directory_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys, fresh):
    out = tmp_path / "mine"
    out.mkdir()
    files = {"report.html": b"<p>my notes</p>", "activations_hooks.csv": b"a,b\n1,2\n", "notes.txt": b"x"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    assert _run(out, "--model", "toy:sma", *CHEAP, *fresh) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "not a tl-degeneracy report" in err and "activations_hooks.csv" in err and "new or empty --out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_a_checkpoints_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys, fresh):
    """Audit 10b F5: a directory holding only a folder called checkpoints/ was taken for the report's own
    (a common name for a training run's output), and --fresh deleted files in it (sections/…, folders
    named like a section's checkpoints). Only what the report writes there is its own."""
    out = tmp_path / "mine"
    files = {"checkpoints/other.pt": b"weights", "checkpoints/sections/mine.txt": b"notes"}
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    assert _run(out, "--model", "toy:sma", *CHEAP, *fresh) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "not a tl-degeneracy report (checkpoints/other.pt, checkpoints/sections/mine.txt)" in err
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # The report's own checkpoints (an interrupted first run) are no reason to refuse.
    ours = tmp_path / "ours"
    assert _run(ours, "--model", "toy:sma", *CHEAP) == 0
    assert (ours / "checkpoints" / "sections" / "summary.json").is_file()
    for path in ours.iterdir():
        if path.is_file():
            path.unlink()
    assert _run(ours, "--model", "toy:sma", *CHEAP, *fresh) == 0


def test_fresh_deletes_only_the_csvs_beside_the_report(tmp_path, capsys):
    """Audit 10b F6: --fresh deleted every CSV path report.json lists, also '../x.csv' outside --out."""
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    stored = _stored(out)
    table = next(t for sec in stored["sections"].values() for t in sec["tables"].values())
    own, table["csv"] = table["csv"], "../outside.csv"
    (out / "report.json").write_text(json.dumps(stored))
    (tmp_path / "outside.csv").write_text("a\n1\n")
    # The report's own CSV, no longer listed, is not known as its own (audit 20a F5): refused, kept.
    assert _run(out, "--model", "toy:bytelm", *CHEAP, "--fresh") == 2
    assert own in capsys.readouterr().err and (out / own).exists() and _stored(out) == stored
    (out / own).unlink()
    assert _run(out, "--model", "toy:bytelm", *CHEAP, "--fresh") == 0
    assert (tmp_path / "outside.csv").read_text() == "a\n1\n"


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
@pytest.mark.parametrize("own", ['{"my": "own data"}', "{not json", '["tl-degeneracy-report/1"]'])
def test_a_report_json_that_is_not_ours_is_refused_also_with_fresh(tmp_path, capsys, fresh, own):
    """A report.json without the report's format marker (or not JSON) is the user's file, as any other:
    --fresh replaces a report, never it, and the message does not point at --fresh."""
    out = tmp_path / "mine"
    out.mkdir()
    files = {"report.json": own.encode(), "report.html": b"<p>my notes</p>", "llc_my_measurements.csv": b"a\n1\n"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    assert _run(out, "--model", "toy:sma", *CHEAP, *fresh) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert f"{out} holds a report.json that is not a tl-degeneracy report" in err and "new or empty --out" in err
    assert "--fresh" not in err and "fresh=True" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing deleted, nothing written
    with pytest.raises(ReportDirectoryError, match="not a tl-degeneracy report"):
        Report.check_directory(out, None, replace=True)


def test_a_truncated_report_json_beside_our_checkpoints_says_how_to_recover(tmp_path, capsys):
    """Audit 23c F3: report.json cut short from outside, beside the run's own cached sections, was
    called "not a tl-degeneracy report" with no way back; the message now says that deleting it
    recovers the directory, whose finished sections are reused (and nothing is deleted for the user)."""
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    text = (out / "report.json").read_text()
    (out / "report.json").write_text(text[:300])
    assert _run(out, "--model", "toy:sma", *CHEAP) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "not a tl-degeneracy report (JSONDecodeError" in err and "delete it, report.html and the report's CSVs" in err
    assert (out / "report.json").read_text() == text[:300]
    for path in [out / "report.json", out / "report.html", *out.glob("*.csv")]:
        path.unlink()
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    assert all(s["cached"] for s in _stored(out)["sections"].values())


def test_the_same_model_in_another_dtype_is_refused_naming_the_dtypes(tmp_path, capsys):
    """Audit 23c F4: the model loaded with another --dtype is another model (other numbers) but was
    named twice alike; the refusal names the dtypes."""
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    assert _run(out, "--model", "toy:sma", *CHEAP, "--dtype", "float64") == 2
    assert "its weights in float32 there and float64 now" in _one_paragraph(capsys.readouterr().err)


def test_fresh_over_a_damaged_report_of_ours_replaces_it_and_deletes_no_csv(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"format": "tl-degeneracy-report/1", "sections": 3}))
    (out / "llc_my_measurements.csv").write_text("a\n1\n")
    assert _run(out, "--model", "toy:sma", *CHEAP) == 2  # ours but unreadable: refused without --fresh
    err = _one_paragraph(capsys.readouterr().err)
    assert "holds a tl-degeneracy report.json that cannot be read (KeyError" in err and "--fresh" in err
    assert _run(out, "--model", "toy:sma", *CHEAP, "--fresh") == 0
    assert (out / "llc_my_measurements.csv").read_text() == "a\n1\n"  # it lists no tables: no CSV is its
    assert _stored(out)["model"]["label"] == "toy:sma"


def test_another_model_is_refused_and_fresh_replaces_the_report_whole(tmp_path, capsys):
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    assert _run(out, "--model", "toy:modadd", *CHEAP) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "holds the report of toy:sma" in err and "model toy:sma" in err and "toy:modadd" in err
    assert "--fresh" in err and "another --out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing written

    assert _run(out, "--model", "toy:modadd", *CHEAP, "--fresh") == 0
    stored = _stored(out)
    assert stored["model"]["label"] == stored["identity"]["model"]["label"] == "toy:modadd"
    assert _csvs(out) == _listed_csvs(out)  # no CSV of toy:sma's report is left beside it
    ov = pd.read_csv(out / "invariants_ov.csv")
    assert len(ov) == stored["sections"]["invariants"]["values"]["ov"]["heads"]


def test_the_report_records_what_it_belongs_to(tmp_path):
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", "--only", "summary", "activations", "--set", "n_sequences=8") == 0
    identity = _stored(out)["identity"]
    ctx_digest = tld.report.context.ReportContext(
        label="toy:sma", adapter=tld.adapt(tld.load_model("toy:sma")), settings=tld.report.PRESETS["quick"],
    ).model_digest
    assert identity["model"] == {"label": "toy:sma", "digest": ctx_digest, "dtype": "float32"}
    assert identity["tl-degeneracy"] == tld.__version__
    # The data set is the toy's whole data, hashed as given: a budget takes a share of it, the digest
    # does not depend on the budget.
    from tl_degeneracy.llc.targets import tensor_digest

    assert identity["data"] == {"source": "toy:sma", "digest": tensor_digest([("tokens", tld.toy_data("sma"))])}


def test_the_model_digest_sees_the_config_the_buffers_and_hooks_not_only_the_weights(hf_dirs, tmp_path):
    """Audit 20a F1: the digest (the cache's key and the directory's identity) was the weights' alone,
    so a rerun after a config.json changed the activation, or with a permanent ablation hook, reused
    the old sections (2 synchronized neuron blocks where the changed model has 9)."""
    from tl_degeneracy.report.context import ReportContext

    def digest(model):
        return ReportContext(label="m", adapter=tld.adapt(model), settings=tld.report.PRESETS["quick"]).model_digest

    model = tld.load_model(hf_dirs["llama"], device="cpu")
    plain = digest(model)
    assert digest(tld.load_model(hf_dirs["llama"], device="cpu")) == plain  # the same model, the same digest
    model.blocks[0].hook_resid_pre.add_hook(lambda act, hook: act * 0, is_permanent=True)
    hooked = digest(model)
    model.reset_hooks(including_permanent=True)
    assert hooked != plain and digest(model) == plain
    config = json.loads((hf_dirs["llama"] / "config.json").read_text())
    rope = ({"rope_parameters": {**config["rope_parameters"], "rope_theta": 10.0}} if "rope_parameters" in config
            else {"rope_theta": 10.0})  # transformers 5 keeps it in rope_parameters
    for key, change in (("act", {"hidden_act": "gelu"}), ("rope", rope)):  # the same weights, another function
        changed = tmp_path / key
        shutil.copytree(hf_dirs["llama"], changed)
        (changed / "config.json").write_text(json.dumps({**config, **change}))
        assert digest(tld.load_model(changed, device="cpu")) not in (plain, hooked), key


def test_a_section_is_recomputed_under_other_library_versions(monkeypatch):
    """Audit 20a F2: after a torch or TransformerLens upgrade the sections were reused as cached."""
    from tl_degeneracy.report import cache
    from tl_degeneracy.report.context import ReportContext
    from tl_degeneracy.report.registry import SECTIONS

    ctx = ReportContext(label="m", adapter=tld.adapt(tld.load_model("toy:sma")), settings=tld.report.PRESETS["quick"])
    before = cache.fingerprint(SECTIONS["invariants"], ctx)
    monkeypatch.setattr(cache, "library_versions", lambda: {"torch": "99.0"})
    assert cache.fingerprint(SECTIONS["invariants"], ctx) != before


def test_a_save_cut_short_says_so_until_it_is_completed(tmp_path, monkeypatch):
    """Audit 20a F3: a save interrupted after report.json left its new numbers beside an earlier run's
    CSVs and report.html, and nothing said so. report.json now says it is being written until the
    rest is, and reading it warns."""
    from tl_degeneracy.report import html

    identity = {"model": {"label": "a", "digest": "1" * 64}, "data": None, "tl-degeneracy": tld.__version__}
    _report(identity, ["one"]).save(tmp_path)

    def interrupted(report):
        raise KeyboardInterrupt

    monkeypatch.setattr(html, "render_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _report(identity, ["one", "two"]).save(tmp_path)
    assert _stored(tmp_path)["incomplete"] is True
    with pytest.warns(RuntimeWarning, match="was being saved when its run stopped"):
        Report.load(tmp_path)
    monkeypatch.undo()
    _report(identity, ["one", "two"]).save(tmp_path)  # the rerun completes it
    assert "incomplete" not in _stored(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Report.load(tmp_path)
    # Cut short before a table that went away was deleted: a rerun knows it as the report's own, to
    # write again or to delete.
    from tl_degeneracy.report import report as report_module

    write = report_module.write_atomic

    def killed_at_the_first_csv(path, text):
        if path.suffix == ".csv":
            raise KeyboardInterrupt
        write(path, text)

    for tables in (["one", "two"], ["one"]):
        monkeypatch.setattr(report_module, "write_atomic", killed_at_the_first_csv)
        with pytest.raises(KeyboardInterrupt):
            _report(identity, ["one"]).save(tmp_path)
        monkeypatch.undo()
        assert _csvs(tmp_path) == {"summary_one.csv", "summary_two.csv"} != _listed_csvs(tmp_path)
        _report(identity, tables).save(tmp_path)
        assert _csvs(tmp_path) == {f"summary_{t}.csv" for t in tables} == _listed_csvs(tmp_path)


def test_other_data_is_refused_but_another_budget_on_the_same_data_is_not(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["--model", "toy:sma", "--only", "activations"]
    assert _run(out, *argv, "--set", "n_sequences=8") == 0
    assert _run(out, *argv, "--set", "n_sequences=16") == 0  # the same data set, a larger share of it
    assert _stored(out)["sections"]["activations"]["tables"]["hooks"]["records"][0]["count"] == 16 * 12
    other = tmp_path / "other.pt"
    torch.save(tld.toy_data("sma")[100:116], other)
    capsys.readouterr()
    assert _run(out, *argv, "--data", str(other)) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "data toy:sma" in err and f"tensor file {other}" in err and "--fresh" in err


def test_another_package_version_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    monkeypatch.setattr(tld, "__version__", tld.__version__ + ".post1")
    capsys.readouterr()
    assert _run(out, "--model", "toy:sma", *CHEAP) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert f"tl-degeneracy {tld.__version__.removesuffix('.post1')} there, {tld.__version__} now" in err


def test_a_partial_rerun_keeps_the_finished_sections(tmp_path):
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", "--only", "summary", "parameters", "invariants") == 0
    full = _stored(out)
    csvs = _csvs(out)
    assert _run(out, "--model", "toy:sma", "--only", "summary") == 0
    merged = _stored(out)
    assert list(merged["sections"]) == ["summary", "parameters", "invariants"]
    for name in ("parameters", "invariants"):  # the same results, now marked as this run's elders
        assert merged["sections"][name] == {**full["sections"][name], "kept": True}
    assert _csvs(out) == csvs == _listed_csvs(out)
    page = (out / "report.html").read_text()
    assert all(f'id="sec-{name}"' in page for name in ("summary", "parameters", "invariants"))
    # A section the rerun needs data for adds its data to the report; the weight sections stay.
    assert _run(out, "--model", "toy:sma", "--only", "activations", "--set", "n_sequences=8") == 0
    again = _stored(out)
    assert list(again["sections"]) == ["summary", "parameters", "invariants", "activations"]
    assert again["data"]["source"] == again["identity"]["data"]["source"] == "toy:sma"
    # A section kept from a run with other data settings says so; the header describes this run.
    assert _run(out, "--model", "toy:sma", "--only", "summary", "--set", "n_sequences=16") == 0
    report = Report.load(out)
    assert report.settings_apart(report["activations"]) == {"n_sequences": 8}
    assert report.settings_apart(report["summary"]) == {}
    assert "than the header's (an earlier run into this directory): n_sequences=8" in report.summary(width=200)
    assert "an earlier run into this directory): n_sequences=8" in (out / "report.html").read_text()


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_a_users_file_under_a_report_tables_name_is_refused_and_kept(tmp_path, capsys, fresh):
    # Audit 20a F5: a CSV the report does not list, under a name it writes, was overwritten silently.
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", "--only", "summary") == 0
    mine = out / "parameters_live.csv"
    mine.write_text("my,own\n1,2\n")
    (out / "notes.csv").write_text("kept\n")  # no section's name: no concern of the report
    before = _stored(out)
    # Refused before any work (review 50: at the save, after --fresh had cleared the finished sections)
    assert _run(out, "--model", "toy:sma", "--only", "parameters", *fresh) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "parameters_live.csv" in err and "may overwrite" in err and "notes.csv" not in err
    assert mine.read_text() == "my,own\n1,2\n" and _stored(out) == before  # nothing written, nothing deleted
    assert not (out / "checkpoints" / "sections" / "parameters.json").exists()  # nothing computed
    mine.rename(out / "parameters_mine.csv")  # any table name of a section it runs may be the report's next
    assert _run(out, "--model", "toy:sma", "--only", "parameters", *fresh) == 2
    assert "parameters_mine.csv" in capsys.readouterr().err
    (out / "parameters_mine.csv").unlink()
    assert _run(out, "--model", "toy:sma", "--only", "parameters", *fresh) == 0
    assert "parameters_live.csv" in _listed_csvs(out) and (out / "notes.csv").read_text() == "kept\n"


def test_sections_are_listed_in_report_order_whatever_the_order_asked(tmp_path):
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", "--only", "invariants", "summary") == 0
    assert list(_stored(out)["sections"]) == ["summary", "invariants"]


def test_sections_kept_from_an_earlier_run_say_so_and_name_its_seed(tmp_path):
    """Audit 15b: a rerun with another seed (``--only activations --seed 1``) kept seed 0's counts
    section under a header saying seed 1, unflagged and with its old time; a fresh report flagged its
    own interaction section ("n_probes=none", the basis's own setting of that name); the notebook
    view left the flag out; every section warning reached the terminal twice."""
    out = tmp_path / "rep"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run(out, "--model", "toy:modadd", "--only", "counts", "activations", "interaction",
                    "--set", "n_sequences=8", "ib_tokens=64", "ib_probes=8") == 0
    assert not [w for w in caught if str(w.message).startswith("report section ")]  # the summary has them
    fresh = Report.load(out)
    assert all(fresh.settings_apart(sec) == {} and not sec.kept for sec in fresh.sections.values())
    assert _run(out, "--model", "toy:modadd", "--only", "activations", "--seed", "1", "--set", "n_sequences=8",
                "ib_tokens=64", "ib_probes=8") == 0
    report = Report.load(out)
    assert [n for n, sec in report.sections.items() if sec.kept] == ["counts", "interaction"]
    assert report.settings_apart(report["counts"]) == report.settings_apart(report["interaction"]) == {"seed": 0}
    assert report.settings_apart(report["activations"]) == {}
    text = report.summary(width=200)
    assert "counts               kept" in text and "(an earlier run into this directory): seed=0" in text
    assert "(an earlier run into this directory): seed=0" in report._repr_html_()
    # the page's header names the seed and where the data came from, as the terminal's does
    page = (out / "report.html").read_text()
    assert "quick, seed 1" in page and f"{report.data['source']}: 8 sequences" in page


def _report(identity, tables):
    section = SectionResult(name="summary", title="Model summary", status="ok", headline="h",
                            tables={k: pd.DataFrame({"x": [1.0, 2.0]}) for k in tables})
    return Report(model={"label": identity["model"]["label"]}, data=None,
                  settings={"preset": "quick", "seed": 0, "sections": ["summary"]}, versions={}, created="now",
                  wall_s=0.0, sections={"summary": section}, identity=identity)


def test_save_merges_the_same_identity_and_refuses_another(tmp_path):
    a = {"model": {"label": "a", "digest": "1" * 64}, "data": None, "tl-degeneracy": tld.__version__}
    _report(a, ["one", "two"]).save(tmp_path)
    assert _csvs(tmp_path) == {"summary_one.csv", "summary_two.csv"}
    _report(a, ["one"]).save(tmp_path)  # a rerun of the section: its table that went away goes too
    assert _csvs(tmp_path) == {"summary_one.csv"} == _listed_csvs(tmp_path)
    b = {**a, "model": {"label": "b", "digest": "2" * 64}}
    with pytest.raises(ReportDirectoryError, match=r"holds the report of a.*model a \(sha256 111111111111 of its "
                                                   r"weights, config and hooks\) there, b \(222222222222\) now"):
        _report(b, ["three"]).save(tmp_path)
    _report(b, ["three"]).save(tmp_path, replace=True)
    assert _csvs(tmp_path) == {"summary_three.csv"} and Report.load(tmp_path).identity == b
    legacy = _stored(tmp_path)
    del legacy["identity"]  # written before reports recorded one
    (tmp_path / "report.json").write_text(json.dumps(legacy))
    with pytest.raises(ReportDirectoryError, match="records no identity"):
        _report(b, ["three"]).save(tmp_path)


# ------------------------------------------------------------------------------------- bad input
def test_a_bad_llc_component_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "rep"
    for components, message in ((["bogus"], "llc_components ['bogus']"), (["blocks.7.attn"], "blocks.7")):
        assert _run(out, "--model", "toy:sma", "--only", "summary", "llc", "--llc-components", *components) == 2
        err = _one_paragraph(capsys.readouterr().err)
        assert message in err
    assert not (out / "report.json").exists() and not (out / "checkpoints").exists()  # the LLC never ran


def test_a_bad_llc_params_setting_is_named_before_any_work(tmp_path, capsys):
    # Audit 20a F5: the message came from deep in the time fit, without the setting's name.
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", "--only", "summary", "llc", "--set", "llc_params=blocks.9.attn") == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "report setting llc_params='blocks.9.attn'" in err and "layer 9 out of range" in err
    assert not out.exists()


def test_a_device_the_machine_lacks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(tmp_path / "rep", "--device", "cuda", *CHEAP) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "--device 'cuda': this machine has no usable CUDA device" in err and "use device cpu" in err
    assert _run(tmp_path / "rep", "--device", "gpu", *CHEAP) == 2
    assert "is not a device" in _one_paragraph(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(tmp_path / "rep", "--device", "cuda", "--debug", *CHEAP) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tl-degeneracy: error: --device")


def test_an_out_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert _run(blocker / "rep", *CHEAP) == 2  # root may write anywhere, but not below a file
    err = _one_paragraph(capsys.readouterr().err)
    assert f"the output directory {blocker / 'rep'} cannot be written" in err and "another --out" in err
    assert f"{blocker} is a file, not a directory" in err  # audit 20a F5: it read "(File exists)"
    assert _run(blocker, *CHEAP) == 2
    assert f"{blocker} is a file, not a directory" in _one_paragraph(capsys.readouterr().err)
    assert blocker.read_text() == "not a directory"


@pytest.mark.filterwarnings("ignore:report section 'llc'")  # chains this short warn about their bias bound
def test_a_damaged_checkpoint_is_named_and_fresh_starts_afresh(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["--model", "toy:sma", "--only", "llc", "--set", "chains=2", "draws=6", "burnin=2", "pilot_steps=3",
            "loss_scales=1e-3", "llc_sequences=2", "llc_max_draws=6"]  # one block: no drawing on until the time limit
    assert _run(out, *argv) == 0
    (ckpt,) = out.glob("checkpoints/llc-*/default/llc-rank0.pt")
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # a truncated copy, as a full disk leaves it
    (out / "checkpoints" / "sections" / "llc.json").unlink()  # so that the LLC must resume
    capsys.readouterr()
    assert _run(out, *argv) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert f"the checkpoint {ckpt} is damaged" in err and "--fresh" in err
    assert _run(out, *argv, "--fresh") == 0
    assert _stored(out)["sections"]["llc"]["status"] == "ok"


@pytest.mark.filterwarnings("ignore:report section 'llc'")
def test_a_resumed_llc_says_so(tmp_path):
    """Audit 16b F11: nothing recorded that the LLC's chains were taken up from a checkpoint."""
    out = tmp_path / "rep"
    argv = ["--model", "toy:sma", "--only", "llc", "--set", "chains=2", "draws=6", "burnin=2", "pilot_steps=3",
            "loss_scales=1e-3", "llc_sequences=2", "llc_max_draws=6"]
    assert _run(out, *argv) == 0
    first = _stored(out)["sections"]["llc"]
    assert first["values"]["diagnostics"]["resumed_at_step"] is None
    (out / "checkpoints" / "sections" / "llc.json").unlink()  # as an interruption after the chains leaves it
    assert _run(out, *argv) == 0
    again = _stored(out)["sections"]["llc"]
    assert again["values"]["diagnostics"]["resumed_at_step"] == 8
    # its chains had finished: read back, nothing sampled again (review 40: it was called resumed mid-run)
    assert again["values"]["diagnostics"]["steps_done"] == 8
    assert any("read back from its checkpoint, finished (8 steps)" in n for n in again["notes"])


def _nan_toy(monkeypatch):
    """Make load_model give toy:sma with one NaN in blocks.0.attn.W_V (as a diverged run leaves it)."""
    from tl_degeneracy.models import loading

    real = loading.load_model

    def load(spec, *args, **kwargs):
        model = real(spec, *args, **kwargs)
        with torch.no_grad():
            model.blocks[0].attn.W_V.view(-1)[3] = float("nan")
        return model

    monkeypatch.setattr(loading, "load_model", load)
    return load


def test_non_finite_weights_are_named_before_any_section_runs(tmp_path, capsys, monkeypatch):
    load = _nan_toy(monkeypatch)
    assert _run(tmp_path / "rep", "--model", "toy:sma", *CHEAP) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert "parameter blocks.0.attn.W_V [1, 32, 32] holds 1 NaN and 0 ±inf entries" in err
    assert not (tmp_path / "rep" / "report.json").exists()
    with pytest.raises(tld.NumericalError, match="blocks.0.attn.W_V"):
        degeneracy_report(load("toy:sma"), sections=["summary"], progress=False)


@pytest.fixture
def hf_dir_without_tokenizer(hf_dirs, tmp_path):
    keep = {"config.json", "generation_config.json", "model.safetensors"}
    out = tmp_path / "tiny_gpt2_weights_only"
    shutil.copytree(hf_dirs["gpt2"], out, ignore=lambda d, names: [n for n in names if n not in keep])
    return out


def test_text_for_a_model_without_a_tokenizer_is_refused(hf_dir_without_tokenizer, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("w3 w4 w5 w6 " * 40)
    model = str(hf_dir_without_tokenizer)
    assert _run(tmp_path / "rep", "--model", model, "--data", str(text), "--only", "activations") == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert f"the model directory {model!r} has no tokenizer" in err and "tokenizer.save_pretrained" in err
    assert ".pt file" in err
    tokens = tmp_path / "tokens.pt"
    torch.save(torch.randint(3, 100, (4, 16)), tokens)  # token ids need no tokenizer
    assert _run(tmp_path / "rep", "--model", model, "--data", str(tokens), "--only", "activations") == 0


def test_bad_data_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from tl_degeneracy.models import loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loading, "load_model", never)
    assert _run(tmp_path / "rep", "--data", str(tmp_path / "missing.txt")) == 2
    assert "no such file" in _one_paragraph(capsys.readouterr().err)


def test_an_llc_whose_chains_all_diverge_exits_1_with_the_reason(tmp_path, capsys):
    """Audit 8a: every chain diverging was "skipped" with exit 0; it is a failed measurement."""
    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", "--only", "llc", "--set", "chains=2", "draws=10", "burnin=2",
                "pilot_steps=2", "loss_scales=1e-3", "llc_max_draws=10", "step_size=100") == 1
    err = capsys.readouterr().err
    assert "section(s) llc failed (llc: EstimateFailedError: λ̂(ε = 0.001, γ = 1): all 2 chains diverged" in err and "reduce step_size" in err
    assert _stored(out)["sections"]["llc"]["status"] == "failed"


def test_under_torchrun_every_rank_runs_rank_0s_settings_and_one_writes_the_report(tmp_path):
    """Audit 10b F2/F3: each rank fitted the LLC's scope to its own timing (one restricted it, the
    other did not, and their chains were pooled into one λ̂ each labelled otherwise), and every rank
    saved into one directory, where one refused the other's CSVs at the very end (exit 1). Rank 1's
    fit is made to restrict the LLC here: both ranks run rank 0's scope, and the job writes one report."""
    from tests.fixtures.distributed import run_two_processes

    from tests.report_distributed_worker import BUDGET

    run_two_processes("report_distributed_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    failed = [r.pop("failed") for r in ranks]
    assert ranks[0] == ranks[1] and ranks[0]["llc_params"] is None
    # Review 32: rank 0's fit checked against each rank's own budget let one rank skip a pass that the
    # other ran, which then waited in its collectives: one budget, the smallest.
    assert ranks[0]["budget"] == BUDGET
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["settings"]["budgets"]["llc_params"] is None
    # Review 32: a write failing on rank 0 left the other ranks in a barrier; now every rank raises.
    assert failed[0].startswith("FileNotFoundError") and failed[1].startswith(
        "TLDegeneracyError: rank 0 failed writing files all ranks share (FileNotFoundError")


def test_under_torchrun_a_section_failing_on_one_rank_fails_on_every_rank(tmp_path):
    """Audit 16b F1's remainder: a section whose code failed on rank 1 only was recorded as failed
    there while rank 0 ran it on, and rank 1 went on to the next section: their collectives no longer
    paired up (a hang, or one rank's objects read as another's). Now both record it as failed, naming
    rank 1, and run the next section together; the report written says so."""
    from tests.fixtures.distributed import run_two_processes

    run_two_processes("report_distributed_worker.py", tmp_path, "--llc-fails-on-rank-1")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["llc"] == ["failed", "RuntimeError: this rank's LLC failed (simulated)"]
    assert ranks[0]["llc"] == ["failed", "RuntimeError: rank 1 of 2 failed with RuntimeError: this rank's LLC "
                                         "failed (simulated)"]
    assert ranks[0]["summary"] == ranks[1]["summary"] == ["ok", None]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["sections"]["llc"]["status"] == "failed" and "rank 1 of 2" in saved["sections"]["llc"]["reason"]


def test_under_torchrun_a_report_failing_on_one_rank_outside_its_sections_fails_on_every_rank(tmp_path):
    """Review 41: rank 1 failed in the report's own code (its output directory refused) and rank 0
    heard of it inside the first section, recorded it as that section's failure and went on alone,
    waiting for good. Every rank enters a section together now: both raise from the report."""
    from tests.fixtures.distributed import run_two_processes

    run_two_processes("report_distributed_worker.py", tmp_path, "--fails-before-the-sections-on-rank-1")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1] == {"error": "ReportDirectoryError", "message": "this rank's output directory is refused (simulated)"}
    assert ranks[0] == {"error": "ReportDirectoryError", "message": "rank 1 of 2 failed with ReportDirectoryError: this "
                                                                    "rank's output directory is refused (simulated)"}


def test_a_save_interrupted_after_report_json_leaves_a_directory_a_rerun_takes(tmp_path, capsys, monkeypatch):
    """Review 32: the save wrote the CSVs before report.json, so one killed in between left the report's
    own CSVs beside no report.json, which every rerun (--fresh included) refused as foreign files."""
    from tl_degeneracy.report import report as report_module

    out = tmp_path / "rep"
    write = report_module.write_atomic

    def killed_at_the_first_csv(path, text):
        if path.suffix == ".csv":
            raise KeyboardInterrupt
        write(path, text)

    monkeypatch.setattr(report_module, "write_atomic", killed_at_the_first_csv)
    with pytest.raises(KeyboardInterrupt):
        degeneracy_report("toy:sma", sections=["summary", "invariants"], out=out, progress=False)
    monkeypatch.setattr(report_module, "write_atomic", write)
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    assert _csvs(out) == _listed_csvs(out)


def test_damaged_cached_sections_are_recomputed_and_fresh_keeps_a_users_files(tmp_path, capsys, monkeypatch):
    """Audit 16b: a cached section with its fingerprint but a broken result gave a raw traceback (F5),
    --fresh deleted a user's file inside a section's checkpoint folder (F9), and a cache write cut short
    by a full disk left its temporary file (F10)."""
    from tl_degeneracy.report import cache

    out = tmp_path / "rep"
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    cached = out / "checkpoints" / "sections" / "invariants.json"
    stored = json.loads(cached.read_text())
    cached.write_text(json.dumps({"fingerprint": stored["fingerprint"], "result": {"broken": 1}}))
    assert _run(out, "--model", "toy:sma", *CHEAP) == 0
    assert _stored(out)["sections"]["invariants"]["status"] == "ok" and not _stored(out)["sections"]["invariants"].get("cached")
    mine = out / "checkpoints" / "invariants-0123456789ab" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    (mine.parent / "llc-rank0.pt").write_bytes(b"ours")
    assert _run(out, "--model", "toy:sma", *CHEAP, "--fresh") == 0
    assert mine.read_text() == "mine" and not (mine.parent / "llc-rank0.pt").exists()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", full_disk)  # os.replace itself: every write of the run fails
    capsys.readouterr()
    assert _run(tmp_path / "full", "--model", "toy:sma", *CHEAP) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not list((tmp_path / "full").rglob("*.tmp-*"))
