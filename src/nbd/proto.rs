//! The NBD wire format: magics, option and command codes, error numbers, and
//! the encoding of every message this server sends. Pure data, no I/O
//! policy. Names and values follow the NBD protocol document
//! (`doc/proto.md` of the NetworkBlockDevice/nbd repository).

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option request.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

// Error numbers of simple replies (the protocol's, not the host's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ESHUTDOWN: u32 = 108;

/// Bytes of a transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;

/// The server's greeting: magics and handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// One option reply: header and payload.
pub fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + payload.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size_bytes: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_INFO_NAME`.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut out = INFO_NAME.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn info_block_size(sizes: BlockSizes) -> Vec<u8> {
    let mut out = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for size in [sizes.minimum, sizes.preferred, sizes.maximum] {
        out.extend_from_slice(&size.to_be_bytes());
    }
    out
}

/// `NBD_REP_SERVER` for `NBD_OPT_LIST`: one export's name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// The end of the handshake after `NBD_OPT_EXPORT_NAME`.
pub fn export_name_reply(size_bytes: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A simple reply's header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The block-size constraints the export advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Any byte range works (partial blocks are read-modify-written).
    pub minimum: u32,
    /// The largest power of two that divides the snapshot's block size: an
    /// aligned request of this size never needs a read-modify-write.
    pub preferred: u32,
    /// The largest READ or WRITE payload accepted.
    pub maximum: u32,
}

impl BlockSizes {
    pub fn new(block_size_bytes: u32, payload_bytes_max: u32) -> Self {
        let preferred = 1u32 << block_size_bytes.max(1).trailing_zeros();
        // The protocol wants preferred ≥ 4096 and ≤ maximum.
        let preferred = preferred.clamp(4096, payload_bytes_max.max(4096));
        Self { minimum: 1, preferred, maximum: payload_bytes_max.max(preferred) }
    }
}

/// One transmission request header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub magic: u32,
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn decode(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Self {
        let u16_at = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        Self {
            magic: u32_at(0),
            flags: u16_at(4),
            command: u16_at(6),
            cookie: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out[..4].copy_from_slice(&self.magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// The request of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the info
/// types asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Decode, or `None` when the lengths do not add up.
    pub fn decode(data: &[u8]) -> Option<Self> {
        let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
        let name = data.get(4..4usize.checked_add(name_len)?)?.to_vec();
        let rest = &data[4 + name_len..];
        let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let infos = rest.get(2..)?;
        if infos.len() != count * 2 {
            return None;
        }
        Some(Self { name, infos: infos.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect() })
    }
}

/// The protocol's error number for a host I/O error.
pub fn errno_of(error: &std::io::Error) -> u32 {
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_follow_the_protocol_rules() {
        let s = BlockSizes::new(1 << 20, 32 << 20);
        assert_eq!(s, BlockSizes { minimum: 1, preferred: 1 << 20, maximum: 32 << 20 });
        // 12 KiB blocks: 4 KiB divides them.
        assert_eq!(BlockSizes::new(12 << 10, 32 << 20).preferred, 4096);
        // 64 MiB blocks: preferred is capped by the maximum payload.
        assert_eq!(BlockSizes::new(64 << 20, 32 << 20).preferred, 32 << 20);
    }

    #[test]
    fn info_requests_decode_only_when_lengths_add_up() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(InfoRequest::decode(&data), Some(InfoRequest { name: b"vol".to_vec(), infos: vec![3] }));
        assert_eq!(InfoRequest::decode(&data[..data.len() - 1]), None);
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert_eq!(InfoRequest::decode(&huge), None);
        assert_eq!(InfoRequest::decode(&[]), None);
    }

    #[test]
    fn request_headers_round_trip() {
        let r = Request { magic: REQUEST_MAGIC, flags: 1, command: CMD_WRITE, cookie: 7, offset: 1 << 40, length: 9 };
        assert_eq!(Request::decode(&r.encode()), r);
    }
}
