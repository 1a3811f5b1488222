// elementwise.cu: activation kernels, one extern "C" name per activation, op and dtype.
//
// For every activation ACT and dtype (f16, f32, f64):
//   ACT_fwd_DT(x, y, n, a)                      y = f(x)
//   ACT_bwd_DT(g, x, dx, n, a)                  dx = g * f'(x), one pass; dx may be g
//   ACT_bwd_from_y_DT(g, y, dx, n, a)           dx = g * f' from y = f(x) (relu, leaky_relu,
//                                               elu, sigmoid, tanh, softplus); dx may be g
//   bias_ACT_fwd_DT(x, b, y, pre, rows, cols, a)  y = f(x + b) over a row-major (rows, cols)
//                                               matrix, b broadcast along rows; pre = x + b
//                                               is written only when pre is not null
// `a` is the activation's scalar parameter (see activations.cuh); it is float for f16 and
// f32, double for f64. f16 values are computed in float.
//
// Launch (gpunet/backend/kernels.py): block 256, grid min(ceil(n / 256), 32 x SMs); every
// kernel is a grid-stride loop with 64-bit indices, so any grid covers any n. The names are
// plain extern "C" symbols (no templates, no name_expressions), and the only include is our
// own header, so bare NVRTC compiles this file and CuPy's disk cache keys it by its text.
#include "activations.cuh"

#define GN_GRID_STRIDE_LOOP(i, n)                                                             \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);             \
         i += (long long)blockDim.x * gridDim.x)

#define GN_FORWARD(ACT, FN, DT, S, C)                                                         \
    extern "C" __global__ void ACT##_fwd_##DT(const S* x, S* y, long long n, C a) {           \
        GN_GRID_STRIDE_LOOP(i, n) { gn_store(y + i, FN<C>(gn_load(x[i]), a)); }                 \
    }

// Not __restrict__: dx may alias g (the in-place backward).
#define GN_BACKWARD(ACT, FN, DT, S, C)                                                        \
    extern "C" __global__ void ACT##_bwd_##DT(const S* g, const S* x, S* dx, long long n,     \
                                              C a) {                                          \
        GN_GRID_STRIDE_LOOP(i, n) {                                                           \
            gn_store(dx + i, gn_load(g[i]) * FN##_grad<C>(gn_load(x[i]), a));                 \
        }                                                                                     \
    }

#define GN_BACKWARD_FROM_Y(ACT, FN, DT, S, C)                                                 \
    extern "C" __global__ void ACT##_bwd_from_y_##DT(const S* g, const S* y, S* dx,           \
                                                     long long n, C a) {                      \
        GN_GRID_STRIDE_LOOP(i, n) {                                                           \
            gn_store(dx + i, gn_load(g[i]) * FN##_grad_y<C>(gn_load(y[i]), a));               \
        }                                                                                     \
    }

// The column of element i advances by stride % cols per step: one 64-bit division per
// thread instead of one per element.
#define GN_BIAS_FORWARD(ACT, FN, DT, S, C)                                                    \
    extern "C" __global__ void bias_##ACT##_fwd_##DT(const S* x, const S* b, S* y, S* pre,    \
                                                     long long rows, long long cols, C a) {   \
        long long n = rows * cols;                                                            \
        long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;                   \
        long long stride = (long long)blockDim.x * gridDim.x;                                 \
        if (start >= n) return;                                                               \
        long long col = start % cols, col_step = stride % cols;                               \
        for (long long i = start; i < n; i += stride) {                                       \
            C v = gn_load(x[i]) + gn_load(b[col]);                                            \
            if (pre) gn_store(pre + i, v);                                                    \
            gn_store(y + i, FN<C>(v, a));                                                     \
            col += col_step;                                                                  \
            if (col >= cols) col -= cols;                                                     \
        }                                                                                     \
    }

#define GN_ACTIVATION(ACT, FN, DT, S, C)                                                      \
    GN_FORWARD(ACT, FN, DT, S, C)                                                             \
    GN_BACKWARD(ACT, FN, DT, S, C)                                                            \
    GN_BIAS_FORWARD(ACT, FN, DT, S, C)

#define GN_ACTIVATION_WITH_Y(ACT, FN, DT, S, C)                                               \
    GN_ACTIVATION(ACT, FN, DT, S, C)                                                          \
    GN_BACKWARD_FROM_Y(ACT, FN, DT, S, C)

#define GN_ALL_ACTIVATIONS(DT, S, C)                                                          \
    GN_ACTIVATION_WITH_Y(relu, gn_relu, DT, S, C)                                             \
    GN_ACTIVATION_WITH_Y(leaky_relu, gn_leaky_relu, DT, S, C)                                 \
    GN_ACTIVATION_WITH_Y(elu, gn_elu, DT, S, C)                                               \
    GN_ACTIVATION_WITH_Y(sigmoid, gn_sigmoid, DT, S, C)                                       \
    GN_ACTIVATION_WITH_Y(tanh, gn_tanh_act, DT, S, C)                                         \
    GN_ACTIVATION_WITH_Y(softplus, gn_softplus, DT, S, C)                                     \
    GN_ACTIVATION(silu, gn_silu, DT, S, C)                                                    \
    GN_ACTIVATION(gelu, gn_gelu, DT, S, C)                                                    \
    GN_ACTIVATION(gelu_tanh, gn_gelu_tanh, DT, S, C)

GN_ALL_ACTIVATIONS(f16, gn_half, float)
GN_ALL_ACTIVATIONS(f32, float, float)
GN_ALL_ACTIVATIONS(f64, double, double)
