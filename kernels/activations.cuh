// activations.cuh: the one source of the activation formulas, for the GPU and the CPU.
//
// For each activation: f(x), its derivative f'(x), and where it exists f' computed from the
// output y = f(x) (so a backward pass may keep y instead of x). Every function is
// __host__ __device__ and written in its numerically stable form: sigmoid through
// exp(-|x|), softplus through max + log1p, ELU through expm1, exact GELU through
// erfc (no cancellation in 1 + erf for x << 0), tanh-GELU as x * sigmoid(2u). No hard
// switches at thresholds: piecewise functions select on the sign of x only.
//
// The NumPy backend (gpunet/backend/numpy_fused.py) computes these formulas operation for
// operation, and the kernel tests hold the two equal. The scalar parameter `a` is the
// activation's one parameter (leaky_relu: negative slope, elu: alpha, softplus: beta) and is
// ignored by the others.
//
// Only builtin math functions are used (expf, expm1f, log1pf, tanhf, erfcf and their double
// forms), so bare NVRTC compiles this without any header; g++ gets them from
// host_emulation.h. Half precision is storage only: values are computed in float
// (gn_load/gn_store convert, with round-to-nearest-even, in integer arithmetic).
#pragma once

// ---------------------------------------------------------------- math by compute type
#define GN_MATH(name, float_fn, double_fn)                                                  \
    __host__ __device__ __forceinline__ float name(float x) { return float_fn(x); }        \
    __host__ __device__ __forceinline__ double name(double x) { return double_fn(x); }

GN_MATH(gn_exp, expf, exp)
GN_MATH(gn_expm1, expm1f, expm1)
GN_MATH(gn_log1p, log1pf, log1p)
GN_MATH(gn_tanh, tanhf, tanh)
GN_MATH(gn_erfc, erfcf, erfc)
GN_MATH(gn_abs, fabsf, fabs)
GN_MATH(gn_sqrt, sqrtf, sqrt)

// ---------------------------------------------------------------- storage types
// IEEE binary16 as its 16 bits. NVRTC has no __half without cuda_fp16.h (a toolkit header
// we do not ship), so half values are converted by hand; the same code runs on the host.
typedef unsigned short gn_half;

union gn_bits32 {
    float f;
    unsigned int u;
};

__host__ __device__ __forceinline__ float gn_half_to_float(gn_half h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exponent = (h >> 10) & 0x1fu;
    unsigned int mantissa = h & 0x3ffu;
    gn_bits32 out;
    if (exponent == 0x1fu) {  // infinity or NaN
        out.u = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
        out.f = (float)mantissa * 5.9604644775390625e-8f;
        out.u |= sign;
    } else {
        out.u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    return out.f;
}

// Round to nearest even (F. Giesen's float_to_half_fast3_rtne); NaN becomes a quiet NaN.
__host__ __device__ __forceinline__ gn_half gn_float_to_half(float value) {
    gn_bits32 f;
    f.f = value;
    unsigned int sign = f.u & 0x80000000u;
    f.u ^= sign;
    unsigned int out;
    if (f.u >= 0x47800000u) {  // |value| >= 65536: infinity, or NaN
        out = f.u > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (f.u < 0x38800000u) {  // below the smallest normal half: add 0.5f to align
        gn_bits32 magic;
        magic.u = 0x3f000000u;
        f.f += magic.f;
        out = f.u - magic.u;
    } else {
        unsigned int odd = (f.u >> 13) & 1u;
        f.u += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round
        out = f.u >> 13;
    }
    return (gn_half)(out | (sign >> 16));
}

// bfloat16 as its 16 bits: float's sign, 8 exponent bits and top 7 mantissa bits (bare NVRTC
// has no cuda_bf16.h either). A struct, so that its loads and stores overload apart from
// gn_half's (both are 16-bit integers).
struct gn_bf16 {
    unsigned short bits;
};

__host__ __device__ __forceinline__ float gn_bf16_to_float(gn_bf16 h) {
    gn_bits32 out;
    out.u = (unsigned int)h.bits << 16;
    return out.f;
}

// Round to nearest even, as ml_dtypes (and NumPy's gpunet.bfloat16) does; NaN becomes the
// quiet NaN of its sign.
__host__ __device__ __forceinline__ gn_bf16 gn_float_to_bf16(float value) {
    gn_bits32 f;
    f.f = value;
    gn_bf16 out;
    if ((f.u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = (f.u & 0x80000000u) ? 0xffc0u : 0x7fc0u;
    } else {
        out.bits = (unsigned short)((f.u + 0x7fffu + ((f.u >> 16) & 1u)) >> 16);
    }
    return out;
}

__host__ __device__ __forceinline__ float gn_load(gn_half v) { return gn_half_to_float(v); }
__host__ __device__ __forceinline__ float gn_load(gn_bf16 v) { return gn_bf16_to_float(v); }
__host__ __device__ __forceinline__ float gn_load(float v) { return v; }
__host__ __device__ __forceinline__ double gn_load(double v) { return v; }
__host__ __device__ __forceinline__ void gn_store(gn_half* p, float v) { *p = gn_float_to_half(v); }
__host__ __device__ __forceinline__ void gn_store(gn_bf16* p, float v) { *p = gn_float_to_bf16(v); }
__host__ __device__ __forceinline__ void gn_store(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ void gn_store(double* p, double v) { *p = v; }

// ---------------------------------------------------------------- building blocks
// The selects below are exactly NumPy's np.maximum(x, 0), np.minimum(x, 0), x > 0 and x <= 0
// (NaN propagating through max0/min0, +0 for -0), so the CPU mirror computes the same bits
// with branch-free ufuncs: a NumPy select (np.where) on a random mask costs 10x a pass.
template <typename T>
__host__ __device__ __forceinline__ T gn_max0(T x) { return x <= T(0) ? T(0) : x; }
template <typename T>
__host__ __device__ __forceinline__ T gn_min0(T x) { return x >= T(0) ? T(0) : x; }
template <typename T>
__host__ __device__ __forceinline__ T gn_pos(T x) { return x > T(0) ? T(1) : T(0); }
template <typename T>
__host__ __device__ __forceinline__ T gn_nonpos(T x) { return x <= T(0) ? T(1) : T(0); }

// ---------------------------------------------------------------- relu
// max(x, 0), NaN propagating; f' = 1 for x > 0, else 0 (also from y: y > 0 iff x > 0).
template <typename T>
__host__ __device__ __forceinline__ T gn_relu(T x, T) { return gn_max0(x); }
template <typename T>
__host__ __device__ __forceinline__ T gn_relu_grad(T x, T) { return gn_pos(x); }
template <typename T>
__host__ __device__ __forceinline__ T gn_relu_grad_y(T y, T) { return gn_pos(y); }

// ---------------------------------------------------------------- leaky_relu
// x for x > 0, else a x: max(x, 0) + a min(x, 0). f' = 1 or a, as p + a (1 - p) with
// p = pos(x) (each term exactly 0 or its value). From y: valid for a >= 0 (then y > 0 iff
// x > 0).
template <typename T>
__host__ __device__ __forceinline__ T gn_leaky_relu(T x, T a) {
    return gn_max0(x) + a * gn_min0(x);
}
template <typename T>
__host__ __device__ __forceinline__ T gn_leaky_relu_grad(T x, T a) {
    T p = gn_pos(x);
    return p + a * (T(1) - p);
}
template <typename T>
__host__ __device__ __forceinline__ T gn_leaky_relu_grad_y(T y, T a) {
    return gn_leaky_relu_grad(y, a);
}

// ---------------------------------------------------------------- elu
// x for x > 0, else a (exp(x) - 1): max(x, 0) + a expm1(min(x, 0)) (expm1: accurate near 0,
// and never exp of a large x). f' = 1 or a exp(x). From y: f' = y + a where y <= 0 (valid
// for a >= 0), written with min(y, 0) so that y = +inf gives 1, not 0 * inf.
template <typename T>
__host__ __device__ __forceinline__ T gn_elu(T x, T a) {
    return gn_max0(x) + a * gn_expm1(gn_min0(x));
}
template <typename T>
__host__ __device__ __forceinline__ T gn_elu_grad(T x, T a) {
    return gn_pos(x) + gn_nonpos(x) * (a * gn_exp(gn_min0(x)));
}
template <typename T>
__host__ __device__ __forceinline__ T gn_elu_grad_y(T y, T a) {
    return gn_pos(y) + gn_nonpos(y) * (gn_min0(y) + a);
}

// ---------------------------------------------------------------- sigmoid
// 1 / (1 + exp(-x)) through z = exp(-|x|) in (0, 1], so nothing overflows and the left tail
// keeps its relative accuracy: 1/(1+z) for x >= 0, z/(1+z) below (the CPU mirror selects the
// numerator as max(z, x >= 0), branch-free). f'(x) = z / (1+z)^2 (symmetric, no
// cancellation); from y: y (1 - y).
template <typename T>
__host__ __device__ __forceinline__ T gn_sigmoid(T x, T) {
    T z = gn_exp(-gn_abs(x));
    return (x >= T(0) ? T(1) : z) / (T(1) + z);
}
template <typename T>
__host__ __device__ __forceinline__ T gn_sigmoid_grad(T x, T) {
    T z = gn_exp(-gn_abs(x));
    T d = T(1) + z;
    return z / (d * d);
}
template <typename T>
__host__ __device__ __forceinline__ T gn_sigmoid_grad_y(T y, T) { return y * (T(1) - y); }

// d/dx [x sigmoid(v(x))] = s + x s'(v) v' (the product rule), s = sigmoid(v) and
// s'(v) = z / (1+z)^2 as above: silu (v = x, v' = 1) and tanh-GELU (v = 2u).
template <typename T>
__host__ __device__ __forceinline__ T gn_x_sigmoid_grad(T x, T v, T dv) {
    T z = gn_exp(-gn_abs(v));
    T d = T(1) + z;
    T s = (v >= T(0) ? T(1) : z) / d;
    return s + x * (z / (d * d)) * dv;
}

// ---------------------------------------------------------------- tanh
// f' = 1 - tanh(x)^2; from y: 1 - y^2.
template <typename T>
__host__ __device__ __forceinline__ T gn_tanh_act(T x, T) { return gn_tanh(x); }
template <typename T>
__host__ __device__ __forceinline__ T gn_tanh_act_grad(T x, T) {
    T t = gn_tanh(x);
    return T(1) - t * t;
}
template <typename T>
__host__ __device__ __forceinline__ T gn_tanh_act_grad_y(T y, T) { return T(1) - y * y; }

// ---------------------------------------------------------------- softplus
// log(1 + exp(a x)) / a = (max(a x, 0) + log1p(exp(-|a x|))) / a: no overflow for any x, and
// no switch to the identity at a threshold. f' = sigmoid(a x); from y: 1 - exp(-a y) =
// -expm1(-a y), accurate for y -> 0 (x << 0) too, and one exp instead of sigmoid's work.
template <typename T>
__host__ __device__ __forceinline__ T gn_softplus(T x, T a) {
    T u = a * x;
    return (gn_max0(u) + gn_log1p(gn_exp(-gn_abs(u)))) / a;
}
template <typename T>
__host__ __device__ __forceinline__ T gn_softplus_grad(T x, T a) {
    return gn_sigmoid(a * x, a);
}
template <typename T>
__host__ __device__ __forceinline__ T gn_softplus_grad_y(T y, T a) {
    return -gn_expm1(-a * y);
}

// ---------------------------------------------------------------- silu
// x sigmoid(x); f' = s + x s' = s (1 + x (1 - s)), s = sigmoid(x), computed as the former
// so that no 1 - s cancels for x >> 0.
template <typename T>
__host__ __device__ __forceinline__ T gn_silu(T x, T a) { return x * gn_sigmoid(x, a); }
template <typename T>
__host__ __device__ __forceinline__ T gn_silu_grad(T x, T) {
    return gn_x_sigmoid_grad(x, x, T(1));
}

// ---------------------------------------------------------------- gelu (exact)
// x Phi(x), Phi the standard normal CDF = erfc(-x / sqrt 2) / 2 (erfc, not 1 + erf: the left
// tail keeps its relative accuracy). f' = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi).
template <typename T>
__host__ __device__ __forceinline__ T gn_gelu(T x, T) {
    return x * (T(0.5) * gn_erfc(x * T(-0.70710678118654752440)));
}
template <typename T>
__host__ __device__ __forceinline__ T gn_gelu_grad(T x, T) {
    T cdf = T(0.5) * gn_erfc(x * T(-0.70710678118654752440));
    T pdf = T(0.39894228040143267794) * gn_exp(T(-0.5) * x * x);
    return cdf + x * pdf;
}

// ---------------------------------------------------------------- gelu (tanh approximation)
// x (1 + tanh(u)) / 2 with u = k (x + c x^3), k = sqrt(2/pi), c = 0.044715; computed as
// x sigmoid(2u), the same function without the cancellation in 1 + tanh(u) for x << 0.
// f' = s + x s'(2u) (2u)', (2u)' = 2k (1 + 3c x^2), as for silu.
template <typename T>
__host__ __device__ __forceinline__ T gn_gelu_tanh_u2(T x) {
    return T(2 * 0.79788456080286535588) * (x + T(0.044715) * x * x * x);
}
template <typename T>
__host__ __device__ __forceinline__ T gn_gelu_tanh(T x, T a) {
    return x * gn_sigmoid(gn_gelu_tanh_u2(x), a);
}
template <typename T>
__host__ __device__ __forceinline__ T gn_gelu_tanh_grad(T x, T) {
    T du2 = T(2 * 0.79788456080286535588) * (T(1) + T(3 * 0.044715) * x * x);
    return gn_x_sigmoid_grad(x, gn_gelu_tanh_u2(x), du2);
}
