"""Naming the rank that stopped answering (parallel/heartbeat.py): counters in a store, read twice."""

from __future__ import annotations

import torch.distributed as dist

from colodiffusion.parallel.heartbeat import KEY, CollectiveError, Heartbeat, explain

GLOO_TIMEOUT = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                            "Timed out waiting 5000ms for recv operation to complete")


def test_the_rank_whose_heartbeat_stopped_is_named():
    store = dist.HashStore()
    ranks = [Heartbeat(store, rank, world_size=4, timeout_s=5) for rank in (0, 1)]
    store.add(KEY.format(2), 3)  # rank 2 beat three times, then froze; rank 3 never beat at all
    try:
        assert ranks[0].every == 0.5
        assert ranks[0].silent_ranks() == [2, 3]
        err = explain(GLOO_TIMEOUT, ranks[0], rank=0, timeout_s=5)
    finally:
        for hb in ranks:
            hb.stop()
    assert isinstance(err, CollectiveError)
    assert str(err).startswith("ranks 2, 3 stopped answering (heartbeat stopped")
    assert "gave up after parallel.timeout_s=5 s (Timed out waiting 5000ms" in str(err)


def test_all_heartbeats_alive_means_a_rank_is_stuck_elsewhere():
    store = dist.HashStore()
    ranks = [Heartbeat(store, rank, world_size=2, timeout_s=1) for rank in (0, 1)]
    try:
        err = explain(GLOO_TIMEOUT, ranks[0], rank=0, timeout_s=1)
    finally:
        for hb in ranks:
            hb.stop()
    assert "every other rank's heartbeat is alive" in str(err)


def test_only_collective_failures_are_explained():
    assert explain(ValueError("bad caption"), None, rank=0, timeout_s=5) is None
    assert explain(RuntimeError("DataLoader worker (pid 7) is killed by signal"), None, rank=0, timeout_s=5) is None
    err = explain(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"),
                  None, rank=1, timeout_s=60)
    assert str(err) == ("a peer rank stopped answering (no heartbeat store to tell which), so the collective on "
                        "rank 1 failed (Connection closed by peer [127.0.0.1]:4242).")


def test_no_heartbeat_for_one_process():
    assert Heartbeat.start(rank=0, world_size=1, timeout_s=5) is None
