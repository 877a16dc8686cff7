"""The op vocabulary of tests/tensor/test_ops_vocabulary.py (top_k, argmax/argmin, cumsum, stack,
unstack, split, *_like, einsum broadcasting to a new dim) on XLA devices: a sample of its
cases, even and uneven, each run by that file's own test body on an xla mesh, with each
device's block read from torch-xla (see conftest.py). Its communication tests are left out:
on xla the partitioner, not torchmesh, chooses the collectives.
"""

from __future__ import annotations

import os

import pytest
import reference
import test_ops_vocabulary as voc
from reference import rules_on

import torchmesh as tm

DEVICES = int(os.environ.get("CPU_NUM_DEVICES", "4"))
MESHES = {4: ["dp:2;tp:2", "tp:4"], 8: ["dp:2;tp:4"]}[DEVICES]
EVERY = {4: 1, 8: 3}[DEVICES]


def xla_mesh(spec: str, rules: str = "") -> tm.Mesh:
    return tm.Mesh(spec, rules=rules_on(spec, rules), backend="xla")


def sampled(params):
    return params[::EVERY]


@pytest.fixture(autouse=True)
def on_xla(monkeypatch):
    """The vocabulary tests' bodies, with xla meshes and the device-block check."""
    monkeypatch.setattr(voc, "make_mesh", xla_mesh)
    monkeypatch.setattr(voc, "assert_matches", reference.assert_matches)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "n,k,rules",
    sampled(
        [
            (5, 2, "vocab:tp"),
            (65, 2, "vocab:dp,tp"),
            (3, 3, "batch:dp;vocab:tp;k:tp"),
            (7, 1, "vocab:tp,dp;k:dp"),
            (65, 65, "batch:tp"),
        ]
    ),
)
def test_top_k(n, k, rules, mesh_spec):
    voc.test_top_k(n, k, mesh_spec, rules)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("largest,rules", sampled([(True, "vocab:tp"), (False, "vocab:dp,tp")]))
def test_top_k_ties(largest, rules, mesh_spec):
    voc.test_top_k_ties_go_to_the_lower_index_on_every_mesh(largest, rules, mesh_spec)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "kind,n,rules",
    sampled([("argmax", 5, "vocab:tp"), ("argmin", 65, "vocab:dp,tp"), ("argmax", 3, "batch:dp;vocab:tp")]),
)
def test_argmax_argmin(kind, n, rules, mesh_spec):
    voc.test_argmax_argmin(kind, n, rules, mesh_spec)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_argmax_argmin_first_occurrence_like_torch(mesh_spec):
    voc.test_argmax_argmin_first_occurrence_like_torch(mesh_spec, "vocab:tp")


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_top_k_nan_counts_as_largest_like_torch(mesh_spec):
    voc.test_top_k_nan_counts_as_largest_like_torch("vocab:dp,tp", mesh_spec)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "n,exclusive,reverse,rules",
    sampled(
        [
            (5, False, False, "seq:tp"),
            (65, True, True, "seq:dp,tp"),
            (3, True, False, "batch:dp;seq:tp"),
            (7, False, True, "seq:tp"),
        ]
    ),
)
def test_cumsum(n, exclusive, reverse, rules, mesh_spec):
    voc.test_cumsum(n, exclusive, reverse, rules, mesh_spec)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("count,rules", sampled([(3, "layer:tp"), (5, "layer:dp,tp"), (1, "d:tp;layer:dp")]))
def test_stack(count, rules, mesh_spec):
    voc.test_stack(count, mesh_spec, rules)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("n,rules", sampled([(3, "layer:tp"), (5, "layer:dp,tp")]))
def test_unstack(n, rules, mesh_spec):
    voc.test_unstack(n, mesh_spec, rules)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize(
    "n,sizes,rules", sampled([(7, [3, 4], "d:tp"), (65, 16, "d:dp,tp"), (5, [2, 3], "batch:dp;d:tp")])
)
def test_split(n, sizes, rules, mesh_spec):
    voc.test_split(n, sizes, mesh_spec, rules)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_like_constructors(mesh_spec):
    voc.test_like_constructors_keep_dims_layout_and_mesh(None, mesh_spec)


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("n,rules", sampled([(5, "k:tp"), (3, "k:dp,tp"), (4, "batch:dp;k:tp")]))
def test_einsum_broadcasts_to_a_new_dim(n, rules, mesh_spec):
    voc.test_einsum_broadcasts_to_a_new_dim(n, mesh_spec, rules)
