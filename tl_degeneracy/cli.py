"""``tl-degeneracy``: the command line.

``tl-degeneracy report`` runs ``tld.report.degeneracy_report`` on a model and dataset and writes
report.json, report.html and one CSV per table to a directory. With no arguments it uses the bundled
default model (``toy:bytelm``) on its bundled held-out text, offline. Reruns into the same
directory reuse finished sections and resume interrupted LLC runs from ``<out>/checkpoints``.

``tl-degeneracy compare DIR_A DIR_B`` writes comparison.html (the two reports side by side) and
comparison.csv (``tld.compare_reports``) to ``--out``, by default ``compare-<A>-vs-<B>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import warnings
from pathlib import Path

DEFAULT_MODEL = "toy:bytelm"
#: Section names, in report order (kept here so that ``--help`` needs no heavy imports; a test
#: checks it against the report's registry).
SECTIONS = ("summary", "parameters", "invariants", "synchronization", "counts", "activations", "interaction", "llc", "sparsity")
PRESETS = ("quick", "thorough")

EXAMPLES = """examples:
  tl-degeneracy report                                  # toy:bytelm on its bundled text → reports/default/
  tl-degeneracy report --model toy:sma --out out/sma    # another bundled model
  tl-degeneracy report --model ./my-hf-dir --data corpus.txt --device cpu
  tl-degeneracy report --model smollm2.gguf --data tokens.pt --only summary invariants
  tl-degeneracy report --model smollm2.gguf --data corpus.txt --memory 8G   # batches sized to 8 GiB
  tl-degeneracy report --model smollm2.gguf --data corpus.txt --dtype bfloat16
  tl-degeneracy report --set llc_params=blocks.3.attn section_time=none   # a restricted LLC, no time fit
  tl-degeneracy report --preset thorough --llc-components heads
  tl-degeneracy report --set draws=400 chains=8 loss_scales=1e-2,1e-3,1e-4
  tl-degeneracy compare reports/a reports/b            # two reports side by side → compare-a-vs-b/

presets: quick (default; a few minutes on toy:bytelm with 2 CPU cores; on large models the interaction
basis and the LLC are scoped to section_time, 300 s each, and the header says how) and thorough.
--set changes single budget fields: n_sequences, batch_size, seq_len, sync_tol, n_probes, loss_scale,
loss_scales, llc_sequences, llc_seq_len, chains, draws, burnin, pilot_steps, llc_max_draws,
llc_time_limit, step_size, gamma, min_gamma, gammas, llc_params, llc_compile, ib_tokens, ib_seq_len,
ib_probes, ib_edge_sources, ib_keep_share, ib_resolution, sparsity, memory, section_time
(see tl_degeneracy/report/settings.py).

An --out directory holds the report of one model on one data set, computed by one tl-degeneracy
version. Rerunning into it reuses finished sections whose fingerprint (model weights, data, settings,
seed, version) matches and resumes LLC chains from <out>/checkpoints; --only adds or replaces those
sections and keeps the others. A directory holding another model's (data set's, version's) report
is refused; --fresh replaces it whole and ignores the checkpoints.
Exit codes: 0 done; 1 a section failed (unexpectedly, an LLC whose every chain diverged, or a pass
the memory budget cannot hold: see report.json); 2 bad input, with a message
saying what to do (--debug adds the traceback); 130 interrupted (Ctrl-C), 143 stopped by SIGTERM:
the same command resumes.
"""


class CLIError(Exception):
    """Bad input on the command line: printed without a traceback, exit code 2."""


def _overrides(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set {item!r}: expected KEY=VALUE (e.g. draws=400)")
        if key.strip() in out:  # which of two values was meant cannot be told
            raise CLIError(f"--set gives {key.strip()} twice ({out[key.strip()]!r} and {value!r}); give it once")
        out[key.strip()] = value
    return out


def _idle_threads(available: int) -> int:
    """Threads for the cores other jobs leave idle (by the 1-minute load average), at least one.

    torch's threads spin while they wait for each other; on a core another process holds they wait
    long, and a run can be several times slower than with fewer threads (measured: the default
    report's LLC 85 s with 2 threads against 38 s with one, beside one busy process on 2 cores).
    """
    return max(1, min(available, round(available - _load())))


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _check_options(args: argparse.Namespace) -> dict:
    """Validate every option that needs no model (cheap), before anything is loaded or computed;
    returns the budget overrides."""
    from .report.build import check_device
    from .report.report import check_writable
    from .report.settings import resolve_settings

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be ≥ 1; got {args.threads}")
    overrides = _overrides(args.set)
    if args.seq_len is not None:
        overrides["seq_len"] = args.seq_len
    if args.memory is not None:
        overrides["memory"] = args.memory
    try:
        resolve_settings(args.preset, overrides)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        check_device(args.device)
    except ValueError as e:
        raise CLIError(f"--{e}") from None
    check_writable(Path(args.out))
    return overrides


def _report(args: argparse.Namespace) -> int:
    from .models.loading import load_model
    from .report import degeneracy_report
    from .report.context import default_data_spec, load_data_spec

    t0 = time.perf_counter()
    out = Path(args.out)
    import torch

    overrides = _check_options(args)
    data = args.data if args.data not in (None, "toy") else default_data_spec(args.model)
    if args.data == "toy" and data is None:
        raise CLIError(f"--data toy: {args.model!r} is not a bundled toy; give a .txt, .pt or dataset directory")
    threads = args.threads or _idle_threads(torch.get_num_threads())
    torch.set_num_threads(threads)
    if not args.quiet and args.threads is None:
        print(f"tl-degeneracy: {threads} torch thread(s) (load average {_load():.1f}; "
              "--threads N to choose)", file=sys.stderr)
    loaded = None if data is None else load_data_spec(data)  # a bad --data fails before the model loads
    try:
        model = load_model(args.model, device=args.device, dtype=None if args.dtype is None else getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError, OSError, ImportError, TypeError) as e:
        raise CLIError(f"--model {args.model!r}: {e}") from e
    try:
        with warnings.catch_warnings(), _bars_on_a_terminal_only():
            # each section's warnings are in the summary printed below, once each (audit 15b: printed
            # twice, the first time with a source line of this file)
            warnings.filterwarnings("ignore", message="report section ")
            report = degeneracy_report(
                model, loaded, sections=args.only, preset=args.preset, seed=args.seed, out=out, fresh=args.fresh,
                progress=not args.quiet, llc_components=args.llc_components, overrides=overrides, label=args.model,
            )
    except ValueError as e:
        from .errors import TLDegeneracyError

        if isinstance(e, TLDegeneracyError):
            raise
        raise CLIError(str(e)) from e
    except OSError as e:  # writing the report (a full disk, a directory made read-only meanwhile)
        raise CLIError(f"cannot write the report to {out}: {e}; free space or choose another --out") from e
    html = out / "report.html"
    print(report.summary())
    print(f"  wrote {html} and report.json, CSVs in {out} ({time.perf_counter() - t0:.1f} s)")
    failed = [s.name for s in report.sections.values() if s.status == "failed"]
    if failed:
        reasons = "; ".join(f"{name}: {report.sections[name].reason}" for name in failed)
        print(f"tl-degeneracy: section(s) {', '.join(failed)} failed ({reasons}); the tracebacks of unexpected "
              f"failures are in {out / 'report.json'}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _bars_on_a_terminal_only():
    """Progress bars off (TQDM_DISABLE) while the report runs, where stderr is not a terminal: a log
    keeps every redraw of a bar (audit 23c F5: hundreds of lines and cursor codes); the report's
    section lines stay. A TQDM_DISABLE already set is left alone."""
    if sys.stderr.isatty() or "TQDM_DISABLE" in os.environ:
        yield
        return
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TQDM_DISABLE", None)


def _compare(args: argparse.Namespace) -> int:
    from .report.compare import compare_reports, default_directory

    comparison = compare_reports(args.dir_a, args.dir_b)
    out = Path(args.out) if args.out else default_directory(comparison)
    try:
        html = comparison.save(out)
    except OSError as e:  # a full disk, a directory made read-only meanwhile
        raise CLIError(f"cannot write the comparison to {out}: {e}; free space or choose another --out") from e
    print(comparison.summary())
    print(f"  wrote {html} and comparison.csv in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-degeneracy", description="Measure degeneracy in transformer circuits.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="run the degeneracy report on a model and dataset",
                         description="Run every degeneracy analysis on one model and dataset and write report.json, "
                                     "a self-contained report.html and one CSV per table.",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    rep.add_argument("--model", default=DEFAULT_MODEL, help=f"anything load_model accepts (default {DEFAULT_MODEL})")
    rep.add_argument("--data", default=None, help="a .txt file, a .pt LongTensor [batch,pos] (or a tokenizer's dict "
                     "with input_ids and attention_mask), a saved dataset directory, or toy / toy:NAME (default: the "
                     "bundled data of a toy model)")
    rep.add_argument("--out", default="reports/default", help="output directory (default reports/default)")
    rep.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    rep.add_argument("--only", nargs="+", action="extend", choices=SECTIONS, metavar="SECTION",
                     help=f"run only these sections: {', '.join(SECTIONS)} (repeatable)")
    rep.add_argument("--preset", choices=PRESETS, default="quick", help="budget preset (default quick)")
    rep.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                     help="override budget fields of the preset (repeatable; a key given twice is refused)")
    rep.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default=None,
                     help="load the model's weights in this dtype (default: the loader's, float32 for Hugging Face "
                          "and GGUF models); statistics accumulate in float64 and the LLC's loss in float32 or wider "
                          "whatever the weights")
    rep.add_argument("--seq-len", type=int, default=None, help="cut longer sequences into pieces of this many tokens (BOS put back before each piece); none is truncated")
    rep.add_argument("--memory", default=None, metavar="SIZE",
                     help="memory budget of the statistics passes, beyond the loaded model and data, e.g. 8G or "
                          "512M (default: half the RAM available once they are loaded, 80%% of the free GPU memory "
                          "on a GPU); sequence length and batch size not set "
                          "explicitly are lowered until a batch fits, and the report header says so")
    rep.add_argument("--llc-components", nargs="+", action="extend", default=None, metavar="COMPONENT",
                     help="also the restricted LLC per component: heads, layers, attn, mlp, or selections "
                          "such as blocks.0.attn.head1")
    rep.add_argument("--seed", type=int, default=0, help="seed of the probes and SGLD chains (default 0)")
    rep.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: one per core that the 1-minute load average leaves "
                          "idle, at least one: threads waiting on a busy core make a run several times slower)")
    rep.add_argument("--fresh", action="store_true",
                     help="start afresh: delete <out>/checkpoints (no reuse, no resume) and replace the report "
                          "in --out, whichever model it belongs to")
    rep.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    rep.add_argument("--debug", action="store_true", help="show the traceback of an error")
    rep.set_defaults(func=_report)
    cmp = sub.add_parser("compare", help="two reports side by side",
                         description="Write comparison.html (two saved reports side by side: settings that differ, "
                                     "both verdicts, values A | B | B − A, both reports' figures) and comparison.csv.",
                         epilog="Exit codes: 0 done; 2 bad input (a directory without a readable report.json, the "
                                "same directory twice, an --out that holds something else), with a message.")
    cmp.add_argument("dir_a", metavar="DIR_A", help="directory of report A (the --out of `tl-degeneracy report`)")
    cmp.add_argument("dir_b", metavar="DIR_B", help="directory of report B")
    cmp.add_argument("--out", default=None, help="output directory (default compare-<A>-vs-<B> in the current "
                     "directory); it must be new, empty or an earlier comparison of the same two reports")
    cmp.add_argument("--debug", action="store_true", help="show the traceback of an error")
    cmp.set_defaults(func=_compare)
    return parser


def _error(e: BaseException, debug: bool) -> int:
    """Print ``e`` as one paragraph (its traceback first with ``--debug``); exit code 2."""
    if debug:
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__)
    print(f"tl-degeneracy: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


class _Terminated(KeyboardInterrupt):
    """SIGTERM, ended as an interrupt (:func:`_terminate_as_interrupt`)."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's time limit, ``kill``, torchrun stopping its workers) ends the command as
    Ctrl-C does, with its message (audit 16b F11: it ended without a word), and exit status 143 (128 +
    SIGTERM) so that a wrapper can still tell it from Ctrl-C's 130; the handler before is put back
    after. Outside the main thread signals cannot be caught and nothing changes."""
    def interrupt(signum, frame):
        raise _Terminated

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (no yield in here: its errors would chain this one)
        before = False
    if before is False:
        yield
        return
    try:
        yield
    finally:  # None: a handler not installed from Python, which cannot be put back; the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if getattr(args, "llc_components", None) and args.llc_components[0] in ("heads", "layers", "attn", "mlp"):
        if len(args.llc_components) > 1:
            return _error(CLIError("--llc-components heads/layers/attn/mlp stands alone"), debug)
        args.llc_components = args.llc_components[0]  # a family name; otherwise a list of selections
    out = Path(args.out) if getattr(args, "out", None) else None
    created = out is not None and not os.path.lexists(out)  # (os.path: an unsearchable parent raises no error)
    try:
        with _terminate_as_interrupt():
            return args.func(args)
    except KeyboardInterrupt as interrupted:
        if debug:
            raise
        # audit 15b F7: the time fit reads the machine's speed, so a rerun under another load may scope
        # the costly sections otherwise, which their checkpoints then do not match
        print("tl-degeneracy: interrupted. Finished sections and the SGLD chains' checkpoints are kept: the same "
              "command resumes from them (--fresh starts over). Where the time fit lowered the interaction or LLC "
              "settings (the header's \"lowered to fit\"), a rerun under another load may choose others and start "
              "those sections over: give the lowered values with --set to resume them.", file=sys.stderr)
        return 143 if isinstance(interrupted, _Terminated) else 130
    except CLIError as e:
        _remove_if_left_empty(out, created)
        return _error(e, debug)
    except Exception as e:  # the package's own errors carry a message meant for the user
        from .errors import TLDegeneracyError

        if isinstance(e, TLDegeneracyError):
            _remove_if_left_empty(out, created)
            return _error(e, debug)
        raise


def _remove_if_left_empty(out: Path | None, created: bool) -> None:
    """Remove the --out directory this run created when bad input stopped it before anything was
    written there (an empty directory left behind would look like a finished run's)."""
    with contextlib.suppress(OSError):  # a parent that cannot be searched (review 52): nothing was made there
        if created and out is not None and os.path.isdir(out) and not any(out.iterdir()):
            out.rmdir()


if __name__ == "__main__":
    sys.exit(main())
