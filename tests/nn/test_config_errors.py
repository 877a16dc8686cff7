"""Bad configuration values raise tm.ConfigError when the model, layer or optimizer is built;
a bad value given to an op when it is called raises tm.ArgumentError; DimError is only about
dims (docs/design.md, section "Errors")."""

import pytest

import torchmesh as tm

LM = dict(vocab=8, d_model=8, heads=2, d_head=4, ff=8, layers=1, seq=4)


def _mesh():
    return tm.Mesh("tp:2", rules="ff:tp")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tm.nn.Dropout(p=1.5), r"Dropout: p=1\.5 is outside \[0, 1\).*Fix: Dropout\(p=0\.1\)"),
        (lambda: tm.nn.Dropout(p=-0.1), r"Dropout: p=-0\.1 is outside \[0, 1\)"),
        (lambda: tm.nn.FeedForward(_mesh(), "d:4", "ff:8", activation="swish9"), r"unknown activation 'swish9'"),
        (lambda: tm.nn.LMConfig(**{**LM, "d_model": 0}), r"LMConfig: d_model must be positive; got 0"),
        (lambda: tm.nn.LMConfig(**LM, norm="batchnorm"), r"LMConfig: norm='batchnorm'"),
        (lambda: tm.nn.LMConfig(**LM, dropout=1.0), r"LMConfig: dropout must be in \[0, 1\); got 1\.0"),
        (lambda: tm.nn.MultiHeadAttention(_mesh(), 8, heads=6, d_head=2, kv_heads=4), r"heads=6 must be a multiple"),
        (lambda: tm.optim.Adafactor(tm.nn.Linear(_mesh(), "d:4", "ff:8"), lr=-1.0), r"Adafactor: lr must be positive"),
    ],
)
def test_bad_config_values_are_config_errors(build, message):
    with pytest.raises(tm.ConfigError, match=message) as info:
        build()
    assert isinstance(info.value, ValueError) and not isinstance(info.value, tm.DimError)


def test_bad_op_arguments_are_argument_errors():
    x = tm.ones("batch:2 heads:2 seq:4 d_head:4", _mesh())
    with pytest.raises(tm.ArgumentError, match=r"attention\(dropout=1\.5\): dropout is the probability"):
        tm.attention(x, x.rename(seq="kv_seq"), x.rename(seq="kv_seq"), dropout=1.5)
    with pytest.raises(tm.ArgumentError, match=r"attention\(dropout=1\.0\).*in \[0, 1\)"):
        tm.attention(x, x.rename(seq="kv_seq"), x.rename(seq="kv_seq"), dropout=1.0)
    with pytest.raises(tm.ArgumentError, match=r"dropout\(p=2\.0\): p is a probability"):
        tm.dropout(x, p=2.0)
