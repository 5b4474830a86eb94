//! `capsnet eval` and `capsnet figures`: a checkpoint on the test set, its report and pictures.

use std::path::PathBuf;

use capsnet::Result;
use capsnet::train;

use super::args::*;
use super::device::{Selected, select};

impl TestSetArgs {
    /// Evaluates, and writes the figures into `out` when given.
    fn run(&self, out: Option<&std::path::Path>, figure: &FigureArgs) -> Result<(train::EvalReport, Vec<PathBuf>)> {
        let sel = select(self.device, &self.kernels)?;
        let fig = figure.options();
        let opts = train::EvalOptions {
            limit: self.limit,
            batch_size: self.batch_size,
            dataset: self.dataset.map(DatasetArg::dataset),
            pairs: self.pairs_per_digit,
        };
        with_backend!(sel, |be| capsnet::figures::eval_with_figures(
            be,
            &self.checkpoint,
            &self.data.data,
            &opts,
            out.map(|d| (d, &fig))
        ))
    }
}

fn print_eval(r: &train::EvalReport) {
    println!("test images: {}", r.images);
    if r.per > 1 {
        println!(
            "test accuracy: {:.4}% (the {} longest capsules are exactly the labels), error rate {:.4}%",
            100.0 * r.accuracy,
            r.per,
            100.0 * (1.0 - r.accuracy)
        );
        println!(
            "per-digit accuracy: {:.4}% (labels among the longest capsules)",
            100.0 * r.digit_accuracy
        );
        println!(
            "test loss: {:.6} (margin {:.6}, reconstruction {:.6}; each decoder pass masked by its label)",
            r.loss, r.margin, r.recon
        );
        return;
    }
    println!("test accuracy: {:.4}%", 100.0 * r.accuracy);
    println!(
        "test loss: {:.6} (margin {:.6}, reconstruction {:.6})",
        r.loss, r.margin, r.recon
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    print!("     ");
    (0..r.confusion.len()).for_each(|c| print!("{c:>6}"));
    println!();
    for (t, row) in r.confusion.iter().enumerate() {
        print!("{t:>4} ");
        row.iter().for_each(|n| print!("{n:>6}"));
        println!();
    }
}

/// `capsnet eval`.
pub fn eval(a: EvalArgs) -> Result<()> {
    if let (None, Some(flag)) = (&a.figures, a.figure.given().first()) {
        return Err(capsnet::Error::msg(format!(
            "{flag} is a figure's setting: add --figures DIR to draw them"
        )));
    }
    let (r, written) = a.test.run(a.figures.as_deref(), &a.figure)?;
    if a.json {
        let mut o = serde_json::json!({
            "checkpoint": a.test.checkpoint.display().to_string(),
            "images": r.images,
            "digits_per_image": r.per,
            "accuracy": r.accuracy,
            "loss": r.loss,
            "margin": r.margin,
            "reconstruction": r.recon,
            "wrote": written.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        });
        if r.per > 1 {
            o["digit_accuracy"] = serde_json::json!(r.digit_accuracy);
        } else {
            o["confusion"] = serde_json::json!(r.confusion);
        }
        println!("{o}");
        return Ok(());
    }
    print_eval(&r);
    written.iter().for_each(|f| println!("wrote {}", f.display()));
    Ok(())
}

/// `capsnet figures`.
pub fn figures(a: FiguresArgs) -> Result<()> {
    let (r, written) = a.test.run(Some(&a.out), &a.figure)?;
    println!("test images: {}, accuracy {:.4}%", r.images, 100.0 * r.accuracy);
    written.iter().for_each(|f| println!("wrote {}", f.display()));
    Ok(())
}
