// Internal link between droppos_dist.cpp and the optional NCCL translation unit.
#pragma once
#include <chrono>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

extern "C" int droppos_dist_nccl_built();

// Throws (std::runtime_error) when this build has no NCCL.
c10::intrusive_ptr<c10d::Backend> droppos_dist_make_nccl(
    const c10::intrusive_ptr<c10d::Store> &store, int rank, int world_size,
    std::chrono::milliseconds timeout, int cuda_device);
