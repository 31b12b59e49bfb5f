//! Giving freed heap memory back to the kernel.
//!
//! glibc's allocator keeps what the program frees in its arenas (one per thread
//! that allocated, up to eight per core) and returns it to the kernel only from the
//! top of each heap. This server frees a lot in bursts: the connection threads of
//! a burst of Postfix connections exit, evicted users' names and network lists are
//! dropped, the sweep rebuilds tables. Without help the resident size then keeps
//! the high-water mark of every burst, and a ten-minute soak (`scripts/soak`) grew
//! from 52 to 72 MiB while the live data stayed the same; one `malloc_trim` brought
//! a process at 155 MiB back to 93 MiB. The periodic sweep calls [`give_back`]
//! after it has removed idle keys, so the resident size follows the live data.
//!
//! Elsewhere than glibc (musl, other systems) this does nothing.

/// Returns free heap pages of every allocator arena to the kernel (glibc's
/// `malloc_trim(0)`); whether any memory was released. Takes milliseconds for a
/// heap of a few hundred MiB, during which other threads' allocations in the arena
/// being trimmed wait; call it from maintenance, never per request.
pub fn give_back() -> bool {
    imp::give_back()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    pub(super) fn give_back() -> bool {
        // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas
        // under their locks; it is safe to call from any thread at any time.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released != 0
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn give_back() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_memory_goes_back_to_the_kernel() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        }
        // 64 MiB in small blocks (below the mmap threshold, so they live in the
        // arena), touched, then all but the last freed: the arena's top stays in
        // use, so glibc cannot shrink the heap by itself.
        let mut blocks: Vec<Vec<u8>> = (0..16_384).map(|i| vec![i as u8; 4096]).collect();
        let keep = blocks.pop();
        drop(blocks);
        let before = rss_kib();
        assert!(super::give_back(), "malloc_trim released nothing");
        let after = rss_kib();
        drop(keep);
        assert!(
            after + 32 * 1024 < before,
            "RSS {before} KiB -> {after} KiB: less than 32 MiB given back"
        );
    }
}
