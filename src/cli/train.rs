//! `capsnet train`: the options from the flags and a preset, MNIST fetched if asked, Ctrl-C handled.

use capsnet::config::RunSettings;
use capsnet::train::{self, GivenFlag, TrainOptions};
use capsnet::{Error, Result, data};

use super::args::*;
use super::device::{Selected, select};

/// The flags given on the command line (or by their environment variable), and those a given
/// `--preset` sets, named by the preset.
pub fn given_flags(m: Option<&clap::ArgMatches>) -> Vec<GivenFlag> {
    use clap::parser::ValueSource;
    let Some(m) = m else { return vec![] };
    let mut given: Vec<GivenFlag> = m
        .ids()
        .filter(|id| {
            matches!(
                m.value_source(id.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|id| GivenFlag {
            flag: format!("--{}", id.as_str().replace('_', "-")),
            via: None,
        })
        .collect();
    if given.iter().any(|g| g.flag == "--preset") {
        let name = m.get_one::<PresetArg>("preset").copied().unwrap_or(PresetArg::Notebook);
        let via = format!(
            "--preset {}",
            if name == PresetArg::Paper { "paper" } else { "notebook" }
        );
        for flag in ["--routing", "--batch-size", "--shift", "--lr-decay", "--lr-decay-steps"] {
            if !given.iter().any(|g| g.flag == flag) {
                given.push(GivenFlag {
                    flag: flag.into(),
                    via: Some(via.clone()),
                });
            }
        }
    }
    given
}

/// `capsnet train`; `given`: the flags given ([`given_flags`]).
pub fn run(a: TrainArgs, given: Vec<GivenFlag>) -> Result<()> {
    let sel = select(a.device, &a.kernels)?;
    if a.eager && !matches!(sel, Selected::Cuda(_)) {
        return Err(Error::msg(
            "--eager: only the CUDA backend replays steps as graphs; on the CPU every op is launched one by one already",
        ));
    }
    // only what is missing: train() reads and checks every file anyway
    if a.download
        && data::FILES
            .iter()
            .any(|(name, _)| data::find(&a.data.data, name).is_none())
    {
        for line in data::download(&a.data.data, &data::mirrors())? {
            eprintln!("{line}");
        }
    }
    let preset = a.preset.values();
    let opts = TrainOptions {
        data_dir: a.data.data,
        run_dir: a.checkpoint_dir,
        config: a.model.config_with(preset.routing, a.dataset.dataset().side()),
        run: RunSettings {
            dataset: a.dataset.dataset(),
            batch_size: a.batch_size.unwrap_or(preset.batch_size),
            // MultiMNIST examples are shifted already: a preset's shift is for MNIST only
            shift: a.shift.unwrap_or(match a.dataset {
                DatasetArg::Mnist => preset.shift,
                DatasetArg::Multimnist => 0,
            }),
            lr_decay: a.lr_decay.unwrap_or(preset.lr_decay),
            lr_decay_steps: a.lr_decay_steps.unwrap_or(preset.lr_decay_steps),
            lr: a.lr,
            seed: a.seed,
            patience: a.patience,
            limit: a.limit,
            val_limit: a.val_limit,
        },
        epochs: a.epochs,
        eager: a.eager,
        given: Some(given),
        resume: a.resume,
        checkpoint_every: match a.checkpoint_minutes {
            m if !(m.is_finite() && m >= 0.0) => {
                return Err(Error::msg(format!(
                    "--checkpoint-minutes must be a number ≥ 0, got {m}"
                )));
            }
            0.0 => None,
            m => Some(std::time::Duration::from_secs_f64(m * 60.0)),
        },
        checkpoint_steps: match a.checkpoint_steps {
            Some(0) => return Err(Error::msg("--checkpoint-steps must be at least 1")),
            n => n,
        },
    };
    // Ctrl-C or SIGTERM: save the last completed step and stop; a second one exits at once
    let _ = ctrlc::set_handler(|| {
        if train::INTERRUPT.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving the last completed step (interrupt again to exit at once)");
    });
    with_backend!(sel, |be| train::train(be, &opts))?;
    // the one line on stdout: where the model to use is, and how it did
    let best = opts.run_dir.join(capsnet::checkpoint::BEST);
    if !train::interrupted()
        && let Ok(ck) = capsnet::checkpoint::load(&best)
    {
        {
            let val = ck
                .history
                .iter()
                .rev()
                .find(|m| m.get("epoch").and_then(|e| e.as_u64()) == Some(ck.state.epoch as u64))
                .and_then(|m| Some((m.get("val_acc")?.as_f64()?, m.get("val_loss")?.as_f64()?)));
            match val {
                Some((acc, loss)) => println!(
                    "best checkpoint: {} (epoch {}, validation accuracy {:.2}%, loss {loss:.5})",
                    best.display(),
                    ck.state.epoch,
                    100.0 * acc
                ),
                None => println!("best checkpoint: {} (epoch {})", best.display(), ck.state.epoch),
            }
        }
    }
    Ok(())
}
