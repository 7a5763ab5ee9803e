//! The process's allocator: mimalloc, with instances' host-side allocations kept apart
//! from the connections' own.
//!
//! Why: a hibernated connection drops its instance (the store, the instance's tables,
//! wasmtime's records of it: about 13 KB in many small allocations) and keeps its socket,
//! buffers and parked state (about 6 KB). In one shared heap the two interleave: when a
//! burst of connections hibernates, the freed instance memory lies in holes between
//! long-lived allocations, and the pages at the edges of every hole stay resident. With
//! glibc that came to 5-8 KB per hibernated connection that no trim could give back
//! (bench/README.md, "where a hibernated connection's memory goes").
//!
//! [`SegregatingAllocator`] is the binary's global allocator (and the tests'). While a
//! thread runs instance code ([`in_instance_scope`]: building the instance's WASI
//! context and its store, and every poll of a callback, where wasmtime and the host
//! functions the guest calls allocate), its allocations go to that thread's *instance
//! heap*, a mimalloc heap of their own. Instance pages then hold only instance
//! allocations, empty out together when the instances go, and
//! [`give_back_freed_memory`] returns them to the system. Anything is freed from any
//! thread and either heap with `mi_free`: a frame a guest's `send` allocated and the
//! socket writer frees is fine. Something long-lived that a host function makes inside
//! the scope (a channel inbox on the first `subscribe`) only keeps part of an instance
//! page resident; it is never wrong.
//!
//! In-process embedders with another global allocator lose nothing but the segregation:
//! the scope is then a thread-local flag nobody reads.
//!
//! Operators can tune mimalloc with its `MIMALLOC_*` environment variables; the one
//! default changed here is [`configure`]'s.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use libmimalloc_sys as mi;

thread_local! {
    /// Whether this thread is running instance code now.
    static IN_SCOPE: Cell<bool> = const { Cell::new(false) };
    /// This thread's instance heap, made on first use: mimalloc allocates from a heap
    /// only on the thread that made it.
    static INSTANCE_HEAP: Cell<*mut mi::mi_heap_t> = const { Cell::new(std::ptr::null_mut()) };
}

/// Runs `f` with the current thread's allocations going to its instance heap; the scope
/// before is restored after, also when `f` panics.
#[inline]
pub fn in_instance_scope<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = IN_SCOPE.try_with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(IN_SCOPE.try_with(|flag| flag.replace(true)).unwrap_or(false));
    f()
}

/// mimalloc's `mi_option_arena_eager_commit`: its place in the option enum of the
/// mimalloc 3 that libmimalloc-sys 0.1.49 builds, which does not name it
/// (runtime/Cargo.toml pins that exact version for this).
const ARENA_EAGER_COMMIT: mi::mi_option_t = 4;

static CONFIGURED: AtomicBool = AtomicBool::new(false);

/// Sets mimalloc's defaults before its first arena exists (a `MIMALLOC_*` variable in
/// the environment still wins). On Linux mimalloc commits an arena up front by default,
/// and a purge then only marks freed pages reusable: they stay in the process's RSS
/// until the kernel wants them. Committed on demand, a purge decommits them, so the
/// memory of hibernated instances leaves the RSS when it is given back (measured: 13 →
/// 7.8 KB per hibernated connection at 10,000, bench/README.md).
#[cold]
fn configure() {
    // SAFETY: sets one of mimalloc's options; allocates nothing.
    unsafe { mi::mi_option_set_default(ARENA_EAGER_COMMIT, 0) };
    CONFIGURED.store(true, Ordering::Relaxed);
}

/// The heap for an allocation now: this thread's instance heap inside an instance
/// scope, else `None` (mimalloc's default heap for the thread).
#[inline]
fn scoped_heap() -> Option<*mut mi::mi_heap_t> {
    if !CONFIGURED.load(Ordering::Relaxed) {
        configure();
    }
    if !IN_SCOPE.try_with(Cell::get).unwrap_or(false) {
        return None;
    }
    INSTANCE_HEAP
        .try_with(|cell| {
            if cell.get().is_null() {
                // SAFETY: mimalloc makes the heap record from its own memory; it never
                // calls back into this allocator.
                cell.set(unsafe { mi::mi_heap_new() });
            }
            cell.get()
        })
        .ok()
        .filter(|heap| !heap.is_null())
}

/// mimalloc, with instance allocations in heaps of their own (see the module doc).
pub struct SegregatingAllocator;

// SAFETY: every block comes from mimalloc (either heap) and goes back through `mi_free`
// or a mimalloc realloc, which take blocks of any heap from any thread; alignment is
// passed through to mimalloc's aligned calls.
unsafe impl GlobalAlloc for SegregatingAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: mimalloc's allocation calls, on a heap made by this thread.
        unsafe {
            match scoped_heap() {
                Some(heap) => mi::mi_heap_malloc_aligned(heap, size, align).cast(),
                None => mi::mi_malloc_aligned(size, align).cast(),
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as in `alloc`.
        unsafe {
            match scoped_heap() {
                Some(heap) => mi::mi_heap_zalloc_aligned(heap, size, align).cast(),
                None => mi::mi_zalloc_aligned(size, align).cast(),
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the calls above (GlobalAlloc's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old, align) = (ptr.cast::<c_void>(), layout.align());
        // SAFETY: `ptr` came from this allocator; a block that has to move is copied
        // into the heap of the scope now and the old one freed wherever it lived.
        unsafe {
            match scoped_heap() {
                Some(heap) => mi::mi_heap_realloc_aligned(heap, old, new_size, align).cast(),
                None => mi::mi_realloc_aligned(old, new_size, align).cast(),
            }
        }
    }
}

/// Gives freed memory back to the system now, rather than after mimalloc's purge delay
/// (and the next allocation that notices it passed). Takes a few milliseconds at worst:
/// called on the blocking pool while connections hibernate, and once the addons are
/// compiled.
pub fn give_back_freed_memory() {
    // SAFETY: both only touch their allocator's own state, under its own locks.
    unsafe {
        mi::mi_collect(true);
        // What C code in the process allocated (few: the C allocator is not Rust's).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    //! The allocator's contract, called directly. The library's unit tests and the
    //! end-to-end suite also run with it as their global allocator, so every test of the
    //! server exercises it as well.
    use super::*;

    unsafe extern "C" {
        /// mimalloc 3: the heap a block belongs to (not in the -sys crate's bindings).
        fn mi_heap_of(p: *const c_void) -> *mut mi::mi_heap_t;
    }

    fn heap_of(ptr: *mut u8) -> *mut mi::mi_heap_t {
        // SAFETY: `ptr` is a live mimalloc block.
        unsafe { mi_heap_of(ptr.cast()) }
    }

    fn instance_heap() -> *mut mi::mi_heap_t {
        INSTANCE_HEAP.with(Cell::get)
    }

    #[test]
    fn inside_a_scope_allocations_come_from_the_threads_instance_heap() {
        let alloc = SegregatingAllocator;
        let layout = Layout::from_size_align(48, 8).unwrap();
        // SAFETY: valid layouts; every block is freed once, with its layout.
        unsafe {
            let outside = alloc.alloc(layout);
            let inside = in_instance_scope(|| alloc.alloc(layout));
            let zeroed = in_instance_scope(|| alloc.alloc_zeroed(layout));
            assert!(!instance_heap().is_null(), "the scope made this thread's instance heap");
            assert_eq!(heap_of(inside), instance_heap());
            assert_eq!(heap_of(zeroed), instance_heap());
            assert_ne!(heap_of(outside), instance_heap());
            assert!(std::slice::from_raw_parts(zeroed, 48).iter().all(|&b| b == 0));
            for block in [outside, inside, zeroed] {
                alloc.dealloc(block, layout);
            }
        }
    }

    #[test]
    fn scopes_nest_and_restore_what_was_before_even_on_a_panic() {
        let alloc = SegregatingAllocator;
        let layout = Layout::from_size_align(32, 8).unwrap();
        in_instance_scope(|| {
            in_instance_scope(|| {});
            // SAFETY: as above.
            let block = unsafe { alloc.alloc(layout) };
            assert_eq!(heap_of(block), instance_heap(), "still inside the outer scope");
            unsafe { alloc.dealloc(block, layout) };
        });
        let caught = std::panic::catch_unwind(|| in_instance_scope(|| panic!("a guest poll panicked")));
        assert!(caught.is_err());
        assert!(!IN_SCOPE.with(Cell::get), "the panic did not leave the scope on");
    }

    #[test]
    fn a_block_moves_between_heaps_on_realloc_and_keeps_its_bytes() {
        let alloc = SegregatingAllocator;
        let small = Layout::from_size_align(16, 8).unwrap();
        // SAFETY: as above; each realloc's result replaces the block it was given.
        unsafe {
            // Made by the connection, grown by host code inside a guest's call.
            let block = alloc.alloc(small);
            block.copy_from(b"connection bytes".as_ptr(), 16);
            let grown = in_instance_scope(|| alloc.realloc(block, small, 4096));
            assert_eq!(heap_of(grown), instance_heap(), "moved into the instance heap");
            assert_eq!(std::slice::from_raw_parts(grown, 16), b"connection bytes");
            // And back: grown again outside the scope, it leaves the instance heap.
            let big = Layout::from_size_align(4096, 8).unwrap();
            let back = alloc.realloc(grown, big, 1 << 20);
            assert_ne!(heap_of(back), instance_heap());
            assert_eq!(std::slice::from_raw_parts(back, 16), b"connection bytes");
            alloc.dealloc(back, Layout::from_size_align(1 << 20, 8).unwrap());
        }
    }

    #[test]
    fn alignment_is_kept_in_both_heaps() {
        let alloc = SegregatingAllocator;
        for align in [1, 8, 64, 4096, 1 << 16] {
            let layout = Layout::from_size_align(align * 3, align).unwrap();
            // SAFETY: as above.
            unsafe {
                let outside = alloc.alloc(layout);
                let inside = in_instance_scope(|| alloc.alloc(layout));
                assert_eq!(outside as usize % align, 0, "align {align}, shared heap");
                assert_eq!(inside as usize % align, 0, "align {align}, instance heap");
                let moved = in_instance_scope(|| alloc.realloc(inside, layout, align * 7));
                assert_eq!(moved as usize % align, 0, "align {align}, after realloc");
                alloc.dealloc(outside, layout);
                alloc.dealloc(moved, Layout::from_size_align(align * 7, align).unwrap());
            }
        }
    }

    #[test]
    fn instance_blocks_are_freed_from_other_threads() {
        let alloc = SegregatingAllocator;
        let layout = Layout::from_size_align(256, 8).unwrap();
        // A guest's frames, freed by whichever thread writes them to the socket.
        let blocks: Vec<usize> =
            in_instance_scope(|| (0..1000).map(|_| unsafe { alloc.alloc(layout) } as usize).collect());
        let heap = instance_heap() as usize;
        std::thread::spawn(move || {
            for block in blocks {
                assert_eq!(heap_of(block as *mut u8) as usize, heap);
                // SAFETY: each block once, with its layout.
                unsafe { SegregatingAllocator.dealloc(block as *mut u8, layout) };
            }
        })
        .join()
        .unwrap();
        // This thread's instance heap takes the room back and keeps serving.
        let again = in_instance_scope(|| unsafe { alloc.alloc(layout) });
        assert_eq!(heap_of(again), instance_heap());
        unsafe { alloc.dealloc(again, layout) };
        give_back_freed_memory();
    }

    #[test]
    fn the_arena_commit_default_is_set_before_the_first_allocation() {
        // Any allocation configures first: this test process has allocated plenty.
        let _ = Box::new(1u8);
        assert!(CONFIGURED.load(Ordering::Relaxed));
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            // SAFETY: reads an option.
            assert_eq!(unsafe { mi::mi_option_get(ARENA_EAGER_COMMIT) }, 0);
        }
    }
}
