//! The command line: `snapshot create`, `restore`, `verify`, `demo`, and the
//! worker: `serve` and its client `job submit|get|list|cancel`.
//!
//! Deployment helpers (`health`, `completions`, `man`) are in [`ops`];
//! `openapi` prints the worker API's OpenAPI document.
//!
//! Human output goes to stdout (summaries) and stderr (progress, logs);
//! `--json` replaces the summary with one JSON object on stdout. Every command
//! ends with one of the exit codes of [`ExitCode`].
//!
//! This file parses the command line; [`commands`] runs each command,
//! [`output`] prints results, [`demo`] is `rehydrate demo` and
//! [`progress_bar`] draws a running restore on stderr.

mod commands;
pub mod demo;
mod export;
mod output;
pub mod progress_bar;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::block::{BlockSelection, Compression, HashAlgorithm};
use crate::config::Config;
use crate::error::ExitCode;

pub use commands::restore_with_progress;
pub use output::{human_bytes, print_restore_result};

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
    Demo(demo::DemoArgs),
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
    /// Print the worker API's OpenAPI 3.1 document (JSON), as GET
    /// /openapi.json serves it.
    Openapi,
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
        /// Serve the volume over NBD while it is restored: an export URL
        /// inside the worker's `worker.export_listen`, or `auto` for the
        /// first free one.
        #[arg(long, value_name = "URL|auto")]
        export: Option<String>,
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
    /// A peer worker (`http://host:port`) asked for each block before the
    /// store (repeatable; list the fleet's other members in fleet order:
    /// they are asked from `peers.fleet_index` on, wrapping; `[peers]` sets
    /// their token and deadline).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Write an existing regular file in place instead of a staging file.
    #[arg(long)]
    pub in_place: bool,
    /// Discard the checkpoint of an earlier run and start from the beginning.
    #[arg(long)]
    pub restart: bool,
    /// Restore and checkpoint only these blocks, one shard of the volume:
    /// START..END (block indexes, END exclusive) or I/N (shard I of N, from
    /// 0). Shards write in place side by side: the target must be a block
    /// device, or an existing file with --in-place.
    #[arg(long, value_name = "START..END|I/N")]
    pub blocks: Option<BlockSelection>,
    /// Serve the volume over NBD while it is restored, and after, until
    /// SIGINT/SIGTERM: nbd://127.0.0.1:10809/NAME (loopback only) or
    /// nbd+unix:///PATH.sock. A file target is then written in place.
    #[arg(long, value_name = "URL")]
    pub export: Option<String>,
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
    /// Compare only these blocks: START..END (END exclusive) or I/N (shard I
    /// of N, from 0), as `restore --blocks` takes them.
    #[arg(long, value_name = "START..END|I/N")]
    pub blocks: Option<BlockSelection>,
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
    // The command runs as a task on the runtime's workers, not on this
    // thread: a restore's settler is woken once per unit, and a wake that
    // crosses to a thread parked outside the workers costs a context switch
    // each time (0.56 a block at 256 KiB, `perf` sched_switch counts).
    let code = runtime.block_on(async {
        match tokio::spawn(run(cli)).await {
            Ok(code) => code,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                eprintln!("error: the command's task ended early: {e}");
                ExitCode::Internal
            }
        }
    });
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
        Command::Snapshot(SnapshotCommand::Create(args)) => commands::snapshot_create(args).await,
        Command::Restore(args) => commands::restore(args).await,
        Command::Verify(args) => commands::verify(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Serve(args) => commands::serve(args).await,
        Command::Job(command) => commands::job(command).await,
        Command::Health(args) => ops::health(args).await,
        Command::Completions(args) => ops::completions(args),
        Command::Man(args) => ops::man(args),
        Command::Openapi => {
            print!("{}", crate::api::openapi_json_text());
            ExitCode::Success
        }
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
