"""`tm.optim`: optimizers and gradient clipping that see the global named dims.

torch.optim (SGD, AdamW, ...) already works on the shards: their updates are elementwise,
so each device updating its own block gives the single-device result. What needs the global
view is here: `Adafactor`, whose factored second moments are means over whole named dims,
and `clip_grad_norm_`, whose norm counts every element of every parameter exactly once.
"""

from torchmesh.optim.adafactor import Adafactor
from torchmesh.optim.clip import clip_grad_norm_, grad_norm

__all__ = ["Adafactor", "clip_grad_norm_", "grad_norm"]
