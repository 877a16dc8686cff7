"""No gloo chatter: making a dist mesh's process groups prints no "[Gloo] Rank r is connected to
n peer ranks" line (gloo writes one per group and rank from C++, on stdout), anything else the
program prints meanwhile still comes out, and TORCHMESH_VERBOSE=1 shows gloo's lines on stderr."""

from __future__ import annotations

import os
import sys

import torch
from harness import run_distributed

import torchmesh as tm
from torchmesh.comm.dist import gloo_chatter_hidden


def _build_meshes() -> float:
    mesh = tm.Mesh("tp:2", rules="ff:tp", backend="dist")  # the default group, the side group, the mesh's
    total = tm.distribute(torch.arange(4.0), "ff", mesh).sum().item()
    with gloo_chatter_hidden():
        print("kept: printed while a group is made", flush=True)
        os.write(1, b"kept: written to fd 1 while a group is made\n")
    os.environ["TORCHMESH_VERBOSE"] = "1"
    tm.Mesh("dp:1;tp:2", rules="ff:tp", backend="dist")  # new groups: their lines on stderr
    sys.stderr.flush()
    return total


def test_dist_meshes_make_their_groups_quietly(capfd):
    assert run_distributed(_build_meshes, nprocs=2) == [6.0, 6.0]
    out, err = capfd.readouterr()
    assert "[Gloo]" not in out
    assert out.count("kept: printed while a group is made\n") == 2
    assert out.count("kept: written to fd 1 while a group is made\n") == 2
    gloo = [line for line in err.splitlines() if line.startswith("[Gloo]")]
    assert gloo and all("is connected to" in line for line in gloo)  # only the verbose mesh's
