"""tm.conv2d, tm.max_pool2d and tm.batch_norm on 4 XLA devices: a few cases of
tests/tensor/test_conv.py, run by that file's own test bodies on xla meshes, with each device's
block read from torch-xla (see conftest.py). Its communication tests are left out: on xla the
partitioner, not torchmesh, exchanges the halo.
"""

from __future__ import annotations

import pytest
import reference
import test_conv as conv
from reference import rules_on

import torchmesh as tm


def xla_mesh(spec: str, rules: str = "") -> tm.Mesh:
    return tm.Mesh(spec, rules=rules_on(spec, rules), backend="xla")


@pytest.fixture(autouse=True)
def on_xla(monkeypatch):
    monkeypatch.setattr(conv, "make_mesh", xla_mesh)
    monkeypatch.setattr(conv, "assert_matches", reference.assert_matches)


@pytest.mark.parametrize(
    "rules,k,padding", [("h:a;w:b", 3, "SAME"), ("batch:a;h:b", 5, "VALID"), ("in_ch:a;w:b", 1, "SAME")]
)
def test_conv2d(rules, k, padding):
    conv.test_conv2d_equals_torch("a:2;b:2", rules, k, padding)


def test_conv2d_stride_and_uneven():
    conv.test_conv2d_stride_uneven_and_long_halos("a:2;b:2", "h:a;w:b", 8, 8, 5, 2, "SAME")
    conv.test_conv2d_stride_uneven_and_long_halos("a:2;b:2", "h:a;out_ch:b", 7, 5, 3, 1, "SAME")


def test_pool_and_batch_norm():
    conv.test_pool2d_equals_torch("a:2;b:2", "h:a;w:b", "max", 2)
    conv.test_batch_norm_training_with_running_stats_equals_torch("a:2;b:2", "batch:a;h:b")
