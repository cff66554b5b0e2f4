//! Test builds only: a global allocator that keeps, per thread, the bytes
//! live in the heap, so a test can state what a structure costs. Each
//! allocation counts as the chunk glibc's malloc gives it (size plus an
//! 8-byte header, rounded up to 16, at least 32), so the figure tracks
//! the agent's resident memory rather than the sizes Rust asks for.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

/// The chunk glibc would hand out for `size` bytes.
fn chunk(size: usize) -> isize {
    ((size + 8).div_ceil(16) * 16).max(32) as isize
}

fn count(delta: isize) {
    // A thread being torn down may no longer reach its counter.
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(chunk(layout.size()));
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(chunk(layout.size()));
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-chunk(layout.size()));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(chunk(new_size) - chunk(layout.size()));
        System.realloc(ptr, layout, new_size)
    }
}

/// Bytes this thread has allocated and not freed (negative when it freed
/// more than it allocated).
pub(crate) fn live() -> isize {
    LIVE.with(Cell::get)
}
