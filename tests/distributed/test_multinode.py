"""Two hosts for real: network namespaces joined by a veth pair, ``torchrun --nnodes 2`` with the
c10d rendezvous on each, dp 2 x tp 2 across them (the tp pairs inside a host, dp across the
link). Root only; skipped, with the reason, where ``ip netns`` is unavailable.

Not in the suite yet: restarting across the hosts once the link is back. Run by hand it worked
(torchrun --max-restarts 1 on both hosts, the link down for 15 s: both restarted from the
checkpoint of step 6 and ended with 16 steps), but under load it overran the test timeout.

The addresses (10.77.0.1 and .2) exist only inside the two namespaces this test creates and
deletes; no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_train_cli import losses

REPO = Path(__file__).resolve().parents[2]
ADDR = ("10.77.0.1", "10.77.0.2")
RUN = ["--model", "tiny", "--dp", "2", "--tp", "2", "--global-batch", "8", "--seq-len", "32", "--eval-every", "0",
       "--sample-tokens", "0", "--quiet"]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    probe = f"pt-probe-{uuid.uuid4().hex[:6]}"
    r = _ip("netns", "add", probe)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Namespaces a and b, veth ends va (10.77.0.1) and vb (10.77.0.2); yields (a, b, va)."""
    tag = uuid.uuid4().hex[:6]
    a, b, va, vb = f"pt-a-{tag}", f"pt-b-{tag}", f"pt-va-{tag}", f"pt-vb-{tag}"
    try:
        for cmd in (["netns", "add", a], ["netns", "add", b],
                    ["link", "add", va, "type", "veth", "peer", "name", vb],
                    ["link", "set", va, "netns", a], ["link", "set", vb, "netns", b],
                    ["-n", a, "addr", "add", f"{ADDR[0]}/24", "dev", va],
                    ["-n", b, "addr", "add", f"{ADDR[1]}/24", "dev", vb],
                    ["-n", a, "link", "set", va, "up"], ["-n", b, "link", "set", vb, "up"],
                    ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"]):
            r = _ip(*cmd)
            assert r.returncode == 0, f"ip {' '.join(cmd)}: {r.stderr}"
        yield a, b, va
    finally:
        _ip("netns", "del", a)
        _ip("netns", "del", b)


def _node(ns: str, node_rank: int, port: int, cwd: Path, extra: list[str], torchrun: list[str] | None = None
          ) -> subprocess.Popen:
    iface = next(line.split(":")[1].strip().split("@")[0] for line in
                 _ip("-n", ns, "-o", "link", "show").stdout.splitlines() if "pt-v" in line)
    env = dict(os.environ, PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME=iface)
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
           "--node-rank", str(node_rank), "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"{ADDR[0]}:{port}", "--rdzv-id", f"job{port}", "--local-addr", ADDR[node_rank],
           "--rdzv-conf", f"is_host={int(node_rank == 0)},read_timeout=10",
           *(torchrun or []), "-m", "paratrain", "train", *RUN, *extra]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SKIP = _netns_unavailable()


@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_two_hosts_train_like_one_process_and_a_cut_link_ends_the_job(tmp_path):
    from paratrain.config import TrainConfig
    from paratrain.reference import reference_train

    ref = reference_train(TrainConfig(model="tiny", steps=4, global_batch=8, seq_len=32))
    with two_hosts() as (a, b, va):
        nodes = [_node(ns, i, 29611, tmp_path, ["--steps", "4", "--out", "two"]) for i, ns in enumerate((a, b))]
        outs = [p.communicate(timeout=240) for p in nodes]
        assert all(p.returncode == 0 for p in nodes), outs
        assert losses(tmp_path / "two") == pytest.approx(ref.losses, rel=1e-5)

        nodes = [_node(ns, i, 29612, tmp_path, ["--steps", "400", "--timeout", "15", "--out", "cut"])
                 for i, ns in enumerate((a, b))]
        deadline = time.monotonic() + 120
        metrics = tmp_path / "cut" / "metrics.jsonl"
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metrics.exists(), "the job did not start"
        t_cut = time.monotonic()
        assert _ip("-n", a, "link", "set", va, "down").returncode == 0
        # The host with the rendezvous store ends with its ranks' collective timeout (--timeout 15).
        out0, err0 = nodes[0].communicate(timeout=120)
        assert nodes[0].returncode not in (0, None), err0[-3000:]
        assert time.monotonic() - t_cut < 90, f"took {time.monotonic() - t_cut:.0f} s to end after the cut"
        assert "timed out" in err0.lower() or "connection" in err0.lower(), err0[-3000:]
        # On the other host the ranks end the same way; torchrun's own agent there then keeps
        # retrying the unreachable store (torch's behaviour, not ours), so it is stopped here.
        deadline = time.monotonic() + 90
        while _workers(nodes[1].pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _workers(nodes[1].pid), "the far host's ranks outlived the cut"
        nodes[1].kill()
        nodes[1].communicate(timeout=30)


def _workers(pid: int) -> list[int]:
    """The training processes under the torchrun ``pid`` (its children running paratrain)."""
    from tests.cli.test_launcher_robust import children

    out = []
    for c in children(pid):
        try:
            if b"paratrain" in Path(f"/proc/{c}/cmdline").read_bytes():
                out.append(c)
        except OSError:
            pass
    return out
