// norm.cu: RMSNorm over rows, and its residual-add fusion for gemma's post-norms.
//
// rms_norm(x, w, out, residual, n, eps, mode): x, out, residual fp32 (R, n) row-major, w fp32 (n,).
//   mode 0 (rms_norm):      out = x / sqrt(mean(x^2) + eps) * w            (out may alias x)
//   mode 2 (rms_norm_add):  residual += norm(x) * w                        (gemma's post-norms)
// Launch geometry: one block per row (grid R), blockDim a multiple of 32 (the launcher picks 32..1024
// from n); each thread strides over the row twice (sum of squares, then scale and write).
// QK-norm is mode 0 over x viewed as (T*H, head_dim).
// Numpy reference: reference/ops.rms_norm (x * (1/sqrt(ms + eps))) * w.
#include "common.cuh"

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* out,
                                    float* residual, int n, float eps, int mode) {
    __shared__ float red[32];
    const long r = blockIdx.x;
    const float* xr = x + r * n;
    float* res = residual ? residual + r * n : nullptr;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i];
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (mode == 0) {
            out[r * n + i] = (xr[i] * inv) * w[i];
        } else {
            res[i] += (xr[i] * inv) * w[i];
        }
    }
}
