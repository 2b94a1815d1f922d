//! What Rust's standard library gives a `wasm32-wasip2` component, for a
//! handler built without it (`default-features = false`): an allocator,
//! `cabi_realloc` (the canonical ABI's allocator entry point), `memcmp`, and
//! a panic handler.
//!
//! Why a handler would: std on `wasm32-wasip2` links wasi-libc, whose
//! stdio and environment support import 19 WASI functions through two more
//! core instances (a shim and its fix-up). wharf instantiates a component
//! per message by default, and building those imports and instances is a
//! large part of that cost. Without std the component imports only the
//! wharf functions it calls (`docs/BENCHMARKS.md`, *The thirty-first
//! session*).
//!
//! The allocator is talc, given the initial linear memory above the
//! static data first (mapped and zeroed already), and only then more pages
//! by `memory.grow`: growing memory costs a fresh instance more than the
//! whole rest of a small handler's run.

use core::alloc::Layout;
use core::arch::wasm32;
use core::fmt::Write;

use talc::{OomHandler, Span, Talc, Talck, locking::AssumeUnlockable};

const PAGE: usize = 64 * 1024;

unsafe extern "C" {
    /// The first byte above the static data and the stack (set by the linker).
    static __heap_base: u8;
}

/// talc's out-of-memory side: the memory above `__heap_base` first, then
/// `memory.grow`, extending the heap when the new pages follow it.
struct HeapTail {
    heap: Span,
}

impl OomHandler for HeapTail {
    fn handle_oom(talc: &mut Talc<Self>, layout: Layout) -> Result<(), ()> {
        if talc.oom_handler.heap.is_empty() {
            let base = &raw const __heap_base as *mut u8;
            let end = (wasm32::memory_size(0) * PAGE) as *mut u8;
            // SAFETY: nothing else uses linear memory above `__heap_base`.
            if let Ok(heap) = unsafe { talc.claim(Span::new(base, end)) } {
                talc.oom_handler.heap = heap;
                return Ok(());
            }
        }
        // Room for the allocation and talc's metadata.
        let pages = (layout.size() + layout.align() + 64).div_ceil(PAGE);
        let previous = wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            return Err(());
        }
        let (start, end) = ((previous * PAGE) as *mut u8, ((previous + pages) * PAGE) as *mut u8);
        let heap = talc.oom_handler.heap;
        talc.oom_handler.heap = match heap.get_base_acme() {
            // SAFETY: `heap` is talc's heap, and the new pages follow it.
            Some((base, acme)) if acme == start => unsafe { talc.extend(heap, Span::new(base, end)) },
            // SAFETY: fresh pages nobody else uses.
            _ => unsafe { talc.claim(Span::new(start, end))? },
        };
        Ok(())
    }
}

/// A component instance runs on one thread, so the lock can be a no-op.
#[global_allocator]
static ALLOCATOR: Talck<AssumeUnlockable, HeapTail> = Talc::new(HeapTail { heap: Span::empty() }).lock();

/// The canonical ABI's allocator: how the host writes a message's strings and
/// lists into the guest.
///
/// # Safety
/// Called by the host as the canonical ABI specifies: `old` is null with
/// `old_len` 0, or a block this function returned with that size and `align`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(old: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: the canonical ABI passes a power-of-two `align`, and `old` as
    // the function's contract says.
    let block = unsafe {
        if old_len == 0 {
            alloc::alloc::alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            alloc::alloc::realloc(old, Layout::from_size_align_unchecked(old_len, align), new_len)
        }
    };
    if block.is_null() {
        // The host reports the trap (with the memory cap when that was it).
        wasm32::unreachable()
    }
    block
}

/// Byte comparison, which the compiler calls for slice and string equality
/// (wasi-libc provides it to std builds).
///
/// # Safety
/// `a` and `b` are valid for reads of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as the function's contract says.
    let (a, b) = unsafe { (core::slice::from_raw_parts(a, n), core::slice::from_raw_parts(b, n)) };
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return i32::from(*x) - i32::from(*y);
        }
    }
    0
}

/// A panic is a trap, as in a std build; its message goes to the host's log
/// first (tagged with the handler and message id), where a std build's goes
/// to stderr. The message is formatted into a buffer on the stack, so a panic
/// for a failed allocation still gets logged.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = Line {
        bytes: [0; 512],
        len: 0,
    };
    let _ = write!(line, "handler panicked: {info}");
    let text = match core::str::from_utf8(&line.bytes[..line.len]) {
        Ok(text) => text,
        // Cut inside a character: keep what is whole.
        Err(e) => core::str::from_utf8(&line.bytes[..e.valid_up_to()]).unwrap_or_default(),
    };
    crate::log::error(text);
    wasm32::unreachable()
}

/// A fixed-size line that keeps what fits.
struct Line {
    bytes: [u8; 512],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
