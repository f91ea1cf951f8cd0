//! The pwrite backend: a small pool of threads doing blocking `pwrite(2)` and
//! `fdatasync(2)`, for where io_uring is unavailable.
//!
//! In: requests from one bounded crossbeam channel, shared by all threads
//! (MPMC: whichever thread is free takes the next request, so one slow write
//! does not hold up the others). Out: each request's result on its own tokio
//! oneshot. The threads share the target's descriptors (the job's, and the
//! `O_DIRECT` one for aligned writes, see `write.rs`); `pwrite` carries its
//! offset, so they never contend on a file position. A thread exits when the channel is
//! disconnected (the writer closed or dropped) and empty.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::progress::{INTERRUPTED_MAX, write_all_at_blocking};
use super::{Fds, Request, WriterThread, redo_buffered};

/// Start `threads_count` threads writing `file`, fed by a channel of
/// `queue_depth` slots.
pub(super) fn start(
    file: Fds<File>,
    threads_count: usize,
    queue_depth: usize,
) -> io::Result<(crossbeam_channel::Sender<Request>, Vec<WriterThread>)> {
    let (tx, rx) = crossbeam_channel::bounded(queue_depth);
    let file = Arc::new(file);
    let mut threads = Vec::with_capacity(threads_count);
    for index in 0..threads_count {
        let (file, rx) = (file.clone(), rx.clone());
        let (exit_tx, exited) = oneshot::channel();
        // On a spawn error, `tx` drops with this function's return, so the
        // threads already started see the channel disconnect and exit.
        let handle = std::thread::Builder::new().name(format!("rehydrate-pwrite-{index}")).spawn(move || {
            serve(&file, &rx);
            // Let go of the file before saying we are done: once every
            // thread has, the fd is closed when `close` returns.
            drop(file);
            let _ = exit_tx.send(Ok(()));
        })?;
        threads.push(WriterThread { handle, exited });
    }
    Ok((tx, threads))
}

fn serve(file: &Fds<File>, rx: &crossbeam_channel::Receiver<Request>) {
    // recv keeps returning queued requests after the senders are gone, so a
    // close drains the queue before the threads stop.
    while let Ok(request) = rx.recv() {
        match request {
            Request::Write { offset, bytes, reply, _permit } => {
                let result = write_all_at_blocking(&bytes, offset, |buf, at| write_at(file, buf, at));
                let _ = reply.send(result);
                // `_permit` drops here: the queue slot frees once answered.
            }
            Request::Sync { reply, _permit } => {
                let _ = reply.send(sync_data(&file.buffered));
            }
        }
    }
}

/// One `pwrite`: through the `O_DIRECT` descriptor when `buf` and `at` are
/// aligned (redone buffered if the kernel refuses it), else buffered.
fn write_at(file: &Fds<File>, buf: &[u8], at: u64) -> io::Result<usize> {
    if let Some(direct) = file.direct_for(buf.as_ptr(), buf.len(), at) {
        let result = direct.write_at(buf, at);
        if !redo_buffered(&result) {
            file.count_direct();
            return result;
        }
    }
    file.buffered.write_at(buf, at)
}

/// `fdatasync`, retried on `EINTR` (it did not run to completion, so
/// nothing was reported lost), at most [`INTERRUPTED_MAX`] times.
fn sync_data(file: &File) -> io::Result<()> {
    let mut interrupted_count = 0;
    loop {
        match file.sync_data() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted_count < INTERRUPTED_MAX => {
                interrupted_count += 1;
            }
            result => return result,
        }
    }
}
