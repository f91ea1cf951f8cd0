//! Job exports: a job whose spec asks for `export` restores through
//! [`crate::restore::restore_live`] and serves its volume over NBD from the
//! moment the manifest is validated and the target allocated. When the
//! restore ends (complete, or with damaged blocks that answer `EIO`) the
//! export stays up until the job is cancelled, its export is stopped
//! ([`Worker::stop_export`], `POST /v1/jobs/{id}/export/stop`) or the worker
//! shuts down. Meanwhile the target stays busy: no other job may write it.
//!
//! Where it listens: `worker.export_listen` (a loopback port range or a
//! socket directory); the spec's address must lie inside it, and `"export":
//! true` takes the first free port, or `<dir>/<job id>.sock`. The export name
//! is the job id. What it served (reads, writes, on-demand fetches, read
//! latency) is in the job's status while it is up, and stored with the job
//! when it stops.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::worker::ExportRange;
use crate::job::export::{ExportState, ExportStatus};
use crate::job::spec::ExportPlan;
use crate::job::{JobRecord, JobState};
use crate::nbd::{ExportAddr, Listener};
use crate::restore::latency::LatencySummary;
use crate::restore::live::LiveVolume;
use crate::restore::progress::Progress;
use crate::restore::{Publish, RestoreError, RestoreReport, RestoreSpec};

/// How long open connections get to finish their requests once an export
/// stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A running job export.
pub(super) struct ExportHandle {
    url: String,
    /// Stops the export (a child of the run's cancellation).
    pub(super) stop: CancellationToken,
    volume: watch::Sender<Option<Arc<LiveVolume>>>,
    stopped: std::sync::atomic::AtomicBool,
}

impl ExportHandle {
    pub(super) fn status(&self) -> ExportStatus {
        let volume = self.volume.borrow().clone();
        let state = match (&volume, self.stopped.load(Ordering::Relaxed)) {
            (_, true) => ExportState::Stopped,
            (Some(_), false) => ExportState::Serving,
            (None, false) => ExportState::Starting,
        };
        let mut status = ExportStatus {
            url: self.url.clone(),
            state,
            reads: 0,
            writes: 0,
            flushes: 0,
            demand_fetches: 0,
            demand_failures: 0,
            shared_fetches: 0,
            blocks_owned: 0,
            read_latency_local: LatencySummary::default(),
            read_latency_on_demand: LatencySummary::default(),
        };
        if let Some(volume) = volume {
            let c = &volume.counts;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            status.reads = n(&c.reads);
            status.writes = n(&c.writes);
            status.flushes = n(&c.flushes);
            status.demand_fetches = n(&c.demand_fetches);
            status.demand_failures = n(&c.demand_failures);
            status.shared_fetches = n(&c.shared_fetches);
            status.blocks_owned = n(&c.blocks_owned);
            status.read_latency_local = c.read_latency_local.summary();
            status.read_latency_on_demand = c.read_latency_on_demand.summary();
        }
        status
    }
}

/// Bind the export a job's plan names. `Any` over TCP tries the range's
/// ports in order.
pub(super) async fn bind(plan: &ExportPlan, job: &str) -> Result<(Listener, ExportAddr), String> {
    let addr = match plan {
        ExportPlan::At(addr) => addr.clone(),
        ExportPlan::Any(ExportRange::UnixDir(dir)) => {
            ExportAddr::Unix { path: dir.join(format!("{job}.sock")), name: job.to_owned() }
        }
        ExportPlan::Any(range @ ExportRange::Tcp { ip, ports }) => {
            for port in ports.clone() {
                let addr = ExportAddr::Tcp { addr: std::net::SocketAddr::new(*ip, port), name: job.to_owned() };
                match Listener::bind(&addr).await {
                    Ok(listener) => return Ok((listener, addr)),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                    Err(e) => return Err(format!("export at {}: cannot listen: {e}", addr.client_url())),
                }
            }
            return Err(format!("export: every port of worker.export_listen ({range}) is in use"));
        }
    };
    match Listener::bind(&addr).await {
        Ok(listener) => Ok((listener, addr)),
        Err(e) => Err(format!("export at {}: cannot listen: {e}", addr.client_url())),
    }
}

impl Worker {
    /// Run a job's restore with its export, then keep serving until the
    /// job is cancelled or the export stopped; then release the target.
    pub(super) async fn run_exported(
        self: Arc<Self>,
        record: JobRecord,
        spec: RestoreSpec,
        plan: ExportPlan,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) {
        let id = record.spec.id.clone();
        let (listener, addr) = match bind(&plan, &id).await {
            Ok(bound) => bound,
            Err(e) => return self.finish_blocking(record, Ok(Err(RestoreError::Usage(e))), progress, false).await,
        };
        let stop = cancel.child_token();
        let handle = Arc::new(ExportHandle {
            url: addr.client_url(),
            stop: stop.clone(),
            volume: watch::channel(None).0,
            stopped: false.into(),
        });
        self.live().exports.insert(id.clone(), Arc::clone(&handle));
        tracing::info!(job = %id, url = %handle.url, "job export listening");
        let server = crate::nbd::spawn_server(
            &id,
            crate::nbd::serve_when_published(listener, id.clone(), handle.volume.subscribe(), stop.clone(), || {}),
        );
        let published = Arc::clone(&handle);
        let publish: Publish = Arc::new(move |volume| {
            published.volume.send_replace(Some(volume));
        });
        let result = self.restore_with(spec, Arc::clone(&progress), cancel, publish).await;
        let serve_on = matches!(result, Ok(Ok(_)) | Ok(Err(RestoreError::BlocksFailed(_))))
            && handle.volume.borrow().is_some()
            && !stop.is_cancelled();
        Arc::clone(&self).finish_blocking(record.clone(), result, progress, serve_on).await;
        if serve_on {
            tracing::info!(job = %id, url = %handle.url, "restore ended; the export stays up until cancelled or stopped");
            stop.cancelled().await;
        }
        stop.cancel();
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, server).await;
        handle.stopped.store(true, Ordering::Relaxed);
        tracing::info!(job = %id, url = %handle.url, "job export stopped");
        let worker = Arc::clone(&self);
        let _ = tokio::task::spawn_blocking(move || worker.export_ended(&record, &handle, serve_on)).await;
    }

    async fn restore_with(
        &self,
        spec: RestoreSpec,
        progress: Arc<Progress>,
        cancel: CancellationToken,
        publish: Publish,
    ) -> Result<Result<RestoreReport, RestoreError>, String> {
        let engine = Arc::clone(&self.engine);
        // Its own task, so a panic in the restore still ends the run.
        tokio::spawn(async move { crate::restore::restore_live(&engine, &spec, &progress, &cancel, publish).await })
            .await
            .map_err(|e| format!("internal error: the restore task ended abnormally: {e}"))
    }

    /// [`finish_run`](Self::finish_run) off the async threads.
    pub(super) async fn finish_blocking(
        self: Arc<Self>,
        record: JobRecord,
        result: Result<Result<RestoreReport, RestoreError>, String>,
        progress: Arc<Progress>,
        keep_target: bool,
    ) {
        let _ = tokio::task::spawn_blocking(move || self.finish_run(&record, result, &progress, keep_target)).await;
    }

    /// The export has stopped: store what it served with the job, and
    /// release the target when the run kept it for the export (otherwise
    /// the run released it as it ended, and a later run may hold it now).
    fn export_ended(&self, record: &JobRecord, handle: &Arc<ExportHandle>, kept_target: bool) {
        let id = &record.spec.id;
        let status = handle.status();
        let mut live = self.live();
        let stored = self.store.transition(id, &JobState::ALL, Some(record.run), |r| r.export = Some(status));
        if let Err(e) = stored {
            tracing::info!(job = %id, error = %e, "the export's last status was not stored: the job changed");
        }
        if live.exports.get(id).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            live.exports.remove(id);
        }
        if kept_target && live.busy_targets.get(&record.spec.target) == Some(id) {
            live.busy_targets.remove(&record.spec.target);
        }
        drop(live);
        self.wake.notify_one();
    }

    /// Stop a job's export (the restore, if it still runs, goes on).
    pub fn stop_export(&self, id: &str) -> Result<JobStatus, StopExportError> {
        let record = self.store.get(id).map_err(StopExportError::Store)?;
        let record = record.ok_or_else(|| StopExportError::NotFound(id.to_owned()))?;
        let handle = self.live().exports.get(id).cloned();
        match handle {
            Some(handle) if !handle.stop.is_cancelled() => {
                handle.stop.cancel();
                tracing::info!(job = %id, "job export stop requested");
                Ok(self.status_of(&record))
            }
            _ => Err(StopExportError::NoExport(id.to_owned())),
        }
    }
}

/// Why an export was not stopped.
#[derive(Debug, thiserror::Error)]
pub enum StopExportError {
    #[error("job {0} not found")]
    NotFound(String),
    #[error("job {0} has no export being served")]
    NoExport(String),
    #[error(transparent)]
    Store(JobDbError),
}
