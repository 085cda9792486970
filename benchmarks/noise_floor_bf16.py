"""The noise floor of ``--precision bf16`` (bf16 weights, fp32 masters): what the bf16 tolerances of
tests/common.py (``BF16_*``) are multiples of, and how far bf16 lands from fp32.

The single-process bf16 reference (paratrain.reference.reference_train) is trained under the two
CPU kernel sets of benchmarks/noise_floor.py (the machine's default and
``MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2``), each in its own process, and with
``--parallel`` the layouts of tests/distributed/test_precision.py on gloo ranks under each. It
prints, like noise_floor.py, losses and pre-clip norms (relative), the largest parameter
difference in units of lr, and ("params>") the largest fraction of one tensor's elements that
differ by more than one bf16 ulp + BF16_PARAM_ATOL_LR lr (two nearly equal fp32 masters may round
to neighbouring bf16 weights: one ulp is 2^-7 = 0.0078 at a LayerNorm weight of 1, 2.6 lr at lr
3e-3, whatever the masters' difference; tests/common.py says why a fraction).

    python benchmarks/noise_floor_bf16.py              # the floor (~1 min on 2 cores)
    python benchmarks/noise_floor_bf16.py --parallel   # + the test's layouts (~3 min)
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

from benchmarks.noise_floor import KERNEL_SETS  # noqa: E402

REFERENCES = {"tiny": {}, "tiny-deep": {"model": "tiny-deep"}}


def _run(cfg) -> dict:
    from paratrain.reference import reference_train

    ref = reference_train(cfg)
    return {"losses": ref.losses, "grad_norms": ref.grad_norms, "state": ref.state}


def worker(out: str, parallel: bool) -> None:
    import torch

    from tests.common import BASE
    from tests.distributed.test_precision import LAYOUTS, config, run_layouts

    torch.set_num_threads(1)
    results: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name, changes in REFERENCES.items():
        for precision in ("bf16", "fp32"):
            results[name, precision] = _run(BASE.replace(precision=precision, **changes))
    if parallel:
        for world, names in LAYOUTS.items():
            for name, res in zip(names, run_layouts(world, names)):
                results[name, "parallel"] = {"losses": res["losses"], "grad_norms": res["grad_norms"],
                                             "state": res["full_state"]}
                results[name, "ref"] = _run(BASE.replace(precision="bf16", steps=config(name).steps))
    torch.save(results, out)


def deviation(a: dict, b: dict, lr: float) -> list[float | str]:
    from tests.common import bf16_param_excess

    def rel(xs, ys):
        return max(abs(x - y) / abs(y) for x, y in zip(xs, ys, strict=True))

    raw, where = 0.0, ""
    for k, v in b["state"].items():
        d = (a["state"][k].double() - v.double()).abs().max().item()
        if d > raw:
            raw, where = d, k
    from tests.common import BF16_PARAM_ATOL_LR

    frac, _ = bf16_param_excess(a["state"], b["state"], BF16_PARAM_ATOL_LR * lr)
    return [rel(a["losses"], b["losses"]), rel(a["grad_norms"][:1], b["grad_norms"][:1]),
            rel(a["grad_norms"], b["grad_norms"]), raw / lr, frac, where]


def row(label: str, values: list[float | str]) -> str:
    return f"{label:34s} " + " ".join(f"{v:9.2e}" for v in values[:-1]) + f"  {values[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", action="store_true", help="also train the test's layouts on gloo ranks")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.parallel)

    import torch

    from tests.common import BASE, BF16_FIRST_NORM_RTOL, BF16_LOSS_RTOL, BF16_NORM_RTOL, BF16_PARAM_FRACTION
    from tests.distributed.test_precision import LAYOUTS

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kset, env in KERNEL_SETS.items():
            out = os.path.join(tmp, f"{kset}.pt")
            cmd = [sys.executable, __file__, "--worker", out] + (["--parallel"] if args.parallel else [])
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
            runs[kset] = torch.load(out, weights_only=False)
    print("kernel sets: " + ", ".join(f"{k} = {r['capability']}" for k, r in runs.items()))
    header = (f"{'':34s} {'loss rel':>9s} {'norm1 rel':>9s} {'norm rel':>9s} {'param/lr':>9s} {'params>':>9s}"
              f"  worst parameter (raw)\n{'tolerance (tests/common.py)':34s} {BF16_LOSS_RTOL:9.2e} "
              f"{BF16_FIRST_NORM_RTOL:9.2e} {BF16_NORM_RTOL:9.2e} {'':9s} {BF16_PARAM_FRACTION:9.2e}")
    a, b = runs["default"], runs["avx2"]
    lr = BASE.lr
    print("\nbf16 reference floor\n" + header)
    for name in REFERENCES:
        print(row(f"{name} bf16 default vs avx2", deviation(a[name, "bf16"], b[name, "bf16"], lr)))
    print("\nbf16 vs fp32 (the same kernel set)\n" + header)
    for name in REFERENCES:
        for kset, r in runs.items():
            print(row(f"{name} {kset}", deviation(r[name, "bf16"], r[name, "fp32"], lr)))
    if args.parallel:
        print("\nparallel bf16 layout vs the bf16 reference of the same kernel set\n" + header)
        for names in LAYOUTS.values():
            for name in names:
                for kset, r in runs.items():
                    print(row(f"{name} {kset}", deviation(r[name, "parallel"], r[name, "ref"], lr)))


if __name__ == "__main__":
    main()
