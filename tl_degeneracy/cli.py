"""``tl-degeneracy``: the command line.

``tl-degeneracy report`` runs the main job on a model and dataset and writes the results to a
directory. With no arguments it uses the bundled default model (``toy:bytelm``) and its bundled
held-out text, offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "toy:bytelm"
SECTIONS = ("summary", "parameters", "activations")
PRESETS = {
    # sequences of the default data used for statistics
    "quick": {"n_sequences": 64, "batch_size": 16},
    "thorough": {"n_sequences": 512, "batch_size": 32},
}

EXAMPLES = """examples:
  tl-degeneracy report                                  # bundled toy:bytelm, bundled text, ./reports/
  tl-degeneracy report --model toy:sma --out out/sma    # another bundled model
  tl-degeneracy report --model ./my-hf-dir --data corpus.txt --device cpu
  tl-degeneracy report --model smollm2.gguf --data tokens.pt --only summary parameters
"""


class CLIError(Exception):
    """Bad input on the command line: printed without a traceback, exit code 2."""


def _load_data(spec: str | None, model_spec: str, n_sequences: int):
    """Resolve ``--data`` to something ``token_batches`` accepts."""
    import torch

    from .models.toys.data import toy_data

    if spec is None or spec == "toy":
        if not model_spec.startswith("toy:"):
            raise CLIError("--data is required for models that are not bundled toys (a .txt, .pt, or dataset dir)")
        name = model_spec.removeprefix("toy:").split("-")[0]
        return toy_data(name, n=n_sequences)
    if spec.startswith("toy:"):
        return toy_data(spec.removeprefix("toy:"), n=n_sequences)
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"--data {spec!r}: no such file or directory (give a .txt, a .pt tensor file, a dataset "
                       "directory saved with datasets' save_to_disk, or toy:NAME)")
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as e:  # pragma: no cover - datasets ships with transformer-lens 4
            raise CLIError("reading a dataset directory needs the `datasets` package") from e
        return load_from_disk(str(path))
    if path.suffix in (".pt", ".pth"):
        tokens = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tokens, torch.Tensor):
            raise CLIError(f"{path} must hold one LongTensor of token ids [batch, pos]")
        return tokens[:n_sequences]
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CLIError(f"{path} is empty")
    return [text]


def _report(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from . import activation_stats, adapt, load_model, token_batches

    preset = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = args.only or list(SECTIONS)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        model = load_model(args.model, device=args.device)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        raise CLIError(f"--model {args.model!r}: {e}") from e
    adapter = adapt(model)
    timings["load"] = time.perf_counter() - t0
    result: dict = {"model": args.model, "settings": {**vars(args), **preset}, "library_versions": _versions()}

    summary = adapter.summary()
    result["summary"] = summary
    if "parameters" in sections:
        frame = adapter.live_parameters().to_frame()
        frame.to_csv(out / "parameters.csv", index=False)
        result["parameters"] = {"n_live": int(frame["numel"].sum()), "n_tensors": len(frame), "csv": "parameters.csv"}
    if "activations" in sections:
        t1 = time.perf_counter()
        data = _load_data(args.data, args.model, preset["n_sequences"])
        batches = token_batches(data, adapter, batch_size=preset["batch_size"], seq_len=args.seq_len)
        stats = activation_stats(adapter, batches, hooks=["resid_pre", "resid_post"], progress=not args.quiet)
        frame = stats.to_frame()
        frame.to_csv(out / "activation_stats.csv", index=False)
        result["activations"] = {"table": frame.to_dict(orient="records"), "csv": "activation_stats.csv"}
        timings["activations"] = time.perf_counter() - t1
    result["timings_s"] = timings
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))

    print(f"tl-degeneracy report: {args.model} ({summary['backend']}, {summary['model_class']})")
    print(f"  layers {summary['n_layers']}  heads {summary['n_heads']} (kv {summary['n_kv_heads']})  d_model "
          f"{summary['d_model']}  d_head {summary['d_head']}  d_mlp {summary['d_mlp']}  vocab {summary['d_vocab']}")
    print(f"  live parameters {summary['n_live_parameters']:,} in {summary['n_live_tensors']} tensors "
          f"(module parameters {summary['n_module_parameters']:,})")
    if "activations" in result:
        with pd.option_context("display.width", 120, "display.max_columns", 12):
            print(pd.DataFrame(result["activations"]["table"]).to_string(index=False))
    print(f"  wrote {out / 'report.json'} in {time.perf_counter() - t0:.1f} s")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("tl-degeneracy", "torch", "transformer-lens", "transformers", "numpy", "pandas"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    found["python"] = sys.version.split()[0]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-degeneracy", description="Measure degeneracy in transformer circuits.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="run the degeneracy report on a model and dataset",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    rep.add_argument("--model", default=DEFAULT_MODEL, help=f"anything load_model accepts (default {DEFAULT_MODEL})")
    rep.add_argument("--data", default=None, help="a .txt file, a .pt LongTensor [batch,pos], a saved dataset "
                     "directory, or toy:NAME (default: the bundled data of a toy model)")
    rep.add_argument("--out", default="reports/default", help="output directory (default reports/default)")
    rep.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model loads)")
    rep.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    rep.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="data budget (default quick)")
    rep.add_argument("--seq-len", type=int, default=None, help="chunk/truncate sequences to this length")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"tl-degeneracy: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the package's own errors carry a message meant for the user
        from .errors import TLDegeneracyError

        if isinstance(e, TLDegeneracyError):
            print(f"tl-degeneracy: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
