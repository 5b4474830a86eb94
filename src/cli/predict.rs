//! `capsnet predict`: the model on image files.

use capsnet::config::Config;
use capsnet::{Error, Result, predict};

use super::args::*;
use super::device::{Selected, select};

pub fn run(a: PredictArgs) -> Result<()> {
    if !(a.threshold.is_finite() && (0.0..=1.0).contains(&a.threshold)) {
        return Err(Error::msg(format!(
            "--threshold must be between 0 and 1 (a capsule length), got {}",
            a.threshold
        )));
    }
    if a.batch_size == 0 || a.batch_size > Config::MAX_BATCH {
        return Err(Error::msg(format!(
            "--batch-size must be between 1 and {}, got {}",
            Config::MAX_BATCH,
            a.batch_size
        )));
    }
    let ck = capsnet::checkpoint::load(&a.checkpoint)?;
    if let Some(dir) = &a.save_input {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("--save-input: cannot create the directory: {e}")))?;
    }
    let sel = select(a.device, &KernelArgs::default())?;
    let results = with_backend!(sel, |be| {
        let mut tape = capsnet::tape::Tape::new(be);
        let model = capsnet::model::CapsNet::from_checkpoint(&mut tape, &ck)?;
        predict::predict_files(&mut tape, &model, &a.images, a.threshold, a.batch_size)
    })?;
    let side = ck.config.image_side;
    let mut used = std::collections::HashSet::<String>::new();
    let mut failed = 0;
    for (file, r) in &results {
        let p = match r {
            Ok(p) => p,
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({ "file": file.display().to_string(), "error": e.to_string() })
                    );
                }
                continue;
            }
        };
        if let Some(dir) = &a.save_input {
            // NAME.input.png, NAME-2.input.png for a second file of the same name (or the next
            // number no file of this run has taken)
            let stem = file
                .file_stem()
                .map_or("image".into(), |s| s.to_string_lossy().into_owned());
            let mut name = stem.clone();
            let mut n = 1;
            while !used.insert(name.clone()) {
                n += 1;
                name = format!("{stem}-{n}");
            }
            for (what, px) in [("input", &p.prepared.pixels), ("recon", &p.recon)] {
                let path = dir.join(format!("{name}.{what}.png"));
                capsnet::error::write_atomic(&path, &predict::gray_png(px, side)?)?;
            }
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "file": file.display().to_string(),
                    "digit": p.digit,
                    "present": p.present,
                    "lengths": p.lengths,
                    "inverted": p.prepared.inverted,
                    "resized": !p.prepared.as_is,
                })
            );
        } else {
            let also: Vec<String> = p
                .present
                .iter()
                .filter(|&&d| d != p.digit)
                .map(|&d| format!("{d} ({:.3})", p.lengths[d]))
                .collect();
            let also = if also.is_empty() {
                String::new()
            } else {
                format!(", also {}", also.join(", "))
            };
            println!("{}: {} ({:.3}){also}", file.display(), p.digit, p.lengths[p.digit]);
            let lengths: Vec<String> = p
                .lengths
                .iter()
                .enumerate()
                .map(|(k, l)| format!("{k}:{l:.3}"))
                .collect();
            println!("  lengths {}", lengths.join(" "));
        }
    }
    if failed > 0 {
        return Err(Error::msg(format!(
            "{failed} of {} images could not be predicted (each is named above)",
            results.len()
        )));
    }
    Ok(())
}
