// host_emulation.h: compile the CUDA kernel files with g++, to run them on the CPU in tests.
//
//   g++ -std=c++17 -O2 -ffp-contract=off -fPIC -shared -include host_emulation.h shim.cpp
//
// where shim.cpp includes the .cu files and defines, per kernel, an extern "C" launcher
// (tests/kernels/kernel_tools.py generates it from the launch table in gpunet/backend/kernels.py):
//
//   extern "C" void emu_relu_fwd_f32(unsigned grid, unsigned block, const float* x, ...) {
//       gn_emu::launch(false, relu_fwd_f32, grid, block, x, ...);
//   }
//
// gn_emu::launch deduces the kernel's parameter types from both the kernel and the table's
// arguments, so a table entry that disagrees with the kernel does not compile.
//
// The execution model: blocks run one after another; threadIdx, blockIdx, blockDim and
// gridDim are globals the launcher sets before it runs each thread. A kernel that never
// synchronises runs its threads one after another, to completion. A block-cooperative kernel
// (one that uses __shared__ memory and __syncthreads, marked so in the launch table) runs each
// of its threads as a coroutine (ucontext) with its own stack: __syncthreads() switches back
// to the scheduler, which resumes every thread of the block in turn until all have reached
// the barrier, then releases it. That is the barrier's meaning on the GPU, so a reduction
// written for the GPU runs unchanged; __shared__ variables are function statics, shared by
// the block's threads (blocks never overlap). Calling __syncthreads from a kernel launched
// as non-cooperative, or a barrier not reached by every thread of the block, aborts with a
// message. This runs on Linux and other POSIX systems with ucontext.
//
// Not emulated: -ftz (denormals are kept on the CPU), fused multiply-add contraction (the
// GPU contracts a * b + c by default; -ffp-contract=off here) and warp-level operations
// (the kernels use none). atomicCAS is a plain read-modify-write: threads never overlap.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct gn_emu_dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline gn_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA's round-to-nearest products that are never contracted into an FMA (x86-64 has none).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

namespace gn_emu {

enum class State { running, at_barrier, done };

struct Block {
    ucontext_t scheduler;
    std::vector<ucontext_t> threads;
    std::vector<State> state;
    std::vector<std::vector<char>> stacks;
    std::function<void()> body;
    unsigned int current = 0;
    bool cooperative = false;
};

inline Block& block_state() {
    static Block b;
    return b;
}

[[noreturn]] inline void fail(const char* message) {
    std::fprintf(stderr, "host emulation: %s\n", message);
    std::abort();
}

inline void barrier() {
    Block& b = block_state();
    if (!b.cooperative)
        fail("__syncthreads() in a kernel launched as non-cooperative; mark it cooperative");
    unsigned int t = b.current;
    b.state[t] = State::at_barrier;
    swapcontext(&b.threads[t], &b.scheduler);
}

inline void thread_entry() {
    Block& b = block_state();
    b.body();
    b.state[b.current] = State::done;  // then uc_link returns to the scheduler
}

// Run one block of `block` threads as coroutines, releasing barriers as they fill.
inline void run_cooperative_block(unsigned int block) {
    Block& b = block_state();
    const size_t stack_size = 256 * 1024;
    b.threads.resize(block);
    b.state.assign(block, State::running);
    if (b.stacks.size() < block) b.stacks.resize(block);
    for (unsigned int t = 0; t < block; ++t) {
        if (b.stacks[t].size() < stack_size) b.stacks[t].resize(stack_size);
        getcontext(&b.threads[t]);
        b.threads[t].uc_stack.ss_sp = b.stacks[t].data();
        b.threads[t].uc_stack.ss_size = stack_size;
        b.threads[t].uc_link = &b.scheduler;
        makecontext(&b.threads[t], thread_entry, 0);
    }
    for (;;) {
        unsigned int done = 0;
        for (unsigned int t = 0; t < block; ++t) {
            if (b.state[t] == State::done) continue;
            b.state[t] = State::running;
            b.current = t;
            threadIdx.x = t;
            swapcontext(&b.scheduler, &b.threads[t]);
        }
        for (unsigned int t = 0; t < block; ++t) {
            done += b.state[t] == State::done;
        }
        if (done == block) return;
        if (done != 0) fail("__syncthreads() not reached by every thread of the block");
    }
}

template <typename... P>
void launch(bool cooperative, void (*kernel)(P...), unsigned int grid, unsigned int block,
            P... args) {
    Block& b = block_state();
    b.cooperative = cooperative;
    gridDim.x = grid;
    blockDim.x = block;
    if (cooperative) b.body = [&] { kernel(args...); };
    for (unsigned int g = 0; g < grid; ++g) {
        blockIdx.x = g;
        if (cooperative) {
            run_cooperative_block(block);
        } else {
            for (unsigned int t = 0; t < block; ++t) {
                threadIdx.x = t;
                kernel(args...);
            }
        }
    }
    b.cooperative = false;
}

}  // namespace gn_emu

inline void __syncthreads() { gn_emu::barrier(); }

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
    unsigned long long old = *address;
    if (old == compare) *address = value;
    return old;
}
