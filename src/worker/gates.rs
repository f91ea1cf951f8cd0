//! The gates a queued job passes before it starts: its target is not still
//! being written by an earlier run, and the target's filesystem has room for
//! what is left to write besides what the restores already running (or
//! starting in the same round) there will still write.

use std::path::{Path, PathBuf};

use super::*;
use crate::job::JobRecord;

impl Worker {
    /// Read, all at once, the manifests the space gates of `records` need
    /// and do not know yet (each is a round trip to its store; one after
    /// another they started the jobs of a burst tens of milliseconds apart).
    pub(super) async fn learn_needs(self: &Arc<Self>, records: &[JobRecord]) {
        let unknown: Vec<(String, String)> = {
            let live = self.live();
            records
                .iter()
                .filter(|r| !live.needs.contains_key(&r.spec.id))
                .filter_map(|r| {
                    let resolved = crate::job::spec::resolve(&r.spec, &self.config).ok()?;
                    (!is_block_device(&resolved.target)).then(|| (r.spec.id.clone(), resolved.manifest_url))
                })
                .collect()
        };
        let mut reads = tokio::task::JoinSet::new();
        for (id, url) in unknown {
            let worker = Arc::clone(self);
            reads.spawn(async move { (id, worker.manifest_bytes(&url).await) });
        }
        while let Some(read) = reads.join_next().await {
            // A manifest that cannot be read is the restore's to report (with
            // its classified error), not a gate's: its gate passes.
            if let Ok((id, Some(n))) = read {
                self.live().needs.insert(id, n);
            }
        }
    }

    /// The gates a queued job passes before it starts (its needs read by
    /// [`learn_needs`](Self::learn_needs)). `starting`: what the jobs that
    /// passed earlier in this round will write; a job that passes adds its
    /// own.
    pub(super) fn gate(&self, record: &JobRecord, starting: &mut Vec<Reserved>) -> Gate {
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
        let Some(needed) = self.live().needs.get(&record.spec.id).copied() else { return Gate::Pass };
        let dir = crate::target::parent_dir(&record.spec.target);
        let already = staged_bytes(&record.spec.target);
        let space = filesystem_bytes(&dir).and_then(|space| Ok((space, device_of(&dir)?)));
        let ((free, total), device) = match space {
            Ok(space) => space,
            Err(e) => return Gate::Hold(format!("free space of {}: {e}", dir.display())),
        };
        let reserved = self.reserved_on(device, starting);
        let gate = space_gate(needed, already, free, total, self.config.target_free_bytes_min, reserved);
        if gate == Gate::Pass {
            starting.push(Reserved { device, bytes: needed.saturating_sub(already) });
        }
        gate
    }

    /// Bytes the running restores (and `starting`) on filesystem `device`
    /// still write: what they need less what their staging files hold.
    fn reserved_on(&self, device: u64, starting: &[Reserved]) -> u64 {
        let running: Vec<(PathBuf, u64)> = {
            let live = self.live();
            live.running.values().filter_map(|r| Some((r.target.clone(), r.needs?))).collect()
        };
        let running = running
            .iter()
            .filter(|(target, _)| device_of(&crate::target::parent_dir(target)).is_ok_and(|d| d == device));
        let running: u64 = running.map(|(target, needs)| needs.saturating_sub(staged_bytes(target))).sum();
        let starting: u64 = starting.iter().filter(|s| s.device == device).map(|s| s.bytes).sum();
        running.saturating_add(starting)
    }

    pub(super) async fn manifest_bytes(&self, manifest_url: &str) -> Option<u64> {
        let purpose = crate::restore::source::Purpose::Inspect;
        let opened = crate::restore::source::open_snapshot(&self.engine, manifest_url, 0, purpose).await.ok()?;
        Some(opened.snapshot.block_bytes_total())
    }
}

/// Bytes a job that passed its gate will write on a filesystem.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reserved {
    device: u64,
    bytes: u64,
}

fn device_of(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.dev())
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
/// `free` available, of which the running restores there will still write
/// `reserved`, keeping `floor` free.
pub fn space_gate(needed: u64, already: u64, free: u64, total: u64, floor: u64, reserved: u64) -> Gate {
    if needed > total {
        return Gate::Never(format!(
            "the restore needs {needed} bytes, more than the target filesystem's whole size ({total} bytes)"
        ));
    }
    let remaining = needed.saturating_sub(already);
    if free < remaining.saturating_add(floor).saturating_add(reserved) {
        return Gate::Hold(format!(
            "free space: the restore needs {remaining} more bytes, the restores running on that filesystem will still write {reserved} and worker.target_free_bytes_min keeps {floor} free; the filesystem has {free}"
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
        assert_eq!(space_gate(100, 0, 1000, 10_000, 0, 0), Gate::Pass);
        assert!(
            matches!(space_gate(100, 0, 150, 10_000, 100, 0), Gate::Hold(r) if r.contains("target_free_bytes_min"))
        );
        // An earlier run's staging file already holds most of it.
        assert_eq!(space_gate(100, 80, 150, 10_000, 100, 0), Gate::Pass);
        assert!(matches!(space_gate(20_000, 0, 150, 10_000, 0, 0), Gate::Never(r) if r.contains("whole size")));
        // What running restores will still write is not free: 1000 free, 950
        // of it theirs.
        assert!(matches!(space_gate(100, 0, 1000, 10_000, 0, 950), Gate::Hold(r) if r.contains("still write 950")));
        assert_eq!(space_gate(100, 0, 1000, 10_000, 0, 900), Gate::Pass);
    }
}
