//! The fixed-newstyle handshake: greeting, client flags, then options until
//! one starts transmission (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) or ends the
//! connection. Every option's data is bounded before it is read; an option
//! too long to read, a bad magic or too many options close the connection.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, BlockSizes, InfoRequest};
use super::{Export, Volume};

/// How a handshake ended.
pub(super) enum Outcome {
    /// Go on to transmission.
    Transmission,
    /// The connection ends here, for this reason.
    Closed(&'static str),
}

/// The transmission flags every export advertises.
pub(super) const TRANSMISSION_FLAGS: u16 = proto::TFLAG_HAS_FLAGS
    | proto::TFLAG_SEND_FLUSH
    | proto::TFLAG_SEND_FUA
    | proto::TFLAG_SEND_TRIM
    | proto::TFLAG_SEND_WRITE_ZEROES
    | proto::TFLAG_CAN_MULTI_CONN;

/// Run the handshake on `stream`.
pub(super) async fn negotiate<S, V>(stream: &mut S, export: &Export<V>) -> io::Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
    V: Volume,
{
    stream.write_all(&proto::greeting()).await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Ok(Outcome::Closed("unknown client flags"));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    for _ in 0..export.limits.options_max {
        if stream.read_u64().await? != proto::OPTION_MAGIC {
            return Ok(Outcome::Closed("bad option magic"));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > export.limits.option_bytes_max {
            return Ok(Outcome::Closed("option data too long"));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        if let Some(outcome) = option_reply(stream, export, option, &data, no_zeroes).await? {
            stream.flush().await?;
            return Ok(outcome);
        }
        stream.flush().await?;
    }
    Ok(Outcome::Closed("too many options"))
}

/// Answer one option; `Some` when the handshake ends with it.
async fn option_reply<S, V>(
    stream: &mut S,
    export: &Export<V>,
    option: u32,
    data: &[u8],
    no_zeroes: bool,
) -> io::Result<Option<Outcome>>
where
    S: AsyncWrite + Unpin,
    V: Volume,
{
    let volume = &export.volume;
    match option {
        proto::OPT_EXPORT_NAME => {
            if data != export.name.as_bytes() {
                // This option has no error reply: the protocol says close.
                return Ok(Some(Outcome::Closed("unknown export name")));
            }
            let reply = proto::export_name_reply(volume.size_bytes(), TRANSMISSION_FLAGS, no_zeroes);
            stream.write_all(&reply).await?;
            Ok(Some(Outcome::Transmission))
        }
        proto::OPT_ABORT => {
            // The client may already be gone: the ACK is a courtesy.
            let _ = stream.write_all(&proto::option_reply(option, proto::REP_ACK, &[])).await;
            Ok(Some(Outcome::Closed("client aborted")))
        }
        proto::OPT_LIST if !data.is_empty() => {
            error(stream, option, proto::REP_ERR_INVALID, "LIST takes no data").await
        }
        proto::OPT_LIST => {
            stream.write_all(&proto::option_reply(option, proto::REP_SERVER, &proto::rep_server(&export.name))).await?;
            stream.write_all(&proto::option_reply(option, proto::REP_ACK, &[])).await?;
            Ok(None)
        }
        proto::OPT_INFO | proto::OPT_GO => info_or_go(stream, export, option, data).await,
        _ => error(stream, option, proto::REP_ERR_UNSUP, "option not supported").await,
    }
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: describe the export; GO also starts
/// transmission.
async fn info_or_go<S, V>(stream: &mut S, export: &Export<V>, option: u32, data: &[u8]) -> io::Result<Option<Outcome>>
where
    S: AsyncWrite + Unpin,
    V: Volume,
{
    let Some(request) = InfoRequest::decode(data) else {
        return error(stream, option, proto::REP_ERR_INVALID, "malformed INFO/GO request").await;
    };
    if request.name != export.name.as_bytes() {
        return error(stream, option, proto::REP_ERR_UNKNOWN, "no export of that name").await;
    }
    let volume = &export.volume;
    let sizes = BlockSizes::new(volume.block_size_bytes(), export.limits.payload_bytes_max);
    let export_info = proto::info_export(volume.size_bytes(), TRANSMISSION_FLAGS);
    stream.write_all(&proto::option_reply(option, proto::REP_INFO, &export_info)).await?;
    // Sent whether or not asked for: the protocol allows it, and a client
    // that honours it avoids read-modify-writes.
    stream.write_all(&proto::option_reply(option, proto::REP_INFO, &proto::info_block_size(sizes))).await?;
    if request.infos.contains(&proto::INFO_NAME) {
        stream.write_all(&proto::option_reply(option, proto::REP_INFO, &proto::info_name(&export.name))).await?;
    }
    stream.write_all(&proto::option_reply(option, proto::REP_ACK, &[])).await?;
    Ok((option == proto::OPT_GO).then_some(Outcome::Transmission))
}

async fn error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    reply_type: u32,
    message: &str,
) -> io::Result<Option<Outcome>> {
    stream.write_all(&proto::option_reply(option, reply_type, message.as_bytes())).await?;
    Ok(None)
}
