//! Write: verified blocks to the target at their offsets.
//!
//! In: a target file the job opened (this module never opens targets: which
//! file, staging or not, created or reused, is the job's decision), and
//! [`VerifiedBlock`]s with their byte offsets. The type is the integrity
//! gate: nothing else can be written. Out: per write, a future that resolves
//! when every byte of the block is in the target at its offset (short writes
//! are resubmitted, `EINTR` retried, see [`progress`]); per [`Writer::sync`],
//! an `fdatasync` of the target.
//!
//! Engines: the writer of one target runs on dedicated thread(s), never on the
//! tokio workers, fed by one bounded channel.
//! - **io_uring** (`uring.rs`): one thread running a tokio-uring runtime;
//!   up to `queue_depth` writes in flight in the ring at once. Direct writes
//!   it finds queued together that sit end to end go as one vectored write
//!   (`coalesce.rs`): one device request instead of several. A direct write
//!   smaller than 1 MiB is held up to 3 ms, until the writes end to end with
//!   it reach 1 MiB: its future resolves that much later, never unwritten.
//! - **pwrite** (`pwrite.rs`): `pwrite_threads` threads taking requests from
//!   one bounded MPMC channel, for kernels or seccomp profiles without
//!   io_uring.
//!
//! [`BackendChoice::Auto`] starts an io_uring runtime and pushes a no-op
//! through it; if that fails (`ENOSYS`, `EPERM` from a seccomp filter,
//! `io_uring_disabled`), it falls back to pwrite and logs why. An explicit
//! [`BackendChoice::Uring`] that cannot start is an error.
//!
//! Direct I/O: with `direct_io` on (or `auto`, where the filesystem takes
//! it), [`Writer::open`] opens a second descriptor of the same target with
//! `O_DIRECT` (reopening `/proc/self/fd/N`, so callers still hand over one
//! `File`), and each write whose buffer address, length and offset are all
//! multiples of 4096 goes through it: a pooled block (`crate::buf`) goes from
//! its buffer to the device without being copied into the page cache. Any
//! other write (the short tail block, a buffer not from the pool, the
//! unaligned remainder of a short write) goes through the job's descriptor;
//! a direct write refused with `EINVAL` is redone there too. No descriptor
//! gains access: a target opened read-only, or a file type without direct
//! I/O (a pipe, a character device), gets no direct descriptor.
//!
//! Durability is unchanged: [`Writer::sync`] `fdatasync`s the job's
//! descriptor. `fsync(2)` and `fdatasync(2)` act on the file (the inode), not
//! on the descriptor: they flush "all modified in-core data of the file
//! referred to by fd" and the device's write cache, and O_DIRECT only bypasses
//! the page cache, it "does not give the guarantees of O_SYNC" (open(2), NOTES
//! on O_DIRECT). So a direct write completed before the sync sits either on
//! the device (its volatile cache flushed by the sync) or, for metadata it
//! needed (a block allocated, the file size grown, an unwritten extent
//! converted, which ext4 and xfs journal at I/O completion), in the journal
//! transaction the fdatasync of the same inode commits.
//!
//! Limits: at most `queue_depth` requests (writes and syncs) are queued or in
//! flight per target; a caller past that waits on a tokio semaphore (its task
//! yields, no worker thread blocks), so the channel behind it can never be
//! full. Buffers are `Bytes` handed over by reference count and come back with
//! the result: the writer copies nothing.
//!
//! Failures: a write or sync error goes to the caller of that call only; the
//! writer stays usable and the job decides whether to fail. One exception is
//! sticky: after an `fdatasync` fails, every later [`Writer::sync`] fails too,
//! because the kernel may have dropped the dirty pages it could not write and
//! a later "successful" fdatasync would vouch for data that is gone.

mod coalesce;
mod progress;
mod pwrite;
mod uring;

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::verify::VerifiedBlock;

/// Largest accepted `queue_depth`: it sizes the io_uring submission queue
/// (the kernel caps that at 32768 entries) and bounds the blocks one target
/// pins in memory while they wait for the disk.
pub const QUEUE_DEPTH_MAX: usize = 4096;

/// Largest accepted `pwrite_threads`: past a few dozen threads, buffered
/// writes to one file contend on the inode lock and gain nothing.
pub const PWRITE_THREADS_MAX: usize = 64;

/// How long `open` waits for the io_uring thread to set up its ring and
/// complete a no-op. Setup takes microseconds; a ring whose submissions a
/// seccomp filter swallows never answers, and must not hang `open`.
const URING_START_TIMEOUT: Duration = Duration::from_secs(5);

/// Which I/O engine writes the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Probe io_uring at start; fall back to pwrite where it is unavailable.
    #[default]
    Auto,
    Uring,
    Pwrite,
}

/// The backend a writer actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Uring,
    Pwrite,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Pwrite => "pwrite",
        }
    }
}

/// Whether aligned writes bypass the page cache (`O_DIRECT`). In config
/// files: `true`, `false` or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "DirectIoSetting")]
pub enum DirectIo {
    /// Buffered writes only.
    Off,
    /// Open the direct descriptor or fail: a target on a filesystem without
    /// `O_DIRECT` (tmpfs) is refused.
    On,
    /// Open the direct descriptor where the filesystem takes it; write
    /// buffered, and log why, where it does not.
    #[default]
    Auto,
}

/// How `direct_io` is spelled in a config file.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum DirectIoSetting {
    Flag(bool),
    Word(String),
}

impl TryFrom<DirectIoSetting> for DirectIo {
    type Error = String;

    fn try_from(setting: DirectIoSetting) -> Result<Self, String> {
        match setting {
            DirectIoSetting::Flag(true) => Ok(DirectIo::On),
            DirectIoSetting::Flag(false) => Ok(DirectIo::Off),
            DirectIoSetting::Word(word) if word == "auto" => Ok(DirectIo::Auto),
            DirectIoSetting::Word(word) => Err(format!("direct_io is true, false or \"auto\", not {word:?}")),
        }
    }
}

/// How the target is written (`[write]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// `auto` probes io_uring and falls back to pwrite (old kernels, seccomp).
    pub backend: BackendChoice,
    /// `true`, `false` or `"auto"`: aligned block writes through an
    /// `O_DIRECT` descriptor. `auto` falls back to buffered writes where the
    /// filesystem refuses `O_DIRECT` (tmpfs).
    pub direct_io: DirectIo,
    /// Writes queued or in flight per target at most.
    pub queue_depth: NonZeroUsize,
    /// Threads of the pwrite backend.
    pub pwrite_threads: NonZeroUsize,
    /// Allocate a staging file's blocks (the snapshot's stored blocks in the
    /// restore's range) with `fallocate` before the first write: the room is
    /// taken at the start, so a filesystem filling up under a running
    /// restore cannot fail it, and direct writes land in allocated extents
    /// (see `restore/allocate.rs`).
    pub preallocate: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            // io_uring where the kernel allows it: one thread keeps many
            // writes in flight without a thread per write.
            backend: BackendChoice::Auto,
            // Where the filesystem takes it: a pooled block is written from
            // its buffer, not copied into the page cache first (that copy was
            // the largest CPU cost of a restore). See benches/pipeline.rs.
            direct_io: DirectIo::Auto,
            // 64 in flight saturates NVMe queues (they peak around 32 to 64
            // outstanding requests) while pinning at most 64 blocks per target.
            queue_depth: NonZeroUsize::new(64).expect("64 is not zero"),
            // Buffered pwrites mostly copy into the page cache; 4 threads keep
            // a disk busy without crowding a small machine's cores.
            pwrite_threads: NonZeroUsize::new(4).expect("4 is not zero"),
            // A direct write into a hole makes ext4 and xfs allocate, which
            // io_uring cannot do without blocking: it hands each such write
            // to a kernel worker thread, a wake-up and a context switch per
            // block. Into allocated extents the write is issued inline.
            preallocate: true,
        }
    }
}

impl WriterConfig {
    /// Check the limits; `open` calls this too.
    pub fn validate(&self) -> io::Result<()> {
        if self.queue_depth.get() > QUEUE_DEPTH_MAX {
            return Err(invalid(format!(
                "writer queue_depth {} is above the maximum {QUEUE_DEPTH_MAX}",
                self.queue_depth
            )));
        }
        if self.pwrite_threads.get() > PWRITE_THREADS_MAX {
            return Err(invalid(format!(
                "writer pwrite_threads {} is above the maximum {PWRITE_THREADS_MAX}",
                self.pwrite_threads
            )));
        }
        Ok(())
    }
}

/// The writer of one target. Cheap to clone; usable from any async task.
///
/// Lifetime: [`close`](Self::close) on any clone drains the queued work, stops
/// the threads and joins them; later calls on other clones fail with "writer
/// closed". Without `close`, the threads finish the queued work and exit on
/// their own when the last clone is dropped (nobody joins them then).
#[derive(Clone, Debug)]
pub struct Writer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    queue_depth: usize,
    /// One permit per request queued or in flight; the request carries its
    /// permit and drops it once answered.
    permits: Arc<Semaphore>,
    /// Taken out by `close`, which disconnects the threads' receivers.
    queue: Mutex<Option<Queue>>,
    threads: tokio::sync::Mutex<Vec<WriterThread>>,
    /// The first fdatasync failure, kept so no later sync can succeed.
    sync_failure: OnceLock<String>,
    /// Whether an `O_DIRECT` descriptor is open.
    direct_io: bool,
    counts: Arc<WriteCounts>,
}

/// What the backends count of their writes.
#[derive(Debug, Default)]
struct WriteCounts {
    /// Blocks written through the `O_DIRECT` descriptor.
    direct: AtomicU64,
    /// Of those, blocks written by a vectored write of several blocks.
    merged: AtomicU64,
}

/// The target's descriptors as a backend holds them: the job's, and the
/// `O_DIRECT` one when there is one. `F` is `std::fs::File` for the pwrite
/// threads and tokio-uring's file on the ring thread.
#[derive(Debug)]
struct Fds<F> {
    buffered: F,
    direct: Option<F>,
    counts: Arc<WriteCounts>,
}

impl<F> Fds<F> {
    /// The descriptor a write of `len_bytes` from `ptr` at `offset` takes.
    fn direct_for(&self, ptr: *const u8, len_bytes: usize, offset: u64) -> Option<&F> {
        self.direct.as_ref().filter(|_| len_bytes > 0 && crate::buf::is_direct_aligned(ptr, len_bytes, offset))
    }

    fn count_direct(&self) {
        self.counts.direct.fetch_add(1, Ordering::Relaxed);
    }

    /// `blocks` went direct in one vectored write.
    fn count_merged(&self, blocks: usize) {
        self.counts.direct.fetch_add(blocks as u64, Ordering::Relaxed);
        self.counts.merged.fetch_add(blocks as u64, Ordering::Relaxed);
    }

    fn map<G>(self, mut f: impl FnMut(F) -> G) -> Fds<G> {
        Fds { buffered: f(self.buffered), direct: self.direct.map(f), counts: self.counts }
    }
}

impl Fds<File> {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Fds {
            buffered: self.buffered.try_clone()?,
            direct: self.direct.as_ref().map(File::try_clone).transpose()?,
            counts: Arc::clone(&self.counts),
        })
    }
}

/// Whether a direct write failed in a way the buffered descriptor may not:
/// `EINVAL` is how the kernel refuses an alignment or a file it cannot do
/// direct I/O on.
fn redo_buffered(result: &io::Result<usize>) -> bool {
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
}

/// Open `file` again with `O_DIRECT`, per `choice`. `None` when off, when
/// the descriptor is not open for writing (a second one must not grant what
/// the first did not), when the file is neither a regular file nor a block
/// device, or (with [`DirectIo::Auto`]) when the filesystem refuses.
fn open_direct(file: &File, choice: DirectIo) -> io::Result<Option<File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    if choice == DirectIo::Off {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the flags of a descriptor we own (borrowed
    // through `file` for the duration of the call).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let writable = matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR);
    let file_type = file.metadata()?.file_type();
    if !writable || !(file_type.is_file() || file_type.is_block_device()) {
        tracing::debug!(writable, "target takes no O_DIRECT descriptor; writing buffered");
        return Ok(None);
    }
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{fd}"));
    match (opened, choice) {
        (Ok(direct), _) => Ok(Some(direct)),
        (Err(e), DirectIo::Auto) => {
            tracing::warn!(error = %e, "target cannot be opened with O_DIRECT; writing through the page cache");
            Ok(None)
        }
        (Err(e), _) => Err(io::Error::new(e.kind(), format!("write.direct_io = true, but O_DIRECT open failed: {e}"))),
    }
}

/// The sending end of a backend's request channel.
#[derive(Debug)]
enum Queue {
    Pwrite(crossbeam_channel::Sender<Request>),
    Uring(tokio::sync::mpsc::Sender<Request>),
}

/// A dedicated backend thread and the signal it sends when it is done.
#[derive(Debug)]
struct WriterThread {
    handle: JoinHandle<()>,
    /// The thread's last word: its own shutdown error, if any (closing the
    /// file). Dropped unsent if the thread panicked.
    exited: oneshot::Receiver<io::Result<()>>,
}

/// One unit of work for a backend thread.
#[derive(Debug)]
enum Request {
    Write { offset: u64, bytes: Bytes, reply: Reply, _permit: OwnedSemaphorePermit },
    Sync { reply: Reply, _permit: OwnedSemaphorePermit },
}

type Reply = oneshot::Sender<io::Result<()>>;

impl Writer {
    /// Start the backend's thread(s) for `file`, which must be open for
    /// writing. With [`BackendChoice::Auto`] or [`BackendChoice::Uring`] this
    /// waits (a few microseconds, at most [`URING_START_TIMEOUT`]) for the
    /// ring to come up, so the returned writer knows its backend.
    pub fn open(file: File, config: &WriterConfig) -> io::Result<Writer> {
        config.validate()?;
        let queue_depth = config.queue_depth.get();
        let direct = open_direct(&file, config.direct_io)?;
        let direct_io = direct.is_some();
        let counts = Arc::new(WriteCounts::default());
        let file = Fds { buffered: file, direct, counts: Arc::clone(&counts) };
        let (backend, queue, threads) = match config.backend {
            BackendChoice::Pwrite => start_pwrite(file, config)?,
            BackendChoice::Uring => {
                let (queue, thread) = uring::start(file, queue_depth)
                    .map_err(|e| io::Error::new(e.kind(), format!("io_uring writer backend cannot start: {e}")))?;
                tracing::info!(backend = "uring", queue_depth, direct_io, "writer started");
                (Backend::Uring, Queue::Uring(queue), vec![thread])
            }
            BackendChoice::Auto => match uring::start(file.try_clone()?, queue_depth) {
                Ok((queue, thread)) => {
                    tracing::info!(backend = "uring", queue_depth, direct_io, "writer started");
                    (Backend::Uring, Queue::Uring(queue), vec![thread])
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, writing with pwrite threads instead");
                    start_pwrite(file, config)?
                }
            },
        };
        Ok(Writer {
            inner: Arc::new(Inner {
                backend,
                queue_depth,
                permits: Arc::new(Semaphore::new(queue_depth)),
                queue: Mutex::new(Some(queue)),
                threads: tokio::sync::Mutex::new(threads),
                sync_failure: OnceLock::new(),
                direct_io,
                counts,
            }),
        })
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Whether aligned writes go through an `O_DIRECT` descriptor.
    pub fn direct_io(&self) -> bool {
        self.inner.direct_io
    }

    /// Blocks written through the `O_DIRECT` descriptor.
    pub fn direct_writes_count(&self) -> u64 {
        self.inner.counts.direct.load(Ordering::Relaxed)
    }

    /// Of those, blocks written together with the blocks beside them in one
    /// vectored write (io_uring backend, `write/coalesce.rs`).
    pub fn merged_writes_count(&self) -> u64 {
        self.inner.counts.merged.load(Ordering::Relaxed)
    }

    /// Write all of `block` at `offset`. Resolves once every byte was written
    /// (to the page cache for a buffered target: durable only after a later
    /// [`sync`](Self::sync)). Waits first while `queue_depth` requests are
    /// queued or in flight. Dropping the future does not cancel a write
    /// already queued; it still runs and its queue slot is freed when it ends.
    pub async fn write(&self, offset: u64, block: &VerifiedBlock) -> io::Result<()> {
        check_range(offset, block.len())?;
        let permit = self.permit().await?;
        let (reply, answer) = oneshot::channel();
        self.send(Request::Write { offset, bytes: block.bytes().clone(), reply, _permit: permit })?;
        receive(answer).await
    }

    /// `fdatasync` the target.
    ///
    /// Contract: when `sync` returns `Ok`, every write whose future had
    /// resolved `Ok` before `sync` was called is durable. Writes still queued
    /// or in flight when `sync` is called may or may not be covered: to settle
    /// a block, await its write, then call `sync`.
    ///
    /// After one fdatasync of this writer fails, every later `sync` fails
    /// too (see the module doc): durability of this target is then unknown.
    pub async fn sync(&self) -> io::Result<()> {
        self.check_sync_failure()?;
        let permit = self.permit().await?;
        let (reply, answer) = oneshot::channel();
        self.send(Request::Sync { reply, _permit: permit })?;
        let result = receive(answer).await;
        if let Err(e) = &result {
            let _ = self.inner.sync_failure.set(e.to_string());
        }
        // A sync that raced with a failing one must not report success.
        result.and_then(|()| self.check_sync_failure())
    }

    /// Drain every queued and in-flight request, stop the threads and join
    /// them. Does not sync: call [`sync`](Self::sync) first to make the
    /// writes durable. Other clones fail with "writer closed" afterwards.
    /// Returns the first error a thread met shutting down (closing the file),
    /// or that a thread panicked.
    pub async fn close(self) -> io::Result<()> {
        let inner = &self.inner;
        // The semaphore is fair: taking every permit waits for all requests
        // admitted before us to finish, and admits none after us.
        if let Ok(all) = inner.permits.acquire_many(inner.queue_depth as u32).await {
            inner.permits.close();
            drop(all);
        }
        // No await between closing the semaphore and disconnecting, so a
        // concurrent close that saw the semaphore closed finds the queue gone.
        drop(inner.queue.lock().unwrap_or_else(|p| p.into_inner()).take());
        let mut threads = inner.threads.lock().await;
        tracing::debug!(
            direct_blocks = self.direct_writes_count(),
            merged_blocks = self.merged_writes_count(),
            "writer closing"
        );
        let mut result = Ok(());
        for thread in threads.drain(..) {
            let exited = match thread.exited.await {
                Ok(exited) => exited,
                Err(_) => Err(io::Error::other("a writer thread stopped without reporting")),
            };
            // The thread has sent its last word: joining does not block.
            if thread.handle.join().is_err() {
                result = result.and(Err(io::Error::other("a writer thread panicked")));
            }
            result = result.and(exited);
        }
        result
    }

    async fn permit(&self) -> io::Result<OwnedSemaphorePermit> {
        self.inner.permits.clone().acquire_owned().await.map_err(|_| closed())
    }

    fn send(&self, request: Request) -> io::Result<()> {
        let queue = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        // Neither send can find the channel full: it holds at most one
        // request per permit and has a slot per permit.
        match queue.as_ref() {
            None => Err(closed()),
            Some(Queue::Pwrite(tx)) => tx.try_send(request).map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(_) => queue_overflow(),
                crossbeam_channel::TrySendError::Disconnected(_) => stopped(),
            }),
            Some(Queue::Uring(tx)) => tx.try_send(request).map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => queue_overflow(),
                tokio::sync::mpsc::error::TrySendError::Closed(_) => stopped(),
            }),
        }
    }

    fn check_sync_failure(&self) -> io::Result<()> {
        match self.inner.sync_failure.get() {
            None => Ok(()),
            Some(first) => Err(io::Error::other(format!(
                "an earlier fdatasync of this target failed ({first}); \
                 the data it should have made durable may be lost, so no later sync can vouch for it"
            ))),
        }
    }
}

fn start_pwrite(file: Fds<File>, config: &WriterConfig) -> io::Result<(Backend, Queue, Vec<WriterThread>)> {
    // Threads beyond queue_depth could never all have work.
    let threads_count = config.pwrite_threads.get().min(config.queue_depth.get());
    let direct_io = file.direct.is_some();
    let (queue, threads) = pwrite::start(file, threads_count, config.queue_depth.get())?;
    tracing::info!(
        backend = "pwrite",
        threads_count,
        queue_depth = config.queue_depth.get(),
        direct_io,
        "writer started"
    );
    Ok((Backend::Pwrite, Queue::Pwrite(queue), threads))
}

/// Refuse ranges the kernel cannot address. io_uring reads offset -1
/// (`u64::MAX`) as "at the file position", so this is a correctness check,
/// not only a nicer error.
fn check_range(offset: u64, len_bytes: usize) -> io::Result<()> {
    match offset.checked_add(len_bytes as u64) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(invalid(format!("a block of {len_bytes} bytes at offset {offset} ends past the largest file offset"))),
    }
}

async fn receive(answer: oneshot::Receiver<io::Result<()>>) -> io::Result<()> {
    answer.await.unwrap_or_else(|_| Err(stopped()))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "writer closed")
}

fn stopped() -> io::Error {
    io::Error::other("writer thread stopped before answering")
}

fn queue_overflow() -> io::Error {
    // Unreachable while permits and channel capacity agree; an error, not a
    // panic, so a bug here fails one write rather than the process.
    debug_assert!(false, "writer channel full with a permit in hand");
    io::Error::other("writer channel full with a permit in hand (a bug)")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test stops loudly at an unexpected error
mod tests {
    use super::*;

    #[test]
    fn ranges_past_the_largest_offset_are_refused() {
        assert!(check_range(0, 4096).is_ok());
        assert!(check_range(i64::MAX as u64 - 4096, 4096).is_ok());
        assert_eq!(check_range(i64::MAX as u64 - 4095, 4096).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(check_range(u64::MAX, 1).is_err());
    }

    #[test]
    fn direct_io_is_a_flag_or_auto() {
        #[derive(serde::Deserialize)]
        struct Section {
            direct_io: DirectIo,
        }
        let parse = |text: &str| toml::from_str::<Section>(text).map(|s| s.direct_io);
        assert_eq!(parse("direct_io = true").unwrap(), DirectIo::On);
        assert_eq!(parse("direct_io = false").unwrap(), DirectIo::Off);
        assert_eq!(parse("direct_io = \"auto\"").unwrap(), DirectIo::Auto);
        assert!(parse("direct_io = \"sometimes\"").is_err());
        assert!(parse("direct_io = 1").is_err());
    }

    #[test]
    fn limits_are_validated() {
        assert!(WriterConfig::default().validate().is_ok());
        let deep = WriterConfig { queue_depth: NonZeroUsize::new(QUEUE_DEPTH_MAX + 1).unwrap(), ..Default::default() };
        assert!(deep.validate().is_err());
        let many =
            WriterConfig { pwrite_threads: NonZeroUsize::new(PWRITE_THREADS_MAX + 1).unwrap(), ..Default::default() };
        assert!(many.validate().is_err());
    }
}
