// droppos_dist: the C ABI of droppos_dist.h over c10d. Compiled by model/build.rs with the
// cc crate against the headers shipped in the torch wheel (C++17, _GLIBCXX_USE_CXX11_ABI=1).
#include "droppos_dist.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#include "droppos_dist_internal.h"
#include "droppos_ffi.h"

struct dd_store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

struct dd_group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  int backend;
};

struct dd_reducer {
  std::unique_ptr<c10d::Reducer> reducer;
  bool find_unused;
};

extern "C" {

void dd_error_free(char *err) { std::free(err); }

int dd_has_gloo(void) {
#ifdef USE_C10D_GLOO
  return 1;
#else
  return 0;
#endif
}

int dd_has_nccl(void) { return droppos_dist_nccl_built(); }

char *dd_store_serve(const char *host, int port, int64_t timeout_ms, dd_store **out,
                     int *bound_port) {
  DD_TRY
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = true;
  opts.waitWorkers = false;
  opts.multiTenant = true;
  opts.timeout = std::chrono::milliseconds(timeout_ms);
  auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
  *bound_port = store->getPort();
  *out = new dd_store{std::move(store)};
  DD_CATCH
}

void dd_store_free(dd_store *store) {
  try {
    delete store;
  } catch (...) {
  }
}

char *dd_group_new(int backend, const char *master_addr, int master_port, int is_store_server,
                   const char *prefix, int rank, int world_size, int64_t timeout_ms,
                   const char *gloo_ifnames, const char *gloo_hostname, int cuda_device,
                   dd_group **out) {
  DD_TRY
  auto timeout = std::chrono::milliseconds(timeout_ms);
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(master_port);
  opts.isServer = is_store_server != 0;
  opts.numWorkers = static_cast<std::size_t>(world_size);
  opts.waitWorkers = true;  // clients count themselves in; the host waits for all
  opts.multiTenant = true;
  opts.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> tcp =
      c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
  c10::intrusive_ptr<c10d::Store> store =
      c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
  store->setTimeout(timeout);

  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world_size);
  if (backend == DD_BACKEND_GLOO) {
#ifdef USE_C10D_GLOO
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    std::string ifnames = gloo_ifnames ? gloo_ifnames : "";
    std::string hostname = gloo_hostname ? gloo_hostname : "";
    if (!ifnames.empty()) {
      size_t start = 0;
      while (start <= ifnames.size()) {
        size_t end = ifnames.find(',', start);
        if (end == std::string::npos) end = ifnames.size();
        std::string iface = ifnames.substr(start, end - start);
        if (!iface.empty())
          options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
        start = end + 1;
      }
    } else if (!hostname.empty()) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    options->threads = static_cast<int>(options->devices.size() * 2);
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo", store), rank, world_size, options);
    pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
#else
    throw std::runtime_error(
        "this build of droppos has no Gloo backend (libgloo-dev was missing when it was built; "
        "install it and rebuild)");
#endif
  } else if (backend == DD_BACKEND_NCCL) {
    auto nccl = droppos_dist_make_nccl(c10::make_intrusive<c10d::PrefixStore>("nccl", store),
                                       rank, world_size, timeout, cuda_device);
    pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
    pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
  } else {
    throw std::runtime_error("unknown backend id " + std::to_string(backend));
  }
  pg->setGroupName("droppos");
  *out = new dd_group{std::move(store), std::move(pg), backend};
  DD_CATCH
}

void dd_group_free(dd_group *group) {
  if (group == nullptr) return;
  try {
    group->pg->shutdown();
  } catch (...) {
  }
  try {
    delete group;
  } catch (...) {
  }
}

void dd_group_abandon(dd_group *group) { (void)group; }

char *dd_all_reduce(dd_group *group, dd_tensor *tensors, int n, int op) {
  DD_TRY
  // Collectives write into parameters (leaves that require grad): not an autograd op.
  c10::AutoGradMode no_grad(false);
  auto ts = to_vector(tensors, n);
  c10d::AllreduceOptions opts;
  switch (op) {
    case DD_OP_SUM: opts.reduceOp = c10d::ReduceOp::SUM; break;
    case DD_OP_MAX: opts.reduceOp = c10d::ReduceOp::MAX; break;
    case DD_OP_MIN: opts.reduceOp = c10d::ReduceOp::MIN; break;
    default: throw std::runtime_error("unknown reduce op " + std::to_string(op));
  }
  // One collective per tensor: Gloo's all-reduce takes a single tensor per call.
  for (auto &t : ts) {
    std::vector<at::Tensor> one{t};
    group->pg->allreduce(one, opts)->wait();
  }
  DD_CATCH
}

char *dd_broadcast(dd_group *group, dd_tensor *tensors, int n, int root) {
  DD_TRY
  // Collectives write into parameters (leaves that require grad): not an autograd op.
  c10::AutoGradMode no_grad(false);
  auto ts = to_vector(tensors, n);
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  for (auto &t : ts) {
    std::vector<at::Tensor> one{t};
    group->pg->broadcast(one, opts)->wait();
  }
  DD_CATCH
}

char *dd_broadcast_coalesced(dd_group *group, dd_tensor *tensors, int n, int root,
                             int64_t bucket_bytes) {
  DD_TRY
  // Collectives write into parameters (leaves that require grad): not an autograd op.
  c10::AutoGradMode no_grad(false);
  auto ts = to_vector(tensors, n);
  c10d::broadcast_coalesced(group->pg, ts, static_cast<size_t>(bucket_bytes), root);
  DD_CATCH
}

char *dd_barrier(dd_group *group) {
  DD_TRY
  group->pg->barrier()->wait();
  DD_CATCH
}

char *dd_reducer_new(dd_group *group, dd_tensor *params, int n, int64_t bucket_bytes,
                     int64_t first_bucket_bytes, int find_unused, dd_reducer **out) {
  DD_TRY
  auto ps = to_vector(params, n);
  // What DistributedDataParallel does on construction: check every rank holds the same
  // parameter shapes, then one bucket for the first iteration (without find_unused), which
  // the Reducer rebuilds in gradient-ready order after it.
  c10d::verify_params_across_processes(group->pg, ps, std::nullopt);
  std::vector<bool> sparse(ps.size(), false);
  std::vector<size_t> limits;
  if (find_unused) {
    limits = {static_cast<size_t>(first_bucket_bytes), static_cast<size_t>(bucket_bytes)};
  } else {
    limits = {std::numeric_limits<size_t>::max()};
  }
  auto assignment = c10d::compute_bucket_assignment_by_size(ps, limits, sparse);
  auto indices = std::get<0>(assignment);
  std::reverse(indices.begin(), indices.end());
  auto reducer = std::make_unique<c10d::Reducer>(
      ps, indices, group->pg, sparse, bucket_bytes, find_unused != 0,
      /*gradient_as_bucket_view=*/false, std::unordered_map<size_t, std::string>{},
      first_bucket_bytes, /*skip_all_reduce_unused_params=*/false,
      /*use_python_reducer=*/false, std::vector<int64_t>{});
  *out = new dd_reducer{std::move(reducer), find_unused != 0};
  DD_CATCH
}

char *dd_reducer_prepare(dd_reducer *r, int sync, dd_tensor output) {
  DD_TRY
  // DDP's _pre_forward / _post_forward, in order, compressed to the point between forward
  // and backward (rebuild_buckets runs on every rank every step: it may broadcast).
  if (sync) r->reducer->prepare_for_forward();
  r->reducer->rebuild_buckets();
  if (sync) {
    std::vector<at::Tensor> outputs;
    if (r->find_unused && output != nullptr) outputs.push_back(*output);
    r->reducer->prepare_for_backward(outputs);
  }
  DD_CATCH
}

void dd_reducer_free(dd_reducer *reducer) {
  try {
    delete reducer;
  } catch (...) {
  }
}

char *dd_backward(dd_tensor loss) {
  DD_TRY
  torch::autograd::backward({*loss});
  DD_CATCH
}

}  // extern "C"
