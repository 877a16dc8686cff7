"""`comm_stats()`: a record of every collective, with the bytes each device sends.

Bytes follow the ring algorithms every backend uses (k = devices in the group, S = bytes
of the tensor a device holds before the collective):

| kind           | bytes sent per device |
|----------------|-----------------------|
| all_reduce     | 2 (k-1)/k * S         |
| all_gather     | (k-1) * S (= (k-1)/k * W, W the gathered bytes) |
| reduce_scatter | (k-1)/k * S           |
| all_to_all     | (k-1)/k * S           |
| shift          | S (the block moved)   |

With uneven blocks (a dim not divisible by its axes) devices hold different S; S is then
device 0's (the largest block), except for all_gather, counted as (k-1)/k of the gathered
bytes W (rounded down). Padding added inside a collective never counts.

Collectives run in backward are recorded too (`phase="backward"`) when backward runs inside
the `with` block. Axes of size 1 never communicate and are never recorded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_ACTIVE: list[CommStats] = []


@dataclass(frozen=True, slots=True)
class CommRecord:
    """One collective: its kind, the mesh axes it ran over, and the bytes each device sent.

    >>> import torchmesh as tm
    >>> x = tm.ones("batch:4", tm.Mesh("dp:2", rules="batch:dp"))
    >>> with tm.comm_stats() as stats:
    ...     total = x.sum("batch")
    >>> stats.records
    [CommRecord(kind='all_reduce', axes=('dp',), bytes=4, shape=(), dtype=torch.float32, phase='forward')]
    """

    kind: str
    axes: tuple[str, ...]
    bytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    phase: str


@dataclass
class CommStats:
    """Collectives recorded inside a `with comm_stats()` block.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;d:tp")
    >>> x = tm.distribute(torch.ones(4, 8), "batch d", mesh, requires_grad=True)
    >>> with tm.comm_stats() as stats:
    ...     x.sum().backward()
    >>> stats.counts, stats.total_bytes, stats.bytes_by("axes")
    ({'all_reduce': 1}, 6, {('dp', 'tp'): 6})
    """

    records: list[CommRecord] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    @property
    def counts(self) -> dict[str, int]:
        """{kind: number of collectives}."""
        return dict(Counter(r.kind for r in self.records))

    def bytes_by(self, key: str = "kind") -> dict:
        """Bytes summed by 'kind', 'axes' or 'phase'."""
        out: Counter = Counter()
        for r in self.records:
            out[getattr(r, key)] += r.bytes
        return dict(out)

    def __repr__(self) -> str:
        return f"CommStats(total_bytes={self.total_bytes}, counts={self.counts})"


@contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Record every collective run inside the block.

    >>> with comm_stats() as stats:
    ...     pass
    >>> stats.total_bytes
    0
    """
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def recording() -> bool:
    return bool(_ACTIVE)


def bytes_sent(kind: str, k: int, s: int) -> int:
    """Bytes one device sends in a `kind` collective over `k` devices holding `s` bytes each
    (the table above; also used to count other libraries' collectives the same way)."""
    return {
        "all_reduce": 2 * (k - 1) * s // k,
        "all_gather": (k - 1) * s,
        "reduce_scatter": (k - 1) * s // k,
        "all_to_all": (k - 1) * s // k,
        "shift": s,
    }[kind]


def record(
    kind: str,
    axes: tuple[str, ...],
    k: int,
    tensor: torch.Tensor,
    phase: str = "forward",
    whole: tuple[int, int] | None = None,
) -> None:
    """Add one collective over a group of `k` devices, `tensor` being a device's input.
    `whole` = (dim, gathered size) where the blocks of a gather may be uneven: an all-gather
    then counts (k-1)/k of the gathered bytes (the group's average; padding never counts)."""
    if not _ACTIVE:
        return
    if kind == "all_gather" and whole is not None:
        gathered = tensor.element_size()
        for i, n in enumerate(tensor.shape):
            gathered *= whole[1] if i == whole[0] else n
        nbytes = (k - 1) * gathered // k
    else:
        nbytes = bytes_sent(kind, k, tensor.numel() * tensor.element_size())
    rec = CommRecord(kind, axes, nbytes, tuple(tensor.shape), tensor.dtype, phase)
    for stats in _ACTIVE:
        stats.records.append(rec)
