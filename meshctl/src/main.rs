//! `meshctl`: the command-line client of the control plane, and `meshctl up`, the one-command
//! local mesh.
//!
//! Output is a table by default or JSON with `-o json`. Every failure is one line naming what
//! failed — the unreachable address or the refused field — and a non-zero exit.
//!
//! - [`args`]: the command line; [`commands`]: one file per command group; [`up`]: the local
//!   mesh under supervision; [`connect`]: reaching the control plane; [`output`]: tables and
//!   JSON; [`error`]: failures and exit codes.

#[macro_use]
mod output;
mod args;
mod commands;
mod connect;
mod error;
mod issuer;
mod up;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    let log = args.log.clone();
    mesh_runtime::main(&log, args.log_format, None, commands::run(args))
}
