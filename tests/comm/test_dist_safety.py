"""Safety on real processes: with the check on, ranks that disagree get an error on every
rank within seconds (never a hang); a rank that never arrives makes the others time out;
`tm.show` prints once."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout

import pytest
from harness import DistributedFailure, run_distributed


def diverging_ops() -> None:
    import os

    import torchmesh as tm

    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="dist", check=True, timeout=20)
    x = tm.randn("batch:4 ff:8", mesh, seed=0)
    if int(os.environ["RANK"]) == 3:
        x.sum("batch")  # a different op on one rank
    else:
        x.sum("ff")


def test_diverging_rank_raises_on_every_rank():
    start = time.monotonic()
    with pytest.raises(DistributedFailure) as info:
        run_distributed(diverging_ops, 4, timeout=90)
    text = str(info.value)
    assert time.monotonic() - start < 60
    for rank in range(4):
        assert f"--- rank {rank} ---" in text
    assert text.count("CollectiveMismatch") >= 4
    assert "ranks [0, 1, 2]: all_reduce over ('tp',)" in text and "ranks [3]: all_reduce over ('dp',)" in text
    assert "sum [batch:4@dp ff:8@tp]" in text  # the op and its layout are named


def missing_rank() -> None:
    import os

    import torchmesh as tm

    mesh = tm.Mesh("tp:2", rules="ff:tp", backend="dist", check=True, timeout=5)
    x = tm.randn("ff:8", mesh, seed=0)
    if int(os.environ["RANK"]) == 0:
        x.sum("ff")  # rank 1 never reaches this collective
    else:
        time.sleep(15)


def test_rank_that_never_arrives_times_out():
    with pytest.raises(DistributedFailure) as info:
        run_distributed(missing_rank, 2, timeout=90)
    text = str(info.value)
    assert "CollectiveTimeout" in text and "rank 0 waited more than 5s at all_reduce over ('tp',)" in text


def show_once() -> str:
    import torch

    import torchmesh as tm

    mesh = tm.Mesh("dp:2;tp:2", rules="batch:dp;ff:tp", backend="dist")
    x = tm.distribute(torch.arange(8.0).reshape(2, 4), "batch ff", mesh)
    out = io.StringIO()
    with redirect_stdout(out):
        tm.show(x)
        print(repr(x))
    return out.getvalue()


def test_show_prints_once_and_repr_shows_own_shard():
    outputs = run_distributed(show_once, 4)
    assert "ff[0:2]" in outputs[0] and "dev 0" in outputs[0] and "[4., 5., 6., 7.]" in outputs[0]
    for rank, text in enumerate(outputs):
        assert ("devices by index" in text) == (rank == 0)  # the picture: rank 0 only
        assert text.count("MeshTensor(") == (3 if rank == 0 else 1)  # show (value + picture), and repr
    assert "[dp=1,tp=1] batch[1:2] ff[2:4]: [[6., 7.]]" in outputs[3]


# ---- fault scenarios (issue 18): every rank gets an error, within the timeout, in both modes --
TIMEOUT = 3  # seconds: the tests' collective timeout (tm.Mesh(..., timeout=TIMEOUT))
RAISED = ("CollectiveMismatch", "CollectiveTimeout", "MeshError")


def _outcome(fn) -> tuple[str, str]:
    """What `fn()` raised: (exception type, first line), or ("none", "") if it returned."""
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e).splitlines()[0]
    return "none", ""


def survivable_scenarios(root: str) -> dict:
    """Every scenario that an agreement catches before any real collective, so the process
    groups survive and the next one runs in the same processes; in both modes (check on and
    off), each with its own sizes (so that each is a first use in default mode)."""
    import os

    import torch

    import torchmesh as tm

    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out: dict = {}
    for check in (True, False):
        mode = "check" if check else "default"
        size = 8 * n * (2 if check else 3)  # sizes differ between the modes: new plans in each
        out[f"rules differ/{mode}"] = _outcome(
            lambda: tm.Mesh(f"tp:{n}", rules="ff:tp" if rank else "d:tp", backend="dist", check=check, timeout=TIMEOUT)
        )
        mesh = tm.Mesh(f"tp:{n}", rules="ff:tp", backend="dist", check=check, timeout=TIMEOUT)
        x = tm.randn(f"ff:{size}", mesh, seed=0)
        y = tm.randn(f"ff:{size}", mesh, seed=1)

        def shapes():
            tm.randn(f"ff:{size + 2 * n * (rank == n - 1)}", mesh, seed=0).sum("ff")

        def dtypes():
            tm.randn(f"ff:{size}", mesh, seed=0, dtype=torch.float64 if rank == n - 1 else None).sum("ff")

        def skipped():
            if rank != n - 1:
                x.sum("ff")  # the last rank skips this collective
            x.full()

        def reordered():  # two same-shaped reductions, in the other order on the last rank
            if rank != n - 1:
                a = x.sum("ff")
                b = y.sum("ff")
            else:
                b = y.sum("ff")
                a = x.sum("ff")
            return a, b

        def rank0(call):
            def body():
                if rank == 0:
                    call()
                (x * 2).sum("ff")  # what every rank does next

            return body

        model = tm.nn.Module()
        model.w = tm.randn(f"d:4 ff:{size}", mesh, seed=2)
        ckpt = f"{root}/{mode}"
        tm.save(ckpt, model=model, step=1)  # every rank: fine
        out[f"shapes differ/{mode}"] = _outcome(shapes)
        out[f"dtype differs/{mode}"] = _outcome(dtypes)
        out[f"skipped collective/{mode}"] = _outcome(skipped)
        out[f"reordered collectives/{mode}"] = _outcome(reordered)
        out[f"rank-0-only full()/{mode}"] = _outcome(rank0(lambda: tm.randn(f"ff:{size + n}", mesh).full()))
        out[f"rank-0-only save/{mode}"] = _outcome(rank0(lambda: tm.save(f"{ckpt}_0", model=model)))
        out[f"rank-0-only load/{mode}"] = _outcome(rank0(lambda: tm.load(ckpt, model=model)))
        out[f"rank-0-only export/{mode}"] = _outcome(rank0(lambda: tm.export_state_dict(f"{ckpt}.pt", model)))
        # the groups survived: a correct program still runs, with the right value
        out[f"after/{mode}"] = float(tm.distribute(torch.ones(size), "ff", mesh).sum("ff").full())
    return out


@pytest.mark.parametrize("nprocs", [2, 4])
def test_disagreeing_ranks_raise_on_every_rank(nprocs, tmp_path):
    start = time.monotonic()
    results = run_distributed(survivable_scenarios, nprocs, args=(str(tmp_path),), timeout=240)
    assert time.monotonic() - start < 200
    scenarios = [k for k in results[0] if not k.startswith("after/")]
    assert len(scenarios) == 18
    for rank, outcome in enumerate(results):
        for name in scenarios:
            kind, line = outcome[name]
            assert kind in RAISED, f"rank {rank}, {name}: {kind} {line}"
        for mode in ("check", "default"):
            assert outcome[f"after/{mode}"] == 8 * nprocs * (2 if mode == "check" else 3)
    # what the errors say: which ranks, and where
    assert results[0]["rules differ/default"][0] == "MeshError"
    for mode in ("check", "default"):
        assert all(r[f"reordered collectives/{mode}"][0] == "CollectiveMismatch" for r in results)
        assert all(r[f"dtype differs/{mode}"][0] == "CollectiveMismatch" for r in results)


def stalled_or_crashed(what: str, check: bool) -> str:
    import os

    import torchmesh as tm

    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    mesh = tm.Mesh(f"tp:{n}", rules="ff:tp", backend="dist", check=check, timeout=TIMEOUT)
    x = tm.randn(f"ff:{8 * n}", mesh, seed=0)
    x.sum("ff")  # agreed: the next one is a real collective in both modes
    if rank == n - 1:
        if what == "crashed":
            os._exit(3)
        time.sleep(3 * TIMEOUT)
    start = time.monotonic()
    kind, line = _outcome(lambda: x.sum("ff"))
    result = f"{kind} after {time.monotonic() - start:.1f}s: {line}"
    if what == "crashed":  # the harness reports a dead rank's peers by their errors
        raise AssertionError(f"outcome: {result}")
    return result


@pytest.mark.parametrize(
    "what,check,nprocs",
    # every pair of (what, check mode, process count) once: 4 launches instead of 8
    [("stalled", False, 2), ("stalled", True, 4), ("crashed", False, 4), ("crashed", True, 2)],
    ids=["stalled-default-2", "stalled-check-4", "crashed-default-4", "crashed-check-2"],
)
def test_stalled_or_crashed_rank_raises_within_the_timeout(what, check, nprocs):
    results = (
        run_distributed(stalled_or_crashed, nprocs, args=(what, check), timeout=120, wait_all=True)
        if what == "stalled"
        else None
    )
    if what == "crashed":
        with pytest.raises(DistributedFailure) as info:
            run_distributed(stalled_or_crashed, nprocs, args=(what, check), timeout=120, wait_all=True)
        text = str(info.value)
        assert f"ranks [{nprocs - 1}] did not finish" in text and "exit codes [3]" in text
        assert text.count("outcome: CollectiveTimeout") == nprocs - 1, text
        return
    for rank, line in enumerate(results):
        assert line.startswith("CollectiveTimeout"), f"rank {rank}: {line}"
        assert float(line.split(" after ")[1].split("s:")[0]) < 2 * TIMEOUT + 5, line


# ---- the op named in an error is the op that was running (issue 17.3) ------------------------
def _message(fn) -> str:
    """The whole message of what `fn()` raised ("none" if it returned)."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "none"


def ops_that_name_themselves() -> dict:
    """After an einsum and a local_map (whose name used to stay current), ranks disagree in a
    relayout (both modes), a shift and a backward (check mode): each error names that op."""
    import os

    import torchmesh as tm

    rank = int(os.environ["RANK"])
    out: dict = {}
    for check in (True, False):
        mode = "check" if check else "default"
        size = 8 if check else 12  # new plans and first uses in each mode
        mesh = tm.Mesh("tp:2", rules="ff:tp", backend="dist", check=check, timeout=TIMEOUT)
        x = tm.randn(f"batch:4 ff:{size}", mesh, seed=0)
        tm.einsum("batch ff, ff -> batch", x, tm.randn(f"ff:{size}", mesh, seed=1))
        tm.local_map(lambda t: t * 2, x, out_dims="batch ff")
        out[f"relayout/{mode}"] = _message(lambda: tm.relayout(x, "" if rank == 0 else "batch:tp"))
    mesh = tm.Mesh("sp:2", rules="seq:sp", backend="dist", check=True, timeout=TIMEOUT)
    s = tm.randn("seq:8 d:2", mesh, seed=2)
    out["shift/check"] = _message(lambda: tm.shift(s, "seq", 1 + rank))
    # the same forward on both ranks but for the op (no collective there: w is broadcast over
    # sp); only the backward's all-reduce of w's gradient tells them apart
    w = tm.randn("d:2", mesh, seed=3, requires_grad=True)
    y = s * w if rank == 0 else s + w
    out["backward/check"] = _message(lambda: y.backward(tm.ones("seq:8 d:2", mesh)))
    return out


def test_errors_name_the_running_op():
    results = run_distributed(ops_that_name_themselves, 2, timeout=120)
    for rank, out in enumerate(results):
        for mode in ("check", "default"):
            text = out[f"relayout/{mode}"]
            assert text.startswith("CollectiveMismatch"), f"rank {rank} {mode}: {text}"
            assert "ranks [0]: all_gather over ('tp',)" in text and "ranks [1]: all_to_all over ('tp',)" in text
            size = 8 if mode == "check" else 12
            assert f"in relayout [batch:4 ff:{size}@tp] -> [batch:4 ff:{size}]," in text, text
            assert f"in relayout [batch:4 ff:{size}@tp] -> [batch:4@tp ff:{size}]," in text, text
            assert "einsum" not in text and "local_map" not in text, text
        text = out["shift/check"]
        assert text.startswith("CollectiveMismatch") and "in shift(x, 'seq', 1) of [seq:8@sp d:2]" in text, text
        assert "in shift(x, 'seq', 2) of [seq:8@sp d:2]" in text, text
        text = out["backward/check"]
        assert text.startswith("CollectiveMismatch"), f"rank {rank}: {text}"
        assert "all_reduce over ('sp',) (backward)" in text and "in backward of mul [seq:8@sp d:2] , [d:2]" in text
        assert "in backward of add [seq:8@sp d:2] , [d:2]" in text, text
