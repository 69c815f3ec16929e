//! glibc malloc settings for the loader's and the shard writer's large, short-lived buffers.
//!
//! Each block the loader reads decodes its image column into a fresh multi-MB Arrow buffer, and
//! decoded images are of the same order; all are freed soon after. With glibc's defaults such a
//! buffer is mmap'd and unmapped each time, or the top of the heap is trimmed back to the
//! kernel, so every new one is paid again in page faults (zero-filled pages): `bench loader`
//! over 8 epochs of 260 ImageNet images took ~95k faults and ~5 % of its CPU in the kernel.
//! Serving blocks up to 32 MiB (glibc's largest mmap threshold) from the heap and never trimming
//! it halves the faults (BENCHMARKS.md). Freed blocks are reused, so resident memory stays
//! bounded by the peak in use, which is what the loader's memory bound already counts.

/// Applies the settings, unless the user's `GLIBC_TUNABLES` sets malloc tunables itself.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; it is called first thing in main,
        // before any other thread exists. A refused value (0) leaves glibc's default in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}
