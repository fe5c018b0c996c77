"""fedspallm: federated pruning of large language models (FedSpaLLM) on Lightning Fabric."""

__version__ = "0.1.0"
