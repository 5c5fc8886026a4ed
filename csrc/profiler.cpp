// Profiler entry points (libtorch's Kineto profiler) for `crossclr bench --profile`; the safe Rust
// wrapper is src/gpu/profiler.rs.
//
// Contract (same as csrc/shim.h): every entry point that can fail returns 0 on success and non-zero
// on failure, with a malloc'd NUL-terminated message in `*err` (freed with crossclr_shim_free). No
// C++ exception crosses this boundary. The profiler is process-wide: one session at a time, started
// and stopped on the same thread (libtorch keeps the profiler state in thread-local debug info, which
// autograd's worker threads inherit).
//
// crossclr_profiler_stop returns an aggregated table as text, one row per (device, kind, name):
//   device \t kind \t calls \t total_ns \t self_ns \t device_ns \t name \n
// * device: "cpu", "cuda", ... (c10::DeviceTypeName, lower case);
// * kind: "op" (ATen op / RecordFunction), "kernel", "memcpy", "memset", "runtime" (CUDA runtime
//   call such as cudaLaunchKernel), "driver", "sync", "annotation", "other";
// * total_ns: summed durations; self_ns: for non-async CPU events, total minus the time of the
//   events nested in them on the same thread (like key_averages' self CPU time), else = total_ns;
// * device_ns: for CPU ops, the summed duration of the device work (kernels, copies, memsets) that
//   the op launched itself (key_averages' self device time); 0 otherwise;
// * name: tabs and line breaks replaced by spaces (CUDA kernel names are long template names).
#include <ATen/Context.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <kineto/ActivityType.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include "ffi_util.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

namespace tap = torch::autograd::profiler;

using crossclr::guarded;

// The one profiling session of the process (Kineto's activity profiler is a process-wide singleton).
struct Session {
  std::mutex mutex;
  bool active = false;
  bool cuda = false;
  std::thread::id owner;
};

Session &session() {
  static Session s;
  return s;
}

const char *kind_of(uint8_t activity) {
  using K = libkineto::ActivityType;
  switch (static_cast<K>(activity)) {
    case K::CPU_OP:
      return "op";
    case K::CONCURRENT_KERNEL:
      return "kernel";
    case K::GPU_MEMCPY:
      return "memcpy";
    case K::GPU_MEMSET:
      return "memset";
    case K::CUDA_RUNTIME:
      return "runtime";
    case K::CUDA_DRIVER:
      return "driver";
    case K::CUDA_SYNC:
      return "sync";
    case K::USER_ANNOTATION:
    case K::GPU_USER_ANNOTATION:
      return "annotation";
    default:
      return "other";
  }
}

// Kernels, copies and memsets: the device's work (sync spans and GPU annotations would count it twice).
bool is_device_work(const char *kind) {
  return std::strcmp(kind, "kernel") == 0 || std::strcmp(kind, "memcpy") == 0 || std::strcmp(kind, "memset") == 0;
}

std::string clean_name(std::string name) {
  for (char &c : name) {
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  }
  return name.empty() ? std::string("(unnamed)") : name;
}

struct Event {
  std::string name;
  std::string device;
  const char *kind;
  uint64_t start;
  uint64_t end;
  uint64_t thread;
  uint64_t correlation;
  uint64_t linked;
  bool nestable;  // a synchronous CPU event: takes part in the self-time computation
  uint64_t children_ns = 0;
  uint64_t launched_ns = 0;  // device time of the events this CPU op launched itself
  uint64_t duration() const { return end > start ? end - start : 0; }
};

// Subtracts from each synchronous CPU event the time of its direct children on the same thread.
void nest(std::vector<Event> &events) {
  std::map<uint64_t, std::vector<size_t>> by_thread;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].nestable) by_thread[events[i].thread].push_back(i);
  }
  for (auto &entry : by_thread) {
    auto &idx = entry.second;
    // Parents first: earlier start, and on a tie the longer event.
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
      if (events[a].start != events[b].start) return events[a].start < events[b].start;
      return events[a].end > events[b].end;
    });
    std::vector<size_t> stack;
    for (size_t i : idx) {
      Event &ev = events[i];
      while (!stack.empty() && !(events[stack.back()].end >= ev.end && events[stack.back()].start <= ev.start)) {
        stack.pop_back();
      }
      if (!stack.empty()) events[stack.back()].children_ns += ev.duration();
      stack.push_back(i);
    }
  }
}

std::string aggregate(const tap::ProfilerResult &result) {
  std::vector<Event> events;
  events.reserve(result.events().size());
  for (const auto &e : result.events()) {
    if (e.isHiddenEvent()) continue;
    std::string name = e.name();
    // Memory records are instants, not work.
    if (name == "[memory]" || name == "[OutOfMemory]") continue;
    Event ev;
    ev.name = clean_name(std::move(name));
    ev.device = c10::DeviceTypeName(e.deviceType(), /*lower_case=*/true);
    ev.kind = kind_of(e.activityType());
    ev.start = e.startNs();
    ev.end = std::max(e.endNs(), e.startNs());
    ev.thread = e.startThreadId();
    ev.correlation = e.correlationId();
    ev.linked = e.linkedCorrelationId();
    ev.nestable = e.deviceType() == c10::DeviceType::CPU && !e.isAsync() && e.startThreadId() == e.endThreadId();
    events.push_back(std::move(ev));
  }
  // CPU ops are the events without a linked correlation; device events and runtime calls link to
  // the op that issued them (as torch.autograd.profiler's _parse_kineto_results pairs them).
  std::unordered_map<uint64_t, size_t> op_of;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].device == "cpu" && events[i].linked == 0) op_of.emplace(events[i].correlation, i);
  }
  for (auto &ev : events) {
    if (ev.linked == 0) continue;
    auto it = op_of.find(ev.linked);
    if (it == op_of.end()) continue;
    if (ev.device == "cpu") {
      // Runtime calls (cudaLaunchKernel) run inside their op: count them on the op's thread.
      ev.thread = events[it->second].thread;
    } else if (is_device_work(ev.kind)) {
      events[it->second].launched_ns += ev.duration();
    }
  }
  nest(events);

  struct Row {
    uint64_t calls = 0, total = 0, self = 0, device = 0;
  };
  std::map<std::tuple<std::string, std::string, std::string>, Row> rows;
  for (const auto &ev : events) {
    Row &r = rows[std::make_tuple(ev.device, std::string(ev.kind), ev.name)];
    uint64_t d = ev.duration();
    r.calls += 1;
    r.total += d;
    r.self += ev.nestable ? d - std::min(d, ev.children_ns) : d;
    r.device += ev.launched_ns;
  }
  std::ostringstream out;
  for (const auto &entry : rows) {
    const Row &r = entry.second;
    out << std::get<0>(entry.first) << '\t' << std::get<1>(entry.first) << '\t' << r.calls << '\t' << r.total
        << '\t' << r.self << '\t' << r.device << '\t' << std::get<2>(entry.first) << '\n';
  }
  return out.str();
}

}  // namespace

extern "C" {

// 1 while a profiling session started by crossclr_profiler_start is running.
int crossclr_profiler_active(void) {
  Session &s = session();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.active ? 1 : 0;
}

// Starts the Kineto profiler on the calling thread: CPU ops, and with `cuda` != 0 also CUDA kernels,
// copies, memsets and runtime calls (through CUPTI). Fails if a session is already running or if
// CUDA is asked for without a CUDA device.
int crossclr_profiler_start(int cuda, char **err) {
  return guarded(err, [&] {
    Session &s = session();
    std::lock_guard<std::mutex> lock(s.mutex);
    TORCH_CHECK(!s.active, "the profiler is already running (stop it before starting it again)");
    TORCH_CHECK(!tap::profilerEnabled(), "a libtorch profiler is already enabled on this thread");
    TORCH_CHECK(cuda == 0 || at::hasCUDA(), "CUDA activities were requested but libtorch sees no CUDA device");
    tap::ProfilerConfig config(tap::ProfilerState::KINETO);
    std::set<tap::ActivityType> activities{tap::ActivityType::CPU};
    if (cuda != 0) activities.insert(tap::ActivityType::CUDA);
    tap::prepareProfiler(config, activities);
    tap::enableProfiler(config, activities);
    s.active = true;
    s.cuda = cuda != 0;
    s.owner = std::this_thread::get_id();
  });
}

// Stops the session. `trace_path` (nullable): where to write the Chrome trace JSON. `table`
// (nullable): receives the aggregated rows (format above), malloc'd, freed with crossclr_shim_free.
// The session ends even when writing the trace or the aggregation fails.
int crossclr_profiler_stop(const char *trace_path, char **table, char **err) {
  return guarded(err, [&] {
    if (table != nullptr) *table = nullptr;
    Session &s = session();
    std::lock_guard<std::mutex> lock(s.mutex);
    TORCH_CHECK(s.active, "the profiler is not running (start it first)");
    TORCH_CHECK(s.owner == std::this_thread::get_id(),
                "the profiler must be stopped on the thread that started it");
    s.active = false;
    std::unique_ptr<tap::ProfilerResult> result = tap::disableProfiler();
    TORCH_CHECK(result != nullptr, "libtorch's profiler returned no result");
    std::string rows = table != nullptr ? aggregate(*result) : std::string();
    if (trace_path != nullptr) result->save(trace_path);
    if (table != nullptr) {
      *table = crossclr::dup_message(rows);
      TORCH_CHECK(*table != nullptr, "out of memory for the profile table");
    }
  });
}

}  // extern "C"
