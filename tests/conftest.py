"""Test configuration: offline, deterministic, small thread count (CI has 2 cores).

Device: ``TLD_TEST_DEVICE`` (default ``cpu``; e.g. ``TLD_TEST_DEVICE=cuda make test``) is the device
the model fixtures build on (``tests/fixtures/device.py``: the ``test_device`` fixture and helper).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# Tiny test models run fastest, and most reproducibly, on one thread.
torch.set_num_threads(1)

pytest_plugins = ["tests.fixtures.device", "tests.fixtures.hf", "tests.fixtures.toys"]
