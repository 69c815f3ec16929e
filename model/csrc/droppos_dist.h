/* droppos_dist: a C ABI over PyTorch's c10d (TCPStore, ProcessGroupGloo, ProcessGroupNCCL,
 * Reducer), for the Rust crate droppos-model (src/distributed/ffi.rs mirrors this file).
 *
 * Every function that can fail returns NULL on success or an error message allocated with
 * malloc (free it with dd_error_free). C++ exceptions never cross this boundary, and the
 * messages carry no C++ backtraces. Tensor handles are tch's `C_tensor` (an `at::Tensor *`). */
#ifndef DROPPOS_DIST_H
#define DROPPOS_DIST_H

#include <stdint.h>

#ifdef __cplusplus
namespace at { class Tensor; }
typedef at::Tensor *dd_tensor;
extern "C" {
#else
typedef void *dd_tensor;
#endif

typedef struct dd_store dd_store;
typedef struct dd_group dd_group;
typedef struct dd_reducer dd_reducer;

enum { DD_BACKEND_GLOO = 1, DD_BACKEND_NCCL = 2 };
enum { DD_OP_SUM = 0, DD_OP_MAX = 1, DD_OP_MIN = 2 };

void dd_error_free(char *err);

/* Which backends this build compiled in (1/0). */
int dd_has_gloo(void);
int dd_has_nccl(void);

/* A TCPStore server only (what torchrun's agent hosts): port 0 picks a free port, written to
 * *bound_port. Clients connect with dd_group_new(..., is_store_server = 0, ...). */
char *dd_store_serve(const char *host, int port, int64_t timeout_ms, dd_store **out,
                     int *bound_port);
void dd_store_free(dd_store *store);

/* Rendezvous through a TCPStore at master_addr:master_port (hosted here when is_store_server),
 * keys under `prefix`, then a process group with one backend. gloo_ifnames: comma-separated
 * interfaces for Gloo (GLOO_SOCKET_IFNAME), or NULL/"" for the default device; gloo_hostname,
 * when not NULL/"", binds Gloo to that address instead. cuda_device: the device NCCL is bound
 * to (ignored by Gloo). timeout_ms bounds the rendezvous and every collective. */
char *dd_group_new(int backend, const char *master_addr, int master_port, int is_store_server,
                   const char *prefix, int rank, int world_size, int64_t timeout_ms,
                   const char *gloo_ifnames, const char *gloo_hostname, int cuda_device,
                   dd_group **out);
/* Releases the group. After a failed collective (a peer died) the group may be unable to shut
 * down cleanly; dd_group_abandon releases nothing and never blocks. */
void dd_group_free(dd_group *group);
void dd_group_abandon(dd_group *group);

char *dd_all_reduce(dd_group *group, dd_tensor *tensors, int n, int op);
char *dd_broadcast(dd_group *group, dd_tensor *tensors, int n, int root);
/* Broadcast many tensors in flattened buckets of at most bucket_bytes (DDP's module sync). */
char *dd_broadcast_coalesced(dd_group *group, dd_tensor *tensors, int n, int root,
                             int64_t bucket_bytes);
char *dd_barrier(dd_group *group);

/* c10d::Reducer over `params` (leaf tensors requiring grad), bucketed like DDP. */
char *dd_reducer_new(dd_group *group, dd_tensor *params, int n, int64_t bucket_bytes,
                     int64_t first_bucket_bytes, int find_unused, dd_reducer **out);
/* Between forward and backward: sync = 1 all-reduces the gradients during the coming backward
 * (bucketed, overlapped); sync = 0 accumulates locally (DDP's no_sync). `output` (may be NULL)
 * is searched for unused parameters when the reducer was made with find_unused. */
char *dd_reducer_prepare(dd_reducer *reducer, int sync, dd_tensor output);
void dd_reducer_free(dd_reducer *reducer);

/* loss.backward() through the autograd engine, with errors (a failed all-reduce inside the
 * Reducer's hooks) returned instead of thrown. */
char *dd_backward(dd_tensor loss);

#ifdef __cplusplus
}
#endif
#endif
