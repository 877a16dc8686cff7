"""Mesh TF's `mesh_tensorflow/transformer/` modules used by ported models: `attention`
(`attention`, `AttentionParams`, `attention_params_simple`, `local_attention_1d`) and `moe`
(`transformer_moe_layer_v1` with `_top_2_gating`, Mesh TF's expert capacity and balancing loss).

    import torchmesh.mtf as mtf
    params = mtf.transformer.attention.attention_params_simple(mesh, io, kv, heads, mtf.VariableDType())
    y, loss = mtf.transformer.moe.transformer_moe_layer_v1(x, d_model, hparams, train, mtf.VariableDType())
"""

from torchmesh.mtf.transformer import attention as attention
from torchmesh.mtf.transformer import moe as moe

__all__ = ["attention", "moe"]
