"""One projection's matmul on quantized weights against the float one, on the CPU or a CUDA GPU.

Times tpi's ``QuantLinear`` (what a rank runs for a quantized projection) in each compute mode
and format against ``F.linear`` on float32 (and, on a GPU, float16) weights of the same shape,
for x of 1 row (a decode step), 64 (the fast mode's kernel limit, a prefill chunk) and 512
rows. Shapes: the issue's 11008x4096 (a 7B FFN projection) and a 70B FFN projection's slice at
world size 8 (3584x8192). Each figure is the median of ``--repeats`` calls after warm-ups; the
ratio column divides by float32's on the same shape and rows.

Prints a table and writes bench/out/quant_kernels.md. Does not know: files, ranks, the network.

    python bench/quant_kernels.py                 # CPU, 2 threads
    python bench/quant_kernels.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from common import OUT_DIR, command_line, git_revision, table, write_report

from tpi.quant.formats import quantize
from tpi.quant.kernels import QuantLinear

SHAPES = {"7B FFN 11008x4096": (11008, 4096), "70B FFN slice, ws 8: 3584x8192": (3584, 8192)}


def timed(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def runs(shape: tuple[int, int], device: torch.device):
    """(label, fn(x) -> y) for every format and compute on this device."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.02
    w32, w16 = w.to(device), w.to(device, torch.float16)
    out = [("float32", lambda x: F.linear(x, w32))]
    if device.type == "cuda":
        out.append(("float16 (x in float16)", lambda x: F.linear(x.half(), w16)))
    for fmt in ("int8", "int4"):
        block = {k: v.to(device) for k, v in quantize(w, fmt, 32).tensors("p").items()}
        for compute in ("exact", "fast"):
            linear = QuantLinear(compute)
            prepared = dict(block)
            linear.prepare(prepared)
            out.append((f"{fmt} g32 {compute}", lambda x, lin=linear, b=prepared: lin(x, b, "p")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,64,512")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [int(r) for r in args.rows.split(",")]
    lines = []
    for shape_name, shape in SHAPES.items():
        for m in rows:
            x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(1)).to(device)
            base = None
            for label, fn in runs(shape, device):
                ms = timed(lambda f=fn, x=x: f(x), device, args.repeats)
                base = base or ms
                lines.append((shape_name, m, label, f"{ms:.3f}", f"{ms / base:.2f}"))
                print(*lines[-1], sep=" | ", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    text = "\n".join([
        "# tpi quantized matmul: one projection, QuantLinear against F.linear",
        "",
        f"- {where}, {args.threads} torch thread(s), torch {torch.__version__}, tpi at {git_revision()}",
        f"- median of {args.repeats} calls after 3 warm-ups; ratio: against float32 on the same shape and rows",
        "- exact: dequantize into a reused float32 buffer, one float32 GEMM; fast: torch's bfloat16 int4 kernel "
        "on the CPU up to 64 rows (beyond, and int8, and on CUDA: as exact)",
        f"- command: `{command_line('bench/quant_kernels.py')} --device {args.device}`",
        "",
        table(["shape", "rows of x", "weights", "ms", "ratio"], lines, "llrrr"),
    ])
    print(text)
    write_report(OUT_DIR, f"quant_kernels_{device.type}.md", text)


if __name__ == "__main__":
    main()
