//! The CLI's progress bar: phase, bytes settled, rate, ETA and the stalled
//! flag, drawn on stderr from the shared [`Progress`] (hidden when stderr is
//! not a terminal).

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use crate::restore::progress::Progress;

/// A running progress bar.
pub struct Bar {
    bar: ProgressBar,
    task: JoinHandle<()>,
}

/// Draw the bar until [`Bar::finish`].
pub fn spawn(progress: Arc<Progress>) -> Bar {
    let bar = ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr_with_hz(5));
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    let task = tokio::spawn({
        let bar = bar.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut told_resume = false;
            loop {
                tick.tick().await;
                let s = progress.snapshot();
                let resumed = progress.blocks_resumed.load(std::sync::atomic::Ordering::Relaxed);
                if resumed > 0 && !told_resume {
                    told_resume = true;
                    bar.suspend(|| {
                        eprintln!(
                            "resuming from checkpoint: {resumed} of {} blocks already settled ({:.1} %), skipped",
                            s.blocks_total,
                            100.0 * resumed as f64 / s.blocks_total.max(1) as f64
                        )
                    });
                }

                bar.set_prefix(s.phase.name());
                bar.set_length(s.bytes_total);
                bar.set_position(s.bytes_settled);
                let mut msg = String::new();
                if s.blocks_failed > 0 {
                    msg.push_str(&format!("{} failed ", s.blocks_failed));
                }
                if let Some(reason) = s.stalled {
                    msg.push_str(&format!("STALLED: {reason}"));
                }
                bar.set_message(msg);
            }
        }
    });
    Bar { bar, task }
}

impl Bar {
    pub async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        self.bar.finish_and_clear();
    }
}
