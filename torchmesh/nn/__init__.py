"""`tm.nn`: torch.nn modules over named dims, whose parameters are MeshTensors."""

from torchmesh.nn.attention import KVCache, MultiHeadAttention
from torchmesh.nn.conv import AvgPool2d, BatchNorm, Conv1d, Conv2d, MaxPool2d
from torchmesh.nn.count import num_parameters, parameter_bytes
from torchmesh.nn.fsdp import shard_parameters
from torchmesh.nn.generate import generate, generate_seq2seq
from torchmesh.nn.layers import Dropout, Embedding, FeedForward, LayerNorm, Linear, RMSNorm
from torchmesh.nn.losses import cross_entropy
from torchmesh.nn.moe import MoE
from torchmesh.nn.parameter import Module, configure_grad_sync, mesh_parameters
from torchmesh.nn.t5 import EncoderDecoderConfig, EncoderDecoderLM
from torchmesh.nn.transformer import LMConfig, TransformerBlock, TransformerLM

__all__ = ["Module", "mesh_parameters"]
__all__ += [
    "Dropout",
    "Embedding",
    "FeedForward",
    "LMConfig",
    "LayerNorm",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "TransformerBlock",
    "TransformerLM",
    "cross_entropy",
]
__all__ += ["MoE", "shard_parameters"]
__all__ += ["num_parameters", "parameter_bytes"]
__all__ += ["EncoderDecoderConfig", "EncoderDecoderLM"]
__all__ += ["KVCache", "generate", "generate_seq2seq"]
__all__ += ["configure_grad_sync"]
__all__ += ["AvgPool2d", "BatchNorm", "Conv1d", "Conv2d", "MaxPool2d"]
