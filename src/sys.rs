//! The raw calls into the kernel that std does not wrap, in one place and
//! through rustix: the space of a filesystem (`statvfs`) and the size of a
//! block device (`BLKGETSIZE64`). Everything else uses std.

use std::fs::File;
use std::io;
use std::path::Path;

/// The space of one filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesystemSpace {
    /// Free for unprivileged writers (`f_bavail`).
    pub available_bytes: u64,
    /// The filesystem's whole size (`f_blocks`).
    pub total_bytes: u64,
}

/// The space of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> io::Result<FilesystemSpace> {
    let st = rustix::fs::statvfs(path)?;
    Ok(FilesystemSpace {
        available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
    })
}

/// `BLKGETSIZE64 = _IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<u64>(0x12, 114);

/// The size in bytes of the block device open as `device`.
pub fn block_device_size_bytes(device: &File) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 is a read opcode whose argument is one u64
    // (size_t on the 64-bit targets this builds for) for the kernel to write.
    let getter = unsafe { rustix::ioctl::Getter::<BLKGETSIZE64, u64>::new() };
    // SAFETY: `device` is open for the call's duration and the getter's
    // output has the type the opcode writes.
    Ok(unsafe { rustix::ioctl::ioctl(device, getter) }?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opcode_is_the_kernels() {
        assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
    }

    #[test]
    fn a_filesystem_has_space() {
        let dir = tempfile::tempdir().unwrap();
        let space = filesystem_space(dir.path()).unwrap();
        assert!(space.total_bytes > 0 && space.available_bytes <= space.total_bytes, "{space:?}");
        assert!(filesystem_space(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let file = tempfile::tempfile().unwrap();
        assert!(block_device_size_bytes(&file).is_err());
    }
}
