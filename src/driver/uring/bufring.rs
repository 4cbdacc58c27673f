//! The provided-buffer ring a core's multishot recvs pick their buffers from
//! (`IORING_REGISTER_PBUF_RING`, kernel 5.19+).
//!
//! The kernel picks a free buffer for each recv completion and names it in the CQE; the loop
//! hands the bytes to the hub (which copies them into the connection's line splitter) and puts
//! the buffer back at once, so every buffer is back in the ring by the end of each completion.
//! Nothing ever pins a pool buffer (ARCHITECTURE.md §3 item 5).
use std::alloc::{self, Layout};
use std::io;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;

/// One ring entry, laid out as the kernel's `struct io_uring_buf`. The `resv` field of entry 0
/// is the ring's tail, written only through [`BufRing::publish`].
#[repr(C)]
struct RawEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const PAGE: usize = 4096;

/// A registered ring of `count` buffers of `buf_size` bytes each, for buffer group `bgid`.
pub(super) struct BufRing {
    entries: NonNull<RawEntry>,
    bufs: NonNull<u8>,
    entries_layout: Layout,
    bufs_layout: Layout,
    count: u16,
    buf_size: u32,
    /// Our copy of the tail: the next entry to fill.
    tail: u16,
    bgid: u16,
}

impl BufRing {
    /// Allocates the ring (page aligned, as the kernel requires) and the buffers, and fills the
    /// ring with every buffer. `count` must be a power of two of at most 32768.
    pub(super) fn new(count: u16, buf_size: u32, bgid: u16) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 32768 || buf_size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad buffer ring geometry"));
        }
        let entries_layout = Layout::from_size_align(usize::from(count) * size_of::<RawEntry>(), PAGE)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bufs_len = usize::from(count) * buf_size as usize;
        let bufs_layout = Layout::from_size_align(bufs_len, PAGE)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have a non-zero size (count >= 1, buf_size >= 1).
        let entries = unsafe { alloc::alloc_zeroed(entries_layout) }.cast::<RawEntry>();
        let Some(entries) = NonNull::new(entries) else { alloc::handle_alloc_error(entries_layout) };
        // SAFETY: as above.
        let bufs = unsafe { alloc::alloc_zeroed(bufs_layout) };
        let Some(bufs) = NonNull::new(bufs) else {
            // SAFETY: `entries` was allocated just above with `entries_layout` and is not used
            // again.
            unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            alloc::handle_alloc_error(bufs_layout)
        };
        let mut ring = Self { entries, bufs, entries_layout, bufs_layout, count, buf_size, tail: 0, bgid };
        for bid in 0..count {
            ring.push(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Registers the ring with `submitter`'s io_uring as buffer group `bgid`.
    ///
    /// # Safety
    ///
    /// `self` must not be dropped while that io_uring can still use it: until the group is
    /// unregistered, or the io_uring is dropped with no op that selects buffers still in
    /// flight.
    pub(super) unsafe fn register(&self, submitter: &Submitter<'_>) -> io::Result<()> {
        // SAFETY: the entry array is `count` page-aligned, initialised entries that live as
        // long as `self`; the caller keeps `self` alive as long as the kernel may use it.
        unsafe {
            submitter.register_buf_ring_with_flags(self.entries.as_ptr() as u64, self.count, self.bgid, 0)
        }
    }

    /// Number of buffers.
    pub(super) fn count(&self) -> u16 {
        self.count
    }

    /// The buffer group id recvs name to select from this ring.
    pub(super) fn bgid(&self) -> u16 {
        self.bgid
    }

    /// The bytes a completion reported for buffer `bid`, or `None` if the CQE names a buffer
    /// or a length this ring does not have (never expected from the kernel).
    pub(super) fn data(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.count || len > self.buf_size as usize {
            return None;
        }
        let offset = usize::from(bid) * self.buf_size as usize;
        // SAFETY: `bid < count` and `len <= buf_size`, so the range lies inside the buffer
        // allocation. The kernel took buffer `bid` out of the ring for this completion and
        // finished writing it before posting the CQE; it will not touch it again until
        // `recycle(bid)` puts it back, which needs `&mut self` and so cannot happen while the
        // returned slice lives.
        Some(unsafe { std::slice::from_raw_parts(self.bufs.as_ptr().add(offset), len) })
    }

    /// Puts buffer `bid` back into the ring and makes it visible to the kernel.
    pub(super) fn recycle(&mut self, bid: u16) {
        if bid < self.count {
            self.push(bid);
            self.publish();
        }
    }

    /// Writes buffer `bid` into the entry at the tail (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        let addr = self.bufs.as_ptr() as u64 + u64::from(bid) * u64::from(self.buf_size);
        // SAFETY: `slot < count`, so the entry is inside the allocation. The kernel only reads
        // entries between its head and the published tail; this one is at or past the tail,
        // so nobody reads it concurrently. Only `addr`, `len` and `bid` are written: `resv` of
        // entry 0 is the tail, which the kernel may read at any time.
        unsafe {
            let e = self.entries.as_ptr().add(slot);
            ptr::addr_of_mut!((*e).addr).write(addr);
            ptr::addr_of_mut!((*e).len).write(self.buf_size);
            ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the tail with a release store, so the kernel sees the entries written before.
    fn publish(&self) {
        // SAFETY: the tail is the `resv` field of entry 0: in bounds, 2-byte aligned (the
        // allocation is page aligned and the field sits at offset 14), and, as the kernel reads
        // it concurrently, only ever accessed atomically by us. `AtomicU16` has the size and
        // alignment of `u16`.
        let tail = unsafe { AtomicU16::from_ptr(ptr::addr_of_mut!((*self.entries.as_ptr()).resv)) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both pointers were allocated in `new` with exactly these layouts and are
        // freed once. The owner guarantees (see `register`) that the kernel no longer uses them.
        unsafe {
            alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            alloc::dealloc(self.bufs.as_ptr(), self.bufs_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_geometry() {
        assert!(BufRing::new(3, 4096, 0).is_err());
        assert!(BufRing::new(4, 0, 0).is_err());
    }

    #[test]
    fn fills_every_buffer_and_publishes_the_tail() {
        let mut ring = BufRing::new(8, 64, 1).unwrap();
        assert_eq!(ring.tail, 8);
        // The data of a buffer is readable; out-of-range ids and lengths are refused.
        assert_eq!(ring.data(7, 64).unwrap().len(), 64);
        assert!(ring.data(8, 1).is_none());
        assert!(ring.data(0, 65).is_none());
        ring.recycle(3);
        assert_eq!(ring.tail, 9);
        // SAFETY: test-only read of the tail the ring just published; nothing else touches it.
        let published = unsafe { AtomicU16::from_ptr(ptr::addr_of_mut!((*ring.entries.as_ptr()).resv)) };
        assert_eq!(published.load(Ordering::Acquire), 9);
        // Entry 0 was rewritten with buffer 3 but kept the tail in its `resv`.
        // SAFETY: as above, entry 0 is in bounds and not shared with a kernel in this test.
        let bid0 = unsafe { ptr::addr_of!((*ring.entries.as_ptr()).bid).read() };
        assert_eq!(bid0, 3);
    }
}
