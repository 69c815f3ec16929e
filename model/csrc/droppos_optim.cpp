// droppos_optim: the C ABI of droppos_optim.h. Compiled by model/build.rs beside droppos_dist.
#include "droppos_optim.h"

#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include "droppos_ffi.h"

extern "C" {

char *do_fused_adamw(do_tensor *params, do_tensor *grads, do_tensor *exp_avgs,
                     do_tensor *exp_avg_sqs, do_tensor *steps, int n, double lr, double beta1,
                     double beta2, double weight_decay, double eps) {
  DD_TRY
  if (n <= 0) return nullptr;
  c10::NoGradGuard no_grad;
  auto p = to_vector(params, n);
  auto g = to_vector(grads, n);
  auto m = to_vector(exp_avgs, n);
  auto v = to_vector(exp_avg_sqs, n);
  auto s = to_vector(steps, n);
  // torch.optim.AdamW(fused=True) increments the steps, then calls the kernel.
  at::_foreach_add_(s, 1);
  std::vector<at::Tensor> no_max_exp_avg_sqs;
  at::_fused_adamw_(p, g, m, v, no_max_exp_avg_sqs, s, lr, beta1, beta2, weight_decay, eps,
                    /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                    /*found_inf=*/std::nullopt);
  DD_CATCH
}

char *do_clip_per_param(do_tensor *grads, int n, double clip, do_tensor *norms_out,
                        do_tensor *coefs_out) {
  DD_TRY
  if (n <= 0) return make_error("do_clip_per_param: no gradients");
  c10::NoGradGuard no_grad;
  auto g = to_vector(grads, n);
  auto norms = at::stack(at::_foreach_norm(g, 2), 0);
  // As torch's clip_grad_norm_: clip / (norm + 1e-6), capped at 1, multiplied on the device.
  auto coefs = ((norms + 1e-6).reciprocal() * clip).clamp_max(1.0);
  at::_foreach_mul_(g, coefs.unbind(0));
  *norms_out = new at::Tensor(std::move(norms));
  *coefs_out = new at::Tensor(std::move(coefs));
  DD_CATCH
}

}  // extern "C"
