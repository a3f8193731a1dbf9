// blocks.cuh: the ggml quant formats in the repacked layout (see common.cuh for the layout and the
// static interface every Fmt* struct implements). Numpy twin: aircupy/gguf/quants.py + kquants.py
// (values) and aircupy/cuda/ops/packing.py (byte layout). Field offsets below are BODY offsets, i.e. ggml's
// block offsets with the fp16 header removed.
#pragma once
#include "common.cuh"

// Weight loads bypass L1 (read once per token; keep L1 for the activations they multiply).
__device__ __forceinline__ uint4 ldw16(const u8* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ uint4 ldw16_a4(const u8* p) {  // 16 bytes at a 4-byte aligned address
    const u32* q = reinterpret_cast<const u32*>(p);
    return make_uint4(__ldg(q), __ldg(q + 1), __ldg(q + 2), __ldg(q + 3));
}
__device__ __forceinline__ u32 wd(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

__device__ __forceinline__ u32 spread4(u32 b4) {  // bits 0..3 -> bit 0 of bytes 0..3
    return (b4 * 0x00204081u) & 0x01010101u;
}

// ---- legacy formats: 32 values, one item = one block = 2 segments (low nibbles 0..15, high 16..31)
struct FmtQ4_0 {  // body: qs[16]; head: d.  y = d * (q - 8)
    static constexpr int BE = 32, BODY = 16, HEAD = 2, IPB = 1, NSEG = 2;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 8;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = false;
    struct Raw { uint4 q; float d; };
    __device__ static int seg_off(int, int s) { return 16 * s; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int) {
        return Raw{ldw16(body + blk * BODY), h2f(ld2(head + blk * HEAD))};
    }
    __device__ static void seg(const Raw& r, int, int s, float (&q)[16], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) bytes4((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu, BIAS(8), q + 4 * k);
        sc = r.d; mn = 0.f;
    }
    __device__ static void iseg(const Raw& r, int, int s, u32 (&w)[4], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) w[k] = (wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu;
        sc = r.d; mn = 0.f;
    }
};
struct FmtQ4_1 {  // body: qs[16]; head: d, m.  y = d * q + m
    static constexpr int BE = 32, BODY = 16, HEAD = 4, IPB = 1, NSEG = 2;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 0;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = true;
    struct Raw { uint4 q; u32 dm; };
    __device__ static int seg_off(int, int s) { return 16 * s; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int) {
        return Raw{ldw16(body + blk * BODY), ld4(head + blk * HEAD)};
    }
    __device__ static void seg(const Raw& r, int, int s, float (&q)[16], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) bytes4((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu, BIAS(0), q + 4 * k);
        sc = h2f((u16)(r.dm & 0xffffu)); mn = -h2f((u16)(r.dm >> 16));
    }
    __device__ static void iseg(const Raw& r, int, int s, u32 (&w)[4], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) w[k] = (wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu;
        sc = h2f((u16)(r.dm & 0xffffu)); mn = -h2f((u16)(r.dm >> 16));
    }
};
struct FmtQ5_0 {  // body: qh (u32 LE), qs[16]; head: d.  y = d * (q - 16), q = nibble | bit j of qh << 4
    static constexpr int BE = 32, BODY = 20, HEAD = 2, IPB = 1, NSEG = 2;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 16;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = false;
    struct Raw { uint4 q; u32 qh; float d; };
    __device__ static int seg_off(int, int s) { return 16 * s; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int) {
        const u8* p = body + blk * BODY;
        return Raw{ldw16_a4(p + 4), __ldg(reinterpret_cast<const u32*>(p)), h2f(ld2(head + blk * HEAD))};
    }
    __device__ static void seg(const Raw& r, int, int s, float (&q)[16], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 hi = spread4((r.qh >> (16 * s + 4 * k)) & 15u) << 4;
            bytes4(((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu) | hi, BIAS(16), q + 4 * k);
        }
        sc = r.d; mn = 0.f;
    }
    __device__ static void iseg(const Raw& r, int, int s, u32 (&w)[4], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k)
            w[k] = ((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu) | (spread4((r.qh >> (16 * s + 4 * k)) & 15u) << 4);
        sc = r.d; mn = 0.f;
    }
};
struct FmtQ5_1 {  // body: qh, qs[16]; head: d, m.  y = d * q + m
    static constexpr int BE = 32, BODY = 20, HEAD = 4, IPB = 1, NSEG = 2;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 0;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = true;
    struct Raw { uint4 q; u32 qh, dm; };
    __device__ static int seg_off(int, int s) { return 16 * s; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int) {
        const u8* p = body + blk * BODY;
        return Raw{ldw16_a4(p + 4), __ldg(reinterpret_cast<const u32*>(p)), ld4(head + blk * HEAD)};
    }
    __device__ static void seg(const Raw& r, int, int s, float (&q)[16], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 hi = spread4((r.qh >> (16 * s + 4 * k)) & 15u) << 4;
            bytes4(((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu) | hi, BIAS(0), q + 4 * k);
        }
        sc = h2f((u16)(r.dm & 0xffffu)); mn = -h2f((u16)(r.dm >> 16));
    }
    __device__ static void iseg(const Raw& r, int, int s, u32 (&w)[4], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k)
            w[k] = ((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu) | (spread4((r.qh >> (16 * s + 4 * k)) & 15u) << 4);
        sc = h2f((u16)(r.dm & 0xffffu)); mn = -h2f((u16)(r.dm >> 16));
    }
};
struct FmtQ8_0 {  // body: qs[32] int8; head: d.  y = d * q
    static constexpr int BE = 32, BODY = 32, HEAD = 2, IPB = 1, NSEG = 2;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 0;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = false;
    struct Raw { uint4 q0, q1; float d; };
    __device__ static int seg_off(int, int s) { return 16 * s; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int) {
        return Raw{ldw16(body + blk * BODY), ldw16(body + blk * BODY + 16), h2f(ld2(head + blk * HEAD))};
    }
    __device__ static void seg(const Raw& r, int, int s, float (&q)[16], float& sc, float& mn) {
        const uint4 v = s ? r.q1 : r.q0;
#pragma unroll
        for (int k = 0; k < 4; ++k) bytes4(wd(v, k) ^ 0x80808080u, BIAS(128), q + 4 * k);  // int8 = (b ^ 0x80) - 128
        sc = r.d; mn = 0.f;
    }
    __device__ static void iseg(const Raw& r, int, int s, u32 (&w)[4], float& sc, float& mn) {
        const uint4 v = s ? r.q1 : r.q0;  // signed bytes as stored: dp4a is signed x signed
#pragma unroll
        for (int k = 0; k < 4; ++k) w[k] = wd(v, k);
        sc = r.d; mn = 0.f;
    }
};

// ---- K-quants: 256 values per block. An item is 16 bytes of the low-bit plane at one position range
// (and the matching high bits), which feeds 2 or 4 segments of 16 values (the plane's shifts); the items
// of one block are read by neighbouring threads, so a warp still reads whole contiguous blocks.
struct FmtQ2_K {  // body: scales[16] qs[64]; head: d, dmin.  item it = h*2 + lh (h: 128-value half)
    static constexpr int BE = 256, BODY = 80, HEAD = 4, IPB = 4, NSEG = 4;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 0;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = true;
    struct Raw { uint4 q; u32 sc; float d, dmin; };  // sc: the 4 scale bytes of this item's segments
    __device__ static int seg_off(int it, int s) { return (it >> 1) * 128 + s * 32 + (it & 1) * 16; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int it) {
        const u8* p = body + blk * BODY;
        const int h = it >> 1, lh = it & 1;
        // scales of segments s = 0..3 are bytes h*8 + lh + 2s: the even or odd bytes of one 8-byte run
        const uint2 s8 = __ldg(reinterpret_cast<const uint2*>(p + 8 * h));
        const u32 dm = ld4(head + blk * HEAD);
        return Raw{ldw16(p + 16 + 32 * h + 16 * lh), __byte_perm(s8.x, s8.y, lh ? 0x7531u : 0x6420u),
                   h2f((u16)(dm & 0xffffu)), h2f((u16)(dm >> 16))};
    }
    __device__ static void seg(const Raw& r, int, int s, float (&q)[16], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) bytes4((wd(r.q, k) >> (2 * s)) & 0x03030303u, BIAS(0), q + 4 * k);
        const u32 b = (r.sc >> (8 * s)) & 0xffu;
        sc = r.d * (float)(b & 15u);
        mn = r.dmin * (float)(b >> 4);
    }
    __device__ static void iseg(const Raw& r, int, int s, u32 (&w)[4], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) w[k] = (wd(r.q, k) >> (2 * s)) & 0x03030303u;
        const u32 b = (r.sc >> (8 * s)) & 0xffu;
        sc = r.d * (float)(b & 15u);
        mn = r.dmin * (float)(b >> 4);
    }
};
struct FmtQ3_K {  // body: hmask[32] qs[64] scales[12]; head: d.  item it = h*2 + lh
    static constexpr int BE = 256, BODY = 108, HEAD = 2, IPB = 4, NSEG = 4;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 4;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = false;
    struct Raw { uint4 q, hm; u32 s0, s1, s2; float d; };
    __device__ static int seg_off(int it, int s) { return (it >> 1) * 128 + s * 32 + (it & 1) * 16; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int it) {
        const u8* p = body + blk * BODY;
        const int h = it >> 1, lh = it & 1;
        const u32* sp = reinterpret_cast<const u32*>(p + 96);
        return Raw{ldw16_a4(p + 32 + 32 * h + 16 * lh), ldw16_a4(p + 16 * lh), __ldg(sp), __ldg(sp + 1),
                   __ldg(sp + 2), h2f(ld2(head + blk * HEAD))};
    }
    __device__ static void seg(const Raw& r, int it, int s, float (&q)[16], float& sc, float& mn) {
        const int h = it >> 1, lh = it & 1;
        const int hb = 4 * h + s;  // hmask bit of this segment
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 lo = (wd(r.q, k) >> (2 * s)) & 0x03030303u;
            const u32 hi = ((wd(r.hm, k) >> hb) & 0x01010101u) << 2;
            bytes4(lo | hi, BIAS(4), q + 4 * k);  // the hmask bit set means +0, clear means -4
        }
        const int sb = h * 8 + 2 * s + lh;  // signed 6-bit scale, packed as in kquants._q3_k_scales
        const u32 l4 = sb < 8 ? byte_of3(r.s0, r.s1, r.s2, sb) & 15u : byte_of3(r.s0, r.s1, r.s2, sb - 8) >> 4;
        const u32 h2 = (byte_of3(r.s0, r.s1, r.s2, 8 + (sb & 3)) >> (2 * (sb >> 2))) & 3u;
        sc = r.d * (float)((int)(l4 | (h2 << 4)) - 32);
        mn = 0.f;
    }
    __device__ static void iseg(const Raw& r, int it, int s, u32 (&w)[4], float& sc, float& mn) {
        const int h = it >> 1, lh = it & 1, hb = 4 * h + s;
#pragma unroll
        for (int k = 0; k < 4; ++k)
            w[k] = ((wd(r.q, k) >> (2 * s)) & 0x03030303u) | (((wd(r.hm, k) >> hb) & 0x01010101u) << 2);
        const int sb = h * 8 + 2 * s + lh;
        const u32 l4 = sb < 8 ? byte_of3(r.s0, r.s1, r.s2, sb) & 15u : byte_of3(r.s0, r.s1, r.s2, sb - 8) >> 4;
        const u32 h2 = (byte_of3(r.s0, r.s1, r.s2, 8 + (sb & 3)) >> (2 * (sb >> 2))) & 3u;
        sc = r.d * (float)((int)(l4 | (h2 << 4)) - 32);
        mn = 0.f;
    }
};
// Q4_K / Q5_K: (d*scale, dmin*min) of sub-block j = 2g + s (ggml get_scale_min_k4) from the block's
// first 16 bytes hd = {d|dmin, scales[0:4], scales[4:8], scales[8:12]}:
//   j < 4:  scale = B[j] & 63,                       min = B[j+4] & 63
//   j >= 4: scale = B[j+4] & 15 | (B[j-4] >> 6) << 4, min = B[j+4] >> 4 | (B[j] >> 6) << 4
__device__ __forceinline__ void k4_scale(const uint4& hd, int j, float& sc, float& mn) {
    const u64 B = (u64)hd.y | ((u64)hd.z << 32);  // scale bytes 0..7; hd.w holds bytes 8..11
    u32 s, m;
    if (j < 4) {
        s = (u32)(B >> (8 * j)) & 63u;
        m = (u32)(B >> (8 * (j + 4))) & 63u;
    } else {
        const u32 b = (hd.w >> (8 * (j - 4))) & 0xffu;
        s = (b & 15u) | ((((u32)(B >> (8 * (j - 4))) & 0xffu) >> 6) << 4);
        m = (b >> 4) | ((((u32)(B >> (8 * j)) & 0xffu) >> 6) << 4);
    }
    sc = h2f((u16)(hd.x & 0xffffu)) * (float)s;
    mn = h2f((u16)(hd.x >> 16)) * (float)m;
}
struct FmtQ4_K {  // raw block: d dmin scales[12] qs[128].  item it = g*2 + lh, segment s = nibble
    static constexpr int BE = 256, BODY = 144, HEAD = 0, IPB = 8, NSEG = 2;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 0;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = true;
    struct Raw { uint4 q, hd; };  // hd: d, dmin, scales[12] (the block's first 16 bytes)
    __device__ static int seg_off(int it, int s) { return (it >> 1) * 64 + s * 32 + (it & 1) * 16; }
    __device__ static Raw load(const u8* body, const u8*, long blk, int it) {
        const u8* p = body + blk * BODY;
        return Raw{ldw16(p + 16 + 16 * it), __ldg(reinterpret_cast<const uint4*>(p))};
    }
    __device__ static void seg(const Raw& r, int it, int s, float (&q)[16], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) bytes4((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu, BIAS(0), q + 4 * k);
        k4_scale(r.hd, 2 * (it >> 1) + s, sc, mn);
    }
    __device__ static void iseg(const Raw& r, int it, int s, u32 (&w)[4], float& sc, float& mn) {
#pragma unroll
        for (int k = 0; k < 4; ++k) w[k] = (wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu;
        k4_scale(r.hd, 2 * (it >> 1) + s, sc, mn);
    }
};
struct FmtQ5_K {  // raw block: d dmin scales[12] qh[32] qs[128].  item it = g*2 + lh
    static constexpr int BE = 256, BODY = 176, HEAD = 0, IPB = 8, NSEG = 2;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 0;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = true;
    struct Raw { uint4 q, qh, hd; };
    __device__ static int seg_off(int it, int s) { return (it >> 1) * 64 + s * 32 + (it & 1) * 16; }
    __device__ static Raw load(const u8* body, const u8*, long blk, int it) {
        const u8* p = body + blk * BODY;
        return Raw{ldw16(p + 48 + 16 * it), ldw16(p + 16 + 16 * (it & 1)),
                   __ldg(reinterpret_cast<const uint4*>(p))};
    }
    __device__ static void seg(const Raw& r, int it, int s, float (&q)[16], float& sc, float& mn) {
        const int j = 2 * (it >> 1) + s;  // sub-block, and the qh bit holding its 5th bits
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 hi = ((wd(r.qh, k) >> j) & 0x01010101u) << 4;
            bytes4(((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu) | hi, BIAS(0), q + 4 * k);
        }
        k4_scale(r.hd, j, sc, mn);
    }
    __device__ static void iseg(const Raw& r, int it, int s, u32 (&w)[4], float& sc, float& mn) {
        const int j = 2 * (it >> 1) + s;
#pragma unroll
        for (int k = 0; k < 4; ++k)
            w[k] = ((wd(r.q, k) >> (4 * s)) & 0x0F0F0F0Fu) | (((wd(r.qh, k) >> j) & 0x01010101u) << 4);
        k4_scale(r.hd, j, sc, mn);
    }
};
struct FmtQ6_K {  // body: ql[128] qh[64] scales[16] int8; head: d.  item it = h*2 + k
    static constexpr int BE = 256, BODY = 208, HEAD = 2, IPB = 4, NSEG = 4;
    static constexpr bool INT_DOT = true;
    static constexpr int QOFF = 32;  // iseg bytes q: value = sc * (q - QOFF) - mn
    static constexpr bool HAS_MIN = false;
    struct Raw { uint4 qa, qb, qh; u32 sc; float d; };  // sc: scale bytes of segments t = 0..3
    __device__ static int seg_off(int it, int t) { return (it >> 1) * 128 + 32 * t + (it & 1) * 16; }
    __device__ static Raw load(const u8* body, const u8* head, long blk, int it) {
        const u8* p = body + blk * BODY;
        const int h = it >> 1, k = it & 1;
        // segment t's scale is byte 8h + 2t + k: even or odd bytes of an 8-byte run
        const uint2 s8 = __ldg(reinterpret_cast<const uint2*>(p + 192 + 8 * h));
        return Raw{ldw16(p + h * 64 + 16 * k), ldw16(p + h * 64 + 32 + 16 * k), ldw16(p + 128 + h * 32 + 16 * k),
                   __byte_perm(s8.x, s8.y, k ? 0x7531u : 0x6420u), h2f(ld2(head + blk * HEAD))};
    }
    __device__ static void seg(const Raw& r, int, int t, float (&q)[16], float& sc, float& mn) {
        const uint4 ql = (t & 1) ? r.qb : r.qa;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 lo = (wd(ql, k) >> (4 * (t >> 1))) & 0x0F0F0F0Fu;
            const u32 hi = ((wd(r.qh, k) >> (2 * t)) & 0x03030303u) << 4;
            bytes4(lo | hi, BIAS(32), q + 4 * k);
        }
        sc = r.d * (float)(signed char)((r.sc >> (8 * t)) & 0xffu);
        mn = 0.f;
    }
    __device__ static void iseg(const Raw& r, int, int t, u32 (&w)[4], float& sc, float& mn) {
        const uint4 ql = (t & 1) ? r.qb : r.qa;
#pragma unroll
        for (int k = 0; k < 4; ++k)
            w[k] = ((wd(ql, k) >> (4 * (t >> 1))) & 0x0F0F0F0Fu) | (((wd(r.qh, k) >> (2 * t)) & 0x03030303u) << 4);
        sc = r.d * (float)(signed char)((r.sc >> (8 * t)) & 0xffu);
        mn = 0.f;
    }
};

// X(name, Fmt) for every weight type the matmul / dequant / get_rows kernels instantiate.
#define FOR_EACH_FORMAT(X) \
    X(f32, FmtF32) X(f16, FmtF16) X(bf16, FmtBF16) X(q4_0, FmtQ4_0) X(q4_1, FmtQ4_1) X(q5_0, FmtQ5_0) \
    X(q5_1, FmtQ5_1) X(q8_0, FmtQ8_0) X(q2_k, FmtQ2_K) X(q3_k, FmtQ3_K) X(q4_k, FmtQ4_K) X(q5_k, FmtQ5_K) \
    X(q6_k, FmtQ6_K)
