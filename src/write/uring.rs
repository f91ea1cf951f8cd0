//! The io_uring backend: one dedicated thread running a tokio-uring runtime.
//!
//! In: requests from a bounded `tokio::sync::mpsc` channel. Out: each
//! request's result on its own tokio oneshot. Every request becomes a local
//! task on the ring thread, so up to `queue_depth` writes are in the ring at
//! once; each owns its buffer (a `Bytes` refcount), which the kernel hands
//! back with the completion. Aligned writes go through the `O_DIRECT`
//! descriptor when there is one (see `write.rs`); small ones may wait a few
//! milliseconds for their neighbours first (`coalesce.rs`, [`Held`]): the
//! loop wakes for a request, a finished write, or the oldest held write's
//! deadline, and a held write holds its permit, so `close` waits for it.
//!
//! Why a tokio channel and not crossbeam: the ring thread must keep polling
//! its runtime. tokio-uring submits queued entries and reaps completions when
//! the runtime parks; a blocking crossbeam `recv` would park the thread inside
//! `recv` instead, so in-flight writes would neither be submitted nor
//! completed until the next request happened to arrive. Awaiting a tokio
//! receiver yields to the runtime, which waits on the ring and the channel at
//! once.
//!
//! Start-up is a probe: the thread builds the ring and completes a no-op
//! through it before reporting ready, because a seccomp profile can refuse
//! `io_uring_setup` (`EPERM`/`ENOSYS`) or, worse, let setup pass and swallow
//! submissions; the no-op has a deadline for that case.

use std::fs::File;
use std::io;
use std::rc::Rc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::coalesce::{HOLD_MAX, Held, RUN_BYTES, group_adjacent, write_group};
use super::progress::{INTERRUPTED_MAX, write_all_at};
use super::{Fds, Request, URING_START_TIMEOUT, WriterThread, redo_buffered};

/// Start the ring thread for `file`, fed by a channel of `queue_depth`
/// slots. Returns once the ring completed a no-op, or its error.
pub(super) fn start(file: Fds<File>, queue_depth: usize) -> io::Result<(mpsc::Sender<Request>, WriterThread)> {
    let (tx, rx) = mpsc::channel(queue_depth);
    let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
    let (exit_tx, exited) = oneshot::channel();
    let handle = std::thread::Builder::new().name("rehydrate-uring".to_owned()).spawn(move || {
        let _ = exit_tx.send(run(file, rx, queue_depth, HOLD_MAX, ready_tx));
    })?;
    // Bounded wait: a ring that never answers must not hang `open`. On any
    // failure the thread is not joined (tearing down a ring with a stuck
    // no-op may block); it exits on its own, finding `tx` dropped.
    match ready_rx.recv_timeout(URING_START_TIMEOUT + std::time::Duration::from_secs(1)) {
        Ok(Ok(())) => Ok((tx, WriterThread { handle, exited })),
        Ok(Err(e)) => Err(e),
        Err(std_mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("io_uring thread did not start within {URING_START_TIMEOUT:?}"),
        )),
        // The thread panicked while setting up (tokio-uring unwraps some
        // setup steps, e.g. registering the ring with epoll).
        Err(std_mpsc::RecvTimeoutError::Disconnected) => {
            Err(io::Error::other("io_uring thread stopped while starting"))
        }
    }
}

/// The ring thread's body. Reports start-up on `ready`, then serves until
/// the channel is disconnected and drained; returns the file's close result.
fn run(
    file: Fds<File>,
    rx: mpsc::Receiver<Request>,
    queue_depth: usize,
    hold_max: Duration,
    ready: std_mpsc::SyncSender<io::Result<()>>,
) -> io::Result<()> {
    // Requests in flight never exceed queue_depth (one permit each), so a
    // submission queue that large never needs an early flush. The kernel
    // wants a power of two.
    let entries = queue_depth.next_power_of_two().max(8) as u32;
    let runtime = match tokio_uring::Runtime::new(tokio_uring::builder().entries(entries)) {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), format!("io_uring setup: {e}"))));
            return Ok(());
        }
    };
    runtime.block_on(async move {
        match tokio::time::timeout(URING_START_TIMEOUT, tokio_uring::no_op()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = ready.send(Err(io::Error::new(e.kind(), format!("io_uring no-op: {e}"))));
                return Ok(());
            }
            Err(_) => {
                let _ = ready.send(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("io_uring no-op did not complete within {URING_START_TIMEOUT:?}"),
                )));
                return Ok(());
            }
        }
        let _ = ready.send(Ok(()));
        serve(file.map(tokio_uring::fs::File::from_std), rx, queue_depth, hold_max).await
    })
}

async fn serve(
    file: Fds<tokio_uring::fs::File>,
    mut rx: mpsc::Receiver<Request>,
    queue_depth: usize,
    hold_max: Duration,
) -> io::Result<()> {
    let file = Rc::new(file);
    // Bounded by queue_depth: each task holds its request's permit until it
    // answers, and finished tasks are reaped as we go.
    let mut in_flight = JoinSet::new();
    // Small direct writes waiting for their neighbours (`coalesce.rs`). They
    // hold their permits too, so past half the queue they all go.
    let mut held = Held::new(hold_max);
    let held_max = (queue_depth / 2).max(1);
    let mut open = true;
    while open || !held.is_empty() {
        let deadline = held.deadline();
        let mut ready = Vec::new();
        tokio::select! {
            request = rx.recv(), if open => match request {
                Some(request) => {
                    // Whatever else is queued goes with it, so writes that
                    // sit end to end are merged.
                    let now = Instant::now();
                    let mut batch = vec![request];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    for request in batch {
                        match mergeable(&file, &request).filter(|&(_, len)| len < RUN_BYTES) {
                            Some((offset, len)) => ready.extend(held.hold(offset, len, request, now)),
                            None => ready.push(request),
                        }
                    }
                }
                // Disconnected and empty: everything queued was taken.
                None => open = false,
            },
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => log_panic(joined),
            () = sleep_until(deadline), if deadline.is_some() => {}
        }
        ready.extend(held.take_runs());
        let expired = held.deadline().is_some_and(|at| at <= Instant::now());
        if !open || expired || held.len() >= held_max {
            ready.extend(held.take_all());
        }
        for group in group_adjacent(ready, |request| mergeable(&file, request)) {
            in_flight.spawn_local(handle_group(file.clone(), group));
        }
    }
    while let Some(joined) = in_flight.join_next().await {
        log_panic(joined);
    }
    match Rc::try_unwrap(file) {
        Ok(file) => {
            let direct = match file.direct {
                Some(direct) => direct.close().await,
                None => Ok(()),
            };
            file.buffered.close().await.and(direct)
        }
        // Unreachable once every task is joined; the fds close on drop.
        Err(_) => Ok(()),
    }
}

/// Sleep until `deadline`; the caller polls this only when there is one.
async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// A write's offset and length when it may be merged with its neighbours:
/// one that goes through the `O_DIRECT` descriptor.
fn mergeable(file: &Fds<tokio_uring::fs::File>, request: &Request) -> Option<(u64, usize)> {
    match request {
        Request::Write { offset, bytes, .. } => {
            file.direct_for(bytes.as_ptr(), bytes.len(), *offset).map(|_| (*offset, bytes.len()))
        }
        Request::Sync { .. } => None,
    }
}

/// One request, or writes end to end through the `O_DIRECT` descriptor as
/// one vectored write.
async fn handle_group(file: Rc<Fds<tokio_uring::fs::File>>, group: Vec<Request>) {
    // `mergeable` puts only direct writes in a group of more than one.
    let Some(direct) = file.direct.as_ref().filter(|_| group.len() > 1) else {
        for request in group {
            handle(Rc::clone(&file), request).await;
        }
        return;
    };
    let mut blocks = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    for request in group {
        match request {
            Request::Write { offset, bytes, reply, _permit } => {
                blocks.push((offset, bytes));
                replies.push((reply, _permit));
            }
            // `mergeable` keeps syncs out of groups.
            sync @ Request::Sync { .. } => handle(Rc::clone(&file), sync).await,
        }
    }
    let vectored = |bufs: Vec<Bytes>, at: u64| async move { direct.writev_at(bufs, at).await.0 };
    let single = |bytes: Bytes, at: u64| write_block(Rc::clone(&file), bytes, at);
    let (results, covered) = write_group(&blocks, vectored, single).await;
    file.count_merged(covered);
    for ((reply, permit), result) in replies.into_iter().zip(results) {
        let _ = reply.send(result);
        drop(permit);
    }
}

async fn handle(file: Rc<Fds<tokio_uring::fs::File>>, request: Request) {
    match request {
        Request::Write { offset, bytes, reply, _permit } => {
            let _ = reply.send(write_block(file, bytes, offset).await);
        }
        Request::Sync { reply, _permit } => {
            let _ = reply.send(sync_data(&file.buffered).await);
        }
    }
}

/// All of one block at `offset`, short writes resubmitted.
async fn write_block(file: Rc<Fds<tokio_uring::fs::File>>, bytes: Bytes, offset: u64) -> io::Result<()> {
    write_all_at(bytes, offset, |buf, at| write_at(Rc::clone(&file), buf, at)).await
}

/// One write through the ring: through the `O_DIRECT` descriptor when `buf`
/// and `at` are aligned (redone buffered if the kernel refuses it), else
/// buffered.
async fn write_at(file: Rc<Fds<tokio_uring::fs::File>>, buf: Bytes, at: u64) -> (io::Result<usize>, Bytes) {
    if let Some(direct) = file.direct_for(buf.as_ptr(), buf.len(), at) {
        let (result, buf) = direct.write_at(buf, at).submit().await;
        if !redo_buffered(&result) {
            file.count_direct();
            return (result, buf);
        }
        return file.buffered.write_at(buf, at).submit().await;
    }
    file.buffered.write_at(buf, at).submit().await
}

/// `fdatasync` through the ring, retried on `EINTR` at most
/// [`INTERRUPTED_MAX`] times.
async fn sync_data(file: &tokio_uring::fs::File) -> io::Result<()> {
    let mut interrupted_count = 0;
    loop {
        match file.sync_data().await {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted_count < INTERRUPTED_MAX => {
                interrupted_count += 1;
            }
            result => return result,
        }
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    // The task's reply sender dropped with it, so its caller already got
    // "writer thread stopped before answering".
    if let Err(e) = joined {
        tracing::error!(error = %e, "io_uring write task failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test stops loudly at an unexpected error
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use tokio::sync::Semaphore;

    use super::super::{DirectIo, WriteCounts, open_direct};
    use super::*;
    use crate::buf::BufPool;

    const BLOCK: usize = 64 * 1024;

    fn block(fill: u8) -> Bytes {
        block_of(BLOCK, fill)
    }

    fn block_of(len: usize, fill: u8) -> Bytes {
        let mut buf = BufPool::shared().take(len).unwrap();
        buf.extend_from_slice(&vec![fill; len]).unwrap();
        buf.into_bytes()
    }

    /// A target in a fresh directory with its `O_DIRECT` descriptor.
    fn direct_target() -> (tempfile::TempDir, std::path::PathBuf, Fds<File>, Arc<WriteCounts>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let direct = open_direct(&file, DirectIo::On).unwrap();
        assert!(direct.is_some(), "the test directory's filesystem refuses O_DIRECT");
        let counts = Arc::new(WriteCounts::default());
        (dir, path, Fds { buffered: file, direct, counts: Arc::clone(&counts) }, counts)
    }

    #[test]
    fn writes_queued_together_end_to_end_go_as_one_vectored_write_and_the_rest_alone() {
        let (_dir, path, fds, counts) = direct_target();

        // Queued before the ring thread runs, so it finds them all at once:
        // blocks 0-7 out of order, block 9 after a gap, and an unaligned
        // write (a heap buffer) that must go alone, buffered.
        let (tx, rx) = mpsc::channel(64);
        let permits = Arc::new(Semaphore::new(64));
        let mut answers = Vec::new();
        let mut send = |offset: u64, bytes: Bytes| {
            let (reply, answer) = oneshot::channel();
            let _permit = Arc::clone(&permits).try_acquire_owned().unwrap();
            tx.try_send(super::super::Request::Write { offset, bytes, reply, _permit }).unwrap();
            answers.push(answer);
        };
        for i in [3u8, 0, 1, 2, 7, 5, 4, 6, 9] {
            send(u64::from(i) * BLOCK as u64, block(i + 1));
        }
        let tail_offset = 10 * BLOCK as u64;
        send(tail_offset, Bytes::from(vec![0xEE; 1000]));
        drop(tx);
        let (ready, _ready_rx) = std_mpsc::sync_channel(1);
        run(fds, rx, 64, HOLD_MAX, ready).unwrap();

        for answer in answers {
            answer.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(counts.merged.load(Ordering::Relaxed), 8, "blocks 0-7 in one vectored write");
        assert_eq!(counts.direct.load(Ordering::Relaxed), 9, "block 9 went direct alone");
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, tail_offset + 1000);
        for i in [0u8, 1, 2, 3, 4, 5, 6, 7, 9] {
            let at = usize::from(i) * BLOCK;
            assert!(data[at..at + BLOCK].iter().all(|&b| b == i + 1), "block {i}");
        }
        assert!(data[8 * BLOCK..9 * BLOCK].iter().all(|&b| b == 0), "the gap stays a hole");
        assert!(data[10 * BLOCK..].iter().all(|&b| b == 0xEE));
    }

    #[test]
    fn small_writes_arriving_one_at_a_time_are_held_until_their_run_is_whole_or_their_time_is_up() {
        let (_dir, path, fds, counts) = direct_target();
        let quarter = RUN_BYTES / 4;
        let (tx, rx) = mpsc::channel(64);
        let permits = Arc::new(Semaphore::new(64));
        // Each write alone in the queue (the ring thread takes it before the
        // next is sent): blocks 1, 0, 3, 2 make one run of RUN_BYTES; block
        // 5 has no neighbour and goes when its (long, for the test) hold is
        // up, answered while the queue is still open.
        let sender = std::thread::spawn(move || {
            let send = |i: u8| {
                let (reply, answer) = oneshot::channel();
                let _permit = Arc::clone(&permits).try_acquire_owned().unwrap();
                let request = super::super::Request::Write {
                    offset: u64::from(i) * quarter as u64,
                    bytes: block_of(quarter, i + 1),
                    reply,
                    _permit,
                };
                tx.blocking_send(request).unwrap();
                std::thread::sleep(Duration::from_millis(10));
                answer
            };
            let run: Vec<_> = [1u8, 0, 3, 2].into_iter().map(send).collect();
            for answer in run {
                answer.blocking_recv().unwrap().unwrap();
            }
            send(5).blocking_recv().unwrap().unwrap();
        });
        let (ready, _ready_rx) = std_mpsc::sync_channel(1);
        run(fds, rx, 64, Duration::from_secs(2), ready).unwrap();
        sender.join().unwrap();

        assert_eq!(counts.merged.load(Ordering::Relaxed), 4, "blocks 0-3 in one vectored write");
        assert_eq!(counts.direct.load(Ordering::Relaxed), 5, "block 5 went direct alone");
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 6 * quarter);
        for i in [0u8, 1, 2, 3, 5] {
            let at = usize::from(i) * quarter;
            assert!(data[at..at + quarter].iter().all(|&b| b == i + 1), "block {i}");
        }
        assert!(data[4 * quarter..5 * quarter].iter().all(|&b| b == 0), "the gap stays a hole");
    }
}
