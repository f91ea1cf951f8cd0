//! The startup sweep: staging files no checkpoint owns are removed before
//! the scheduler starts.

use crate::restore::Engine;

/// Remove staging files under each `worker.target_roots` that no checkpoint
/// owns: partial files of crashed restores, which cannot be resumed. Runs
/// before the scheduler starts, so no run of this worker is writing one.
/// Roots are canonicalized first (checkpoints are keyed by the resolved
/// target path, so a root reached through a symlink must not look unowned).
/// A root that cannot be swept is logged and skipped: the worker still starts.
pub(super) fn sweep_target_roots(engine: &Engine) {
    let config = &engine.config;
    if !config.checkpoint.enabled {
        tracing::info!("checkpoints disabled: staging files under the target roots are not swept");
        return;
    }
    let dir = match crate::checkpoint::CheckpointDir::open(config.checkpoint.resolved_dir()) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::warn!(dir = %config.checkpoint.resolved_dir().display(), error = %e, "staging sweep skipped");
            return;
        }
    };
    for root in &config.worker.target_roots {
        match root.canonicalize().and_then(|root| crate::target::sweep_staging(&root, &dir)) {
            Ok(paths) if paths.is_empty() => {}
            Ok(paths) => {
                tracing::info!(root = %root.display(), files = paths.len(), "swept staging files no checkpoint owns")
            }
            Err(e) => tracing::warn!(root = %root.display(), error = %e, "staging sweep of a target root failed"),
        }
    }
}
