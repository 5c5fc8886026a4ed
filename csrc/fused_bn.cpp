// Fused training-mode batch norm (+ optional ReLU) for contiguous float32 CPU tensors, as a custom
// autograd function. See src/model/stgcn/fused_bn.rs for the safe Rust wrapper and the why.
//
// Input x is viewed as (N, C, L): dim 1 holds the channels, L is the product of the trailing
// dimensions. Each channel is N contiguous runs of L floats (one run when N == 1, as in the ST-GCN
// channel-major layout), so one thread handles one channel at a time and its data stays in L2
// between the statistics pass and the normalising pass.
//
// Forward, per channel: sum and sum of squares in one pass (double accumulators), biased variance
// for the normalisation, unbiased variance for running_var (PyTorch's update with `momentum`),
// then y = relu?(x * scale + shift) with scale = invstd * w, shift = b - mean * scale.
// Backward, per channel: one pass for sum(g') and sum(g' * (x - mean)), with g' = g masked by
// y > 0 when the ReLU is fused (y recomputed bit-identically from x), then one pass
// dx = (g' - mean(g') - xhat * mean(g' * xhat)) * invstd * w; dw = sum(g' * xhat), db = sum(g').
//
// FusedBnTail (crossclr_fused_bn_tail_train) fuses the tail of an ST-GCN block the same way:
// out = relu(dropout_p(bn(y)) + r), with the dropout mask hashed from (seed, element index) in both
// passes instead of stored (see the section "Fused block tail" below).
//
// The AVX-512 kernels are compiled with a target attribute and chosen at run time; elsewhere the
// portable loops run. The forward and backward of one process always use the same kernels, so the
// ReLU mask recomputed in backward matches the forward exactly.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>

#include "ffi_util.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CROSSCLR_BN_AVX512 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

// Elements a parallel task should at least cover (below this, threading costs more than it saves).
constexpr int64_t kGrainElements = 32768;


// ---------------------------------------------------------------------------------------------
// Kernels over one contiguous run of `n` floats. Accumulating ones add into their outputs.

// s += sum(x), q += sum(x^2).
void stats_portable(const float *x, int64_t n, double *s, double *q) {
  double s0 = 0, s1 = 0, q0 = 0, q1 = 0;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const double a = x[i], b = x[i + 1];
    s0 += a;
    s1 += b;
    q0 += a * a;
    q1 += b * b;
  }
  for (; i < n; ++i) {
    const double a = x[i];
    s0 += a;
    q0 += a * a;
  }
  *s += s0 + s1;
  *q += q0 + q1;
}

inline float relu_scalar(float v) { return (v > 0.0f || std::isnan(v)) ? v : 0.0f; }

// y = relu?(x * scale + shift).
void transform_portable(const float *x, float *y, int64_t n, float scale, float shift, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) y[i] = relu_scalar(x[i] * scale + shift);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + shift;
  }
}

// g' = relu ? (x * scale + shift > 0 ? g : 0) : g; sg += sum(g'), dot += sum(g' * (x - mean)).
void bwd_reduce_portable(const float *x, const float *g, int64_t n, float mean, float scale, float shift,
                         bool relu, double *sg, double *dot) {
  double s = 0, d = 0;
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    if (relu && !(x[i] * scale + shift > 0.0f)) gi = 0.0f;
    s += gi;
    d += static_cast<double>(gi) * static_cast<double>(x[i] - mean);
  }
  *sg += s;
  *dot += d;
}

// dx = g' * a + (x - mean) * bc + c.
void bwd_apply_portable(const float *x, const float *g, float *dx, int64_t n, float mean, float scale,
                        float shift, bool relu, float a, float bc, float c) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    if (relu && !(x[i] * scale + shift > 0.0f)) gi = 0.0f;
    dx[i] = gi * a + ((x[i] - mean) * bc + c);
  }
}

// libtorch's own switch, ATEN_CPU_CAPABILITY (default | avx2 | avx512), caps our kernels too:
// set to anything but avx512 it selects the portable kernels, so one variable makes an AVX-512
// machine run the code paths of a machine without it (how the fallback is measured).
[[maybe_unused]] bool avx512_allowed() {
  static const bool yes = [] {
    const char *cap = std::getenv("ATEN_CPU_CAPABILITY");
    return cap == nullptr || *cap == '\0' || std::string(cap) == "avx512";
  }();
  return yes;
}

#ifdef CROSSCLR_BN_AVX512
#define AVX512 __attribute__((target("avx512f,fma")))

AVX512 inline __mmask16 tail_mask(int64_t left) {
  return static_cast<__mmask16>((1u << static_cast<unsigned>(left)) - 1u);
}

AVX512 inline __m512d lo_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }

AVX512 inline __m512d hi_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

AVX512 void stats_avx512(const float *x, int64_t n, double *s, double *q) {
  // Four independent sums and four sums of squares hide the add latency.
  __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
  __m512d q0 = s0, q1 = s0, q2 = s0, q3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 u = _mm512_loadu_ps(x + i);
    const __m512 v = _mm512_loadu_ps(x + i + 16);
    const __m512d a = lo_pd(u), b = hi_pd(u), c = lo_pd(v), d = hi_pd(v);
    s0 = _mm512_add_pd(s0, a);
    s1 = _mm512_add_pd(s1, b);
    s2 = _mm512_add_pd(s2, c);
    s3 = _mm512_add_pd(s3, d);
    q0 = _mm512_fmadd_pd(a, a, q0);
    q1 = _mm512_fmadd_pd(b, b, q1);
    q2 = _mm512_fmadd_pd(c, c, q2);
    q3 = _mm512_fmadd_pd(d, d, q3);
  }
  for (; i < n; i += 16) {
    const __m512 u = n - i >= 16 ? _mm512_loadu_ps(x + i) : _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
    const __m512d a = lo_pd(u), b = hi_pd(u);
    s0 = _mm512_add_pd(s0, a);
    s1 = _mm512_add_pd(s1, b);
    q0 = _mm512_fmadd_pd(a, a, q0);
    q1 = _mm512_fmadd_pd(b, b, q1);
  }
  *s += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3)));
  *q += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(q0, q1), _mm512_add_pd(q2, q3)));
}

// max(0, y) keeps a NaN y (the second operand is returned when one is NaN), as torch.relu does.
AVX512 void transform_avx512(const float *x, float *y, int64_t n, float scale, float shift, bool relu) {
  const __m512 vs = _mm512_set1_ps(scale), vt = _mm512_set1_ps(shift), zero = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), vs, vt);
    if (relu) v = _mm512_max_ps(zero, v);
    _mm512_storeu_ps(y + i, v);
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), vs, vt);
    if (relu) v = _mm512_max_ps(zero, v);
    _mm512_mask_storeu_ps(y + i, m, v);
  }
}

// The ReLU mask of the forward output (same fmadd as transform_avx512, so the same bits).
AVX512 inline __m512 masked_grad(__m512 xv, __m512 gv, __m512 vs, __m512 vt, bool relu) {
  if (!relu) return gv;
  const __mmask16 pos = _mm512_cmp_ps_mask(_mm512_fmadd_ps(xv, vs, vt), _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_maskz_mov_ps(pos, gv);
}

AVX512 void bwd_reduce_avx512(const float *x, const float *g, int64_t n, float mean, float scale, float shift,
                              bool relu, double *sg, double *dot) {
  const __m512 vs = _mm512_set1_ps(scale), vt = _mm512_set1_ps(shift), vm = _mm512_set1_ps(mean);
  __m512d s0 = _mm512_setzero_pd(), s1 = s0, d0 = s0, d1 = s0;
  for (int64_t i = 0; i < n; i += 16) {
    __m512 xv, gv;
    if (n - i >= 16) {
      xv = _mm512_loadu_ps(x + i);
      gv = _mm512_loadu_ps(g + i);
    } else {
      const __mmask16 m = tail_mask(n - i);
      xv = _mm512_maskz_loadu_ps(m, x + i);
      gv = _mm512_maskz_loadu_ps(m, g + i);  // zero beyond the tail: adds nothing
    }
    gv = masked_grad(xv, gv, vs, vt, relu);
    const __m512 dv = _mm512_sub_ps(xv, vm);
    const __m512d ga = lo_pd(gv), gb = hi_pd(gv);
    s0 = _mm512_add_pd(s0, ga);
    s1 = _mm512_add_pd(s1, gb);
    d0 = _mm512_fmadd_pd(ga, lo_pd(dv), d0);
    d1 = _mm512_fmadd_pd(gb, hi_pd(dv), d1);
  }
  *sg += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  *dot += _mm512_reduce_add_pd(_mm512_add_pd(d0, d1));
}

AVX512 void bwd_apply_avx512(const float *x, const float *g, float *dx, int64_t n, float mean, float scale,
                             float shift, bool relu, float a, float bc, float c) {
  const __m512 vs = _mm512_set1_ps(scale), vt = _mm512_set1_ps(shift), vm = _mm512_set1_ps(mean);
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(bc), vc = _mm512_set1_ps(c);
  for (int64_t i = 0; i < n; i += 16) {
    const bool full = n - i >= 16;
    const __mmask16 m = full ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 xv = full ? _mm512_loadu_ps(x + i) : _mm512_maskz_loadu_ps(m, x + i);
    __m512 gv = full ? _mm512_loadu_ps(g + i) : _mm512_maskz_loadu_ps(m, g + i);
    gv = masked_grad(xv, gv, vs, vt, relu);
    const __m512 base = _mm512_fmadd_ps(_mm512_sub_ps(xv, vm), vb, vc);
    const __m512 out = _mm512_fmadd_ps(gv, va, base);
    if (full) {
      _mm512_storeu_ps(dx + i, out);
    } else {
      _mm512_mask_storeu_ps(dx + i, m, out);
    }
  }
}

bool has_avx512() {
  static const bool yes =
      avx512_allowed() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return yes;
}
#else
bool has_avx512() { return false; }
#endif

struct Kernels {
  void (*stats)(const float *, int64_t, double *, double *);
  void (*transform)(const float *, float *, int64_t, float, float, bool);
  void (*bwd_reduce)(const float *, const float *, int64_t, float, float, float, bool, double *, double *);
  void (*bwd_apply)(const float *, const float *, float *, int64_t, float, float, float, bool, float, float,
                    float);
};

const Kernels &kernels() {
  static const Kernels k = [] {
#ifdef CROSSCLR_BN_AVX512
    if (has_avx512()) {
      return Kernels{stats_avx512, transform_avx512, bwd_reduce_avx512, bwd_apply_avx512};
    }
#endif
    return Kernels{stats_portable, transform_portable, bwd_reduce_portable, bwd_apply_portable};
  }();
  return k;
}

// ---------------------------------------------------------------------------------------------

struct Shape {
  int64_t n, c, l;  // x viewed as (N, C, L)
};

Shape shape_of(const at::Tensor &x) {
  Shape s{x.size(0), x.size(1), 1};
  for (int64_t d = 2; d < x.dim(); ++d) s.l *= x.size(d);
  return s;
}

// The per-channel affine map of the forward, computed identically in forward and backward.
inline void affine(double mean, double invstd, float w, float b, float *scale, float *shift) {
  const double sc = invstd * static_cast<double>(w);
  *scale = static_cast<float>(sc);
  *shift = static_cast<float>(static_cast<double>(b) - mean * sc);
}

int64_t grain(const Shape &s) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, s.n * s.l)); }

// Channel c's batch statistics of x (N, C, L) in one pass (double accumulators): stores the mean
// and 1/sqrt(biased var + eps) in mean_p[c] / invstd_p[c] and updates the running statistics as
// PyTorch does (momentum, unbiased variance). Returns the mean.
double channel_stats(const Kernels &k, const float *x, const Shape &s, int64_t c, double eps, double momentum,
                     float *rm, float *rv, double *mean_p, double *invstd_p) {
  const int64_t count = s.n * s.l;
  double sum = 0, sumsq = 0;
  for (int64_t i = 0; i < s.n; ++i) k.stats(x + (i * s.c + c) * s.l, s.l, &sum, &sumsq);
  const double mean = sum / static_cast<double>(count);
  const double var = std::max(sumsq / static_cast<double>(count) - mean * mean, 0.0);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  mean_p[c] = mean;
  invstd_p[c] = 1.0 / std::sqrt(var + eps);
  rm[c] = static_cast<float>(momentum * mean + (1.0 - momentum) * static_cast<double>(rm[c]));
  rv[c] = static_cast<float>(momentum * var * unbias + (1.0 - momentum) * static_cast<double>(rv[c]));
  return mean;
}

class FusedBatchNorm : public torch::autograd::Function<FusedBatchNorm> {
 public:
  // x (N, C, ...), w / b / running_mean / running_var (C,). Returns y of x's shape.
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const at::Tensor &b, const at::Tensor &running_mean, const at::Tensor &running_var,
                            double momentum, double eps, bool relu) {
    const Shape s = shape_of(x);
    const int64_t count = s.n * s.l;
    TORCH_CHECK(count > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
    at::Tensor y = at::empty_like(x);
    // (2, C) double: row 0 the batch means, row 1 the inverse standard deviations.
    at::Tensor stats = at::empty({2, s.c}, x.options().dtype(at::kDouble));
    const float *xp = x.const_data_ptr<float>();
    float *yp = y.mutable_data_ptr<float>();
    const float *wp = w.const_data_ptr<float>();
    const float *bp = b.const_data_ptr<float>();
    float *rm = running_mean.mutable_data_ptr<float>();
    float *rv = running_var.mutable_data_ptr<float>();
    double *mean_p = stats.mutable_data_ptr<double>();
    double *invstd_p = mean_p + s.c;
    const Kernels &k = kernels();
    at::parallel_for(0, s.c, grain(s), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const double mean = channel_stats(k, xp, s, c, eps, momentum, rm, rv, mean_p, invstd_p);
        const double invstd = invstd_p[c];
        float scale, shift;
        affine(mean, invstd, wp[c], bp[c], &scale, &shift);
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t off = (i * s.c + c) * s.l;
          k.transform(xp + off, yp + off, s.l, scale, shift, relu);
        }
      }
    });
    crossclr::bump_versions(running_mean, running_var);
    ctx->save_for_backward({x, w, b});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0];
    const at::Tensor &w = saved[1];
    const at::Tensor &b = saved[2];
    const at::Tensor stats = ctx->saved_data["stats"].toTensor();
    const bool relu = ctx->saved_data["relu"].toBool();
    const at::Tensor g = crossclr::checked_grad(grad_outputs[0], x, "fused batch norm");
    const Shape s = shape_of(x);
    const int64_t count = s.n * s.l;
    const bool need_dx = ctx->needs_input_grad(0);
    at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
    at::Tensor dw = at::empty({s.c}, w.options());
    at::Tensor db = at::empty({s.c}, b.options());
    const float *xp = x.const_data_ptr<float>();
    const float *gp = g.const_data_ptr<float>();
    float *dxp = need_dx ? dx.mutable_data_ptr<float>() : nullptr;
    const float *wp = w.const_data_ptr<float>();
    const float *bp = b.const_data_ptr<float>();
    float *dwp = dw.mutable_data_ptr<float>();
    float *dbp = db.mutable_data_ptr<float>();
    const double *mean_p = stats.const_data_ptr<double>();
    const double *invstd_p = mean_p + s.c;
    const Kernels &k = kernels();
    at::parallel_for(0, s.c, grain(s), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const double mean = mean_p[c], invstd = invstd_p[c];
        const float mean_f = static_cast<float>(mean);
        float scale, shift;
        affine(mean, invstd, wp[c], bp[c], &scale, &shift);
        double sum_g = 0, dot = 0;  // sum(g'), sum(g' * (x - mean))
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t off = (i * s.c + c) * s.l;
          k.bwd_reduce(xp + off, gp + off, s.l, mean_f, scale, shift, relu, &sum_g, &dot);
        }
        dwp[c] = static_cast<float>(dot * invstd);
        dbp[c] = static_cast<float>(sum_g);
        if (!need_dx) continue;
        // dx = (g' - sum_g / count - (x - mean) * proj) * invstd * w, proj = dot * invstd^2 / count.
        const double a = invstd * static_cast<double>(wp[c]);
        const double proj = dot * invstd * invstd / static_cast<double>(count);
        const float af = static_cast<float>(a);
        const float bc = static_cast<float>(-proj * a);
        const float cc = static_cast<float>(-sum_g / static_cast<double>(count) * a);
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t off = (i * s.c + c) * s.l;
          k.bwd_apply(xp + off, gp + off, dxp + off, s.l, mean_f, scale, shift, relu, af, bc, cc);
        }
      }
    });
    // One entry per forward argument: x, w, b, running_mean, running_var, momentum, eps, relu.
    return {dx,
            ctx->needs_input_grad(1) ? dw : at::Tensor(),
            ctx->needs_input_grad(2) ? db : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// Fused block tail: out = relu(dropout_p(bn(y)) + r), r optional, p = 0 meaning no dropout.
//
// The dropout mask is never stored: element i (flat index into y) is kept when lane i % L of the
// counter-based draw splitmix64_at(seed, i / L) is below keep * 2^bits, with L = 4 lanes of 16 bits
// when keep * 2^16 is whole (exact probability, e.g. p = 0.5) and L = 2 lanes of 32 bits otherwise
// (probability rounded to 2^-32). Kept elements are scaled by 1 / keep. Forward and backward
// regenerate the same mask from the seed; the output is saved for the ReLU mask of backward (the
// next block holds it anyway).

// Elements per stack buffer of mask values.
constexpr int64_t kMaskChunk = 1024;

// SplitMix64 (Steele, Lea, Flood 2014): output `i` of the stream whose state starts at `base`
// (same function as src/model/stgcn/dropout.rs).
inline uint64_t splitmix64_at(uint64_t base, uint64_t i) {
  uint64_t z = base + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct DropMask {
  bool on;             // p > 0
  bool lanes16;        // four 16-bit lanes per draw, else two 32-bit lanes
  uint64_t threshold;  // keep * 2^16 or keep * 2^32
  uint32_t scale_bits; // bits of 1 / keep as float
  uint64_t seed;
};

DropMask drop_mask(double p, int64_t seed) {
  DropMask d{};
  d.on = p > 0.0;
  if (!d.on) return d;
  const double keep = 1.0 - p;
  const double t16 = keep * 65536.0;
  d.lanes16 = t16 == std::floor(t16);
  d.threshold = d.lanes16 ? static_cast<uint64_t>(t16) : static_cast<uint64_t>(keep * 4294967296.0);
  const float scale = static_cast<float>(1.0 / keep);
  std::memcpy(&d.scale_bits, &scale, sizeof scale);
  d.seed = static_cast<uint64_t>(seed);
  return d;
}

#ifdef CROSSCLR_BN_AVX512
#define AVX512_BW_DQ __attribute__((target("avx512f,avx512bw,avx512dq")))

bool has_avx512_bw_dq() {
  static const bool yes = avx512_allowed() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return yes;
}

// The 16-bit-lane mask of elements 4j, 4j + 1, ... (the first whole multiple of 32 of n), eight
// draws splitmix64_at(seed, j..j + 8) per iteration: the same values as the scalar loop.
// Returns how many elements were written.
AVX512_BW_DQ int64_t fill_drop_mask16_avx512(const DropMask &d, uint64_t j, int64_t n, float *m) {
  const __m512i golden = _mm512_set1_epi64(static_cast<long long>(0x9E3779B97F4A7C15ull));
  const __m512i mul1 = _mm512_set1_epi64(static_cast<long long>(0xBF58476D1CE4E5B9ull));
  const __m512i mul2 = _mm512_set1_epi64(static_cast<long long>(0x94D049BB133111EBull));
  const __m512i base = _mm512_set1_epi64(static_cast<long long>(d.seed));
  const __m512i plus_one = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);  // lane e: draw j + e, counter + 1
  const __m512i thr = _mm512_set1_epi16(static_cast<short>(d.threshold));
  float scale;
  std::memcpy(&scale, &d.scale_bits, sizeof scale);
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32, j += 8) {
    const __m512i i1 = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(j)), plus_one);
    __m512i z = _mm512_add_epi64(base, _mm512_mullo_epi64(i1, golden));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), mul1);
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), mul2);
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
    // 16-bit lane l of draw e is element 4e + l: the little-endian order of the 32 words.
    const __mmask32 kept = _mm512_cmplt_epu16_mask(z, thr);
    _mm512_storeu_ps(m + k, _mm512_maskz_mov_ps(static_cast<__mmask16>(kept), vs));
    _mm512_storeu_ps(m + k + 16, _mm512_maskz_mov_ps(static_cast<__mmask16>(kept >> 16), vs));
  }
  return k;
}
#endif

// m[k] = mask value (0 or 1 / keep) of flat element start + k, k < n.
void fill_drop_mask(const DropMask &d, int64_t start, int64_t n, float *m) {
  const uint64_t thr = d.threshold;
  const uint32_t sb = d.scale_bits;
  auto pick = [thr, sb](uint64_t u) {
    const uint32_t bits = (0u - static_cast<uint32_t>(u < thr)) & sb;  // branch-free select
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  };
  const unsigned shift = d.lanes16 ? 2 : 1;  // log2(lanes per draw)
  const uint64_t lanes = uint64_t{1} << shift;
  const unsigned width = d.lanes16 ? 16 : 32;
  const uint64_t lane_bits = d.lanes16 ? 0xFFFFull : 0xFFFFFFFFull;
  uint64_t idx = static_cast<uint64_t>(start);
  int64_t k = 0;
  auto one = [&]() {
    const uint64_t r = splitmix64_at(d.seed, idx >> shift);
    m[k] = pick((r >> (width * (idx & (lanes - 1)))) & lane_bits);
    ++k;
    ++idx;
  };
  while (k < n && (idx & (lanes - 1)) != 0) one();
#ifdef CROSSCLR_BN_AVX512
  if (d.lanes16 && has_avx512_bw_dq()) {
    const int64_t done = fill_drop_mask16_avx512(d, idx >> 2, n - k, m + k);
    k += done;
    idx += static_cast<uint64_t>(done);
  }
#endif
  if (d.lanes16) {
    for (; k + 4 <= n; k += 4, idx += 4) {
      const uint64_t r = splitmix64_at(d.seed, idx >> 2);
      m[k] = pick(r & 0xFFFF);
      m[k + 1] = pick((r >> 16) & 0xFFFF);
      m[k + 2] = pick((r >> 32) & 0xFFFF);
      m[k + 3] = pick(r >> 48);
    }
  } else {
    for (; k + 2 <= n; k += 2, idx += 2) {
      const uint64_t r = splitmix64_at(d.seed, idx >> 1);
      m[k] = pick(r & 0xFFFFFFFF);
      m[k + 1] = pick(r >> 32);
    }
  }
  while (k < n) one();
}

// out = relu((y * scale + shift) * m + r); m == nullptr: no dropout, r == nullptr: no residual.
// relu keeps a NaN (v < 0 is false for NaN), as torch.relu does.
void tail_fwd_portable(const float *y, const float *r, const float *m, float *out, int64_t n, float scale,
                       float shift) {
  for (int64_t i = 0; i < n; ++i) {
    float v = y[i] * scale + shift;
    if (m != nullptr) v *= m[i];
    if (r != nullptr) v += r[i];
    out[i] = v < 0.0f ? 0.0f : v;
  }
}

// g' = out > 0 ? g : 0; dr = g' (when dr != nullptr); gz = g' * m; sg += sum(gz),
// dot += sum(gz * (y - mean)).
void tail_bwd_reduce_portable(const float *g, const float *out, const float *y, const float *m, float *dr,
                              float *gz, int64_t n, float mean, double *sg, double *dot) {
  double s = 0, d = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float gp = out[i] > 0.0f ? g[i] : 0.0f;
    if (dr != nullptr) dr[i] = gp;
    const float gi = m != nullptr ? gp * m[i] : gp;
    gz[i] = gi;
    s += gi;
    d += static_cast<double>(gi) * static_cast<double>(y[i] - mean);
  }
  *sg += s;
  *dot += d;
}

// In place: gz <- gz * a + (y - mean) * bc + c (the batch-norm input gradient).
void tail_bwd_apply_portable(float *gz, const float *y, int64_t n, float mean, float a, float bc, float c) {
  for (int64_t i = 0; i < n; ++i) gz[i] = gz[i] * a + ((y[i] - mean) * bc + c);
}

#ifdef CROSSCLR_BN_AVX512
AVX512 void tail_fwd_avx512(const float *y, const float *r, const float *m, float *out, int64_t n, float scale,
                            float shift) {
  const __m512 vs = _mm512_set1_ps(scale), vt = _mm512_set1_ps(shift), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const bool full = n - i >= 16;
    const __mmask16 k = full ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, y + i), vs, vt);
    if (m != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, m + i));
    if (r != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, r + i));
    v = _mm512_max_ps(zero, v);  // the second operand (v) when one is NaN
    _mm512_mask_storeu_ps(out + i, k, v);
  }
}

AVX512 void tail_bwd_reduce_avx512(const float *g, const float *out, const float *y, const float *m, float *dr,
                                   float *gz, int64_t n, float mean, double *sg, double *dot) {
  const __m512 vm = _mm512_set1_ps(mean), zero = _mm512_setzero_ps();
  __m512d s0 = _mm512_setzero_pd(), s1 = s0, d0 = s0, d1 = s0;
  for (int64_t i = 0; i < n; i += 16) {
    const bool full = n - i >= 16;
    const __mmask16 k = full ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __mmask16 pos = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, out + i), zero, _CMP_GT_OQ);
    const __m512 gp = _mm512_maskz_loadu_ps(pos, g + i);  // zero where masked (and beyond the tail)
    if (dr != nullptr) _mm512_mask_storeu_ps(dr + i, k, gp);
    const __m512 gv = m != nullptr ? _mm512_mul_ps(gp, _mm512_maskz_loadu_ps(k, m + i)) : gp;
    _mm512_mask_storeu_ps(gz + i, k, gv);
    const __m512 dv = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, y + i), vm);
    const __m512d ga = lo_pd(gv), gb = hi_pd(gv);
    s0 = _mm512_add_pd(s0, ga);
    s1 = _mm512_add_pd(s1, gb);
    d0 = _mm512_fmadd_pd(ga, lo_pd(dv), d0);
    d1 = _mm512_fmadd_pd(gb, hi_pd(dv), d1);
  }
  *sg += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  *dot += _mm512_reduce_add_pd(_mm512_add_pd(d0, d1));
}

AVX512 void tail_bwd_apply_avx512(float *gz, const float *y, int64_t n, float mean, float a, float bc, float c) {
  const __m512 vm = _mm512_set1_ps(mean), va = _mm512_set1_ps(a), vb = _mm512_set1_ps(bc),
               vc = _mm512_set1_ps(c);
  for (int64_t i = 0; i < n; i += 16) {
    const bool full = n - i >= 16;
    const __mmask16 k = full ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 base = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, y + i), vm), vb, vc);
    _mm512_mask_storeu_ps(gz + i, k, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, gz + i), va, base));
  }
}
#endif

struct TailKernels {
  void (*fwd)(const float *, const float *, const float *, float *, int64_t, float, float);
  void (*bwd_reduce)(const float *, const float *, const float *, const float *, float *, float *, int64_t, float,
                     double *, double *);
  void (*bwd_apply)(float *, const float *, int64_t, float, float, float, float);
};

const TailKernels &tail_kernels() {
  static const TailKernels k = [] {
#ifdef CROSSCLR_BN_AVX512
    if (has_avx512()) return TailKernels{tail_fwd_avx512, tail_bwd_reduce_avx512, tail_bwd_apply_avx512};
#endif
    return TailKernels{tail_fwd_portable, tail_bwd_reduce_portable, tail_bwd_apply_portable};
  }();
  return k;
}

class FusedBnTail : public torch::autograd::Function<FusedBnTail> {
 public:
  // y (N, C, ...), r of y's shape when has_r (else any defined tensor, e.g. empty: autograd
  // functions take no undefined inputs), w / b / running_mean / running_var (C,).
  // Returns relu(dropout_p(bn(y)) + r) of y's shape; the dropout mask comes from `seed`.
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &y, const at::Tensor &r,
                            const at::Tensor &w, const at::Tensor &b, const at::Tensor &running_mean,
                            const at::Tensor &running_var, bool has_r, double momentum, double eps, double p,
                            int64_t seed) {
    const Shape s = shape_of(y);
    const int64_t count = s.n * s.l;
    TORCH_CHECK(count > 1, "Expected more than 1 value per channel when training, got input size ", y.sizes());
    at::Tensor out = at::empty_like(y);
    at::Tensor stats = at::empty({2, s.c}, y.options().dtype(at::kDouble));
    const float *yp = y.const_data_ptr<float>();
    const float *rp = has_r ? r.const_data_ptr<float>() : nullptr;
    float *op = out.mutable_data_ptr<float>();
    const float *wp = w.const_data_ptr<float>();
    const float *bp = b.const_data_ptr<float>();
    float *rm = running_mean.mutable_data_ptr<float>();
    float *rv = running_var.mutable_data_ptr<float>();
    double *mean_p = stats.mutable_data_ptr<double>();
    double *invstd_p = mean_p + s.c;
    const Kernels &k = kernels();
    const TailKernels &tk = tail_kernels();
    const DropMask dm = drop_mask(p, seed);
    at::parallel_for(0, s.c, grain(s), [&](int64_t c0, int64_t c1) {
      float mbuf[kMaskChunk];
      for (int64_t c = c0; c < c1; ++c) {
        const double mean = channel_stats(k, yp, s, c, eps, momentum, rm, rv, mean_p, invstd_p);
        const double invstd = invstd_p[c];
        float scale, shift;
        affine(mean, invstd, wp[c], bp[c], &scale, &shift);
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t off = (i * s.c + c) * s.l;
          for (int64_t j = 0; j < s.l; j += kMaskChunk) {
            const int64_t len = std::min(kMaskChunk, s.l - j);
            const int64_t at = off + j;
            if (dm.on) fill_drop_mask(dm, at, len, mbuf);
            tk.fwd(yp + at, rp != nullptr ? rp + at : nullptr, dm.on ? mbuf : nullptr, op + at, len, scale, shift);
          }
        }
      }
    });
    crossclr::bump_versions(running_mean, running_var);
    ctx->save_for_backward({y, w, b, out});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["has_r"] = has_r;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &y = saved[0];
    const at::Tensor &w = saved[1];
    const at::Tensor &out = saved[3];
    const at::Tensor stats = ctx->saved_data["stats"].toTensor();
    const DropMask dm = drop_mask(ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt());
    const bool has_r = ctx->saved_data["has_r"].toBool();
    const at::Tensor g = crossclr::checked_grad(grad_outputs[0], y, "fused block tail");
    const Shape s = shape_of(y);
    const int64_t count = s.n * s.l;
    const bool need_dy = ctx->needs_input_grad(0);
    const bool need_dr = has_r && ctx->needs_input_grad(1);
    at::Tensor dy = at::empty_like(y);  // holds the gradient into the batch norm, then dy
    at::Tensor dr = need_dr ? at::empty_like(y) : at::Tensor();
    at::Tensor dw = at::empty({s.c}, w.options());
    at::Tensor db = at::empty({s.c}, w.options());
    const float *yp = y.const_data_ptr<float>();
    const float *op = out.const_data_ptr<float>();
    const float *gp = g.const_data_ptr<float>();
    float *dyp = dy.mutable_data_ptr<float>();
    float *drp = need_dr ? dr.mutable_data_ptr<float>() : nullptr;
    const float *wp = w.const_data_ptr<float>();
    float *dwp = dw.mutable_data_ptr<float>();
    float *dbp = db.mutable_data_ptr<float>();
    const double *mean_p = stats.const_data_ptr<double>();
    const double *invstd_p = mean_p + s.c;
    const TailKernels &tk = tail_kernels();
    at::parallel_for(0, s.c, grain(s), [&](int64_t c0, int64_t c1) {
      float mbuf[kMaskChunk];
      for (int64_t c = c0; c < c1; ++c) {
        const double mean = mean_p[c], invstd = invstd_p[c];
        const float mean_f = static_cast<float>(mean);
        double sum_g = 0, dot = 0;  // sum(gz), sum(gz * (y - mean))
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t off = (i * s.c + c) * s.l;
          for (int64_t j = 0; j < s.l; j += kMaskChunk) {
            const int64_t len = std::min(kMaskChunk, s.l - j);
            const int64_t at = off + j;
            if (dm.on) fill_drop_mask(dm, at, len, mbuf);
            tk.bwd_reduce(gp + at, op + at, yp + at, dm.on ? mbuf : nullptr, drp != nullptr ? drp + at : nullptr,
                          dyp + at, len, mean_f, &sum_g, &dot);
          }
        }
        dwp[c] = static_cast<float>(dot * invstd);
        dbp[c] = static_cast<float>(sum_g);
        if (!need_dy) continue;
        const double a = invstd * static_cast<double>(wp[c]);
        const double proj = dot * invstd * invstd / static_cast<double>(count);
        const float af = static_cast<float>(a);
        const float bc = static_cast<float>(-proj * a);
        const float cc = static_cast<float>(-sum_g / static_cast<double>(count) * a);
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t off = (i * s.c + c) * s.l;
          tk.bwd_apply(dyp + off, yp + off, s.l, mean_f, af, bc, cc);
        }
      }
    });
    // One entry per forward argument: y, r, w, b, running_mean, running_var, has_r, momentum, eps, p,
    // seed (the tensors first, so that needs_input_grad's edge indices are the same positions).
    return {need_dy ? dy : at::Tensor(),
            need_dr ? dr : at::Tensor(),
            ctx->needs_input_grad(2) ? dw : at::Tensor(),
            ctx->needs_input_grad(3) ? db : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};


}  // namespace

extern "C" {

// 1 when the AVX-512 kernels run on this CPU, 0 when the portable loops do.
int crossclr_fused_bn_uses_avx512(void) { return has_avx512() ? 1 : 0; }

// Training-mode batch norm over dim 1 of the contiguous float32 CPU tensor `x` (rank >= 2), with
// `w`, `b`, `running_mean`, `running_var` contiguous float32 CPU tensors of shape (C,); the running
// statistics are updated in place. relu != 0 fuses a ReLU on the output. On success `*out` receives
// a new `at::Tensor*` (owned by the caller, freed by tch's Tensor drop) and 0 is returned; on
// failure 1 and a malloc'd message in `*err` (free it with crossclr_shim_free).
int crossclr_fused_bn_train(void *x, void *w, void *b, void *running_mean, void *running_var, double momentum,
                            double eps, int relu, void **out, char **err) {
  return crossclr::guarded(err, [&] {
    const char *op = "fused batch norm";
    TORCH_CHECK(out != nullptr, op, ": null output pointer");
    const auto a = crossclr::borrow_bn_args(op, x, w, b, running_mean, running_var);
    TORCH_CHECK(a.x.device().is_cpu(), op, ": CPU tensors only, got one on ", a.x.device());
    at::Tensor y = FusedBatchNorm::apply(a.x, a.w, a.b, a.running_mean, a.running_var, momentum, eps, relu != 0);
    *out = new at::Tensor(std::move(y));
  });
}

// The fused tail of an ST-GCN block: relu(dropout_p(bn(y)) + r) with training-mode batch norm
// over dim 1 of the contiguous float32 CPU tensor `y` (rank >= 2), `r` null or a contiguous float32
// CPU tensor of y's shape, parameters and running statistics as in crossclr_fused_bn_train (running
// statistics updated in place), 0 <= p < 1 the dropout probability (0: no dropout) and `seed` the
// mask seed. Same ownership and error convention as crossclr_fused_bn_train.
int crossclr_fused_bn_tail_train(void *y, void *r, void *w, void *b, void *running_mean, void *running_var,
                                 double momentum, double eps, double p, int64_t seed, void **out, char **err) {
  return crossclr::guarded(err, [&] {
    const char *op = "fused block tail";
    TORCH_CHECK(out != nullptr, op, ": null output pointer");
    const auto a = crossclr::borrow_bn_args(op, y, w, b, running_mean, running_var);
    TORCH_CHECK(a.x.device().is_cpu(), op, ": CPU tensors only, got one on ", a.x.device());
    const at::Tensor rt = crossclr::borrow_tail_residual(op, r, a.x, p);
    at::Tensor o = FusedBnTail::apply(a.x, rt, a.w, a.b, a.running_mean, a.running_var, r != nullptr, momentum,
                                      eps, p, seed);
    *out = new at::Tensor(std::move(o));
  });
}

}  // extern "C"
