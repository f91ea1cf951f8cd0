//! Buffers: page-aligned block buffers, reused through a bounded pool.
//!
//! In: a length wanted. Out: an [`AlignedBuf`] whose address is a multiple of
//! [`ALIGN_BYTES`] and whose capacity is the length rounded up to its size
//! class (a multiple of [`ALIGN_BYTES`]), so a whole block in it can go to the
//! target with `O_DIRECT` (see `write.rs`) and a store can read a body into it
//! directly, with no second copy to assemble it. An `AlignedBuf` fills like a
//! `Vec` (its length grows up to its capacity), reads as a `[u8]` of its
//! length, and turns into a [`Bytes`] without a copy
//! ([`AlignedBuf::into_bytes`]); when the last clone of that `Bytes` drops,
//! the buffer goes back to its pool.
//!
//! Why a pool: a restore moves every block through a fresh buffer of the same
//! size. Allocating and freeing 1 MiB buffers at that rate costs page faults
//! and leaves glibc holding freed arenas (the resident set grew to ~200 MiB
//! for a 128 MiB in-flight budget); a pool hands the same pages back out.
//!
//! Limits: the free list keeps at most `retained_bytes_max` bytes of idle
//! buffers (the process-wide pool: the in-flight byte budget, which already
//! bounds the buffers in use); a buffer coming back past that is freed. One
//! buffer is at most [`LEN_MAX_BYTES`]: [`BufPool::take`] answers `None` above
//! that and the caller uses an ordinary allocation. Allocation failure aborts,
//! as it does for a `Vec`.
//!
//! Safety: the one `unsafe` part is [`RawBuf`], which owns one allocation of
//! `Layout(capacity, ALIGN_BYTES)`, zeroed when made, so every byte of the
//! capacity is always initialised and the safe API can hand out any part of
//! it. Each `RawBuf` is owned by exactly one `AlignedBuf` or one free-list
//! slot, so a buffer cannot be returned twice or used after it went back.

use std::alloc::Layout;
use std::collections::HashMap;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

/// Buffer addresses and capacities are multiples of this: the logical block
/// size `O_DIRECT` needs on every common device (512-byte devices accept it
/// too), and the page size, so a buffer never shares a page with another.
pub const ALIGN_BYTES: usize = 4096;

/// The largest buffer the pool makes: more than any block object (blocks are
/// at most 64 MiB), small enough that a hostile length cannot make us
/// allocate without bound.
pub const LEN_MAX_BYTES: usize = 1 << 30;

/// Idle bytes the process-wide pool keeps until [`Engine`](crate::restore::Engine)
/// sets it to the in-flight budget: the budget's default.
const SHARED_RETAINED_BYTES_MAX_DEFAULT: usize = 128 << 20;

/// The capacity of the size class a buffer of `len_bytes` comes from: 8
/// classes per power of two (so the slack is under 1/8 of the next power of
/// two, a quarter of the length at worst), never less than [`ALIGN_BYTES`]. Block sizes that are powers of two, or multiples of
/// 4 KiB below 32 KiB, get a class of exactly their size.
pub fn class_capacity_bytes(len_bytes: usize) -> usize {
    let len_bytes = len_bytes.max(1);
    let step_bytes = (len_bytes.next_power_of_two() / 8).max(ALIGN_BYTES);
    len_bytes.div_ceil(step_bytes) * step_bytes
}

/// A pool of aligned buffers. Cheap to clone; clones share the free list.
#[derive(Clone, Debug)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    free: Mutex<FreeList>,
    retained_bytes_max: AtomicUsize,
    /// Buffers allocated fresh (not reused) over the pool's life.
    allocated_count: AtomicUsize,
}

#[derive(Debug, Default)]
struct FreeList {
    by_capacity: HashMap<usize, Vec<RawBuf>>,
    retained_bytes: usize,
}

impl BufPool {
    /// A pool keeping at most `retained_bytes_max` bytes of idle buffers.
    pub fn new(retained_bytes_max: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                free: Mutex::new(FreeList::default()),
                retained_bytes_max: AtomicUsize::new(retained_bytes_max),
                allocated_count: AtomicUsize::new(0),
            }),
        }
    }

    /// The process-wide pool the stores and the verifier fill blocks into.
    /// Like the in-flight budget, one per process: buffers are memory, and
    /// memory is bounded per process, not per job.
    pub fn shared() -> &'static BufPool {
        static SHARED: OnceLock<BufPool> = OnceLock::new();
        SHARED.get_or_init(|| BufPool::new(SHARED_RETAINED_BYTES_MAX_DEFAULT))
    }

    /// Change the idle-bytes bound; buffers already idle past it are freed.
    pub fn set_retained_bytes_max(&self, retained_bytes_max: usize) {
        self.inner.retained_bytes_max.store(retained_bytes_max, Ordering::Relaxed);
        let mut free = self.inner.lock();
        while free.retained_bytes > retained_bytes_max {
            let Some(raw) = free.pop_any() else { break };
            drop(raw);
        }
    }

    /// An empty buffer of capacity at least `len_bytes` (its size class), a
    /// reused one if one is idle. `None` above [`LEN_MAX_BYTES`].
    pub fn take(&self, len_bytes: usize) -> Option<AlignedBuf> {
        if len_bytes > LEN_MAX_BYTES {
            return None;
        }
        let capacity_bytes = class_capacity_bytes(len_bytes);
        let reused = self.inner.lock().pop(capacity_bytes);
        let raw = reused.unwrap_or_else(|| {
            self.inner.allocated_count.fetch_add(1, Ordering::Relaxed);
            RawBuf::new_zeroed(capacity_bytes)
        });
        Some(AlignedBuf { raw: Some(raw), len_bytes: 0, pool: Arc::clone(&self.inner) })
    }

    /// Bytes of idle buffers held now.
    pub fn retained_bytes(&self) -> usize {
        self.inner.lock().retained_bytes
    }

    /// Buffers allocated fresh so far (a reused buffer does not count).
    pub fn allocated_count(&self) -> usize {
        self.inner.allocated_count.load(Ordering::Relaxed)
    }
}

impl PoolInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, FreeList> {
        // The free list is consistent between statements: a panic elsewhere
        // while it was held cannot have left it half-updated.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `raw` for reuse, or free it when the pool is full.
    fn give_back(&self, raw: RawBuf) {
        let retained_bytes_max = self.retained_bytes_max.load(Ordering::Relaxed);
        let mut free = self.lock();
        if free.retained_bytes + raw.capacity_bytes <= retained_bytes_max {
            free.retained_bytes += raw.capacity_bytes;
            free.by_capacity.entry(raw.capacity_bytes).or_default().push(raw);
        }
        // Otherwise `raw` drops here and is freed (after the guard: it was
        // declared first, so it drops last).
    }
}

impl FreeList {
    fn pop(&mut self, capacity_bytes: usize) -> Option<RawBuf> {
        let raw = self.by_capacity.get_mut(&capacity_bytes)?.pop()?;
        self.retained_bytes -= raw.capacity_bytes;
        Some(raw)
    }

    fn pop_any(&mut self) -> Option<RawBuf> {
        let capacity_bytes = *self.by_capacity.iter().find(|(_, list)| !list.is_empty())?.0;
        self.pop(capacity_bytes)
    }
}

/// A buffer from a [`BufPool`]: `len()` bytes of content in a page-aligned
/// allocation of `capacity()` bytes. Goes back to its pool when dropped.
pub struct AlignedBuf {
    /// Always `Some` until `drop` takes it out.
    raw: Option<RawBuf>,
    len_bytes: usize,
    pool: Arc<PoolInner>,
}

impl AlignedBuf {
    fn raw(&self) -> &RawBuf {
        self.raw.as_ref().expect("an AlignedBuf holds its buffer until dropped")
    }

    fn raw_mut(&mut self) -> &mut RawBuf {
        self.raw.as_mut().expect("an AlignedBuf holds its buffer until dropped")
    }

    pub fn capacity(&self) -> usize {
        self.raw().capacity_bytes
    }

    /// The bytes past the content, up to the capacity: fill them, then
    /// [`set_len`](Self::set_len). Their old content is unspecified (zeros or
    /// a previous block's bytes), never uninitialised.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let len_bytes = self.len_bytes;
        &mut self.raw_mut().as_mut_slice()[len_bytes..]
    }

    /// Set the content length. Panics past the capacity (a programmer error:
    /// the caller sized the buffer).
    pub fn set_len(&mut self, len_bytes: usize) {
        assert!(len_bytes <= self.capacity(), "length {len_bytes} past capacity {}", self.capacity());
        self.len_bytes = len_bytes;
    }

    /// Append `data`; refused (nothing appended) if it does not fit.
    pub fn extend_from_slice(&mut self, data: &[u8]) -> Result<(), CapacityExceeded> {
        let spare = self.spare_mut();
        let Some(room) = spare.get_mut(..data.len()) else {
            return Err(CapacityExceeded { capacity_bytes: self.capacity() });
        };
        room.copy_from_slice(data);
        self.len_bytes += data.len();
        Ok(())
    }

    /// Read from `reader` until the content is `len_bytes` long or the reader
    /// ends (retrying `EINTR`). Returns the content length reached.
    /// `len_bytes` past the capacity is clamped to it.
    pub fn read_to_len(&mut self, reader: &mut impl io::Read, len_bytes: usize) -> io::Result<usize> {
        let len_bytes = len_bytes.min(self.capacity());
        while self.len_bytes < len_bytes {
            let want_bytes = len_bytes - self.len_bytes;
            match reader.read(&mut self.spare_mut()[..want_bytes]) {
                Ok(0) => break,
                Ok(n) => self.len_bytes += n.min(want_bytes),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.len_bytes)
    }

    /// The content as `Bytes`, without a copy. The buffer goes back to its
    /// pool when the last clone (or slice) of the `Bytes` is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// An append that would run past a buffer's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer of {capacity_bytes} bytes is full")]
pub struct CapacityExceeded {
    pub capacity_bytes: usize,
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.raw().as_slice()[..self.len_bytes]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len_bytes = self.len_bytes;
        &mut self.raw_mut().as_mut_slice()[..len_bytes]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len_bytes", &self.len_bytes).field("capacity", &self.capacity()).finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.pool.give_back(raw);
        }
    }
}

/// One allocation of `capacity_bytes` aligned to [`ALIGN_BYTES`], owned.
/// Every byte is initialised (zeroed at allocation).
struct RawBuf {
    ptr: NonNull<u8>,
    capacity_bytes: usize,
}

// SAFETY: a RawBuf owns its allocation outright (like a Box<[u8]>); nothing
// else points into it, so moving it to another thread or sharing `&RawBuf`
// (which only yields `&[u8]`) is as safe as for a Vec<u8>.
unsafe impl Send for RawBuf {}
// SAFETY: as above; `&RawBuf` gives read-only access only.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    fn layout(capacity_bytes: usize) -> Layout {
        // Callers pass a class capacity: a non-zero multiple of ALIGN_BYTES,
        // at most LEN_MAX_BYTES rounded up, far below isize::MAX.
        Layout::from_size_align(capacity_bytes, ALIGN_BYTES).expect("a class capacity is a valid layout")
    }

    fn new_zeroed(capacity_bytes: usize) -> Self {
        debug_assert!(capacity_bytes > 0 && capacity_bytes.is_multiple_of(ALIGN_BYTES));
        let layout = Self::layout(capacity_bytes);
        // SAFETY: the layout has a non-zero size (a class capacity is at
        // least ALIGN_BYTES).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else { std::alloc::handle_alloc_error(layout) };
        Self { ptr, capacity_bytes }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `capacity_bytes` bytes, all
        // initialised (zeroed at allocation, written only through slices
        // since), owned by `self`; the borrow of `self` keeps it alive and
        // unaliased by any `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity_bytes) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity_bytes) }
    }
}

impl std::fmt::Debug for RawBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBuf").field("capacity_bytes", &self.capacity_bytes).finish()
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this same layout and is
        // freed only here, once, as the RawBuf that owns it drops.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity_bytes)) }
    }
}

/// Whether `ptr`, `len_bytes` and `offset` are all multiples of
/// [`ALIGN_BYTES`]: what an `O_DIRECT` write needs.
pub fn is_direct_aligned(ptr: *const u8, len_bytes: usize, offset: u64) -> bool {
    (ptr as usize).is_multiple_of(ALIGN_BYTES)
        && len_bytes.is_multiple_of(ALIGN_BYTES)
        && offset.is_multiple_of(ALIGN_BYTES as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test stops loudly at an unexpected error
mod tests {
    use super::*;

    #[test]
    fn classes_are_aligned_and_tight() {
        assert_eq!(class_capacity_bytes(0), 4096);
        assert_eq!(class_capacity_bytes(1), 4096);
        assert_eq!(class_capacity_bytes(4096), 4096);
        assert_eq!(class_capacity_bytes(4097), 8192);
        assert_eq!(class_capacity_bytes(12288), 12288);
        assert_eq!(class_capacity_bytes(1 << 20), 1 << 20);
        assert_eq!(class_capacity_bytes(3 << 19), 3 << 19);
        assert_eq!(class_capacity_bytes((1 << 20) + 1), (1 << 20) + (1 << 18));
        for len in (1..(1 << 22)).step_by(4093) {
            let cap = class_capacity_bytes(len);
            assert!(cap >= len && cap.is_multiple_of(ALIGN_BYTES), "{len} -> {cap}");
            assert!(cap - len < (len / 4).max(ALIGN_BYTES), "{len} -> {cap}: too much slack");
        }
    }

    #[test]
    fn buffers_are_aligned_and_sized() {
        let pool = BufPool::new(16 << 20);
        for len in [1, 4096, 5000, 1 << 20, 300_000] {
            let buf = pool.take(len).unwrap();
            assert!((buf.as_ptr() as usize).is_multiple_of(ALIGN_BYTES));
            assert_eq!(buf.capacity(), class_capacity_bytes(len));
            assert_eq!(buf.len(), 0);
        }
        assert!(pool.take(LEN_MAX_BYTES + 1).is_none());
    }

    #[test]
    fn lengths_grow_only_within_capacity() {
        let pool = BufPool::new(1 << 20);
        let mut buf = pool.take(4096).unwrap();
        buf.extend_from_slice(&[1; 4000]).unwrap();
        assert_eq!(buf.extend_from_slice(&[2; 97]), Err(CapacityExceeded { capacity_bytes: 4096 }));
        assert_eq!(buf.len(), 4000, "a refused append appends nothing");
        buf.extend_from_slice(&[2; 96]).unwrap();
        assert_eq!((buf.len(), buf[3999], buf[4000]), (4096, 1, 2));
        assert!(buf.spare_mut().is_empty());
        buf.set_len(10);
        assert_eq!(&buf[..], &[1; 10]);
        let bytes = buf.into_bytes();
        assert_eq!(&bytes[..], &[1; 10]);
    }

    #[test]
    #[should_panic(expected = "past capacity")]
    fn set_len_past_capacity_is_a_bug() {
        BufPool::new(0).take(1).unwrap().set_len(4097);
    }

    #[test]
    fn read_to_len_stops_at_the_length_or_the_end() {
        let pool = BufPool::new(1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut buf = pool.take(8192).unwrap();
        assert_eq!(buf.read_to_len(&mut &data[..], 8192).unwrap(), 8192);
        assert_eq!(&buf[..], &data[..8192]);
        let mut short = pool.take(20_000).unwrap();
        assert_eq!(short.read_to_len(&mut &data[..], 20_000).unwrap(), 10_000);
        assert_eq!(&short[..], &data[..]);
    }

    #[test]
    fn buffers_come_back_once_the_last_bytes_clone_drops() {
        let pool = BufPool::new(4 << 20);
        let mut buf = pool.take(1 << 20).unwrap();
        let ptr = buf.as_ptr() as usize;
        buf.extend_from_slice(&[7; 100]).unwrap();
        let bytes = buf.into_bytes();
        let (clone, slice) = (bytes.clone(), bytes.slice(10..20));
        drop(bytes);
        drop(clone);
        assert_eq!(pool.retained_bytes(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7; 10]);
        drop(slice);
        // Back exactly once, however many clones there were.
        assert_eq!(pool.retained_bytes(), 1 << 20);
        let again = pool.take(1 << 20).unwrap();
        assert_eq!((again.as_ptr() as usize, again.len()), (ptr, 0), "the idle buffer is reused, empty");
        assert_eq!(pool.allocated_count(), 1);
        drop(again);
        assert_eq!(pool.retained_bytes(), 1 << 20);
    }

    #[test]
    fn a_recycled_buffer_shows_only_the_new_content() {
        let pool = BufPool::new(4 << 20);
        let mut first = pool.take(1 << 20).unwrap();
        first.extend_from_slice(&vec![0xAA; 1 << 20]).unwrap();
        drop(first.into_bytes());
        // The same pages come back for a shorter block: its bytes are only
        // what was put in, never the previous block's tail.
        let mut again = pool.take(1 << 20).unwrap();
        assert_eq!((again.len(), pool.allocated_count()), (0, 1));
        again.extend_from_slice(&[0x55; 100]).unwrap();
        let bytes = again.into_bytes();
        assert_eq!(&bytes[..], &[0x55; 100][..]);
        drop(bytes);
        // Past the content the capacity holds old bytes (initialised, never
        // part of a block unless written again).
        let mut third = pool.take(1 << 20).unwrap();
        assert_eq!((third.len(), pool.allocated_count()), (0, 1));
        assert_eq!((third.spare_mut()[99], third.spare_mut()[100]), (0x55, 0xAA));
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let pool = BufPool::new(2 << 20);
        let bufs: Vec<_> = (0..4).map(|_| pool.take(1 << 20).unwrap()).collect();
        assert_eq!(pool.allocated_count(), 4);
        drop(bufs);
        assert_eq!(pool.retained_bytes(), 2 << 20, "two kept, two freed");
        pool.set_retained_bytes_max(1 << 20);
        assert_eq!(pool.retained_bytes(), 1 << 20);
        // Another size class is not served from this one.
        let small = pool.take(4096).unwrap();
        assert_eq!(pool.allocated_count(), 5);
        drop(small);
        assert_eq!(pool.retained_bytes(), 1 << 20, "no room for it");
    }

    #[test]
    fn buffers_cross_threads() {
        let pool = BufPool::new(8 << 20);
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mut buf = pool.take(65536).unwrap();
                        buf.extend_from_slice(&[i; 65536]).unwrap();
                        let bytes = buf.into_bytes();
                        assert!(bytes.iter().all(|&b| b == i));
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        assert!(pool.allocated_count() <= 4, "{} allocated for 4 threads", pool.allocated_count());
        assert_eq!(pool.retained_bytes(), pool.allocated_count() * 65536);
    }

    #[test]
    fn direct_alignment_needs_all_three() {
        let pool = BufPool::new(0);
        let mut buf = pool.take(8192).unwrap();
        buf.set_len(8192);
        assert!(is_direct_aligned(buf.as_ptr(), 8192, 4096));
        assert!(!is_direct_aligned(buf.as_ptr(), 8000, 4096));
        assert!(!is_direct_aligned(buf.as_ptr(), 8192, 100));
        assert!(!is_direct_aligned(buf[1..].as_ptr(), 4096, 0));
    }
}
