// optim.cu: one-pass optimizer updates over one flat float32 or float16 parameter buffer, and
// the global L2 norm of a flat gradient buffer (for clipping) as a two-stage reduction.
//
// The updates follow PyTorch's SGD and Adam/AdamW (torch.optim, foreach=False) step for step;
// the NumPy backend performs the same float32 operations in the same order.
//
// Every per-step scalar can live on the device, so a step replays as a CUDA graph with no host
// scalar (PyTorch's capturable/fused optimizers are the model): the step counts are int64
// arrays (one per parameter of the span) that count_steps advances, by one unless found_inf is
// set, just before the update; the update reads the count through a pointer and computes
// Adam's bias corrections itself, in double as the host path does (pow, IEEE division and
// sqrt; the one product is __dmul_rn, never contracted), rounded once to float. The lr is a
// double, or read through lr_ptr when that is not null (a one-element array that the host
// writes when the lr changes).
//
// Both updates take a gradient scale and a found-inf flag as device pointers (PyTorch's fused
// optimizers' grad_scale and found_inf), read by the kernel so a loss-scaled step needs no
// host sync; null means absent. Each gradient element is multiplied by the scale (in float32)
// and stored so; a nonzero flag makes the update do nothing else, otherwise the usual
// arithmetic follows.
#include "activations.cuh"

#define GN_GRID_STRIDE_LOOP(i, n)                                                             \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);             \
         i += (long long)blockDim.x * gridDim.x)

#define GN_BLOCK 256  // the launch block size; the reductions' shared arrays are this long

// g[i] in float32, times *grad_scale when given (without it, g[i] exactly: the same bits). The
// product is rounded on its own (__fmul_rn is never fused into an FMA), as NumPy rounds it,
// and stored back into g: the step leaves the gradient it used (unscaled, or averaged over
// ranks) in p.grad, as PyTorch's optimizers under a GradScaler do.
template <typename S>
__device__ __forceinline__ float gn_scaled_grad(S* g, long long i, const float* grad_scale) {
    float d = gn_load(g[i]);
    if (!grad_scale) return d;
    d = __fmul_rn(d, *grad_scale);
    gn_store(&g[i], d);
    return d;
}

// A nonzero *found_inf (an overflow in the loss-scaled gradients) skips the whole update.
__device__ __forceinline__ bool gn_skip(const float* found_inf) {
    return found_inf && *found_inf != 0.0f;
}

// A skipped update still multiplies g by the scale, so that after every loss-scaled step the
// gradient reads unscaled (as after PyTorch's GradScaler.step, which unscales first).
template <typename S>
__device__ __forceinline__ void gn_scale_only(S* g, long long n, const float* grad_scale) {
    if (!grad_scale) return;
    GN_GRID_STRIDE_LOOP(i, n) { gn_scaled_grad(g, i, grad_scale); }
}

// The step counts of a span's parameters, one further unless the step is skipped.
extern "C" __global__ void count_steps(long long* steps, long long n, const float* found_inf) {
    if (gn_skip(found_inf)) return;
    GN_GRID_STRIDE_LOOP(i, n) { steps[i] += 1; }
}

// The lr of this step: *lr_ptr when given (a device array), else the launch's lr.
__device__ __forceinline__ double gn_lr(double lr, const double* lr_ptr) {
    return lr_ptr ? *lr_ptr : lr;
}

// The low-precision copy of the master weights (backend/updates.py): under autocast the
// update also stores round(p_new) (to nearest even) into low_f16 or low_bf16, whichever is not
// null, in the same pass, so the GEMMs read it and no separate cast runs. A skipped update
// stores the cast of the old p, so the copy is the parameter's cast after every launch.
__device__ __forceinline__ void gn_store_low(gn_half* low_f16, gn_bf16* low_bf16, long long i,
                                             float p) {
    if (low_f16) {
        gn_store(&low_f16[i], p);
    } else if (low_bf16) {
        gn_store(&low_bf16[i], p);
    }
}

template <typename S>
__device__ __forceinline__ void gn_copy_low(const S* p, long long n, gn_half* low_f16,
                                            gn_bf16* low_bf16) {
    if (!low_f16 && !low_bf16) return;
    GN_GRID_STRIDE_LOOP(i, n) { gn_store_low(low_f16, low_bf16, i, gn_load(p[i])); }
}

// The updates keep their state (buf, m, v) in float32 and compute in float32 for float32 and
// float16 (gn_half) parameters alike: in half precision Adam's eps = 1e-8 would be 0. A half
// parameter and gradient are widened on load, and p is rounded to half once, on store.

// SGD: d = g + weight_decay p; with momentum, buf = momentum buf + (1 - dampening) d (buf = d
// on the first step), d = d + momentum buf (Nesterov) or buf; then p = p - lr d.
// buf is not touched (and may be null) when momentum == 0. The first step is the one whose
// (advanced) count *step is 1 when step is given, else first_step says.
template <typename S>
__device__ __forceinline__ void gn_sgd_update(S* p, S* g, float* buf, long long n,
                                              double lr_d, const double* lr_ptr, float momentum,
                                              float dampening, float weight_decay, int nesterov,
                                              int first_step, const long long* step,
                                              const float* grad_scale, const float* found_inf,
                                              gn_half* low_f16, gn_bf16* low_bf16) {
    if (gn_skip(found_inf)) {
        gn_copy_low(p, n, low_f16, low_bf16);
        gn_scale_only(g, n, grad_scale);
        return;
    }
    float lr = (float)gn_lr(lr_d, lr_ptr);
    int first = step ? *step == 1 : first_step;
    GN_GRID_STRIDE_LOOP(i, n) {
        float pi = gn_load(p[i]);
        float d = gn_scaled_grad(g, i, grad_scale);
        if (weight_decay != 0.0f) d = d + weight_decay * pi;
        if (momentum != 0.0f) {
            float b = first ? d : momentum * buf[i] + (1.0f - dampening) * d;
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        float pn = pi - lr * d;
        gn_store(&p[i], pn);
        gn_store_low(low_f16, low_bf16, i, pn);
    }
}

// Adam's scalars for count t >= 1, from the double hyperparameters as AdamHyper.scalars
// computes them: l2 (the L2 term, Adam), decay (AdamW: 1 - lr weight_decay), step_size =
// lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t); each rounded once to float.
struct GnAdamScalars {
    float l2, decay, step_size, bc2_sqrt;
};

__device__ __forceinline__ GnAdamScalars gn_adam_scalars(double lr, double beta1, double beta2,
                                                         double weight_decay, int decoupled,
                                                         long long t) {
    GnAdamScalars s;
    s.l2 = decoupled ? 0.0f : (float)weight_decay;
    s.decay = decoupled ? (float)(1.0 - __dmul_rn(lr, weight_decay)) : 1.0f;
    s.step_size = (float)(lr / (1.0 - pow(beta1, (double)t)));
    s.bc2_sqrt = (float)sqrt(1.0 - pow(beta2, (double)t));
    return s;
}

// Adam / AdamW. decay multiplies p first (AdamW: 1 - lr weight_decay; Adam: 1), and
// l2 adds the L2 term to the gradient (Adam; AdamW: 0). Then
// m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
// p = p - step_size m / (sqrt(v) / bc2_sqrt + eps), at the (advanced) count t = *step. A count
// below 1 (no step taken: the caller did not advance it) updates nothing.
template <typename S>
__device__ __forceinline__ void gn_adam_update(S* p, S* g, float* m, float* v,
                                               long long n, double lr, const double* lr_ptr,
                                               double beta1_d, double beta2_d, float eps,
                                               double weight_decay, int decoupled,
                                               const long long* step, const float* grad_scale,
                                               const float* found_inf, gn_half* low_f16,
                                               gn_bf16* low_bf16) {
    if (gn_skip(found_inf) || *step < 1) {
        gn_copy_low(p, n, low_f16, low_bf16);
        gn_scale_only(g, n, grad_scale);
        return;
    }
    GnAdamScalars s = gn_adam_scalars(gn_lr(lr, lr_ptr), beta1_d, beta2_d, weight_decay,
                                      decoupled, *step);
    float beta1 = (float)beta1_d, beta2 = (float)beta2_d;
    GN_GRID_STRIDE_LOOP(i, n) {
        float pi = gn_load(p[i]);
        float gi = gn_scaled_grad(g, i, grad_scale);
        if (s.l2 != 0.0f) gi = gi + s.l2 * pi;
        if (s.decay != 1.0f) pi = pi * s.decay;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float denom = gn_sqrt(vi) / s.bc2_sqrt + eps;
        float pn = pi - s.step_size * (mi / denom);
        gn_store(&p[i], pn);
        gn_store_low(low_f16, low_bf16, i, pn);
    }
}

// The instantiations, one per parameter storage type; above each, the extern "C" symbols it
// defines (kernels.py launches them by these names, UPDATE_KERNELS; tests/kernels/test_kernels.py
// checks each list).
#define GN_UPDATES(SFX, S)                                                                    \
    extern "C" __global__ void sgd_update_##SFX(                                              \
        S* p, S* g, float* buf, long long n, double lr, const double* lr_ptr,                 \
        float momentum, float dampening, float weight_decay, int nesterov, int first_step,    \
        const long long* step, const float* grad_scale, const float* found_inf,               \
        gn_half* low_f16, gn_bf16* low_bf16) {                                                \
        gn_sgd_update(p, g, buf, n, lr, lr_ptr, momentum, dampening, weight_decay, nesterov,  \
                      first_step, step, grad_scale, found_inf, low_f16, low_bf16);            \
    }                                                                                         \
    extern "C" __global__ void adam_update_##SFX(                                             \
        S* p, S* g, float* m, float* v, long long n, double lr, const double* lr_ptr,         \
        double beta1, double beta2, float eps, double weight_decay, int decoupled,            \
        const long long* step, const float* grad_scale, const float* found_inf,               \
        gn_half* low_f16, gn_bf16* low_bf16) {                                                \
        gn_adam_update(p, g, m, v, n, lr, lr_ptr, beta1, beta2, eps, weight_decay, decoupled, \
                       step, grad_scale, found_inf, low_f16, low_bf16);                       \
    }

// sgd_update_f32 adam_update_f32
GN_UPDATES(f32, float)
// sgd_update_f16 adam_update_f16
GN_UPDATES(f16, gn_half)

// Stage 1 of the global norm: each block writes the sum of squares of its grid-stride share
// to partials[blockIdx.x], accumulated in double and combined by a tree in shared memory.
extern "C" __global__ void grad_norm_partial_f32(const float* x, long long n, double* partials) {
    __shared__ double acc[GN_BLOCK];
    double sum = 0.0;
    GN_GRID_STRIDE_LOOP(i, n) {
        double v = (double)x[i];
        sum += v * v;
    }
    unsigned int t = threadIdx.x;
    acc[t] = sum;
    __syncthreads();
    for (unsigned int half = GN_BLOCK / 2; half > 0; half >>= 1) {
        if (t < half) acc[t] += acc[t + half];
        __syncthreads();
    }
    if (t == 0) partials[blockIdx.x] = acc[0];
}

// Stage 2, one block: out[0] = sqrt(sum of the num_partials partial sums), as float.
extern "C" __global__ void grad_norm_finish_f32(const double* partials, long long num_partials,
                                                float* out) {
    __shared__ double acc[GN_BLOCK];
    unsigned int t = threadIdx.x;
    double sum = 0.0;
    for (long long i = t; i < num_partials; i += GN_BLOCK) sum += partials[i];
    acc[t] = sum;
    __syncthreads();
    for (unsigned int half = GN_BLOCK / 2; half > 0; half >>= 1) {
        if (t < half) acc[t] += acc[t + half];
        __syncthreads();
    }
    if (t == 0) out[0] = (float)gn_sqrt(acc[0]);
}
