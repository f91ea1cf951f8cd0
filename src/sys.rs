//! The raw calls into the kernel that std does not wrap, in one place: the
//! space of a filesystem (`statvfs`), allocating part of a file
//! (`fallocate`), the size of a block device
//! (`BLKGETSIZE64`) and the page size through rustix; open-file-description range locks
//! (`F_OFD_SETLK`) and whether a process exists (`kill(pid, 0)`) through libc,
//! which rustix does not cover. Everything else uses std.

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

/// Whether every block of every snapshot covers whole pages of the page
/// cache: block sizes are multiples of [`BLOCK_SIZE_MIN_BYTES`](crate::block::BLOCK_SIZE_MIN_BYTES),
/// so this holds where a page is at most that (4 KiB on x86-64, not on an
/// arm64 kernel with 16 or 64 KiB pages).
pub fn blocks_are_whole_pages() -> bool {
    crate::block::BLOCK_SIZE_MIN_BYTES.is_multiple_of(rustix::param::page_size() as u32)
}

/// Allocate the bytes `offset..offset + len` of the regular file `file`
/// (`fallocate(2)`, mode 0, the file's size unchanged since the range is
/// inside it): holes in the range get extents that read as zeros, bytes
/// already there are left as they are. `EINTR` is retried.
pub fn allocate_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    loop {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len) {
            Err(rustix::io::Errno::INTR) => continue,
            result => return result.map_err(io::Error::from),
        }
    }
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

/// Whether a process with this pid exists (possibly another user's).
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        // kill with pid <= 0 signals process groups.
        return false;
    }
    // SAFETY: signal 0 performs only the existence and permission checks and
    // delivers nothing; `pid` is positive, so it names one process.
    let result = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but belongs to someone else.
    result == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Try to take an open-file-description write lock on `len` bytes of `file`
/// from `start` (`len` 0: to the end, however far it grows), without
/// waiting. `Ok(false)`: another open file description holds an overlapping
/// lock. The lock is released when the last descriptor of this open file
/// closes, whatever way its process ends.
pub fn ofd_try_write_lock(file: &File, start: u64, len: u64) -> io::Result<bool> {
    ofd_set(file, libc::F_WRLCK, start, len)
}

/// Release this open file description's lock on `len` bytes of `file` from
/// `start` (`len` 0: to the end).
pub fn ofd_unlock(file: &File, start: u64, len: u64) -> io::Result<()> {
    ofd_set(file, libc::F_UNLCK, start, len).map(drop)
}

fn ofd_set(file: &File, kind: libc::c_int, start: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "lock range beyond the largest file offset");
    let lock = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: libc::off_t::try_from(start).map_err(|_| too_far())?,
        l_len: libc::off_t::try_from(len).map_err(|_| too_far())?,
        // Must be 0 for OFD locks.
        l_pid: 0,
    };
    // SAFETY: `file` is an open descriptor for the call's duration and
    // `lock` is a valid `struct flock` the kernel only reads for F_OFD_SETLK.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if result == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// Whether another open file description holds a lock that would refuse a
/// write lock on `len` bytes of `file` from `start`, without taking one.
pub fn ofd_write_lock_conflicts(file: &File, start: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "lock range beyond the largest file offset");
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: libc::off_t::try_from(start).map_err(|_| too_far())?,
        l_len: libc::off_t::try_from(len).map_err(|_| too_far())?,
        l_pid: 0,
    };
    // SAFETY: `file` is an open descriptor for the call's duration and
    // `lock` is a valid `struct flock` the kernel reads and overwrites.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
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
