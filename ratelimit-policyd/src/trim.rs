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
//! Trimming gives back only whole free pages, though. The free space between live
//! blocks stays, in every arena, and a thread-per-connection server whose
//! connection threads come and go spreads its long-lived blocks (a window's slot
//! list, a long name, a network list, each made by whichever connection thread
//! first needed it) over all of glibc's arenas, sixteen on two cores. In a soak
//! with full tables (`scripts/soak`, 5-minute windows) the live heap stopped growing
//! after one window (128 -> 133 MiB from 4 to 10 minutes) while the arenas held
//! ever more free space around it (167 -> 199 MiB). [`cap_arenas`], called at
//! start, keeps one arena per CPU: with two, a 30-minute soak's arenas held
//! 152-175 MiB around a live heap of 133-141 MiB from the sixth minute to the
//! end, and its resident size stayed within 147.6-155.0 MiB.
//!
//! Elsewhere than glibc (musl, other systems) this does nothing.

/// Caps glibc's malloc arenas at one per CPU (glibc's default is eight per CPU),
/// unless the environment sets `MALLOC_ARENA_MAX`, which glibc then follows; the
/// number of arenas set, or `None` when nothing was changed. Call it before the
/// process starts its first thread: arenas made before stay.
pub fn cap_arenas() -> Option<usize> {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return None;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    imp::cap_arenas(cpus).then_some(cpus)
}

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

    pub(super) fn cap_arenas(arenas: usize) -> bool {
        let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers and only sets a parameter of glibc's
        // allocator under its lock.
        #[allow(unsafe_code)]
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        set == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn give_back() -> bool {
        false
    }

    pub(super) fn cap_arenas(_arenas: usize) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    /// How many arenas glibc has made in this process (the `<heap nr=...>` entries
    /// of `malloc_info`).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    fn arenas_made() -> usize {
        let mut buf: *mut libc::c_char = std::ptr::null_mut();
        let mut len: libc::size_t = 0;
        // SAFETY: open_memstream writes the buffer's address and length through the
        // two pointers, which outlive the stream; after fclose the buffer holds len
        // bytes, which are copied out before it is freed.
        let xml = unsafe {
            let f = libc::open_memstream(&mut buf, &mut len);
            assert!(!f.is_null(), "open_memstream failed");
            libc::malloc_info(0, f);
            libc::fclose(f);
            let bytes = std::slice::from_raw_parts(buf.cast::<u8>(), len).to_vec();
            libc::free(buf.cast());
            String::from_utf8(bytes).unwrap()
        };
        xml.matches("<heap nr=").count()
    }

    /// Six threads that each allocate and hold their blocks until all have.
    fn allocate_on_six_threads() {
        let all = std::sync::Arc::new(std::sync::Barrier::new(6));
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let all = std::sync::Arc::clone(&all);
                std::thread::spawn(move || {
                    let blocks: Vec<Vec<u8>> = (0..1000).map(|j| vec![(i + j) as u8; 64]).collect();
                    all.wait();
                    blocks.len()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 1000);
        }
    }

    /// Run in a process of its own (the test harness's threads have made arenas
    /// already): with the cap at one, six allocating threads share the arenas that
    /// were there; without it, they make their own.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn with_the_cap_threads_share_arenas_instead_of_making_their_own() {
        const CHILD: &str = "RATELIMIT_TEST_ARENA_CHILD";
        const NAME: &str =
            "trim::tests::with_the_cap_threads_share_arenas_instead_of_making_their_own";
        if let Some(cap) = std::env::var_os(CHILD) {
            if cap == "1" {
                assert!(super::imp::cap_arenas(1), "mallopt refused M_ARENA_MAX");
            }
            allocate_on_six_threads();
            println!("arenas={}", arenas_made());
            return;
        }
        let arenas = |cap: &str| -> usize {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, cap)
                .env_remove("MALLOC_ARENA_MAX")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "child failed: {text}");
            // The harness prints the test's name on the same line.
            text.split("arenas=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no arenas= line in {text}"))
        };
        let capped = arenas("1");
        let uncapped = arenas("0");
        assert!(capped <= 2, "{capped} arenas with the cap at one");
        assert!(uncapped >= 6, "{uncapped} arenas without the cap");
    }

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
