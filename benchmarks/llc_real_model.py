"""Behavioral LLC chain-step time on a SmolLM2-135M-shaped model (issue 19: 8 chains × 1,000 steps on
32 × 128 tokens, goal ≤ 10 minutes on one H100-class GPU).

The model is a Llama of SmolLM2-135M's exact shape (30 layers, d_model 576, 9 query / 3 key-value
heads of 64, gated SiLU MLP of 1,536, vocabulary 49,152, tied embeddings; 134.5M parameters) with
random weights, built locally and loaded through ``tld.load_model`` as a TransformerBridge: the
time per step depends on the shape alone, and nothing is downloaded. The λ̂ of a random model is
not a finding and is not printed as one.

Two runs with the same given step size (no step-size calibration), ``--steps A,B`` draws each and no
burn-in; the time per chain-step is (t_B − t_A)/(B − A) (what the fixed cost of a call — the
reference forward, the curvature checks — does not enter), and the full 1,000-step run is
extrapolated as t_A + (1000 − A) × that. Where the device runs out of memory, the runs are made on
the first half of the sequences (halved again while needed) and their times scaled by the fraction
(issue 19: measure a fraction and extrapolate). Peak CUDA memory is read over both runs and set
beside the LLC's memory estimate (``tld.memory.sgld_bytes``), which is measured here, not enforced.

``--bare BLOCKS,STEPS`` times the chain-step against bare forward+backward passes of the same model
on the same batch instead (``llc_vs_devinterp.chain_step_vs_bare``: alternating blocks, wall and
process CPU time), and reports the process's system time and minor page faults over it and its
peak resident set: what the chains cost beyond the model's own arithmetic.

    python benchmarks/llc_real_model.py [--device cuda] [--chains 8] [--tokens 32x128] [--steps 5,15]
        [--dtype float32] [--layers 30] [--bare 3,2] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tl_degeneracy as tld  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from record import append_to_section, machine_line  # noqa: E402

SECTION = "## behavioral LLC on a 135M-parameter LM"

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), the fields that set the shape.
SMOLLM2_135M = dict(
    num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
    hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    bos_token_id=0, eos_token_id=0,
)


def build(directory: Path, layers: int) -> Path:
    """Save a randomly initialised SmolLM2-135M-shaped Llama to ``directory``, with the test suite's
    word-level tokenizer (the bridge needs one; the data here are token ids, so it is never used)."""
    import transformers as tf

    from tests.fixtures.hf import tiny_tokenizer

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}))
    path = directory / "smollm2-135m-shaped"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def timed_llc(model, tokens, args, draws: int) -> tuple[float, object]:
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    # The memory estimate (tld.memory.sgld_bytes) is measured here, not enforced: the run is what
    # shows whether the chains fit, and the peak is compared with the estimate.
    with tld.memory_limit(1 << 60):
        result = tld.behavioral_llc(
            model, tokens, chains=args.chains, draws=draws, burnin=0, step_size=args.step_size,
            batch_size=tokens.shape[0], seed=0, progress=False,
        )
    sync()
    return time.perf_counter() - t0, result


def fitting_runs(model, tokens, args, a: int, b: int) -> tuple[int, float, float, object]:
    """The two timed runs on the first n of the sequences, n halved from all of them while the device
    runs out of memory (issue 19: measure a fraction and extrapolate); returns (n, t_a, t_b, result)."""
    from tl_degeneracy.models.chains import OUT_OF_MEMORY

    n = tokens.shape[0]
    while True:
        try:
            t_a, _ = timed_llc(model, tokens[:n], args, a)
            print(f"{n} sequences, {a} draws: {t_a:.1f} s", flush=True)
            t_b, result = timed_llc(model, tokens[:n], args, b)
            print(f"{n} sequences, {b} draws: {t_b:.1f} s", flush=True)
            return n, t_a, t_b, result
        except OUT_OF_MEMORY:
            if n == 1:
                raise
            print(f"{n} sequences: out of device memory; halving", flush=True)
            n = (n + 1) // 2
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()  # the peak of the runs that fit, not of the one that failed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--tokens", default="32x128", help="sequences x positions (one full batch per step)")
    ap.add_argument("--steps", default="5,15", help="draws of the two timed runs")
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--step-size", type=float, default=1e-7)
    ap.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="fewer for a smoke test")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--bare", default=None, metavar="BLOCKS,STEPS",
                    help="time the chain-step against bare forward+backward passes instead of the two runs")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    n_seq, n_pos = (int(x) for x in args.tokens.split("x"))
    a, b = (int(x) for x in args.steps.split(","))
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = tld.load_model(build(Path(tmp), args.layers), device=args.device, dtype=dtype)
        t_load = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(1, SMOLLM2_135M["vocab_size"], (n_seq, n_pos), generator=torch.Generator().manual_seed(0))
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Each phase is printed as it ends, so a run stopped at a time limit still says how far it got.
    print(f"loaded in {t_load:.1f} s ({n_params:,} parameters)", flush=True)
    if args.bare is not None:
        return chain_step_against_bare(model, tokens, args, n_params)
    n_run, t_a, t_b, result = fitting_runs(model, tokens, args, a, b)
    # time per step taken as proportional to the tokens where only a fraction fitted (an upper
    # estimate where the smaller batch leaves the device underused)
    scale = n_seq / n_run
    per_step = (t_b - t_a) / (b - a) * scale
    total = t_a * scale + (args.target_steps - a) * per_step
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(args.device).type == "cuda" else float("nan")
    from tl_degeneracy.llc.estimate import chains_memory
    from tl_degeneracy.llc.layout import select_coordinates
    from tl_degeneracy.llc.targets import make_target

    # what the run itself checked before sampling (reference cache and widened bfloat16 weights included)
    target = make_target(model, tokens[:n_run], None, n_run)
    estimate = chains_memory(target, select_coordinates(target, None), args.chains) / 2**30
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30  # the peak holds them too
    ran = f"{n_run}×{n_pos}" + (f" (×{scale:g} extrapolated)" if n_run < n_seq else "")
    line = (
        f"| {args.device} | {args.dtype} | {args.chains} | {ran} | {t_load:.1f} s | {t_a:.1f} s ({a}) / {t_b:.1f} s ({b}) "
        f"| {per_step:.3f} s ({per_step / args.chains * 1e3:.0f} ms per chain-step) | {total / 60:.1f} min | {peak:.1f} GiB "
        f"| {estimate:.1f} GiB + {weights:.1f} GiB weights |"
    )
    head = ("| device | dtype | chains | tokens run | load | runs (draws) | per step, all chains | "
            f"{args.target_steps} steps on {n_seq}×{n_pos}, extrapolated | peak CUDA memory | estimate (sgld_bytes) + weights |\n"
            + "|---" * 10 + "|")
    print(head)
    print(line)
    print(f"parameters {n_params:,}; step size {args.step_size:g} given; diverged chains {result.diagnostics.get('n_diverged')}")
    if not args.no_write:
        block = (
            f"### {machine_line()}\n\n"
            f"`benchmarks/llc_real_model.py --device {args.device} --dtype {args.dtype} --chains {args.chains} "
            f"--tokens {args.tokens} --steps {args.steps}`: a random Llama of SmolLM2-135M's shape ({n_params:,} "
            "parameters) as a TransformerBridge, KL behavioral loss, full batch, given step size; per step = "
            "difference of the two runs over the difference of their draws (fixed costs cancel).\n\n"
            + head + "\n" + line + "\n"
        )
        append_to_section(SECTION, "llc_real_model.py", block)


def chain_step_against_bare(model, tokens, args, n_params: int) -> None:
    from types import SimpleNamespace

    from llc_vs_devinterp import Case, chain_step_vs_bare

    blocks, steps = (int(x) for x in args.bare.split(","))
    case = Case(name="smollm2-shaped", model=model, data=tokens, theory=None, loss="kl", chains=args.chains,
                burnin=0, draws=steps)
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = chain_step_vs_bare(case, SimpleNamespace(nbeta=1000.0, gamma=1.0), args.step_size, blocks, steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    sys_s, user_s = after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
    faults = after.ru_minflt - before.ru_minflt
    per_block = ", ".join(f"{r:.2f}" for r in out["ratio_wall"])
    head = ("| device | dtype | layers | parameters | chains | tokens | bare forward+backward ms, wall (CPU) | "
            "chain-step ms, wall (CPU) | chain-step / bare, wall: median (per block) | system / user CPU s | minor page faults | peak RSS |\n"
            + "|---" * 12 + "|")
    line = (f"| {args.device} | {args.dtype} | {args.layers} | {n_params:,} | {args.chains} | {args.tokens} | "
            f"{np.median(out['bare_wall']) * 1e3:.1f} ({np.median(out['bare_cpu']) * 1e3:.1f}) | "
            f"{np.median(out['chain_wall']) * 1e3:.1f} ({np.median(out['chain_cpu']) * 1e3:.1f}) | "
            f"**{np.median(out['ratio_wall']):.2f}×** ({per_block}) | {sys_s:.1f} / {user_s:.1f} | {faults:,} | "
            f"{after.ru_maxrss / 2**20:.1f} GiB |")
    print(head)
    print(line)
    if not args.no_write:
        # The allocator settings this run had (README, "Large models on a CPU"), as they were given.
        malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                          if k.startswith("MALLOC_") or k == "THP_MEM_ALLOC_ENABLE")
        block = (
            f"### {machine_line()}\n\n"
            f"`{(malloc + ' ') if malloc else ''}benchmarks/llc_real_model.py --device {args.device} --dtype {args.dtype} "
            f"--chains {args.chains} --tokens {args.tokens} --layers {args.layers} --bare {args.bare}`: the chain-step "
            "of a random Llama of SmolLM2-135M's shape against bare forward+backward passes (same batch, KL behavioral "
            "loss, given step size), alternating blocks; system time and page faults of the whole comparison, the process's peak resident set.\n\n"
            + head + "\n" + line + "\n"
        )
        append_to_section(SECTION, "llc_real_model.py", block)


if __name__ == "__main__":
    main()
