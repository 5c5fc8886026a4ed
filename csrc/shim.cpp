// The crossclr C++ shim: what tch does not bind (CUDA graphs, TF32 switches, foreach / fused optimiser
// kernels, CUDA caching-allocator statistics). See csrc/shim.h for the contract and src/gpu/ for the
// safe Rust wrappers. Only the headers that are needed are included, to keep compile times short.
#include "shim.h"
#include "ffi_util.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_zero.h>
#include <ATen/ops/_fused_sgd.h>
#include <c10/core/GradMode.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#ifdef CROSSCLR_SHIM_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

// Declared in ATen/cuda/CUDAContextLight.h (exported by libtorch_cuda); declared here to avoid
// pulling in the cuBLAS / cuSPARSE / cuSOLVER headers that file includes.
namespace at {
namespace cuda {
cudaDeviceProp *getDeviceProperties(c10::DeviceIndex device);
}
}  // namespace at
#endif

namespace {

using crossclr::guarded;

// Borrows `n` tensors given as tch pointers; rejects null pointers and undefined tensors.
std::vector<at::Tensor> borrow(crossclr_tensor *ptrs, size_t n, const char *what) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(ptrs != nullptr && ptrs[i] != nullptr, what, "[", i, "] is a null pointer");
    const at::Tensor &t = *static_cast<at::Tensor *>(ptrs[i]);
    TORCH_CHECK(t.defined(), what, "[", i, "] is an undefined tensor (no gradient yet?)");
    out.push_back(t);
  }
  return out;
}

// Foreach kernels process the tensors of a list in parallel on CUDA: a storage listed twice in the
// in-place list would race, and any mismatch in shape / dtype / device is a caller bug.
void check_pairs(const std::vector<at::Tensor> &dst, const std::vector<at::Tensor> &src, const char *dst_name,
                 const char *src_name) {
  std::unordered_set<const void *> seen;
  for (size_t i = 0; i < dst.size(); ++i) {
    TORCH_CHECK(dst[i].sizes() == src[i].sizes(), dst_name, "[", i, "] has shape ", dst[i].sizes(), " but ",
                src_name, "[", i, "] has shape ", src[i].sizes());
    TORCH_CHECK(dst[i].scalar_type() == src[i].scalar_type(), dst_name, "[", i, "] and ", src_name, "[", i,
                "] differ in dtype");
    TORCH_CHECK(dst[i].device() == src[i].device(), dst_name, "[", i, "] is on ", dst[i].device(), " but ",
                src_name, "[", i, "] is on ", src[i].device());
    TORCH_CHECK(dst[i].device() == dst[0].device(), dst_name, " mixes devices");
    if (dst[i].numel() > 0) {
      TORCH_CHECK(seen.insert(dst[i].const_data_ptr()).second, dst_name, "[", i,
                  "] shares its storage with an earlier entry of the same call (update shared modules in "
                  "separate calls, one per owner, in order)");
    }
  }
}

}  // namespace

extern "C" {

void crossclr_shim_free(char *s) { std::free(s); }

int crossclr_shim_has_cuda(void) {
#ifdef CROSSCLR_SHIM_CUDA
  return 1;
#else
  return 0;
#endif
}

int crossclr_ema_(crossclr_tensor *keys, crossclr_tensor *queries, size_t n, double m, char **err) {
  return guarded(err, [&] {
    if (n == 0) return;
    auto k = borrow(keys, n, "keys");
    auto q = borrow(queries, n, "queries");
    check_pairs(k, q, "keys", "queries");
    c10::NoGradGuard no_grad;
    // Same arithmetic as the official update k = k * m + q * (1 - m), in two multi-tensor kernels.
    at::_foreach_mul_(k, m);
    at::_foreach_add_(k, q, 1.0 - m);
  });
}

int crossclr_fused_sgd_(crossclr_tensor *params, crossclr_tensor *grads, crossclr_tensor *bufs, size_t n,
                        double weight_decay, double momentum, double lr, crossclr_tensor lr_tensor,
                        char **err) {
  return guarded(err, [&] {
    if (n == 0) return;
    auto p = borrow(params, n, "params");
    auto g = borrow(grads, n, "grads");
    auto b = borrow(bufs, n, "momentum buffers");
    check_pairs(p, g, "params", "grads");
    check_pairs(p, b, "params", "momentum buffers");
    c10::NoGradGuard no_grad;
    const double dampening = 0.0;
    // Buffers start at zero, so the first step's buf = 0.9 * 0 + g equals PyTorch's buf = clone(g):
    // is_first_step stays false and the same (capturable) kernel runs on every step.
    const bool nesterov = false, maximize = false, is_first_step = false;
    if (lr_tensor != nullptr) {
      const at::Tensor &lr_t = *static_cast<at::Tensor *>(lr_tensor);
      TORCH_CHECK(lr_t.defined() && lr_t.numel() == 1, "lr tensor must hold exactly one value");
      TORCH_CHECK(lr_t.device() == p[0].device(), "lr tensor is on ", lr_t.device(),
                  " but the parameters are on ", p[0].device(), " (a CPU lr would force a host sync)");
      at::_fused_sgd_(p, g, b, weight_decay, momentum, lr_t, dampening, nesterov, maximize, is_first_step);
    } else {
      at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, dampening, nesterov, maximize, is_first_step);
    }
  });
}

int crossclr_zero_grad_(crossclr_tensor *params, size_t n, int set_to_none, char **err) {
  return guarded(err, [&] {
    auto p = borrow(params, n, "params");
    std::vector<at::Tensor> grads;
    for (auto &t : p) {
      if (set_to_none != 0) {
        t.mutable_grad().reset();
      } else if (t.grad().defined()) {
        grads.push_back(t.grad());
      }
    }
    if (!grads.empty()) {
      c10::NoGradGuard no_grad;
      at::_foreach_zero_(grads);
    }
  });
}

int crossclr_set_tf32(int on, char **err) {
  return guarded(err, [&] {
    at::globalContext().setAllowTF32CuBLAS(on != 0);
    at::globalContext().setAllowTF32CuDNN(on != 0);
  });
}

int crossclr_set_warn_on_accumulate_grad_stream_mismatch(int on) {
  try {
    at::globalContext().setWarnOnAccumulateGradStreamMismatch(on != 0);
    return 0;
  } catch (...) {
    return 1;
  }
}

int crossclr_get_tf32(int *cublas, int *cudnn, char **err) {
  return guarded(err, [&] {
    *cublas = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
    *cudnn = at::globalContext().allowTF32CuDNN() ? 1 : 0;
  });
}

#ifndef CROSSCLR_SHIM_CUDA

static const char *kNoCuda = "the crossclr shim was built without CUDA support (no CUDA headers or libtorch_cuda)";

int crossclr_cuda_device_name(int, char *, size_t, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_cuda_memory_stats(int, int64_t *, int64_t *, int64_t *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_cuda_reset_peak(int, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_cuda_empty_cache(char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_graph_new(int, CrossclrGraph **, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_graph_stream_enter(CrossclrGraph *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_graph_stream_exit(CrossclrGraph *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_graph_capture_begin(CrossclrGraph *, int, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_graph_capture_end(CrossclrGraph *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_graph_replay(CrossclrGraph *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
void crossclr_graph_free(CrossclrGraph *) {}
int crossclr_stream_from_pool(int, CrossclrStream **, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_stream_current(int, CrossclrStream **, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_stream_set_current(const CrossclrStream *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_stream_wait(const CrossclrStream *, const CrossclrStream *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
int crossclr_stream_same(const CrossclrStream *a, const CrossclrStream *b) { return a == b ? 1 : 0; }
int crossclr_record_stream(crossclr_tensor, const CrossclrStream *, char **err) {
  return guarded(err, [] { throw std::runtime_error(kNoCuda); });
}
void crossclr_stream_free(CrossclrStream *) {}

#else  // CROSSCLR_SHIM_CUDA

}  // extern "C"

struct CrossclrStream {
  c10::cuda::CUDAStream stream;
};

struct CrossclrGraph {
  c10::DeviceIndex device;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  c10::cuda::CUDAStream side;
  std::optional<c10::cuda::CUDAStream> saved;  // the stream that was current before enter
  bool capturing = false;

  CrossclrGraph(c10::DeviceIndex d, c10::cuda::CUDAStream s) : device(d), side(s) {}
};

namespace {

c10::Device cuda_device(int device) {
  TORCH_CHECK(device >= 0, "CUDA device index must be >= 0, got ", device);
  return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
}

// `waiter` waits (on the device, not the host) for the work queued so far on `done`.
void stream_wait(const c10::cuda::CUDAStream &waiter, const c10::cuda::CUDAStream &done) {
  if (waiter == done) return;
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(done.unwrap());
  ev.block(waiter.unwrap());
}

void enter(CrossclrGraph *g) {
  TORCH_CHECK(g != nullptr, "null graph");
  if (g->saved.has_value()) return;  // already on the side stream
  c10::DeviceGuard guard(cuda_device(g->device));
  auto current = c10::cuda::getCurrentCUDAStream(g->device);
  stream_wait(g->side, current);
  g->saved = current;
  c10::cuda::setCurrentCUDAStream(g->side);
}

void exit_stream(CrossclrGraph *g) {
  TORCH_CHECK(g != nullptr, "null graph");
  if (!g->saved.has_value()) return;
  c10::DeviceGuard guard(cuda_device(g->device));
  auto previous = *g->saved;
  g->saved.reset();
  stream_wait(previous, g->side);
  c10::cuda::setCurrentCUDAStream(previous);
}

}  // namespace

extern "C" {

int crossclr_cuda_device_name(int device, char *buf, size_t len, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(buf != nullptr && len > 0, "empty name buffer");
    cudaDeviceProp *prop = at::cuda::getDeviceProperties(cuda_device(device).index());
    TORCH_CHECK(prop != nullptr, "no properties for CUDA device ", device);
    std::strncpy(buf, prop->name, len - 1);
    buf[len - 1] = '\0';
  });
}

int crossclr_cuda_memory_stats(int device, int64_t *peak_allocated, int64_t *current_allocated,
                               int64_t *peak_reserved, char **err) {
  return guarded(err, [&] {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(cuda_device(device).index());
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *peak_allocated = stats.allocated_bytes[all].peak;
    *current_allocated = stats.allocated_bytes[all].current;
    *peak_reserved = stats.reserved_bytes[all].peak;
  });
}

int crossclr_cuda_reset_peak(int device, char **err) {
  return guarded(err, [&] { c10::cuda::CUDACachingAllocator::resetPeakStats(cuda_device(device).index()); });
}

int crossclr_cuda_empty_cache(char **err) {
  return guarded(err, [] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

int crossclr_graph_new(int device, CrossclrGraph **out, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(out != nullptr, "null output pointer");
    const auto dev = cuda_device(device);
    c10::DeviceGuard guard(dev);
    auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, dev.index());
    auto g = std::make_unique<CrossclrGraph>(dev.index(), side);
    g->graph = std::make_unique<at::cuda::CUDAGraph>();
    *out = g.release();
  });
}

int crossclr_graph_stream_enter(CrossclrGraph *g, char **err) {
  return guarded(err, [&] { enter(g); });
}

int crossclr_graph_stream_exit(CrossclrGraph *g, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(g == nullptr || !g->capturing, "cannot leave the side stream during a capture");
    exit_stream(g);
  });
}

int crossclr_graph_capture_begin(CrossclrGraph *g, int mode, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(g != nullptr, "null graph");
    TORCH_CHECK(!g->capturing, "a capture is already under way on this graph");
    cudaStreamCaptureMode m = cudaStreamCaptureModeGlobal;
    if (mode == 1) {
      m = cudaStreamCaptureModeThreadLocal;
    } else if (mode == 2) {
      m = cudaStreamCaptureModeRelaxed;
    } else {
      TORCH_CHECK(mode == 0, "capture mode must be 0 (global), 1 (thread-local) or 2 (relaxed)");
    }
    enter(g);
    c10::DeviceGuard guard(cuda_device(g->device));
    // A private memory pool ({0, 0} = "make a new one"); the default CUDA generator is registered
    // by CUDAGraph itself, so dropout draws fresh numbers on every replay.
    g->graph->capture_begin(c10::MempoolId_t{0, 0}, m);
    g->capturing = true;
  });
}

int crossclr_graph_capture_end(CrossclrGraph *g, char **err) {
  if (g == nullptr) return guarded(err, [] { TORCH_CHECK(false, "null graph"); });
  int status = guarded(err, [&] {
    TORCH_CHECK(g->capturing, "capture_end without capture_begin");
    g->capturing = false;
    c10::DeviceGuard guard(cuda_device(g->device));
    g->graph->capture_end();
  });
  // Always give the previous stream back, even when the capture failed.
  char *exit_err = nullptr;
  if (guarded(&exit_err, [&] { exit_stream(g); }) != 0) {
    if (status == 0) {
      if (err != nullptr) *err = exit_err; else std::free(exit_err);
      return 1;
    }
    std::free(exit_err);
  }
  return status;
}

int crossclr_graph_replay(CrossclrGraph *g, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(g != nullptr, "null graph");
    TORCH_CHECK(!g->capturing, "replay during a capture");
    c10::DeviceGuard guard(cuda_device(g->device));
    g->graph->replay();
  });
}

void crossclr_graph_free(CrossclrGraph *g) {
  if (g == nullptr) return;
  if (g->capturing) {
    char *e = nullptr;
    crossclr_graph_capture_end(g, &e);  // ends the stream capture; the error is moot here
    std::free(e);
  }
  char *e = nullptr;
  guarded(&e, [&] { exit_stream(g); });
  std::free(e);
  try {
    delete g;  // ~CUDAGraph releases the private pool (it warns rather than throws)
  } catch (...) {
  }
}

int crossclr_stream_from_pool(int device, CrossclrStream **out, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(out != nullptr, "null output pointer");
    const auto dev = cuda_device(device);
    c10::DeviceGuard guard(dev);
    *out = new CrossclrStream{c10::cuda::getStreamFromPool(/*isHighPriority=*/false, dev.index())};
  });
}

int crossclr_stream_current(int device, CrossclrStream **out, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(out != nullptr, "null output pointer");
    *out = new CrossclrStream{c10::cuda::getCurrentCUDAStream(cuda_device(device).index())};
  });
}

int crossclr_stream_set_current(const CrossclrStream *s, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(s != nullptr, "null stream");
    c10::cuda::setCurrentCUDAStream(s->stream);
  });
}

int crossclr_stream_wait(const CrossclrStream *waiter, const CrossclrStream *done, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(waiter != nullptr && done != nullptr, "null stream");
    TORCH_CHECK(waiter->stream.device_index() == done->stream.device_index(),
                "streams on different devices");
    c10::DeviceGuard guard(cuda_device(waiter->stream.device_index()));
    stream_wait(waiter->stream, done->stream);
  });
}

int crossclr_stream_same(const CrossclrStream *a, const CrossclrStream *b) {
  if (a == nullptr || b == nullptr) return a == b ? 1 : 0;
  return a->stream == b->stream ? 1 : 0;
}

int crossclr_record_stream(crossclr_tensor t, const CrossclrStream *s, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(s != nullptr, "null stream");
    const at::Tensor &x = crossclr::borrow_tensor(t, "record_stream", "tensor");
    if (!x.is_cuda() || !x.has_storage() || x.storage().data() == nullptr) return;
    c10::cuda::CUDACachingAllocator::recordStream(x.storage().data_ptr(), s->stream);
  });
}

void crossclr_stream_free(CrossclrStream *s) { delete s; }

#endif  // CROSSCLR_SHIM_CUDA

}  // extern "C"
