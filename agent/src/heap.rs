//! What the agent asks of the process's allocator (glibc's, unless built
//! with the `jemalloc` or `mimalloc` feature): settings for a process that
//! runs for weeks, and giving back at once what large transient work freed.
//!
//! glibc returns freed memory to the OS only from the top of a heap, and
//! keeps it in the arena of whichever thread freed it. Work that allocates
//! a lot for a moment (parsing a mesh file, decoding an xDS response of
//! 100,000 resources) leaves that memory resident under the long-lived
//! state it allocated in between, unless it is handed back explicitly.

/// Settings for the process, before it allocates in earnest: keeps glibc
/// from handing the copy path's large buffers (HTTP/2 frames up to 1 MiB,
/// 256 KiB socket reads) back to the kernel after every use. With the
/// default, adaptive thresholds each one is mapped, page-faulted in and
/// unmapped again, a few percent of the agent's CPU under load. Free
/// memory above 4 MiB at the top of a heap is still returned.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// Hands memory freed by the work just done back to the OS. Costs a walk
/// of the allocator's free lists (milliseconds at 100,000 workloads), so it
/// is for after large, rare work, not per connection.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}
