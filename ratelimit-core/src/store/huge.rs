//! A fixed-length array that asks the kernel for transparent huge pages, and
//! a cache prefetch hint: the crate's only `unsafe` code.
//!
//! The memory store's tables are read at random, one bucket per decision. With
//! a million keys they span tens of megabytes, far beyond what the TLB covers
//! in 4 KiB pages, so nearly every decision also pays a page-table walk (two
//! dimensional under virtualisation). Backing each whole 2 MiB stretch of a
//! table with one huge page removes most of those walks.
//!
//! On Linux an array of at least [`HUGE_PAGE`] bytes is mapped directly from
//! the kernel, 2 MiB-aligned, and marked `MADV_HUGEPAGE` before it is first
//! written: the kernel then backs each whole 2 MiB stretch with a huge page
//! where it has one free (with transparent huge pages set to `madvise` or
//! `always`; with `never` the advice does nothing and the array is an ordinary
//! one). The tail past the last whole 2 MiB stays in small pages, so resident
//! memory is what the array holds, not more, and dropping the array gives it
//! all back to the kernel. Smaller arrays, and every array elsewhere, come from
//! the global allocator. A `Vec` can do neither: it cannot be aligned beyond
//! its element, nor advised before it is filled.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The transparent huge page size (x86-64, and aarch64 with 4 KiB pages).
pub(super) const HUGE_PAGE: usize = 2 << 20;

/// Bytes of arrays mapped directly from the kernel, process-wide.
static MAPPED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently held by huge arrays mapped directly from the kernel (which a
/// counting global allocator does not see).
pub(super) fn mapped_bytes() -> usize {
    MAPPED_BYTES.load(Ordering::Relaxed)
}

/// A heap array of `len` `T`s, fixed at creation.
pub(super) struct HugeArray<T> {
    ptr: NonNull<T>,
    len: usize,
    /// `Some(bytes)` if the memory was mapped directly (and is unmapped on drop);
    /// `None` if it came from the global allocator with [`HugeArray::layout`].
    mapped: Option<usize>,
}

// SAFETY: a `HugeArray<T>` owns its `T`s exactly as a `Box<[T]>` does.
unsafe impl<T: Send> Send for HugeArray<T> {}
// SAFETY: as above; `&HugeArray<T>` only gives out `&T`.
unsafe impl<T: Sync> Sync for HugeArray<T> {}

impl<T> HugeArray<T> {
    /// The allocation for `len` elements (from the global allocator).
    fn layout(len: usize) -> Layout {
        // The tables that use this hold at most 2^24 slots of 48 bytes.
        Layout::array::<T>(len).expect("an array small enough to allocate")
    }

    /// `len` elements, each made by `fill`. (Should `fill` panic, the
    /// memory and the elements made so far are leaked, never read.)
    pub(super) fn new(len: usize, fill: impl Fn() -> T) -> HugeArray<T> {
        let layout = Self::layout(len);
        let (raw, mapped) = if layout.size() >= HUGE_PAGE
            && let Some((raw, bytes)) = map_huge(layout.size())
        {
            (raw, Some(bytes))
        } else if layout.size() == 0 {
            return HugeArray {
                ptr: NonNull::dangling(),
                len,
                mapped: None,
            };
        } else {
            // SAFETY: the layout's size is not zero.
            (unsafe { alloc::alloc(layout) }, None)
        };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            alloc::handle_alloc_error(layout)
        };
        for i in 0..len {
            // SAFETY: `i < len`: inside the memory, which is aligned for `T`
            // (mapped memory is 2 MiB-aligned); each slot is written once,
            // before any read.
            unsafe { ptr.as_ptr().add(i).write(fill()) };
        }
        HugeArray { ptr, len, mapped }
    }
}

impl<T> std::ops::Deref for HugeArray<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised `T`s (or is dangling with a
        // zero-sized allocation), owned by `self`, and lives as long as it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for HugeArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Default for HugeArray<T> {
    fn default() -> Self {
        HugeArray::new(0, || unreachable!("no element is made for an empty array"))
    }
}

impl<T> Drop for HugeArray<T> {
    fn drop(&mut self) {
        // SAFETY: the elements are initialised and dropped once, here.
        unsafe { std::ptr::drop_in_place(&mut **self as *mut [T]) };
        let layout = Self::layout(self.len);
        match self.mapped {
            Some(bytes) => unmap(self.ptr.as_ptr().cast(), bytes),
            // SAFETY: allocated in `new` with this same layout.
            None if layout.size() != 0 => unsafe {
                alloc::dealloc(self.ptr.as_ptr().cast(), layout)
            },
            None => {}
        }
    }
}

/// Maps `len` bytes of fresh zeroed memory, 2 MiB-aligned, advised
/// `MADV_HUGEPAGE` before anything is written to it; returns it and how many
/// bytes were mapped (`len` rounded up to whole pages). `None` if the kernel
/// refuses the mapping (the caller then uses the global allocator).
///
/// Mapped directly rather than through `malloc`: an aligned `malloc` of a few
/// megabytes may be served from heap memory already in use in small pages,
/// which the advice cannot change until `khugepaged` gets to it, and freed
/// memory would stay with the allocator instead of going back to the kernel.
#[cfg(target_os = "linux")]
fn map_huge(len: usize) -> Option<(*mut u8, usize)> {
    // SAFETY: `sysconf` reads a constant of the system.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let bytes = len.checked_next_multiple_of(page)?;
    let total = bytes.checked_add(HUGE_PAGE)?;
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // touches no existing memory.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base.cast::<u8>();
    // Keep the 2 MiB-aligned `bytes` inside `total`, give back the rest.
    let head = (HUGE_PAGE - base as usize % HUGE_PAGE) % HUGE_PAGE;
    let tail = total - head - bytes;
    // SAFETY: `head <= total - bytes`, so the pointer stays inside the mapping.
    let start = unsafe { base.add(head) };
    // SAFETY: `base..start` and `start + bytes..base + total` are parts of the
    // mapping just made, page-aligned (the head is a multiple of the page size
    // because `base` and 2 MiB are), and nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(base.cast(), head);
        }
        if tail > 0 {
            libc::munmap(start.add(bytes).cast(), tail);
        }
    }
    // SAFETY: advice on our own fresh mapping; it changes no contents.
    // Refused (e.g. transparent huge pages are off): the memory works the same.
    let _ = unsafe { libc::madvise(start.cast(), bytes, libc::MADV_HUGEPAGE) };
    MAPPED_BYTES.fetch_add(bytes, Ordering::Relaxed);
    Some((start, bytes))
}

#[cfg(not(target_os = "linux"))]
fn map_huge(_len: usize) -> Option<(*mut u8, usize)> {
    None
}

/// Unmaps what [`map_huge`] mapped.
#[cfg(target_os = "linux")]
fn unmap(ptr: *mut u8, bytes: usize) {
    // SAFETY: `ptr..ptr + bytes` is exactly a mapping made by `map_huge`, whose
    // elements have been dropped; nothing refers to it any more.
    unsafe { libc::munmap(ptr.cast(), bytes) };
    MAPPED_BYTES.fetch_sub(bytes, Ordering::Relaxed);
}

#[cfg(not(target_os = "linux"))]
fn unmap(_ptr: *mut u8, _bytes: usize) {
    unreachable!("nothing is mapped off Linux")
}

/// Asks the CPU to start loading the cache line at `addr` into all cache
/// levels. A hint: `addr` may be stale or point anywhere, nothing is read.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch(addr: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: SSE is part of the x86-64 baseline. `prefetcht0` neither reads
    // the memory into the program nor faults, whatever the address (an
    // unmapped or freed one is ignored), so no pointer validity is needed.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(addr as *const i8) }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(super) fn prefetch(_addr: usize) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn holds_what_it_was_filled_with_and_drops_each_once() {
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Counted(u64);
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Both sides of the huge-page threshold (8-byte elements).
        for len in [0, 1, 1000, HUGE_PAGE / 8 + 3] {
            DROPS.store(0, Ordering::Relaxed);
            let next = AtomicUsize::new(0);
            let mut a =
                HugeArray::new(len, || Counted(next.fetch_add(1, Ordering::Relaxed) as u64));
            assert_eq!(a.len(), len);
            assert!(a.iter().enumerate().all(|(i, c)| c.0 == i as u64));
            if let Some(last) = a.last_mut() {
                last.0 = 7;
                assert_eq!(a[len - 1].0, 7);
            }
            // On Linux, arrays from 2 MiB are mapped directly and 2 MiB-aligned
            // (elsewhere they come from the global allocator).
            if cfg!(target_os = "linux") && len * 8 >= HUGE_PAGE {
                assert_eq!(
                    a.as_ptr() as usize % HUGE_PAGE,
                    0,
                    "huge arrays are 2 MiB-aligned"
                );
                assert!(mapped_bytes() >= len * 8, "huge arrays are mapped directly");
            }
            drop(a);
            assert_eq!(DROPS.load(Ordering::Relaxed), len);
        }
    }
}
