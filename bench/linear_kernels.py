"""One linear layer, every kernel we could use, side by side in one run (ms per call).

    python bench/linear_kernels.py               # the 10B shapes at 1, 3 and 100 rows
    python bench/linear_kernels.py --rows 1,100

Columns: fp32 and bf16 ``F.linear`` (MKL / oneDNN); PyTorch's weight-only int8 matrix-vector kernel
``_weight_int8pack_mm``; the weight-only int8 path (``viscpm.quantization.int8_matmul``, used where
FBGEMM is missing: that kernel for few rows, block-wise widening to bf16 + a bf16 GEMM for many);
FBGEMM's dynamic int8 linear (``torch.ao`` dynamic ``Linear``: W8A8 with *one* activation scale per
call); our int8 layer (``Int8Linear``: FBGEMM with a scale per row and outliers apart); W8A8 with
one activation scale per row through ``torch._int_mm``; int4 ``_weight_int4pack_mm_for_cpu``. Each
cell is the best of ``--repeats`` calls after a warm-up, so neighbours' load skews it least.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from viscpm.quantization import Int4Linear, Int8Linear, int8_matmul, quantize_int8_rows

SHAPES = {"vocab 86583x1024": (86_583, 1024), "ffn 10240x4096": (10_240, 4096), "attn 4096x4096": (4096, 4096)}


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def per_row_w8a8(weight_t: torch.Tensor, weight_scale: torch.Tensor):
    """W8A8 with one activation scale per row: int8 x int8 -> int32 by ``torch._int_mm``."""

    def run(x: torch.Tensor) -> torch.Tensor:
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = (x / row_scale).round_().to(torch.int8)
        return torch._int_mm(xq, weight_t) * row_scale * weight_scale

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,3,100")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of: {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    columns = ("fp32", "bf16", "int8pack", "int8 w-only", "fbgemm dyn", "ours int8", "int_mm row", "int4")
    print(f"threads {args.threads}; ms per call (best of {args.repeats}); GB/s = weight bytes / time")
    print(f"{'layer, rows':24} " + " ".join(f"{c:>10}" for c in columns))
    with torch.no_grad():
        for name in args.shapes.split(","):
            out_features, in_features = SHAPES[name]
            linear = nn.Linear(in_features, out_features, bias=False)
            weight_bf16 = linear.weight.to(torch.bfloat16)
            weight, scales = quantize_int8_rows(linear.weight)
            scales = scales.to(torch.bfloat16)
            int8 = Int8Linear(linear)
            # the int4 kernel packs 16 outputs at a time (the vocabulary stays int8 in int4 mode)
            int4 = Int4Linear(linear) if out_features % 16 == 0 else None
            dynamic = torch.ao.nn.quantized.dynamic.Linear.from_float(
                _with_qconfig(linear))
            w8a8 = per_row_w8a8(weight.t(), scales.float())
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_features)
                xb = x.to(torch.bfloat16)
                cells = {
                    "fp32": best_ms(lambda: F.linear(x, linear.weight), args.repeats),
                    "bf16": best_ms(lambda: F.linear(xb, weight_bf16), args.repeats),
                    "int8pack": best_ms(lambda: torch._weight_int8pack_mm(xb, weight, scales), args.repeats),
                    "int8 w-only": best_ms(lambda: int8_matmul(xb, weight, scales), args.repeats),
                    "fbgemm dyn": best_ms(lambda: dynamic(x), args.repeats),
                    "ours int8": best_ms(lambda: int8(x), args.repeats),
                    "int_mm row": best_ms(lambda: w8a8(x), args.repeats),
                    "int4": best_ms(lambda: int4.matmul(xb), args.repeats) if int4 else float("nan"),
                }
                print(f"{name + ', ' + str(rows):24} " + " ".join(f"{cells[c]:10.2f}" for c in columns))
            gb = out_features * in_features / 1e9
            del linear, weight_bf16, weight, scales, int8, int4, dynamic, w8a8
            print(f"{'':24} weights: fp32 {4 * gb:.2f} GB, bf16 {2 * gb:.2f}, int8 {gb:.2f}, int4 {gb / 2:.2f}")
    return 0


def _with_qconfig(linear: nn.Linear) -> nn.Linear:
    torch.backends.quantized.engine = "fbgemm"
    linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    return linear


if __name__ == "__main__":
    sys.exit(main())
