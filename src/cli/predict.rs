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
    let images = expand_dirs(&a.images)?;
    let ck = capsnet::checkpoint::load(&a.checkpoint)?;
    if let Some(dir) = &a.save_input {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("--save-input: cannot create the directory: {e}")))?;
    }
    let sel = select(a.device, &a.kernels)?;
    let how = if a.raw {
        predict::Preparation::Raw
    } else {
        predict::Preparation::Full
    };
    let results = with_backend!(sel, |be| {
        let mut tape = capsnet::tape::Tape::new(be);
        let model = capsnet::model::CapsNet::from_checkpoint(&mut tape, &ck)?;
        predict::predict_files(&mut tape, &model, &images, a.threshold, a.batch_size, how)
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
        let confident = p.confident;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "file": file.display().to_string(),
                    "digit": p.digit,
                    "confident": confident,
                    "present": p.present,
                    "lengths": p.lengths,
                    "inverted": p.prepared.inverted,
                    "resized": !p.prepared.as_is,
                    "separation": p.prepared.separation,
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
            let doubt = if confident {
                String::new()
            } else {
                let why = if p.lengths[p.digit] <= a.threshold {
                    format!("no capsule is longer than --threshold {}", a.threshold)
                } else {
                    format!("the ink hardly stands out (separation {:.2})", p.prepared.separation)
                };
                format!(" - not confident: {why}; this may not be a digit")
            };
            println!(
                "{}: {} ({:.3}){also}{doubt}",
                file.display(),
                p.digit,
                p.lengths[p.digit]
            );
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
            "{failed} of {} image{} could not be predicted (each is named above)",
            results.len(),
            if results.len() == 1 { "" } else { "s" }
        )));
    }
    Ok(())
}

/// The image files named, with each directory replaced by its image files (by extension, sorted).
fn expand_dirs(paths: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>> {
    const EXTENSIONS: [&str; 10] = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "pnm", "pgm", "ppm", "pbm"];
    let mut out = vec![];
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let entries = std::fs::read_dir(p).map_err(|e| {
            Error::file(
                p,
                format!("cannot list the directory: {}", capsnet::error::io_words(&e)),
            )
        })?;
        let mut found: Vec<std::path::PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|f| {
                f.is_file()
                    && f.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            })
            .collect();
        if found.is_empty() {
            return Err(Error::file(
                p,
                "a directory without image files (PNG, JPEG, GIF, BMP, WebP or PNM by their extension)",
            ));
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}
