//! Raw bindings to csrc/droppos_dist.h (compiled by build.rs). Mirror that header exactly.

use std::ffi::{c_char, c_int, CStr};

use torch_sys::C_tensor;

#[repr(C)]
pub struct DdStore {
    _private: [u8; 0],
}
#[repr(C)]
pub struct DdGroup {
    _private: [u8; 0],
}
#[repr(C)]
pub struct DdReducer {
    _private: [u8; 0],
}

pub const BACKEND_GLOO: c_int = 1;
pub const BACKEND_NCCL: c_int = 2;
pub const OP_SUM: c_int = 0;
pub const OP_MAX: c_int = 1;
pub const OP_MIN: c_int = 2;

pub type Tensor = *mut C_tensor;

extern "C" {
    pub fn dd_error_free(err: *mut c_char);
    pub fn dd_has_gloo() -> c_int;
    pub fn dd_has_nccl() -> c_int;
    pub fn dd_store_serve(
        host: *const c_char,
        port: c_int,
        timeout_ms: i64,
        out: *mut *mut DdStore,
        bound_port: *mut c_int,
    ) -> *mut c_char;
    pub fn dd_store_free(store: *mut DdStore);
    #[allow(clippy::too_many_arguments)]
    pub fn dd_group_new(
        backend: c_int,
        master_addr: *const c_char,
        master_port: c_int,
        is_store_server: c_int,
        prefix: *const c_char,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        gloo_ifnames: *const c_char,
        gloo_hostname: *const c_char,
        cuda_device: c_int,
        out: *mut *mut DdGroup,
    ) -> *mut c_char;
    pub fn dd_group_free(group: *mut DdGroup);
    pub fn dd_group_abandon(group: *mut DdGroup);
    pub fn dd_all_reduce(
        group: *mut DdGroup,
        tensors: *mut Tensor,
        n: c_int,
        op: c_int,
    ) -> *mut c_char;
    pub fn dd_broadcast(
        group: *mut DdGroup,
        tensors: *mut Tensor,
        n: c_int,
        root: c_int,
    ) -> *mut c_char;
    pub fn dd_broadcast_coalesced(
        group: *mut DdGroup,
        tensors: *mut Tensor,
        n: c_int,
        root: c_int,
        bucket_bytes: i64,
    ) -> *mut c_char;
    pub fn dd_barrier(group: *mut DdGroup) -> *mut c_char;
    pub fn dd_reducer_new(
        group: *mut DdGroup,
        params: *mut Tensor,
        n: c_int,
        bucket_bytes: i64,
        first_bucket_bytes: i64,
        find_unused: c_int,
        out: *mut *mut DdReducer,
    ) -> *mut c_char;
    pub fn dd_reducer_prepare(reducer: *mut DdReducer, sync: c_int, output: Tensor) -> *mut c_char;
    pub fn dd_reducer_free(reducer: *mut DdReducer);
    pub fn dd_backward(loss: Tensor) -> *mut c_char;
}

/// Takes ownership of a shim error string: `None` for success.
pub fn take_error(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: the shim returns NUL-terminated strings from malloc; freed exactly once here.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { dd_error_free(err) };
    Some(msg)
}

/// Raw handles for a list of tensors; the shim only reads the handles during the call.
pub fn handles(tensors: &[&tch::Tensor]) -> Vec<Tensor> {
    tensors.iter().map(|t| t.as_ptr() as Tensor).collect()
}
