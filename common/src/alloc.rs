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
//!
//! Each malloc arena keeps its own freed buffers, and glibc makes up to 8 arenas per core: a
//! restore, whose chunks are opened on many blocking threads, peaked at 140-190 MB on a 1 GiB
//! dump of 1 MiB chunks. One arena per core brought that to 65-70 MB at the same speed (a few
//! thousand chunk-sized allocations a second do not contend).

/// Keeps freed buffers for reuse. Call first thing in `main`, before any thread starts.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // SAFETY: mallopt only sets glibc tunables; it is called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
            libc::mallopt(libc::M_ARENA_MAX, cores.clamp(2, 64) as libc::c_int);
        }
    }
}
