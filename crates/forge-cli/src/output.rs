//! Terminal output: colors when on a terminal, plain lines in CI and pipes.

use std::io::{IsTerminal, Write};

/// `println!` that ignores a closed stdout (`forge status | head`) instead of panicking.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*))
    };
}

pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
}

#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// stderr is an interactive terminal (progress bars, colors).
    pub tty: bool,
    pub quiet: bool,
    pub verbose: bool,
}

impl Output {
    pub fn detect(quiet: bool, verbose: bool) -> Output {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
        let tty = std::io::stderr().is_terminal() && !ci && std::env::var_os("NO_COLOR").is_none();
        Output { tty, quiet, verbose }
    }

    /// A right-aligned status verb, cargo style, colored on a terminal.
    pub fn verb(&self, verb: &str, color: Color) -> String {
        let padded = format!("{verb:>8}");
        if self.tty { format!("\x1b[1;{}m{padded}\x1b[0m", color as u8) } else { padded }
    }

    pub fn paint(&self, text: &str, color: Color) -> String {
        if self.tty { format!("\x1b[{}m{text}\x1b[0m", color as u8) } else { text.to_string() }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Color {
    Red = 31,
    Green = 32,
    Yellow = 33,
    Blue = 34,
    Cyan = 36,
    Dim = 2,
}

/// Renders any miette diagnostic (manifest errors) for humans.
pub fn render_diagnostic(diag: &dyn miette::Diagnostic, out: &Output) -> String {
    let theme = if out.tty { miette::GraphicalTheme::unicode() } else { miette::GraphicalTheme::unicode_nocolor() };
    let handler = miette::GraphicalReportHandler::new_themed(theme);
    let mut s = String::new();
    if handler.render_report(&mut s, diag).is_err() {
        s = diag.to_string();
    }
    s
}

/// Renders a diagnostic as JSON (miette's format).
pub fn render_diagnostic_json(diag: &dyn miette::Diagnostic) -> String {
    let mut s = String::new();
    if miette::JSONReportHandler::new().render_report(&mut s, diag).is_err() {
        s = serde_json::json!({ "message": diag.to_string() }).to_string();
    }
    s
}

pub fn seconds(ms: u64) -> String {
    let s = ms as f64 / 1000.0;
    if s < 60.0 { format!("{s:.2}s") } else { format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64) }
}

/// "3 minutes ago" for a unix time in milliseconds.
pub fn ago(unix_ms: u64) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let s = now.saturating_sub(unix_ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
