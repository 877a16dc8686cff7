"""mtf.optimize on XLA devices (b:2;m:2 on 4, b:2;m:4 on 8): a few cases of
tests/mtf/test_optimize.py (Adafactor factored and not, with beta1; BERT's Adam with decay;
clip_by_global_norm) against its plain-torch transcriptions of Mesh TF's formulas; the updated
weight and its slots are checked device by device (each XLA device holds its block)."""

from __future__ import annotations

import os

import pytest
import reference
import test_optimize as opt_test
import torch

import torchmesh as tm

MESH = {4: "b:2;m:2", 8: "b:2;m:4"}[int(os.environ.get("CPU_NUM_DEVICES", "4"))]


def xla_run(shape: str, opt) -> tm.MeshTensor:
    dims, rules = opt_test.SHAPES[shape]
    return opt_test.run(tm.Mesh(MESH, rules=rules, backend="xla"), dims, opt)


@pytest.mark.parametrize(
    "shape,option", [("8x12", "min_dim_size_to_factor 4"), ("8x12", "beta1"), ("256x8", "decay_rate adam")]
)
def test_adafactor_on_xla(shape, option):
    dims = opt_test.SHAPES[shape][0]
    names = opt_test.names_sizes(dims)[0]
    want, state, factored = opt_test.ref_adafactor(
        opt_test.weight(dims), opt_test.grads(dims), names, **opt_test.OPTIONS[option]
    )
    opt = opt_test.mtf.optimize.AdafactorOptimizer(**opt_test.OPTIONS[option])
    w = xla_run(shape, opt)
    reference.assert_matches(w, want, names, f"{shape} {option}")
    slots = opt.slots(("w", w))
    if factored:
        vr = slots["w_slot_vr"]
        reference.assert_matches(vr, state["vr"].squeeze(factored[0]), vr.dims, "vr")
    else:
        reference.assert_matches(slots["w_slot_v"], state["v"], names, "v")


def test_adam_and_clipping_on_xla():
    dims = opt_test.SHAPES["8x12"][0]
    w = xla_run("8x12", opt_test.mtf.optimize.AdamWeightDecayOptimizer(0.01, **opt_test.ADAM))
    want = opt_test.ref_adam(opt_test.weight(dims), opt_test.grads(dims), 0.01, **opt_test.ADAM)
    reference.assert_matches(w, want, ["d", "ff"], "adam")
    g = opt_test.grads(dims)[0]
    mesh = tm.Mesh(MESH, rules=opt_test.SHAPES["8x12"][1], backend="xla")
    (clipped,), norm = opt_test.mtf.optimize.clip_by_global_norm([tm.distribute(g, ["d", "ff"], mesh)], 1.0)
    reference.assert_matches(clipped, g / torch.linalg.norm(g), ["d", "ff"], "clipped")
