"""MeshTensor's methods are installed from the tables of torchmesh/tensor/methods.py and
declared for type checkers in the class body of torchmesh/tensor/mesh_tensor.py (under
TYPE_CHECKING). The two lists must name the same methods, or a type checker would flag a
valid call or miss a typo."""

import ast
import inspect

import torch

import torchmesh as tm
from torchmesh.tensor import elementwise as ew
from torchmesh.tensor import mesh_tensor, methods


def declared() -> set[str]:
    tree = ast.parse(inspect.getsource(mesh_tensor))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MeshTensor"]
    blocks = [n for n in cls.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    return {f.name for b in blocks for f in b.body if isinstance(f, ast.FunctionDef)}


def installed() -> set[str]:
    return (
        set(ew.OPERATORS)
        | set(ew.REFLECTED)
        | set(ew.UNARY_OPERATORS)
        | set(ew.TORCH_ELEMENTWISE)
        | set(ew.FUNCTIONAL_METHODS)
        | set(methods.METHODS)
        | {"where"}
    )


def test_every_installed_method_is_declared_and_nothing_else():
    assert declared() == installed(), (sorted(installed() - declared()), sorted(declared() - installed()))


def test_declared_methods_exist_at_run_time_and_compute():
    mesh = tm.Mesh("tp:2", rules="ff:tp")
    x = tm.distribute(torch.arange(1.0, 9.0).reshape(2, 4), "batch ff", mesh)
    for name in declared():
        assert callable(getattr(tm.MeshTensor, name)), name
    assert torch.equal((x * 2 + 1).sqrt().full(), (torch.arange(1.0, 9.0).reshape(2, 4) * 2 + 1).sqrt())
    assert torch.equal(x.sum("ff").full(), torch.arange(1.0, 9.0).reshape(2, 4).sum(1))
