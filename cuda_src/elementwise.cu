// elementwise.cu: gated activations and small element-wise ops (fp32).
//
// glu(gate, up, out, T, F, gate_stride, up_stride, kind): out[t, f] = act(gate[t, f]) * up[t, f], out
//   (T, F) contiguous; gate/up rows start every *_stride floats (F for separate buffers, 2F for the
//   two halves of one fused gate_up buffer). kind 0: SwiGLU, act = silu(x) = x * (1 + tanh(x/2)) / 2
//   (never overflows, as the reference writes it); kind 1: GeGLU, act = gelu_tanh (PyTorch
//   approximate='tanh', gemma). Reference: reference/ops.swiglu / geglu.
// glu_quant(gate_up f32 (M, 2F), xq u8, M, F, kind): the same activation, written straight into the
//   decode matvec's pre-quantized x planes (xquant.cuh; M rows of xq_row_nbytes(F) bytes) for the
//   down projection (matvec xmode 2): the quantization then runs once per step, not in every matvec
//   block. F % 32 == 0. Grid cdiv(M*F/4, 256), 256 threads, 4 values per thread.
// softcap(x, n, cap): x = cap * tanh(x / cap) in place (gemma-2 style logit capping).
// add_bias(out f32 (M, N), bias f32 (N,), M, N): out[m, n] += bias[n] (the GEMM path's bias epilogue).
// take_rows(src f32 (N, E), idx int32 (R,), out f32 (R, E), R, E): out[r] = src[idx[r]] (a batch
//   step's logits rows gathered for the head; numpy: src[idx]).
// Launch geometry: 1-D grid over elements, 256 threads.
#include "common.cuh"
#include "xquant.cuh"

__device__ __forceinline__ float glu_act(float g, int kind) {
    if (kind == 0) return g * (0.5f * (1.f + tanhf(0.5f * g)));
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
}

extern "C" __global__ void glu(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out,
                               int T, int F, long gate_stride, long up_stride, int kind) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * F) return;
    const long t = i / F, f = i - t * F;
    const float g = gate[t * gate_stride + f], u = up[t * up_stride + f];
    out[i] = glu_act(g, kind) * u;
}

extern "C" __global__ void glu_quant(const float* __restrict__ gate_up, u8* __restrict__ xq, int M, int F, int kind) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, f4 = F >> 2;
    const bool ok = i < M * f4;  // whole warps reach xq_put4 (its shuffles), idle lanes with zeros
    const int m = ok ? i / f4 : 0, v = ok ? (i - m * f4) << 2 : 0;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ok) {
        const float4 g = __ldg(reinterpret_cast<const float4*>(gate_up + 2L * m * F + v));
        const float4 u = __ldg(reinterpret_cast<const float4*>(gate_up + 2L * m * F + F + v));
        a = make_float4(glu_act(g.x, kind) * u.x, glu_act(g.y, kind) * u.y, glu_act(g.z, kind) * u.z,
                        glu_act(g.w, kind) * u.w);
    }
    u8* row = xq + m * xq_row_nbytes(F);
    float* xsc = reinterpret_cast<float*>(row + 2L * F);
    xq_put4(a, ok, v, row, row + F, xsc, xsc + (F >> 5));
}

extern "C" __global__ void softcap(float* x, long n, float cap) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}

extern "C" __global__ void add_bias(float* out, const float* __restrict__ bias, int M, int N) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)M * N) out[i] += bias[i % N];
}

extern "C" __global__ void take_rows(const float* __restrict__ src, const int* __restrict__ idx,
                                     float* __restrict__ out, int R, int E) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)R * E) return;
    const long r = i / E, e = i - r * E;
    out[i] = src[(long)idx[r] * E + e];
}
