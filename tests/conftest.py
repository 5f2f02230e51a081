"""Test configuration: offline, deterministic, small thread count (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# Tiny test models run fastest, and most reproducibly, on one thread.
torch.set_num_threads(1)

pytest_plugins = ["tests.fixtures.hf", "tests.fixtures.toys"]
