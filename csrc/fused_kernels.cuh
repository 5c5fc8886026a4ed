// Fused CUDA kernels for the element-wise chains of an ST-GCN block, compiled at run time with
// NVRTC (csrc/cuda_kernels.cpp) and, for the tests, also compiled as plain C++ and run by a host
// emulation of the launch grid (same per-thread bodies, so the indexing and the arithmetic are
// tested on machines without a GPU; only the warp/block reduction below is CUDA-only).
//
// Tensors are contiguous float32 viewed as (N, C, L): channel c of sample n is the run of L floats
// at (n * C + c) * L (N == 1 in the channel-major ST-GCN layout, so a channel is one run). All
// indices are 32-bit: the host refuses tensors of 2^31 elements or more.
//
// Two ops, each a statistics pass, a per-channel finalisation and an element-wise pass, forward
// and backward (the formulas are those of csrc/fused_bn.cpp, the CPU version):
//   * batch norm (training) + optional ReLU: y = relu?(x * scale + shift);
//   * block tail: out = relu(dropout_p(bn(y)) + r); the dropout mask is a counter-based hash of
//     (seed, flat element index), the same function as the CPU op's, recomputed in backward.
//
// Reductions are deterministic: each block writes one partial (fixed-order tree within the
// block), and one thread per channel adds the partials in order in double precision.

#ifdef __CUDACC_RTC__
#define FK_DEVICE __device__ __forceinline__
typedef unsigned int u32;
typedef unsigned long long u64;
#else
#include <cmath>
#include <cstdint>
#define FK_DEVICE inline
typedef uint32_t u32;
typedef uint64_t u64;
#endif

// Threads per block of every kernel (the reduction below assumes a multiple of 32, at most 1024).
#define FK_THREADS 256

// Division by a run-time constant with a multiply-high and a shift (the method of ATen's
// IntDivider): exact for dividends below 2^31, and much cheaper than a hardware-less 32-bit
// division on the GPU, which the element-wise kernels would otherwise do for every element.
struct FkDiv {
  u32 d, m, s;  // divisor, magic multiplier, shift (see fk_make_div)
};

FK_DEVICE u32 fk_umulhi(u32 a, u32 b) {
#ifdef __CUDACC_RTC__
  return __umulhi(a, b);
#else
  return (u32)(((u64)a * (u64)b) >> 32);
#endif
}

// n / v.d for n < 2^31.
FK_DEVICE u32 fk_div(u32 n, FkDiv v) { return (fk_umulhi(n, v.m) + n) >> v.s; }

#ifndef __CUDACC_RTC__
// The divider of d >= 1 (host side): s = ceil(log2(d)), m = 2^32 (2^s - d) / d + 1 (< 2^32).
inline FkDiv fk_make_div(u32 d) {
  u32 s = 0;
  while (s < 32 && ((u64)1 << s) < (u64)d) ++s;
  const u64 m = (((u64)1 << 32) * (((u64)1 << s) - (u64)d)) / (u64)d + 1;
  return FkDiv{d, (u32)m, s};
}
#endif

// The tensor layout (N, C, L) with the two divisors the kernels need.
struct FkLayout {
  u32 C, L;
  FkDiv div_c, div_l;
};

// Flat offset of element j (0 <= j < N * L) of channel c.
FK_DEVICE u32 fk_chan_offset(u32 c, u32 j, FkLayout lay) {
  const u32 n = fk_div(j, lay.div_l);
  return (n * lay.C + c) * lay.L + (j - n * lay.L);
}

// Channel of flat element i.
FK_DEVICE u32 fk_chan_of(u32 i, FkLayout lay) {
  const u32 run = fk_div(i, lay.div_l);
  return run - fk_div(run, lay.div_c) * lay.C;
}

// SplitMix64 (Steele, Lea, Flood 2014): output `i` of the stream starting at `base` (the same
// function as src/model/stgcn/dropout.rs and csrc/fused_bn.cpp).
FK_DEVICE u64 fk_splitmix64_at(u64 base, u64 i) {
  u64 z = base + (i + 1ull) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The mask seed of a call from the resolved (seed, offset) pair of libtorch's CUDA generator
// (rng[1] == 0 gives rng[0] itself, which the tests use to compare with the CPU op).
FK_DEVICE u64 fk_mask_seed(const u64 *rng) { return rng[0] ^ (rng[1] * 0xD1B54A32D192ED03ull); }

// Dropout factor (0 or `scale` = 1 / keep) of flat element i: lane i % 4 (16-bit lanes, when
// keep * 2^16 is whole) or i % 2 (32-bit lanes) of draw i / lanes compared with `threshold`.
FK_DEVICE float fk_drop_factor(u64 seed, u32 i, int lanes16, u64 threshold, float scale) {
  u64 u;
  if (lanes16) {
    const u64 r = fk_splitmix64_at(seed, (u64)(i >> 2));
    u = (r >> (16u * (i & 3u))) & 0xFFFFull;
  } else {
    const u64 r = fk_splitmix64_at(seed, (u64)(i >> 1));
    u = (r >> (32u * (i & 1u))) & 0xFFFFFFFFull;
  }
  return u < threshold ? scale : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Per-thread bodies (shared by the CUDA kernels and the host emulation).

// Statistics: s += sum(x - shift), q += sum((x - shift)^2) over elements j = start, start + stride,
// ... of channel c (the shift, the channel's first value, keeps E[x^2] - E[x]^2 accurate).
FK_DEVICE void fk_stats_accum(const float *x, FkLayout lay, u32 count, u32 c, u32 start, u32 stride,
                              float shift, float *s, float *q) {
  float a = 0.0f, b = 0.0f;
  for (u32 j = start; j < count; j += stride) {
    const float v = x[fk_chan_offset(c, j, lay)] - shift;
    a += v;
    b += v * v;
  }
  *s = a;
  *q = b;
}

// Channel c's batch statistics from the B partials (s, q) at partials[(c * B + b) * 2]:
// stats[c] = mean, stats[C + c] = 1 / sqrt(biased var + eps) (double); coef[c] = scale,
// coef[C + c] = shift of the affine map (float, as the CPU op's `affine`); running statistics
// moved with `momentum` (unbiased variance), as PyTorch does.
FK_DEVICE void fk_bn_finalize(u32 c, const float *x, const float *partials, u32 B, FkLayout lay, u32 count,
                              double eps, double momentum, const float *w, const float *b, float *rm, float *rv,
                              double *stats, float *coef) {
  double s = 0.0, q = 0.0;
  for (u32 k = 0; k < B; ++k) {
    s += (double)partials[(c * B + k) * 2];
    q += (double)partials[(c * B + k) * 2 + 1];
  }
  const double n = (double)count;
  const double shift = (double)x[fk_chan_offset(c, 0, lay)];
  const double ms = s / n;
  double var = q / n - ms * ms;
  if (var < 0.0) var = 0.0;
  const double mean = shift + ms;
  const double invstd = 1.0 / sqrt(var + eps);
  stats[c] = mean;
  stats[lay.C + c] = invstd;
  const double sc = invstd * (double)w[c];
  coef[c] = (float)sc;
  coef[lay.C + c] = (float)((double)b[c] - mean * sc);
  rm[c] = (float)(momentum * mean + (1.0 - momentum) * (double)rm[c]);
  rv[c] = (float)(momentum * var * (n / (n - 1.0)) + (1.0 - momentum) * (double)rv[c]);
}

// Forward of batch norm (+ ReLU) at flat element i.
FK_DEVICE void fk_bn_apply_at(u32 i, const float *x, float *y, const float *coef, FkLayout lay, int relu) {
  const u32 c = fk_chan_of(i, lay);
  const float v = x[i] * coef[c] + coef[lay.C + c];
  y[i] = (relu && !(v > 0.0f)) ? 0.0f : v;  // the mask of fk_relu_kept
}

// The ReLU mask of the forward output, recomputed from x with the forward's own expression
// (same operations, same rounding): true where the output was positive.
FK_DEVICE bool fk_relu_kept(float x, const float *coef, u32 c, u32 C) { return x * coef[c] + coef[C + c] > 0.0f; }

// Backward statistics of batch norm (+ ReLU): with g' = g masked by the forward output > 0 when
// relu (recomputed from x and the forward coefficients `coef`, so the output is not read),
// s += sum(g'), d += sum(g' * (x - mean)) over the elements of channel c as in fk_stats_accum.
FK_DEVICE void fk_bn_bwd_accum(const float *x, const float *coef, const float *g, FkLayout lay, u32 count, u32 c,
                               u32 start, u32 stride, float mean, int relu, float *s, float *d) {
  float a = 0.0f, b = 0.0f;
  for (u32 j = start; j < count; j += stride) {
    const u32 o = fk_chan_offset(c, j, lay);
    const float gp = (relu && !fk_relu_kept(x[o], coef, c, lay.C)) ? 0.0f : g[o];
    a += gp;
    b += gp * (x[o] - mean);
  }
  *s = a;
  *d = b;
}

// Channel c's backward coefficients from the partials (sum g', sum g' (x - mean)):
// dw = dot * invstd, db = sum_g; bcoef[c..4C] = (a, bc, cc, mean) with
// dx = g' * a + (x - mean) * bc + cc (see csrc/fused_bn.cpp).
FK_DEVICE void fk_bn_bwd_finalize(u32 c, const float *partials, u32 B, u32 C, u32 count, const double *stats,
                                  const float *w, float *dw, float *db, float *bcoef) {
  double sg = 0.0, dot = 0.0;
  for (u32 k = 0; k < B; ++k) {
    sg += (double)partials[(c * B + k) * 2];
    dot += (double)partials[(c * B + k) * 2 + 1];
  }
  const double mean = stats[c], invstd = stats[C + c];
  const double n = (double)count;
  dw[c] = (float)(dot * invstd);
  db[c] = (float)sg;
  const double a = invstd * (double)w[c];
  const double proj = dot * invstd * invstd / n;
  bcoef[c] = (float)a;
  bcoef[C + c] = (float)(-proj * a);
  bcoef[2 * C + c] = (float)(-sg / n * a);
  bcoef[3 * C + c] = (float)mean;
}

// Backward of batch norm (+ ReLU) at flat element i.
FK_DEVICE void fk_bn_bwd_apply_at(u32 i, const float *x, const float *coef, const float *g, float *dx,
                                  const float *bcoef, FkLayout lay, int relu) {
  const u32 c = fk_chan_of(i, lay);
  const float gp = (relu && !fk_relu_kept(x[i], coef, c, lay.C)) ? 0.0f : g[i];
  dx[i] = gp * bcoef[c] + (x[i] - bcoef[3 * lay.C + c]) * bcoef[lay.C + c] + bcoef[2 * lay.C + c];
}

// Forward of the block tail at flat element i: out = relu((y * scale + shift) * m_i + r_i)
// (m_i = 1 without dropout, r_i = 0 without residual).
FK_DEVICE void fk_tail_apply_at(u32 i, const float *y, const float *r, float *out, const float *coef, FkLayout lay, int drop, u64 seed, int lanes16, u64 threshold, float scale) {
  const u32 c = fk_chan_of(i, lay);
  float v = y[i] * coef[c] + coef[lay.C + c];
  if (drop) v *= fk_drop_factor(seed, i, lanes16, threshold, scale);
  if (r) v += r[i];
  out[i] = v < 0.0f ? 0.0f : v;
}

// Backward statistics of the tail: with g' = out > 0 ? g : 0 and gz = g' * m,
// s += sum(gz), d += sum(gz * (y - mean)) over the elements of channel c.
FK_DEVICE void fk_tail_bwd_accum(const float *y, const float *out, const float *g, FkLayout lay, u32 count,
                                 u32 c, u32 start, u32 stride, float mean, int drop, u64 seed, int lanes16,
                                 u64 threshold, float scale, float *s, float *d) {
  float a = 0.0f, b = 0.0f;
  for (u32 j = start; j < count; j += stride) {
    const u32 o = fk_chan_offset(c, j, lay);
    float gz = out[o] > 0.0f ? g[o] : 0.0f;
    if (drop) gz *= fk_drop_factor(seed, o, lanes16, threshold, scale);
    a += gz;
    b += gz * (y[o] - mean);
  }
  *s = a;
  *d = b;
}

// Backward of the tail at flat element i: dy = gz * a + (y - mean) * bc + cc; dr = g' (when dr).
FK_DEVICE void fk_tail_bwd_apply_at(u32 i, const float *y, const float *out, const float *g, float *dy,
                                    float *dr, const float *bcoef, FkLayout lay, int drop, u64 seed, int lanes16,
                                    u64 threshold, float scale) {
  const u32 c = fk_chan_of(i, lay);
  const float gp = out[i] > 0.0f ? g[i] : 0.0f;
  if (dr) dr[i] = gp;
  const float gz = drop ? gp * fk_drop_factor(seed, i, lanes16, threshold, scale) : gp;
  dy[i] = gz * bcoef[c] + (y[i] - bcoef[3 * lay.C + c]) * bcoef[lay.C + c] + bcoef[2 * lay.C + c];
}

// ---------------------------------------------------------------------------------------------
// Four-wide variants (default; CROSSCLR_FUSED_VEC4=off disables them): thread work item q covers elements
// 4q .. 4q + 3 with one 16-byte load per input and one 16-byte store per output. Used only when
// L % 4 == 0 (so the four elements are consecutive in one channel) and every pointer is 16-byte
// aligned (the host checks). Why: the scalar kernels keep one 4-byte load in flight per thread,
// too few bytes in flight to reach the memory bandwidth of an H100 / H200; four-wide loads carry
// four times as many. The per-element arithmetic is the scalar bodies' own, so values are the
// same; the statistics add in a different order (float rounding only).

#ifdef __CUDACC_RTC__
typedef float4 fk_f4;
FK_DEVICE fk_f4 fk_ld4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
FK_DEVICE void fk_st4(float *p, fk_f4 v) { *reinterpret_cast<float4 *>(p) = v; }
#else
struct fk_f4 {
  float x, y, z, w;
};
inline fk_f4 fk_ld4(const float *p) { return fk_f4{p[0], p[1], p[2], p[3]}; }
inline void fk_st4(float *p, fk_f4 v) {
  p[0] = v.x;
  p[1] = v.y;
  p[2] = v.z;
  p[3] = v.w;
}
#endif

// Element k (0..3) of a four-wide value, and the value with element k replaced.
FK_DEVICE float fk_get(const fk_f4 &v, int k) { return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w; }
FK_DEVICE void fk_set(fk_f4 &v, int k, float a) {
  if (k == 0) v.x = a;
  else if (k == 1) v.y = a;
  else if (k == 2) v.z = a;
  else v.w = a;
}

// Forward of batch norm (+ ReLU) at elements 4q .. 4q + 3.
FK_DEVICE void fk_bn_apply4_at(u32 q, const float *x, float *y, const float *coef, FkLayout lay, int relu) {
  const u32 i = 4u * q, c = fk_chan_of(i, lay);
  const fk_f4 xv = fk_ld4(x + i);
  fk_f4 out;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float v = fk_get(xv, k) * coef[c] + coef[lay.C + c];
    fk_set(out, k, (relu && !(v > 0.0f)) ? 0.0f : v);
  }
  fk_st4(y + i, out);
}

// Backward of batch norm (+ ReLU) at elements 4q .. 4q + 3.
FK_DEVICE void fk_bn_bwd_apply4_at(u32 q, const float *x, const float *coef, const float *g, float *dx,
                                   const float *bcoef, FkLayout lay, int relu) {
  const u32 i = 4u * q, c = fk_chan_of(i, lay);
  const fk_f4 xv = fk_ld4(x + i), gv = fk_ld4(g + i);
  fk_f4 out;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float xk = fk_get(xv, k);
    const float gp = (relu && !fk_relu_kept(xk, coef, c, lay.C)) ? 0.0f : fk_get(gv, k);
    fk_set(out, k, gp * bcoef[c] + (xk - bcoef[3 * lay.C + c]) * bcoef[lay.C + c] + bcoef[2 * lay.C + c]);
  }
  fk_st4(dx + i, out);
}

// Forward of the block tail at elements 4q .. 4q + 3.
FK_DEVICE void fk_tail_apply4_at(u32 q, const float *y, const float *r, float *out, const float *coef, FkLayout lay,
                                 int drop, u64 seed, int lanes16, u64 threshold, float scale) {
  const u32 i = 4u * q, c = fk_chan_of(i, lay);
  const fk_f4 yv = fk_ld4(y + i);
  const fk_f4 rv = r ? fk_ld4(r + i) : fk_f4{0.0f, 0.0f, 0.0f, 0.0f};
  fk_f4 o;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float v = fk_get(yv, k) * coef[c] + coef[lay.C + c];
    if (drop) v *= fk_drop_factor(seed, i + (u32)k, lanes16, threshold, scale);
    if (r) v += fk_get(rv, k);
    fk_set(o, k, v < 0.0f ? 0.0f : v);
  }
  fk_st4(out + i, o);
}

// Backward of the tail at elements 4q .. 4q + 3.
FK_DEVICE void fk_tail_bwd_apply4_at(u32 q, const float *y, const float *out, const float *g, float *dy, float *dr,
                                     const float *bcoef, FkLayout lay, int drop, u64 seed, int lanes16,
                                     u64 threshold, float scale) {
  const u32 i = 4u * q, c = fk_chan_of(i, lay);
  const fk_f4 yv = fk_ld4(y + i), ov = fk_ld4(out + i), gv = fk_ld4(g + i);
  fk_f4 dyv, drv;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float gp = fk_get(ov, k) > 0.0f ? fk_get(gv, k) : 0.0f;
    fk_set(drv, k, gp);
    const float gz = drop ? gp * fk_drop_factor(seed, i + (u32)k, lanes16, threshold, scale) : gp;
    fk_set(dyv, k, gz * bcoef[c] + (fk_get(yv, k) - bcoef[3 * lay.C + c]) * bcoef[lay.C + c] + bcoef[2 * lay.C + c]);
  }
  if (dr) fk_st4(dr + i, drv);
  fk_st4(dy + i, dyv);
}

// Statistics over the four-wide groups j4 = start, start + stride, ... (< count / 4) of channel c,
// as fk_stats_accum.
FK_DEVICE void fk_stats_accum4(const float *x, FkLayout lay, u32 count, u32 c, u32 start, u32 stride, float shift,
                               float *s, float *q) {
  float a = 0.0f, b = 0.0f;
  for (u32 j4 = start; j4 < count / 4u; j4 += stride) {
    const fk_f4 xv = fk_ld4(x + fk_chan_offset(c, 4u * j4, lay));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float v = fk_get(xv, k) - shift;
      a += v;
      b += v * v;
    }
  }
  *s = a;
  *q = b;
}

// Backward statistics of batch norm (+ ReLU) over four-wide groups, as fk_bn_bwd_accum.
FK_DEVICE void fk_bn_bwd_accum4(const float *x, const float *coef, const float *g, FkLayout lay, u32 count, u32 c,
                                u32 start, u32 stride, float mean, int relu, float *s, float *d) {
  float a = 0.0f, b = 0.0f;
  for (u32 j4 = start; j4 < count / 4u; j4 += stride) {
    const u32 o = fk_chan_offset(c, 4u * j4, lay);
    const fk_f4 xv = fk_ld4(x + o), gv = fk_ld4(g + o);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float xk = fk_get(xv, k);
      const float gp = (relu && !fk_relu_kept(xk, coef, c, lay.C)) ? 0.0f : fk_get(gv, k);
      a += gp;
      b += gp * (xk - mean);
    }
  }
  *s = a;
  *d = b;
}

// Backward statistics of the tail over four-wide groups, as fk_tail_bwd_accum.
FK_DEVICE void fk_tail_bwd_accum4(const float *y, const float *out, const float *g, FkLayout lay, u32 count, u32 c,
                                  u32 start, u32 stride, float mean, int drop, u64 seed, int lanes16, u64 threshold,
                                  float scale, float *s, float *d) {
  float a = 0.0f, b = 0.0f;
  for (u32 j4 = start; j4 < count / 4u; j4 += stride) {
    const u32 o = fk_chan_offset(c, 4u * j4, lay);
    const fk_f4 yv = fk_ld4(y + o), ov = fk_ld4(out + o), gv = fk_ld4(g + o);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float gz = fk_get(ov, k) > 0.0f ? fk_get(gv, k) : 0.0f;
      if (drop) gz *= fk_drop_factor(seed, o + (u32)k, lanes16, threshold, scale);
      a += gz;
      b += gz * (fk_get(yv, k) - mean);
    }
  }
  *s = a;
  *d = b;
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels (NVRTC only). The statistics and element-wise kernels take `four`: 1 runs the
// four-wide bodies (the host decides, see above), 0 the scalar ones. Statistics kernels: grid (B, C), FK_THREADS threads; block (b, c)
// covers elements j = b * FK_THREADS + t + k * B * FK_THREADS of channel c and writes one partial
// pair. Finalisation kernels: one thread per channel. Element-wise kernels: grid-stride loops.

#ifdef __CUDACC_RTC__

// Sums (a, b) over the block; the result is valid in thread 0. Fixed order: deterministic.
__device__ __forceinline__ void fk_block_sum2(float *a, float *b) {
  __shared__ float sa[FK_THREADS / 32];
  __shared__ float sb[FK_THREADS / 32];
  float x = *a, y = *b;
  for (int o = 16; o > 0; o >>= 1) {
    x += __shfl_down_sync(0xffffffffu, x, o);
    y += __shfl_down_sync(0xffffffffu, y, o);
  }
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = x;
    sb[warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    x = lane < (FK_THREADS / 32) ? sa[lane] : 0.0f;
    y = lane < (FK_THREADS / 32) ? sb[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
      x += __shfl_down_sync(0xffffffffu, x, o);
      y += __shfl_down_sync(0xffffffffu, y, o);
    }
  }
  *a = x;
  *b = y;
}

#define FK_GRID_STRIDE(i, n) \
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(FK_THREADS)
    fk_stats_partials(const float *x, FkLayout lay, u32 count, float *partials, int four) {
  const u32 c = blockIdx.y, blk = blockIdx.x, B = gridDim.x;
  const float shift = x[fk_chan_offset(c, 0, lay)];
  float s, q;
  if (four) {
    fk_stats_accum4(x, lay, count, c, blk * FK_THREADS + threadIdx.x, B * FK_THREADS, shift, &s, &q);
  } else {
    fk_stats_accum(x, lay, count, c, blk * FK_THREADS + threadIdx.x, B * FK_THREADS, shift, &s, &q);
  }
  fk_block_sum2(&s, &q);
  if (threadIdx.x == 0) {
    partials[(c * B + blk) * 2] = s;
    partials[(c * B + blk) * 2 + 1] = q;
  }
}

extern "C" __global__ void fk_bn_finalize_kernel(const float *x, const float *partials, u32 B, FkLayout lay,
                                                 u32 count, double eps, double momentum, const float *w,
                                                 const float *b, float *rm, float *rv, double *stats,
                                                 float *coef) {
  const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < lay.C) fk_bn_finalize(c, x, partials, B, lay, count, eps, momentum, w, b, rm, rv, stats, coef);
}

extern "C" __global__ void __launch_bounds__(FK_THREADS)
    fk_bn_apply(const float *x, float *y, const float *coef, FkLayout lay, u32 numel, int relu, int four) {
  if (four) {
    FK_GRID_STRIDE(q, numel / 4u) fk_bn_apply4_at(q, x, y, coef, lay, relu);
  } else {
    FK_GRID_STRIDE(i, numel) fk_bn_apply_at(i, x, y, coef, lay, relu);
  }
}

extern "C" __global__ void __launch_bounds__(FK_THREADS)
    fk_bn_bwd_partials(const float *x, const float *coef, const float *g, const double *stats, FkLayout lay,
                       u32 count, int relu, float *partials, int four) {
  const u32 c = blockIdx.y, blk = blockIdx.x, B = gridDim.x;
  const u32 start = blk * FK_THREADS + threadIdx.x, stride = B * FK_THREADS;
  float s, d;
  if (four) {
    fk_bn_bwd_accum4(x, coef, g, lay, count, c, start, stride, (float)stats[c], relu, &s, &d);
  } else {
    fk_bn_bwd_accum(x, coef, g, lay, count, c, start, stride, (float)stats[c], relu, &s, &d);
  }
  fk_block_sum2(&s, &d);
  if (threadIdx.x == 0) {
    partials[(c * B + blk) * 2] = s;
    partials[(c * B + blk) * 2 + 1] = d;
  }
}

extern "C" __global__ void fk_bn_bwd_finalize_kernel(const float *partials, u32 B, u32 C, u32 count,
                                                     const double *stats, const float *w, float *dw, float *db,
                                                     float *bcoef) {
  const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < C) fk_bn_bwd_finalize(c, partials, B, C, count, stats, w, dw, db, bcoef);
}

extern "C" __global__ void __launch_bounds__(FK_THREADS)
    fk_bn_bwd_apply(const float *x, const float *coef, const float *g, float *dx, const float *bcoef, FkLayout lay,
                     u32 numel, int relu, int four) {
  if (four) {
    FK_GRID_STRIDE(q, numel / 4u) fk_bn_bwd_apply4_at(q, x, coef, g, dx, bcoef, lay, relu);
  } else {
    FK_GRID_STRIDE(i, numel) fk_bn_bwd_apply_at(i, x, coef, g, dx, bcoef, lay, relu);
  }
}

extern "C" __global__ void __launch_bounds__(FK_THREADS)
    fk_tail_apply(const float *y, const float *r, float *out, const float *coef, FkLayout lay, u32 numel,
                  int drop, const u64 *rng, int lanes16, u64 threshold, float scale, int four) {
  const u64 seed = drop ? fk_mask_seed(rng) : 0ull;
  if (four) {
    FK_GRID_STRIDE(q, numel / 4u) fk_tail_apply4_at(q, y, r, out, coef, lay, drop, seed, lanes16, threshold, scale);
  } else {
    FK_GRID_STRIDE(i, numel) fk_tail_apply_at(i, y, r, out, coef, lay, drop, seed, lanes16, threshold, scale);
  }
}

extern "C" __global__ void __launch_bounds__(FK_THREADS)
    fk_tail_bwd_partials(const float *y, const float *out, const float *g, const double *stats, FkLayout lay,
                         u32 count, int drop, const u64 *rng, int lanes16, u64 threshold, float scale,
                         float *partials, int four) {
  const u32 c = blockIdx.y, blk = blockIdx.x, B = gridDim.x;
  const u32 start = blk * FK_THREADS + threadIdx.x, stride = B * FK_THREADS;
  const u64 seed = drop ? fk_mask_seed(rng) : 0ull;
  float s, d;
  if (four) {
    fk_tail_bwd_accum4(y, out, g, lay, count, c, start, stride, (float)stats[c], drop, seed, lanes16, threshold,
                       scale, &s, &d);
  } else {
    fk_tail_bwd_accum(y, out, g, lay, count, c, start, stride, (float)stats[c], drop, seed, lanes16, threshold,
                      scale, &s, &d);
  }
  fk_block_sum2(&s, &d);
  if (threadIdx.x == 0) {
    partials[(c * B + blk) * 2] = s;
    partials[(c * B + blk) * 2 + 1] = d;
  }
}

extern "C" __global__ void __launch_bounds__(FK_THREADS)
    fk_tail_bwd_apply(const float *y, const float *out, const float *g, float *dy, float *dr, const float *bcoef,
                      FkLayout lay, u32 numel, int drop, const u64 *rng, int lanes16, u64 threshold,
                      float scale, int four) {
  const u64 seed = drop ? fk_mask_seed(rng) : 0ull;
  if (four) {
    FK_GRID_STRIDE(q, numel / 4u)
    fk_tail_bwd_apply4_at(q, y, out, g, dy, dr, bcoef, lay, drop, seed, lanes16, threshold, scale);
  } else {
    FK_GRID_STRIDE(i, numel)
    fk_tail_bwd_apply_at(i, y, out, g, dy, dr, bcoef, lay, drop, seed, lanes16, threshold, scale);
  }
}

#endif  // __CUDACC_RTC__
