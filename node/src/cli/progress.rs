//! Progress for commands that wait (`task submit --wait`, `task watch`, `cluster init`): an
//! indicatif bar or spinner when stdout is a terminal, plain lines when it is not (a pipe, a
//! log, CI), and nothing but the JSON lines with `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a spinner turns.
const TICK: Duration = Duration::from_millis(100);

pub struct Progress {
    /// `None` when stdout is not a terminal or output is JSON: lines are printed instead.
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar (or spinner, until `set_length`) drawn only on a terminal and never with `--json`.
    pub fn new(json: bool) -> Self {
        let bar = (!json && std::io::stdout().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            bar.set_style(spinner_style());
            bar.enable_steady_tick(TICK);
            bar
        });
        Self { bar }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.into());
        }
    }

    /// Turn the spinner into a bar of `length` steps at `position`.
    pub fn set_progress(&self, position: u64, length: u64, unit: &str) {
        if let Some(bar) = &self.bar {
            if bar.length() != Some(length) {
                bar.set_style(bar_style(unit));
                bar.set_length(length);
            }
            bar.set_position(position);
        }
    }

    /// A line above the bar on a terminal; the line itself otherwise.
    pub fn println(&self, line: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(line.as_ref()),
            None => println!("{}", line.as_ref()),
        }
    }

    /// Remove the bar (the lines printed above it stay).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} ({elapsed})").unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style(unit: &str) -> ProgressStyle {
    let template = format!("{{spinner}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ({{elapsed}})");
    ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("#>-")
}
