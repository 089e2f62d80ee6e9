//! The C allocator's settings for a process that moves models over gRPC.
//!
//! A round streams each model and update through buffers of a few hundred
//! KiB to a few MiB (tonic's encode and decode buffers, HTTP/2 frames, the
//! decoded vectors), allocated and freed again for every agent. Left alone,
//! glibc serves each one above its *dynamic* mmap threshold (128 KiB at
//! first, raised only to the size of the largest mapped block freed so far)
//! with a fresh `mmap`, and hands free memory at the top of a heap back to
//! the kernel once twice that threshold sits there: every round then faults
//! and zeroes the same pages again. Measured on the (100 agents, 100k
//! values) plain gRPC round, this was about a sixth of both processes'
//! CPU (BENCHMARKS.md, session 30). [`tune_for_transfers`] fixes both
//! thresholds so those buffers are reused from the heap.
//!
//! The call is glibc's own tunable (`mallopt`), the one `unsafe` block of
//! the workspace; elsewhere (musl, macOS) it does nothing.

/// Allocations of this size and above still get their own mapping (and
/// give it back when freed): whole models of large catalogues, not the
/// transfer buffers, which stay below the 2 MiB upload chunk plus framing.
pub const MMAP_THRESHOLD_BYTES: usize = 4 << 20;
// glibc's upper bound for the mmap threshold on 64-bit targets.
const _: () = assert!(MMAP_THRESHOLD_BYTES <= 32 << 20);

/// Free memory at the top of a heap is returned to the kernel only past
/// this much: the buffers of a round in flight, not more.
pub const TRIM_THRESHOLD_BYTES: usize = 64 << 20;

/// Fixes glibc's mmap and trim thresholds at [`MMAP_THRESHOLD_BYTES`] and
/// [`TRIM_THRESHOLD_BYTES`]. Call once, at the start of a binary that
/// serves or joins rounds over gRPC (a library must not change its host's
/// allocator). Returns whether the allocator took both settings: `false`
/// off glibc, where there is nothing to set.
pub fn tune_for_transfers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |param: libc::c_int, value: usize| {
            let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
            // SAFETY: `mallopt` only changes the allocator's parameters;
            // glibc takes its own locks and allows the call at any time,
            // from any thread. It returns 1 when the value was accepted.
            #[allow(unsafe_code)]
            let accepted = unsafe { libc::mallopt(param, value) };
            accepted == 1
        };
        set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            & set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_both_thresholds() {
        // glibc refuses an mmap threshold above 32 MiB (64-bit): ours is
        // below, so both settings are taken.
        assert!(super::tune_for_transfers());
    }
}
