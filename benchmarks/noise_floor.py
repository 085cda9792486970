"""How far legal float reordering moves the single-process reference: the noise floor the
equivalence tests' tolerances (tests/common.py) are multiples of.

For each reference configuration the equivalence tests use, the reference is trained under two
CPU kernel sets, each in its own process (the variables must be set before torch loads):

* ``default``: the machine's own (AVX-512 here), and
* ``avx2``: ``MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2`` (the first changes matmul
  rounding, the second every other ATen kernel),

and once more in fp64 (the "exact" answer, to within ~1e-16). It prints, per quantity, the
largest deviation of each fp32 run from fp64 and of the two fp32 runs from each other:

* losses and pre-clip gradient norms: max over steps of |x - x_ref| / |x_ref|;
* parameters: max over elements of |p - p_ref|, in units of the peak learning rate (AdamW moves
  an element by at most ~lr per step, so a wrong shard, reduction or scale shows as O(lr)).

With ``--parallel`` it also trains a few layouts on gloo ranks under each kernel set and prints
how far they land from that kernel set's reference: the deviations the tests actually see.

    python benchmarks/noise_floor.py              # the floor, ~1 min on 2 cores
    python benchmarks/noise_floor.py --parallel   # + parallel layouts, ~3 min
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KERNEL_SETS = {"default": {}, "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}

# (name, TrainConfig changes from tests.common.BASE): every reference the equivalence tests train
REFERENCES = {
    "tiny": {},
    "tiny-untied": {"untie_embeddings": True},
    "tiny-odd": {"model": "tiny-odd"},
    "tiny-odd-untied": {"model": "tiny-odd", "untie_embeddings": True},
    "tiny-deep": {"model": "tiny-deep"},
    "tiny-batch12": {"global_batch": 12},  # dp 3
}
# (name, reference, layout): one or two layouts per kind of reordering (dp sums, tp slices, a
# padded vocabulary, pipeline micro-batches, ZeRO shards, dp 3's non-power-of-two scale)
LAYOUTS = [
    ("dp4-accum2", "tiny", dict(dp=4, microbatches=2)),
    ("tp4", "tiny", dict(tp=4)),
    ("odd-tp4-sp-untied", "tiny-odd-untied", dict(tp=4, sequence_parallel=True)),
    ("pp2-1f1b", "tiny", dict(pp=2, microbatches=4, schedule="1f1b")),
    ("z3-dp2-tp2-sp", "tiny", dict(dp=2, tp=2, zero=3, sequence_parallel=True)),
    ("z2-dp3", "tiny-batch12", dict(dp=3, zero=2)),
]


def reference_config(name: str):
    from tests.common import BASE

    return BASE.replace(**REFERENCES[name])


def train_reference(cfg, dtype) -> dict:
    """paratrain.reference.reference_train with the model and optimizer in ``dtype``."""
    import torch

    from paratrain.data import get_batch, load_corpus
    from paratrain.models.gpt import build_reference
    from paratrain.optim import lr_at, make_optimizer, set_lr

    corpus = load_corpus(cfg.data)
    model = build_reference(cfg.model_config(), cfg.seed, "cpu").to(dtype)
    opt = make_optimizer(model.named_parameters(), cfg)
    losses, norms, grads = [], [], {}
    for step in range(1, cfg.steps + 1):
        x, y = get_batch(corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, step)
        set_lr(opt, lr_at(step, cfg))
        loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        if step == 1:  # the clipped gradients of the first step (tests/distributed/test_tensor_parallel.py)
            grads = {k: p.grad.double().clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "grad_norms": norms, "grads": grads,
            "state": {k: v.detach().double().clone() for k, v in model.state_dict().items()}}


def worker(out: str, parallel: bool) -> None:
    """In a process of one kernel set: every reference (fp32 and fp64) and, optionally, layouts."""
    import torch

    from tests.common import train_ranks_fn, with_layout
    from tests.harness import run_ranks

    torch.set_num_threads(1)
    results: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name in REFERENCES:
        cfg = reference_config(name)
        results[name, "fp32"] = train_reference(cfg, torch.float32)
        results[name, "fp64"] = train_reference(cfg, torch.float64)
    if parallel:
        for name, ref, layout in LAYOUTS:
            cfg = with_layout(reference_config(ref), **layout)
            res = run_ranks(cfg.layout.world_size, train_ranks_fn, cfg)[0]
            results[name, "parallel"] = {"losses": res["losses"], "grad_norms": res["grad_norms"],
                                         "state": {k: v.double() for k, v in res["full_state"].items()}}
    torch.save(results, out)


def deviation(a: dict, b: dict, lr: float) -> list[float | str]:
    """How far run ``a`` is from run ``b``: [losses rel, step-1 norm rel, norm rel, params / lr,
    step-1 clipped gradients as a fraction of the test's elementwise tolerance, worst parameter]."""
    from tests.common import GRAD_ATOL, GRAD_RTOL

    def rel(xs, ys):
        return max(abs(x - y) / abs(y) for x, y in zip(xs, ys, strict=True))

    worst, where = 0.0, ""
    for k, v in b["state"].items():
        d = (a["state"][k] - v).abs().max().item()
        if d > worst:
            worst, where = d, k
    grads = max(((a["grads"][k] - g).abs() / (GRAD_ATOL + GRAD_RTOL * g.abs())).max().item()
                for k, g in b["grads"].items()) if a.get("grads") else float("nan")
    return [rel(a["losses"], b["losses"]), rel(a["grad_norms"][:1], b["grad_norms"][:1]),
            rel(a["grad_norms"], b["grad_norms"]), worst / lr, grads, where]


def row(label: str, values: list[float | str]) -> str:
    cells = [f"{v:9.2e}" if v == v else f"{'-':>9s}" for v in values[:-1]]  # nan: not measured
    return f"{label:38s} " + " ".join(cells) + f"  {values[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", action="store_true", help="also train a few layouts on gloo ranks")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.parallel)

    import torch

    from tests.common import FIRST_NORM_RTOL, LOSS_RTOL, NORM_RTOL, PARAM_ATOL_LR

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kset, env in KERNEL_SETS.items():
            out = os.path.join(tmp, f"{kset}.pt")
            cmd = [sys.executable, __file__, "--worker", out] + (["--parallel"] if args.parallel else [])
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
            runs[kset] = torch.load(out, weights_only=False)
    print("kernel sets: " + ", ".join(f"{k} = {r['capability']}" for k, r in runs.items()))
    header = (f"{'':38s} {'loss rel':>9s} {'norm1 rel':>9s} {'norm rel':>9s} {'param/lr':>9s} {'grad1':>9s}"
              "  worst parameter\n" + f"{'tolerance (tests/common.py)':38s} {LOSS_RTOL:9.2e} "
              f"{FIRST_NORM_RTOL:9.2e} {NORM_RTOL:9.2e} {PARAM_ATOL_LR:9.2e} {1:9.2e}")
    print("\nreference floor\n" + header)
    a, b = runs["default"], runs["avx2"]
    worst = [0.0] * 5
    for name in REFERENCES:
        lr = reference_config(name).lr
        for label, x, y in [(f"{name} default fp32 vs fp64", a[name, "fp32"], a[name, "fp64"]),
                            (f"{name} avx2 fp32 vs fp64", b[name, "fp32"], b[name, "fp64"]),
                            (f"{name} default vs avx2 fp32", a[name, "fp32"], b[name, "fp32"])]:
            values = deviation(x, y, lr)
            worst = [max(w, v) for w, v in zip(worst, values)]
            print(row(label, values))
    print(row("floor (worst of the above)", [*worst, ""]))
    if args.parallel:
        print("\nparallel layout vs the fp32 reference of the same kernel set\n" + header)
        for name, ref, _ in LAYOUTS:
            lr = reference_config(ref).lr
            for kset, r in runs.items():
                print(row(f"{name} {kset}", deviation(r[name, "parallel"], r[ref, "fp32"], lr)))


if __name__ == "__main__":
    main()
