// emulator.cpp: an emulated CUDA device. Built with the kernels (compiled for the host against
// cuda_emu.hpp) into a shared library whose soname is libcuda.so, it implements the part of the CUDA
// driver API that cudarc calls, so the CUDA backend's host code runs unchanged on the CPU.
//
// - Device: one, reported like an H100 (compute capability 9.0, 132 SMs, 227 KiB opt-in shared
//   memory per block) under a name that says it is emulated.
// - Memory: host allocations, NaN-filled (0xFF bytes) when allocated, with a NaN redzone after each
//   (and after each block's dynamic shared memory) that a launch must leave untouched; copies and
//   memsets must stay inside one live allocation.
// - Modules: cubins or PTX from the real NVRTC. Each kernel must have a host build of the same name
//   whose parameter sizes match the module's. A cubin (an ELF file) gives what ptxas decided and the
//   driver reads: parameter sizes, the launch bounds, registers per thread and static shared memory
//   (.nv.info attributes, .nv.shared sections); its architecture must be the device's. PTX gives the
//   parameter sizes and .maxntid.
// - Launches are checked as the driver checks them (block ≤ 1024 threads and ≤ the launch bounds,
//   registers × threads within the 65,536 of a block, grid limits, dynamic shared memory ≤ 48 KiB or
//   the function's opt-in attribute, static + dynamic ≤ the device's 227 KiB), then run
//   synchronously: blocks spread over OS threads, each block's threads are fibers scheduled
//   deterministically on one OS thread (forward or reversed order, see capsnet_emu_set_schedule).
// - Faults a GPU raises stop the launch: an ldmatrix row address not 16-byte aligned or not in
//   shared memory, an access misaligned for its type (a float4 not on 16 bytes; the kernels are
//   built with -fsanitize=alignment and its reports come here).
// - Stand-ins, for testing what the host does with other GPUs and drivers:
//   CAPSNET_EMULATOR_DRIVER_VERSION (e.g. 12.8) and CAPSNET_EMULATOR_CC (e.g. 7.5).
// - A barrier reached at different lines, a collective whose mask names an exited lane, and a
//   deadlock fail the launch with CUDA_ERROR_LAUNCH_FAILED; cuGetErrorString then gives the message
//   (kernel, file:line, block and thread), which is also printed to stderr.
//
// Built three ways (src/cuda/emulator.rs): plain, with AddressSanitizer (fiber switches annotated) and
// with ThreadSanitizer (each fiber a TSan fiber whose switches do not synchronise; barriers and
// collectives are release/acquire on tokens that alternate per generation).
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.hpp"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__) || defined(EMU_TSAN_FIBERS)
#include <sanitizer/tsan_interface.h>
#define EMU_TSAN 1
#else
#define EMU_TSAN 0
#endif

#define EXPORT extern "C" __attribute__((visibility("default")))

// ---- fibers: a stack switch that saves the callee-saved registers, MXCSR and the x87 control word --
#if !defined(__x86_64__)
#error "the emulated device's fibers are written for x86-64"
#endif
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

namespace emu {

thread_local const uint3* tls_tid = nullptr;
thread_local BlockCoords tls_block{};

namespace {

constexpr size_t STACK_BYTES = (EMU_ASAN || EMU_TSAN) ? 512 * 1024 : 128 * 1024;
// NaN bytes after every device allocation and every block's dynamic shared memory, checked after each
// launch (block): a write past the end fails the launch. AddressSanitizer's builds need none: it
// checks reads as well, at the exact size.
constexpr size_t REDZONE = EMU_ASAN ? 0 : 256;

// The index of the first byte of [p, p + n) that is not 0xFF, or n.
size_t first_written(const unsigned char* p, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (p[i] != 0xFF) return i;
    return n;
}

// ---- fiber slots: a stack with a guard page below it (and a ThreadSanitizer fiber), pooled ---------
struct Slot {
    char* stack;
    void* tsan;
};
std::mutex slots_mu;
std::vector<Slot> free_slots;
size_t page() { return (size_t)sysconf(_SC_PAGESIZE); }

// n slots, from the pool where it has them (one lock per block, not per thread)
void take_slots(std::vector<Slot>& out, unsigned n) {
    out.clear();
    {
        std::lock_guard<std::mutex> g(slots_mu);
        while (out.size() < n && !free_slots.empty()) {
            out.push_back(free_slots.back());
            free_slots.pop_back();
        }
    }
    while (out.size() < n) {
        void* m = mmap(nullptr, STACK_BYTES + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "capsnet emulated device: cannot map a fiber stack\n");
            abort();
        }
        mprotect(m, page(), PROT_NONE);
        Slot s{(char*)m + page(), nullptr};
#if EMU_TSAN
        s.tsan = __tsan_create_fiber(0);
#endif
        out.push_back(s);
    }
}
void give_slots(const std::vector<Slot>& in) {
    std::lock_guard<std::mutex> g(slots_mu);
    free_slots.insert(free_slots.end(), in.begin(), in.end());
}

// ---- kernels --------------------------------------------------------------------------------------
struct HostKernel {
    void (*run)(void**);
    std::vector<size_t> sizes;
};
std::map<std::string, HostKernel>& kernels() {
    static std::map<std::string, HostKernel> k;
    return k;
}

enum class St : uint8_t { Ready, Barrier, Collective, Exited, Faulted };

struct Fiber {
    void* sp = nullptr;
    St st = St::Ready;
    uint3 tid{};
    unsigned lin = 0;
    const char* file = "";
    int line = 0;
    Op op = OP_SYNCWARP;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
    int arg = 0, width = 32;
    char* stack = nullptr;
    void* tsan = nullptr;
};

struct Block {
    const char* kernel;
    void (*run)(void**);
    void** params;
    std::vector<Fiber> fibers;
    void* sched_sp = nullptr;
    std::string error;
    int error_code = 719;  // CUDA_ERROR_LAUNCH_FAILED, or the fault's
    unsigned barrier_gen = 0;
    std::vector<unsigned> warp_gen;
    // OP_GATHER's results: the 32 values each warp's lanes posted, per warp
    std::vector<uint64_t> warp_table;
    // release/acquire tokens for ThreadSanitizer, alternating per generation
    char barrier_token[2] = {0, 0};
    std::vector<char> warp_token;
#if EMU_ASAN
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
#endif
#if EMU_TSAN
    void* sched_tsan = nullptr;
#endif
};

thread_local Block* tls_blk = nullptr;
thread_local Fiber* tls_fiber = nullptr;

std::string coords(uint3 v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
std::string where(const Fiber& f) { return std::string(f.file) + ":" + std::to_string(f.line); }
std::string who(const Block& b, const Fiber& f) {
    return "kernel " + std::string(b.kernel) + ", block " + coords(tls_block.idx) + ", thread " + coords(f.tid);
}

// Fiber side: give control back to the scheduler.
void to_scheduler() {
    Fiber& f = *tls_fiber;
    Block& b = *tls_blk;
#if EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(f.st == St::Exited ? nullptr : &fake, b.sched_bottom, b.sched_size);
#endif
#if EMU_TSAN
    // an exited thread hands everything it did to the scheduler (and so to the next block); a
    // waiting one hands nothing: only barriers and collectives order the threads of a block
    __tsan_switch_to_fiber(b.sched_tsan, f.st == St::Exited ? 0 : __tsan_switch_to_fiber_no_sync);
#endif
    emu_switch(&f.sp, b.sched_sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &b.sched_bottom, &b.sched_size);
#endif
}

extern "C" __attribute__((noreturn, used)) void emu_fiber_main() {
    Block& b = *tls_blk;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &b.sched_bottom, &b.sched_size);
#endif
#if EMU_TSAN
    to_scheduler();  // primed: see run_block
#endif
    b.run(b.params);
    tls_fiber->st = St::Exited;
    to_scheduler();
    __builtin_trap();  // an exited fiber is never resumed
}

// Scheduler side: run fiber f until it yields. `sync`: f sees everything the scheduler did.
void resume(Block& b, Fiber& f, bool sync = false) {
    tls_fiber = &f;
    tls_tid = &f.tid;
#if EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, STACK_BYTES);
#endif
#if EMU_TSAN
    __tsan_switch_to_fiber(f.tsan, sync ? 0 : __tsan_switch_to_fiber_no_sync);
#endif
    (void)sync;
    emu_switch(&b.sched_sp, f.sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    tls_fiber = nullptr;
}

void init_fiber(Fiber& f, Slot slot) {
    f.stack = slot.stack;
    f.tsan = slot.tsan;
    // the stack as emu_switch leaves it: MXCSR and x87 control word, r15..rbp, then the return address
    uint64_t* top = (uint64_t*)(f.stack + STACK_BYTES);  // 16-byte aligned
    uint64_t* sp = top - 9;
    sp[8] = 0;                               // alignment: emu_fiber_main starts as if called
    sp[7] = (uint64_t)(void*)&emu_fiber_main;  // return address
    for (int i = 1; i <= 6; ++i) sp[i] = 0;    // r15, r14, r13, r12, rbx, rbp
    uint32_t csr[2] = {0x1F80u, 0x037Fu};      // default MXCSR; x87 control word
    memcpy(&sp[0], csr, 8);
    f.sp = sp;
}

// Completes the collectives whose every lane has arrived; false when none could. Sets b.error on misuse.
bool complete_collectives(Block& b) {
    bool any = false;
    const unsigned n = (unsigned)b.fibers.size();
    for (unsigned l0 = 0; l0 < n && b.error.empty(); ++l0) {
        Fiber& f = b.fibers[l0];
        if (f.st != St::Collective) continue;
        const unsigned warp = l0 / 32, base = warp * 32, lane = l0 % 32;
        if (!(f.mask >> lane & 1)) {
            b.error = who(b, f) + ": warp collective at " + where(f) + " with a mask that omits the calling lane";
            return false;
        }
        bool ready = true;
        for (unsigned l = 0; l < 32; ++l) {
            if (!(f.mask >> l & 1)) continue;
            if (base + l >= n || b.fibers[base + l].st == St::Exited) {
                b.error = who(b, f) + ": warp collective at " + where(f) + " names lane " + std::to_string(l) +
                          (base + l >= n ? ", which does not exist" : ", which has exited");
                return false;
            }
            const Fiber& g = b.fibers[base + l];
            if (g.st != St::Collective) {
                ready = false;
                continue;
            }
            if (g.mask != f.mask || g.op != f.op) {
                b.error = who(b, f) + ": warp collective at " + where(f) + " meets lane " + std::to_string(l) +
                          " at a different collective, " + where(g);
                return false;
            }
        }
        if (!ready) continue;
        // all named lanes are here: compute every lane's result, then release them
        for (unsigned l = 0; l < 32; ++l) {
            if (!(f.mask >> l & 1)) continue;
            Fiber& g = b.fibers[base + l];
            const int w = g.width, seg = (int)l & ~(w - 1);
            int src = (int)l;
            switch (g.op) {
                case OP_SHFL_IDX: src = seg + (g.arg & (w - 1)); break;
                case OP_SHFL_UP: src = (int)l - g.arg >= seg ? (int)l - g.arg : (int)l; break;
                case OP_SHFL_DOWN: src = (int)l + g.arg < seg + w ? (int)l + g.arg : (int)l; break;
                case OP_SHFL_XOR: src = (((int)l ^ g.arg) & ~(w - 1)) == seg ? ((int)l ^ g.arg) : (int)l; break;
                default: break;
            }
            if (g.op == OP_SHFL_IDX || g.op == OP_SHFL_UP || g.op == OP_SHFL_DOWN || g.op == OP_SHFL_XOR) {
                if (!(f.mask >> src & 1)) {
                    b.error = who(b, g) + ": shuffle at " + where(g) + " reads lane " + std::to_string(src) +
                              ", which is not in the mask";
                    return false;
                }
                g.result = b.fibers[base + src].value;
            } else if (g.op == OP_GATHER) {
                uint64_t* table = &b.warp_table[warp * 32];
                table[l] = g.value;
                g.result = (uint64_t)(uintptr_t)table;
            } else if (g.op == OP_BALLOT || g.op == OP_ANY || g.op == OP_ALL) {
                unsigned votes = 0;
                for (unsigned k = 0; k < 32; ++k)
                    if ((f.mask >> k & 1) && b.fibers[base + k].value) votes |= 1u << k;
                g.result = g.op == OP_BALLOT ? votes : g.op == OP_ANY ? votes != 0 : votes == f.mask;
            }
        }
        for (unsigned l = 0; l < 32; ++l)
            if (f.mask >> l & 1) b.fibers[base + l].st = St::Ready;
        b.warp_gen[warp]++;
        any = true;
    }
    return any;
}

// The waiting threads, grouped by where they wait: "16 threads (first (0,0,0)) at a warp collective, ...".
std::string describe_waits(const Block& b) {
    struct Group {
        const Fiber* first;
        unsigned count;
    };
    std::vector<Group> groups;
    for (const Fiber& f : b.fibers) {
        if (f.st != St::Barrier && f.st != St::Collective) continue;
        auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
            return g.first->st == f.st && g.first->line == f.line && strcmp(g.first->file, f.file) == 0;
        });
        if (g == groups.end())
            groups.push_back({&f, 1});
        else
            g->count++;
    }
    std::string s;
    for (const Group& g : groups) {
        s += (s.empty() ? "" : "; ") + std::to_string(g.count) + " thread(s) from " + coords(g.first->tid) +
             (g.first->st == St::Barrier ? " wait at __syncthreads, " : " wait at a warp collective, ") +
             where(*g.first);
    }
    return s;
}

std::atomic<int> schedule_reversed{0};

// Runs one block to completion; returns "" or the error (its CUresult in *code).
std::string run_block(const char* name, void (*run)(void**), void** params, uint3 bidx, dim3 bdim, dim3 grid,
                      size_t dyn_bytes, int mma_truncates, int* code) {
    Block b;
    b.kernel = name;
    b.run = run;
    b.params = params;
    const unsigned n = bdim.x * bdim.y * bdim.z;
    b.fibers.resize(n);
    b.warp_gen.assign((n + 31) / 32, 0);
    b.warp_table.assign((n + 31) / 32 * 32, 0);
    b.warp_token.assign((n + 31) / 32 * 2, 0);
    unsigned char* smem = (unsigned char*)malloc(dyn_bytes + REDZONE);
    if (smem == nullptr && dyn_bytes + REDZONE > 0) return "cannot allocate the block's dynamic shared memory";
    memset(smem, 0xFF, dyn_bytes + REDZONE);  // NaN until written
    tls_block = BlockCoords{bidx, bdim, grid, smem, dyn_bytes, mma_truncates};
    tls_blk = &b;
#if EMU_TSAN
    b.sched_tsan = __tsan_get_current_fiber();
#endif
    thread_local std::vector<Slot> slots;
    take_slots(slots, n);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.lin = i;
        f.tid = uint3{i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y)};
        init_fiber(f, slots[i]);
    }
#if EMU_TSAN
    // every thread first takes the block's setup (shared memory, the previous block's writes) in one
    // synchronising switch and yields at once, before any kernel code runs, so these switches order
    // no kernel code of one thread before another's
    for (Fiber& f : b.fibers) resume(b, f, true);
#endif
    const bool rev = schedule_reversed.load() != 0;
    for (;;) {
        bool ran = false;
        for (unsigned k = 0; k < n && b.error.empty(); ++k) {
            Fiber& f = b.fibers[rev ? n - 1 - k : k];
            if (f.st != St::Ready) continue;
            resume(b, f);
            ran = true;
        }
        if (!b.error.empty()) break;
        if (ran) continue;
        if (std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.st == St::Exited; })) break;
        if (complete_collectives(b)) continue;
        if (!b.error.empty()) break;
        // a barrier: every live thread at the same one
        const Fiber* first = nullptr;
        bool all = true;
        for (const Fiber& f : b.fibers) {
            if (f.st == St::Exited) continue;
            if (f.st != St::Barrier) {
                all = false;
                break;
            }
            if (first == nullptr) {
                first = &f;
            } else if (f.line != first->line || strcmp(f.file, first->file) != 0) {
                b.error = who(b, f) + ": __syncthreads at " + where(f) + ", but thread " + coords(first->tid) +
                          " waits at " + where(*first);
                break;
            }
        }
        if (!b.error.empty()) break;
        if (all && first != nullptr) {
            b.barrier_gen++;
            for (Fiber& f : b.fibers)
                if (f.st == St::Barrier) f.st = St::Ready;
            continue;
        }
        b.error = "kernel " + std::string(name) + ", block " + coords(bidx) + ": deadlock: " + describe_waits(b);
        break;
    }
#if EMU_ASAN
    // an abandoned fiber (after an error) may leave poisoned frames on its stack
    for (Fiber& f : b.fibers) __asan_unpoison_memory_region(f.stack, STACK_BYTES);
#endif
    give_slots(slots);
    if (b.error.empty() && first_written(smem + dyn_bytes, REDZONE) < REDZONE)
        b.error = "kernel " + std::string(name) + ", block " + coords(bidx) + ": wrote past the end of its " +
                  std::to_string(dyn_bytes) + " bytes of dynamic shared memory (at byte " +
                  std::to_string(dyn_bytes + first_written(smem + dyn_bytes, REDZONE)) + ")";
    free(smem);
    tls_blk = nullptr;
    tls_tid = nullptr;
    *code = b.error_code;
    return b.error;
}

// The calling OS thread's block of this library's thread-local storage, where `__shared__`
// variables live (cuda_emu.hpp makes them static thread_local): [start, start + size).
std::pair<uintptr_t, size_t> static_shared_range() {
    struct Self {
        void* handle = nullptr;
        size_t size = 0;
    };
    static const Self self = [] {
        Self r;
        Dl_info info{};
        if (!dladdr((void*)&static_shared_range, &info) || !info.dli_fname) return r;
        r.handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        struct Find {
            const char* name;
            size_t size;
        } find{info.dli_fname, 0};
        dl_iterate_phdr(
            [](dl_phdr_info* i, size_t, void* data) {
                Find* f = (Find*)data;
                if (!i->dlpi_name || strcmp(i->dlpi_name, f->name) != 0) return 0;
                for (int k = 0; k < i->dlpi_phnum; ++k)
                    if (i->dlpi_phdr[k].p_type == PT_TLS) f->size = i->dlpi_phdr[k].p_memsz;
                return 1;
            },
            &find);
        r.size = find.size;
        return r;
    }();
    void* block = nullptr;
    if (self.handle == nullptr || dlinfo(self.handle, RTLD_DI_TLS_DATA, &block) != 0 || block == nullptr)
        return {0, 0};
    return {(uintptr_t)block, self.size};
}

}  // namespace

void register_kernel(const char* name, void (*run)(void**), size_t nparams, const size_t* sizes) {
    kernels()[name] = HostKernel{run, std::vector<size_t>(sizes, sizes + nparams)};
}

void fault(int code, const char* what, const char* file, int line) {
    Fiber* f = tls_fiber;
    Block* b = tls_blk;
    if (f == nullptr || b == nullptr) {  // not inside a kernel: nothing to stop but the process
        fprintf(stderr, "capsnet emulated device: %s at %s:%d, outside any kernel\n", what, file, line);
        abort();
    }
    if (b->error.empty()) {
        b->error = who(*b, *f) + ": " + what + " at " + file + ":" + std::to_string(line);
        b->error_code = code;
    }
    f->st = St::Faulted;  // never resumed: the launch stops
    to_scheduler();
    __builtin_trap();
}

void check_ldmatrix_row(const void* row, const char* file, int line) {
    const uintptr_t p = (uintptr_t)row;
    char what[200];
    if (p % 16 != 0) {
        snprintf(what, sizeof what, "ldmatrix row address %p is not 16-byte aligned", row);
        fault(716, what, file, line);  // CUDA_ERROR_MISALIGNED_ADDRESS
    }
    const uintptr_t dyn = (uintptr_t)tls_block.dyn_smem;
    const auto [tls, tls_size] = static_shared_range();
    const bool in_dynamic = p >= dyn && p + 16 <= dyn + tls_block.dyn_bytes;
    const bool in_static = p >= tls && p + 16 <= tls + tls_size;
    if (!in_dynamic && !in_static) {
        snprintf(what, sizeof what, "ldmatrix row address %p is not in the block's shared memory", row);
        fault(700, what, file, line);  // CUDA_ERROR_ILLEGAL_ADDRESS
    }
}

namespace {
// Yields until the scheduler releases this thread. For ThreadSanitizer, a release before and an acquire
// after on `token`, which the threads meeting here share and which alternates per generation.
void wait_on(char* token) {
#if EMU_TSAN
    __tsan_release(token);
#endif
    to_scheduler();
#if EMU_TSAN
    __tsan_acquire(token);
#endif
    (void)token;
}
}  // namespace

void barrier(const char* file, int line) {
    Fiber& f = *tls_fiber;
    Block& b = *tls_blk;
    f.st = St::Barrier;
    f.file = file;
    f.line = line;
    wait_on(&b.barrier_token[b.barrier_gen & 1]);
}

uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Fiber& f = *tls_fiber;
    Block& b = *tls_blk;
    f.st = St::Collective;
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.arg = arg;
    f.width = (width >= 1 && width <= 32 && (width & (width - 1)) == 0) ? width : 32;
    f.file = file;
    f.line = line;
    const unsigned warp = f.lin / 32;
    wait_on(&b.warp_token[warp * 2 + (b.warp_gen[warp] & 1)]);
    return f.result;
}

}  // namespace emu

// ---- -fsanitize=alignment's reports (the kernels' units are built with it) become faults -------------
// The handler's arguments as GCC's and Clang's UBSan runtime declare them (ubsan_handlers.h).
struct UbsanLocation {
    const char* file;
    unsigned line, column;
};
struct UbsanType {
    unsigned short kind, info;
    char name[1];
};
struct UbsanMismatch {
    UbsanLocation loc;
    const UbsanType* type;
    unsigned char log_alignment, check_kind;
};
extern "C" void __ubsan_handle_type_mismatch_v1(UbsanMismatch* d, uintptr_t p) {
    static const char* const kinds[] = {"load of", "store to", "reference to", "member access within",
                                        "member call on", "constructor call on", "downcast of", "downcast of",
                                        "upcast of", "cast to virtual base of", "nonnull binding to",
                                        "dynamic operation on"};
    const char* kind = d->check_kind < sizeof kinds / sizeof *kinds ? kinds[d->check_kind] : "access to";
    char what[240];
    snprintf(what, sizeof what, "%s misaligned address 0x%llx for type %s, which requires %u-byte alignment", kind,
             (unsigned long long)p, d->type ? d->type->name : "?", 1u << d->log_alignment);
    emu::fault(716, what, d->loc.file, (int)d->loc.line);  // CUDA_ERROR_MISALIGNED_ADDRESS
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(UbsanMismatch* d, uintptr_t p) {
    __ubsan_handle_type_mismatch_v1(d, p);
}

// ======================================================================================================
// The driver API (the subset cudarc 0.19 calls), C ABI. Types as in cuda.h.
// ======================================================================================================
using namespace emu;

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;
typedef struct CUmemPoolHandle_st* CUmemoryPool;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
};

namespace {

constexpr int SMEM_DEFAULT = 48 * 1024;
constexpr int SMEM_OPTIN = 227 * 1024;
constexpr size_t TOTAL_MEM = 80ull << 30;
const char* const DEVICE_NAME = "capsnet emulated CUDA device (runs on the CPU; H100-like limits)";

struct Module {
    struct EntryInfo {
        std::vector<size_t> param_sizes;
        unsigned maxntid[3] = {0, 0, 0};
        // from a cubin (-1: unknown, as for PTX, which the driver compiles)
        int registers = -1;
        int static_smem = -1;
    };
    std::map<std::string, EntryInfo> entries;
};
struct Function {
    std::string name;
    const HostKernel* host;
    Module::EntryInfo entry;
    int max_dynamic_smem = SMEM_DEFAULT;
};

// The device's compute capability and the driver's CUDA version, or their stand-ins ("M.m").
std::pair<int, int> version_env(const char* var, std::pair<int, int> dflt) {
    const char* v = getenv(var);
    int a = 0, b = 0;
    if (v && sscanf(v, "%d.%d", &a, &b) == 2) return {a, b};
    return dflt;
}
std::pair<int, int> compute_capability() { return version_env("CAPSNET_EMULATOR_CC", {9, 0}); }
int driver_version() {
    const auto [a, b] = version_env("CAPSNET_EMULATOR_DRIVER_VERSION", {13, 0});
    return a * 1000 + b * 10;
}

// Registers per block a launch of `threads` threads of `regs` registers each takes: registers are
// given to warps in units of 256 (CUDA Occupancy Calculator, sm_80 and sm_90).
long registers_per_block(int regs, unsigned long long threads) {
    return (long)((regs * 32 + 255) / 256 * 256) * (long)((threads + 31) / 32);
}
constexpr long REGISTERS_PER_BLOCK = 65536;
struct Event {
    std::chrono::steady_clock::time_point t;
};

std::mutex mu;  // guards everything below
std::map<uintptr_t, size_t> allocations;
std::map<std::string, unsigned long long> launches;
size_t allocated = 0;
char primary_ctx_storage;
CUcontext const primary_ctx = (CUcontext)&primary_ctx_storage;
thread_local CUcontext current_ctx = nullptr;
bool initialised = false;

thread_local std::string last_message;
// how the emulated mma sums (kernels/mma.cuh): set per host thread, taken by the launches it makes
thread_local int mma_truncates = 0;
thread_local CUresult last_code = CUDA_SUCCESS;

CUresult fail(CUresult code, const std::string& msg) {
    last_code = code;
    last_message = msg;
    return code;
}

// The allocation holding [p, p+n), or false.
bool in_allocation(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> g(mu);
    auto it = allocations.upper_bound((uintptr_t)p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

CUresult check_range(const char* call, CUdeviceptr p, size_t n) {
    if (n == 0 || in_allocation(p, n)) return CUDA_SUCCESS;
    char buf[160];
    snprintf(buf, sizeof buf, "%s: [0x%llx, +%zu) is not inside one live device allocation", call, p, n);
    return fail(CUDA_ERROR_INVALID_VALUE, buf);
}

// ---- PTX: the entries, their parameter sizes and .maxntid ---------------------------------------------
size_t ptx_param_size(const std::string& decl) {
    // ".param .u64 .ptr .align 1 name", ".param .align 4 .b8 name[36]", ".param .f32 name"
    auto br = decl.find('[');
    if (br != std::string::npos) return (size_t)atol(decl.c_str() + br + 1);
    for (const char* t : {".u64", ".s64", ".b64", ".f64"})
        if (decl.find(t) != std::string::npos) return 8;
    for (const char* t : {".u32", ".s32", ".b32", ".f32"})
        if (decl.find(t) != std::string::npos) return 4;
    for (const char* t : {".u16", ".s16", ".b16", ".f16"})
        if (decl.find(t) != std::string::npos) return 2;
    return 1;
}

bool parse_ptx(const std::string& ptx, Module& m, std::string& err) {
    size_t at = 0;
    while ((at = ptx.find(".entry ", at)) != std::string::npos) {
        at += 7;
        size_t open = ptx.find('(', at), body = ptx.find('{', at);
        if (open == std::string::npos || body == std::string::npos) {
            err = "malformed .entry";
            return false;
        }
        std::string name = ptx.substr(at, open - at);
        name.erase(name.find_last_not_of(" \t\r\n") + 1);
        size_t close = ptx.find(')', open);
        Module::EntryInfo e;
        std::string params = ptx.substr(open + 1, close - open - 1);
        size_t p = 0;
        while ((p = params.find(".param", p)) != std::string::npos) {
            size_t end = params.find(',', p);
            e.param_sizes.push_back(ptx_param_size(params.substr(p, end == std::string::npos ? end : end - p)));
            p += 6;
        }
        std::string directives = ptx.substr(close, body - close);
        size_t mx = directives.find(".maxntid");
        if (mx != std::string::npos)
            sscanf(directives.c_str() + mx, ".maxntid %u, %u, %u", &e.maxntid[0], &e.maxntid[1], &e.maxntid[2]);
        m.entries[name] = e;
        at = body;
    }
    return true;
}

// ---- cubins: ELF files of machine code, with what ptxas decided in .nv.info attributes ---------------
// The EIATTR records the driver reads (as cuobjdump -elf names them): each is a format byte, an
// attribute byte and a 16-bit value, or (format 4, "SVAL") a 16-bit size and that many bytes.
constexpr unsigned char EIFMT_SVAL = 4, EIATTR_MAX_THREADS = 0x05, EIATTR_KPARAM_INFO = 0x17,
                        EIATTR_REGCOUNT = 0x2f;
constexpr unsigned SHF_CUDA_ENTRY = 0x10;  // st_other of a kernel's symbol

template <class F>
bool each_eiattr(const unsigned char* p, size_t n, F&& f) {
    size_t at = 0;
    while (at + 4 <= n) {
        const unsigned char fmt = p[at], attr = p[at + 1];
        uint16_t v;
        memcpy(&v, p + at + 2, 2);
        at += 4;
        if (fmt == EIFMT_SVAL) {
            if (at + v > n) return false;
            f(attr, p + at, (size_t)v);
            at += v;
        } else {
            f(attr, p + at - 2, (size_t)0);
        }
    }
    return at == n;
}

// The size of the ELF image at `p`: the farthest byte any header or section reaches.
size_t elf_size(const unsigned char* p) {
    Elf64_Ehdr h;
    memcpy(&h, p, sizeof h);
    size_t end = std::max<size_t>(sizeof h, h.e_shoff + (size_t)h.e_shnum * h.e_shentsize);
    end = std::max<size_t>(end, h.e_phoff + (size_t)h.e_phnum * h.e_phentsize);
    for (unsigned i = 0; i < h.e_shnum; ++i) {
        Elf64_Shdr sh;
        memcpy(&sh, p + h.e_shoff + (size_t)i * h.e_shentsize, sizeof sh);
        if (sh.sh_type != SHT_NOBITS) end = std::max<size_t>(end, sh.sh_offset + sh.sh_size);
    }
    return end;
}

bool parse_cubin(const unsigned char* p, Module& m, std::string& err) {
    Elf64_Ehdr h;
    memcpy(&h, p, sizeof h);
    if (h.e_ident[EI_CLASS] != ELFCLASS64 || h.e_machine != EM_CUDA || h.e_shentsize != sizeof(Elf64_Shdr) ||
        h.e_shstrndx >= h.e_shnum) {
        err = "not a 64-bit CUDA ELF image";
        return false;
    }
    const int sm = (int)((h.e_flags >> 8) & 0xff);
    const auto [major, minor] = compute_capability();
    // machine code runs on its own major architecture, at the same or a later minor version
    if (sm / 10 != major || sm % 10 > minor) {
        err = "a cubin for sm_" + std::to_string(sm) + " cannot run on a device of compute capability " +
              std::to_string(major) + "." + std::to_string(minor);
        return false;
    }
    std::vector<Elf64_Shdr> sec(h.e_shnum);
    for (unsigned i = 0; i < h.e_shnum; ++i) memcpy(&sec[i], p + h.e_shoff + (size_t)i * sizeof(Elf64_Shdr), sizeof(Elf64_Shdr));
    auto name = [&](const Elf64_Shdr& s) { return std::string((const char*)p + sec[h.e_shstrndx].sh_offset + s.sh_name); };
    // the kernels: function symbols marked as entries
    std::vector<std::string> sym_names;
    for (const Elf64_Shdr& s : sec) {
        if (s.sh_type != SHT_SYMTAB) continue;
        const char* strtab = (const char*)p + sec[s.sh_link].sh_offset;
        for (size_t k = 0; k < s.sh_size / sizeof(Elf64_Sym); ++k) {
            Elf64_Sym y;
            memcpy(&y, p + s.sh_offset + k * sizeof y, sizeof y);
            sym_names.push_back(strtab + y.st_name);
            if (ELF64_ST_TYPE(y.st_info) == STT_FUNC && (y.st_other & SHF_CUDA_ENTRY)) m.entries[strtab + y.st_name] = {};
        }
    }
    bool reserved = false;  // sm_80 and later keep 1 KiB of a block's shared memory for the system
    for (const Elf64_Shdr& s : sec) reserved |= name(s) == ".nv.shared.reserved.0";
    for (auto& [fn, e] : m.entries) e.static_smem = 0;
    for (const Elf64_Shdr& s : sec) {
        const std::string n = name(s);
        const unsigned char* data = p + s.sh_offset;
        if (n == ".nv.info") {
            // per-function attributes keyed by symbol index: registers
            if (!each_eiattr(data, s.sh_size, [&](unsigned char attr, const unsigned char* v, size_t len) {
                    if (attr != EIATTR_REGCOUNT || len != 8) return;
                    uint32_t sym, regs;
                    memcpy(&sym, v, 4);
                    memcpy(&regs, v + 4, 4);
                    if (sym < sym_names.size() && m.entries.count(sym_names[sym])) m.entries[sym_names[sym]].registers = (int)regs;
                })) {
                err = "a malformed .nv.info section";
                return false;
            }
        } else if (n.rfind(".nv.info.", 0) == 0 && m.entries.count(n.substr(9))) {
            Module::EntryInfo& e = m.entries[n.substr(9)];
            std::map<unsigned, size_t> params;  // ordinal -> size
            if (!each_eiattr(data, s.sh_size, [&](unsigned char attr, const unsigned char* v, size_t len) {
                    if (attr == EIATTR_KPARAM_INFO && len == 12) {
                        uint16_t ordinal;
                        uint32_t flags;
                        memcpy(&ordinal, v + 4, 2);
                        memcpy(&flags, v + 8, 4);
                        params[ordinal] = (flags >> 18) & 0x3fff;
                    } else if (attr == EIATTR_MAX_THREADS && len == 12) {
                        memcpy(e.maxntid, v, 12);
                    }
                })) {
                err = "a malformed " + n + " section";
                return false;
            }
            for (auto& [ordinal, size] : params) {
                if (ordinal != e.param_sizes.size()) {
                    err = n + ": parameter " + std::to_string(e.param_sizes.size()) + " is missing";
                    return false;
                }
                e.param_sizes.push_back(size);
            }
        } else if (n.rfind(".nv.shared.", 0) == 0 && m.entries.count(n.substr(11))) {
            m.entries[n.substr(11)].static_smem = (int)s.sh_size - (reserved ? 1024 : 0);
        }
    }
    for (auto& [fn, e] : m.entries) {
        if (e.registers < 0) {
            err = "kernel " + fn + " has no register count (EIATTR_REGCOUNT)";
            return false;
        }
        e.static_smem = std::max(e.static_smem, 0);
    }
    if (m.entries.empty()) {
        err = "the cubin has no kernel";
        return false;
    }
    return true;
}

// The driver's launch checks, without running anything.
CUresult check_launch(Function* f, dim3 grid, dim3 block, unsigned smem, void** params) {
    const std::string& k = f->name;
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return fail(CUDA_ERROR_INVALID_VALUE, k + ": a grid or block dimension is 0");
    if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024)
        return fail(CUDA_ERROR_INVALID_VALUE, k + ": block " + coords({block.x, block.y, block.z}) +
                                                  " exceeds 1024 threads (1024 x 1024 x 64)");
    const unsigned* mt = f->entry.maxntid;
    if (mt[0] && threads > (unsigned long long)mt[0] * std::max(mt[1], 1u) * std::max(mt[2], 1u))
        return fail(CUDA_ERROR_INVALID_VALUE,
                    k + ": " + std::to_string(threads) + " threads exceed its __launch_bounds__ (.maxntid " +
                        std::to_string(mt[0] * std::max(mt[1], 1u) * std::max(mt[2], 1u)) + ")");
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    k + ": grid " + coords({grid.x, grid.y, grid.z}) + " exceeds 2^31-1 x 65535 x 65535");
    if ((int)smem > f->max_dynamic_smem || smem > (unsigned)SMEM_OPTIN)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    k + ": " + std::to_string(smem) + " bytes of dynamic shared memory exceed its limit of " +
                        std::to_string(f->max_dynamic_smem) +
                        " (48 KiB unless CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES raises it)");
    const int static_smem = std::max(f->entry.static_smem, 0);
    if ((long)smem + static_smem > SMEM_OPTIN)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    k + ": " + std::to_string(static_smem) + " bytes of static and " + std::to_string(smem) +
                        " of dynamic shared memory exceed the " + std::to_string(SMEM_OPTIN) + " a block can have");
    if (f->entry.registers > 0 && registers_per_block(f->entry.registers, threads) > REGISTERS_PER_BLOCK)
        return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                    k + ": " + std::to_string(threads) + " threads of " + std::to_string(f->entry.registers) +
                        " registers take " + std::to_string(registers_per_block(f->entry.registers, threads)) +
                        " registers, more than the " + std::to_string(REGISTERS_PER_BLOCK) + " of a block");
    if (params == nullptr && !f->host->sizes.empty()) return fail(CUDA_ERROR_INVALID_VALUE, k + ": no kernelParams");
    return CUDA_SUCCESS;
}

CUresult launch(Function* f, dim3 grid, dim3 block, unsigned smem, void** params) {
    if (CUresult r = check_launch(f, grid, block, smem, params)) return r;
    const std::string& k = f->name;
    {
        std::lock_guard<std::mutex> g(mu);
        launches[k]++;
    }
    const unsigned long long total = (unsigned long long)grid.x * grid.y * grid.z;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex err_mu;
    std::string err;
    int err_code = CUDA_ERROR_LAUNCH_FAILED;
    const int truncates = mma_truncates;  // the launching thread's mode, for every block
    auto work = [&] {
        for (;;) {
            const unsigned long long i = next.fetch_add(1);
            if (i >= total || failed.load()) return;
            const uint3 b{(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y), (unsigned)(i / grid.x / grid.y)};
            int code = CUDA_ERROR_LAUNCH_FAILED;
            std::string e = run_block(k.c_str(), f->host->run, params, b, block, grid, smem, truncates, &code);
            if (!e.empty()) {
                std::lock_guard<std::mutex> g(err_mu);
                if (err.empty()) {
                    err = e;
                    err_code = code;
                }
                failed = true;
            }
        }
    };
    unsigned workers = std::thread::hardware_concurrency();
    if (const char* w = getenv("CAPSNET_EMULATOR_THREADS")) workers = (unsigned)atoi(w);
    workers = (unsigned)std::min<unsigned long long>(std::max(workers, 1u), total);
    std::vector<std::thread> pool;
    for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    if (!err.empty()) {
        fprintf(stderr, "capsnet emulated device: %s\n", err.c_str());
        return fail(err_code, err);
    }
    // a write past the end of a device allocation (the launch that did it is the one named)
    {
        std::lock_guard<std::mutex> g(mu);
        for (auto& [base, bytes] : allocations) {
            unsigned char* zone = (unsigned char*)base + bytes;
            const size_t at = first_written(zone, REDZONE);
            if (at == REDZONE) continue;
            memset(zone, 0xFF, REDZONE);
            err = "kernel " + k + " wrote past the end of a device allocation of " + std::to_string(bytes) +
                  " bytes (at byte " + std::to_string(bytes + at) + ")";
            fprintf(stderr, "capsnet emulated device: %s\n", err.c_str());
            return fail(CUDA_ERROR_ILLEGAL_ADDRESS, err);
        }
    }
    return CUDA_SUCCESS;
}

// ---- stream capture and graphs ---------------------------------------------------------------------------
// A stream under capture records its launches, memsets and device copies as nodes instead of running
// them; an instantiated graph replays its nodes in capture order (one stream, so that is their order
// of dependence), each launch checked and run as an eager one. Host copies, allocations, events and
// synchronisation inside a capture are refused and invalidate it, as the driver refuses the unsafe
// ones: a captured step must be launches alone.
struct Node {
    enum Kind { Kernel, Memset, Copy } kind = Kernel;
    Function* f = nullptr;
    dim3 grid{}, block{};
    unsigned smem = 0;
    std::vector<std::vector<unsigned char>> args;  // each parameter's bytes, copied at capture
    CUdeviceptr dst = 0, src = 0;
    size_t n = 0;        // memset: elements; copy: bytes
    unsigned value = 0;  // memset
    unsigned width = 1;  // memset element bytes: 1 or 4
};
struct Graph {
    std::vector<Node> nodes;
};
// CUstreamCaptureMode
constexpr int CAPTURE_GLOBAL = 0, CAPTURE_THREAD_LOCAL = 1, CAPTURE_RELAXED = 2;
struct Capture {
    Graph graph;
    int mode = CAPTURE_GLOBAL;
    std::thread::id owner;  // the thread that began it
    bool invalidated = false;
    std::string why;
};
std::mutex capture_mu;  // guards captures and every Capture in it (taken before mu, never after)
std::map<CUstream, Capture> captures;

// When `s` is being captured: `f(capture)` with the lock held, its result in `r` (a capture already
// invalidated refuses every call, as the driver does), and true. Else false.
template <class F>
bool captured(CUstream s, CUresult& r, F&& f) {
    std::lock_guard<std::mutex> g(capture_mu);
    auto it = captures.find(s);
    if (it == captures.end()) return false;
    Capture& c = it->second;
    r = c.invalidated ? fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "the stream's capture was invalidated: " + c.why) : f(c);
    return true;
}

// Refuses a call inside capture `c` (lock held), which can then only end without a graph.
CUresult refuse(Capture& c, const std::string& msg) {
    c.invalidated = true;
    c.why = msg;
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, msg);
}

// When `s` is being captured: the checks the call makes when it runs (`check()`, a CUresult whose
// message is last_message), then `make()`, the node that replays it, recorded in the graph; a failed
// check refuses the call. The result in `r`, and true. Else false.
template <class Check, class Make>
bool record(CUstream s, CUresult& r, Check&& check, Make&& make) {
    return captured(s, r, [&](Capture& c) {
        if (check()) return refuse(c, last_message);
        c.graph.nodes.push_back(make());
        return (CUresult)CUDA_SUCCESS;
    });
}

// Returns `msg` refused when stream `s` is being captured.
#define REFUSE_IN_CAPTURE(s, msg)                                                \
    do {                                                                         \
        CUresult refused_;                                                       \
        if (captured(s, refused_, [&](Capture& c) { return refuse(c, msg); })) \
            return refused_;                                                     \
    } while (0)

// A synchronous call (legacy copies, memsets, allocation, context synchronisation) while a capture it
// would break is under way: one in global mode, or one this thread began in thread-local mode (relaxed
// mode allows it). Refused, and those captures invalidated.
CUresult refuse_during_capture(const char* call) {
    std::lock_guard<std::mutex> g(capture_mu);
    const std::string msg = std::string(call) + " while a stream is being captured";
    bool hit = false;
    for (auto& [s, c] : captures) {
        const bool applies =
            c.mode == CAPTURE_GLOBAL || (c.mode == CAPTURE_THREAD_LOCAL && c.owner == std::this_thread::get_id());
        if (!applies) continue;
        hit = true;
        if (!c.invalidated) {
            c.invalidated = true;
            c.why = msg;
        }
    }
    return hit ? fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, msg) : CUDA_SUCCESS;
}

CUresult run_memset(CUdeviceptr dst, unsigned value, size_t n, unsigned width) {
    if (CUresult r = check_range(width == 1 ? "cuMemsetD8" : "cuMemsetD32", dst, n * width)) return r;
    if (width == 1) {
        if (n) memset((void*)(uintptr_t)dst, (int)value, n);
    } else {
        unsigned* d = (unsigned*)(uintptr_t)dst;
        for (size_t i = 0; i < n; ++i) d[i] = value;
    }
    return CUDA_SUCCESS;
}

CUresult run_copy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult r = check_range("cuMemcpyDtoD (source)", src, n)) return r;
    if (CUresult r = check_range("cuMemcpyDtoD (destination)", dst, n)) return r;
    if (n) memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}

CUresult run_graph(const Graph& g) {
    for (const Node& n : g.nodes) {
        CUresult r = CUDA_SUCCESS;
        switch (n.kind) {
            case Node::Kernel: {
                std::vector<void*> ptrs;
                for (const auto& a : n.args) ptrs.push_back((void*)a.data());
                r = launch(n.f, n.grid, n.block, n.smem, ptrs.empty() ? nullptr : ptrs.data());
                break;
            }
            case Node::Memset: r = run_memset(n.dst, n.value, n.n, n.width); break;
            case Node::Copy: r = run_copy(n.dst, n.src, n.n); break;
        }
        if (r) return r;
    }
    return CUDA_SUCCESS;
}

const char* error_name(CUresult e) {
    switch (e) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
        case CUDA_ERROR_MISALIGNED_ADDRESS: return "CUDA_ERROR_MISALIGNED_ADDRESS";
        case CUDA_ERROR_INVALID_PTX: return "CUDA_ERROR_INVALID_PTX";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case CUDA_ERROR_ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        default: return nullptr;
    }
}

}  // namespace

// ---- the emulator's own entry points -----------------------------------------------------------------
EXPORT int capsnet_emulator_version() { return 1; }
EXPORT const char* capsnet_emulator_variant() { return EMU_ASAN ? "address" : EMU_TSAN ? "thread" : "plain"; }
// 0: each block's threads run in order 0, 1, ... between barriers; 1: in reversed order.
EXPORT void capsnet_emu_set_schedule(int reversed) { schedule_reversed = reversed; }
// For the launches this host thread makes: 0, the emulated mma sums with fp32 FMAs in k order (round
// to nearest); 1, it truncates as kernels/mma.cuh's truncated_sum says.
EXPORT void capsnet_emu_set_mma_truncation(int truncates) { mma_truncates = truncates; }

// Launches of kernel `name` that passed the launch checks, since the library was loaded.
EXPORT unsigned long long capsnet_emu_launches(const char* name) {
    std::lock_guard<std::mutex> g(mu);
    auto it = launches.find(name);
    return it == launches.end() ? 0 : it->second;
}

// ---- initialisation, device, context ------------------------------------------------------------------
EXPORT CUresult cuInit(unsigned flags) {
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0");
    std::lock_guard<std::mutex> g(mu);
    initialised = true;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = driver_version();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetCount(int* n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return fail(CUDA_ERROR_INVALID_DEVICE, "the emulated device is device 0");
    *d = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "%s", DEVICE_NAME);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = TOTAL_MEM;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;                // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;        // MAX_BLOCK_DIM_X, _Y
        case 4: *v = 64; break;                  // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;          // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;       // MAX_GRID_DIM_Y, _Z
        case 8: *v = SMEM_DEFAULT; break;        // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                 // WARP_SIZE
        case 12: *v = 65536; break;              // MAX_REGISTERS_PER_BLOCK
        case 13: *v = 1980000; break;            // CLOCK_RATE (kHz)
        case 16: *v = 132; break;                // MULTIPROCESSOR_COUNT
        case 39: *v = 2048; break;               // MAX_THREADS_PER_MULTIPROCESSOR
        case 75: *v = compute_capability().first; break;   // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = compute_capability().second; break;  // COMPUTE_CAPABILITY_MINOR
        case 81: *v = 228 * 1024; break;         // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 97: *v = SMEM_OPTIN; break;         // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 1; break;                 // MEMORY_POOLS_SUPPORTED
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!initialised) return fail(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    *c = primary_ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxSetCurrent(CUcontext c) {
    current_ctx = c;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    *c = current_ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }
EXPORT CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = current_ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSynchronize() { return refuse_during_capture("cuCtxSynchronize"); }
EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}

// ---- errors ----------------------------------------------------------------------------------------
EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_name(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    // the last failure's own message on this thread, else the code's name
    if (e == last_code && !last_message.empty()) {
        *s = last_message.c_str();
        return CUDA_SUCCESS;
    }
    *s = error_name(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// ---- memory -----------------------------------------------------------------------------------------
CUresult mem_alloc(CUdeviceptr* p, size_t bytes) {
    if (!p || bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc: 0 bytes");
    void* m = nullptr;
    if (posix_memalign(&m, 256, bytes + REDZONE) != 0 || m == nullptr)
        return fail(CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc: out of memory (" + std::to_string(bytes) + " bytes)");
    memset(m, 0xFF, bytes + REDZONE);  // NaN until written
    std::lock_guard<std::mutex> g(mu);
    allocations[(uintptr_t)m] = bytes;
    allocated += bytes;
    *p = (CUdeviceptr)(uintptr_t)m;
    return CUDA_SUCCESS;
}
CUresult mem_free(CUdeviceptr p) {
    if (p == 0) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> g(mu);
    auto it = allocations.find((uintptr_t)p);
    if (it == allocations.end()) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree: not a device allocation");
    allocated -= it->second;
    allocations.erase(it);
    free((void*)(uintptr_t)p);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (CUresult r = refuse_during_capture("cuMemAlloc")) return r;
    return mem_alloc(p, bytes);
}
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    if (CUresult r = refuse_during_capture("cuMemFree")) return r;
    return mem_free(p);
}
// a captured allocation would be a graph's own memory node: not emulated, so refused
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    REFUSE_IN_CAPTURE(s, "cuMemAllocAsync on a stream being captured (allocation nodes are not emulated)");
    return mem_alloc(p, bytes);
}
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    REFUSE_IN_CAPTURE(s, "cuMemFreeAsync on a stream being captured (free nodes are not emulated)");
    return mem_free(p);
}
EXPORT CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    std::lock_guard<std::mutex> g(mu);
    if (free_b) *free_b = TOTAL_MEM - std::min(allocated, TOTAL_MEM);
    if (total) *total = TOTAL_MEM;
    return CUDA_SUCCESS;
}
CUresult copy_htod(CUdeviceptr dst, const void* src, size_t n) {
    if (CUresult r = check_range("cuMemcpyHtoD", dst, n)) return r;
    if (n) memcpy((void*)(uintptr_t)dst, src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (CUresult r = refuse_during_capture("cuMemcpyHtoD")) return r;
    return copy_htod(dst, src, n);
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    REFUSE_IN_CAPTURE(s, "cuMemcpyHtoDAsync on a stream being captured (host copies are not captured here)");
    return copy_htod(dst, src, n);
}
CUresult copy_dtoh(void* dst, CUdeviceptr src, size_t n) {
    if (CUresult r = check_range("cuMemcpyDtoH", src, n)) return r;
    if (n) memcpy(dst, (const void*)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (CUresult r = refuse_during_capture("cuMemcpyDtoH")) return r;
    return copy_dtoh(dst, src, n);
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    REFUSE_IN_CAPTURE(s, "cuMemcpyDtoHAsync on a stream being captured (host copies are not captured here)");
    return copy_dtoh(dst, src, n);
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult r = refuse_during_capture("cuMemcpyDtoD")) return r;
    return run_copy(dst, src, n);
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    CUresult r;
    auto check = [&] {
        if (CUresult e = check_range("cuMemcpyDtoDAsync (source)", src, n)) return e;
        return check_range("cuMemcpyDtoDAsync (destination)", dst, n);
    };
    if (record(s, r, check, [&] { return Node{.kind = Node::Copy, .dst = dst, .src = src, .n = n}; })) return r;
    return run_copy(dst, src, n);
}
// a memset on a stream being captured becomes a node; width is the element's bytes
CUresult memset_async(CUdeviceptr dst, unsigned v, size_t n, unsigned width, CUstream s) {
    CUresult r;
    auto check = [&] { return check_range(width == 1 ? "cuMemsetD8Async" : "cuMemsetD32Async", dst, n * width); };
    auto make = [&] { return Node{.kind = Node::Memset, .dst = dst, .n = n, .value = v, .width = width}; };
    if (record(s, r, check, make)) return r;
    return run_memset(dst, v, n, width);
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    if (CUresult r = refuse_during_capture("cuMemsetD8")) return r;
    return run_memset(dst, v, n, 1);
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) { return memset_async(dst, v, n, 1, s); }
EXPORT CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    if (CUresult r = refuse_during_capture("cuMemsetD32")) return r;
    return run_memset(dst, v, n, 4);
}
EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream s) { return memset_async(dst, v, n, 4, s); }
EXPORT CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    *p = malloc(bytes ? bytes : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
EXPORT CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}

// ---- streams and events: everything runs at the call, so they only keep time -----------------------
EXPORT CUresult cuStreamCreate(CUstream* s, unsigned) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = (CUstream) new char;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) { return cuStreamCreate(s, flags); }
EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    {
        std::lock_guard<std::mutex> g(capture_mu);
        captures.erase(s);
    }
    delete (char*)s;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream s) {
    REFUSE_IN_CAPTURE(s, "cuStreamSynchronize on a stream being captured");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent, unsigned) {
    REFUSE_IN_CAPTURE(s, "cuStreamWaitEvent on a stream being captured (event nodes are not emulated)");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamQuery(CUstream s) {
    REFUSE_IN_CAPTURE(s, "cuStreamQuery on a stream being captured");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventCreate(CUevent* e, unsigned) {
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *e = (CUevent) new Event{std::chrono::steady_clock::now()};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    delete (Event*)e;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecord(CUevent e, CUstream s) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    REFUSE_IN_CAPTURE(s, "cuEventRecord on a stream being captured (event nodes are not emulated)");
    ((Event*)e)->t = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    if (!ms || !a || !b) return CUDA_ERROR_INVALID_VALUE;
    *ms = std::chrono::duration<float, std::milli>(((Event*)b)->t - ((Event*)a)->t).count();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

// ---- modules and functions ----------------------------------------------------------------------------
EXPORT CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    const char* text = (const char*)image;
    auto m = std::make_unique<Module>();
    std::string err;
    if (memcmp(text, "\x7f" "ELF", 4) == 0) {
        const unsigned char* p = (const unsigned char*)image;
        // a copy of exactly the image's bytes, so AddressSanitizer sees a read past them
        std::vector<unsigned char> elf(p, p + elf_size(p));
        if (!parse_cubin(elf.data(), *m, err))
            return fail(err.rfind("a cubin for", 0) == 0 ? CUDA_ERROR_NO_BINARY_FOR_GPU : CUDA_ERROR_INVALID_IMAGE,
                        "cuModuleLoadData: " + err);
    } else if (!parse_ptx(text, *m, err)) {
        return fail(CUDA_ERROR_INVALID_PTX, "cuModuleLoadData: " + err);
    }
    *out = (CUmodule)m.release();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleUnload(CUmodule m) {
    delete (Module*)m;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleGetFunction(CUfunction* out, CUmodule mod, const char* name) {
    if (!out || !mod || !name) return CUDA_ERROR_INVALID_VALUE;
    Module* m = (Module*)mod;
    auto e = m->entries.find(name);
    if (e == m->entries.end()) return fail(CUDA_ERROR_NOT_FOUND, std::string("the module has no kernel ") + name);
    auto h = kernels().find(name);
    if (h == kernels().end())
        return fail(CUDA_ERROR_NOT_FOUND, std::string("the emulated device has no host build of kernel ") + name);
    if (h->second.sizes != e->second.param_sizes) {
        std::string s = std::string("kernel ") + name + ": the host build's parameter sizes (";
        for (size_t z : h->second.sizes) s += std::to_string(z) + " ";
        s += ") differ from the module's (";
        for (size_t z : e->second.param_sizes) s += std::to_string(z) + " ";
        return fail(CUDA_ERROR_INVALID_IMAGE, s + ")");
    }
    *out = (CUfunction) new Function{name, &h->second, e->second};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetAttribute(CUfunction fn, int attr, int value) {
    if (!fn) return CUDA_ERROR_INVALID_HANDLE;
    Function* f = (Function*)fn;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        const int static_smem = std::max(f->entry.static_smem, 0);
        if (value < 0 || value > SMEM_OPTIN - static_smem)
            return fail(CUDA_ERROR_INVALID_VALUE,
                        f->name + ": dynamic shared memory attribute " + std::to_string(value) + " exceeds the device's opt-in limit of " +
                            std::to_string(SMEM_OPTIN) + " less the kernel's " + std::to_string(static_smem) + " bytes of static shared memory");
        f->max_dynamic_smem = value;
        return CUDA_SUCCESS;
    }
    if (attr == 9) return CUDA_SUCCESS;  // PREFERRED_SHARED_MEMORY_CARVEOUT
    return fail(CUDA_ERROR_NOT_SUPPORTED, f->name + ": function attribute " + std::to_string(attr) + " is not emulated");
}
EXPORT CUresult cuFuncGetAttribute(int* v, int attr, CUfunction fn) {
    if (!v || !fn) return CUDA_ERROR_INVALID_VALUE;
    Function* f = (Function*)fn;
    const unsigned* mt = f->entry.maxntid;
    switch (attr) {
        case 0: {  // MAX_THREADS_PER_BLOCK: the launch bounds, 1024, and what the registers allow
            int most = mt[0] ? (int)(mt[0] * std::max(mt[1], 1u) * std::max(mt[2], 1u)) : 1024;
            while (f->entry.registers > 0 && most > 32 && registers_per_block(f->entry.registers, most) > REGISTERS_PER_BLOCK)
                most -= 32;
            *v = std::min(most, 1024);
            break;
        }
        case 1: *v = std::max(f->entry.static_smem, 0); break;  // SHARED_SIZE_BYTES
        case 4: *v = std::max(f->entry.registers, 0); break;    // NUM_REGS (0 where the module is PTX)
        case 8: *v = f->max_dynamic_smem; break;
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }
EXPORT CUresult cuLaunchKernel(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    if (!fn) return CUDA_ERROR_INVALID_HANDLE;
    if (extra != nullptr) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel: `extra` is not emulated");
    Function* f = (Function*)fn;
    const dim3 grid{gx, gy, gz}, block{bx, by, bz};
    // on a stream being captured: checked now, as the driver checks a captured launch, and the
    // arguments' bytes copied now
    CUresult r;
    auto make = [&] {
        Node node{.kind = Node::Kernel, .f = f, .grid = grid, .block = block, .smem = smem};
        for (size_t i = 0; i < f->host->sizes.size(); ++i) {
            const unsigned char* a = (const unsigned char*)params[i];
            node.args.emplace_back(a, a + f->host->sizes[i]);
        }
        return node;
    };
    if (record(s, r, [&] { return check_launch(f, grid, block, smem, params); }, make)) return r;
    return launch(f, grid, block, smem, params);
}

// ---- stream capture and graphs ------------------------------------------------------------------------
typedef struct CUgraph_st* CUgraph;
typedef struct CUgraphExec_st* CUgraphExec;

EXPORT CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    if (s == nullptr) return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture: the legacy NULL stream cannot be captured");
    if (mode < 0 || mode > 2) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamBeginCapture: unknown capture mode " + std::to_string(mode));
    std::lock_guard<std::mutex> g(capture_mu);
    if (captures.count(s)) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture: the stream is being captured already");
    Capture& c = captures[s];
    c.mode = mode;
    c.owner = std::this_thread::get_id();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamEndCapture(CUstream s, CUgraph* out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = nullptr;
    std::lock_guard<std::mutex> g(capture_mu);
    auto it = captures.find(s);
    if (it == captures.end()) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture: the stream is not being captured");
    Capture c = std::move(it->second);
    captures.erase(it);
    if (c.invalidated) return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "the capture was invalidated: " + c.why);
    *out = (CUgraph) new Graph(std::move(c.graph));
    return CUDA_SUCCESS;
}
// 0: not capturing, 1: active, 2: invalidated (CUstreamCaptureStatus)
EXPORT CUresult cuStreamIsCapturing(CUstream s, int* status) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(capture_mu);
    auto it = captures.find(s);
    *status = it == captures.end() ? 0 : it->second.invalidated ? 2 : 1;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec* out, CUgraph graph, unsigned long long flags) {
    if (!out || !graph) return CUDA_ERROR_INVALID_VALUE;
    if (flags != 0) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuGraphInstantiateWithFlags: flags are not emulated");
    *out = (CUgraphExec) new Graph(*(Graph*)graph);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) {
    if (!exec) return CUDA_ERROR_INVALID_HANDLE;
    REFUSE_IN_CAPTURE(s, "cuGraphLaunch on a stream being captured (child graphs are not emulated)");
    return run_graph(*(Graph*)exec);
}
EXPORT CUresult cuGraphUpload(CUgraphExec exec, CUstream) { return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    delete (Graph*)exec;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphDestroy(CUgraph graph) {
    delete (Graph*)graph;
    return CUDA_SUCCESS;
}
