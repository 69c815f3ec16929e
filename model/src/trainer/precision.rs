//! CUDA numerics settings tch does not expose: TF32 matmuls/convolutions and the autocast dtype.
//!
//! tch's `autocast` turns CUDA autocast on with libtorch's default dtype (fp16); we want bf16,
//! which needs `at::autocast::set_autocast_dtype`. The symbols are looked up at run time in the
//! already-loaded libtorch, so a libtorch without them degrades to an error, not a link failure.

use libloading::os::unix::{Library, Symbol};

/// c10::DeviceType::CPU / CUDA.
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;
/// c10::ScalarType::BFloat16.
const SCALAR_BF16: i8 = 15;

const SET_AUTOCAST_DTYPE: &[u8] =
    b"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE\0";
const GET_AUTOCAST_DTYPE: &[u8] = b"_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE\0";
const SET_AUTOCAST_ENABLED: &[u8] = b"_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb\0";
const IS_AUTOCAST_ENABLED: &[u8] = b"_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE\0";
const INCREMENT_NESTING: &[u8] = b"_ZN2at8autocast17increment_nestingEv\0";
const DECREMENT_NESTING: &[u8] = b"_ZN2at8autocast17decrement_nestingEv\0";
const CLEAR_CACHE: &[u8] = b"_ZN2at8autocast11clear_cacheEv\0";
const GLOBAL_CONTEXT: &[u8] = b"_ZN2at13globalContextEv\0";
const SET_TF32_CUBLAS: &[u8] = b"_ZN2at7Context18setAllowTF32CuBLASEb\0";
const SET_TF32_CUDNN: &[u8] = b"_ZN2at7Context17setAllowTF32CuDNNEb\0";

fn this() -> Result<Library, String> {
    // Make sure libtorch is loaded before looking into the process's symbol table.
    let _ = tch::Cuda::is_available();
    Ok(Library::this())
}

unsafe fn sym<T>(lib: &Library, name: &[u8]) -> Result<Symbol<T>, String> {
    lib.get::<T>(name).map_err(|e| {
        format!(
            "libtorch lacks {}: {e}",
            String::from_utf8_lossy(&name[..name.len() - 1])
        )
    })
}

/// Makes CUDA autocast compute in bfloat16 instead of float16.
pub fn set_cuda_autocast_bf16() -> Result<(), String> {
    let lib = this()?;
    // SAFETY: the signature matches at::autocast::set_autocast_dtype(DeviceType, ScalarType);
    // both enums are int8_t-backed and passed like plain integers in the C ABI.
    unsafe {
        let f: Symbol<unsafe extern "C" fn(i8, i8)> = sym(&lib, SET_AUTOCAST_DTYPE)?;
        f(DEVICE_CUDA, SCALAR_BF16);
    }
    Ok(())
}

/// Whether CUDA autocast is set to bfloat16.
pub fn cuda_autocast_is_bf16() -> Result<bool, String> {
    let lib = this()?;
    // SAFETY: at::autocast::get_autocast_dtype(DeviceType) -> ScalarType (int8_t enum).
    unsafe {
        let f: Symbol<unsafe extern "C" fn(i8) -> i8> = sym(&lib, GET_AUTOCAST_DTYPE)?;
        Ok(f(DEVICE_CUDA) == SCALAR_BF16)
    }
}

/// Runs `f` under CPU autocast to bfloat16 (what `torch.autocast("cpu", torch.bfloat16)`
/// does): matmuls and linear layers compute in bf16, which CPUs with AMX or AVX512-BF16 run
/// several times faster than fp32. The previous CPU autocast state is restored afterwards.
pub fn with_cpu_autocast_bf16<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let api = cpu_autocast_api()?;
    // SAFETY: the pointers come from libtorch, which stays loaded for the process's lifetime,
    // with the signatures declared in `CpuAutocastApi`.
    unsafe {
        let was = (api.is_enabled)(DEVICE_CPU);
        (api.set_dtype)(DEVICE_CPU, SCALAR_BF16);
        (api.set_enabled)(DEVICE_CPU, true);
        (api.increment_nesting)();
        let out = f();
        if (api.decrement_nesting)() == 0 {
            (api.clear_cache)();
        }
        (api.set_enabled)(DEVICE_CPU, was);
        Ok(out)
    }
}

/// libtorch's CPU autocast controls, looked up once (the guide pass uses them every step).
struct CpuAutocastApi {
    is_enabled: unsafe extern "C" fn(i8) -> bool,
    set_enabled: unsafe extern "C" fn(i8, bool),
    set_dtype: unsafe extern "C" fn(i8, i8),
    increment_nesting: unsafe extern "C" fn() -> i64,
    decrement_nesting: unsafe extern "C" fn() -> i64,
    clear_cache: unsafe extern "C" fn(),
}

fn cpu_autocast_api() -> Result<&'static CpuAutocastApi, String> {
    static API: std::sync::OnceLock<Result<CpuAutocastApi, String>> = std::sync::OnceLock::new();
    API.get_or_init(|| {
        let lib = this()?;
        // SAFETY: signatures match at::autocast::{is,set}_autocast_enabled(DeviceType[, bool]),
        // set_autocast_dtype(DeviceType, ScalarType), {increment,decrement}_nesting() -> int64
        // and clear_cache(); DeviceType and ScalarType are int8_t-backed enums.
        unsafe {
            Ok(CpuAutocastApi {
                is_enabled: *sym(&lib, IS_AUTOCAST_ENABLED)?,
                set_enabled: *sym(&lib, SET_AUTOCAST_ENABLED)?,
                set_dtype: *sym(&lib, SET_AUTOCAST_DTYPE)?,
                increment_nesting: *sym(&lib, INCREMENT_NESTING)?,
                decrement_nesting: *sym(&lib, DECREMENT_NESTING)?,
                clear_cache: *sym(&lib, CLEAR_CACHE)?,
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Allows TF32 in cuBLAS matmuls and cuDNN convolutions (fp32 tensors, ~10-bit mantissa math).
pub fn allow_tf32(allow: bool) -> Result<(), String> {
    let lib = this()?;
    // SAFETY: at::globalContext() returns a reference (a pointer in the ABI) to the process-wide
    // Context; the setters are non-virtual member functions taking (this, bool).
    unsafe {
        let ctx: Symbol<unsafe extern "C" fn() -> *mut std::ffi::c_void> =
            sym(&lib, GLOBAL_CONTEXT)?;
        let blas: Symbol<unsafe extern "C" fn(*mut std::ffi::c_void, bool)> =
            sym(&lib, SET_TF32_CUBLAS)?;
        let dnn: Symbol<unsafe extern "C" fn(*mut std::ffi::c_void, bool)> =
            sym(&lib, SET_TF32_CUDNN)?;
        let c = ctx();
        blas(c, allow);
        dnn(c, allow);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // These only flip libtorch's global flags, so they run (and are checked) without a GPU.
    #[test]
    fn bf16_autocast_dtype_is_settable() {
        set_cuda_autocast_bf16().unwrap();
        assert!(cuda_autocast_is_bf16().unwrap());
    }

    #[test]
    fn tf32_switch_is_callable() {
        allow_tf32(true).unwrap();
        allow_tf32(false).unwrap();
    }
}
