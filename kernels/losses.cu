// losses.cu: softmax cross-entropy over the rows of a logits matrix, forward and backward,
// one thread per row (a classifier's rows are short: the classes), for f32 and f64.
//
//   cross_entropy_rows_DT(z, y, loss, n, c, fault)
//       loss[i] = logsumexp(z[i, :]) - z[i, y[i]], with logsumexp = m + log(sum exp(z - m))
//       and m the row's max (no overflow for any finite logits)
//   cross_entropy_rows_backward_DT(z, y, g, dz, n, c, scale, g_per_row, fault)
//       dz[i, j] = (softmax(z[i, :])[j] - [j == y[i]]) * g_i * scale, g_i = g[i] when
//       g_per_row (reduction "none") else g[0] (mean: scale = 1 / n; sum: scale = 1)
//   check_range(y, n, lo, hi, op, fault)
//       records the first y[i] outside [lo, hi) as a fault of op: the labels where no row
//       kernel runs (float16 logits: lo 0, hi c) and gpunet.take's indices (lo -size, hi size)
//
// A label outside [0, c) makes its row's loss and gradient NaN and is recorded in
// fault = {op code, index, value, bound} (4 long longs, zero when clean; the first wins):
// the GPU cannot raise, so the host reads the buffer the next time data reaches it and
// raises the error the CPU raises at once (gpunet/backend/faults.py). The mean or sum of the
// losses is one more reduction (CuPy's). Launch: the rows are the grid-stride loop's n.
#include "activations.cuh"

GN_MATH(gn_log, logf, log)

#define GN_GRID_STRIDE_LOOP(i, n)                                                                  \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                  \
         i += (long long)blockDim.x * gridDim.x)

template <typename T>
__host__ __device__ __forceinline__ T gn_nan() {
    T zero = (T)0;
    return zero / zero;  // no header's NAN macro: bare NVRTC has none
}

#define GN_FAULT_CROSS_ENTROPY 1LL  // the op codes of faults.py's FAULT_OPS

// Record a fault unless one is already recorded: the thread whose compare-and-swap claims
// fault[0] writes the rest, so the four values always come from one element.
__device__ __forceinline__ void gn_record_fault(long long* fault, long long op, long long i,
                                                long long value, long long bound) {
    unsigned long long* state = (unsigned long long*)fault;
    if (atomicCAS(state, 0ULL, (unsigned long long)op) == 0ULL) {
        fault[1] = i;
        fault[2] = value;
        fault[3] = bound;
    }
}

// The row's max and sum of exp(z - max): logsumexp = m + log(s).
template <typename T>
__host__ __device__ __forceinline__ void gn_row_max_sum(const T* row, long long c, T& m, T& s) {
    m = row[0];
    for (long long j = 1; j < c; ++j) m = row[j] > m ? row[j] : m;
    s = (T)0;
    for (long long j = 0; j < c; ++j) s += gn_exp(row[j] - m);
}

#define GN_CE_FORWARD(DT, T)                                                                       \
    extern "C" __global__ void cross_entropy_rows_##DT(const T* z, const long long* y,             \
                                                       T* loss, long long n, long long c,          \
                                                       long long* fault) {                         \
        GN_GRID_STRIDE_LOOP(i, n) {                                                                \
            const T* row = z + i * c;                                                              \
            long long label = y[i];                                                                \
            if (label < 0 || label >= c) {                                                         \
                gn_record_fault(fault, GN_FAULT_CROSS_ENTROPY, i, label, c);                       \
                loss[i] = gn_nan<T>();                                                             \
                continue;                                                                          \
            }                                                                                      \
            T m, s;                                                                                \
            gn_row_max_sum(row, c, m, s);                                                          \
            loss[i] = (m + gn_log(s)) - row[label];                                                \
        }                                                                                          \
    }

#define GN_CE_BACKWARD(DT, T)                                                                      \
    extern "C" __global__ void cross_entropy_rows_backward_##DT(                                   \
        const T* z, const long long* y, const T* g, T* dz, long long n, long long c, T scale,      \
        int g_per_row, long long* fault) {                                                         \
        GN_GRID_STRIDE_LOOP(i, n) {                                                                \
            const T* row = z + i * c;                                                              \
            T* out = dz + i * c;                                                                   \
            long long label = y[i];                                                                \
            T m, s;                                                                                \
            gn_row_max_sum(row, c, m, s);                                                          \
            T w = (g_per_row ? g[i] : g[0]) * scale;                                               \
            T ws = w / s;                                                                          \
            bool bad = label < 0 || label >= c;                                                    \
            if (bad) gn_record_fault(fault, GN_FAULT_CROSS_ENTROPY, i, label, c);                  \
            for (long long j = 0; j < c; ++j) {                                                    \
                T v = gn_exp(row[j] - m) * ws;                                                     \
                out[j] = bad ? gn_nan<T>() : (j == label ? v - w : v);                             \
            }                                                                                      \
        }                                                                                          \
    }

// The instantiations; above each, the extern "C" symbol it defines (kernels.py launches
// them by these names, CROSS_ENTROPY_KERNELS; tests/kernels/test_kernels.py checks each list).
// cross_entropy_rows_f32
GN_CE_FORWARD(f32, float)
// cross_entropy_rows_f64
GN_CE_FORWARD(f64, double)
// cross_entropy_rows_backward_f32
GN_CE_BACKWARD(f32, float)
// cross_entropy_rows_backward_f64
GN_CE_BACKWARD(f64, double)

extern "C" __global__ void check_range(const long long* y, long long n, long long lo,
                                       long long hi, long long op, long long* fault) {
    GN_GRID_STRIDE_LOOP(i, n) {
        if (y[i] < lo || y[i] >= hi) gn_record_fault(fault, op, i, y[i], hi);
    }
}
