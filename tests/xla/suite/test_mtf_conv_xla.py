"""torchmesh.mtf.layers' convolution, pooling and batch-norm layers on 4 XLA devices: case bodies
of tests/mtf/test_mtf_conv_layers.py on xla b:2;m:2 meshes, each against torch's own function
(F.conv2d, F.conv3d, F.conv_transpose2d, F.batch_norm, Mesh TF's conv1d numbers), forward and
gradients; the seeded kernel equals the sim mesh's. A spatial dim and the output channels
split together is a regression case: torch-xla's SPMD partitioner alone doubles that
convolution (tm.conv2d replicates the filter there). The blocked cases keep to 5 dims (rows
blocked, columns padded): torch-xla shards no tensor of more than 5 dims ("tile_assignment
ranks > 5"), so Mesh TF's 6-dim [batch, row_blocks, col_blocks, rows, cols, channels] images
cannot be split on xla.
"""

from __future__ import annotations

import test_mtf_conv_layers as conv
import torch

import torchmesh as tm


def xla_mesh(rules: str) -> tm.Mesh:
    return tm.Mesh(conv.FOUR, rules=rules, backend="xla")


def test_conv2d_on_xla():
    got = conv.case_conv2d(xla_mesh("h:b;w:m"), (3, 3), (2, 2), "SAME")
    want = conv.case_conv2d(conv.one_device(), (3, 3), (2, 2), "SAME")
    assert torch.equal(got["kernel"].cpu(), want["kernel"])
    conv.case_conv2d(xla_mesh("batch:b;in:m"), (5, 3), (1, 1), "VALID")
    # h split with the output channels split on the other axis: XLA's partitioner alone gives 2x
    conv.case_conv2d(xla_mesh("out:m;h:b"))


def test_conv2d_with_row_blocks_on_xla():
    conv.case_conv2d_with_blocks(xla_mesh("row_blocks:b;out:m"), (5, 3), 4, None)


def test_conv1d_conv3d_and_transpose_on_xla():
    conv.case_mesh_tf_conv1d(xla_mesh("length:b;output:m"))
    conv.case_conv3d(xla_mesh("d:b;h:m"))
    conv.case_conv2d_transpose(xla_mesh("h:b;w:m"))
    conv.case_conv2d_transpose(xla_mesh("row_blocks:b;out:m"), blocks=True)


def test_batch_norm_on_xla():
    conv.case_batch_norm(xla_mesh("batch:b;h:m"))
