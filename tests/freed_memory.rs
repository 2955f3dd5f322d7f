//! `telemetry::release_freed_memory`, which the controller calls after every resync: memory
//! the process freed goes back to the kernel instead of staying resident in glibc's arenas.
//! Its own test binary, so no other test allocates in the process while RSS is read.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// Resident memory of this process, from `/proc/self/statm` (pages × 4 KiB, the page size of
/// the machines this runs on; a larger page only makes the drop larger).
fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("statm's second field is the resident page count");
    pages * 4096.0 / (1024.0 * 1024.0)
}

#[test]
fn memory_freed_in_the_middle_of_the_heap_is_given_back() {
    // 64 MiB in 16 KiB blocks (below glibc's mmap threshold, so they come from an arena),
    // each written so its pages are resident; then all freed but the last, which keeps the
    // free space below it from being trimmed at the top of the heap, as a resync's
    // long-lived allocations do.
    const BLOCK: usize = 16 * 1024;
    let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; BLOCK]).collect();
    let keep = blocks.pop();
    let before_free = resident_mib();
    drop(blocks);
    let freed = resident_mib();
    vps_controller::telemetry::release_freed_memory();
    let after = resident_mib();
    assert!(
        before_free - freed < 16.0,
        "glibc already returned most of it ({before_free:.1} → {freed:.1} MiB): the test \
         no longer shows what the call does"
    );
    assert!(
        freed - after > 48.0,
        "release_freed_memory gave back only {:.1} of 64 MiB freed ({freed:.1} → {after:.1} MiB)",
        freed - after
    );
    drop(keep);
}
