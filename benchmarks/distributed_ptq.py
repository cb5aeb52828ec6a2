"""GPTQ calibration with 1 vs 2 processes on the same total data (issue 13): wall time, per-rank peak memory.

SmolLM2-135M (the embedded GGUF), GPTQ W4 g64 symmetric, calibration windows of WikiText-2 valid (stdlib
source without it). The 1-process run uses 1 thread; each of the 2 gloo processes uses 1 thread and
calibrates on its round-robin half of the windows (Hessians all-reduced, each block's layers solved
round-robin by rank and broadcast) — the same engine the GPTQ callback runs under DDP and FSDP2. The
codes of both runs are compared (they must be identical), and the wall-time ratio is printed.

    .venv/bin/python benchmarks/distributed_ptq.py --num-samples 32 --seq-len 512

Goal: time ∝ 1/N for the Hessian and solve parts (ratio 1-process / 2-process close to 2 on 2 free cores).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peak_memory import peak_mb, reset_peak

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.calibration.distributed import shard
from lightning_quant.data import stdlib_text, token_windows, wikitext2_path
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.models import load_causal_lm, load_tokenizer

SPEC = QuantSpec(4, 64, symmetric=True)


def _calibration(num: int, seq_len: int) -> torch.Tensor:
    path = wikitext2_path("valid")
    text = path.read_text(encoding="utf-8") if path is not None else stdlib_text(2_000_000)
    ids = load_tokenizer("smollm2")(text, return_tensors="pt").input_ids
    windows = token_windows(ids, seq_len, num)
    if windows.shape[0] < num:
        raise SystemExit(f"only {windows.shape[0]} windows of {seq_len} tokens available.")
    return windows


def _run(batches: list[torch.Tensor]) -> tuple[float, float, dict]:
    model = load_causal_lm("smollm2")
    reset_peak()
    t0 = time.perf_counter()
    quantize_model(model, SPEC, "gptq", calibration=batches, config=GPTQConfig(batch_size=1))
    wall = time.perf_counter() - t0
    codes = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    return wall, peak_mb(), codes


def _worker(rank: int, port: int, out: str, batches: list[torch.Tensor]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        wall, peak, codes = _run(shard(batches))
        torch.save({"wall": wall, "peak": peak, "codes": codes}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    batches = list(_calibration(args.num_samples, args.seq_len).split(1))
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(port, out, batches), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]
    torch.set_num_threads(1)
    wall1, peak1, codes1 = _run(batches)
    same = all(torch.equal(codes1[n], r["codes"][n]) for r in ranks for n in codes1)
    wall2 = max(r["wall"] for r in ranks)
    print(f"GPTQ W4 g64 sym, SmolLM2-135M, {args.num_samples} x {args.seq_len} calibration tokens, 1 thread per process")
    print("| processes | wall s | peak MiB per rank | codes equal to 1 process |")
    print("|---|---|---|---|")
    print(f"| 1 | {wall1:.1f} | {peak1:.0f} | - |")
    print(f"| 2 | {wall2:.1f} | {max(r['peak'] for r in ranks):.0f} | {same} |")
    print(f"speed-up 1 -> 2 processes: {wall1 / wall2:.2f}x (ideal 2.00x)")


if __name__ == "__main__":
    main()
