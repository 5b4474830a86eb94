//! The `capsnet` binary: parses the command line and dispatches to the command's module in cli/.

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use capsnet::train;
use cli::args::{Cli, Cmd};

fn run(cli: Cli, matches: &clap::ArgMatches) -> capsnet::Result<()> {
    match cli.cmd {
        Cmd::Train(a) => cli::train::run(a, cli::train::given_flags(matches.subcommand_matches("train"))),
        Cmd::Eval(a) => cli::eval::eval(a),
        Cmd::Figures(a) => cli::eval::figures(a),
        Cmd::Bench(a) => cli::bench::run(a),
        Cmd::Predict(a) => cli::predict::run(a),
        Cmd::Export(a) => cli::export::run(a),
        Cmd::Multimnist(a) => cli::multimnist::run(a),
        Cmd::Info(a) => cli::info::run(a),
        Cmd::Download(a) => {
            for line in capsnet::data::download(&a.data, &capsnet::data::mirrors())? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// `capsnet eval | head` closes stdout early: println! then panics on the broken pipe. End quietly
/// instead, with the status a shell gives a command killed by SIGPIPE (128 + 13), as Unix tools do.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_broken_pipe();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli, &matches) {
        // an interrupted training run saved its state and said how to continue
        Ok(()) if train::interrupted() => ExitCode::from(130),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
