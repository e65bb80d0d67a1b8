"""Test-wide settings. Set before torch is imported anywhere in the run."""

import os

# torch's OpenMP threads spin-wait and crawl when another process shares the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# litdata asks the package index for its own version at import; tests run offline.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
