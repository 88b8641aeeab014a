//! Allocator tuning for the chunk pipeline.
//!
//! Chunks and their sealed forms are buffers of 64 KiB to 16 MiB, allocated and freed by the
//! thousand. glibc returns such buffers to the kernel soon after they are freed (large ones are
//! `mmap`ed one by one, and the heap is trimmed once 2 × the mmap threshold is free at its
//! top), so each new buffer is faulted in again page by page: on a 1 GiB tree backup that was
//! about a fifth of the agent's CPU, most of it in the kernel. Fixed thresholds keep freed
//! buffers for reuse: no chunk-sized buffer is `mmap`ed on its own, and a heap is trimmed only
//! past 16 MiB free at its top (a 128 MiB threshold cost the coordinator 30 MB more at 10
//! concurrent backups and measured no faster). Memory stays bounded by the pipeline's queues,
//! not by the backup's size.

/// Keeps freed buffers for reuse. Call first thing in `main`, before any thread starts.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets two glibc tunables; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}
