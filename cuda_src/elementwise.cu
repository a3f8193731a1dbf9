// elementwise.cu: gated activations and small element-wise ops (fp32).
//
// glu(gate, up, out, T, F, gate_stride, up_stride, kind): out[t, f] = act(gate[t, f]) * up[t, f], out
//   (T, F) contiguous; gate/up rows start every *_stride floats (F for separate buffers, 2F for the
//   two halves of one fused gate_up buffer). kind 0: SwiGLU, act = silu(x) = x * (1 + tanh(x/2)) / 2
//   (never overflows, as the reference writes it); kind 1: GeGLU, act = gelu_tanh (PyTorch
//   approximate='tanh', gemma). Reference: ops/reference.swiglu / geglu.
// softcap(x, n, cap): x = cap * tanh(x / cap) in place (gemma-2 style logit capping).
// add_bias(out f32 (M, N), bias f32 (N,), M, N): out[m, n] += bias[n] (the GEMM path's bias epilogue).
// Launch geometry: 1-D grid over elements, 256 threads.
#include "common.cuh"

extern "C" __global__ void glu(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out,
                               int T, int F, long gate_stride, long up_stride, int kind) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * F) return;
    const long t = i / F, f = i - t * F;
    const float g = gate[t * gate_stride + f], u = up[t * up_stride + f];
    float a;
    if (kind == 0) {
        a = g * (0.5f * (1.f + tanhf(0.5f * g)));
    } else {
        const float c = 0.7978845608028654f;  // sqrt(2/pi)
        a = 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
    }
    out[i] = a * u;
}

extern "C" __global__ void softcap(float* x, long n, float cap) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}

extern "C" __global__ void add_bias(float* out, const float* __restrict__ bias, int M, int N) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)M * N) out[i] += bias[i % N];
}
