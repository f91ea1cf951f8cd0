//! The volume being restored, as an export serves it.

use std::io;

use bytes::Bytes;

use super::Volume;
use crate::restore::live::LiveVolume;

impl Volume for LiveVolume {
    fn size_bytes(&self) -> u64 {
        self.layout().volume_size_bytes()
    }

    fn block_size_bytes(&self) -> u32 {
        self.layout().block_size_bytes()
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        LiveVolume::read(self, offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        LiveVolume::write(self, offset, &data).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        LiveVolume::write_zeroes(self, offset, len).await
    }

    async fn flush(&self) -> io::Result<()> {
        LiveVolume::flush(self).await
    }
}
