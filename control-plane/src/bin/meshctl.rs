//! `meshctl`: the command-line client of the control plane (see `control_plane::cli`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = control_plane::cli::Args::parse();
    let log = args.log.clone();
    mesh_runtime::main(&log, None, control_plane::cli::run(args))
}
