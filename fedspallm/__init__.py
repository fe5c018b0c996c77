"""fedspallm: federated pruning of large language models (FedSpaLLM) on Lightning Fabric."""

import os

# Idle OpenMP workers must sleep, not spin: with several client processes sharing a few cores,
# spinning workers starve each other (a 2-thread forward pass ran 2.5x slower than with this set).
# It only takes effect if set before torch is first imported, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
