//! What the CLI prints: restore summaries, job lines, errors.

use crate::error::ExitCode;
use crate::restore::{RestoreError, RestoreReport};
use crate::worker::{JobPage, JobStatus};

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
    let shard = if report.whole_volume { String::new() } else { format!(" blocks {}", report.block_range) };
    println!(
        "{state}{shard}: {} blocks ({} settled, {} resumed, {} failed, {} zero, {} duplicate), {} in {:.2}s, {}/s, writer {}",
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
            "throttled: {:.1}s by the store ({} throttled answers, retried at the adapted rate); last throttled at {}",
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

/// What a `rehydrate job …` command got back.
pub(super) enum JobAnswer {
    One(Box<JobStatus>),
    Page(JobPage),
}

/// The answer as JSON (`--json`), or one line per job and the cursor of the
/// next page on stderr.
pub(super) fn print_job_answer(answer: &JobAnswer, json: bool) {
    if json {
        let text = match answer {
            JobAnswer::One(job) => serde_json::to_string(job),
            JobAnswer::Page(page) => serde_json::to_string(page),
        };
        println!("{}", text.unwrap_or_default());
        return;
    }
    match answer {
        JobAnswer::One(job) => print_job_line(job),
        JobAnswer::Page(page) => {
            page.jobs.iter().for_each(print_job_line);
            if let Some(next) = &page.next {
                eprintln!("more: rehydrate job list --after {next}");
            }
        }
    }
}

fn print_job_line(job: &JobStatus) {
    println!(
        "{} {}{} phase={} blocks {}/{} failed {} target={}{}{}",
        job.id,
        job.state.name(),
        if job.stalled { " STALLED" } else { "" },
        job.phase.map_or("-", |p| p.name()),
        job.blocks.settled,
        job.blocks.total,
        job.blocks.failed,
        job.target,
        job.held_by.as_ref().map(|h| format!(" held: {h}")).unwrap_or_default(),
        job.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default(),
    );
}

pub(super) fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::Usage
}

pub(super) fn fail(message: &str, code: ExitCode) -> ExitCode {
    eprintln!("error: {message}");
    code
}

/// `1.50 GiB`-style sizes for people (indicatif's binary units).
pub fn human_bytes(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}
