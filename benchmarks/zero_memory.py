"""Per-rank model-state memory under ZeRO 0/1/2/3 at dp 2 and 4, measured, against the formula.

    python benchmarks/zero_memory.py [--model medium] [--dp 2,4] [--precision bf16 [--grad-dtype fp32]]

Each layout trains 2 steps (batch 2 sequences of 128 tokens per rank) with the production setup;
then every rank counts the exact bytes of the parameters, gradients and AdamW state it holds
(``paratrain.parallel.memory.model_state_bytes``: distinct storages, views counted once) and the
largest rank is reported next to ZeRO's formula (``plan/formulas.model_state_bytes``, fp32:
P = G = 4, K = 8 bytes per parameter; bf16: 2 + 2 + 12, 2 + 4 + 12 with --grad-dtype fp32:
docs/precision.md). Prints a markdown table.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium")
    parser.add_argument("--dp", default="2,4")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--grad-dtype", default=None, choices=("bf16", "fp32"))
    args = parser.parse_args()
    from paratrain.bench.zero import memory_worker
    from paratrain.config import Layout, TrainConfig
    from paratrain.launch import launch
    from paratrain.models.configs import get_model_config, param_count
    from paratrain.plan.formulas import model_state_bytes

    psi = param_count(get_model_config(args.model))
    mib = 2**20
    what = args.precision + (f", {args.grad_dtype} gradients" if args.grad_dtype else "")
    print(f"model {args.model}: {psi:,} parameters ({what}); MiB per rank, the largest rank\n")
    print("| dp | zero | params | grads | AdamW state | total | formula total | vs zero 0 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dp in (int(x) for x in args.dp.split(",")):
        base = None
        for zero in (0, 1, 2, 3):
            cfg = TrainConfig(model=args.model, layout=Layout(dp=dp, zero=zero), steps=2, global_batch=2 * dp,
                              seq_len=128, warmup_steps=1, eval_every=0, sample_tokens=0, checkpoint=False,
                              progress=False, precision=args.precision, grad_dtype=args.grad_dtype)
            cfg.validate()
            params, grads, opt = max(launch(memory_worker, (cfg,), dp).values(), key=sum)
            total = params + grads + opt
            base = base or total
            want = model_state_bytes(psi, zero, dp, args.precision, 4 if args.grad_dtype == "fp32" else None).total
            print(f"| {dp} | {zero} | {params / mib:.1f} | {grads / mib:.1f} | {opt / mib:.1f} | "
                  f"{total / mib:.1f} | {want / mib:.1f} | {total / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
