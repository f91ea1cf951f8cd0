//! `rehydrate restore --export URL`: restore and serve the volume over NBD
//! while it is restored, then keep serving it until SIGINT or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::RestoreArgs;
use super::commands::{cancel_on_signal, run_with_progress};
use super::output::{fail, print_restore_result};
use crate::error::ExitCode;
use crate::nbd::{ExportAddr, Listener};
use crate::restore::live::LiveVolume;
use crate::restore::{Engine, Publish, RestoreError, RestoreSpec};

/// How long open connections get to finish their requests at the end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn restore_exported(engine: Engine, args: RestoreArgs, addr: ExportAddr) -> ExitCode {
    // Bound first: a taken address fails the command before any work.
    let listener = match Listener::bind(&addr).await {
        Ok(listener) => listener,
        Err(e) => return fail(&format!("export {}: cannot listen: {e}", addr.client_url()), ExitCode::Usage),
    };
    let (volume_tx, volume_rx) = watch::channel::<Option<Arc<LiveVolume>>>(None);
    let publish: Publish = Arc::new(move |volume| {
        volume_tx.send_replace(Some(volume));
    });
    let stop = CancellationToken::new();
    let published = volume_rx.clone();
    let url = addr.client_url();
    let announce = move || eprintln!("exporting at {url}");
    let server = crate::nbd::spawn_server(
        addr.name(),
        crate::nbd::serve_when_published(listener, addr.name().to_owned(), volume_rx, stop.clone(), announce),
    );
    let spec = RestoreSpec {
        manifest_url: args.manifest,
        target: args.target,
        secondaries: args.secondaries,
        peers: args.peers,
        in_place: true,
        restart: args.restart,
        blocks: None,
        job: None,
    };
    let result = run_with_progress(&engine, &spec, !args.json, Some(publish)).await;
    let code = print_restore_result(&result, args.json);
    // Served on after the restore: a complete volume, or one whose damaged
    // blocks answer EIO. Not after a stop, or a target that failed to write.
    let serve_on = matches!(result, Ok(_) | Err(RestoreError::BlocksFailed(_)));
    if published.borrow().is_some() && serve_on {
        eprintln!("still exporting {} at {} until SIGINT or SIGTERM", spec.target.display(), addr.client_url());
        let signal = CancellationToken::new();
        cancel_on_signal(signal.clone()).await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, server).await;
    if let Some(volume) = published.borrow().as_ref() {
        eprintln!("{}", served_summary(&volume.counts));
    }
    code
}

/// One line of what the export served, for the operator and benchmarks.
fn served_summary(c: &crate::restore::live::LiveCounts) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let (local, on_demand) = (c.read_latency_local.summary(), c.read_latency_on_demand.summary());
    format!(
        "export served {} reads (local: {}, p50 {} ms, p99 {} ms; on demand: {}, p50 {} ms, p99 {} ms), {} writes, {} flushes; {} blocks fetched on demand ({} failed), {} taken from the background's fetches, {} blocks written by the client",
        c.reads.load(Relaxed),
        local.count,
        local.p50_millis,
        local.p99_millis,
        on_demand.count,
        on_demand.p50_millis,
        on_demand.p99_millis,
        c.writes.load(Relaxed),
        c.flushes.load(Relaxed),
        c.demand_fetches.load(Relaxed),
        c.demand_failures.load(Relaxed),
        c.shared_fetches.load(Relaxed),
        c.blocks_owned.load(Relaxed),
    )
}
