"""``paratrain explain``: print (and with ``--out`` draw) which rank holds which layers and which
slice of each weight, the process groups, and what each rank sends per step. No processes, no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from paratrain.errors import ConfigError

DESCRIPTION = """\
Show one layout as a learner needs to see it: each rank's coordinates (dp, pp, tp; cp and ep
when given), the layers it runs, the slice of every weight it holds (the experts it holds), the
process groups, and the bytes it sends per step on each group, from the formulas the planner
uses (paratrain/core/traffic.py, core/ring.py). Nothing is started and torch is not imported.

example:  paratrain explain --dp 2 --tp 2 --pp 2 --model tiny --out layout.png
          paratrain explain --dp 4 --ep 2 --model tiny-moe      # experts split over 2 of the 4 dp ranks
          paratrain explain --cp 2 --tp 2 --model tiny          # each sequence split over 2 ranks
          paratrain explain --tp 2 --hf llama --hf-config llama.json   # a Hugging Face config"""


def register(sub: argparse._SubParsersAction) -> None:
    from paratrain.config import SCHEDULES, TrainConfig
    from paratrain.core.traffic import ZERO3_GATHERS

    d = TrainConfig()
    p = sub.add_parser("explain", help="who holds what and sends what, for one layout (no processes)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    for axis in ("dp", "pp", "tp", "cp"):
        p.add_argument(f"--{axis}", type=int, default=1, metavar="N", help=f"{axis} degree (default: 1)")
    p.add_argument("--ep", type=int, default=1, metavar="N", help="expert-parallel degree, carved from dp: the experts "
                   "split N ways (a mixture-of-experts model; default: 1)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage (default: 0)")
    p.add_argument("--microbatches", type=int, default=1, metavar="M", help="micro-batches per step (default: 1)")
    p.add_argument("--virtual-stages", type=int, default=1, metavar="V", help="chunks per pipeline rank (default: 1)")
    p.add_argument("--schedule", default="1f1b", choices=SCHEDULES, help="pipeline schedule (default: 1f1b)")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"),
                   help="activation recomputation (its replays' tp and cp traffic; default: none)")
    p.add_argument("--zero3-gather", default="microbatch", choices=ZERO3_GATHERS,
                   help="ZeRO-3 inside a pipeline: gather per micro-batch or once per step (default: microbatch)")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism over tp")
    p.add_argument("--model", help=f"named model (default: {d.model})")
    p.add_argument("--hf", choices=("gpt2", "llama"), help="a Hugging Face GPT-2 or Llama, as `train --hf` takes "
                   "it (default with --hf-config: the family its fields show)")
    p.add_argument("--hf-config", metavar="JSON|FILE", help="the Hugging Face model's config fields, as JSON text or "
                   "a config.json file (missing fields at transformers' defaults)")
    p.add_argument("--global-batch", type=int, default=d.global_batch, metavar="B",
                   help=f"sequences per step (default: {d.global_batch})")
    p.add_argument("--seq-len", type=int, metavar="L", help=f"tokens per sequence "
                   f"(default: {d.seq_len}, or the model's maximum if smaller)")
    p.add_argument("--out", metavar="PNG", help="also draw the layout into this PNG")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paratrain.config import Layout, TrainConfig
    from paratrain.models.configs import get_model_config
    from paratrain.plan.explain import explain_text

    model = _model(args) if args.hf or args.hf_config else get_model_config(args.model or TrainConfig().model)
    virtual = 2 if args.schedule == "zb-v" and args.virtual_stages == 1 else args.virtual_stages  # ZB-V's V
    layout = Layout(dp=args.dp, pp=args.pp, tp=args.tp, cp=args.cp, ep=args.ep, zero=args.zero,
                    microbatches=args.microbatches, schedule=args.schedule, virtual_stages=virtual,
                    sequence_parallel=args.sequence_parallel, recompute=args.recompute)
    layout.check_degrees()
    if args.seq_len is None:
        args.seq_len = min(TrainConfig().seq_len, model.max_seq_len)
    layout.validate(model, args.global_batch, args.seq_len)  # the one layout rule (paratrain/layout.py)
    print(explain_text(model, layout, args.global_batch, args.seq_len, args.zero3_gather))
    if args.out:
        if not args.out.endswith(".png"):
            raise ConfigError(f"--out {args.out}: give a file name ending in .png.")
        from paratrain.viz.explain import draw_layout

        draw_layout(model, layout, args.global_batch, args.seq_len, Path(args.out))
        print(f"\nwrote {args.out}")
    return 0


def _model(args: argparse.Namespace) -> object:
    """The shape of ``--hf`` / ``--hf-config`` (read as JSON, without transformers or torch)."""
    from paratrain.cli.plan_args import hf_config_model, read_hf_fields
    from paratrain.models.configs import hf_shape

    if args.model:
        raise ConfigError("give either --model or --hf/--hf-config, not both.")
    if args.hf_config is None:
        raise ConfigError(f"--hf {args.hf} needs --hf-config: the model's config fields (JSON text or a file), "
                          "for example --hf-config '{\"n_layer\": 4, \"n_embd\": 128, \"n_head\": 4}'.")
    if args.hf is None:  # the family from the config's model_type or its field names
        return hf_config_model(args.hf_config)
    fields = read_hf_fields(args.hf_config)
    if fields.get("model_type", args.hf) != args.hf:
        raise ConfigError(f"--hf {args.hf} but --hf-config says model_type {fields['model_type']!r}; give the "
                          f"matching --hf, or leave --hf out.")
    return hf_shape(args.hf, fields)
