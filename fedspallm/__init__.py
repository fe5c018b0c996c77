"""fedspallm: federated pruning of large language models (FedSpaLLM) on Lightning Fabric."""

import os

# Idle OpenMP workers spin only briefly before they sleep. Spinning long (libgomp's default) starves
# other processes when several clients share a few cores (a 2-thread forward pass ran 2.5x slower);
# sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every short parallel region wait for a wake-up,
# which slowed a one-process SparseGPT prune of the embedded model from 16.3 s to 18.7 s here. A
# 10,000-iteration spin keeps both: the 4-process default run took 125 s with it and 127 s with
# PASSIVE. These only take effect if set before torch is first imported, hence here; a wait policy
# the user sets is left alone.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # GNU OpenMP (PyTorch's Linux wheels): spin iterations
    os.environ.setdefault("KMP_BLOCKTIME", "0")  # LLVM/Intel OpenMP (macOS): ms to spin; 0 = as PASSIVE

__version__ = "0.1.0"
