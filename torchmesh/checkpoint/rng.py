"""The random state a resumed run needs to continue exactly: torch's CPU generator and
torchmesh's own stream (the seed and counter behind randn/rand/dropout without a seed).

torchmesh's stream is the same on every rank by design; torch's CPU generator is taken from
one rank (every rank's copy is the same when every rank seeds it alike, as scripts do).
"""

from __future__ import annotations

from typing import Any

import torch

from torchmesh.errors import CheckpointError
from torchmesh.tensor.random import set_stream_state, stream_state


def rng_state() -> dict[str, Any]:
    """The current random state, as a small dict of plain values and one uint8 tensor."""
    return {"torch": torch.get_rng_state(), "torchmesh": stream_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state returned by `rng_state`; `CheckpointError` for anything else (it may come
    from a file), before anything is changed."""
    if not is_rng_state(state):
        raise CheckpointError(f"not a random state that rng_state() returns: {str(state)[:120]}")
    torch.set_rng_state(state["torch"])
    set_stream_state(state["torchmesh"])


def is_rng_state(state: Any) -> bool:
    """Whether `state` has the form `rng_state` returns (torch's state: a 1-d uint8 tensor)."""
    ours = state.get("torchmesh") if isinstance(state, dict) else None
    theirs = state.get("torch") if isinstance(state, dict) else None
    return (
        isinstance(ours, dict)
        and set(ours) == set(stream_state())
        and all(isinstance(v, int) and not isinstance(v, bool) for v in ours.values())
        and isinstance(theirs, torch.Tensor)
        and theirs.dtype == torch.uint8
        and theirs.dim() == 1
        and theirs.numel() == torch.get_rng_state().numel()
    )
