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
        Cmd::Serve(a) => cli::serve::run(a),
        Cmd::Download(a) => {
            for line in capsnet::data::download(&a.data, &capsnet::data::mirrors())? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// `capsnet eval | head` closes stdout early (`train 2>&1 | head`, stderr): println! then panics on
/// the broken pipe. End quietly instead, with the status a shell gives a command killed by SIGPIPE
/// (128 + 13), as Unix tools do. A training run's checkpoints on disk are whole (written atomically).
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // stdout (`capsnet eval | head`) or stderr (`capsnet train 2>&1 | head`): what was saved stays
        if (msg.contains("failed printing to stdout") || msg.contains("failed printing to stderr"))
            && msg.contains("Broken pipe")
        {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// A message without Rust's "(os error N)" after each I/O error: the words say it.
fn without_os_error_numbers(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(" (os error ") {
        let tail = &rest[i + " (os error ".len()..];
        let digits = tail.chars().take_while(char::is_ascii_digit).count();
        out.push_str(&rest[..i]);
        if digits > 0 && tail[digits..].starts_with(')') {
            rest = &tail[digits + 1..];
        } else {
            out.push_str(" (os error ");
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

fn main() -> ExitCode {
    quiet_broken_pipe();
    // an empty variable is no setting, as shells treat empty variables
    for var in ["CAPSNET_DATA", "CAPSNET_THREADS", "CAPSNET_CPU_GEMM"] {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            // SAFETY: the only thread there is yet
            unsafe { std::env::remove_var(var) };
        }
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::FAILURE;
        }
        capsnet::par::set_threads(n);
        // matrixmultiply sizes its pool from this at its first GEMM
        // SAFETY: the only thread there is yet
        unsafe { std::env::set_var("MATMUL_NUM_THREADS", n.to_string()) };
    }
    if let Some(cli::args::CpuGemmChoice(Some(g))) = cli.cpu_gemm {
        // before the first GEMM: nothing has multiplied yet
        capsnet::backend::set_cpu_gemm(g);
    }
    match run(cli, &matches) {
        // an interrupted training run saved its state and said how to continue
        Ok(()) if train::interrupted() => ExitCode::from(130),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", without_os_error_numbers(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
