"""Launch-shape sweep of the Triton adaLN kernels on a GPU: which num_warps (and, backward, how many
programs per SM) reach the copy bandwidth at DiT widths. One call, one table; nothing is changed.

The first H100 run (benchmarks/NOTES.md) measured layernorm_modulate fwd at 93% of copy bandwidth at
C = 3072 but 57% at C = 1152 (BLOCK_C 2048, 8 warps: few bytes in flight per SM), and the fused
residual backward at 1366 GB/s at C = 1152. Prediction: 2-4 warps at C = 1152 forward (more
programs resident per SM) lift it toward the C = 3072 figure; to be measured with this script.

    python -m benchmarks.tune_adaln              # bf16, B=2 N=32760, C = 1152 and 3072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common


def _inputs(C, device, dtype, residual):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, N = 2, 32760

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, shift, scale = rnd(B, N, C), rnd(B, 1, C), rnd(B, 1, C)
    gate, branch = (rnd(B, 1, C), rnd(B, N, C)) if residual else (None, None)
    return x, gate, branch, shift, scale


def sweep(device="cuda", dtype=torch.bfloat16, widths=(1152, 3072)):
    from dit_fast.triton_kernels import adaln as K

    copy = common.measure_copy_bandwidth(device, write=False)["gbps"]
    lines = []
    for C in widths:
        x, _, _, shift, scale = _inputs(C, device, dtype, residual=False)
        nbytes = 2 * x.numel() * x.element_size()  # read x, write out
        for warps in (1, 2, 4, 8, 16):
            t = common.time_fn(lambda: K.adaln_forward(x, None, None, shift, scale, None, None, 1e-6,
                                                       num_warps=warps), device)
            gb = common.gbps(nbytes, t.median_ms)
            lines.append([f"layernorm_modulate fwd C={C}", f"num_warps={warps}", f"{t.median_ms:.4f}",
                          f"{gb:.0f}", f"{100 * gb / copy:.0f}%"])
        x, gate, branch, shift, scale = _inputs(C, device, dtype, residual=True)
        h, out, mean, rstd = K.adaln_forward(x, gate, branch, shift, scale, None, None, 1e-6)
        dout, dh = torch.randn_like(out), torch.randn_like(h)
        # reads dout, dh, h, y; writes dx, dy: 6 (B, N, C) tensors
        nbytes = 6 * x.numel() * x.element_size()
        for warps in (2, 4, 8, 16):
            for per_sm in (2, 4, 8, 16):
                t = common.time_fn(lambda: K.adaln_backward(dout, dh, h, gate, branch, scale, None, None, mean,
                                                            rstd, 1, num_warps=warps, programs_per_sm=per_sm),
                                   device)
                gb = common.gbps(nbytes, t.median_ms)
                lines.append([f"residual_layernorm_modulate bwd C={C}", f"num_warps={warps} programs/SM={per_sm}",
                              f"{t.median_ms:.4f}", f"{gb:.0f}", f"{100 * gb / copy:.0f}%"])
    print(f"copy bandwidth measured now: {copy:.0f} GB/s")
    common.print_table(["op", "launch", "ms", "GB/s", "of copy"], lines)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        print(f"{common.GPU_MESSAGE}: this sweep times Triton kernels on a CUDA GPU; nothing to do here.")
        return
    sweep(args.device)


if __name__ == "__main__":
    main()
