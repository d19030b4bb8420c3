"""Reaching the Hugging Face hub, or failing fast and clearly when it cannot be reached.

huggingface_hub retries an unreachable host for ~25-50 s before it gives up. We probe the host
once (a failed DNS lookup or connect returns in milliseconds) and, when it is down, switch the
libraries to offline mode so a hub name fails at once with a message saying what to do.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from urllib.parse import urlparse

OFFLINE_HINT = (
    "point it at a local path instead, or use a built-in one "
    "(tokenizer: builtin:bytes; dataset: builtin:pydoc, builtin:recall, builtin:passkey)"
)


def looks_like_hub_id(name: str) -> bool:
    """`name` or `owner/name` (not a path such as ./x, /x, ~/x or a/b/c)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None


@functools.lru_cache(maxsize=None)
def host_reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the host of `url` (port 443) opens within `timeout` seconds."""
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the hub answers; when it does not, put huggingface_hub and datasets offline."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    reachable = not offline and host_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not reachable:
        import datasets
        import huggingface_hub

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    return reachable


def hub_error(kind: str, name: str, err: Exception) -> OSError:
    """An error for a hub `kind` ('dataset', 'tokenizer', 'model') that could not be loaded."""
    where = "the Hugging Face hub is not reachable from here" if not hub_reachable() else f"loading failed ({err})"
    return OSError(f"cannot load {kind} {name!r}: {where}; {OFFLINE_HINT}")
