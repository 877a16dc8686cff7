"""`repr`/`print` of a MeshTensor and `tm.show_layout`: pinned texts, and no communication."""

from __future__ import annotations

import torch

import torchmesh as tm


def mesh22(rules: str) -> tm.Mesh:
    return tm.Mesh("dp:2;tp:2", rules=rules)


def test_repr_split_over_both_axes(capsys):
    x = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch ff", mesh22("batch:dp;ff:tp"))
    expected = (
        "MeshTensor(batch:2 ff:4 | batch:dp;ff:tp | mesh dp:2;tp:2 sim | float32)\n"
        "  [dp=0,tp=0] batch[0:1] ff[0:2]: [[0., 1.]]\n"
        "  [dp=0,tp=1] batch[0:1] ff[2:4]: [[2., 3.]]\n"
        "  [dp=1,tp=0] batch[1:2] ff[0:2]: [[4., 5.]]\n"
        "  [dp=1,tp=1] batch[1:2] ff[2:4]: [[6., 7.]]"
    )
    with tm.comm_stats() as stats:
        assert repr(x) == expected
        print(x)
    assert capsys.readouterr().out == expected + "\n"
    assert stats.records == []  # printing never communicates


def test_repr_shows_each_distinct_shard_once_with_stars():
    y = tm.distribute(torch.arange(8.0).reshape(4, 2), "ff d", mesh22("ff:tp"))
    assert repr(y) == (
        "MeshTensor(ff:4 d:2 | ff:tp | mesh dp:2;tp:2 sim | float32)\n"
        "  [dp=*,tp=0] ff[0:2] d[0:2]:\n"
        "    [[0., 1.],\n"
        "     [2., 3.]]\n"
        "  [dp=*,tp=1] ff[2:4] d[0:2]:\n"
        "    [[4., 5.],\n"
        "     [6., 7.]]"
    )


def test_repr_replicated_scalar_grad_and_dtype():
    m = mesh22("batch:dp")
    total = tm.distribute(torch.arange(4), "v", m).sum()
    assert repr(total) == "MeshTensor(() | replicated | mesh dp:2;tp:2 sim | int64)\n  [dp=*,tp=*]: 6"
    w = tm.distribute(torch.ones(4, 2, dtype=torch.bfloat16), "batch d", m, requires_grad=True)
    assert repr(w) == (
        "MeshTensor(batch:4 d:2 | batch:dp | mesh dp:2;tp:2 sim | bfloat16 | requires_grad)\n"
        "  [dp=0,tp=*] batch[0:2] d[0:2]:\n"
        "    [[1., 1.],\n"
        "     [1., 1.]]\n"
        "  [dp=1,tp=*] batch[2:4] d[0:2]:\n"
        "    [[1., 1.],\n"
        "     [1., 1.]]"
    )


def test_repr_multi_axis_and_truncation():
    x = tm.distribute(torch.arange(8.0), "batch", tm.Mesh("dp:2;tp:2", rules="batch:dp,tp"))
    assert repr(x) == (
        "MeshTensor(batch:8 | batch:dp,tp | mesh dp:2;tp:2 sim | float32)\n"
        "  [dp=0,tp=0] batch[0:2]: [0., 1.]\n"
        "  [dp=0,tp=1] batch[2:4]: [2., 3.]\n"
        "  [dp=1,tp=0] batch[4:6]: [4., 5.]\n"
        "  [dp=1,tp=1] batch[6:8]: [6., 7.]"
    )
    big = tm.distribute(torch.arange(10), "ff", tm.Mesh("tp:10", rules="ff:tp"))
    lines = repr(big).splitlines()
    assert len(lines) == 1 + 8 + 1 and lines[-1] == "  ..." and lines[8] == "  [tp=7] ff[7:8]: [7]"


def test_show_layout_grid_two_split_dims():
    x = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch ff", mesh22("batch:dp;ff:tp"))
    with tm.comm_stats() as stats:
        text = tm.show_layout(x)
    assert text == (
        "MeshTensor(batch:2 ff:4 | batch:dp;ff:tp | mesh dp:2;tp:2 sim | float32)  devices by index on mesh "
        "dp:2;tp:2\n"
        "           | ff[0:2] | ff[2:4]\n"
        "batch[0:1] | dev 0   | dev 1\n"
        "batch[1:2] | dev 2   | dev 3"
    )
    assert stats.records == []


def test_show_layout_grid_rows_on_the_minor_axis():
    x = tm.zeros("ff:4 batch:4", mesh22("batch:dp;ff:tp"))
    assert tm.show_layout(x).splitlines()[1:] == [
        "        | batch[0:2] | batch[2:4]",
        "ff[0:2] | dev 0      | dev 2",
        "ff[2:4] | dev 1      | dev 3",
    ]


def test_show_layout_one_split_dim():
    y = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch d", mesh22("batch:dp"))
    assert tm.show_layout(y) == (
        "MeshTensor(batch:2 d:4 | batch:dp | mesh dp:2;tp:2 sim | float32)  devices by index on mesh dp:2;tp:2\n"
        "  batch[0:1]: devices [0, 1]\n"
        "  batch[1:2]: devices [2, 3]"
    )
    z = tm.zeros("ff:4 d:2", mesh22("ff:tp"))
    assert tm.show_layout(z).splitlines()[1:] == ["  ff[0:2]: devices [0, 2]", "  ff[2:4]: devices [1, 3]"]


def test_show_layout_replicated_multi_axis_and_three_dims():
    r = tm.zeros("a:2", mesh22(""))
    assert tm.show_layout(r).splitlines()[1:] == ["  whole tensor: devices [0, 1, 2, 3]"]
    b = tm.zeros("batch:8", tm.Mesh("dp:2;tp:2", rules="batch:tp,dp"))
    assert tm.show_layout(b).splitlines()[1:] == [
        "  batch[0:2]: devices [0]",
        "  batch[2:4]: devices [2]",
        "  batch[4:6]: devices [1]",
        "  batch[6:8]: devices [3]",
    ]
    c = tm.zeros("a:2 b:2 c:2", tm.Mesh("x:2;y:2;z:2", rules="a:z;b:y;c:x"))
    assert tm.show_layout(c).splitlines()[1:3] == [
        "  a[0:1] b[0:1] c[0:1]: devices [0]",
        "  a[0:1] b[0:1] c[1:2]: devices [4]",
    ]
