//! Progress of long cycles (a first cycle with `start = "beginning"` may read
//! millions of rows): on a terminal a live line per entity on stderr (rows
//! read, rate, emitted, elapsed), otherwise a `cycle in progress` log line
//! every so often. Short cycles show nothing.
//!
//! Log lines go through [`log_writer`], which lifts the progress lines out of
//! the way while a line is written, so the two never garble each other.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A cycle shows its progress line on a terminal once it has run this long.
const BAR_AFTER: Duration = Duration::from_secs(1);
/// Without a terminal, a progress log line every so often; overridden by
/// `HIGHWATER_PROGRESS_EVERY` (a duration, e.g. `30s`).
const LINE_EVERY: Duration = Duration::from_secs(10);

/// The progress lines on stderr, when stderr is a terminal.
fn bars() -> Option<&'static MultiProgress> {
    static BARS: OnceLock<Option<MultiProgress>> = OnceLock::new();
    BARS.get_or_init(|| {
        std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)))
    })
    .as_ref()
}

fn line_every() -> Duration {
    static EVERY: OnceLock<Duration> = OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("HIGHWATER_PROGRESS_EVERY")
            .ok()
            .and_then(|text| humantime::parse_duration(&text).ok())
            .unwrap_or(LINE_EVERY)
    })
}

/// The progress of one cycle; dropping it removes its line.
pub struct CycleProgress {
    entity: String,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl CycleProgress {
    pub fn start(entity: &str) -> CycleProgress {
        let now = Instant::now();
        CycleProgress {
            entity: entity.to_owned(),
            started: now,
            last_line: now,
            bar: None,
        }
    }

    /// Called after each chunk with the cycle's totals so far.
    pub fn update(&mut self, rows: u64, emitted: u64) {
        crate::metrics::global().record_progress(&self.entity, rows);
        let elapsed = self.started.elapsed();
        match bars() {
            Some(multi) => {
                if self.bar.is_none() && elapsed >= BAR_AFTER {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix}: {human_pos} rows read, {msg} [{elapsed}]",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(self.entity.clone());
                    self.bar = Some(bar);
                }
                if let Some(bar) = &self.bar {
                    bar.set_position(rows);
                    bar.set_message(format!(
                        "{} rows/s, {} emitted",
                        thousands(rate(rows, elapsed)),
                        thousands(emitted)
                    ));
                    bar.tick();
                }
            }
            None => {
                if self.last_line.elapsed() >= line_every() {
                    self.last_line = Instant::now();
                    tracing::info!(
                        entity = %self.entity,
                        rows,
                        emitted,
                        rows_per_second = rate(rows, elapsed),
                        elapsed_s = (elapsed.as_secs_f64() * 10.0).round() / 10.0,
                        "cycle in progress"
                    );
                }
            }
        }
    }
}

fn rate(rows: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        (rows as f64 / seconds).round() as u64
    } else {
        0
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Drop for CycleProgress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            if let Some(multi) = bars() {
                multi.remove(&bar);
            }
        }
        crate::metrics::global().record_progress(&self.entity, 0);
    }
}

/// Where log lines go: stderr, with the progress lines lifted out of the
/// way while a line is written. Pass to `tracing_subscriber`'s `with_writer`.
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// See [`log_writer`].
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match bars() {
            // tracing writes one whole line per call.
            Some(multi) => multi.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
