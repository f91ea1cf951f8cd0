//! Each command of the CLI, run to its exit code.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::output::{JobAnswer, fail, human_bytes, print_job_answer, print_restore_result, usage};
use super::{CreateArgs, JobCommand, RestoreArgs, ServeArgs, VerifyArgs, load_config};
use crate::config::parse_size_bytes;
use crate::error::ExitCode;
use crate::restore::progress::Progress;
use crate::restore::source::Purpose;
use crate::restore::{Engine, RestoreError, RestoreReport, RestoreSpec};
use crate::store::StoreUrl;

pub(super) async fn snapshot_create(args: CreateArgs) -> ExitCode {
    let Ok(config) = load_config(args.config.as_ref()) else {
        return ExitCode::Usage;
    };
    let block_size = match parse_size_bytes(&args.block_size).map(u32::try_from) {
        Ok(Ok(size)) => size,
        Ok(Err(_)) => return usage(&format!("--block-size {} is too large", args.block_size)),
        Err(e) => return usage(&e),
    };
    let url = match StoreUrl::parse(&args.store) {
        Ok(url) => url,
        Err(e) => return usage(&e.to_string()),
    };
    let engine = Engine::new(config);
    let store = match engine.open_store(&url).await {
        Ok(store) => store,
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    let spec = crate::snapshot::CreateSpec {
        name: args.name.unwrap_or_else(|| crate::snapshot::default_name(&args.source)),
        source: args.source,
        block_size_bytes: block_size,
        compression: args.compression,
        hash_algorithm: args.hash,
        puts_inflight_max: 16,
    };
    match crate::snapshot::create(store, &spec).await {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                println!(
                    "snapshot {}: {} blocks ({} zero, {} duplicate), {} objects stored, {} already present, {} in {:.2}s",
                    report.snapshot_digest,
                    report.blocks_total,
                    report.blocks_zero,
                    report.blocks_deduplicated,
                    report.objects_stored,
                    report.objects_existing,
                    human_bytes(report.bytes_stored),
                    report.duration_secs
                );
                println!("{}", report.manifest_url);
            }
            ExitCode::Success
        }
        Err(e @ crate::snapshot::CreateError::Usage(_)) => usage(&e.to_string()),
        Err(e) => fail(&e.to_string(), ExitCode::IoFailure),
    }
}

pub(super) async fn restore(args: RestoreArgs) -> ExitCode {
    let Ok(config) = load_config(args.config.as_ref()) else {
        return ExitCode::Usage;
    };
    if let Some(url) = &args.export {
        if args.blocks.is_some() {
            return usage("--export serves the whole volume: it cannot be combined with --blocks");
        }
        let addr = match crate::nbd::ExportAddr::parse(url) {
            Ok(addr) => addr,
            Err(e) => return usage(&e),
        };
        return super::export::restore_exported(Engine::new(config), args, addr).await;
    }
    let engine = Engine::new(config);
    let spec = RestoreSpec {
        manifest_url: args.manifest,
        target: args.target,
        secondaries: args.secondaries,
        peers: args.peers,
        in_place: args.in_place,
        restart: args.restart,
        blocks: args.blocks,
        job: None,
    };
    let result = restore_with_progress(&engine, &spec, !args.json).await;
    print_restore_result(&result, args.json)
}

/// Run a restore with a progress bar on stderr, stopping cleanly on SIGINT or
/// SIGTERM.
pub async fn restore_with_progress(
    engine: &Engine,
    spec: &RestoreSpec,
    show_progress: bool,
) -> Result<RestoreReport, RestoreError> {
    run_with_progress(engine, spec, show_progress, None).await
}

/// [`restore_with_progress`], serving the volume through `publish` when given.
pub(super) async fn run_with_progress(
    engine: &Engine,
    spec: &RestoreSpec,
    show_progress: bool,
    publish: Option<crate::restore::Publish>,
) -> Result<RestoreReport, RestoreError> {
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(cancel.clone()));
    let bar = show_progress.then(|| super::progress_bar::spawn(Arc::clone(&progress)));
    let result = match publish {
        Some(publish) => crate::restore::restore_live(engine, spec, &progress, &cancel, publish).await,
        None => crate::restore::restore(engine, spec, &progress, &cancel).await,
    };
    signals.abort();
    if let Some(bar) = bar {
        bar.finish().await;
    }
    result
}

pub(super) async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("stopping: settling what is written, then exiting");
    cancel.cancel();
}

pub(super) async fn verify(args: VerifyArgs) -> ExitCode {
    let Ok(config) = load_config(args.config.as_ref()) else {
        return ExitCode::Usage;
    };
    let engine = Engine::new(config);
    if args.manifest.starts_with(crate::store::EBS_SCHEME) {
        let read = crate::restore::ebs::readback(&engine, &args.manifest, &args.target, args.blocks).await;
        return match read {
            Ok(report) => print_readback(&args, &report),
            Err(e) => fail(&e.to_string(), e.exit_code()),
        };
    }
    let opened = crate::restore::source::open_snapshot(&engine, &args.manifest, 0, Purpose::Inspect).await;
    let manifest = match opened {
        Ok(opened) => opened.snapshot,
        Err(e @ RestoreError::Usage(_)) => return usage(&e.to_string()),
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    let layout = manifest.layout();
    let blocks = match args.blocks.map(|b| b.resolve(&layout)) {
        None => crate::block::BlockRange::all(&layout),
        Some(Ok(blocks)) => blocks,
        Some(Err(e)) => return usage(&e),
    };
    let target = args.target.clone();
    let read = move || crate::restore::readback::readback_blocks(&*manifest, &target, blocks);
    let report = match tokio::task::spawn_blocking(read).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => {
            return fail(&format!("reading {}: {e}", args.target.display()), ExitCode::IoFailure);
        }
        Err(e) => return fail(&format!("read-back task failed: {e}"), ExitCode::Internal),
    };
    print_readback(&args, &report)
}

/// Print a read-back's outcome; its exit code.
fn print_readback(args: &VerifyArgs, report: &crate::restore::readback::ReadbackReport) -> ExitCode {
    let blocks = report.block_range;
    if args.json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
    } else if report.matches() && args.blocks.is_some() {
        println!("verified: the {} blocks {blocks} of {} match", report.blocks_total, args.target.display());
    } else if report.matches() {
        println!("verified: all {} blocks of {} match", report.blocks_total, args.target.display());
    } else {
        println!(
            "MISMATCH: {} of {} blocks differ: {:?}",
            report.mismatched.len(),
            report.blocks_total,
            report.mismatched
        );
    }
    if report.matches() { ExitCode::Success } else { ExitCode::DataFailure }
}

/// `rehydrate serve`: run the worker until SIGTERM/SIGINT, then stop taking
/// jobs, let running ones checkpoint, and exit within the grace period.
pub(super) async fn serve(args: ServeArgs) -> ExitCode {
    let Ok(mut config) = load_config(args.config.as_ref()) else {
        return ExitCode::Usage;
    };
    if let Some(listen) = args.listen {
        config.worker.listen = listen;
        if let Err(e) = config.validate() {
            return usage(&e.to_string());
        }
    }
    init_worker_tracing(config.worker.log_format);
    let tokens = match crate::api::Tokens::load(&config.worker) {
        Ok(t) => t,
        Err(e) => return usage(&e),
    };
    let listener = match tokio::net::TcpListener::bind(&config.worker.listen).await {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", config.worker.listen), ExitCode::IoFailure),
    };
    if let Err(e) = crate::api::metrics_handle() {
        return fail(&format!("cannot install the metrics recorder: {e}"), ExitCode::Internal);
    }
    let grace = config.worker.shutdown_grace();
    let engine = Arc::new(Engine::new(config));
    let worker = match crate::worker::Worker::start(engine) {
        Ok(w) => w,
        Err(e) => return fail(&e.to_string(), ExitCode::IoFailure),
    };
    let stop = CancellationToken::new();
    let signals = tokio::spawn(stop_on_signal(stop.clone()));
    let http_stop = CancellationToken::new();
    let mut server = tokio::spawn(crate::api::serve(listener, Arc::clone(&worker), tokens, {
        let http_stop = http_stop.clone();
        async move { http_stop.cancelled().await }
    }));
    tokio::select! {
        () = stop.cancelled() => {}
        result = &mut server => {
            signals.abort();
            worker.shutdown(grace).await;
            return match result {
                Ok(Err(e)) => fail(&format!("the API server stopped: {e}"), ExitCode::Usage),
                _ => fail("the API server stopped", ExitCode::Internal),
            };
        }
    }
    // /readyz turns 503 and submissions get 503 from here on; the listener
    // stays up through the grace period so status can still be read.
    tracing::info!("shutting down: no new jobs; running jobs checkpoint and resume at the next start");
    let clean = worker.shutdown(grace).await;
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    if clean { ExitCode::Success } else { ExitCode::Interrupted }
}

/// The worker's signal handler: logs through tracing (its logs may be JSON).
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the worker with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "stopping");
    stop.cancel();
}

fn init_worker_tracing(format: crate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REHYDRATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Text => builder.try_init(),
    };
}

/// `rehydrate job …`: 0 on a 2xx answer; 2 for a refused request (400, 401,
/// 404, 413, 422); 5 for a conflict (409) or a full queue (429); 1 otherwise.
pub(super) async fn job(command: JobCommand) -> ExitCode {
    use crate::api::client::ApiClient;
    let client_args = match &command {
        JobCommand::Submit { client, .. }
        | JobCommand::Get { client, .. }
        | JobCommand::List { client, .. }
        | JobCommand::Cancel { client, .. } => client,
    };
    let client = match ApiClient::new(&client_args.server, client_args.token.clone()) {
        Ok(c) => c,
        Err(e) => return usage(&e.to_string()),
    };
    let result = match &command {
        JobCommand::Submit { id, profile, manifest, target, replace, restart, export, .. } => {
            let spec = crate::job::JobSpec {
                id: id.clone(),
                profile: profile.clone(),
                manifest: manifest.clone(),
                target: target.clone(),
                replace: *replace,
                restart: *restart,
                export: match export.as_deref() {
                    None => crate::job::spec::JobExport::Flag(false),
                    Some("auto") => crate::job::spec::JobExport::Flag(true),
                    Some(url) => crate::job::spec::JobExport::Url(url.to_owned()),
                },
            };
            client.submit(&spec).await.map(|s| JobAnswer::One(Box::new(s.job)))
        }
        JobCommand::Get { id, .. } => client.get(id).await.map(|j| JobAnswer::One(Box::new(j))),
        JobCommand::List { state, limit, after, .. } => {
            client.list(state, *limit, after.as_deref()).await.map(JobAnswer::Page)
        }
        JobCommand::Cancel { id, .. } => client.cancel(id).await.map(|j| JobAnswer::One(Box::new(j))),
    };
    match result {
        Ok(answer) => {
            print_job_answer(&answer, client_args.json);
            ExitCode::Success
        }
        Err(e) => {
            if client_args.json
                && let crate::api::client::ClientError::Status { body, .. } = &e
            {
                println!("{body}");
            }
            let code = match e.status().map(|s| s.as_u16()) {
                Some(400 | 401 | 404 | 413 | 422) => ExitCode::Usage,
                Some(409 | 429) => ExitCode::Refused,
                _ => ExitCode::Internal,
            };
            fail(&e.to_string(), code)
        }
    }
}
