"""ZeRO inside a pipeline (issue 13, part 2): what each rank holds and sends per step under ZeRO-1,
ZeRO-2 and ZeRO-3 gathered per micro-batch or once per step (``--zero3-gather``), dp x pp 2.

    python benchmarks/zero3_pipeline.py [--dp 2] [--model small] [--microbatches 4] [--schedule 1f1b] [--steps 4]

Per layout, on every rank: the exact model states after the last step (``model_state_bytes``:
parameters, gradients, AdamW state), the transient peak during it (bytes of ZeRO-3's gathered
units and of the gradient buckets that exist only during the step: ZeRO-2/3's, counted exactly
by wrapping ``ShardedBucket.gather`` / ``free`` and ``_Bucket.allocate`` / ``release``), the dp
group's counters of one step (payload and wire bytes, all-gather calls) and the median step time
(this machine's cores are shared: times are indicative). Prints the largest rank's figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _track_transients() -> dict[str, int]:
    """Count the bytes of gathered units and allocated gradient buckets as they come and go."""
    from paratrain.parallel import data, zero

    live = {"now": 0, "peak": 0}

    def add(nbytes: int) -> None:
        live["now"] += nbytes
        live["peak"] = max(live["peak"], live["now"])

    gather, free = zero.ShardedBucket.gather, zero.ShardedBucket.free
    allocate, release = data._Bucket.allocate, data._Bucket.release

    def gather_(self, async_op=False, tag=None):  # noqa: ANN001, ANN202
        was = self.gathered
        gather(self, async_op, tag)
        add(0 if was else self.padded * self.flat.element_size())

    def free_(self):  # noqa: ANN001, ANN202
        was = self.gathered
        free(self)
        add(-self.padded * self.flat.element_size() if was else 0)

    def allocate_(self, zero=True):  # noqa: ANN001, ANN202
        old = self.buffer
        out = allocate(self, zero)
        add(out.numel() * out.element_size() - (0 if old is None else old.numel() * old.element_size()))
        return out

    def release_(self):  # noqa: ANN001, ANN202
        if self.buffer is not None:
            add(-self.buffer.numel() * self.buffer.element_size())
        release(self)

    zero.ShardedBucket.gather, zero.ShardedBucket.free = gather_, free_
    data._Bucket.allocate, data._Bucket.release = allocate_, release_
    return live


def measure(cfg) -> dict:  # noqa: ANN001 - runs on each rank (paratrain.launch)
    import torch

    from paratrain.launch import RankEnv, init_distributed, set_threads, shutdown_distributed
    from paratrain.train import setup, train_step

    env = RankEnv.from_env()
    set_threads(1, env.local_world_size)
    init_distributed(env, "cpu", 120)
    live = _track_transients()
    try:
        s = setup(cfg, env, torch.device("cpu"))
        s.count_states = True  # the states at the optimizer (ZeRO-3 releases gradient shards at zero_grad)
        times, transient = [], 0
        for step in range(1, cfg.steps + 1):
            if step == cfg.steps:
                before = {op: (o.calls, o.bytes, o.wire_bytes) for op, o in s.mesh.dp.stats.ops.items()}
                base = live["peak"] = live["now"]
            times.append(train_step(s, step)["step_time_s"])
        transient = live["peak"] - base
        ops = {op: tuple(a - b for a, b in zip((o.calls, o.bytes, o.wire_bytes), before.get(op, (0, 0, 0))))
               for op, o in s.mesh.dp.stats.ops.items() if op != "metrics"}
        states = s.states
        return {"states": states.total, "transient": transient, "ops": ops,
                "step_s": statistics.median(times[1:] or times)}
    finally:
        shutdown_distributed(True)


def main() -> None:
    from paratrain.config import Layout
    from tests.common import BASE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--model", default="small")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import importlib
    import os

    from paratrain.launch import launch

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    fn = importlib.import_module("benchmarks.zero3_pipeline").measure
    mib = 2**20
    print(f"{args.model}, dp {args.dp} x pp 2, {args.schedule}, {args.microbatches} micro-batches, global batch "
          f"{args.global_batch} x {args.seq_len} tokens; the largest rank (MiB)\n")
    print("| ZeRO | states after the step | transient peak | states + transient | dp payload / step | "
          "dp wire / step | all-gathers / step | step ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, zero, gather in (("1", 1, "microbatch"), ("2", 2, "microbatch"), ("3, microbatch", 3, "microbatch"),
                               ("3, step", 3, "step")):
        layout = Layout(dp=args.dp, pp=2, zero=zero, microbatches=args.microbatches, schedule=args.schedule)
        cfg = BASE.replace(model=args.model, seq_len=args.seq_len, global_batch=args.global_batch, steps=args.steps,
                           layout=layout, zero3_gather=gather)
        cfg.validate()
        ranks = list(launch(fn, (cfg,), 2 * args.dp).values())
        top = max(ranks, key=lambda r: r["states"] + r["transient"])
        ops = top["ops"]
        payload = sum(b for _, b, _ in ops.values())
        wire = sum(w for _, _, w in ops.values())
        print(f"| {name} | {top['states'] / mib:.2f} | {top['transient'] / mib:.2f} | "
              f"{(top['states'] + top['transient']) / mib:.2f} | {payload / mib:.2f} | {wire / mib:.2f} | "
              f"{ops.get('all_gather', (0,))[0]} | {statistics.median(r['step_s'] for r in ranks) * 1e3:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
