//! Commands for the places rehydrate is deployed, not for restores:
//! `health` (a container HEALTHCHECK without curl), `completions SHELL` and
//! `man`, both generated from the clap definitions of [`Cli`](super::Cli) so
//! they cannot drift from the flags the binary takes.
//!
//! Limits: `health` sends one request with a deadline (`--timeout-millis`);
//! `man --dir` writes one page per command and nothing else.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory};

use crate::error::ExitCode;

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The worker: http://host:port.
    #[arg(long, env = "REHYDRATE_SERVER", default_value = "http://127.0.0.1:7878")]
    pub server: String,
    /// Probe /readyz (503 once the worker is stopping) instead of /healthz.
    #[arg(long)]
    pub ready: bool,
    /// Give up after this long: a worker that does not answer is unhealthy.
    #[arg(long, default_value_t = 3000)]
    pub timeout_millis: u64,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command (rehydrate.1, rehydrate-restore.1, …) into
    /// this directory instead of printing the top-level page.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `rehydrate health`: 0 when the worker answers 200, 1 when it answers
/// anything else or nothing in time (Docker's HEALTHCHECK reads 1 as
/// unhealthy), 2 for a server URL that is not `http://host:port`.
pub async fn health(args: HealthArgs) -> ExitCode {
    let client = match crate::api::client::ApiClient::new(&args.server, None) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::Usage;
        }
    };
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let deadline = Duration::from_millis(args.timeout_millis);
    match tokio::time::timeout(deadline, client.raw(hyper::Method::GET, path, None)).await {
        Ok(Ok(answer)) if answer.status == hyper::StatusCode::OK => {
            println!("{}{path}: {}", args.server, answer.status);
            ExitCode::Success
        }
        Ok(Ok(answer)) => {
            eprintln!("unhealthy: {}{path} answered {}", args.server, answer.status);
            ExitCode::Internal
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {e}");
            ExitCode::Internal
        }
        Err(_) => {
            eprintln!("unhealthy: {}{path} did not answer within {} ms", args.server, args.timeout_millis);
            ExitCode::Internal
        }
    }
}

/// `rehydrate completions SHELL`: the completion script on stdout.
pub fn completions(args: CompletionsArgs) -> ExitCode {
    let mut command = super::Cli::command();
    // Into memory first: the generator panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "rehydrate", &mut script);
    finish(print(&script))
}

/// `rehydrate man [--dir DIR]`: the man page in roff.
pub fn man(args: ManArgs) -> ExitCode {
    let command = super::Cli::command();
    let written = match &args.dir {
        Some(dir) => clap_mangen::generate_to(command, dir),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page).and_then(|()| print(&page))
        }
    };
    finish(written)
}

fn print(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush())
}

fn finish(written: std::io::Result<()>) -> ExitCode {
    match written {
        Ok(()) => ExitCode::Success,
        // `rehydrate man | head`: the reader had enough.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::Success,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::IoFailure
        }
    }
}
