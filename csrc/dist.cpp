// Collectives of libtorch's own c10d for data-parallel training: a Gloo process group (or, when
// built with NCCL, an NCCL one for CUDA tensors) over a FileStore or a TCPStore (torchrun's
// rendezvous), the few collectives the training step needs
// (broadcast, all-reduce SUM, all-gather into one flat tensor, barrier), and SyncBatchNorm (a
// custom autograd function whose forward gathers the batch statistics of every rank and whose
// backward all-reduces the gradient terms). Built only when the Gloo headers are found (Debian's
// libgloo-dev; the torch wheel ships the Gloo library inside libtorch_cpu but not its headers);
// see build.rs and src/dist.rs.
//
// Every rank beats a heartbeat into the store (a counter `alive/<rank>`, once a second, from a
// thread of its own). When a collective fails (a peer closed its connection, or the timeout), the
// error names the ranks whose heartbeat stopped: the dead or stopped ones, not only this rank.
#include "ffi_util.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef CROSSCLR_DIST_NCCL
// NCCL (GPU collectives): built when build.rs finds the CUDA runtime headers and the wheel's NCCL
// headers (site-packages/nvidia/nccl/include) and the file compiles with them.
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstdlib>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr auto kBeat = std::chrono::milliseconds(1000);
// How long a failed collective watches the heartbeats before naming the silent ranks.
constexpr auto kProbe = std::chrono::milliseconds(3500);

// The process group, its store and the heartbeat thread. Reference counted: the Rust side holds
// one reference, and every SyncBatchNorm node of a live autograd graph one more (its backward
// needs the group).
struct Group : torch::CustomClassHolder {
  c10::intrusive_ptr<c10d::Store> store;
  // ProcessGroupGloo or ProcessGroupNCCL (the collectives used here are virtual on Backend).
  c10::intrusive_ptr<c10d::Backend> pg;
  int rank = 0;
  int world = 1;
  std::thread beat;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;

  static std::string alive_key(int r) { return "alive/" + std::to_string(r); }
  static std::string done_key(int r) { return "done/" + std::to_string(r); }

  void start_heartbeat() {
    beat = std::thread([this] {
      std::unique_lock<std::mutex> lock(mu);
      while (!stop) {
        lock.unlock();
        try {
          store->add(alive_key(rank), 1);
        } catch (...) {
          // The store is gone (its host died): nothing to report to; the failing collective
          // says so.
        }
        lock.lock();
        cv.wait_for(lock, kBeat, [this] { return stop; });
      }
    });
  }

  ~Group() override {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    if (beat.joinable()) beat.join();
    try {
      store->set(done_key(rank), std::vector<uint8_t>{1});
    } catch (...) {
    }
  }

  // Which other ranks stopped beating (watched for kProbe), as a sentence for an error message.
  std::string diagnose() {
    std::ostringstream out;
    try {
      std::vector<int64_t> before(world);
      for (int r = 0; r < world; ++r) before[r] = store->add(alive_key(r), 0);
      std::this_thread::sleep_for(kProbe);
      std::vector<int> silent, left;
      for (int r = 0; r < world; ++r) {
        if (r == rank) continue;
        if (store->check({done_key(r)})) {
          left.push_back(r);
        } else if (store->add(alive_key(r), 0) == before[r]) {
          silent.push_back(r);
        }
      }
      auto list = [](const std::vector<int> &rs) {
        std::ostringstream s;
        for (size_t i = 0; i < rs.size(); ++i) s << (i == 0 ? "" : ", ") << rs[i];
        return s.str();
      };
      if (!silent.empty()) {
        out << "; rank " << list(silent) << " of " << world << " stopped answering (no heartbeat for "
            << kProbe.count() / 1000.0 << " s: it died, was killed or is stopped)";
      }
      if (!left.empty()) out << "; rank " << list(left) << " of " << world << " already left the group";
      if (silent.empty() && left.empty()) {
        out << "; every other rank still beats its heartbeat (a rank hangs elsewhere, or the ranks "
               "disagree on the order of the collectives)";
      }
    } catch (const std::exception &e) {
      out << "; the rendezvous store is unreachable too (" << e.what()
          << "): its host (rank 0, or torchrun's agent) has probably died";
    }
    return out.str();
  }

  // Runs one collective; a failure is rethrown with the silent ranks named.
  template <typename F>
  void run(F &&body) {
    std::string msg;
    try {
      body();
      return;
    } catch (const c10::Error &e) {
      msg = e.what_without_backtrace();
    } catch (const std::exception &e) {
      msg = e.what();
    }
    TORCH_CHECK(false, msg, diagnose());
  }
};

Group *group(void *p, const char *op) {
  TORCH_CHECK(p != nullptr, op, ": null process group");
  return static_cast<Group *>(p);
}

// Every dimension but the channel dimension 1.
std::vector<int64_t> reduce_dims(const at::Tensor &x) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d != 1) dims.push_back(d);
  return dims;
}

// (C,) -> (1, C, 1, ...) for x's rank.
at::Tensor per_channel(const at::Tensor &t, const at::Tensor &x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return t.view(shape);
}

// SyncBatchNorm in training mode, as torch.nn.SyncBatchNorm: the statistics are those of the
// global batch (every rank's x); the running statistics move with the global mean and the
// unbiased global variance; backward all-reduces sum(dy) and sum(dy * (x - mean)) (one buffer)
// and returns the input gradient of the global batch norm; the weight and bias gradients are this
// rank's own terms (the caller averages the parameter gradients over the ranks, as DDP does).
struct SyncBn : public torch::autograd::Function<SyncBn> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const at::Tensor &b, Group *g, at::Tensor running_mean, at::Tensor running_var,
                            double momentum, double eps) {
    const int64_t c = x.size(1);
    const auto dims = reduce_dims(x);
    const double n = static_cast<double>(x.numel() / std::max<int64_t>(c, 1));
    // This rank's (mean, M2, count), in double, gathered from every rank and merged (Chan et al.).
    auto vm = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
    auto mean_l = std::get<1>(vm).to(at::kDouble);
    auto m2_l = std::get<0>(vm).to(at::kDouble) * n;
    auto local = at::cat({mean_l, m2_l, at::full({1}, n, mean_l.options())}).view({1, 2 * c + 1}).contiguous();
    auto all = at::empty({g->world, 2 * c + 1}, local.options());
    g->run([&] { g->pg->_allgather_base(all, local)->wait(); });
    auto means = all.narrow(1, 0, c);
    auto m2s = all.narrow(1, c, c);
    auto counts = all.narrow(1, 2 * c, 1);
    const double total = counts.sum().item<double>();
    TORCH_CHECK(total > 1, "sync batch norm: a global batch of ", total, " value(s) per channel has no variance");
    auto mean = (means * counts).sum(0) / total;
    auto m2 = (m2s + counts * (means - mean).square()).sum(0);
    auto invstd = (m2 / total + eps).rsqrt();
    {
      at::NoGradGuard no_grad;
      running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1.0 - momentum).add_((m2 / (total - 1)).to(running_var.scalar_type()), momentum);
    }
    auto mean_x = mean.to(x.scalar_type());
    auto invstd_x = invstd.to(x.scalar_type());
    auto y = (x - per_channel(mean_x, x)) * per_channel(invstd_x * w, x) + per_channel(b, x);
    ctx->save_for_backward({x, w, mean_x, invstd_x});
    ctx->saved_data["total"] = total;
    ctx->saved_data["group"] = c10::IValue::make_capsule(c10::intrusive_ptr<Group>::reclaim_copy(g));
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0];
    const auto &w = saved[1];
    const auto &mean = saved[2];
    const auto &invstd = saved[3];
    const double total = ctx->saved_data["total"].toDouble();
    auto g = c10::static_intrusive_pointer_cast<Group>(ctx->saved_data["group"].toCapsule());
    at::Tensor dy = grads[0];
    const auto dims = reduce_dims(x);
    const int64_t c = x.size(1);
    auto xmu = x - per_channel(mean, x);
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xmu = (dy * xmu).sum(dims);
    at::Tensor dx;
    // Every rank has the same graph, so every rank takes this branch or none (no lone collective).
    if (ctx->needs_input_grad(0)) {
      auto buf = at::cat({sum_dy, sum_dy_xmu}).to(at::kDouble).contiguous();
      std::vector<at::Tensor> ts{buf};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      g->run([&] { g->pg->allreduce(ts, o)->wait(); });
      auto mean_dy = (buf.narrow(0, 0, c) / total).to(x.scalar_type());
      auto mean_dy_xmu = (buf.narrow(0, c, c) / total).to(x.scalar_type());
      dx = (dy - per_channel(mean_dy, x) - xmu * per_channel(invstd * invstd * mean_dy_xmu, x)) *
           per_channel(invstd * w, x);
    }
    return {dx, sum_dy_xmu * invstd, sum_dy, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Gradient all-reduce overlapped with backward, as DDP's reducer does it on c10d: the parameters
// are packed into buckets of about `cap` bytes in reverse order (backward produces the gradients
// of the last layers first); a hook on every parameter copies its gradient into its bucket's flat
// buffer as soon as autograd has it (a leaf's hooks run once per backward, on the summed
// gradient), and a bucket whose gradients are all in starts its all-reduce (SUM, asynchronous,
// c10d Work) while backward goes on. Buckets start strictly in bucket order, so every rank issues
// the same collectives in the same order. `finish` (after backward) starts the buckets still
// waiting (parameters without a gradient this pass contribute zeros and get none), waits for all,
// and writes each averaged slice into its parameter's `.grad`. Hooks do nothing unless the
// bucketer was armed for this backward (any other backward through the parameters is left alone).
struct GradBuckets {
  c10::intrusive_ptr<Group> group;
  std::vector<at::Tensor> params;
  std::vector<unsigned> hook_ids;
  std::vector<std::vector<size_t>> members;  // parameter indices per bucket
  std::vector<at::Tensor> flats;             // one flat buffer per bucket
  std::vector<size_t> bucket_of;             // per parameter
  std::vector<int64_t> offset_of;            // per parameter, in its bucket
  std::vector<size_t> pending;               // per bucket: gradients still to come this pass
  std::vector<char> arrived;                 // per parameter, this pass
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;  // next bucket to start
  bool armed = false;
  std::mutex mu;

  void reset_pass() {
    for (size_t b = 0; b < members.size(); ++b) pending[b] = members[b].size();
    std::fill(arrived.begin(), arrived.end(), 0);
    works.clear();
    next = 0;
  }

  // Starts every bucket that is complete, in order (caller holds `mu`).
  void start_ready() {
    while (next < flats.size() && pending[next] == 0) {
      std::vector<at::Tensor> ts{flats[next]};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      works.push_back(group->pg->allreduce(ts, o));
      ++next;
    }
  }

  void on_grad(size_t i, const at::Tensor &grad) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || arrived[i]) return;
    arrived[i] = 1;
    const size_t b = bucket_of[i];
    at::NoGradGuard no_grad;
    flats[b].narrow(0, offset_of[i], grad.numel()).copy_(grad.reshape({-1}));
    --pending[b];
    start_ready();
  }

  void finish() {
    std::lock_guard<std::mutex> lock(mu);
    TORCH_CHECK(armed, "gradient buckets: finish without arm");
    armed = false;
    at::NoGradGuard no_grad;
    for (size_t b = next; b < flats.size(); ++b) {
      if (pending[b] == 0) continue;
      for (size_t i : members[b])
        if (!arrived[i]) flats[b].narrow(0, offset_of[i], params[i].numel()).zero_();
      pending[b] = 0;
    }
    group->run([&] {
      start_ready();
      for (auto &w : works) w->wait();
    });
    const double world = static_cast<double>(group->world);
    for (size_t b = 0; b < flats.size(); ++b) {
      flats[b].div_(world);
      for (size_t i : members[b]) {
        if (!arrived[i]) continue;
        at::Tensor g = params[i].grad();
        TORCH_CHECK(g.defined(), "gradient buckets: parameter ", i, " had a gradient in backward but has no .grad");
        g.copy_(flats[b].narrow(0, offset_of[i], g.numel()).view(g.sizes()));
      }
    }
    works.clear();
  }
};

}  // namespace

namespace {

// The rendezvous store, prefixed: a FileStore at `file` when it is non-null, else a TCPStore at
// host:port (this process hosts it when `host_store` is non-zero: rank 0 without a torchrun agent).
c10::intrusive_ptr<c10d::Store> open_store(const char *file, const char *host, int port, int host_store, int world,
                                           std::chrono::milliseconds timeout, const char *op) {
  c10::intrusive_ptr<c10d::Store> store;
  if (file != nullptr) {
    store = c10::make_intrusive<c10d::FileStore>(std::string(file), world);
  } else {
    TORCH_CHECK(host != nullptr, op, ": no FileStore path and no TCPStore host");
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = host_store != 0;
    o.numWorkers = world;
    o.waitWorkers = false;
    o.timeout = timeout;
    store = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
  }
  store->setTimeout(timeout);
  return c10::make_intrusive<c10d::PrefixStore>("crossclr", store);
}

// The network device this rank's Gloo pairs bind to: the interface named by GLOO_SOCKET_IFNAME
// (torch's variable; the first of a comma-separated list) when set; the loopback address when the
// ranks meet over a FileStore or a loopback MASTER_ADDR (one machine); else this machine's
// hostname, resolved (several machines; as torch.distributed's default).
std::shared_ptr<::gloo::transport::Device> gloo_device(const char *master) {
  if (const char *ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname != '\0') {
    std::string first(ifname);
    first = first.substr(0, first.find(','));
    return c10d::ProcessGroupGloo::createDeviceForInterface(first);
  }
  const std::string m = master != nullptr ? master : "127.0.0.1";
  if (m == "127.0.0.1" || m == "localhost" || m == "::1") {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

}  // namespace

extern "C" {

// 1 when this library was built with NCCL.
int crossclr_dist_has_nccl() {
#ifdef CROSSCLR_DIST_NCCL
  return 1;
#else
  return 0;
#endif
}

// A process group of `world` ranks, this one `rank`, meeting at the store of `open_store`:
// Gloo when `cuda_index` < 0; else NCCL for CUDA tensors on device `cuda_index` (made the current
// device and the group's bound device: one GPU per rank; the NCCL watchdog aborts a hung
// communicator). Collectives time out after `timeout_ms`.
int crossclr_dist_new(const char *file, const char *host, int port, int host_store, int rank, int world,
                      int cuda_index, int64_t timeout_ms, void **out, char **err) {
  return crossclr::guarded(err, [&] {
    TORCH_CHECK(out != nullptr, "crossclr_dist_new: null output pointer");
    TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " is not in a world of ", world);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Backend> pg;
    c10::intrusive_ptr<c10d::Store> store;
    if (cuda_index < 0) {
      store = open_store(file, host, port, host_store, world, timeout, "crossclr_dist_new");
      auto opts = c10d::ProcessGroupGloo::Options::create();
      opts->timeout = timeout;
      opts->devices.push_back(gloo_device(host));
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    } else {
#ifdef CROSSCLR_DIST_NCCL
      const int devices = static_cast<int>(c10::cuda::device_count());
      TORCH_CHECK(cuda_index < devices, "NCCL: CUDA device ", cuda_index, " does not exist (", devices,
                  " visible)");
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_index));
      store = open_store(file, host, port, host_store, world, timeout, "crossclr_dist_new");
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
      nccl->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_index)));
      pg = nccl;
#else
      TORCH_CHECK(false, "this binary was built without NCCL (build.rs found no CUDA runtime or NCCL headers); "
                         "use the Gloo backend (dist_backend: gloo)");
#endif
    }
    auto g = c10::make_intrusive<Group>();
    g->store = store;
    g->rank = rank;
    g->world = world;
    g->pg = pg;
    g->start_heartbeat();
    *out = g.release();
  });
}

// Drops the Rust side's reference (the group lives on while an autograd graph still needs it).
void crossclr_dist_free(void *p) {
  if (p != nullptr) c10::intrusive_ptr<Group>::reclaim(static_cast<Group *>(p));
}

// Broadcasts `t` (in place) from `root`.
int crossclr_dist_broadcast(void *p, void *t, int root, char **err) {
  return crossclr::guarded(err, [&] {
    auto *g = group(p, "broadcast");
    std::vector<at::Tensor> ts{crossclr::borrow_tensor(t, "broadcast", "tensor")};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    g->run([&] { g->pg->broadcast(ts, o)->wait(); });
  });
}

// Sums `t` over the ranks (in place).
int crossclr_dist_all_reduce_sum(void *p, void *t, char **err) {
  return crossclr::guarded(err, [&] {
    auto *g = group(p, "all_reduce");
    std::vector<at::Tensor> ts{crossclr::borrow_tensor(t, "all_reduce", "tensor")};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    g->run([&] { g->pg->allreduce(ts, o)->wait(); });
  });
}

// `out` (world · N, ...) receives every rank's `in` (N, ...), in rank order.
int crossclr_dist_all_gather(void *p, void *out, void *in, char **err) {
  return crossclr::guarded(err, [&] {
    auto *g = group(p, "all_gather");
    auto o = crossclr::borrow_tensor(out, "all_gather", "output");
    auto i = crossclr::borrow_tensor(in, "all_gather", "input");
    g->run([&] { g->pg->_allgather_base(o, i)->wait(); });
  });
}

int crossclr_dist_barrier(void *p, char **err) {
  return crossclr::guarded(err, [&] {
    auto *g = group(p, "barrier");
    g->run([&] { g->pg->barrier()->wait(); });
  });
}

// Training-mode SyncBatchNorm of `x` (N, C, ...) over the ranks (see SyncBn): a new tensor in
// `out`; `running_mean` / `running_var` (C,) are updated in place with the global statistics.
// The autograd node keeps the group alive until it is freed.
int crossclr_dist_sync_bn(void *p, void *x, void *w, void *b, void *running_mean, void *running_var, double momentum,
                          double eps, void **out, char **err) {
  return crossclr::guarded(err, [&] {
    const char *op = "sync batch norm";
    auto *g = group(p, op);
    TORCH_CHECK(out != nullptr, op, ": null output pointer");
    const auto &xt = crossclr::borrow_tensor(x, op, "input");
    TORCH_CHECK(xt.dim() >= 2, op, ": the input must have rank >= 2, got ", xt.sizes());
    const auto &wt = crossclr::borrow_tensor(w, op, "weight");
    const auto &bt = crossclr::borrow_tensor(b, op, "bias");
    const auto &rm = crossclr::borrow_tensor(running_mean, op, "running_mean");
    const auto &rv = crossclr::borrow_tensor(running_var, op, "running_var");
    const int64_t c = xt.size(1);
    for (const auto *t : {&wt, &bt, &rm, &rv})
      TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": parameters and running statistics must be (", c,
                  ",), got ", t->sizes());
    auto y = SyncBn::apply(xt, wt, bt, g, rm, rv, momentum, eps);
    *out = new at::Tensor(std::move(y));
  });
}


// A gradient bucketer (GradBuckets) over `n` parameters `params` (tch tensor pointers, leaves
// that require grad, in optimiser order), buckets of about `cap_bytes` (at least one parameter
// each; one dtype and device per bucket). Freed with crossclr_dist_buckets_free, which removes
// the hooks.
int crossclr_dist_buckets_new(void *p, void **params, int64_t n, int64_t cap_bytes, void **out, char **err) {
  return crossclr::guarded(err, [&] {
    const char *op = "gradient buckets";
    auto *g = group(p, op);
    TORCH_CHECK(out != nullptr && (params != nullptr || n == 0), op, ": null pointer");
    auto gb = std::make_unique<GradBuckets>();
    gb->group = c10::intrusive_ptr<Group>::reclaim_copy(g);
    for (int64_t i = 0; i < n; ++i) {
      const auto &t = crossclr::borrow_tensor(params[i], op, "parameter");
      TORCH_CHECK(t.requires_grad() && t.is_leaf(), op, ": parameter ", i, " is not a leaf that requires grad");
      gb->params.push_back(t);
    }
    // Reverse order; a new bucket when the cap is reached or the dtype / device changes.
    std::vector<int64_t> bytes;
    for (int64_t k = n - 1; k >= 0; --k) {
      const auto &t = gb->params[k];
      const int64_t sz = t.numel() * static_cast<int64_t>(t.element_size());
      bool fresh = gb->members.empty() || bytes.back() >= cap_bytes;
      if (!fresh) {
        const auto &first = gb->params[gb->members.back().front()];
        fresh = first.scalar_type() != t.scalar_type() || first.device() != t.device();
      }
      if (fresh) {
        gb->members.emplace_back();
        bytes.push_back(0);
      }
      gb->members.back().push_back(static_cast<size_t>(k));
      bytes.back() += sz;
    }
    gb->bucket_of.resize(n);
    gb->offset_of.resize(n);
    for (size_t b = 0; b < gb->members.size(); ++b) {
      int64_t off = 0;
      for (size_t i : gb->members[b]) {
        gb->bucket_of[i] = b;
        gb->offset_of[i] = off;
        off += gb->params[i].numel();
      }
      const auto &first = gb->params[gb->members[b].front()];
      gb->flats.push_back(at::zeros({off}, first.options().requires_grad(false)));
    }
    gb->pending.resize(gb->members.size());
    gb->arrived.resize(n);
    gb->reset_pass();
    GradBuckets *raw = gb.get();
    for (int64_t i = 0; i < n; ++i) {
      const size_t idx = static_cast<size_t>(i);
      gb->hook_ids.push_back(gb->params[i].register_hook([raw, idx](const at::TensorBase &grad) {
        raw->on_grad(idx, at::Tensor(grad));
      }));
    }
    *out = gb.release();
  });
}

// How many buckets `b` has.
int64_t crossclr_dist_buckets_count(void *b) {
  return b == nullptr ? 0 : static_cast<int64_t>(static_cast<GradBuckets *>(b)->flats.size());
}

// Arms the hooks for the next backward.
int crossclr_dist_buckets_arm(void *b, char **err) {
  return crossclr::guarded(err, [&] {
    TORCH_CHECK(b != nullptr, "gradient buckets: null pointer");
    auto *gb = static_cast<GradBuckets *>(b);
    std::lock_guard<std::mutex> lock(gb->mu);
    if (gb->armed) {
      // A previous pass failed between arm and finish: drain what it started.
      for (auto &w : gb->works) {
        try {
          w->wait();
        } catch (...) {
        }
      }
    }
    gb->reset_pass();
    gb->armed = true;
  });
}

// After backward: every bucket all-reduced, averaged, written into the parameters' `.grad`.
int crossclr_dist_buckets_finish(void *b, char **err) {
  return crossclr::guarded(err, [&] {
    TORCH_CHECK(b != nullptr, "gradient buckets: null pointer");
    static_cast<GradBuckets *>(b)->finish();
  });
}

void crossclr_dist_buckets_free(void *b) {
  if (b == nullptr) return;
  std::unique_ptr<GradBuckets> gb(static_cast<GradBuckets *>(b));
  for (size_t i = 0; i < gb->hook_ids.size(); ++i) gb->params[i].remove_hook(gb->hook_ids[i]);
  for (auto &w : gb->works) {
    try {
      w->wait();
    } catch (...) {
    }
  }
}

}  // extern "C"
