//! `symbiont`: the runtime's daemon and command-line interface.
//!
//! This file only parses the command line and maps outcomes to exit codes: 0 success,
//! 1 a check failed or the daemon refused the request (its error code is printed), 2 the
//! command could not run (bad usage, daemon unreachable, I/O error).

use std::process::ExitCode;

use clap::Parser;
use symbiont::client::ClientError;
use symbiont::commands::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = commands::run(cli);
    match outcome {
        Ok(code) => code,
        Err(e) => {
            if let Some(ClientError::Api(detail)) = e.downcast_ref::<ClientError>() {
                eprintln!(
                    "error[{}] (HTTP {}): {}",
                    detail.code, detail.status, detail.message
                );
                return ExitCode::from(1);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
