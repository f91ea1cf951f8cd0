//! Whole-block writes built from partial ones.
//!
//! `pwrite(2)` and an io_uring write may both write fewer bytes than asked (a
//! signal, a full page-cache quota, a device that splits large requests), and
//! may fail with `EINTR` before writing anything. Both backends follow the one
//! rule kept here: a block is written only when every byte of it was. A short
//! write is resubmitted for the remainder at the advanced offset, never counted
//! as done; `EINTR` is retried, at most [`INTERRUPTED_MAX`] times in a row; a
//! write that reports zero bytes for a non-empty remainder is an error
//! (`WriteZero`), since submitting it again would loop forever.
//!
//! [`Progress`] is the pure bookkeeping; [`write_all_at_blocking`] and
//! [`write_all_at`] are the two loops (a blocking one for the pwrite threads, an
//! async one for the io_uring thread) around it, each generic over the single
//! write call so tests can drive them with a fake device.

use std::future::Future;
use std::io;

use bytes::Bytes;

/// Consecutive `EINTR`s tolerated for one block before giving up: a write
/// interrupted this many times in a row without progress is not going to pass.
pub(crate) const INTERRUPTED_MAX: u32 = 64;

/// How much of one block is written.
#[derive(Debug)]
pub(crate) struct Progress {
    offset: u64,
    len_bytes: usize,
    written_bytes: usize,
    interrupted_count: u32,
}

/// The next write to submit, or nothing left to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Done,
    /// Write the block's bytes from `from` to its end at `offset`.
    Submit {
        offset: u64,
        from: usize,
    },
}

impl Progress {
    pub(crate) fn new(offset: u64, len_bytes: usize) -> Self {
        Self { offset, len_bytes, written_bytes: 0, interrupted_count: 0 }
    }

    pub(crate) fn next(&self) -> Next {
        if self.written_bytes == self.len_bytes {
            Next::Done
        } else {
            Next::Submit { offset: self.offset + self.written_bytes as u64, from: self.written_bytes }
        }
    }

    /// Account for the result of the write [`next`](Self::next) asked for.
    /// `Ok` means: ask `next` again; `Err` ends the block with that error.
    pub(crate) fn record(&mut self, result: io::Result<usize>) -> io::Result<()> {
        let remaining_bytes = self.len_bytes - self.written_bytes;
        match result {
            Ok(0) if remaining_bytes > 0 => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "the target accepted 0 of the {remaining_bytes} bytes left at offset {}",
                    self.offset + self.written_bytes as u64
                ),
            )),
            // More than asked is a kernel or backend bug; counting it would
            // claim bytes as written that never were.
            Ok(written) if written > remaining_bytes => {
                Err(io::Error::other(format!("a write of {remaining_bytes} bytes reported {written} bytes written")))
            }
            Ok(written) => {
                self.written_bytes += written;
                self.interrupted_count = 0;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.interrupted_count += 1;
                if self.interrupted_count > INTERRUPTED_MAX {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        format!("write interrupted {INTERRUPTED_MAX} times in a row: {e}"),
                    ));
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Write all of `bytes` at `offset` through `write_at`, a `pwrite`-like call
/// that may write a prefix only.
pub(crate) fn write_all_at_blocking(
    bytes: &[u8],
    offset: u64,
    mut write_at: impl FnMut(&[u8], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut progress = Progress::new(offset, bytes.len());
    while let Next::Submit { offset, from } = progress.next() {
        progress.record(write_at(&bytes[from..], offset))?;
    }
    Ok(())
}

/// Write all of `bytes` at `offset` through `submit`, an owned-buffer write
/// (io_uring style: the buffer goes to the kernel and comes back with the
/// result). Each submission gets `bytes.slice(from..)`, a refcount clone of the
/// remainder, never a copy.
pub(crate) async fn write_all_at<F, Fut>(bytes: Bytes, offset: u64, mut submit: F) -> io::Result<()>
where
    F: FnMut(Bytes, u64) -> Fut,
    Fut: Future<Output = (io::Result<usize>, Bytes)>,
{
    let mut progress = Progress::new(offset, bytes.len());
    while let Next::Submit { offset, from } = progress.next() {
        // The buffer coming back is the remainder we gave; the kernel is done
        // with it, so dropping it only drops a reference.
        let (result, _remainder) = submit(bytes.slice(from..), offset).await;
        progress.record(result)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test stops loudly at an unexpected error
mod tests {
    use super::*;

    /// A device that takes at most `chunk_bytes` per call and is interrupted
    /// every `interrupt_every`-th call, recording what landed where.
    struct FakeDevice {
        data: Vec<u8>,
        chunk_bytes: usize,
        interrupt_every: usize,
        calls: usize,
    }

    impl FakeDevice {
        fn new(len: usize, chunk_bytes: usize, interrupt_every: usize) -> Self {
            Self { data: vec![0; len], chunk_bytes, interrupt_every, calls: 0 }
        }

        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
            self.calls += 1;
            if self.interrupt_every > 0 && self.calls.is_multiple_of(self.interrupt_every) {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let n = buf.len().min(self.chunk_bytes);
            let at = offset as usize;
            self.data[at..at + n].copy_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn one_byte_writes_are_resubmitted_until_the_block_is_whole() {
        let block = pattern(1000);
        let mut device = FakeDevice::new(1100, 1, 0);
        write_all_at_blocking(&block, 100, |b, o| device.write_at(b, o)).unwrap();
        assert_eq!(device.calls, 1000);
        assert_eq!(&device.data[100..], &block[..]);
        assert!(device.data[..100].iter().all(|&b| b == 0));
    }

    #[test]
    fn interrupted_writes_are_retried_and_short_writes_resumed() {
        let block = pattern(5000);
        let mut device = FakeDevice::new(5000, 333, 3);
        write_all_at_blocking(&block, 0, |b, o| device.write_at(b, o)).unwrap();
        assert_eq!(device.data, block);
    }

    #[test]
    fn endless_interrupts_give_up() {
        let mut calls = 0;
        let err = write_all_at_blocking(&[1, 2, 3], 0, |_, _| {
            calls += 1;
            Err(io::Error::from(io::ErrorKind::Interrupted))
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert_eq!(calls, INTERRUPTED_MAX as usize + 1);
    }

    #[test]
    fn zero_progress_and_overcount_are_errors_not_success() {
        let err = write_all_at_blocking(&[1, 2, 3], 0, |_, _| Ok(0)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
        assert!(write_all_at_blocking(&[1, 2, 3], 0, |_, _| Ok(4)).is_err());
        let err =
            write_all_at_blocking(&[1, 2, 3], 0, |_, _| Err(io::Error::from_raw_os_error(libc::EIO))).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn empty_block_needs_no_write() {
        write_all_at_blocking(&[], 0, |_, _| panic!("nothing to write")).unwrap();
    }

    #[tokio::test]
    async fn owned_buffer_loop_resubmits_one_byte_writes() {
        let block = Bytes::from(pattern(777));
        let mut device = FakeDevice::new(777 + 4096, 1, 5);
        let mut offsets = Vec::new();
        write_all_at(block.clone(), 4096, |buf, offset| {
            offsets.push(offset);
            let result = device.write_at(&buf, offset);
            std::future::ready((result, buf))
        })
        .await
        .unwrap();
        assert_eq!(&device.data[4096..], &block[..]);
        // Every resubmission starts where the last byte landed (interrupted
        // calls repeat their offset).
        assert!(offsets.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
        assert_eq!(*offsets.last().unwrap(), 4096 + 776);
    }
}
