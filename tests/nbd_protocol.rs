//! The NBD server against a client inside the test: the handshake, options
//! good and bad, transmission commands, and hostile requests (bad magics,
//! oversized lengths, reads and writes past the end). Each gets the reply the
//! protocol names or a closed connection, and the server keeps serving other
//! clients: never a panic. Needs nothing installed.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod nbd_client;

use std::net::SocketAddr;
use std::sync::Arc;

use nbd_client::Client;
use rehydrate::nbd::proto;
use rehydrate::nbd::{Export, ExportAddr, Limits, Listener, MemoryVolume, serve};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

const SIZE: usize = (1 << 20) + 1000;
const NAME: &str = "vol";

fn pattern() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 7 % 251) as u8).collect()
}

struct Server {
    addr: SocketAddr,
    volume: Arc<MemoryVolume>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(limits: Limits) -> Server {
    let addr = ExportAddr::parse("nbd://127.0.0.1:0/vol").unwrap();
    let listener = Listener::bind(&addr).await.unwrap();
    let addr = listener.local_tcp_addr().unwrap();
    let volume = Arc::new(MemoryVolume::new(pattern(), 64 << 10));
    let stop = CancellationToken::new();
    let export = Export { name: NAME.into(), volume: Arc::clone(&volume), limits };
    tokio::spawn(serve(listener, export, stop.clone()));
    Server { addr, volume, stop }
}

/// The server still serves a well-behaved client.
async fn still_serving(addr: SocketAddr) {
    let (mut c, size) = Client::go(addr, NAME).await;
    assert_eq!(size, SIZE as u64);
    assert_eq!(c.read(0, 16).await.unwrap(), pattern()[..16]);
}

#[tokio::test]
async fn go_then_read_write_flush_trim_zeroes_disc() {
    let server = start(Limits::default()).await;
    let mut c = Client::connect(server.addr, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    let replies = c.info(proto::OPT_GO, NAME, &[proto::INFO_BLOCK_SIZE, proto::INFO_NAME]).await;
    assert_eq!(replies.last().unwrap().1, proto::REP_ACK);
    let block_size = replies.iter().find(|r| r.2.starts_with(&proto::INFO_BLOCK_SIZE.to_be_bytes())).unwrap();
    let sizes: Vec<u32> = block_size.2[2..].chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
    assert_eq!(sizes, vec![1, 64 << 10, 32 << 20], "minimum, preferred, maximum");
    let export = replies.iter().find(|r| r.2.starts_with(&proto::INFO_EXPORT.to_be_bytes())).unwrap();
    assert_eq!(u64::from_be_bytes(export.2[2..10].try_into().unwrap()), SIZE as u64);
    assert!(replies.iter().any(|r| r.2 == proto::info_name(NAME)));

    let expected = pattern();
    assert_eq!(c.read(SIZE as u64 - 1000, 1000).await.unwrap(), expected[SIZE - 1000..]);
    assert_eq!(c.write(100, b"hello").await, 0);
    assert_eq!(c.read(98, 9).await.unwrap(), [&expected[98..100], b"hello", &expected[105..107]].concat());
    c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 1, 5000, 3, b"fua").await;
    assert_eq!(c.reply(0).await.unwrap().0, 0);
    assert_eq!(c.flush().await, 0);
    for command in [proto::CMD_WRITE_ZEROES, proto::CMD_TRIM] {
        c.request(command, 0, 2, 70_000, 10_000, &[]).await;
        assert_eq!(c.reply(0).await.unwrap().0, 0);
    }
    assert_eq!(c.read(70_000, 10_000).await.unwrap(), vec![0u8; 10_000]);
    let contents = server.volume.contents();
    assert_eq!(&contents[5000..5003], b"fua");
    c.request(proto::CMD_DISC, 0, 3, 0, 0, &[]).await;
    assert!(c.closed().await, "DISC closes the connection");
}

#[tokio::test]
async fn export_name_option_with_and_without_zeroes() {
    let server = start(Limits::default()).await;
    for (flags, tail) in
        [(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES, 0), (proto::FLAG_C_FIXED_NEWSTYLE, 124)]
    {
        let mut c = Client::connect(server.addr, flags).await;
        c.send_option(proto::OPT_EXPORT_NAME, NAME.as_bytes()).await;
        let mut reply = vec![0u8; 10 + tail];
        tokio::io::AsyncReadExt::read_exact(&mut c.s, &mut reply).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE as u64);
        assert_eq!(c.read(0, 4).await.unwrap(), pattern()[..4]);
    }
    // An unknown name: EXPORT_NAME has no error reply, the server closes.
    let mut c = Client::connect(server.addr, proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"other").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn list_info_and_option_errors() {
    let server = start(Limits::default()).await;
    let mut c = Client::connect(server.addr, proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_LIST, &[]).await;
    assert_eq!(c.option_reply().await.unwrap(), (proto::OPT_LIST, proto::REP_SERVER, proto::rep_server(NAME)));
    assert_eq!(c.option_reply().await.unwrap().1, proto::REP_ACK);
    c.send_option(proto::OPT_LIST, b"x").await;
    assert_eq!(c.option_reply().await.unwrap().1, proto::REP_ERR_INVALID);
    let replies = c.info(proto::OPT_INFO, "nope", &[]).await;
    assert_eq!(replies.last().unwrap().1, proto::REP_ERR_UNKNOWN);
    let replies = c.info(proto::OPT_INFO, NAME, &[]).await;
    assert_eq!(replies.last().unwrap().1, proto::REP_ACK, "INFO describes the export and stays in the handshake");
    // Structured replies, TLS, meta contexts, extended headers, made-up ones.
    for option in [8, 5, 9, 10, 11, 0xdead] {
        c.send_option(option, &[1, 2, 3]).await;
        assert_eq!(c.option_reply().await.unwrap(), (option, proto::REP_ERR_UNSUP, b"option not supported".to_vec()));
    }
    // INFO whose lengths do not add up.
    c.send_option(proto::OPT_GO, &[0, 0, 0, 200, b'v']).await;
    assert_eq!(c.option_reply().await.unwrap().1, proto::REP_ERR_INVALID);
    c.send_option(proto::OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.unwrap().1, proto::REP_ACK);
    assert!(c.closed().await);
    still_serving(server.addr).await;
}

#[tokio::test]
async fn hostile_handshakes_are_closed() {
    let server = start(Limits { options_max: 4, ..Limits::default() }).await;
    // Unknown client flags.
    let mut c = Client::connect(server.addr, 0x80).await;
    assert!(c.closed().await);
    // A bad option magic.
    let mut c = Client::connect(server.addr, 1).await;
    c.s.write_all(&[0xff; 16]).await.unwrap();
    assert!(c.closed().await);
    // An option longer than any option may be (4 GiB announced).
    let mut c = Client::connect(server.addr, 1).await;
    let mut out = proto::OPTION_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    out.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&out).await.unwrap();
    assert!(c.closed().await);
    // Options without end.
    let mut c = Client::connect(server.addr, 1).await;
    for _ in 0..4 {
        c.send_option(0x77, &[]).await;
        assert_eq!(c.option_reply().await.unwrap().1, proto::REP_ERR_UNSUP);
    }
    c.send_option(0x77, &[]).await;
    assert!(c.closed().await);
    still_serving(server.addr).await;
}

#[tokio::test]
async fn out_of_range_and_oversized_requests_get_errors() {
    let server = start(Limits::default()).await;
    let (mut c, _) = Client::go(server.addr, NAME).await;
    assert_eq!(c.read(SIZE as u64 - 10, 11).await, Err(proto::EINVAL), "a read past the end");
    assert_eq!(c.read(u64::MAX - 3, 8).await, Err(proto::EINVAL), "an offset that overflows");
    assert_eq!(c.read(0, 0).await, Err(proto::EINVAL), "an empty read");
    assert_eq!(c.read(0, (32 << 20) + 1).await, Err(proto::EINVAL), "a read over the payload limit");
    assert_eq!(c.write(SIZE as u64 - 2, b"abc").await, proto::ENOSPC, "a write past the end");
    c.request(proto::CMD_WRITE_ZEROES, 0, 9, SIZE as u64, 1, &[]).await;
    assert_eq!(c.reply(0).await.unwrap().0, proto::ENOSPC);
    c.request(0x99, 0, 10, 0, 0, &[]).await;
    assert_eq!(c.reply(0).await.unwrap().0, proto::EINVAL, "an unknown command");
    // The connection is still in step after all of these.
    assert_eq!(c.read(0, 8).await.unwrap(), pattern()[..8]);
    assert_eq!(server.volume.contents(), pattern(), "no refused request wrote anything");

    // A WRITE whose payload is over the limit: refused, and the stream closed.
    c.request(proto::CMD_WRITE, 0, 11, 0, u32::MAX, &[]).await;
    assert_eq!(c.reply(0).await.unwrap().0, proto::EINVAL);
    assert!(c.closed().await);
    // A bad request magic closes the connection.
    let (mut c, _) = Client::go(server.addr, NAME).await;
    c.s.write_all(&[0u8; 28]).await.unwrap();
    assert!(c.closed().await);
    still_serving(server.addr).await;
}

#[tokio::test]
async fn connections_are_bounded() {
    let server = start(Limits { connections_max: 1, ..Limits::default() }).await;
    let (mut first, _) = Client::go(server.addr, NAME).await;
    let mut second = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 18];
    let n = tokio::time::timeout(nbd_client::TIMEOUT, tokio::io::AsyncReadExt::read(&mut second, &mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection over the limit is closed at once");
    assert_eq!(first.read(0, 8).await.unwrap(), pattern()[..8]);
    first.request(proto::CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(first.closed().await);
    // Its slot is free again.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    still_serving(server.addr).await;
}

#[tokio::test]
async fn random_bytes_never_bring_the_server_down() {
    use rand::{Rng, SeedableRng};
    let server = start(Limits { handshake_timeout: std::time::Duration::from_millis(300), ..Limits::default() }).await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
    for round in 0..40 {
        let mut bytes = vec![0u8; rng.random_range(1..4096)];
        rng.fill(&mut bytes[..]);
        if round % 2 == 0 {
            // After a good handshake: garbage as requests.
            let (mut c, _) = Client::go(server.addr, NAME).await;
            let _ = c.s.write_all(&bytes).await;
            let _ = c.s.shutdown().await;
        } else {
            let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            let _ = c.write_all(&bytes).await;
        }
    }
    still_serving(server.addr).await;
    assert_eq!(server.volume.contents().len(), SIZE);
}

#[tokio::test]
async fn unix_socket_exports_serve_replace_stale_sockets_and_clean_up() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.sock");
    // A stale socket file (its server is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let addr = ExportAddr::parse(&format!("nbd+unix://{}", path.display())).unwrap();
    assert_eq!(addr.name(), "", "the socket form serves the default export");
    let listener = Listener::bind(&addr).await.unwrap();
    // A live one is refused.
    let err = Listener::bind(&addr).await.err().expect("a socket in use is refused");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    let volume = Arc::new(MemoryVolume::new(pattern(), 4096));
    let stop = CancellationToken::new();
    let server =
        tokio::spawn(serve(listener, Export { name: String::new(), volume, limits: Limits::default() }, stop.clone()));

    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, proto::greeting());
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    let mut option = proto::OPTION_MAGIC.to_be_bytes().to_vec();
    option.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    option.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&option).await.unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).await.unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE as u64);
    let read = proto::Request {
        magic: proto::REQUEST_MAGIC,
        flags: 0,
        command: proto::CMD_READ,
        cookie: 3,
        offset: 10,
        length: 6,
    };
    s.write_all(&read.encode()).await.unwrap();
    let mut reply = [0u8; 22];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[..16], proto::simple_reply(0, 3));
    assert_eq!(reply[16..], pattern()[10..16]);

    stop.cancel();
    drop(s);
    server.await.unwrap();
    assert!(!path.exists(), "the socket file goes with the server");
}
