//! A one-line progress bar on stderr, drawn only when stderr is a terminal (logs and metrics
//! carry the same facts everywhere else). Redrawn at most ten times a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const WIDTH: usize = 24;
const REDRAW: Duration = Duration::from_millis(100);

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    /// Where this invocation started (the rate counts only what it did).
    start_done: u64,
    started: Instant,
    drawn: Option<Instant>,
    enabled: bool,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Progress {
        Progress::starting_at(label, 0, total)
    }

    /// A bar that starts at `done` (a resumed stage).
    pub fn starting_at(label: &str, done: u64, total: u64) -> Progress {
        Progress {
            label: label.to_string(),
            total,
            done: done.min(total),
            start_done: done.min(total),
            started: Instant::now(),
            drawn: None,
            enabled: std::io::stderr().is_terminal() && total > 0,
        }
    }

    /// `n` more done; `extra` is shown after the counts (e.g. the loss).
    pub fn inc(&mut self, n: u64, extra: &str) {
        self.done = (self.done + n).min(self.total);
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self.done < self.total && self.drawn.is_some_and(|t| now - t < REDRAW) {
            return;
        }
        self.drawn = Some(now);
        let filled = (self.done as usize * WIDTH) / self.total.max(1) as usize;
        let bar: String = (0..WIDTH)
            .map(|i| if i < filled { '#' } else { '-' })
            .collect();
        let elapsed = self.started.elapsed().as_secs_f64();
        let here = self.done - self.start_done;
        let eta = if here > 0 {
            let per = elapsed / here as f64;
            format!("{:.0}s", per * (self.total - self.done) as f64)
        } else {
            "?".into()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{} [{bar}] {}/{} {extra} eta {eta}",
            self.label, self.done, self.total
        );
        let _ = err.flush();
    }

    /// Ends the line (the next log line starts on its own).
    pub fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            let _ = writeln!(std::io::stderr());
        }
        self.enabled = false;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
