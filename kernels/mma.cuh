// mma.cuh: the warp-level tensor-core instructions the GEMMs of gemm_mma.cuh use, each as inline PTX for
// the GPU and as an emulated body for the emulated device (kernels/emulator), plus the conversions
// that round fp32 to their input formats.
//
//   mma_tf32      mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32      D[16x8] = A[16x8]·B[8x8] + C
//   mma_bf16      mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32     D[16x8] = A[16x16]·B[16x8] + C
//   ldmatrix_x4   ldmatrix.sync.aligned.m8n8.x4.shared.b16 (and .trans): four 8x8 b16 matrices
//   to_tf32       cvt.rna.tf32.f32 (round to nearest, ties away from zero)
//   pack_bf16     cvt.rn.bf16x2.f32 (round to nearest even; the first argument in the low half)
//
// Which lane holds which element (the fragment layouts) is a hardware convention. The emulated bodies
// follow the tables of the PTX ISA (version 9.1): §9.7.14.5.7 "Matrix Fragments for mma.m16n8k8"
// (tf32), §9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type" (bf16) and
// §9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix", written once below as the frag_*
// functions; tests/fragments.rs checks every lane and register against the tables transcribed
// independently from the ISA, on the emulated device and on a GPU when there is one.
//
// With groupID g = lane >> 2 and threadID_in_group t = lane % 4:
//   tf32 A  a_i (i < 4): row g + 8·(i & 1), col t + 4·(i >> 1)
//   tf32 B  b_i (i < 2): row t + 4·i, col g
//   bf16 A  a_i (i < 8; register i/2, even i in the low 16 bits): row g + 8·((i >> 1) & 1),
//           col 2t + (i & 1) + 8·(i >> 2)
//   bf16 B  b_i (i < 4; register i/2, even i low): row 2t + (i & 1) + 8·(i >> 1), col g
//   C, D    c_i (i < 4, f32): row g + 8·(i >> 1), col 2t + (i & 1)
//   ldmatrix  lane l gives the address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned);
//           register j of lane l holds row g, columns 2t and 2t + 1 (low, high) of matrix j; with
//           .trans, rows 2t and 2t + 1 (low, high) of column g.
#pragma once

struct FragPos {
    int row, col;
};

__device__ __forceinline__ FragPos frag_tf32_a(int lane, int i) { return {(lane >> 2) + 8 * (i & 1), (lane & 3) + 4 * (i >> 1)}; }
__device__ __forceinline__ FragPos frag_tf32_b(int lane, int i) { return {(lane & 3) + 4 * i, lane >> 2}; }
__device__ __forceinline__ FragPos frag_bf16_a(int lane, int i) {
    return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
}
__device__ __forceinline__ FragPos frag_bf16_b(int lane, int i) { return {2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2}; }
__device__ __forceinline__ FragPos frag_acc(int lane, int i) { return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)}; }

// fp32 → tf32 bits (an fp32 pattern whose low 13 mantissa bits are zero).
__device__ __forceinline__ unsigned to_tf32(float x) {
#ifdef __CUDA_ARCH__
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    unsigned b = __float_as_uint(x);
    if ((b & 0x7f800000u) == 0x7f800000u) return b;  // inf and NaN as they are
    return (b + 0x1000u) & ~0x1fffu;                 // half an ulp up in magnitude: ties away from zero
#endif
}

// Two fp32 → bf16, round to nearest even: lo in bits 0..15, hi in 16..31.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
#ifdef __CUDA_ARCH__
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // the ISA puts its first source high
    return r;
#else
    auto one = [](float x) -> unsigned {
        unsigned b = __float_as_uint(x);
        if ((b & 0x7fffffffu) > 0x7f800000u) return (b >> 16) | 0x40u;  // NaN stays NaN (quiet)
        return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    };
    return one(lo) | one(hi) << 16;
#endif
}

#ifndef __CUDA_ARCH__
// The emulated mma: every lane posts a pointer to its operand registers (one warp-wide gather), then
// computes its own four outputs, finding each input element's lane and register through the inverse
// of the frag_* layouts above (built once from them, so the layouts are written only once).
namespace emu_mma {
struct Operands {
    unsigned a[4], b[2];
    float c[4];
};
struct Where {
    unsigned char lane, elem;  // the lane, and the element index i of the frag_* function
};
template <bool BF16>
struct Tables {
    static constexpr int K = BF16 ? 16 : 8;
    Where a[16][K], b[K][8], c[16][8];
    Tables() {
        for (int l = 0; l < 32; ++l) {
            for (int i = 0; i < (BF16 ? 8 : 4); ++i) {
                const FragPos p = BF16 ? frag_bf16_a(l, i) : frag_tf32_a(l, i);
                a[p.row][p.col] = {(unsigned char)l, (unsigned char)i};
            }
            for (int i = 0; i < (BF16 ? 4 : 2); ++i) {
                const FragPos p = BF16 ? frag_bf16_b(l, i) : frag_tf32_b(l, i);
                b[p.row][p.col] = {(unsigned char)l, (unsigned char)i};
            }
            for (int i = 0; i < 4; ++i) {
                const FragPos p = frag_acc(l, i);
                c[p.row][p.col] = {(unsigned char)l, (unsigned char)i};
            }
        }
    }
};
// The value of element i of a register array: tf32 ignores the low 13 bits (what third-party
// measurements report the hardware does; the ISA leaves it open and the kernels never pass such
// values, rounding with cvt.rna first); bf16 holds element i in half i & 1 of register i / 2, the even one low.
template <bool BF16>
inline float value(const unsigned* regs, int i) {
    if (BF16) return __uint_as_float((i & 1) ? (regs[i >> 1] & 0xffff0000u) : (regs[i >> 1] << 16));
    return __uint_as_float(regs[i] & ~0x1fffu);
}
// c + Σ terms as a tensor core that truncates may sum them: the products (exact: tf32 and bf16
// significands multiply exactly in fp32) and c aligned to the largest one's 24-bit significand with
// the bits below cut off (towards zero), added exactly, and the sum cut to fp32 (towards zero). The
// behaviour published measurements report for NVIDIA tensor cores (Fasi, Higham, Mikaitis and
// Pranesh, "Numerical behavior of NVIDIA tensor cores", 2021); the ISA does not specify it.
inline float truncated_sum(const double* t, int n) {
    double biggest = 0;
    for (int i = 0; i < n; ++i) {
        if (!std::isfinite(t[i])) {  // inf and NaN as an fp32 sum gives them
            float s = 0;
            for (int j = 0; j < n; ++j) s += (float)t[j];
            return s;
        }
        biggest = std::fmax(biggest, std::fabs(t[i]));
    }
    if (biggest == 0) return (float)t[0];  // every term zero: c's sign
    int e;
    std::frexp(biggest, &e);               // biggest = m·2^e, 0.5 <= m < 1: its leading bit is 2^(e-1)
    const double q = std::ldexp(1.0, e - 24);  // the last bit of a 24-bit significand there
    double sum = 0;                        // exact: n multiples of q below n·2^e
    for (int i = 0; i < n; ++i) sum += std::trunc(t[i] / q) * q;
    float f = (float)sum;
    if (std::fabs((double)f) > std::fabs(sum)) f = std::nextafter(f, 0.0f);
    return f;
}
template <bool BF16>
inline void mma(float d[4], const unsigned a[4], const unsigned b[2], const float c[4], const char* file, int line) {
    static const Tables<BF16> tab;
    constexpr int K = Tables<BF16>::K;
    Operands mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
    const uint64_t* lanes = ::emu::gather((uint64_t)(uintptr_t)&mine, file, line);
    auto of = [&](Where w) -> const Operands& { return *reinterpret_cast<const Operands*>((uintptr_t)lanes[w.lane]); };
    const int lane = (int)::emu::lane_id();
    const bool truncates = ::emu::tls_block.mma_truncates != 0;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const FragPos q = frag_acc(lane, i);
        const Where wc = tab.c[q.row][q.col];
        float acc = of(wc).c[wc.elem];
        double terms[K + 1];
        terms[0] = acc;
        for (int k = 0; k < K; ++k) {
            const Where wa = tab.a[q.row][k], wb = tab.b[k][q.col];
            const float x = value<BF16>(of(wa).a, wa.elem), y = value<BF16>(of(wb).b, wb.elem);
            if (truncates)
                terms[k + 1] = (double)x * (double)y;
            else
                acc = fmaf(x, y, acc);
        }
        out[i] = truncates ? truncated_sum(terms, K + 1) : acc;
    }
    __syncwarp();  // every lane has read every other lane's operands before any returns
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}
}  // namespace emu_mma
#define EMU_GATHER(p) ::emu::gather((uint64_t)(uintptr_t)(p), __FILE__, __LINE__)
#endif

// d = a·b + c for one m16n8k8 tile; every lane of the warp calls it with its fragments.
__device__ __forceinline__ void mma_tf32(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    emu_mma::mma<false>(d, a, b, c, __FILE__, __LINE__);
#endif
}

// d = a·b + c for one m16n8k16 tile of bf16 inputs.
__device__ __forceinline__ void mma_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    emu_mma::mma<true>(d, a, b, c, __FILE__, __LINE__);
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory: lane l passes the address of row l % 8 of
// matrix l / 8; r[j] receives this lane's two elements of matrix j (transposed with TRANS). A row
// is one 16-byte access, so its address must be 16-byte aligned, and it must lie in shared memory
// (PTX ISA 9.1, §9.7.14.5.15: a generic address outside the .shared state space is undefined
// behaviour); the emulated body checks both.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) {
#ifdef __CUDA_ARCH__
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
#else
    ::emu::check_ldmatrix_row(row, __FILE__, __LINE__);
    const uint64_t* rows = EMU_GATHER(row);
    const int lane = (int)::emu::lane_id(), g = lane >> 2, t = lane & 3;
    auto at = [&](int matrix, int rr, int cc) -> unsigned {
        return *reinterpret_cast<const unsigned short*>((uintptr_t)rows[matrix * 8 + rr] + 2 * cc);
    };
    for (int j = 0; j < 4; ++j)
        r[j] = TRANS ? (at(j, 2 * t, g) | at(j, 2 * t + 1, g) << 16) : (at(j, g, 2 * t) | at(j, g, 2 * t + 1) << 16);
    // the addresses are in shared memory, not on the lanes' stacks: nothing to wait for
#endif
}
