//! The transmission phase: read request headers (and WRITE payloads) in
//! order, serve each request on its own task, send simple replies as they
//! finish (out of order, matched by cookie).
//!
//! Bounds: at most `requests_inflight_max` requests of a connection are
//! served at once (the next header is not read before one finishes), and
//! READ/WRITE payloads take their bytes from the server's payload budget
//! before anything is allocated. A request the server cannot serve gets an
//! error reply; a stream that cannot stay in step (a bad magic, a WRITE
//! payload over the limit) is closed.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::proto::{self, Request};
use super::{Shared, Volume, kib};

/// What a served request answers.
type Answer = Result<Vec<u8>, u32>;

/// The replies of one connection, written whole, one at a time.
struct Replies<S> {
    writer: Mutex<WriteHalf<S>>,
    /// Closed when a reply cannot be written: the connection is gone.
    broken: CancellationToken,
}

impl<S: AsyncWrite + Send> Replies<S> {
    async fn send(&self, cookie: u64, answer: Answer) {
        let (error, data) = match answer {
            Ok(data) => (0, data),
            Err(error) => (error, Vec::new()),
        };
        let mut writer = self.writer.lock().await;
        let header = proto::simple_reply(error, cookie);
        let written = async {
            writer.write_all(&header).await?;
            writer.write_all(&data).await?;
            writer.flush().await
        };
        if written.await.is_err() {
            self.broken.cancel();
        }
    }
}

/// Serve requests until DISC, end of stream, a protocol violation or `stop`.
pub(super) async fn run<S, V>(stream: S, shared: Arc<Shared<V>>, stop: CancellationToken) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    V: Volume,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let replies = Arc::new(Replies { writer: Mutex::new(writer), broken: CancellationToken::new() });
    let slots = Arc::new(Semaphore::new(shared.export.limits.requests_inflight_max));
    let mut tasks = JoinSet::new();
    let result = loop {
        while tasks.try_join_next().is_some() {}
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { break Ok(()) };
        let header = tokio::select! {
            () = stop.cancelled() => break Ok(()),
            () = replies.broken.cancelled() => break Ok(()),
            header = read_header(&mut reader) => header,
        };
        let request = match header {
            Ok(Some(request)) => request,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        match admit(&mut reader, &shared, &replies, request).await {
            Ok(Step::Serve(work)) => {
                let (shared, replies) = (Arc::clone(&shared), Arc::clone(&replies));
                tasks.spawn(async move {
                    let answer = serve(&shared, work).await;
                    replies.send(request.cookie, answer).await;
                    drop(slot);
                });
            }
            Ok(Step::Answered) => {}
            Ok(Step::Disconnect) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // Requests already admitted are answered before the connection closes.
    while tasks.join_next().await.is_some() {}
    result
}

/// A request header, or `None` at a clean end of stream.
async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Request>> {
    let mut header = [0u8; proto::REQUEST_HEADER_BYTES];
    match reader.read_exact(&mut header).await {
        Ok(_) => Ok(Some(Request::decode(&header))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// A request that passed its checks, with what it holds.
enum Work {
    Read { offset: u64, len: u32, _bytes: OwnedSemaphorePermit },
    Write { offset: u64, data: Bytes, fua: bool, _bytes: OwnedSemaphorePermit },
    Zeroes { offset: u64, len: u64, fua: bool },
    Flush,
}

enum Step {
    Serve(Work),
    /// Answered already (an error reply).
    Answered,
    Disconnect,
}

/// Check one request against the protocol and the limits; read a WRITE's
/// payload. Errors end the connection.
async fn admit<R, S, V>(reader: &mut R, shared: &Shared<V>, replies: &Replies<S>, r: Request) -> io::Result<Step>
where
    R: AsyncRead + Unpin,
    S: AsyncWrite + Send,
    V: Volume,
{
    if r.magic != proto::REQUEST_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request magic"));
    }
    let limits = &shared.export.limits;
    let size = shared.export.volume.size_bytes();
    let in_range = r.offset.checked_add(u64::from(r.length)).is_some_and(|end| end <= size);
    let fua = r.flags & proto::CMD_FLAG_FUA != 0;
    let refuse = |error| refuse(replies, r.cookie, error);
    match r.command {
        proto::CMD_DISC => Ok(Step::Disconnect),
        proto::CMD_FLUSH => Ok(Step::Serve(Work::Flush)),
        proto::CMD_READ if r.length == 0 || r.length > limits.payload_bytes_max || !in_range => {
            refuse(proto::EINVAL).await
        }
        proto::CMD_READ => {
            let bytes = payload_permit(shared, r.length).await?;
            Ok(Step::Serve(Work::Read { offset: r.offset, len: r.length, _bytes: bytes }))
        }
        proto::CMD_WRITE if r.length > limits.payload_bytes_max => {
            // The payload follows and is too large to take: the stream
            // cannot stay in step.
            replies.send(r.cookie, Err(proto::EINVAL)).await;
            Err(io::Error::new(io::ErrorKind::InvalidData, "WRITE payload over the limit"))
        }
        proto::CMD_WRITE => {
            let bytes = payload_permit(shared, r.length).await?;
            let mut data = BytesMut::zeroed(r.length as usize);
            reader.read_exact(&mut data).await?;
            if !in_range {
                return refuse(proto::ENOSPC).await;
            }
            Ok(Step::Serve(Work::Write { offset: r.offset, data: data.freeze(), fua, _bytes: bytes }))
        }
        proto::CMD_TRIM | proto::CMD_WRITE_ZEROES if !in_range => refuse(proto::ENOSPC).await,
        proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {
            Ok(Step::Serve(Work::Zeroes { offset: r.offset, len: u64::from(r.length), fua }))
        }
        _ => refuse(proto::EINVAL).await,
    }
}

/// Answer with an error; the connection goes on.
async fn refuse<S: AsyncWrite + Send>(replies: &Replies<S>, cookie: u64, error: u32) -> io::Result<Step> {
    replies.send(cookie, Err(error)).await;
    Ok(Step::Answered)
}

async fn payload_permit<V>(shared: &Shared<V>, len: u32) -> io::Result<OwnedSemaphorePermit> {
    // A request larger than the whole budget waits for all of it, not forever.
    let whole = kib(shared.export.limits.inflight_bytes_max).max(1);
    let permits = u32::try_from(kib(u64::from(len)).clamp(1, whole)).unwrap_or(u32::MAX);
    Arc::clone(&shared.payload_budget)
        .acquire_many_owned(permits)
        .await
        .map_err(|_| io::Error::other("payload budget closed"))
}

async fn serve<V: Volume>(shared: &Shared<V>, work: Work) -> Answer {
    let volume = &shared.export.volume;
    let errno = |e: io::Error| proto::errno_of(&e);
    match work {
        Work::Read { offset, len, _bytes } => volume.read(offset, len).await.map_err(errno),
        Work::Write { offset, data, fua, _bytes } => {
            volume.write(offset, data).await.map_err(errno)?;
            if fua {
                volume.flush().await.map_err(errno)?;
            }
            Ok(Vec::new())
        }
        Work::Zeroes { offset, len, fua } => {
            volume.write_zeroes(offset, len).await.map_err(errno)?;
            if fua {
                volume.flush().await.map_err(errno)?;
            }
            Ok(Vec::new())
        }
        Work::Flush => volume.flush().await.map(|()| Vec::new()).map_err(errno),
    }
}
