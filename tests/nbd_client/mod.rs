//! A small NBD client for tests: enough of the protocol to drive the server
//! through correct and hostile exchanges, byte by byte.
#![allow(dead_code)]

use std::time::Duration;

use rehydrate::nbd::proto::{self, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Client {
    pub s: TcpStream,
}

/// An option reply: (option, reply type, data).
pub type OptionReply = (u32, u32, Vec<u8>);

impl Client {
    /// Connect and read the greeting (checked); send `client_flags`.
    pub async fn connect(addr: std::net::SocketAddr, client_flags: u32) -> Client {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..], &proto::greeting()[..], "fixed newstyle greeting");
        s.write_all(&client_flags.to_be_bytes()).await.unwrap();
        Client { s }
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = proto::OPTION_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.s.write_all(&out).await.unwrap();
    }

    pub async fn option_reply(&mut self) -> std::io::Result<OptionReply> {
        tokio::time::timeout(TIMEOUT, async {
            let magic = self.s.read_u64().await?;
            assert_eq!(magic, proto::REPLY_MAGIC);
            let option = self.s.read_u32().await?;
            let kind = self.s.read_u32().await?;
            let len = self.s.read_u32().await?;
            assert!(len < 1 << 20, "reply length {len}");
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).await?;
            Ok((option, kind, data))
        })
        .await
        .expect("an option reply in time")
    }

    /// INFO or GO for `name`: the replies up to and including the final one.
    pub async fn info(&mut self, option: u32, name: &str, infos: &[u16]) -> Vec<OptionReply> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            data.extend_from_slice(&i.to_be_bytes());
        }
        self.send_option(option, &data).await;
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply().await.unwrap();
            let done = reply.1 != proto::REP_INFO;
            replies.push(reply);
            if done {
                return replies;
            }
        }
    }

    /// Handshake to transmission with GO; returns the export size.
    pub async fn go(addr: std::net::SocketAddr, name: &str) -> (Client, u64) {
        let mut c = Client::connect(addr, proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
        let replies = c.info(proto::OPT_GO, name, &[proto::INFO_BLOCK_SIZE]).await;
        assert_eq!(replies.last().unwrap().1, proto::REP_ACK, "GO acknowledged: {replies:?}");
        let export = replies.iter().find(|r| r.2.starts_with(&proto::INFO_EXPORT.to_be_bytes())).unwrap();
        let size = u64::from_be_bytes(export.2[2..10].try_into().unwrap());
        (c, size)
    }

    pub async fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let r = Request { magic: proto::REQUEST_MAGIC, flags, command, cookie, offset, length };
        self.s.write_all(&r.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    /// A simple reply: (error, cookie), then `data_len` bytes of data when
    /// the error is 0.
    pub async fn reply(&mut self, data_len: usize) -> std::io::Result<(u32, u64, Vec<u8>)> {
        tokio::time::timeout(TIMEOUT, async {
            let magic = self.s.read_u32().await?;
            assert_eq!(magic, proto::SIMPLE_REPLY_MAGIC);
            let error = self.s.read_u32().await?;
            let cookie = self.s.read_u64().await?;
            let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
            self.s.read_exact(&mut data).await?;
            Ok((error, cookie, data))
        })
        .await
        .expect("a reply in time")
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(proto::CMD_READ, 0, offset ^ 0x5a5a, offset, len, &[]).await;
        let (error, cookie, data) = self.reply(len as usize).await.unwrap();
        assert_eq!(cookie, offset ^ 0x5a5a);
        if error == 0 { Ok(data) } else { Err(error) }
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(proto::CMD_WRITE, 0, 7, offset, data.len() as u32, data).await;
        self.reply(0).await.unwrap().0
    }

    pub async fn flush(&mut self) -> u32 {
        self.request(proto::CMD_FLUSH, 0, 8, 0, 0, &[]).await;
        self.reply(0).await.unwrap().0
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(TIMEOUT, self.s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
