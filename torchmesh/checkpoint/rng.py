"""The random state a resumed run needs to continue exactly: torch's CPU generator and
torchmesh's own stream (the seed and counter behind randn/rand/dropout without a seed).

torchmesh's stream is the same on every rank by design; torch's CPU generator is taken from
one rank (every rank's copy is the same when every rank seeds it alike, as scripts do).
"""

from __future__ import annotations

from typing import Any

import torch

from torchmesh.tensor import random as _random


def rng_state() -> dict[str, Any]:
    """The current random state, as a small picklable dict."""
    return {"torch": torch.get_rng_state(), "torchmesh": dict(_random._state)}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state returned by `rng_state`."""
    torch.set_rng_state(state["torch"])
    _random._state.update(state["torchmesh"])
