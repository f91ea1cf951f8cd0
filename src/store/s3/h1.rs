//! A minimal HTTP/1.1 client for one origin, for the S3 store's GETs
//! (`get.rs`): pooled keep-alive connections (TCP, or TLS with rustls), one
//! request per connection at a time, and a body reader that reads the socket
//! straight into the caller's buffer.
//!
//! Why not hyper: hyper reads every body into its own growing read buffer and
//! hands out chunks of it, which a block store then copies into its aligned
//! block buffer; the buffer's growth makes the kernel zero fresh pages, and
//! the copy is a second pass over every byte. Here the response head is read
//! into a small buffer (a few body bytes that arrive with it are the only
//! bytes copied) and the rest of a `Content-Length` body goes from the socket
//! into the block buffer by `read`. Before a request whose answer may be 1 MiB
//! or more, the connection's receive buffer is sized to hold that answer (up
//! to a cap, [`Client::with_receive_buffer`]), so it arrives in one go and is
//! read in large pieces.
//!
//! Limits: a response head is at most [`HEAD_LEN_MAX_BYTES`] and
//! [`HEADERS_MAX`] headers; at most [`IDLE_CONNS_MAX`] idle connections are
//! kept, each for at most [`POOL_IDLE`]; a chunk-size line is at most
//! [`LINE_LEN_MAX_BYTES`]. A connection goes back to the pool only after its
//! body was read to the end and the answer did not ask to close it; any error
//! closes it. A request on a pooled connection that the server had closed
//! (no byte of an answer) is sent once more on a new connection: a GET is
//! idempotent, and the server did not see it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A response head longer than this is refused.
pub const HEAD_LEN_MAX_BYTES: usize = 64 * 1024;
/// A response with more headers than this is refused.
const HEADERS_MAX: usize = 64;
/// The first read for a head: S3 heads are well under 1 KiB, and whatever
/// body bytes come with the head are copied once, so this stays small.
const HEAD_READ_BYTES: usize = 4096;
/// Idle connections kept at most (more than any fetch window in flight).
const IDLE_CONNS_MAX: usize = 512;
/// A pooled connection idle this long is closed (S3 closes idle
/// connections after about 20 s, nginx after its keepalive_timeout).
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Answers at least this long get a receive buffer sized to hold them
/// ([`Client::with_receive_buffer`]); shorter ones are left to the kernel,
/// whose buffer starts at 128 KiB and grows. Measured on the loopback
/// fixture, 2 GiB, alternating runs: 1 MiB blocks took 0.89 x the time with
/// the buffer sized, 256 KiB blocks 1.15 x.
const SIZED_ANSWER_MIN_BYTES: u64 = 1 << 20;
/// A chunked body's size line longer than this is refused.
const LINE_LEN_MAX_BYTES: usize = 4096;

/// Where requests go: scheme, host and port of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// The `Host` header: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port { self.host.clone() } else { format!("{}:{}", self.host, self.port) }
    }
}

/// Why a request got no response head.
#[derive(Debug)]
pub enum SendError {
    /// No connection (refused, unreachable, timed out, TLS handshake failed).
    Connect(String),
    /// The connection broke before a whole head arrived.
    Io(String),
    /// The answer was not HTTP/1.x as we read it.
    Malformed(String),
}

/// A pool of connections to one [`Origin`].
pub struct Client {
    origin: Origin,
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    /// The most a connection's `SO_RCVBUF` is set to; `None`: the kernel's
    /// sizing.
    receive_buffer_bytes: Option<usize>,
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1::Client").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `origin`; `https` uses rustls with the system's roots.
    pub fn new(origin: Origin, connect_timeout: Duration) -> io::Result<Client> {
        let tls = if origin.tls {
            use hyper_rustls::ConfigBuilderExt;
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(io::Error::other)?
                .with_native_roots()?
                .with_no_client_auth();
            Some(TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Client { origin, tls, connect_timeout, receive_buffer_bytes: None, idle: Mutex::new(Vec::new()) })
    }

    /// Size each connection's receive buffer (`SO_RCVBUF`) to the answer
    /// expected, at most `cap` bytes; `None` leaves it to the kernel.
    pub fn with_receive_buffer(mut self, cap: Option<usize>) -> Client {
        self.receive_buffer_bytes = cap;
        self
    }

    /// The receive buffer for an answer of at most `answer_len_bytes` body
    /// bytes: none below [`SIZED_ANSWER_MIN_BYTES`] (the kernel's own sizing
    /// serves those better; a connection sized for a larger answer before
    /// keeps that size, since the kernel does not tune a buffer set by hand
    /// again); else the body and a head, rounded up to a power of two (so
    /// blocks of one size need no resizing between requests), at most the
    /// cap.
    fn receive_buffer_for(&self, answer_len_bytes: u64) -> Option<usize> {
        let cap = self.receive_buffer_bytes?;
        if answer_len_bytes < SIZED_ANSWER_MIN_BYTES {
            return None;
        }
        let wanted = usize::try_from(answer_len_bytes).unwrap_or(usize::MAX).saturating_add(HEAD_READ_BYTES);
        Some(wanted.checked_next_power_of_two().unwrap_or(usize::MAX).min(cap))
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Send `request` (a whole request head, ending in an empty line) and
    /// read the answer's head; `answer_len_bytes`: the most body bytes
    /// expected, which sizes the receive buffer (see [`Client::with_receive_buffer`]).
    /// A pooled connection the server had closed is replaced by a new one
    /// once.
    pub async fn send(&self, request: &[u8], answer_len_bytes: u64) -> Result<Response, SendError> {
        let receive_buffer = self.receive_buffer_for(answer_len_bytes);
        if let Some(mut conn) = self.checkout() {
            conn.size_receive_buffer(receive_buffer).map_err(|e| SendError::Io(format!("SO_RCVBUF: {e}")))?;
            match exchange(conn, request).await {
                Ok(response) => return Ok(response),
                // Nothing came back on a reused connection: the server
                // closed it while it was idle. Try once on a new one.
                Err(Exchange::Stale) => {}
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
        let mut conn = self.connect().await?;
        conn.size_receive_buffer(receive_buffer).map_err(|e| SendError::Connect(format!("SO_RCVBUF: {e}")))?;
        match exchange(conn, request).await {
            Ok(response) => Ok(response),
            Err(Exchange::Stale) => Err(SendError::Io("connection closed before an answer".into())),
            Err(Exchange::Failed(e)) => Err(e),
        }
    }

    /// Give a connection whose answer was read to the end back to the pool.
    pub fn release(&self, response: Response) {
        let Some(conn) = response.into_reusable() else { return };
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < IDLE_CONNS_MAX {
            idle.push((conn, Instant::now()));
        }
    }

    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        // The oldest idle connections are at the front; drop the expired.
        let expired = idle.iter().take_while(|(_, since)| now.duration_since(*since) >= POOL_IDLE).count();
        idle.drain(..expired);
        idle.pop().map(|(conn, _)| conn)
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let address = (self.origin.host.as_str(), self.origin.port);
        let what = format!("{}:{}", self.origin.host, self.origin.port);
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(SendError::Connect(format!("connect to {what} failed: {e}"))),
            Err(_) => {
                let ms = self.connect_timeout.as_millis();
                return Err(SendError::Connect(format!("connect to {what}: no connection within {ms} ms")));
            }
        };
        tcp.set_nodelay(true).map_err(|e| SendError::Connect(format!("{what}: TCP_NODELAY: {e}")))?;
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.origin.host.clone())
                    .map_err(|e| SendError::Connect(format!("{what}: not a TLS server name: {e}")))?;
                let handshake = connector.connect(name, tcp);
                let tls = match tokio::time::timeout(self.connect_timeout, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return Err(SendError::Connect(format!("TLS handshake with {what} failed: {e}"))),
                    Err(_) => return Err(SendError::Connect(format!("TLS handshake with {what} timed out"))),
                };
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(Conn { stream, reused: false, receive_buffer: None })
    }
}

/// One connection, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

struct Conn {
    stream: Stream,
    /// It served a request before: an immediate close means it went stale.
    reused: bool,
    /// The `SO_RCVBUF` last set; `None`: the kernel's sizing.
    receive_buffer: Option<usize>,
}

impl Conn {
    /// Set the receive buffer to `bytes` unless it is that already (one
    /// `setsockopt` when the expected answer's size changes, not per request).
    fn size_receive_buffer(&mut self, bytes: Option<usize>) -> io::Result<()> {
        let Some(bytes) = bytes else { return Ok(()) };
        if self.receive_buffer == Some(bytes) {
            return Ok(());
        }
        let tcp = match &self.stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        };
        socket2::SockRef::from(tcp).set_recv_buffer_size(bytes)?;
        self.receive_buffer = Some(bytes);
        Ok(())
    }
}

enum Exchange {
    Stale,
    Failed(SendError),
}

/// Write the request and read the answer's head.
async fn exchange(mut conn: Conn, request: &[u8]) -> Result<Response, Exchange> {
    let reused = conn.reused;
    let broke = |e: io::Error| {
        let stale = reused
            && matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
            );
        if stale { Exchange::Stale } else { Exchange::Failed(SendError::Io(e.to_string())) }
    };
    conn.stream.write_all(request).await.map_err(broke)?;
    // TLS may hold the last record back until flushed (TCP: a no-op).
    conn.stream.flush().await.map_err(broke)?;
    let mut buf = vec![0; HEAD_READ_BYTES];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= HEAD_LEN_MAX_BYTES {
                let e = format!("response head longer than {HEAD_LEN_MAX_BYTES} bytes");
                return Err(Exchange::Failed(SendError::Malformed(e)));
            }
            buf.resize((buf.len() * 2).min(HEAD_LEN_MAX_BYTES), 0);
        }
        let n = conn.stream.read(&mut buf[filled..]).await.map_err(broke)?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a whole response head");
            return Err(if filled == 0 { broke(e) } else { Exchange::Failed(SendError::Io(e.to_string())) });
        }
        filled += n;
        if let Some((head, head_len)) = parse_head(&buf[..filled]).map_err(Exchange::Failed)? {
            buf.truncate(filled);
            let body = Buffered { buf, pos: head_len };
            let framing = match (head.chunked, head.content_length) {
                (true, _) => Framing::Chunked { left_in_chunk: 0, state: ChunkState::Size },
                (false, Some(len)) => Framing::Length { left: len },
                (false, None) => Framing::Close,
            };
            return Ok(Response { head, conn, body, framing, done: false });
        }
    }
}

/// What the caller needs from a response head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// The server closes the connection after this answer.
    pub close: bool,
    pub retry_after: Option<String>,
}

/// Parse a head from the start of `bytes`: `None` while incomplete, else
/// the head and its length.
fn parse_head(bytes: &[u8]) -> Result<Option<(Head, usize)>, SendError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(SendError::Malformed(format!("unreadable response head: {e}"))),
    };
    let status = response.code.unwrap_or(0);
    let mut head = Head { status, close: response.version != Some(1), ..Head::default() };
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let len = value.parse::<u64>().map_err(|_| malformed(format!("malformed Content-Length {value:?}")))?;
            if head.content_length.is_some_and(|other| other != len) {
                return Err(malformed("conflicting Content-Length headers".into()));
            }
            head.content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !head.chunked {
                return Err(malformed(format!("unsupported Transfer-Encoding {value:?}")));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let tokens = || value.split(',').map(str::trim);
            if tokens().any(|t| t.eq_ignore_ascii_case("close")) {
                head.close = true;
            } else if tokens().any(|t| t.eq_ignore_ascii_case("keep-alive")) {
                head.close = false;
            }
        } else if name.eq_ignore_ascii_case("retry-after") {
            head.retry_after = Some(value.to_owned());
        }
    }
    // 1xx, 204 and 304 carry no body whatever the headers say (GET gets no 1xx
    // here: we send no Expect).
    if matches!(status, 100..=199 | 204 | 304) {
        head.content_length = Some(0);
        head.chunked = false;
    }
    Ok(Some((head, head_len)))
}

fn malformed(message: String) -> SendError {
    SendError::Malformed(message)
}

/// Bytes read past the head, not yet handed out.
struct Buffered {
    buf: Vec<u8>,
    pos: usize,
}

impl Buffered {
    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take_into(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.buf.len() - self.pos);
        dst[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        n
    }
}

/// How the body's end is known.
enum Framing {
    Length {
        left: u64,
    },
    Chunked {
        left_in_chunk: u64,
        state: ChunkState,
    },
    /// Neither: the body ends when the server closes the connection.
    Close,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data,
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
}

/// An answer whose head was read; its body is read with [`Response::read`].
pub struct Response {
    head: Head,
    conn: Conn,
    body: Buffered,
    framing: Framing,
    done: bool,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1::Response").field("head", &self.head).finish_non_exhaustive()
    }
}

impl Response {
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Read body bytes into `dst`: 0 at the end of the body. A body cut
    /// short of its framing is an `UnexpectedEof` error.
    pub async fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if self.done || dst.is_empty() {
            return Ok(0);
        }
        match self.framing {
            Framing::Length { left } => {
                if left == 0 {
                    self.done = true;
                    return Ok(0);
                }
                let want = dst.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = self.read_raw(&mut dst[..want]).await?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-body"));
                }
                self.framing = Framing::Length { left: left - n as u64 };
                Ok(n)
            }
            Framing::Chunked { .. } => self.read_chunked(dst).await,
            Framing::Close => {
                let n = self.read_raw(dst).await?;
                self.done = n == 0;
                Ok(n)
            }
        }
    }

    /// Bytes after the head: what came with it first, then the socket.
    async fn read_raw(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if !self.body.is_empty() {
            return Ok(self.body.take_into(dst));
        }
        self.conn.stream.read(dst).await
    }

    async fn read_chunked(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            let Framing::Chunked { left_in_chunk, state } = self.framing else { unreachable!("chunked framing") };
            match state {
                ChunkState::Size => {
                    let line = self.read_line().await?;
                    let size_text = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size_text, 16)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "malformed chunk size"))?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        while !self.read_line().await?.is_empty() {}
                        self.done = true;
                        return Ok(0);
                    }
                    self.framing = Framing::Chunked { left_in_chunk: size, state: ChunkState::Data };
                }
                ChunkState::Data => {
                    let want = dst.len().min(usize::try_from(left_in_chunk).unwrap_or(usize::MAX));
                    let n = self.read_raw(&mut dst[..want]).await?;
                    if n == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-chunk"));
                    }
                    let left = left_in_chunk - n as u64;
                    let state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data };
                    self.framing = Framing::Chunked { left_in_chunk: left, state };
                    return Ok(n);
                }
                ChunkState::DataEnd => {
                    if !self.read_line().await?.is_empty() {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk data longer than its size"));
                    }
                    self.framing = Framing::Chunked { left_in_chunk: 0, state: ChunkState::Size };
                }
            }
        }
    }

    /// One CRLF-terminated line (without it), byte by byte: only chunk
    /// framing uses it, a few bytes per chunk.
    async fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            if self.read_raw(&mut byte).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in chunk framing"));
            }
            match byte[0] {
                b'\n' => break,
                b => line.push(b),
            }
            if line.len() > LINE_LEN_MAX_BYTES {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk framing line too long"));
            }
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk framing not text"))
    }

    /// The connection, if it may carry another request: body read to its
    /// end, nothing read past it, and the server keeps it open.
    fn into_reusable(self) -> Option<Conn> {
        let ended = self.done || matches!(self.framing, Framing::Length { left: 0 });
        let reusable = ended && !self.head.close && self.body.is_empty() && !matches!(self.framing, Framing::Close);
        reusable.then_some(Conn { reused: true, ..self.conn })
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_framing_and_reuse() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: x\r\n\r\nhello";
        let (head, len) = parse_head(raw).unwrap().unwrap();
        assert_eq!((head.status, head.content_length, head.chunked, head.close), (200, Some(5), false, false));
        assert_eq!(&raw[len..], b"hello");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        let raw =
            b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nRetry-After: 2\r\n\r\n";
        let (head, _) = parse_head(raw).unwrap().unwrap();
        assert!(head.chunked && head.close);
        assert_eq!(head.retry_after.as_deref(), Some("2"));
        let (head, _) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(head.close && head.content_length.is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn origins_name_their_port_only_when_needed() {
        let origin = |tls, port| Origin { tls, host: "h".into(), port };
        assert_eq!(origin(false, 80).host_header(), "h");
        assert_eq!(origin(true, 443).host_header(), "h");
        assert_eq!(origin(false, 9000).host_header(), "h:9000");
        assert_eq!(origin(true, 80).host_header(), "h:80");
    }

    /// A server on loopback that answers each connection's requests with
    /// `answers` in turn, then closes it; returns its port.
    async fn serve(answers: Vec<Vec<&'static [u8]>>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for conn_answers in answers {
                let (mut socket, _) = listener.accept().await.unwrap();
                for answer in conn_answers {
                    let mut request = vec![0; 4096];
                    let _ = socket.read(&mut request).await.unwrap();
                    socket.write_all(answer).await.unwrap();
                }
            }
        });
        port
    }

    async fn body(response: &mut Response) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            match response.read(&mut buf).await? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn client(port: u16) -> Client {
        Client::new(Origin { tls: false, host: "127.0.0.1".into(), port }, Duration::from_secs(1)).unwrap()
    }

    #[tokio::test]
    async fn bodies_by_length_and_chunks_and_a_stale_connection_is_replaced() {
        let chunked: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        let port = serve(vec![
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", chunked],
            vec![b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"],
        ])
        .await;
        let client = client(port);
        let mut response = client.send(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n", 16).await.unwrap();
        assert_eq!(body(&mut response).await.unwrap(), b"hello world");
        client.release(response);
        let mut response = client.send(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n", 16).await.unwrap();
        assert_eq!(body(&mut response).await.unwrap(), b"wikipedia");
        client.release(response);
        // The server closed that connection after two answers: the third
        // request goes out again on a new one.
        let mut response = client.send(b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n", 16).await.unwrap();
        assert_eq!(response.head().status, 404);
        assert_eq!(body(&mut response).await.unwrap(), b"no");
        client.release(response);
        assert!(client.checkout().is_none(), "a closing answer's connection is not pooled");
    }

    #[tokio::test]
    async fn large_answers_get_a_receive_buffer_that_holds_them_up_to_the_cap() {
        fn rcvbuf(response: &Response) -> usize {
            match &response.conn.stream {
                Stream::Plain(tcp) => socket2::SockRef::from(tcp).recv_buffer_size().unwrap(),
                Stream::Tls(_) => unreachable!("plain HTTP here"),
            }
        }
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let port = serve(vec![vec![answer, answer], vec![answer], vec![answer]]).await;
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
        // Linux doubles what it is asked for (its bookkeeping), capped at rmem_max.
        let kernel_holds = |asked: usize| 2 * asked.min(rmem_max);
        let get = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        // A cap below the smallest usual net.core.rmem_max (212992).
        let cap = 200_704;
        let capped = client(port).with_receive_buffer(Some(cap));
        // A small answer: the kernel's sizing (its starting size).
        let mut response = capped.send(get, 256 << 10).await.unwrap();
        let kernel_start = rcvbuf(&response);
        assert_ne!(kernel_start, kernel_holds(cap));
        body(&mut response).await.unwrap();
        capped.release(response);
        // A 1 MiB answer on the same connection: as much as the cap allows.
        let mut response = capped.send(get, 1 << 20).await.unwrap();
        assert!(response.conn.reused, "the same connection");
        assert_eq!(rcvbuf(&response), kernel_holds(cap));
        body(&mut response).await.unwrap();
        capped.release(response);
        // Under a high cap, the answer and its head rounded up: 2 MiB.
        let roomy = client(port).with_receive_buffer(Some(64 << 20));
        let response = roomy.send(get, 1 << 20).await.unwrap();
        assert_eq!(rcvbuf(&response), kernel_holds(2 << 20));
        // Without a cap, the kernel's sizing whatever the answer.
        let response = client(port).send(get, 1 << 20).await.unwrap();
        assert_eq!(rcvbuf(&response), kernel_start);
    }

    #[tokio::test]
    async fn short_bodies_and_bad_chunks_are_errors() {
        let port = serve(vec![
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
            vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
            vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc"],
        ])
        .await;
        let client = client(port);
        for want in [io::ErrorKind::UnexpectedEof, io::ErrorKind::InvalidData, io::ErrorKind::UnexpectedEof] {
            let mut response = client.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 16).await.unwrap();
            assert_eq!(body(&mut response).await.unwrap_err().kind(), want);
            client.release(response);
            assert!(client.checkout().is_none(), "a broken body's connection is not pooled");
        }
        // Nothing listens any more once the server task is done: refused.
        let refused = Client::new(Origin { tls: false, host: "127.0.0.1".into(), port: 1 }, Duration::from_secs(1));
        let e = refused.unwrap().send(b"GET / HTTP/1.1\r\n\r\n", 16).await.unwrap_err();
        assert!(matches!(e, SendError::Connect(_)), "{e:?}");
    }
}
