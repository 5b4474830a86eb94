#!/usr/bin/env python3
"""The napkin model of a training step's kernels on an H100 SXM (docs/NAPKIN.md): the convolutions'
and decoder's GEMMs, then the capsule layer (prediction vectors and routing, unfused and fused).

For each op of a training step: its useful FLOPs, the bytes it must move, the floor (FLOPs at the
precision's peak or bytes at HBM bandwidth, whichever is longer), and the predicted time of each
kernel version from the instruction counts of its SASS main loop (../shared/tools/kernel-sass --loops,
sm_90, NVRTC 13.0): a K-tile of the tensor-core GEMM issues INSTR warp-instructions per warp, 4 warps
per block; an SM's 4 schedulers issue one each per cycle; blocks run in waves of at most 4 per SM
(their occupancy by registers), so the busiest SM's blocks set the time. The v1 SIMT GEMM is taken
at the rate its loop allows: 12-17% of issued instructions are FFMA, so about 15% of the fp32 peak.

The capsule layer is modelled per kernel from the bytes it must move through HBM (W, 5.9 MB, stays in
the 50 MB L2 once read) and the warp-instructions its loops issue (kernel-sass --loops), whichever is
longer; latency (the per-image phases between barriers) is not modelled.

    python3 benches/napkin.py [BATCH...]
    python3 benches/napkin.py --json [BATCH...]   # one JSON object per op and version, as
                                                  # `capsnet bench --ops` names them (benches/gpu_run.py)
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


# the capsule layer of the default model: I primary capsules of E dims, J digit capsules of D dims
I, E, J, D = 1152, 8, 10, 16
ROUTING_THREADS, FUSED_SMEM_FLOATS, FUSED_MAX_CHUNK = 256, 48 * 1024 // 4, 16
ISSUE = SMS * 4 * CLOCK            # warp-instructions per second, all schedulers busy


def fused_chunk(per, fixed):
    """registry::fused_routing_plan: the capsules a block takes."""
    return min(FUSED_MAX_CHUNK, (FUSED_SMEM_FLOATS - fixed) // per)


def capsule_kernels(batch, rounds):
    """(kernel, launches, HBM bytes, warp-instructions) per training step, for both versions."""
    f, b, r = 4, batch, rounds
    uhat, u, w, c = b * I * J * D, b * I * E, I * J * D * E, b * I * J
    jd, jde = J * D, J * D * E
    unfused = [
        # the tape keeps no û: the backward recomputes it
        ("predict_fwd (fwd, and again in bwd)", 2, 2 * f * (u + w + uhat), 2 * uhat * 12 / 32),
        (f"routing_fwd_v1, {r} rounds", 1, f * ((2 * r - 1) * uhat + r * c), b * ((2 * r - 1) * I * J * D * 3) / 32),
        ("memset dû + routing_bwd_v1", 2, f * ((4 * r) * uhat + r * c), b * (4 * r * I * J * D * 4) / 32),
        ("predict_bwd_input + _weight", 2, f * (2 * uhat + 2 * w + 2 * u), 2 * uhat * 8 * 3 / 32),
    ]
    cf = fused_chunk(jde + E + jd + J, (r - 1) * jd)
    cb = fused_chunk(jde + E + jd + 2 * J, jd)
    ci = fused_chunk(jde + jd + (2 * r - 1) * J, (2 * r - 1) * jd)
    ch_f, ch_b, ch_i = math.ceil(I / cf), math.ceil(I / cb), math.ceil(I / ci)
    groups = lambda chunks: b / math.ceil(b / max(1, min(b, math.ceil(4 * SMS / chunks))))
    per_image_fwd = lambda rr: (cf * jd / ROUTING_THREADS) * 8 * 27 + 3 * (48 * rr + 20) + 340 + 180 + 50
    fused = [
        (f"caps_route_fwd_partial x{r} (chunk {cf})", r,
         f * r * (u + c + b * ch_f * jd) + f * w,
         sum(b * ch_f * per_image_fwd(q) for q in range(r))),
        (f"caps_route_fwd_reduce x{r}", r, f * r * (b * ch_f * jd + 2 * b * jd), r * b * 5 * ch_f * 6.5),
        (f"caps_route_bwd_reduce x{r}", r, f * r * (b * ch_b * jd + 2 * b * jd), r * b * 5 * ch_b * 6.5),
        (f"caps_route_bwd_partial x{r - 1} (chunk {cb})", r - 1,
         f * (r - 1) * (u + 3 * c + b * ch_b * jd), (r - 1) * b * ch_b * 1934),
        (f"caps_route_bwd_input (chunk {ci})", 1, f * (2 * u + (2 * r - 1) * c), b * ch_i * 3040),
        ("caps_route_bwd_weight", 1, f * (u + (2 * r - 1) * c + 2 * w), I * J * D / 32 * b * 96),
    ]
    return unfused, fused


def step_memory_mb(batch, rounds, fused):
    """Device memory of a training step (the pool's peak), predicted: parameters with gradients and
    Adam moments, the activations the tape keeps and their gradients, the temporaries, in MB."""
    f, b, r = 4, batch, rounds
    params = 81 * 256 + 256 + 81 * 256 * 256 + 256 + I * J * D * E + 160 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784
    conv1, prim, caps = b * 400 * 256, b * 36 * 256, b * I * E
    cols = min(b * 36 * 81 * 256, 16 << 20)            # conv2d_bwd_input v2 works in chunks of at most 64 MiB
    mem = 4 * params                                  # value, gradient, m, v
    mem += 3 * conv1 + 5 * prim + 2 * caps            # y, dy, dz of conv1; the primary conv's; u and du
    mem += b * r * I * J + 4 * b * r * J * D + cols   # saved couplings, s, v; cols
    if fused:
        mem += b * math.ceil(I / 8) * J * D + b * (r - 1) * I * J + b * r * J * D  # partial, db, ds
    else:
        mem += 2 * b * I * J * D                      # û and dû
    return f * mem / 1e6


def capsule_table(batch, rounds):
    unfused, fused = capsule_kernels(batch, rounds)
    print(f"capsule layer, batch {batch}, {rounds} routing rounds: predicted ms on an H100 SXM "
          f"(max of HBM bytes at {HBM / 1e12:.2f} TB/s and warp-instructions at 4 per SM-cycle)")
    print(f"{'kernel':<46} {'launches':>8} {'MB':>8} {'Minstr':>8} {'ms':>8}")
    totals = {}
    for name, ks in [("unfused (v1)", unfused), ("fused", fused)]:
        tot_ms, tot_l = 0.0, 0
        for k, launches, byts, instr in ks:
            ms = max(byts / HBM, instr / ISSUE) * 1e3
            tot_ms, tot_l = tot_ms + ms, tot_l + launches
            print(f"{k:<46} {launches:>8} {byts / 1e6:>8.1f} {instr / 1e6:>8.2f} {ms:>8.4f}")
        print(f"{'  total ' + name:<46} {tot_l:>8} {'':>8} {'':>8} {tot_ms:>8.4f}")
        totals[name] = tot_ms
    print(f"device memory of a training step at batch {batch}: unfused {step_memory_mb(batch, rounds, False):.0f} MB, "
          f"fused {step_memory_mb(batch, rounds, True):.0f} MB (û and dû: {2 * 4 * batch * I * J * D / 1e6:.0f} MB)\n")
    return totals


def gemm_ms(name, m, n, k, flops, cols):
    """Predicted ms of one GEMM-shaped op: {v1, fp32 (the fp32 default), tf32, bf16}."""
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
    return {"v1": v1, "fp32": fp32, "tf32": t["tf32"], "bf16": t["bf16"]}, split


def predictions(batch, rounds=2):
    """The napkin's ms for every op and version as `capsnet bench --ops` names them: GEMM ops by
    layer (conv1, primary, fc1..fc3) and direction, routing forward and backward."""
    out = []
    op_of = {"fwd": "fwd", "bwd input": "bwd_input", "bwd weight": "bwd_weight"}
    for name, m, n, k, flops, byts, cols in gemms(batch):
        layer, direction = name.split(" ", 1)
        family = "dense" if layer.startswith("fc") else "conv2d"
        ms, _ = gemm_ms(name, m, n, k, flops, cols)
        # bench's versions: v1 everywhere, v2 (the fp32 default) for the input gradient, tf32, bf16
        versions = {"v1": ms["v1"], "tf32": ms["tf32"], "bf16": ms["bf16"]}
        if direction == "bwd input" and family == "conv2d":
            versions["v2"] = ms["fp32"]
        for v, t in versions.items():
            out.append({"kind": "napkin", "batch": batch, "op": f"{family}_{op_of[direction]}", "layer": layer,
                        "version": v, "napkin_ms": t})
    unfused, fused = capsule_kernels(batch, rounds)
    ms = lambda k: max(k[2] / HBM, k[3] / ISSUE) * 1e3
    # v1: the prediction vectors are their own kernel, launched once in the forward and again in the backward
    out.append({"kind": "napkin", "batch": batch, "op": "routing", "layer": f"fwd, {rounds} rounds", "version": "v1",
                "napkin_ms": ms(unfused[0]) / 2 + ms(unfused[1])})
    out.append({"kind": "napkin", "batch": batch, "op": "routing", "layer": f"bwd, {rounds} rounds", "version": "v1",
                "napkin_ms": ms(unfused[0]) / 2 + ms(unfused[2]) + ms(unfused[3])})
    out.append({"kind": "napkin", "batch": batch, "op": "routing", "layer": f"fwd, {rounds} rounds", "version": "fused",
                "napkin_ms": ms(fused[0]) + ms(fused[1])})
    out.append({"kind": "napkin", "batch": batch, "op": "routing", "layer": f"bwd, {rounds} rounds", "version": "fused",
                "napkin_ms": sum(ms(k) for k in fused[2:])})
    return out


def main():
    args = sys.argv[1:]
    if args[:1] == ["--json"]:
        import json
        for batch in [int(b) for b in args[1:]] or [50, 128]:
            for p in predictions(batch):
                print(json.dumps(p))
        return
    batches = [int(b) for b in args] or [50, 128]
    for batch in batches:
        print(f"batch {batch}: ms per op on an H100 SXM; floor = max(FLOPs at the bf16 peak, bytes at {HBM / 1e12:.2f} TB/s)")
        print(f"{'op':<22} {'GFLOP':>7} {'MB':>7} {'floor':>8} {'v1':>8} {'fp32':>8} {'tf32':>7} {'bf16':>7}  notes")
        tot = {"v1": 0.0, "fp32": 0.0, "tf32": 0.0, "bf16": 0.0, "floor": 0.0}
        for name, m, n, k, flops, byts, cols in gemms(batch):
            floor = max(flops / PEAK["bf16"], byts / HBM) * 1e3
            t, split = gemm_ms(name, m, n, k, flops, cols)
            v1, fp32 = t["v1"], t["fp32"]
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
        caps = capsule_table(batch, 2)
        step = tot["bf16"] + caps["fused"]
        print(f"step at batch {batch} (bf16 GEMMs + fused capsule layer, without the small elementwise kernels): "
              f"{step:.3f} ms, {step * 60000 / batch / 1e3:.2f} s per 60,000-image epoch\n")


if __name__ == "__main__":
    main()
