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

// The instantiations, one per activation and dtype; above each, the extern "C" symbols it
// defines (GN_ACTIVATION: ACT_fwd_DT, ACT_bwd_DT, bias_ACT_fwd_DT; GN_ACTIVATION_WITH_Y adds
// ACT_bwd_from_y_DT), so that grep finds every kernel name here. kernels.py launches them by
// these names (ACTIVATION_KERNELS); tests/kernels/test_kernels.py holds each list to what the
// preprocessor makes of the line below it.

// ---- f16: gn_half storage, float arithmetic
// relu_fwd_f16 relu_bwd_f16 bias_relu_fwd_f16 relu_bwd_from_y_f16
GN_ACTIVATION_WITH_Y(relu, gn_relu, f16, gn_half, float)
// leaky_relu_fwd_f16 leaky_relu_bwd_f16 bias_leaky_relu_fwd_f16 leaky_relu_bwd_from_y_f16
GN_ACTIVATION_WITH_Y(leaky_relu, gn_leaky_relu, f16, gn_half, float)
// elu_fwd_f16 elu_bwd_f16 bias_elu_fwd_f16 elu_bwd_from_y_f16
GN_ACTIVATION_WITH_Y(elu, gn_elu, f16, gn_half, float)
// sigmoid_fwd_f16 sigmoid_bwd_f16 bias_sigmoid_fwd_f16 sigmoid_bwd_from_y_f16
GN_ACTIVATION_WITH_Y(sigmoid, gn_sigmoid, f16, gn_half, float)
// tanh_fwd_f16 tanh_bwd_f16 bias_tanh_fwd_f16 tanh_bwd_from_y_f16
GN_ACTIVATION_WITH_Y(tanh, gn_tanh_act, f16, gn_half, float)
// softplus_fwd_f16 softplus_bwd_f16 bias_softplus_fwd_f16 softplus_bwd_from_y_f16
GN_ACTIVATION_WITH_Y(softplus, gn_softplus, f16, gn_half, float)
// silu_fwd_f16 silu_bwd_f16 bias_silu_fwd_f16
GN_ACTIVATION(silu, gn_silu, f16, gn_half, float)
// gelu_fwd_f16 gelu_bwd_f16 bias_gelu_fwd_f16
GN_ACTIVATION(gelu, gn_gelu, f16, gn_half, float)
// gelu_tanh_fwd_f16 gelu_tanh_bwd_f16 bias_gelu_tanh_fwd_f16
GN_ACTIVATION(gelu_tanh, gn_gelu_tanh, f16, gn_half, float)

// ---- bf16: gn_bf16 storage, float arithmetic
// relu_fwd_bf16 relu_bwd_bf16 bias_relu_fwd_bf16 relu_bwd_from_y_bf16
GN_ACTIVATION_WITH_Y(relu, gn_relu, bf16, gn_bf16, float)
// leaky_relu_fwd_bf16 leaky_relu_bwd_bf16 bias_leaky_relu_fwd_bf16 leaky_relu_bwd_from_y_bf16
GN_ACTIVATION_WITH_Y(leaky_relu, gn_leaky_relu, bf16, gn_bf16, float)
// elu_fwd_bf16 elu_bwd_bf16 bias_elu_fwd_bf16 elu_bwd_from_y_bf16
GN_ACTIVATION_WITH_Y(elu, gn_elu, bf16, gn_bf16, float)
// sigmoid_fwd_bf16 sigmoid_bwd_bf16 bias_sigmoid_fwd_bf16 sigmoid_bwd_from_y_bf16
GN_ACTIVATION_WITH_Y(sigmoid, gn_sigmoid, bf16, gn_bf16, float)
// tanh_fwd_bf16 tanh_bwd_bf16 bias_tanh_fwd_bf16 tanh_bwd_from_y_bf16
GN_ACTIVATION_WITH_Y(tanh, gn_tanh_act, bf16, gn_bf16, float)
// softplus_fwd_bf16 softplus_bwd_bf16 bias_softplus_fwd_bf16 softplus_bwd_from_y_bf16
GN_ACTIVATION_WITH_Y(softplus, gn_softplus, bf16, gn_bf16, float)
// silu_fwd_bf16 silu_bwd_bf16 bias_silu_fwd_bf16
GN_ACTIVATION(silu, gn_silu, bf16, gn_bf16, float)
// gelu_fwd_bf16 gelu_bwd_bf16 bias_gelu_fwd_bf16
GN_ACTIVATION(gelu, gn_gelu, bf16, gn_bf16, float)
// gelu_tanh_fwd_bf16 gelu_tanh_bwd_bf16 bias_gelu_tanh_fwd_bf16
GN_ACTIVATION(gelu_tanh, gn_gelu_tanh, bf16, gn_bf16, float)

// ---- f32: float storage, float arithmetic
// relu_fwd_f32 relu_bwd_f32 bias_relu_fwd_f32 relu_bwd_from_y_f32
GN_ACTIVATION_WITH_Y(relu, gn_relu, f32, float, float)
// leaky_relu_fwd_f32 leaky_relu_bwd_f32 bias_leaky_relu_fwd_f32 leaky_relu_bwd_from_y_f32
GN_ACTIVATION_WITH_Y(leaky_relu, gn_leaky_relu, f32, float, float)
// elu_fwd_f32 elu_bwd_f32 bias_elu_fwd_f32 elu_bwd_from_y_f32
GN_ACTIVATION_WITH_Y(elu, gn_elu, f32, float, float)
// sigmoid_fwd_f32 sigmoid_bwd_f32 bias_sigmoid_fwd_f32 sigmoid_bwd_from_y_f32
GN_ACTIVATION_WITH_Y(sigmoid, gn_sigmoid, f32, float, float)
// tanh_fwd_f32 tanh_bwd_f32 bias_tanh_fwd_f32 tanh_bwd_from_y_f32
GN_ACTIVATION_WITH_Y(tanh, gn_tanh_act, f32, float, float)
// softplus_fwd_f32 softplus_bwd_f32 bias_softplus_fwd_f32 softplus_bwd_from_y_f32
GN_ACTIVATION_WITH_Y(softplus, gn_softplus, f32, float, float)
// silu_fwd_f32 silu_bwd_f32 bias_silu_fwd_f32
GN_ACTIVATION(silu, gn_silu, f32, float, float)
// gelu_fwd_f32 gelu_bwd_f32 bias_gelu_fwd_f32
GN_ACTIVATION(gelu, gn_gelu, f32, float, float)
// gelu_tanh_fwd_f32 gelu_tanh_bwd_f32 bias_gelu_tanh_fwd_f32
GN_ACTIVATION(gelu_tanh, gn_gelu_tanh, f32, float, float)

// ---- f64: double storage, double arithmetic
// relu_fwd_f64 relu_bwd_f64 bias_relu_fwd_f64 relu_bwd_from_y_f64
GN_ACTIVATION_WITH_Y(relu, gn_relu, f64, double, double)
// leaky_relu_fwd_f64 leaky_relu_bwd_f64 bias_leaky_relu_fwd_f64 leaky_relu_bwd_from_y_f64
GN_ACTIVATION_WITH_Y(leaky_relu, gn_leaky_relu, f64, double, double)
// elu_fwd_f64 elu_bwd_f64 bias_elu_fwd_f64 elu_bwd_from_y_f64
GN_ACTIVATION_WITH_Y(elu, gn_elu, f64, double, double)
// sigmoid_fwd_f64 sigmoid_bwd_f64 bias_sigmoid_fwd_f64 sigmoid_bwd_from_y_f64
GN_ACTIVATION_WITH_Y(sigmoid, gn_sigmoid, f64, double, double)
// tanh_fwd_f64 tanh_bwd_f64 bias_tanh_fwd_f64 tanh_bwd_from_y_f64
GN_ACTIVATION_WITH_Y(tanh, gn_tanh_act, f64, double, double)
// softplus_fwd_f64 softplus_bwd_f64 bias_softplus_fwd_f64 softplus_bwd_from_y_f64
GN_ACTIVATION_WITH_Y(softplus, gn_softplus, f64, double, double)
// silu_fwd_f64 silu_bwd_f64 bias_silu_fwd_f64
GN_ACTIVATION(silu, gn_silu, f64, double, double)
// gelu_fwd_f64 gelu_bwd_f64 bias_gelu_fwd_f64
GN_ACTIVATION(gelu, gn_gelu, f64, double, double)
// gelu_tanh_fwd_f64 gelu_tanh_bwd_f64 bias_gelu_tanh_fwd_f64
GN_ACTIVATION(gelu_tanh, gn_gelu_tanh, f64, double, double)
