//! How the sidecar's heap gives memory back to the kernel (glibc malloc).
//!
//! A tunnel moves its bytes through short-lived buffers of tens of KiB
//! (hyper's copy of each write, rustls's TLS records, h2's frames, and up to
//! one HTTP/2 stream window, 1 MiB, of received DATA waiting to be read).
//! With glibc's start-up settings the freed top of the heap is returned to
//! the kernel as soon as it exceeds 128 KiB (`M_TRIM_THRESHOLD`), so the next
//! buffers fault fresh zeroed pages back in: about 100,000 page faults per
//! GiB tunnelled on each sidecar, 13–22 % of its CPU samples; without them
//! each sidecar spends 23–32 % less CPU per GiB (docs/performance.md,
//! "Fourth session (2026-11-30): TCP tunnel").
//!
//! glibc raises that threshold itself, to twice the size of the block, when
//! a block it had mapped with `mmap` is freed (its dynamic mmap threshold,
//! mallopt(3)). [`keep_freed_memory`] frees one such block at start-up, so
//! the sidecar keeps up to [`TRIM_THRESHOLD`] of freed memory for reuse
//! instead. It needs no `unsafe` (the workspace forbids it) and is a no-op
//! under other allocators.

/// Bytes of freed memory at the top of the heap the sidecar keeps rather
/// than return to the kernel: above one HTTP/2 stream window
/// ([`crate::limits::H2_STREAM_WINDOW`]) plus the frame and record buffers
/// around it, so a tunnel's buffers are reused, not faulted back in.
pub const TRIM_THRESHOLD: usize = 2 * 1024 * 1024;

/// Raises glibc's trim threshold to [`TRIM_THRESHOLD`] (and its mmap
/// threshold to half of it: allocations below 1 MiB come from the heap) by
/// allocating and freeing one block of half that size, which glibc maps
/// with `mmap` at start-up settings. Call once, first thing in `main`. The
/// block is unmapped again when freed (only glibc's header on its first page
/// is ever touched), so it costs no resident memory.
pub fn keep_freed_memory() {
    let block: Vec<u8> = Vec::with_capacity(TRIM_THRESHOLD / 2);
    // Kept from the optimizer, which may drop an allocation nobody reads.
    drop(std::hint::black_box(block));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of this thread so far (`/proc/thread-self/stat`,
    /// field 10): tests running on other threads of the harness do not count.
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace().nth(7).unwrap().parse().unwrap()
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_buffers_are_reused_not_faulted_back_in() {
        keep_freed_memory();
        // 100 rounds of eight 64 KiB buffers written, then freed (a
        // tunnel's pattern): with glibc's start-up settings each round's
        // 512 KiB is returned to the kernel and faulted back in by the next
        // (~9,600 faults in all); with the threshold raised, ~130.
        let before = minor_faults();
        for i in 0..100u8 {
            let bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![i; 64 * 1024]).collect();
            std::hint::black_box(&bufs);
        }
        let faults = minor_faults() - before;
        assert!(faults < 3_000, "{faults} page faults for 100 rounds of reused 64 KiB buffers");
    }
}
