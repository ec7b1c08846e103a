"""One Inductor compile per host (``tpcompile/compile_once.py``): the order of the ranks' compiles.

In one process, on a ``HashStore``: the follower's compile of a graph starts only after the
leader's has ended, the leader posts a graph's turn even when its compile raises (no rank is left
waiting), and a follower whose leader never gets there compiles on its own, with a warning. The
gloo path (the other ranks' FX-graph cache hits) is asserted in ``tests/test_parity.py``.
"""
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

import tpcompile
from tpcompile import compile_once


def _pair():
    store = dist.HashStore()
    return (compile_once.Turns(store, "t/g/0", leader=True), compile_once.Turns(store, "t/g/0", leader=False))


def test_the_other_ranks_compile_after_the_first_has():
    leader, follower = _pair()
    events = []

    def compile_as(name, pause):
        def compile_one(graph):
            events.append((name, graph, "start"))
            time.sleep(pause)
            events.append((name, graph, "end"))
            return name
        return compile_one

    out = []
    t = threading.Thread(target=lambda: out.append([follower.around(compile_as("follower", 0))(g) for g in "ab"]))
    t.start()
    time.sleep(0.2)  # the follower is waiting for graph "a" now
    assert events == []
    assert [leader.around(compile_as("leader", 0.1))(g) for g in "ab"] == ["leader", "leader"]
    t.join(5)
    assert out == [["follower", "follower"]]
    for g in "ab":
        assert events.index(("leader", g, "end")) < events.index(("follower", g, "start")), events


def test_a_leader_that_raises_still_lets_the_others_go():
    leader, follower = _pair()

    def failing(graph):
        raise RuntimeError("lowering failed")

    with pytest.raises(RuntimeError, match="lowering failed"):
        leader.around(failing)("a")
    assert follower.around(lambda graph: graph * 2)("a") == "aa"  # its turn was posted: no wait


def test_a_rank_whose_leader_never_compiles_compiles_on_its_own(monkeypatch):
    monkeypatch.setattr(compile_once, "TIMEOUT", timedelta(milliseconds=100))
    _, follower = _pair()
    with pytest.warns(tpcompile.TPWarning, match="compiling it here instead"):
        assert follower.around(lambda graph: graph)("a") == "a"
