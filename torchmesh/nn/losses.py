"""Cross-entropy over a (possibly split) vocab dim.

loss = logsumexp(logits, vocab) - logits[vocab = target], averaged over every other dim.
With `vocab` split over tp, `logsumexp` all-reduces a max and a sum and the target's logit
is a masked lookup plus a sum: the vocab-parallel softmax of Megatron falls out of the
shared ops, and the full `batch seq vocab` logits are never gathered.

Targets equal to `ignore_index` (torch's -100: padding) contribute nothing and are left out of
the mean, exactly as `F.cross_entropy` computes it; any other target outside the vocab raises
`IndexRangeError` on every device (see `tensor.gather.check_ids` for the cost of the check).
"""

from __future__ import annotations

from torchmesh import errors
from torchmesh.errors import DimError
from torchmesh.tensor.elementwise import where
from torchmesh.tensor.gather import check_ids, check_lookup, lookup
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.reduce import logsumexp


def cross_entropy(
    logits: MeshTensor, targets: MeshTensor, vocab_dim: str = "vocab", ignore_index: int = -100
) -> MeshTensor:
    """Mean cross-entropy of `logits` (dims: targets' dims + `vocab_dim`) against integer
    `targets`; a replicated 0-d MeshTensor, like `F.cross_entropy(..., reduction="mean")`.
    Targets equal to `ignore_index` count for nothing, in the sum and in the mean (NaN when
    every target is ignored, as in torch).

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", rules="vocab:tp")
    >>> logits = tm.distribute(torch.zeros(3, 4), "batch vocab", mesh)
    >>> targets = tm.distribute(torch.tensor([0, 1, 3]), "batch", mesh)
    >>> round(tm.nn.cross_entropy(logits, targets).item(), 4)  # log(4)
    1.3863
    >>> padded = tm.distribute(torch.tensor([0, 1, -100]), "batch", mesh)  # the last one ignored
    >>> round(tm.nn.cross_entropy(logits, padded).item(), 4)
    1.3863
    """
    if vocab_dim not in logits.dims:
        raise DimError(errors.missing_dims("cross_entropy: logits", [vocab_dim], logits.dims))
    expected = set(logits.dims) - {vocab_dim}
    if set(targets.dims) != expected:
        raise DimError(
            f"cross_entropy: targets must have the logits' dims without {vocab_dim!r}, "
            f"{tuple(n for n in logits.dims if n != vocab_dim)}; got {targets.dims}."
        )
    check_lookup(logits, targets, vocab_dim, "cross_entropy")
    counted = check_ids(targets, logits.sizes[vocab_dim], "cross_entropy", vocab_dim, ignore=ignore_index)
    if counted == targets.numel():  # nothing ignored: the plain mean
        return (logsumexp(logits, vocab_dim) - lookup(logits, targets, vocab_dim)).mean()
    kept = targets != ignore_index
    picked = lookup(logits, where(kept, targets, 0), vocab_dim)
    total = where(kept, logsumexp(logits, vocab_dim) - picked, 0.0).sum()
    if counted is None:  # ids not read (xla, abstract): the count stays on the devices
        return total / kept.to(total.dtype).sum()
    return total / counted
