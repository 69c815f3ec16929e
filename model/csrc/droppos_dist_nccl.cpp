// The NCCL part of droppos_dist, compiled only when build.rs finds nccl.h, the CUDA headers
// and libtorch_cuda (USE_C10D_NCCL, USE_CUDA); otherwise DROPPOS_DIST_NO_NCCL gives a stub.
#include <stdexcept>
#include <string>

#include "droppos_dist_internal.h"

#ifndef DROPPOS_DIST_NO_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

extern "C" int droppos_dist_nccl_built() { return 1; }

c10::intrusive_ptr<c10d::Backend> droppos_dist_make_nccl(
    const c10::intrusive_ptr<c10d::Store> &store, int rank, int world_size,
    std::chrono::milliseconds timeout, int cuda_device) {
  if (cuda_device < 0) throw std::runtime_error("the NCCL backend needs a CUDA device");
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
  nccl->setBoundDeviceId(
      at::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(cuda_device)));
  return nccl;
}
#else
extern "C" int droppos_dist_nccl_built() { return 0; }

c10::intrusive_ptr<c10d::Backend> droppos_dist_make_nccl(const c10::intrusive_ptr<c10d::Store> &,
                                                         int, int, std::chrono::milliseconds,
                                                         int) {
  throw std::runtime_error(
      "this build of droppos has no NCCL backend (built without nccl.h / CUDA headers / "
      "libtorch_cuda); rebuild on a CUDA-enabled torch with those headers, or use --dist-backend gloo");
}
#endif
