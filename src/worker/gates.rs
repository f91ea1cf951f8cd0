//! The gates a queued job passes before it starts: its target is not still
//! being written by an earlier run, and the target's filesystem has room for
//! what is left to write.

use std::path::Path;

use super::*;
use crate::job::JobRecord;

impl Worker {
    /// The gates a queued job passes before it starts.
    pub(super) async fn gate(&self, record: &JobRecord) -> Gate {
        let id = &record.spec.id;
        let holder = self.live().busy_targets.get(&record.spec.target).cloned();
        if let Some(holder) = holder {
            return Gate::Hold(format!(
                "target busy: run of job {holder} on this target is still stopping (or still serves its export)"
            ));
        }
        let resolved = match crate::job::spec::resolve(&record.spec, &self.config) {
            Ok(r) => r,
            Err(e) => return Gate::Never(format!("the job no longer fits the worker's configuration: {e}")),
        };
        if is_block_device(&resolved.target) {
            // Written in place: its size is checked when it is opened.
            return Gate::Pass;
        }
        let known = self.live().needs.get(id).copied();
        let needed = match known {
            Some(n) => n,
            // A manifest that cannot be read is the restore's to report (with
            // its classified error), not a gate's.
            None => match self.manifest_bytes(&resolved.manifest_url).await {
                Some(n) => {
                    self.live().needs.insert(id.clone(), n);
                    n
                }
                None => return Gate::Pass,
            },
        };
        let dir = crate::target::parent_dir(&record.spec.target);
        let already = staged_bytes(&record.spec.target);
        match filesystem_bytes(&dir) {
            Ok((free, total)) => space_gate(needed, already, free, total, self.config.target_free_bytes_min),
            Err(e) => Gate::Hold(format!("free space of {}: {e}", dir.display())),
        }
    }

    pub(super) async fn manifest_bytes(&self, manifest_url: &str) -> Option<u64> {
        let purpose = crate::restore::source::Purpose::Inspect;
        let opened = crate::restore::source::open_snapshot(&self.engine, manifest_url, 0, purpose).await.ok()?;
        Some(opened.snapshot.block_bytes_total())
    }
}

/// What a gate decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Not now; the reason is shown in the job's status.
    Hold(String),
    /// Never: the job fails with this reason.
    Never(String),
}

/// The free-space gate: `needed` bytes of blocks, `already` of them allocated
/// by an earlier run's staging file, on a filesystem of `total` bytes with
/// `free` available, keeping `floor` free.
pub fn space_gate(needed: u64, already: u64, free: u64, total: u64, floor: u64) -> Gate {
    if needed > total {
        return Gate::Never(format!(
            "the restore needs {needed} bytes, more than the target filesystem's whole size ({total} bytes)"
        ));
    }
    let remaining = needed.saturating_sub(already);
    if free < remaining.saturating_add(floor) {
        return Gate::Hold(format!(
            "free space: the restore needs {remaining} more bytes and worker.target_free_bytes_min keeps {floor} free; the filesystem has {free}"
        ));
    }
    Gate::Pass
}

/// Bytes a staging file of an earlier run already allocates.
pub(super) fn staged_bytes(target: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    crate::target::staging_path(target)
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.blocks().saturating_mul(512))
}

/// (available, total) bytes of the filesystem holding `path`.
pub fn filesystem_bytes(path: &Path) -> std::io::Result<(u64, u64)> {
    let space = crate::sys::filesystem_space(path)?;
    Ok((space.available_bytes, space.total_bytes))
}

pub(super) fn is_block_device(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_gate_holds_fails_and_passes() {
        assert_eq!(space_gate(100, 0, 1000, 10_000, 0), Gate::Pass);
        assert!(matches!(space_gate(100, 0, 150, 10_000, 100), Gate::Hold(r) if r.contains("target_free_bytes_min")));
        // An earlier run's staging file already holds most of it.
        assert_eq!(space_gate(100, 80, 150, 10_000, 100), Gate::Pass);
        assert!(matches!(space_gate(20_000, 0, 150, 10_000, 0), Gate::Never(r) if r.contains("whole size")));
    }
}
