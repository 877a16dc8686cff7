"""Cross-entropy over a (possibly split) vocab dim.

loss = logsumexp(logits, vocab) - logits[vocab = target], averaged over every other dim.
With `vocab` split over tp, `logsumexp` all-reduces a max and a sum and the target's logit
is a masked lookup plus a sum: the vocab-parallel softmax of Megatron falls out of the
shared ops, and the full `batch seq vocab` logits are never gathered.
"""

from __future__ import annotations

from torchmesh import errors
from torchmesh.errors import DimError
from torchmesh.tensor.gather import gather
from torchmesh.tensor.mesh_tensor import MeshTensor
from torchmesh.tensor.reduce import logsumexp


def cross_entropy(logits: MeshTensor, targets: MeshTensor, vocab_dim: str = "vocab") -> MeshTensor:
    """Mean cross-entropy of `logits` (dims: targets' dims + `vocab_dim`) against integer
    `targets`; a replicated 0-d MeshTensor, like `F.cross_entropy(..., reduction="mean")`.

    >>> import torch, torchmesh as tm
    >>> mesh = tm.Mesh("tp:2", layout="vocab:tp")
    >>> logits = tm.distribute(torch.zeros(3, 4), "batch vocab", mesh)
    >>> targets = tm.distribute(torch.tensor([0, 1, 3]), "batch", mesh)
    >>> round(tm.nn.cross_entropy(logits, targets).item(), 4)  # log(4)
    1.3863
    """
    if vocab_dim not in logits.dims:
        raise DimError(errors.missing_dims("cross_entropy: logits", [vocab_dim], logits.dims))
    expected = set(logits.dims) - {vocab_dim}
    if set(targets.dims) != expected:
        raise DimError(f"cross_entropy: targets must have the logits' dims without {vocab_dim!r}, "
                       f"{tuple(n for n in logits.dims if n != vocab_dim)}; got {targets.dims}.")
    picked = gather(logits, targets, vocab_dim)
    return (logsumexp(logits, vocab_dim) - picked).mean()
