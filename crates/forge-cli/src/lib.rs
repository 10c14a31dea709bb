//! The `forge` command line. Each subcommand turns its arguments into options and calls the
//! libraries; this crate only parses and renders.

mod args;
mod ci;
mod commands;
mod data;
mod export;
mod generate;
mod inspect;
mod output;
mod proxy;
mod render;
mod serve;
mod site;
mod watch;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::output::Output;

/// How a command failed, and so which exit status it gets (see `forge --help`).
pub enum Failure {
    /// A build, check or verification failed; the details were already printed.
    Failed,
    /// Invalid arguments or manifest, with the message to print.
    Usage(String),
    /// forge could not do its work.
    Internal(String),
    /// Another forge process holds the workspace's lock; trying again later will do.
    Busy(String),
    Interrupted,
}

impl Failure {
    fn code(&self) -> i32 {
        match self {
            Failure::Failed => 1,
            Failure::Usage(_) => 2,
            Failure::Internal(_) => 3,
            Failure::Busy(_) => 75,
            Failure::Interrupted => 130,
        }
    }
}

impl From<forge_cache::CacheError> for Failure {
    fn from(e: forge_cache::CacheError) -> Self {
        Failure::Internal(e.to_string())
    }
}

impl From<forge_plan::SelectError> for Failure {
    fn from(e: forge_plan::SelectError) -> Self {
        Failure::Usage(e.to_string())
    }
}

/// Runs `forge` with the process's arguments; returns the exit status.
pub fn run() -> i32 {
    forge_model::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let out = Output::detect(cli.global.quiet, cli.global.verbose);
    let result = match cli.command {
        Command::Build(a) => commands::build(&cli.global, &out, a),
        Command::Status(a) => commands::status(&cli.global, &out, a),
        Command::Why(a) => commands::why(&cli.global, &out, a),
        Command::Graph(a) => commands::graph(&cli.global, &out, a),
        Command::Check(a) => commands::check(&cli.global, &out, a),
        Command::Clean(a) => commands::clean(&cli.global, &out, a),
        Command::Cache(c) => commands::cache(&cli.global, &out, c),
        Command::Artifact(c) => commands::artifact(&cli.global, &out, c),
        Command::Data(c) => data::data(&cli.global, &out, c),
        Command::Gen(a) => generate::generate(&cli.global, &out, a),
        Command::Serve(a) => serve::serve(&cli.global, &out, a),
        Command::Export(a) => export::export(&cli.global, &out, a),
        Command::Watch(a) => watch::watch(&cli.global, &out, a),
        Command::Proxy(a) => proxy::proxy(&cli.global, &out, a),
        Command::Site(c) => site::site(&cli.global, &out, c),
        Command::Inspect(a) => inspect::inspect(&out, a),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            match &f {
                Failure::Usage(m) | Failure::Internal(m) | Failure::Busy(m) if !m.is_empty() => {
                    eprintln!("{}: {m}", out.paint("error", output::Color::Red))
                }
                _ => {}
            }
            f.code()
        }
    }
}
