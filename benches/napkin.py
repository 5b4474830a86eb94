#!/usr/bin/env python3
"""The napkin model of the convolutions' and decoder's GEMM kernels on an H100 SXM (docs/NAPKIN.md).

For each op of a training step: its useful FLOPs, the bytes it must move, the floor (FLOPs at the
precision's peak or bytes at HBM bandwidth, whichever is longer), and the predicted time of each
kernel version from the instruction counts of its SASS main loop (../shared/tools/kernel-sass --loops,
sm_90, NVRTC 13.0): a K-tile of the tensor-core GEMM issues INSTR warp-instructions per warp, 4 warps
per block; an SM's 4 schedulers issue one each per cycle; blocks run in waves of at most 4 per SM
(their occupancy by registers), so the busiest SM's blocks set the time. The v1 SIMT GEMM is taken
at the rate its loop allows: 12-17% of issued instructions are FFMA, so about 15% of the fp32 peak.

    python3 benches/napkin.py [BATCH...]
"""
import math
import sys

SMS, CLOCK = 132, 1.83e9          # H100 SXM: SMs, boost clock (Hz)
PEAK = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}
HBM = 3.35e12                      # bytes/s
# warp-instructions per K-tile (32 deep) per warp in the main loop of gemm_mma.cuh (kernel-sass --loops)
LOOP = {"tf32": 681, "bf16": 474}
MMA_TILE, MMA_BK, MMA_WARPS, MMA_BLOCKS_PER_SM = 64, 32, 4, 4
SIMT_RATE = 0.15 * PEAK["fp32"]    # v1: ~15% of fp32 peak (FFMA share of its loop)


def mma_ms(m, n, k, prec, split=1):
    """Predicted ms of one tensor-core GEMM of M x N x K (optionally split-K into `split` slices)."""
    blocks = math.ceil(m / MMA_TILE) * math.ceil(n / MMA_TILE) * split
    ktiles = math.ceil(k / split / MMA_BK)
    per_sm = math.ceil(blocks / SMS)                  # blocks the busiest SM runs (all resident if <= 4)
    cycles = per_sm * ktiles * MMA_WARPS * LOOP[prec] / 4
    return cycles / CLOCK * 1e3


def gemms(batch):
    """(op, M, N, K, useful FLOPs, bytes, extra bytes of v2's cols) for one training step."""
    f = 4
    ops = []
    # conv1: 1 -> 256, 9x9, 28 -> 20; primary: 256 -> 256, 9x9 stride 2, 20 -> 6
    for name, cin, cout, hin, hout in [("conv1", 1, 256, 28, 20), ("primary", 256, 256, 20, 6)]:
        rows, kd = batch * hout * hout, 81 * cin
        x, w, y = batch * hin * hin * cin, kd * cout, rows * cout
        flops = 2 * rows * kd * cout
        ops.append((f"{name} fwd", rows, cout, kd, flops, f * (x + w + y), 0))
        if cin > 1:
            ops.append((f"{name} bwd input", rows, kd, cout, flops, f * (y + w + 2 * x), 2 * f * rows * kd))
        ops.append((f"{name} bwd weight", kd, cout, rows, flops, f * (x + y + 2 * w), 0))
    for i, (a, b) in enumerate([(160, 512), (512, 1024), (1024, 784)]):
        flops = 2 * batch * a * b
        ops.append((f"fc{i + 1} fwd", batch, b, a, flops, f * (batch * a + a * b + batch * b), 0))
        ops.append((f"fc{i + 1} bwd input", batch, a, b, flops, f * (batch * b + a * b + 2 * batch * a), 0))
        ops.append((f"fc{i + 1} bwd weight", a, b, batch, flops, f * (batch * a + batch * b + 2 * a * b), 0))
    return ops


def splitk(m, n, k):
    """Slices of K the backend uses (CudaBackend::splitk_plan) for a weight gradient of m x n over k."""
    tiles = math.ceil(m / MMA_TILE) * math.ceil(n / MMA_TILE)
    return 1 if tiles >= SMS else max(1, min(SMS // tiles, k // (4 * MMA_BK)))


def main():
    batches = [int(b) for b in sys.argv[1:]] or [50, 128]
    for batch in batches:
        print(f"batch {batch}: ms per op on an H100 SXM; floor = max(FLOPs at the bf16 peak, bytes at {HBM / 1e12:.2f} TB/s)")
        print(f"{'op':<22} {'GFLOP':>7} {'MB':>7} {'floor':>8} {'v1':>8} {'fp32':>8} {'tf32':>7} {'bf16':>7}  notes")
        tot = {"v1": 0.0, "fp32": 0.0, "tf32": 0.0, "bf16": 0.0, "floor": 0.0}
        for name, m, n, k, flops, byts, cols in gemms(batch):
            floor = max(flops / PEAK["bf16"], byts / HBM) * 1e3
            # v1: the stride-2 input gradient gathers over every tap of the 20x20 input for each of the
            # 6x6 outputs' taps: 400/36 times its useful FLOPs
            v1 = flops * (400 / 36 if name == "primary bwd input" else 1) / SIMT_RATE * 1e3
            # tensor-core versions as built: the input gradient adds col2im's pass over cols, the weight
            # gradients split K (then a reduction reads the slices once)
            split = splitk(m, n, k) if name.endswith("bwd weight") else 1
            extra = cols / HBM * 1e3 + (split * m * n * 4 / HBM * 1e3 if split > 1 else 0)
            t = {p: mma_ms(m, n, k, p, split) + extra for p in ("tf32", "bf16")}
            # the fp32 default: v1, but the input gradient's v2 (its GEMM at v1's rate, then col2im)
            fp32 = flops / SIMT_RATE * 1e3 + cols / HBM * 1e3 if cols else v1
            for key, v in [("v1", v1), ("fp32", fp32), ("tf32", t["tf32"]), ("bf16", t["bf16"]), ("floor", floor)]:
                tot[key] += v
            note = []
            if split > 1:
                note.append(f"split-K {split}")
            if cols:
                note.append(f"cols {cols / 2e6:.0f} MB written and read")
            print(f"{name:<22} {flops / 1e9:>7.2f} {byts / 1e6:>7.1f} {floor:>8.4f} {v1:>8.3f} {fp32:>8.3f} {t['tf32']:>7.3f} {t['bf16']:>7.3f}  {', '.join(note)}")
        print(f"{'total':<22} {'':>7} {'':>7} {tot['floor']:>8.4f} {tot['v1']:>8.3f} {tot['fp32']:>8.3f} {tot['tf32']:>7.3f} {tot['bf16']:>7.3f}")
        print(f"per 60,000-image epoch (convolutions and decoder): v1 {tot['v1'] * 60000 / batch / 1e3:.1f} s, "
              f"fp32 {tot['fp32'] * 60000 / batch / 1e3:.1f} s, "
              f"tf32 {tot['tf32'] * 60000 / batch / 1e3:.2f} s, bf16 {tot['bf16'] * 60000 / batch / 1e3:.2f} s, "
              f"floor {tot['floor'] * 60000 / batch / 1e3:.2f} s\n")


if __name__ == "__main__":
    main()
