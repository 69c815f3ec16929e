/* droppos_optim: a C ABI over ATen's multi-tensor optimizer kernels, which tch does not bind
 * (they return nothing): at::_fused_adamw_ and the _foreach_ ops of per-parameter clipping. One
 * launch per parameter group instead of about ten per parameter, which is what makes the
 * optimizer step cheap on CUDA. src/optim/fused.rs mirrors this file.
 *
 * Functions return NULL on success or a malloc'd error message (free it with dd_error_free).
 * Tensor handles are tch's `C_tensor` (an `at::Tensor *`). */
#ifndef DROPPOS_OPTIM_H
#define DROPPOS_OPTIM_H

#include <stdint.h>

#ifdef __cplusplus
namespace at { class Tensor; }
typedef at::Tensor *do_tensor;
extern "C" {
#else
typedef void *do_tensor;
#endif

/* One AdamW step (decoupled weight decay, no amsgrad) of n parameters sharing lr and
 * weight_decay: increments each `steps` tensor (float32 scalars on the parameters' device)
 * and updates params, exp_avgs and exp_avg_sqs in place, as torch.optim.AdamW(fused=True). */
char *do_fused_adamw(do_tensor *params, do_tensor *grads, do_tensor *exp_avgs,
                     do_tensor *exp_avg_sqs, do_tensor *steps, int n, double lr, double beta1,
                     double beta2, double weight_decay, double eps);

/* Per-parameter clipping: g *= min(clip / (|g|_2 + 1e-6), 1) for each of the n gradients,
 * without synchronising with the device. Writes the n norms and coefficients (float32, the
 * gradients' device) to *norms_out and *coefs_out (new tensors, freed by the caller). */
char *do_clip_per_param(do_tensor *grads, int n, double clip, do_tensor *norms_out,
                        do_tensor *coefs_out);

#ifdef __cplusplus
}
#endif
#endif
