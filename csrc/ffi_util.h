// Helpers shared by the shim's C entry points (csrc/*.cpp): error messages across the FFI boundary
// and borrowing tch tensors (`tch::Tensor::as_ptr()` is an `at::Tensor*`).
//
// Convention of every entry point: return 0 on success; on failure return 1 and put a malloc'd,
// NUL-terminated message in `*err` (freed by the Rust side with crossclr_shim_free). No C++
// exception ever crosses the boundary.
#ifndef CROSSCLR_FFI_UTIL_H
#define CROSSCLR_FFI_UTIL_H

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace crossclr {

// A malloc'd copy of `msg` (nullptr when out of memory).
inline char *dup_message(const std::string &msg) {
  char *s = static_cast<char *>(std::malloc(msg.size() + 1));
  if (s != nullptr) std::memcpy(s, msg.c_str(), msg.size() + 1);
  return s;
}

// Runs `body`, turning any exception into status 1 and a message in `*err`; 0 when it returns.
template <typename F>
int guarded(char **err, F &&body) {
  try {
    body();
    return 0;
  } catch (const c10::Error &e) {
    // what_without_backtrace keeps the message readable (the backtrace is dozens of lines).
    if (err != nullptr) *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    if (err != nullptr) *err = dup_message(e.what());
  } catch (...) {
    if (err != nullptr) *err = dup_message("unknown C++ exception");
  }
  return 1;
}

// The tensor behind a tch pointer; rejects null pointers and undefined tensors. `op` and `what`
// name the operation and the argument in the error.
inline const at::Tensor &borrow_tensor(void *p, const char *op, const char *what) {
  TORCH_CHECK(p != nullptr, op, ": ", what, " is a null pointer");
  const at::Tensor &t = *static_cast<at::Tensor *>(p);
  TORCH_CHECK(t.defined(), op, ": ", what, " is an undefined tensor");
  return t;
}

// Checks that `t` is a contiguous float32 tensor of shape `sizes` on `device`.
inline void check_f32_like(const at::Tensor &t, const at::Device &device, at::IntArrayRef sizes, const char *op,
                           const char *what) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == sizes,
              op, ": ", what, " must be a contiguous float32 tensor of shape ", sizes, " on ", device, ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// The arguments of a fused training batch norm: input x (N, C, ...) and the (C,) parameters and
// running statistics, all contiguous float32 on x's device.
struct BnArgs {
  const at::Tensor &x, &w, &b, &running_mean, &running_var;
};

inline BnArgs borrow_bn_args(const char *op, void *x, void *w, void *b, void *running_mean, void *running_var) {
  const at::Tensor &xt = borrow_tensor(x, op, "input");
  TORCH_CHECK(xt.scalar_type() == at::kFloat && xt.is_contiguous() && xt.dim() >= 2, op,
              ": the input must be a contiguous float32 tensor of rank >= 2, got ", xt.scalar_type(), " ",
              xt.sizes(), " on ", xt.device());
  BnArgs a{xt, borrow_tensor(w, op, "weight"), borrow_tensor(b, op, "bias"),
           borrow_tensor(running_mean, op, "running_mean"), borrow_tensor(running_var, op, "running_var")};
  const int64_t c = xt.size(1);
  check_f32_like(a.w, xt.device(), {c}, op, "weight");
  check_f32_like(a.b, xt.device(), {c}, op, "bias");
  check_f32_like(a.running_mean, xt.device(), {c}, op, "running_mean");
  check_f32_like(a.running_var, xt.device(), {c}, op, "running_var");
  return a;
}

// The residual of a fused block tail: null means none (an empty tensor is returned), else a
// contiguous float32 tensor of y's shape on y's device. Also checks 0 <= p < 1.
inline at::Tensor borrow_tail_residual(const char *op, void *r, const at::Tensor &y, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout probability ", p, " outside [0, 1)");
  if (r == nullptr) return at::empty({0}, y.options());
  const at::Tensor &rt = borrow_tensor(r, op, "residual");
  check_f32_like(rt, y.device(), y.sizes(), op, "residual");
  return rt;
}

// Marks running statistics written in place (outside autograd) as modified, as ATen's batch norm
// does, so that a stale saved copy would be detected.
inline void bump_versions(const at::Tensor &running_mean, const at::Tensor &running_var) {
  for (const at::Tensor *t : {&running_mean, &running_var}) {
    if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
  }
}

// The incoming gradient of a fused op as a contiguous float32 tensor of the output's shape.
inline at::Tensor checked_grad(const at::Tensor &grad, const at::Tensor &output_like, const char *op) {
  at::Tensor g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(g.sizes() == output_like.sizes(), op, ": gradient of shape ", g.sizes(), " for output ",
              output_like.sizes());
  return g;
}

}  // namespace crossclr

#endif  // CROSSCLR_FFI_UTIL_H
