"""`repr`/`print` of a MeshTensor and `tm.show_layout`: pinned texts, and no communication."""

from __future__ import annotations

import re

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


# ---- big tensors: summarised like torch, with the way to see everything ---------------------
SEE_ALL = 'see all with tm.show(x, full=True) or torch.set_printoptions(profile="full")'


def activation() -> tuple[torch.Tensor, tm.MeshTensor]:
    """A 4x4x8x8 activation (1,024 values: over torch's default threshold of 1,000) on 2x2."""
    value = torch.arange(1024).reshape(4, 4, 8, 8)
    return value, tm.distribute(value, "batch heads seq d", mesh22("batch:dp;heads:tp"))


def values(text: str) -> list[int]:
    """The integers printed in a repr's block bodies (its lines indented by four), sorted."""
    return sorted(int(n) for line in text.splitlines() if line.startswith("    ") for n in re.findall(r"\d+", line))


def test_big_tensor_summarised_per_block_and_names_the_way_to_see_all():
    value, x = activation()
    lines = repr(x).splitlines()
    assert len(lines) < 60
    assert lines[0] == "MeshTensor(batch:4 heads:4 seq:8 d:8 | batch:dp;heads:tp | mesh dp:2;tp:2 sim | int64)"
    assert lines[1] == "  [dp=0,tp=0] batch[0:2] heads[0:2] seq[0:8] d[0:8]:"
    # the block's body is what torch prints for that block past its threshold (edge items)
    with torch._tensor_str.printoptions(threshold=len(value[:2, :2].flatten()) - 1):
        torch_text = str(value[:2, :2]).removeprefix("tensor(").removesuffix(")")
    assert [l.strip() for l in lines[2:-2]] == [l.strip() for l in torch_text.splitlines()]
    assert lines[2] == "    [[[[  0,   1,   2,  ...,   5,   6,   7],"
    assert lines[-2:] == ["  ... 3 more blocks", f"  (summarised: 1,024 values > threshold 1000; {SEE_ALL})"]


def test_big_tensor_summary_shows_blocks_that_fit():
    x = tm.distribute(torch.arange(4000.0), "batch", tm.Mesh("dp:2;tp:2", rules="batch:dp,tp"))
    assert repr(x).splitlines()[1:] == [
        "  [dp=0,tp=0] batch[0:1000]: [  0.,   1.,   2.,  ..., 997., 998., 999.]",
        "  [dp=0,tp=1] batch[1000:2000]: [1000., 1001., 1002.,  ..., 1997., 1998., 1999.]",
        "  [dp=1,tp=0] batch[2000:3000]: [2000., 2001., 2002.,  ..., 2997., 2998., 2999.]",
        "  [dp=1,tp=1] batch[3000:4000]: [3000., 3001., 3002.,  ..., 3997., 3998., 3999.]",
        f"  (summarised: 4,000 values > threshold 1000; {SEE_ALL})",
    ]
    many = tm.distribute(torch.arange(1100), "ff", tm.Mesh("tp:10", rules="ff:tp"))
    lines = repr(many).splitlines()
    assert len(lines) == 1 + 4 + 2 and lines[4].startswith("  [tp=3] ff[330:440]: [330, 331, 332,  ...,")
    assert lines[5] == "  ... 6 more blocks"


def test_full_print_options_show_every_value(capsys):
    value, x = activation()
    with torch._tensor_str.printoptions(profile="full"):
        text = repr(x)
    assert "..." not in text and "summarised" not in text
    assert values(text) == list(range(1024))  # every value, once per block
    tm.show(x, full=True)
    shown = capsys.readouterr().out
    body = shown.split("\n", 1)[1].split("MeshTensor(")[0]  # the global value torch prints
    assert "..." not in body and sorted(int(n) for n in re.findall(r"\d+", body)) == list(range(1024))
    tm.show(x)  # without full: the global value summarised as torch prints it
    assert str(value) in capsys.readouterr().out and "..." in str(value)


def test_threshold_is_torchs_and_abstract_blocks_have_no_values():
    value, x = activation()
    with torch._tensor_str.printoptions(threshold=2000):  # under the threshold: every value, as before
        text = repr(x)
    assert "summarised" not in text and values(text) == list(range(1024))
    meta = tm.zeros("batch:4 heads:4 seq:8 d:8", tm.Mesh("dp:2;tp:2", rules="batch:dp;heads:tp", backend="abstract"))
    assert repr(meta).splitlines()[1:] == [
        "  [dp=0,tp=0] batch[0:2] heads[0:2] seq[0:8] d[0:8]: (no values: shapes only)"
    ]
