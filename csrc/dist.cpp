// Collectives of libtorch's own c10d for data-parallel training: a Gloo process group over a
// FileStore or a TCPStore (torchrun's rendezvous), and the few collectives the training step needs
// (broadcast, all-reduce SUM, all-gather into one flat tensor, barrier). Built only when the Gloo
// headers are found (Debian's libgloo-dev; the torch wheel ships the Gloo library inside
// libtorch_cpu but not its headers); see build.rs and src/dist.rs.
#include "ffi_util.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

Group *group(void *p, const char *op) {
  TORCH_CHECK(p != nullptr, op, ": null process group");
  return static_cast<Group *>(p);
}

}  // namespace

extern "C" {

// A Gloo process group of `world` ranks, this one `rank`. Rendezvous: a FileStore at `file`
// when it is non-null, else a TCPStore at host:port (this process hosts it when `host_store` is
// non-zero: rank 0 without a torchrun agent). Collectives time out after `timeout_ms`.
int crossclr_dist_new_gloo(const char *file, const char *host, int port, int host_store, int rank, int world,
                           int64_t timeout_ms, void **out, char **err) {
  return crossclr::guarded(err, [&] {
    TORCH_CHECK(out != nullptr, "crossclr_dist_new_gloo: null output pointer");
    TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " is not in a world of ", world);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> store;
    if (file != nullptr) {
      store = c10::make_intrusive<c10d::FileStore>(std::string(file), world);
    } else {
      TORCH_CHECK(host != nullptr, "crossclr_dist_new_gloo: no FileStore path and no TCPStore host");
      c10d::TCPStoreOptions o;
      o.port = static_cast<uint16_t>(port);
      o.isServer = host_store != 0;
      o.numWorkers = world;
      o.waitWorkers = false;
      o.timeout = timeout;
      store = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    }
    store->setTimeout(timeout);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("crossclr", store);
    auto opts = c10d::ProcessGroupGloo::Options::create();
    opts->timeout = timeout;
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host != nullptr ? host : "127.0.0.1"));
    auto g = new Group{c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, opts)};
    *out = g;
  });
}

void crossclr_dist_free(void *p) { delete static_cast<Group *>(p); }

// Broadcasts `t` (in place) from `root`.
int crossclr_dist_broadcast(void *p, void *t, int root, char **err) {
  return crossclr::guarded(err, [&] {
    auto *g = group(p, "broadcast");
    std::vector<at::Tensor> ts{crossclr::borrow_tensor(t, "broadcast", "tensor")};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    g->pg->broadcast(ts, o)->wait();
  });
}

// Sums `t` over the ranks (in place).
int crossclr_dist_all_reduce_sum(void *p, void *t, char **err) {
  return crossclr::guarded(err, [&] {
    auto *g = group(p, "all_reduce");
    std::vector<at::Tensor> ts{crossclr::borrow_tensor(t, "all_reduce", "tensor")};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    g->pg->allreduce(ts, o)->wait();
  });
}

// `out` (world · N, ...) receives every rank's `in` (N, ...), in rank order.
int crossclr_dist_all_gather(void *p, void *out, void *in, char **err) {
  return crossclr::guarded(err, [&] {
    auto *g = group(p, "all_gather");
    auto o = crossclr::borrow_tensor(out, "all_gather", "output");
    auto i = crossclr::borrow_tensor(in, "all_gather", "input");
    g->pg->_allgather_base(o, i)->wait();
  });
}

int crossclr_dist_barrier(void *p, char **err) {
  return crossclr::guarded(err, [&] { group(p, "barrier")->pg->barrier()->wait(); });
}

}  // extern "C"
