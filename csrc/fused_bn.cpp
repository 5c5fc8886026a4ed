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
// The AVX-512 kernels are compiled with a target attribute and chosen at run time; elsewhere the
// portable loops run. The forward and backward of one process always use the same kernels, so the
// ReLU mask recomputed in backward matches the forward exactly.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>

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

char *dup_message(const std::string &msg) {
  char *s = static_cast<char *>(std::malloc(msg.size() + 1));
  if (s != nullptr) {
    std::memcpy(s, msg.c_str(), msg.size() + 1);
  }
  return s;
}

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
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
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

void check_param(const at::Tensor &t, int64_t c, const char *name) {
  TORCH_CHECK(t.defined(), "fused batch norm: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                  t.size(0) == c,
              "fused batch norm: ", name, " must be a contiguous float32 CPU tensor of shape (", c, "), got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// The per-channel affine map of the forward, computed identically in forward and backward.
inline void affine(double mean, double invstd, float w, float b, float *scale, float *shift) {
  const double sc = invstd * static_cast<double>(w);
  *scale = static_cast<float>(sc);
  *shift = static_cast<float>(static_cast<double>(b) - mean * sc);
}

int64_t grain(const Shape &s) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, s.n * s.l)); }

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
    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
    at::parallel_for(0, s.c, grain(s), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sum = 0, sumsq = 0;
        for (int64_t i = 0; i < s.n; ++i) k.stats(xp + (i * s.c + c) * s.l, s.l, &sum, &sumsq);
        const double mean = sum / static_cast<double>(count);
        const double var = std::max(sumsq / static_cast<double>(count) - mean * mean, 0.0);
        const double invstd = 1.0 / std::sqrt(var + eps);
        mean_p[c] = mean;
        invstd_p[c] = invstd;
        rm[c] = static_cast<float>(momentum * mean + (1.0 - momentum) * static_cast<double>(rm[c]));
        rv[c] = static_cast<float>(momentum * var * unbias + (1.0 - momentum) * static_cast<double>(rv[c]));
        float scale, shift;
        affine(mean, invstd, wp[c], bp[c], &scale, &shift);
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t off = (i * s.c + c) * s.l;
          k.transform(xp + off, yp + off, s.l, scale, shift, relu);
        }
      }
    });
    for (const at::Tensor *t : {&running_mean, &running_var}) {
      if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
    }
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
    const at::Tensor g = grad_outputs[0].to(at::kFloat).contiguous();
    TORCH_CHECK(g.sizes() == x.sizes(), "fused batch norm: gradient of shape ", g.sizes(), " for output ",
                x.sizes());
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

const at::Tensor &borrow(void *p, const char *what) {
  TORCH_CHECK(p != nullptr, "fused batch norm: ", what, " is a null pointer");
  const at::Tensor &t = *static_cast<at::Tensor *>(p);
  TORCH_CHECK(t.defined(), "fused batch norm: ", what, " is an undefined tensor");
  return t;
}

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
  try {
    TORCH_CHECK(out != nullptr, "fused batch norm: null output pointer");
    const at::Tensor &xt = borrow(x, "input");
    TORCH_CHECK(xt.device().is_cpu() && xt.scalar_type() == at::kFloat && xt.is_contiguous() && xt.dim() >= 2,
                "fused batch norm: the input must be a contiguous float32 CPU tensor of rank >= 2, got ",
                xt.scalar_type(), " ", xt.sizes(), " on ", xt.device());
    const int64_t c = xt.size(1);
    const at::Tensor &wt = borrow(w, "weight");
    const at::Tensor &bt = borrow(b, "bias");
    const at::Tensor &rm = borrow(running_mean, "running_mean");
    const at::Tensor &rv = borrow(running_var, "running_var");
    check_param(wt, c, "weight");
    check_param(bt, c, "bias");
    check_param(rm, c, "running_mean");
    check_param(rv, c, "running_var");
    at::Tensor y = FusedBatchNorm::apply(xt, wt, bt, rm, rv, momentum, eps, relu != 0);
    *out = new at::Tensor(std::move(y));
    return 0;
  } catch (const c10::Error &e) {
    if (err != nullptr) *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    if (err != nullptr) *err = dup_message(e.what());
  } catch (...) {
    if (err != nullptr) *err = dup_message("unknown C++ exception");
  }
  return 1;
}

}  // extern "C"
