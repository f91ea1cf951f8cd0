//! The command line: `snapshot create`, `restore`, `verify`, `demo`.
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
    init_tracing();
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
        "sources: {}; requests {}, retries {}, fallbacks {}, corrupt responses {}",
        sources.join(", "),
        report.fetch.requests,
        report.fetch.retries,
        report.fetch.fallbacks,
        report.fetch.corrupt_responses
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
