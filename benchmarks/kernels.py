"""Kernel benchmark: cuBLAS fp16 vs W4A16 / W8A16 (Triton) vs the int8 GEMM, on CUDA.

    python benchmarks/kernels.py                 # full grid (H200 goals checked at the end)
    python benchmarks/kernels.py --quick         # one shape, M in {1, 64}
    python benchmarks/kernels.py --cpu-smoke     # tiny shapes through the reference: checks the script only

For K x N in {4096x4096, 4096x14336, 14336x4096} and M in {1, 16, 64, 256, 4096} it times (CUDA
events, median of ``--runs`` runs after warm-up, L2 flushed before every run) ``y = x @ W^T`` with

* ``fp16``: ``F.linear`` on a float16 weight (cuBLAS),
* ``w4g128-sym`` / ``w4g128-asym`` and their act-order variants ``-ao`` (input gathered once per call),
* ``w8-ch``: W8A16, per-channel symmetric,
* ``int8``: int8 x int8 -> int32 (the LLM.int8 / W8A8 core; activation quantization not included),

and prints, per row, the time, the speed-up over fp16 (``fp16 time / time``) and the fraction of the
memory-bandwidth roofline reached (``bytes moved / peak bandwidth / time``; bytes = packed weight +
scales + zeros + activations + output). Goals (H200, W4A16 g128 sym vs fp16): M=1 >= 3.3x,
M=16 >= 3.0x, M=64 >= 2.5x, M=4096 >= 0.9x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lightning_quant import QuantSpec, packing
from lightning_quant import primitives as P
from lightning_quant.kernels.int8_matmul import int8_matmul
from lightning_quant.kernels.wq_matmul import wq_linear
from lightning_quant.quantized import QuantizedWeight

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
ROWS = [1, 16, 64, 256, 4096]
GOALS = {1: 3.3, 16: 3.0, 64: 2.5, 4096: 0.9}
#: name -> (spec, act_order); None = not a weight-only method
METHODS = {
    "w4g128-sym": (QuantSpec(4, 128), False),
    "w4g128-asym": (QuantSpec(4, 128, symmetric=False), False),
    "w4g128-sym-ao": (QuantSpec(4, 128), True),
    "w4g128-asym-ao": (QuantSpec(4, 128, symmetric=False), True),
    "w8-ch": (QuantSpec(8, -1), False),
}
PEAK_BW_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def _packed(w: torch.Tensor, spec: QuantSpec, act_order: bool, gen: torch.Generator) -> dict:
    """Kernel operands for ``w [N, K]`` (act-order: GPTQ-style random column order, equal groups)."""
    k = w.shape[1]
    g_idx = None
    if act_order:
        order = torch.randperm(k, generator=gen).to(w.device)
        g_idx = torch.empty(k, dtype=torch.long, device=w.device)
        g_idx[order] = torch.arange(k, device=w.device) // spec.group_size
    scale, zero = P.compute_qparams(w, spec, g_idx)
    qw = QuantizedWeight.from_float(w, spec, scale, zero, g_idx=g_idx)
    codes, perm = qw.codes, None
    if g_idx is not None:
        perm = torch.argsort(g_idx, stable=True)
        codes = codes[:, perm]
    return {"qweight": packing.pack_rows(codes.t(), spec.bits), "scales": qw.scales.t().contiguous().half(),
            "qzeros": None if spec.symmetric else packing.pack_cols(qw.zeros.t().to(torch.uint8), spec.bits),
            "perm": perm, "bits": spec.bits, "group_size": spec.group_size, "w": qw.dequantize(torch.float16)}


def _bytes(op: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in op.items() if k in ("qweight", "scales", "qzeros", "perm")
               and t is not None)


def _timer(device: str, runs: int, warmup: int):
    """``measure(fn) -> median seconds``: CUDA events around each run, L2 flushed before it."""
    if device != "cuda":
        def measure(fn):
            fn()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        return measure
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def measure(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    return measure


def _check(name: str, y: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    err = (y.float() - exact).abs()
    if not (err <= bound).all():
        raise SystemExit(f"{name}: kernel output off by {err.max().item():.3g} (bound {bound.max().item():.3g}); "
                         "not timing a wrong kernel.")


def bench_shape(k: int, n: int, rows: list[int], measure, device: str, peak_bw: float | None) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
    ops = {name: _packed(w, spec, ao, gen) for name, (spec, ao) in METHODS.items()}
    w16 = w.half()
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    results = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        t16 = measure(lambda x=x: torch.nn.functional.linear(x, w16))
        act_bytes = x.numel() * 2 + m * n * 2  # fp16 activations in, fp16 out
        rows_out = [("fp16", t16, w16.numel() * 2 + act_bytes)]
        for name, op in ops.items():
            kw = {key: op[key] for key in ("perm", "bits", "group_size")}

            def fn(op=op, kw=kw, x=x):
                return wq_linear(x, op["qweight"], op["scales"], op["qzeros"], **kw)

            exact = x.float() @ op["w"].float().t()
            _check(f"{name} M={m}", fn(), exact, 2.0**-9 * (x.float().abs() @ op["w"].float().abs().t()) + 1e-3)
            rows_out.append((name, measure(fn), _bytes(op) + act_bytes))
        if device == "cuda":  # int8 in, int32 out
            rows_out.append(("int8", measure(lambda x8=x8: int8_matmul(x8, w8)), w8.numel() + x8.numel() + m * n * 4))
        for name, t, moved in rows_out:
            results.append({"K": k, "N": n, "M": m, "method": name, "ms": t * 1e3, "speedup": t16 / t,
                            "roofline": None if peak_bw is None else moved / (peak_bw * 1e9) / t})
    return results


def _table(results: list[dict]) -> str:
    lines = ["| K x N | M | method | time (ms) | vs fp16 | BW roofline |", "|---|---|---|---|---|---|"]
    for r in results:
        roof = "n/a" if r["roofline"] is None else f"{r['roofline']:.0%}"
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['method']} | {r['ms']:.4f} | {r['speedup']:.2f}x | {roof} |")
    return "\n".join(lines)


def _goals(results: list[dict]) -> list[str]:
    out = []
    for m, goal in GOALS.items():
        got = [r["speedup"] for r in results if r["M"] == m and r["method"] == "w4g128-sym"]
        if got:
            worst = min(got)
            out.append(f"M={m}: W4A16 g128 sym vs fp16 worst {worst:.2f}x over shapes, goal >= {goal}x: "
                       f"{'PASS' if worst >= goal else 'FAIL'}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape (4096x4096), M in {1, 64}")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU through the reference (no figures)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--peak-bw-gbs", type=float, default=None, help="HBM bandwidth; default from the GPU name")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        results = bench_shape(256, 384, [1, 17], _timer("cpu", 3, 0), "cpu", None)
        print("CPU SMOKE RUN — reference path, wall clock; these are NOT kernel measurements.")
        print(_table(results))
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels are CUDA-only); "
                         "use --cpu-smoke to check the script on CPU.")
    name = torch.cuda.get_device_name()
    peak = args.peak_bw_gbs or next((v for key, v in PEAK_BW_GBS.items() if key in name), None)
    print(f"# {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"peak BW {peak} GB/s, median of {args.runs} runs")
    measure = _timer("cuda", args.runs, args.warmup)
    shapes, rows = (SHAPES[:1], [1, 64]) if args.quick else (SHAPES, ROWS)
    results = []
    for k, n in shapes:
        results += bench_shape(k, n, rows, measure, "cuda", peak)
        print(_table([r for r in results if (r["K"], r["N"]) == (k, n)]), flush=True)
    print("\n".join(_goals(results)))


if __name__ == "__main__":
    sys.exit(main())
