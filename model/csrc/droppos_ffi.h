// Shared by the C ABI translation units (droppos_dist.cpp, droppos_optim.cpp): error strings
// for Rust and the try/catch that keeps C++ exceptions from crossing the boundary.
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// c10 messages can embed a C++ backtrace ("Exception raised from ... frame #0: ..."); users get
// the first part only.
inline std::string droppos_strip_backtrace(std::string msg) {
  for (const char *marker : {"\nException raised from ", "Exception raised from "}) {
    auto at = msg.find(marker);
    if (at != std::string::npos) msg.erase(at);
  }
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  return msg.empty() ? std::string("libtorch error (no message)") : msg;
}

// A malloc'd copy for Rust (freed with dd_error_free).
inline char *make_error(const std::string &msg) {
  std::string clean = droppos_strip_backtrace(msg);
  char *out = static_cast<char *>(std::malloc(clean.size() + 1));
  if (out == nullptr) return nullptr;
  std::memcpy(out, clean.c_str(), clean.size() + 1);
  return out;
}

// tch handles (at::Tensor *) to tensors sharing their storage.
inline std::vector<at::Tensor> to_vector(at::Tensor *const *tensors, int n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}

#define DD_TRY try {
#define DD_CATCH                                                      \
  }                                                                   \
  catch (const c10::Error &e) {                                       \
    return make_error(e.what_without_backtrace());                    \
  }                                                                   \
  catch (const std::exception &e) {                                   \
    return make_error(e.what());                                      \
  }                                                                   \
  catch (...) {                                                       \
    return make_error("unknown C++ exception in libtorch");           \
  }                                                                   \
  return nullptr;
