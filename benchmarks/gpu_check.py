"""GPU check: train gpt2-124m in bf16 on one GPU and report tokens/s, MFU and peak memory, then
check that our data-parallel wrapper (one rank, NCCL) reproduces the reference on that GPU.

    bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --model tiny --steps 4   # dry run of the logic

Model FLOPs per token follow Narayanan et al. 2021, eq. (3) without recomputation:
72 * l * h^2 * (1 + s/(6h) + V/(12 l h)); MFU = FLOPs/token * tokens/s / peak FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def model_flops_per_token(cfg, seq_len: int) -> float:
    l, h, v = cfg.num_layers, cfg.hidden, cfg.vocab_size
    return 72 * l * h * h * (1 + seq_len / (6 * h) + v / (12 * l * h))


def peak_flops(device: str) -> tuple[str, float | None]:
    import torch

    if device != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return name, peak
    return name, None


def train(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "paratrain", "train", "--model", args.model, "--nproc", "1",
           "--device", args.device, "--precision", "bf16", "--steps", str(args.steps),
           "--global-batch", str(args.global_batch), "--seq-len", str(args.seq_len), "--lr", "6e-4",
           "--eval-every", "0", "--sample-tokens", "0", "--no-checkpoint", "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return json.loads((out / "summary.json").read_text())


def dp_equivalence(device: str) -> dict:
    """One rank of our DP wrapper (process group of size 1 on NCCL/gloo) vs the reference."""
    import torch
    import torch.distributed as dist

    from paratrain.config import TrainConfig
    from paratrain.launch import RankEnv, shutdown_distributed
    from paratrain.reference import reference_train
    from paratrain.train import setup, train_step

    cfg = TrainConfig(model="small", steps=5, global_batch=8, seq_len=128, warmup_steps=2, device=device,
                      eval_every=0, sample_tokens=0, checkpoint=False, progress=False)
    ref = reference_train(cfg, device=device)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        s = setup(cfg, RankEnv(), torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
        losses = [train_step(s, i)["loss"] for i in range(1, cfg.steps + 1)]
        state = s.pm.full_state_dict()
    finally:
        shutdown_distributed(True)
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref.losses))
    param_abs = max((state[k].float() - v.float()).abs().max().item() for k, v in ref.state.items())
    return {"max_loss_rel_diff": loss_rel, "max_param_abs_diff": param_abs,
            "ok": loss_rel < 1e-4 and param_abs < 1e-4}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = p.parse_args()
    from paratrain.models.configs import get_model_config

    card, peak = peak_flops(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(args, Path(tmp) / "run")
    fpt = model_flops_per_token(get_model_config(args.model), args.seq_len)
    tps = summary["tokens_per_s"]
    mfu = fpt * tps / peak if peak else None
    eq = dp_equivalence(args.device)
    result = {"device": card, "model": args.model, "precision": "bf16", "steps": args.steps,
              "global_batch": args.global_batch, "seq_len": args.seq_len, "tokens_per_s": tps,
              "step_time_s": summary["step_time_s"], "model_tflops_per_s": fpt * tps / 1e12,
              "peak_bf16_tflops": peak / 1e12 if peak else None, "mfu": mfu,
              "peak_memory_gib": summary["peak_memory_mb"] / 1024,
              "loss": [summary["first_loss"], summary["final_loss"]],
              "dp_equivalence": eq}
    print(json.dumps(result, indent=2))
    print(f"\n{card}: {args.model} bf16, {tps:,.0f} tokens/s, "
          f"{fpt * tps / 1e12:.1f} model TFLOP/s" + (f", MFU {mfu:.1%}" if mfu else "") +
          f", peak memory {result['peak_memory_gib']:.2f} GiB; DP wrapper equivalence "
          f"{'OK' if eq['ok'] else 'FAILED'} (loss rel diff {eq['max_loss_rel_diff']:.1e}, "
          f"param abs diff {eq['max_param_abs_diff']:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if eq["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
