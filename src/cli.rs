//! The command line: `snapshot create`, `restore`, `verify`, `demo`, and the
//! worker: `serve` and its client `job submit|get|list|cancel`.
//!
//! Deployment helpers (`health`, `completions`, `man`) are in [`ops`].
//!
//! Human output goes to stdout (summaries) and stderr (progress, logs);
//! `--json` replaces the summary with one JSON object on stdout. Every command
//! ends with one of the exit codes of [`ExitCode`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::block::{Compression, HashAlgorithm};
use crate::config::{Config, parse_size_bytes};
use crate::error::ExitCode;
use crate::job::progress::Progress;
use crate::job::{Engine, RestoreError, RestoreReport, RestoreSpec};
use crate::store::StoreUrl;

pub mod ops;

#[derive(Debug, Parser)]
#[command(name = "rehydrate", version, about = "Restore volumes from block snapshots in object stores")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Restore a snapshot into a file or block device.
    Restore(RestoreArgs),
    /// Read a target back and compare every block with a snapshot.
    Verify(VerifyArgs),
    /// Snapshot, restore and verify a sample volume, on embedded defaults.
    Demo(crate::demo::DemoArgs),
    /// Run the worker: an HTTP API that takes restore jobs.
    Serve(ServeArgs),
    /// Talk to a worker: submit, get, list, cancel jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Probe a worker's /healthz (or /readyz): exit 0 on 200, else 1.
    Health(ops::HealthArgs),
    /// Print a shell completion script.
    Completions(ops::CompletionsArgs),
    /// Print the man page (roff), or write one page per command into --dir.
    Man(ops::ManArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config file ([worker] section: listener, target roots, profiles).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override worker.listen.
    #[arg(long)]
    pub listen: Option<String>,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The worker: http://host:port.
    #[arg(long, env = "REHYDRATE_SERVER", default_value = "http://127.0.0.1:7878")]
    pub server: String,
    /// Bearer token (prefer the environment: it stays out of `ps`).
    #[arg(long, env = "REHYDRATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job (idempotent on --id).
    Submit {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: String,
        /// A store profile of the worker's configuration.
        #[arg(long)]
        profile: String,
        /// The manifest's key under the profile's store (vol.manifest).
        #[arg(long)]
        manifest: String,
        #[arg(long)]
        target: PathBuf,
        /// Cancel an active job on the same target and take over its work.
        #[arg(long)]
        replace: bool,
        /// Discard a checkpoint an earlier restore (of another snapshot) left
        /// on the target instead of resuming it.
        #[arg(long)]
        restart: bool,
    },
    /// Show one job.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
    /// List jobs, oldest first, a page at a time.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only jobs in these states (queued, running, succeeded, failed,
        /// cancelled); repeat or separate with commas.
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// At most this many jobs (1 to 1000; the worker's default is 100).
        #[arg(long)]
        limit: Option<usize>,
        /// Start after this cursor: the `next` a previous page printed.
        #[arg(long)]
        after: Option<String>,
    },
    /// Cancel a job (it checkpoints; resubmitting resumes it).
    Cancel {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a file or block device into a store.
    Create(CreateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The file or block device to snapshot.
    #[arg(long)]
    pub source: PathBuf,
    /// Store URL: file:///abs/dir or s3://bucket/prefix.
    #[arg(long)]
    pub store: String,
    /// Snapshot name (default: the source's file name and the time).
    #[arg(long)]
    pub name: Option<String>,
    /// Block size: 4KiB … 64MiB, a multiple of 4 KiB.
    #[arg(long, default_value = "1MiB")]
    pub block_size: String,
    #[arg(long, default_value = "none")]
    pub compression: Compression,
    #[arg(long, default_value = "blake3")]
    pub hash: HashAlgorithm,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Manifest URL: <store>/<name>.manifest.
    #[arg(long)]
    pub manifest: String,
    /// File or block device to restore into.
    #[arg(long)]
    pub target: PathBuf,
    /// A fallback source holding the same block objects (repeatable, in order).
    #[arg(long = "secondary")]
    pub secondaries: Vec<String>,
    /// Write an existing regular file in place instead of a staging file.
    #[arg(long)]
    pub in_place: bool,
    /// Discard the checkpoint of an earlier run and start from the beginning.
    #[arg(long)]
    pub restart: bool,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub manifest: String,
    #[arg(long)]
    pub target: PathBuf,
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Parse the command line and run it.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The worker sets up its own logging, in the format its config asks for.
    if !matches!(cli.command, Command::Serve(_)) {
        init_tracing();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::Internal.into();
        }
    };
    let code = runtime.block_on(run(cli));
    // Do not wait for stragglers (a wedged request): every result is reported.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code.into()
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REHYDRATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Snapshot(SnapshotCommand::Create(args)) => snapshot_create(args).await,
        Command::Restore(args) => restore(args).await,
        Command::Verify(args) => verify(args).await,
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Job(command) => job(command).await,
        Command::Health(args) => ops::health(args).await,
        Command::Completions(args) => ops::completions(args),
        Command::Man(args) => ops::man(args),
    }
}

/// Load the config file, or the embedded defaults.
pub fn load_config(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::default()),
        Some(path) => Config::load(path).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::Usage
        }),
    }
}

async fn snapshot_create(args: CreateArgs) -> ExitCode {
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

async fn restore(args: RestoreArgs) -> ExitCode {
    let Ok(config) = load_config(args.config.as_ref()) else {
        return ExitCode::Usage;
    };
    let engine = Engine::new(config);
    let spec = RestoreSpec {
        manifest_url: args.manifest,
        target: args.target,
        secondaries: args.secondaries,
        in_place: args.in_place,
        restart: args.restart,
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
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(cancel.clone()));
    let bar = show_progress.then(|| crate::progress_bar::spawn(Arc::clone(&progress)));
    let result = crate::job::restore::restore(engine, spec, &progress, &cancel).await;
    signals.abort();
    if let Some(bar) = bar {
        bar.finish().await;
    }
    result
}

async fn cancel_on_signal(cancel: CancellationToken) {
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

/// Print a restore's outcome and choose the exit code.
pub fn print_restore_result(result: &Result<RestoreReport, RestoreError>, json: bool) -> ExitCode {
    match result {
        Ok(report) => {
            print_report(report, json);
            ExitCode::Success
        }
        Err(RestoreError::BlocksFailed(report)) => {
            print_report(report, json);
            eprintln!("error: {}", result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
            ExitCode::DataFailure
        }
        Err(e) => {
            if json {
                let body =
                    serde_json::json!({ "succeeded": false, "error": e.to_string(), "exit_code": e.exit_code() as u8 });
                println!("{body}");
            }
            fail(&e.to_string(), e.exit_code())
        }
    }
}

fn print_report(report: &RestoreReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
        return;
    }
    let state = if report.succeeded { "restored" } else { "FAILED" };
    println!(
        "{state}: {} blocks ({} settled, {} resumed, {} failed, {} zero, {} duplicate), {} in {:.2}s, {}/s, writer {}",
        report.blocks_total,
        report.blocks_settled,
        report.blocks_resumed,
        report.blocks_failed,
        report.blocks_zero,
        report.blocks_deduplicated,
        human_bytes(report.bytes_total),
        report.duration_secs,
        human_bytes(report.throughput_bytes_per_sec as u64),
        report.writer_backend.map(|b| b.name()).unwrap_or("none"),
    );
    let sources: Vec<String> = report.fetch.served_by_source.iter().map(|(name, n)| format!("{name} {n}")).collect();
    println!(
        "sources: {}; requests {}, retries {}, fallbacks {}, hedges {}, corrupt responses {}",
        sources.join(", "),
        report.fetch.requests,
        report.fetch.retries,
        report.fetch.fallbacks,
        report.fetch.hedges,
        report.fetch.corrupt_responses
    );
    if report.fetch.throttled_responses > 0 {
        let rates: Vec<String> =
            report.fetch.request_rate_per_source.iter().map(|(name, rate)| format!("{name} {rate} req/s")).collect();
        println!(
            "throttled: {:.1}s by the store ({} throttled answers, retried at the adapted rate); settled at {}",
            report.fetch.throttled_millis as f64 / 1000.0,
            report.fetch.throttled_responses,
            if rates.is_empty() { "no pace (recovered)".to_owned() } else { rates.join(", ") }
        );
    }
    let t = &report.timings;
    println!(
        "time: prepare {:.2}s, transfer {:.2}s (its tail after the last block was sent for: {:.2}s), finish {:.2}s",
        t.prepare_secs, t.transfer_secs, t.tail_secs, t.finish_secs
    );

    for damaged in &report.damage {
        let errors: Vec<String> = damaged
            .failures
            .iter()
            .map(|f| format!("{} after {} attempts: {}", f.source, f.attempts, f.last_error))
            .collect();
        println!("damaged block {} at offset {}: {}", damaged.index, damaged.offset_bytes, errors.join("; "));
    }
}

async fn verify(args: VerifyArgs) -> ExitCode {
    let Ok(config) = load_config(args.config.as_ref()) else {
        return ExitCode::Usage;
    };
    let engine = Engine::new(config);
    let (url, key) = match StoreUrl::parse_manifest(&args.manifest) {
        Ok(parts) => parts,
        Err(e) => return usage(&e.to_string()),
    };
    let manifest = match async {
        let store = engine.open_store(&url).await?;
        crate::job::load_manifest(&engine, &store, &key).await
    }
    .await
    {
        Ok(m) => m,
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    let target = args.target.clone();
    let report = match tokio::task::spawn_blocking(move || crate::job::readback::readback(&manifest, &target)).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => {
            return fail(&format!("reading {}: {e}", args.target.display()), ExitCode::IoFailure);
        }
        Err(e) => return fail(&format!("read-back task failed: {e}"), ExitCode::Internal),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
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
async fn serve(args: ServeArgs) -> ExitCode {
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
async fn job(command: JobCommand) -> ExitCode {
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
        JobCommand::Submit { id, profile, manifest, target, replace, restart, .. } => {
            let spec = crate::worker::JobSpec {
                id: id.clone(),
                profile: profile.clone(),
                manifest: manifest.clone(),
                target: target.clone(),
                replace: *replace,
                restart: *restart,
            };
            client.submit(&spec).await.map(|a| a.body)
        }
        JobCommand::Get { id, .. } => client.get(id).await,
        JobCommand::List { state, limit, after, .. } => client.list(state, *limit, after.as_deref()).await,
        JobCommand::Cancel { id, .. } => client.cancel(id).await,
    };
    match result {
        Ok(body) if client_args.json => {
            println!("{body}");
            ExitCode::Success
        }
        Ok(body) => {
            match body.get("jobs").and_then(|j| j.as_array()) {
                Some(jobs) => jobs.iter().for_each(print_job_line),
                None => print_job_line(&body),
            }
            if let Some(next) = body.get("next").and_then(|n| n.as_str()) {
                eprintln!("more: rehydrate job list --after {next}");
            }
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

fn print_job_line(job: &serde_json::Value) {
    let s = |k: &str| job.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_owned();
    let n = |a: &str, b: &str| job.get(a).and_then(|v| v.get(b)).and_then(|v| v.as_u64()).unwrap_or(0);
    let stalled = if job.get("stalled").and_then(|v| v.as_bool()).unwrap_or(false) { " STALLED" } else { "" };
    println!(
        "{} {}{} phase={} blocks {}/{} failed {} target={}{}{}",
        s("id"),
        s("state"),
        stalled,
        s("phase"),
        n("blocks", "settled"),
        n("blocks", "total"),
        n("blocks", "failed"),
        s("target"),
        job.get("held_by").and_then(|v| v.as_str()).map(|h| format!(" held: {h}")).unwrap_or_default(),
        job.get("reason").and_then(|v| v.as_str()).map(|r| format!(" ({r})")).unwrap_or_default(),
    );
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::Usage
}

fn fail(message: &str, code: ExitCode) -> ExitCode {
    eprintln!("error: {message}");
    code
}

/// `1.50 GiB`-style sizes for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.2} {}", UNITS[unit]) }
}
