// The temporal convolution of a channel-major ST-GCN block with its weight gradient taken off the
// critical path of the backward pass. See src/model/stgcn/temporal_conv.rs for the Rust side and
// the why.
//
// Forward: y = conv3d(x, w.unsqueeze(2), b), stride (1, s, 1), padding (0, p, 0); x (1, C_in, R, T, V),
// w (C_out, C_in, kt, 1), b (C_out,) or undefined -> y (1, C_out, R, T', V): exactly what the plain tch call does.
//
// Backward: the input and bias gradients are computed as usual, on the stream autograd runs the node
// on. The weight gradient (a long, low-parallelism reduction over every position) is computed on a
// separate "weight-gradient" stream of the device, which first waits for the node's stream, and is
// NOT returned to autograd: it is parked in a batch (a `WgradBatch`, owned by the caller's scope)
// and added to `w.grad` when the caller joins the batch (crossclr_wgrad_join), after backward and
// before the optimiser reads the gradients. The join makes the caller's current stream wait for the
// weight-gradient stream, so inside a CUDA-graph capture the branch becomes a fork / join of the
// graph, and the remaining backward kernels run while the reduction does. Tensors used on the
// weight-gradient stream are recorded with the caching allocator (record_stream), so no block is
// reused while that stream may still read it.
//
// On the CPU the same op computes the weight gradient inline (no stream) and still parks it until
// the join: that is how the bookkeeping is tested without a GPU. If the batch is gone when the
// backward runs (the caller dropped its scope without joining), the weight gradient is returned to
// autograd like any other gradient.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "ffi_util.h"

#ifdef CROSSCLR_SHIM_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

// One parked weight gradient: `dw` is to be added to `w.grad`.
struct Parked {
  at::Tensor w, dw;
};

// The weight gradients parked by one scope of the caller, until it joins.
struct WgradBatch {
  std::mutex m;
  std::vector<Parked> parked;
};

// Live batches by id (ids are never reused). The backward looks its batch up by the id saved at
// forward time, so a batch freed early is detected instead of dereferenced.
std::mutex g_batches_m;
std::map<int64_t, std::shared_ptr<WgradBatch>> g_batches;
int64_t g_next_id = 1;

std::shared_ptr<WgradBatch> find_batch(int64_t id) {
  std::lock_guard<std::mutex> lock(g_batches_m);
  auto it = g_batches.find(id);
  return it == g_batches.end() ? nullptr : it->second;
}

#ifdef CROSSCLR_SHIM_CUDA
// The weight-gradient stream of a CUDA device (one per device, taken from libtorch's pool at first
// use; the first use is in an eager step, never inside a capture, because a capture is preceded by
// warm-up steps).
c10::cuda::CUDAStream wgrad_stream(c10::DeviceIndex device) {
  static std::mutex m;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  std::lock_guard<std::mutex> lock(m);
  auto it = streams.find(device);
  if (it == streams.end()) {
    it = streams.emplace(device, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device)).first;
  }
  return it->second;
}

// `waiter` waits (on the device) for the work queued so far on `done`.
void wait_for(const c10::cuda::CUDAStream &waiter, const c10::cuda::CUDAStream &done) {
  if (waiter == done) return;
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(done.unwrap());
  ev.block(waiter.unwrap());
}

void record_on(const at::Tensor &t, const c10::cuda::CUDAStream &s) {
  if (t.defined() && t.is_cuda() && t.has_storage() && t.storage().data() != nullptr) {
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), s);
  }
}
#endif

struct ConvGeometry {
  std::vector<int64_t> stride, padding;
};

ConvGeometry geometry(int64_t stride, int64_t pad) { return {{1, stride, 1}, {0, pad, 0}}; }

class TemporalConv : public torch::autograd::Function<TemporalConv> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const at::Tensor &b, int64_t stride, int64_t pad, int64_t batch_id) {
    const ConvGeometry g = geometry(stride, pad);
    at::Tensor y = at::convolution(x, w.unsqueeze(2), b, g.stride, g.padding, {1, 1, 1}, false, {0, 0, 0}, 1);
    ctx->save_for_backward({x});
    ctx->saved_data["w"] = w;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["pad"] = pad;
    ctx->saved_data["batch"] = batch_id;
    ctx->saved_data["c_out"] = w.size(0);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const at::Tensor w = ctx->saved_data["w"].toTensor();
    const ConvGeometry g = geometry(ctx->saved_data["stride"].toInt(), ctx->saved_data["pad"].toInt());
    const int64_t c_out = ctx->saved_data["c_out"].toInt();
    const at::Tensor &dy = grad_outputs[0];
    if (!dy.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor w5 = w.unsqueeze(2);
    auto conv_backward = [&](std::array<bool, 3> mask) {
      return at::convolution_backward(dy, x, w5, at::OptionalIntArrayRef(c_out), g.stride, g.padding, {1, 1, 1},
                                      false, {0, 0, 0}, 1, mask);
    };
    // Input and bias gradients: on the node's stream, as usual.
    auto [dx, unused, db] = conv_backward({ctx->needs_input_grad(0), false, ctx->needs_input_grad(2)});
    (void)unused;
    if (!ctx->needs_input_grad(1)) return {dx, at::Tensor(), db, at::Tensor(), at::Tensor(), at::Tensor()};
    auto batch = find_batch(ctx->saved_data["batch"].toInt());
    at::Tensor dw;
#ifdef CROSSCLR_SHIM_CUDA
    if (batch != nullptr && x.is_cuda()) {
      const c10::DeviceIndex dev = x.device().index();
      const c10::cuda::CUDAStream node = c10::cuda::getCurrentCUDAStream(dev);
      const c10::cuda::CUDAStream side = wgrad_stream(dev);
      wait_for(side, node);
      // (c10::cuda::CUDAStreamGuard would pull CUDA runtime symbols into the shim, which links
      // only libtorch; set and restore the current stream by hand instead.)
      c10::cuda::setCurrentCUDAStream(side);
      try {
        dw = std::get<1>(conv_backward({false, true, false}));
      } catch (...) {
        c10::cuda::setCurrentCUDAStream(node);
        throw;
      }
      c10::cuda::setCurrentCUDAStream(node);
      record_on(dy, side);
      record_on(x, side);
    }
#endif
    if (!dw.defined()) dw = std::get<1>(conv_backward({false, true, false}));
    dw = dw.view(w.sizes());
    if (batch == nullptr) return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor()};
    {
      std::lock_guard<std::mutex> lock(batch->m);
      batch->parked.push_back({w, dw});
    }
    return {dx, at::Tensor(), db, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// A new, empty batch; its id in `*id`.
int crossclr_wgrad_batch_new(int64_t *id, char **err) {
  return crossclr::guarded(err, [&] {
    TORCH_CHECK(id != nullptr, "wgrad batch: null output pointer");
    std::lock_guard<std::mutex> lock(g_batches_m);
    *id = g_next_id++;
    g_batches.emplace(*id, std::make_shared<WgradBatch>());
  });
}

// Frees a batch; weight gradients still parked in it are dropped (the step failed before its join).
void crossclr_wgrad_batch_free(int64_t id) {
  try {
    std::lock_guard<std::mutex> lock(g_batches_m);
    g_batches.erase(id);
  } catch (...) {
  }
}

// Number of weight gradients parked in a batch (0 for an unknown id).
int64_t crossclr_wgrad_batch_parked(int64_t id) {
  auto batch = find_batch(id);
  if (batch == nullptr) return 0;
  std::lock_guard<std::mutex> lock(batch->m);
  return static_cast<int64_t>(batch->parked.size());
}

// Adds every parked weight gradient of the batch to its parameter's `.grad` (set when undefined)
// and empties the batch. On CUDA the caller's current stream first waits for the weight-gradient
// stream of each device involved.
int crossclr_wgrad_join(int64_t id, char **err) {
  return crossclr::guarded(err, [&] {
    auto batch = find_batch(id);
    TORCH_CHECK(batch != nullptr, "wgrad join: unknown batch ", id);
    std::vector<Parked> parked;
    {
      std::lock_guard<std::mutex> lock(batch->m);
      parked.swap(batch->parked);
    }
#ifdef CROSSCLR_SHIM_CUDA
    std::vector<c10::DeviceIndex> joined;
    for (const Parked &p : parked) {
      if (!p.dw.is_cuda()) continue;
      const c10::DeviceIndex dev = p.dw.device().index();
      const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(dev);
      if (std::find(joined.begin(), joined.end(), dev) == joined.end()) {
        c10::DeviceGuard guard(p.dw.device());
        wait_for(current, wgrad_stream(dev));
        joined.push_back(dev);
      }
      record_on(p.dw, current);
    }
#endif
    at::NoGradGuard no_grad;
    for (Parked &p : parked) {
      at::Tensor &grad = p.w.mutable_grad();
      if (grad.defined()) {
        grad.add_(p.dw);
      } else {
        grad = p.dw;
      }
    }
  });
}

// y = TemporalConv(x, w, b) with its weight gradient parked in batch `batch_id` (see the top of the
// file). x (1, C_in, R, T, V) float, w (C_out, C_in, kt, 1), b (C_out,), all on one device; stride
// and padding along T. `*out` receives a new at::Tensor* owned by the caller.
int crossclr_temporal_conv(void *x, void *w, void *b, int64_t stride, int64_t pad, int64_t batch_id, void **out,
                           char **err) {
  return crossclr::guarded(err, [&] {
    const char *op = "temporal convolution";
    TORCH_CHECK(out != nullptr, op, ": null output pointer");
    const at::Tensor &xt = crossclr::borrow_tensor(x, op, "input");
    const at::Tensor &wt = crossclr::borrow_tensor(w, op, "weight");
    // A null bias: none (folded into the following batch norm by the caller).
    const at::Tensor bt = b == nullptr ? at::Tensor() : crossclr::borrow_tensor(b, op, "bias");
    TORCH_CHECK(xt.dim() == 5 && xt.size(0) == 1, op, ": the input must be (1, C_in, R, T, V), got ", xt.sizes());
    TORCH_CHECK(wt.dim() == 4 && wt.size(1) == xt.size(1) && wt.size(3) == 1, op, ": the weight must be (C_out, ",
                xt.size(1), ", kt, 1), got ", wt.sizes());
    TORCH_CHECK(!bt.defined() || (bt.dim() == 1 && bt.size(0) == wt.size(0)), op, ": the bias must be (",
                wt.size(0), ",), got ", bt.defined() ? bt.sizes() : at::IntArrayRef{});
    TORCH_CHECK(wt.device() == xt.device() && (!bt.defined() || bt.device() == xt.device()), op,
                ": input, weight and bias must be on one device");
    TORCH_CHECK(stride >= 1 && pad >= 0, op, ": stride ", stride, " / padding ", pad);
    TORCH_CHECK(find_batch(batch_id) != nullptr, op, ": unknown weight-gradient batch ", batch_id);
    *out = new at::Tensor(TemporalConv::apply(xt, wt, bt, stride, pad, batch_id));
  });
}

}  // extern "C"
