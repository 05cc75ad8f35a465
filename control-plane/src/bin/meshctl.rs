//! `meshctl`: the command-line client of the control plane (see `control_plane::cli`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = control_plane::cli::Args::parse();
    mesh_runtime::init_tracing(&args.log);
    let rt = match mesh_runtime::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(control_plane::cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
