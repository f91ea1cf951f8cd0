//! An NBD server: the volume being restored, exported over the Network Block
//! Device protocol while it is restored (`rehydrate restore --export`).
//!
//! In: a [`Volume`] (the restore engine's [`LiveVolume`](crate::restore::live::LiveVolume),
//! or [`MemoryVolume`] in tests) and an [`ExportAddr`]. Out: NBD clients
//! (qemu, libnbd's tools, the kernel's `nbd-client`) read and write it.
//!
//! Protocol: the fixed-newstyle handshake with `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_LIST` and `NBD_OPT_ABORT` (every
//! other option is answered `NBD_REP_ERR_UNSUP`, so clients fall back from
//! structured replies and TLS); simple replies; the commands READ, WRITE
//! (with FUA), FLUSH, TRIM, WRITE_ZEROES and DISC. The export advertises its
//! size and block sizes (`NBD_INFO_BLOCK_SIZE`: minimum 1, preferred the
//! snapshot's block size, maximum the payload limit) and `CAN_MULTI_CONN`
//! (FLUSH is an fdatasync of the whole target, so it covers every
//! connection's writes).
//!
//! Limits ([`Limits`], every one bounded): connections at once, requests in
//! flight per connection, payload bytes in flight for the whole server, the
//! payload of one request, options per handshake and the length of one, the
//! time a handshake may take. A client past a limit gets an error reply
//! (`NBD_REP_ERR_*` in the handshake, `EINVAL`/`ENOSPC` in transmission) or,
//! where the stream cannot stay in step (a bad magic, an oversized option or
//! WRITE payload), a closed connection; never a panic, never unbounded
//! memory.
//!
//! Access: TLS is not implemented, so an export listens on a unix socket or
//! on a loopback TCP address only; any other address is refused (tunnel the
//! socket, e.g. `ssh -L`, to reach it from elsewhere).

mod handshake;
pub mod proto;
mod transmission;
mod volume;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The volume an export serves. Offsets and lengths are checked against
/// [`size_bytes`](Self::size_bytes) by the server before any call.
pub trait Volume: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;
    /// The natural I/O unit: requests aligned to it need no read-modify-write.
    fn block_size_bytes(&self) -> u32;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Zeros over `len` bytes (WRITE_ZEROES, and TRIM: zeros are a valid
    /// result of a trim).
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// Returns once every write acknowledged before it is durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
}

/// The NBD limits (`docs/architecture.md`, invariant 5).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Clients connected at once; one more is closed at once.
    pub connections_max: usize,
    /// Requests being served at once per connection; the next is not read
    /// until one finishes.
    pub requests_inflight_max: usize,
    /// The payload of one READ or WRITE (the protocol's portable maximum).
    pub payload_bytes_max: u32,
    /// READ and WRITE payload bytes held by the whole server at once.
    pub inflight_bytes_max: u64,
    /// Options one handshake may send.
    pub options_max: u32,
    /// The data of one option (an export name is at most 4096 bytes).
    pub option_bytes_max: u32,
    /// From accept to the end of the handshake.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // A VM, a copy tool with its 4 connections, and a few probes.
            connections_max: 16,
            // qemu keeps 16 requests in flight per connection.
            requests_inflight_max: 16,
            // 32 MiB: what the protocol calls safe for every client.
            payload_bytes_max: 32 << 20,
            // Two full connections' worth of 4 MiB requests.
            inflight_bytes_max: 128 << 20,
            options_max: 64,
            option_bytes_max: 4096 + 64,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Where an export listens, as given to `--export`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportAddr {
    /// `nbd://127.0.0.1:10809/NAME` (loopback only).
    Tcp { addr: SocketAddr, name: String },
    /// `nbd+unix:///NAME?socket=/path.sock` or `nbd+unix:///path.sock`
    /// (then the export name is empty: the default export).
    Unix { path: PathBuf, name: String },
}

/// The NBD port clients assume.
pub const DEFAULT_PORT: u16 = 10809;

impl ExportAddr {
    /// Parse an export URL; a TCP address that is not loopback is refused.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("nbd+unix://") {
            return parse_unix(rest, url);
        }
        let Some(rest) = url.strip_prefix("nbd://") else {
            return Err(format!("export {url:?}: expected nbd://HOST:PORT/NAME or nbd+unix:///PATH.sock"));
        };
        let (authority, name) = rest.split_once('/').unwrap_or((rest, ""));
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:{DEFAULT_PORT}")
        };
        let addr: SocketAddr = authority.parse().map_err(|_| {
            format!("export {url:?}: the host must be an IP address (127.0.0.1 or [::1]), not {authority:?}")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "export {url:?}: {} is not a loopback address; NBD has no authentication here (no TLS), so an export listens on loopback or a unix socket only: tunnel it (ssh -L) to reach it from elsewhere",
                addr.ip()
            ));
        }
        Ok(ExportAddr::Tcp { addr, name: check_name(name, url)? })
    }

    pub fn name(&self) -> &str {
        match self {
            ExportAddr::Tcp { name, .. } | ExportAddr::Unix { name, .. } => name,
        }
    }

    /// The URL a client connects to.
    pub fn client_url(&self) -> String {
        match self {
            ExportAddr::Tcp { addr, name } => format!("nbd://{addr}/{name}"),
            ExportAddr::Unix { path, name } => format!("nbd+unix:///{name}?socket={}", path.display()),
        }
    }
}

fn parse_unix(rest: &str, url: &str) -> Result<ExportAddr, String> {
    let rest = rest.strip_prefix('/').ok_or_else(|| format!("export {url:?}: expected nbd+unix:///..."))?;
    let (path_part, query) = rest.split_once('?').unwrap_or((rest, ""));
    let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="));
    let (path, name) = match socket {
        Some(socket) => (PathBuf::from(socket), path_part.to_owned()),
        None => (PathBuf::from(format!("/{path_part}")), String::new()),
    };
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(format!("export {url:?}: the socket must be an absolute path"));
    }
    Ok(ExportAddr::Unix { path, name: check_name(&name, url)? })
}

fn check_name(name: &str, url: &str) -> Result<String, String> {
    if name.len() > 4096 || name.contains('\0') {
        return Err(format!("export {url:?}: the export name must be at most 4096 bytes, without NUL"));
    }
    Ok(name.to_owned())
}

/// A bound export, ready to serve.
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when the listener is dropped.
    Unix(UnixListener, SocketFile),
}

/// Removes a unix socket file this process created.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Bind `addr`. A unix socket file left by a dead server is replaced; one
    /// that answers is refused.
    pub async fn bind(addr: &ExportAddr) -> io::Result<Listener> {
        match addr {
            ExportAddr::Tcp { addr, .. } => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            ExportAddr::Unix { path, .. } => {
                if std::fs::symlink_metadata(path).is_ok() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running server", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, SocketFile(path.clone())))
            }
        }
    }

    /// The TCP address bound (port 0 picks one).
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

/// What one export serves, and its limits.
pub struct Export<V> {
    pub name: String,
    pub volume: Arc<V>,
    pub limits: Limits,
}

/// What every connection of one server shares.
pub(crate) struct Shared<V> {
    pub(crate) export: Export<V>,
    /// Payload bytes in flight, in KiB permits.
    pub(crate) payload_budget: Arc<Semaphore>,
}

/// Run the server of export `name` (`serve`, `serve_when_published`) on a
/// thread (named after it) and a runtime of its own; resolves when it has
/// returned.
///
/// Why: the restore keeps the process's runtime busy (every block's hash,
/// its HTTP reads), and a task there waits its turn behind those, with the
/// runtime's I/O events looked at only between them: a client's read of a
/// block already on the target waited up to 23 ms (p99) for its turn. On its
/// own thread the server sleeps in its own `epoll` until a client asks,
/// and the kernel runs it as soon as it wakes. What a read fetches from the
/// stores still runs on the restore's runtime (`LiveVolume`), so no store
/// connection depends on this runtime, which ends with the export.
pub fn spawn_server<F>(name: &str, server: F) -> impl Future<Output = ()> + Send + 'static
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let spawned = runtime.map_err(|e| e.to_string()).and_then(|runtime| {
        std::thread::Builder::new()
            .name(format!("nbd-{name}").chars().take(15).collect())
            .spawn(move || {
                runtime.block_on(server);
                drop(done_tx);
            })
            .map_err(|e| e.to_string())
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "nbd: cannot start the export's thread; it is not served");
    }
    async move {
        let _ = done_rx.await;
    }
}

/// Wait for a restore to publish its volume (the export comes up once the
/// target is allocated), call `ready`, then serve it as `name` until `stop`.
pub async fn serve_when_published<V: Volume>(
    listener: Listener,
    name: String,
    mut published: tokio::sync::watch::Receiver<Option<Arc<V>>>,
    stop: CancellationToken,
    ready: impl FnOnce(),
) {
    let volume = tokio::select! {
        () = stop.cancelled() => return,
        volume = published.wait_for(Option::is_some) => match volume {
            Ok(volume) => volume.clone(),
            Err(_) => return,
        },
    };
    let Some(volume) = volume else { return };
    ready();
    serve(listener, Export { name, volume, limits: Limits::default() }, stop).await;
}

/// Serve `export` on `listener` until `stop` is cancelled; then stop
/// accepting and let open connections finish their requests in flight.
pub async fn serve<V: Volume>(listener: Listener, export: Export<V>, stop: CancellationToken) {
    let limits = export.limits;
    let shared =
        Arc::new(Shared { export, payload_budget: Arc::new(Semaphore::new(kib(limits.inflight_bytes_max).max(1))) });
    let connections = Arc::new(Semaphore::new(limits.connections_max));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "nbd: accept failed");
                // A full file table: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(limit = limits.connections_max, "nbd: too many connections; closing the new one");
            continue;
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tokio::spawn(async move {
            match stream {
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    connection(s, shared, stop).await
                }
                Stream::Unix(s) => connection(s, shared, stop).await,
            }
            drop(permit);
        });
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<Stream> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
    }
}

/// One client: handshake, then transmission.
async fn connection<S, V>(mut stream: S, shared: Arc<Shared<V>>, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    V: Volume,
{
    let limits = shared.export.limits;
    let negotiated =
        tokio::time::timeout(limits.handshake_timeout, handshake::negotiate(&mut stream, &shared.export)).await;
    match negotiated {
        Ok(Ok(handshake::Outcome::Transmission)) => {}
        Ok(Ok(handshake::Outcome::Closed(reason))) => {
            tracing::debug!(%reason, "nbd: handshake ended");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "nbd: handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("nbd: handshake timed out");
            return;
        }
    }
    if let Err(e) = transmission::run(stream, shared, stop).await {
        tracing::debug!(error = %e, "nbd: connection ended");
    }
}

/// KiB permits for `bytes`, rounded up.
pub(crate) fn kib(bytes: u64) -> usize {
    usize::try_from(bytes.div_ceil(1024)).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS)
}

/// A volume in memory: the server's tests, and a reference for clients.
pub struct MemoryVolume {
    bytes: Mutex<Vec<u8>>,
    block_size_bytes: u32,
}

impl MemoryVolume {
    pub fn new(bytes: Vec<u8>, block_size_bytes: u32) -> Self {
        Self { bytes: Mutex::new(bytes), block_size_bytes }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }
}

impl Volume for MemoryVolume {
    fn size_bytes(&self) -> u64 {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        Ok(bytes[Self::range(offset, u64::from(len))].to_vec())
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        bytes[Self::range(offset, data.len() as u64)].copy_from_slice(&data);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        bytes[Self::range(offset, len)].fill(0);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_urls() {
        assert_eq!(
            ExportAddr::parse("nbd://127.0.0.1:10900/vol").unwrap(),
            ExportAddr::Tcp { addr: "127.0.0.1:10900".parse().unwrap(), name: "vol".into() }
        );
        assert_eq!(
            ExportAddr::parse("nbd://127.0.0.1/vol").unwrap(),
            ExportAddr::Tcp { addr: "127.0.0.1:10809".parse().unwrap(), name: "vol".into() }
        );
        assert_eq!(
            ExportAddr::parse("nbd://[::1]:10900/").unwrap(),
            ExportAddr::Tcp { addr: "[::1]:10900".parse().unwrap(), name: String::new() }
        );
        assert_eq!(
            ExportAddr::parse("nbd+unix:///run/r/vol.sock").unwrap(),
            ExportAddr::Unix { path: "/run/r/vol.sock".into(), name: String::new() }
        );
        assert_eq!(
            ExportAddr::parse("nbd+unix:///vol?socket=/run/r/vol.sock").unwrap(),
            ExportAddr::Unix { path: "/run/r/vol.sock".into(), name: "vol".into() }
        );
        for bad in ["nbd://0.0.0.0:10809/vol", "nbd://10.1.2.3/vol", "nbd://localhost/vol", "http://x", "nbd+unix://"] {
            assert!(ExportAddr::parse(bad).is_err(), "{bad} must be refused");
        }
        assert!(ExportAddr::parse("nbd://0.0.0.0:1/v").unwrap_err().contains("loopback"));
    }
}
