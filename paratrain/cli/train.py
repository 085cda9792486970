"""``paratrain train``: validate, launch the ranks, then report (table, plot, sample)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from paratrain.cli.common import (
    DEFAULT_NPROC,
    GIVEN_RANGES,
    LAYOUT_FIELDS,
    add_train_args,
    build_train_config,
    check_batch_memory,
    write_json,
)
from paratrain.cli.rundir import RunFolder, claim
from paratrain.cli.train_report import format_failure, interrupted_line, report
from paratrain.config import Layout, TrainConfig, check_range, vocab_padding_note
from paratrain.errors import ConfigError

DESCRIPTION = f"""\
Train a GPT on the local processes with the given layout. With no options: the built-in tiny GPT
on the Python standard library's sources, 2 data-parallel processes (gloo on CPU, NCCL on CUDA),
{TrainConfig().steps} steps. Writes metrics.jsonl, config.json, summary.json, loss.png and a
checkpoint into the run folder. Under an outside torchrun (multi-node), each rank runs this same
command and --nproc is ignored.

examples:
  paratrain train                                  # the default job
  paratrain train --nproc 4 --dp 4 --steps 100     # 4 data-parallel ranks
  paratrain train --dp 2 --microbatches 4          # gradient accumulation
  paratrain train --config run.toml --lr 1e-3      # a config file, one flag overriding it"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with a parallel layout",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    g = p.add_argument_group("planner")
    g.add_argument("--plan", choices=("auto",), help="auto: search the layouts the runtime implements for "
                   f"--nproc local processes (default {DEFAULT_NPROC}), the model and the batch (layout flags "
                   "given pin that part), train with the fastest predicted one, and print predicted vs "
                   "measured step time and memory per rank at the end")
    p.add_argument("--overwrite", action="store_true", help="if --out already holds a run, move that folder "
                   "aside (to NAME.old-<time>) and start afresh; without it such a folder is refused")
    g.add_argument("--profile", metavar="PATH", help="device profile for --plan auto (default: the one "
                   "`paratrain calibrate` writes; without one, the catalog's nominal cpu)")
    g = p.add_argument_group("Hugging Face model (instead of --model; pip install 'paratrain[hf]')")
    g.add_argument("--hf", choices=("gpt2", "llama"), help="train transformers' GPT2LMHeadModel or LlamaForCausalLM "
                   "with random weights from --seed (nothing is downloaded), by its ready tensor-parallel plan "
                   "and stage spec (paratrain/models/hf.py)")
    g.add_argument("--hf-config", metavar="JSON|FILE", type=hf_config_arg, help="the model's config fields, as a "
                   "JSON object or a JSON file, e.g. '{\"n_layer\": 4, \"n_embd\": 128, \"n_head\": 4}'; the rest "
                   "are transformers' defaults (dropout 0)")
    p.set_defaults(run=run)


def hf_config_arg(value: str) -> str:
    """--hf-config: JSON text, or the path of a JSON file; kept as compact JSON text."""
    import json

    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"neither a JSON object nor a readable file: {value!r} ({e.strerror})") \
                from None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {value!r}") from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of config fields, got {value!r}")
    return json.dumps(fields, sort_keys=True)


SEARCHED = ("dp", "pp", "tp", "cp", "zero", "microbatches", "schedule", "virtual_stages", "sequence_parallel",
            "recompute")


def plan_auto(args: argparse.Namespace) -> tuple[TrainConfig, Any]:
    """--plan auto: the base config (model, batch, ...) from the flags without a layout, then the
    planner's choice of layout for the local processes."""
    from paratrain.plan.local import auto_layout, local_hardware

    fixed = {k: getattr(args, k) for k in SEARCHED if getattr(args, k, None) is not None}
    if args.nproc is not None:
        check_range("--nproc", args.nproc, GIVEN_RANGES["nproc"])
    nproc = args.nproc or DEFAULT_NPROC
    plain = dict(vars(args), nproc=None, **{k: None for k in LAYOUT_FIELDS})
    base = build_train_config(argparse.Namespace(**plain)).replace(layout=Layout())
    base.replace(layout=Layout(dp=1)).validate()  # model, batch and the rest, before planning
    hw, source = local_hardware(nproc, args.profile)
    auto = auto_layout(base, nproc, hw, source, fixed)
    return base.replace(layout=auto.layout, nproc=nproc, measure_memory=True), auto


def describe_auto(auto: Any, nproc: int) -> str:
    pred = auto.prediction
    mem = max(sum(m.values()) for m in pred.memory_per_rank)
    shortlist = "; ".join(f"[{lay}]{' (chosen)' if lay == auto.layout else ''} {sec * 1e3:.1f} ms"
                          for lay, sec in auto.candidates)
    return "\n".join([
        f"paratrain train --plan auto: {nproc} local processes; hardware: {pred.source}",
        f"  searched {auto.considered} layouts the runtime implements"
        + " (every dp x pp x cp x tp, ep for a mixture of experts, ZeRO stage, schedule and recomputation)"
        + f"; simulated the fastest {len(auto.candidates)}: {shortlist}",
        f"  chose [{auto.layout}]: predicted {pred.step_time_s * 1e3:.1f} ms per step, {mem / 2**20:.1f} MiB on the "
        f"most loaded rank (model states + activations)",
        f"  why: {auto.explanation}"])


def _default_out(cfg: TrainConfig) -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") if "RANK" in os.environ else None
    stamp = run_id or time.strftime("%Y%m%d-%H%M%S")
    l = cfg.layout
    model = f"hf-{cfg.hf}" if cfg.hf else cfg.model  # not the unused --model default
    base = Path("runs") / (f"{stamp}-{model}-dp{l.dp}pp{l.pp}tp{l.tp}" + (f"cp{l.cp}" if l.cp > 1 else ""))
    out, n = base, 1
    while out.exists() and not run_id:
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_config(cfg: TrainConfig) -> Any:
    """The checks of the config alone (no corpus, no device): the model shape, or ConfigError."""
    model_cfg = cfg.validate()
    check_batch_memory(cfg.global_batch, cfg.seq_len)
    return model_cfg


def check_init_from(cfg: TrainConfig) -> None:
    """--init-from names weights of this model's shapes (read from the file's header; nothing loaded)."""
    path = Path(cfg.init_from or "")
    if not path.exists():
        raise ConfigError(f"--init-from {path} does not exist; give a .safetensors file or a Hugging Face "
                          f"GPT-2 folder with model.safetensors.")
    import torch

    from paratrain.checkpoint.convert import read_init_shapes
    from paratrain.checkpoint.manifest import CheckpointError
    from paratrain.models.gpt import GPT

    try:
        got = read_init_shapes(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        want = {k: tuple(v.shape) for k, v in GPT(cfg.model_config()).state_dict().items()}
    if got != want:
        bad = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        first = bad[0]
        raise ConfigError(f"--init-from {path} holds weights of another shape than model {cfg.model!r}: "
                          f"{len(bad)} tensor(s) differ, e.g. {first} is {got.get(first, 'missing')} there and "
                          f"{want.get(first, 'absent')} here. Give --model the size the weights were trained with.")


def preflight(cfg: TrainConfig) -> Any:
    """Every check that can fail before a process starts (exit 2 on failure)."""
    model_cfg = check_config(cfg)
    if cfg.hf is not None:  # a Hugging Face model: its config's fields exist; byte tokens fit its vocabulary
        if model_cfg.vocab_size < 256:
            raise ConfigError(f"--hf-config: vocab_size {model_cfg.vocab_size} is smaller than the 256 byte tokens "
                              "the training data is made of; give vocab_size 256 or more.")
        if cfg.init_from:
            raise ConfigError("--init-from loads weights of the built-in GPT; with --hf the weights are random.")
        from paratrain.models.hf import parse_hf_config  # imports transformers (and torch): last

        parse_hf_config(cfg.hf, cfg.hf_config)
    from paratrain.data import check_corpus, load_corpus

    corpus = load_corpus(cfg.data, verify=True)  # a prepared folder: every shard's SHA-256, once
    check_corpus(corpus, cfg.seq_len)
    from paratrain.cli.prepare_data import check_resume_data

    check_resume_data(cfg, corpus)
    if cfg.tensorboard:
        from paratrain.tboard import check_available

        check_available()
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was given, but no CUDA device is visible; use "
                              "--device cpu (gloo) or run on a machine with a GPU.")
        if cfg.world_size > torch.cuda.device_count() and "RANK" not in os.environ:
            raise ConfigError(f"{cfg.world_size} processes need {cfg.world_size} GPUs, but "
                              f"{torch.cuda.device_count()} are visible.")
    return model_cfg, corpus


def run(args: argparse.Namespace) -> int:
    auto, notes = None, []
    if args.resume is not None:
        if args.plan == "auto" or args.init_from:
            raise ConfigError("--resume continues a run as it was saved; it cannot be combined with --plan auto "
                              "or --init-from.")
        from paratrain.cli.resume import resume_config

        cfg, notes = resume_config(args)
    elif args.plan == "auto":
        cfg, auto = plan_auto(args)
    else:
        cfg = build_train_config(args)
    from paratrain.cli.prepare_data import data_vocab

    cfg = data_vocab(cfg)  # a prepared --data folder: the embedding follows its tokenizer
    if cfg.init_from:
        check_init_from(cfg)
    model_cfg, corpus = preflight(cfg)
    from paratrain.launch import RankEnv, prestart, start_method

    start_method()  # PARATRAIN_START_METHOD, if set, names one (ConfigError: exit 2)
    if cfg.world_size > 1:
        prestart()  # every check passed: the ranks' server imports torch while this process goes on
    from paratrain.faults import Fault

    fault = Fault.from_env()  # PARATRAIN_FAULT, parsed once, before any rank starts

    lead = RankEnv.from_env().rank == 0
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    cfg = cfg.replace(out=str(out))
    # a rank restarted by an outside torchrun (--max-restarts there) continues its own run's folder
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    folder = claim(out, overwrite=bool(getattr(args, "overwrite", False)),
                   resume=cfg.resume_from is not None or restarted) if lead else None
    try:
        if lead:
            for note in notes:
                print(f"paratrain train: passed over a damaged checkpoint: {note}", file=sys.stderr)
            if cfg.resume_from:
                from paratrain.checkpoint.manifest import read
                from paratrain.cli.resume import truncate_metrics

                step = read(Path(cfg.resume_from)).step
                truncate_metrics(out, step)  # the lines after the checkpoint are trained again
                print(f"paratrain train: resuming {out} from {cfg.resume_from} (step {step})", flush=True)
            start_report(cfg, model_cfg, corpus, auto, folder)
        from paratrain.data import CorpusCheck

        return _launch_and_report(cfg, CorpusCheck.of(corpus), auto, lead, out, fault)
    finally:
        if folder is not None:
            folder.release()


def start_report(cfg: TrainConfig, model_cfg: Any, corpus: Any, auto: Any, folder: RunFolder) -> None:
    """The lead's header, and config.json in the (claimed, empty) run folder."""
    from paratrain.models.configs import param_count

    if auto is not None:
        print(describe_auto(auto, cfg.world_size), flush=True)
    write_json(folder.path / "config.json", dataclasses.asdict(cfg))
    padding = vocab_padding_note(model_cfg, cfg.layout.tp)
    moved = f"  (the previous run in it was moved to {folder.moved_to})\n" if folder.moved_to else ""
    print(f"paratrain train: {model_cfg.name if cfg.hf else cfg.model} ({param_count(model_cfg):,} parameters) on "
          f"{cfg.world_size} process(es) [{cfg.layout}]\n  data: {corpus.describe()}\n"
          + (f"  vocab: {padding}\n" if padding else "") + f"  out:  {folder.path}\n" + moved, end="", flush=True)
    for warning in corpus.warnings:
        print(f"paratrain: warning: data: {warning}", file=sys.stderr, flush=True)
    if cfg.warmup_steps >= cfg.steps > 1:
        print(f"paratrain: note: the learning-rate warm-up ({cfg.warmup_steps} steps) is as long as the run "
              f"({cfg.steps} steps): the rate never reaches --lr {cfg.lr:g}; --warmup-steps sets it.",
              file=sys.stderr, flush=True)


def _launch_and_report(cfg: TrainConfig, checked: Any, auto: Any, lead: bool, out: Path, fault: Any = None) -> int:
    from paratrain.launch import Interrupted, LaunchError, launch
    from paratrain.train import train_worker

    try:
        results = launch(train_worker, (cfg, checked, fault), cfg.world_size,  # validated: ranks only assert
                         max_restarts=cfg.max_restarts)
    except LaunchError as e:
        print(format_failure(e), file=sys.stderr)
        return 1
    except Interrupted as e:
        if lead:
            print(interrupted_line(e, out, cfg.steps), file=sys.stderr)
        return e.exit_code
    summary = results.get(0)
    if not lead:
        return 0
    if summary is None:
        print("paratrain: error: rank 0 returned no result; the run did not finish.", file=sys.stderr)
        return 1
    if cfg.measure_memory:
        summary["memory_per_rank"] = [summary["memory"]] + [
            (results.get(r) or {}).get("memory") for r in range(1, cfg.world_size)]
    if auto is not None:
        summary["predicted"] = auto.prediction.to_dict()
    if summary.get("diverged"):
        write_json(out / "summary.json", summary)
        print(diverged_message(summary, cfg), file=sys.stderr)
        return 1
    report(summary, out)
    return 0


def diverged_message(summary: dict[str, Any], cfg: TrainConfig) -> str:
    d = summary["diverged"]
    return (f"paratrain: error: {d['why']} (lr {d['lr']:.3g}), so the run stopped there and is not finished; "
            f"no checkpoint was written. metrics.jsonl and summary.json in {summary['out']}/ record it (a "
            f"non-finite value is written as null and listed under \"nonfinite\"). Lower --lr (it was "
            f"{cfg.lr:g}), raise --warmup-steps ({cfg.warmup_steps}) or keep --grad-clip on.")
