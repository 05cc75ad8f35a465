//! `meshctl`: the command-line client of the control plane (see `control_plane::cli`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = control_plane::cli::Args::parse();
    control_plane::cli::init_tracing(&args.log);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
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
