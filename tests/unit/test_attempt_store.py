"""How the ranks of one attempt under torchrun's agent store find a namespace of their own
(:func:`paratrain.launch.attempt_store`): the same for every rank even when their hosts' restart
counts differ (an agent restarts its ranks uncounted after another host opened a new round), and
never one an earlier attempt wrote into, whose keys (dead ranks' addresses) the store still holds."""

from __future__ import annotations

import datetime
import threading

import torch.distributed as dist

from paratrain.launch import attempt_store

TIMEOUT = datetime.timedelta(seconds=20)


def _attempt(port: int, counts: list[int]) -> list[tuple[str, int]]:
    """Every rank in a thread, each with its own client and restart count: (what it sees under its
    namespace of the key rank 0 set there, the attempt number it got)."""
    out: list = [None] * len(counts)

    def rank(r: int) -> None:
        client = dist.TCPStore("127.0.0.1", port, len(counts), is_master=False, timeout=TIMEOUT)
        store, attempt = attempt_store(client, r, len(counts), TIMEOUT, counts[r])
        if r == 0:
            store.set("probe", "from rank 0")
        store.wait(["probe"], TIMEOUT)
        out[r] = (store.get("probe").decode(), attempt, store)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(counts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(o is not None for o in out), out
    return out


def test_ranks_with_different_restart_counts_share_a_fresh_namespace_and_the_largest_count():
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    first = _attempt(server.port, [0, 0, 0])
    assert [(seen, n) for seen, n, _ in first] == [("from rank 0", 0)] * 3
    server.set("paratrain/join/2", "a-dead-ranks-nonce")  # what a failed attempt's rank 2 left behind
    # the next attempt: the host of ranks 0 and 1 counted a restart, rank 2's restarted uncounted
    again = _attempt(server.port, [1, 1, 0])
    assert [n for _, n, _ in again] == [1, 1, 1]  # rank 2 resumes from the checkpoint too
    assert all(seen == "from rank 0" for seen, _, _ in again)
    old, new = first[0][2], again[0][2]
    new.set("only-new", "x")
    assert not old.check(["only-new"])  # a namespace of its own: nothing of the first attempt is read
