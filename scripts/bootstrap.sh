#!/usr/bin/env bash
# Create (or reuse) a virtual environment with tl-degeneracy installed in editable mode.
#   scripts/bootstrap.sh VENV_DIR TRANSFORMER_LENS_REQUIREMENT [EXTRAS]
# Torch policy: keep a torch the user already has; otherwise install a CPU build unless the
# machine has an NVIDIA GPU. pip never replaces the torch that is there (a constraints file pins it).
set -euo pipefail
venv=${1:?usage: bootstrap.sh VENV_DIR TL_REQUIREMENT [EXTRAS]}
tl_req=${2:?usage: bootstrap.sh VENV_DIR TL_REQUIREMENT [EXTRAS]}
extras=${3:-dev}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "bootstrap [${SECONDS}s]: $*"; }

if [ ! -x "$venv/bin/python" ]; then
  say "setting up $venv (first run only: a few minutes, most of it downloading and unpacking packages)"
  if "$py" -c "import torch" 2>/dev/null; then
    say "reusing the torch already installed for $py ($("$py" -c 'import torch; print(torch.__version__)'))"
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
# pip's own lines, cut to what it is installing: one line per package it fetches, then the
# unpacking (the slow part) and the count installed. Errors and other warnings pass through; the
# local package mirrors of some machines make pip warn once per package, which is dropped.
pip_install() {
  PYTHONUNBUFFERED=1 "$venv/bin/python" -m pip install --progress-bar off "$@" 2>&1 | awk '
    /^WARNING: Location .* is ignored/ { next }
    /^Collecting / { print "  fetching " $2; fflush(); next }
    /^Installing collected packages:/ { n = split(substr($0, 31), a, ","); print "  unpacking " n " package(s) …"; fflush(); next }
    /^Successfully installed / { print "  installed " NF - 2 " package(s)"; fflush(); next }
    /^ *(Requirement already satisfied|Downloading|Using cached|Obtaining|Installing build dependencies|Checking if build backend|Getting requirements|Preparing|Building|Created wheel|Stored in directory|Successfully built|Attempting uninstall|Found existing installation|Uninstalling|Successfully uninstalled|Looking in|Installing backend dependencies)/ { next }
    { print; fflush() }'
}

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "installing torch (this machine has an NVIDIA GPU: the CUDA build, about 2 GB)"
    pip_install torch
  else
    say "installing torch (no GPU here: the CPU build, about 200 MB)"
    if ! pip_install "torch==2.13.0+cpu" ${TORCH_CPU_INDEX:+--extra-index-url "$TORCH_CPU_INDEX"}; then
      echo "bootstrap: no CPU build of torch found. This machine has no GPU, so a CUDA build is not installed." >&2
      echo "  Install a CPU build first (set TORCH_CPU_INDEX to PyTorch's CPU wheel index, or pip install a local" >&2
      echo "  torch-*+cpu wheel into $venv) and rerun." >&2
      exit 1
    fi
  fi
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null >"$constraints"
say "installing tl-degeneracy[$extras] and $tl_req with their dependencies"
pip_install -c "$constraints" -e "$root[$extras]" "$tl_req"
"$venv/bin/python" -c "import torch, transformer_lens, tl_degeneracy; from importlib.metadata import version; \
print(f'bootstrap [${SECONDS}s]: {\"$venv\"}: torch {torch.__version__}, transformer-lens {version(\"transformer-lens\")}, tl-degeneracy {tl_degeneracy.__version__}')"
