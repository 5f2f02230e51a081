#!/usr/bin/env bash
# One command that checks and measures the package on a GPU (issue 19); its sections' time limits
# add to 550 s on one H100-class GPU (the issue aims at under 8 minutes):
#
#   bash benchmarks/gpu.sh [SECTION ...]      sections: tests stats interaction kl llc devinterp multigpu
#                                             (default: all, in that order)
#
# - tests:       the device test suite (TLD_TEST_DEVICE=cuda; every test that builds its model through
#                the shared fixtures builds it on the GPU), in parallel with pytest-xdist when present;
# - stats:       activation_stats throughput against a plain forward pass (bytelm, GPT-2-small shape);
# - interaction: the GPT-2-small-shaped interaction basis, time and peak memory per 1k tokens;
# - kl:          the behavioral KL's forward+backward (8 chains × 32 × 128 tokens × SmolLM2's vocabulary)
#                against the same divergence written out for autograd: time and peak CUDA memory;
# - llc:         behavioral LLC of a SmolLM2-135M-shaped model, 8 chains on 32 × 128 tokens, time per
#                step measured on a fraction and extrapolated to 1,000 steps (on fewer sequences where the
#                GPU runs out of memory), its peak CUDA memory beside the LLC's estimate (sgld_bytes);
# - devinterp:   SGLD time per chain-step against devinterp 2.0.1 on the same model and settings;
# - multigpu:    when more than one GPU is visible: the two-process tests over NCCL (statistics
#                all-reduce, sharded chains) and the scaling of both on all GPUs (distributed_scaling.py).
#
# Each section runs under its own time limit and its failure does not stop the others. Every
# benchmark appends its table to BENCHMARKS.md (in this checkout); logs, a summary and the updated
# BENCHMARKS.md go to $OUT (the device tool's result folder) or ./gpu-results. Packages missing on a
# bare GPU machine travel as wheels in .whl/ (README.md, "On a GPU, and on several": make gpu-wheels) and are installed
# into a private folder, leaving the machine's torch as it is.
set -u
cd "$(dirname "$0")/.."
RESULTS=${OUT:-gpu-results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TLD_TEST_DEVICE=${TLD_TEST_DEVICE:-cuda}
SECTIONS=${*:-tests stats interaction kl llc devinterp multigpu}
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
T_START=$(date +%s)

# Wheels only where the packages are missing (a bare GPU machine), never over an installed torch.
if ! $PY -c "import transformer_lens, arviz_stats" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tld-site .whl/*.whl \
        || { echo "installing .whl/ failed" | tee -a "$SUMMARY"; exit 1; }
    export PYTHONPATH=$PWD:/tmp/tld-site
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY - <<'EOF'
import importlib.metadata as md, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}, "
      f"devices {torch.cuda.device_count()}")
for name in ("transformer-lens", "transformers", "arviz-stats", "devinterp", "pytest-xdist"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} not installed")
import tl_degeneracy
print(f"  tl_degeneracy {tl_degeneracy.__version__} imports")
EOF
} 2>&1 | tee "$RESULTS/env.txt"

N_GPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")

# run_section NAME SECONDS COMMAND...: run one section under its limit, log it, record rc and time.
# LIMIT_<name>=SECONDS in the environment overrides a section's limit (a shorter run when device time is short).
run_section() {
    local name=$1 limit_var="LIMIT_$1"
    local limit=${!limit_var:-$2}
    shift 2
    case " $SECTIONS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local rc=$? t1=$(date +%s)
    grep -E "FAILED|ERROR" "$RESULTS/$name.log" | head -n 40
    tail -n 25 "$RESULTS/$name.log"
    echo "$name: rc $rc, $((t1 - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$SUMMARY"
}

DEVICE_TESTS="tests/test_device_guard.py tests/test_invariants.py tests/test_synchronization.py tests/test_interaction_basis.py
    tests/test_interaction_defaults.py tests/test_interaction_pca.py tests/test_gauge.py tests/test_counts.py tests/test_llc_transformer.py
    tests/test_chain_map.py tests/test_jacobian_probes.py tests/test_llc_stepsize.py tests/test_losses.py"
# shellcheck disable=SC2086
# -v: each test's outcome is logged as it finishes, so a run stopped at its limit still names its failures.
run_section tests 150 $PY -m pytest -v -rfE --tb=short -p no:cacheprovider $XDIST $DEVICE_TESTS
run_section stats 60 $PY benchmarks/stats_throughput.py --device cuda --reps 3
run_section interaction 60 $PY benchmarks/interaction_basis.py --device cuda --models gpt2 --gpt2-tokens 8x128
run_section kl 40 $PY benchmarks/behavioral_kl.py --device cuda --chains 8 --positions 4096 --reps 3
run_section llc 150 $PY benchmarks/llc_real_model.py --device cuda --chains 8 --tokens 32x128 --steps 4,12
run_section devinterp 90 $PY benchmarks/llc_vs_devinterp.py --device cuda --models bytelm --reps 1
if [ "$N_GPU" -gt 1 ]; then
    run_section multigpu 150 bash -c "env TLD_DISTRIBUTED_BACKEND=nccl $PY -m pytest -q -p no:cacheprovider -k 'two_processes or two_ranks' tests; \
        $PY benchmarks/distributed_scaling.py --device cuda --nproc $N_GPU"
else
    case " $SECTIONS " in *" multigpu "*) echo "multigpu: skipped ($N_GPU GPU visible)" | tee -a "$SUMMARY" ;; esac
fi

cp BENCHMARKS.md "$RESULTS/BENCHMARKS.md"
echo "total $(($(date +%s) - T_START)) s" | tee -a "$SUMMARY"
cat "$SUMMARY"
