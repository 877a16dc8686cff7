"""tm.Mesh(shape, rules=...): the mesh's 'dim:axis' mapping is its rules; the old keyword
layout= still works for one release and warns (docs/design.md, section "Glossary")."""

import pytest
import torch

import torchmesh as tm


def test_rules_keyword_sets_the_rules_and_repr_shows_it():
    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    assert str(mesh.rules) == "batch:dp;ff:tp"
    assert repr(mesh) == "Mesh('dp:2;tp:2', rules='batch:dp;ff:tp', backend='sim')"
    assert str(tm.Mesh("dp:2;tp:2", "batch:dp;ff:tp").rules) == "batch:dp;ff:tp"  # positional too


def test_layout_keyword_still_works_and_warns_with_the_fix():
    with pytest.warns(DeprecationWarning, match=r"layout=.*deprecated.*Fix: use rules="):
        old = tm.Mesh("dp:2;tp:2", layout="batch:dp;ff:tp")
    new = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp")
    assert repr(old) == repr(new)
    t = torch.arange(32.0).reshape(4, 8)
    x_old, x_new = tm.distribute(t, "batch ff", old), tm.distribute(t, "batch ff", new)
    assert x_old.layout == x_new.layout == {"batch": "dp", "ff": "tp"}
    assert torch.equal(x_old.full(), t)


def test_layout_and_rules_together_is_a_type_error():
    with pytest.raises(tm.ArgumentTypeError, match="both rules= and layout="):
        tm.Mesh("dp:2", rules="batch:dp", layout="batch:dp")
