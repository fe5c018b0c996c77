"""Hugging Face hub access: probe once whether the hub answers; if it does not, use the local cache only.

Without the probe, a machine with no route to the hub waits through huggingface_hub's retries
(about 30 s of "Retrying in 8s" lines) before transformers or datasets give up. With it, hub ids and
hub datasets resolve from the local cache at once, or fail at once with one clear line.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint accepts a TCP connection; if not, switch huggingface_hub and datasets offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        go_offline()
        return False


def go_offline() -> None:
    """Work from the local cache: the flags that huggingface_hub, transformers and datasets read at call time."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
