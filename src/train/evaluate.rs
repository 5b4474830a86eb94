//! Evaluation: a model's losses, accuracy and confusion matrix over examples of a data set, with the
//! decoder masked by the prediction as at test time; the validation pass of every epoch and `eval`.

use std::path::Path;
use std::rc::Rc;

use super::progress::{Progress, Running, mean};
use super::resident::Resident;
use super::step::summarize;
use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, Dataset};
use crate::data::{self, Split, Which};
use crate::dataset::Source;
use crate::float::Float;
use crate::model::CapsNet;
use crate::multimnist;
use crate::runtime::StepRuntime;
use crate::tape::Tape;
use crate::{Error, Result};

#[derive(Clone, Debug, Default)]
pub struct EvalReport {
    pub loss: f64,
    pub margin: f64,
    pub recon: f64,
    /// Images whose predicted digits are exactly their labels (MultiMNIST: the two longest capsules
    /// are the two labels).
    pub accuracy: f64,
    /// Labels found among their image's predicted digits (MNIST: the accuracy again).
    pub digit_accuracy: f64,
    pub images: usize,
    /// Digits per image.
    pub per: usize,
    /// confusion[true][predicted] (one digit per image only; empty otherwise).
    pub confusion: Vec<Vec<usize>>,
    /// The predicted digits of every image ([images, per], longest capsule first), in order.
    pub predictions: Vec<u32>,
    /// The labels, likewise.
    pub labels: Vec<u32>,
}

/// Evaluates `examples` of `src`: on MNIST with the decoder masked by the predicted class (as at test
/// time); on MultiMNIST with each pass masked by its label (the loss is then the training objective
/// on held-out pairs) and the two longest capsules as the prediction. On a backend that keeps data
/// resident, MNIST's examples are uploaded once and gathered there in batches of 4 × `batch_size`.
pub fn evaluate<B: StepRuntime>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    src: &Source,
    examples: &[usize],
    batch_size: usize,
    label: &str,
) -> Result<EvalReport> {
    let mut resident = Resident::new(tape.backend(), src, 0)?;
    evaluate_on(tape, model, src, examples, batch_size, label, resident.as_mut())
}

/// [`evaluate`] with `src` already resident on the backend where it keeps data resident (validation
/// keeps its images there from one epoch to the next).
pub(crate) fn evaluate_on<B: StepRuntime>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    src: &Source,
    examples: &[usize],
    batch_size: usize,
    label: &str,
    mut resident: Option<&mut Resident<B>>,
) -> Result<EvalReport> {
    let classes = model.cfg.classes;
    let per = src.dataset().per_image();
    let mut confusion = if per == 1 {
        vec![vec![0usize; classes]; classes]
    } else {
        vec![]
    };
    let mut r = Running::default();
    let mut digits_found = 0;
    let (mut predictions, mut labels) = (vec![], vec![]);
    let mut bar = Progress::new(label.to_string(), examples.len(), 0);
    // on a device that keeps data resident, MNIST's examples are gathered there, each batch four
    // training batches large; the order is written anew (the examples may differ from the last call's)
    if let Some(res) = resident.as_deref_mut() {
        res.order = None;
        res.set_order(tape.backend(), usize::MAX, examples)?;
    }
    let batch_size = match resident {
        Some(_) => (4 * batch_size).min(Config::MAX_BATCH),
        None => batch_size,
    };
    crate::infer::untaped(tape, |tape| {
        for (k, chunk) in examples.chunks(batch_size.max(1)).enumerate() {
            tape.reset();
            let (f, batch_labels) = match &resident {
                Some(res) => {
                    let be = tape.backend();
                    let (mut x, mut y) = (be.alloc_out(chunk.len() * res.pixels)?, be.alloc_idx(chunk.len())?);
                    res.gather(be, k * batch_size, chunk.len(), &mut x, &mut y)?;
                    let labels = Rc::new(y);
                    let f = model.forward_on_backend(tape, x, labels, false)?;
                    (f, src.batch_labels(chunk))
                }
                None => {
                    let b = src.batch::<B::E>(chunk);
                    (model.forward_batch(tape, &b, false)?, b.labels)
                }
            };
            // the three losses in one read
            let summary = summarize(tape, &f, chunk.len(), classes, per)?;
            let report: Vec<f64> = tape.backend().download(&summary)?.iter().map(|x| x.to_f64()).collect();
            let n = chunk.len() as f64;
            r.loss += n * report[0];
            r.margin += n * report[1];
            r.recon += n * report[2];
            let pred = predicted(tape, &f, classes, per)?;
            let (exact, found) = crate::runtime::count_correct(&pred, &batch_labels, per);
            r.correct += exact;
            digits_found += found;
            if per == 1 {
                for (&t, &p) in batch_labels.iter().zip(&pred) {
                    confusion[t as usize][p as usize] += 1;
                }
            }
            predictions.extend(pred);
            labels.extend(batch_labels);
            r.images += chunk.len();
            bar.update(r.images, &r);
        }
        Ok(())
    })?;
    Ok(EvalReport {
        loss: mean(&r, r.loss),
        margin: mean(&r, r.margin),
        recon: mean(&r, r.recon),
        accuracy: mean(&r, r.correct as f64),
        digit_accuracy: digits_found as f64 / (r.images * per).max(1) as f64,
        images: r.images,
        per,
        confusion,
        predictions,
        labels,
    })
}

/// The predicted digits of a forward pass, [B, per]: the argmax for one digit per image, else the
/// `per` longest capsules.
fn predicted<B: StepRuntime>(
    tape: &Tape<B>,
    f: &crate::model::Forward<B::Idx>,
    classes: usize,
    per: usize,
) -> Result<Vec<u32>> {
    if per == 1 {
        return tape.backend().download_idx(&f.pred);
    }
    let lengths: Vec<f32> = tape
        .backend()
        .download(&tape.value(f.lengths).buf)?
        .iter()
        .map(|x| x.to_f64() as f32)
        .collect();
    Ok(crate::runtime::top_classes(&lengths, classes, per))
}

/// A model runs only on images of its own side.
pub fn check_side(cfg: &Config, dataset: Dataset, source: &Path) -> Result<()> {
    if cfg.image_side != dataset.side() {
        return Err(Error::file(
            source,
            format!(
                "the model takes {0}x{0} images, {1}'s are {2}x{2}",
                cfg.image_side,
                dataset.name(),
                dataset.side()
            ),
        ));
    }
    Ok(())
}

/// What `eval` and `figures` evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// The first this-many test digits only.
    pub limit: Option<usize>,
    pub batch_size: usize,
    /// The dataset (None: the one the checkpoint was trained on).
    pub dataset: Option<Dataset>,
    /// MultiMNIST: examples per test digit (the paper's 1,000 make 10M).
    pub pairs: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            limit: None,
            batch_size: 100,
            dataset: None,
            pairs: 1,
        }
    }
}

/// A checkpoint and the test set it is evaluated on, loaded and checked against each other.
pub struct TestSet {
    pub checkpoint: Checkpoint,
    pub dataset: Dataset,
    /// The test digits (the first `--limit` of them).
    pub split: Split,
    pairs: usize,
    batch_size: usize,
}

impl TestSet {
    pub fn load(ckpt: &Path, data_dir: &Path, opts: &EvalOptions) -> Result<TestSet> {
        if opts.batch_size == 0 || opts.batch_size > crate::config::Config::MAX_BATCH {
            return Err(Error::msg(format!(
                "--batch-size must be between 1 and {}, got {}",
                crate::config::Config::MAX_BATCH,
                opts.batch_size
            )));
        }
        if opts.limit == Some(0) {
            return Err(Error::msg("--limit must be at least 1 (or left out: every test image)"));
        }
        if !(1..=multimnist::PAIRS_PER_DIGIT).contains(&opts.pairs) {
            return Err(Error::msg(format!(
                "--pairs-per-digit must be between 1 and {}, got {}",
                multimnist::PAIRS_PER_DIGIT,
                opts.pairs
            )));
        }
        let checkpoint = checkpoint::load(ckpt)?;
        let dataset = opts.dataset.unwrap_or(checkpoint.state.run.dataset);
        check_side(&checkpoint.config, dataset, ckpt)?;
        let mut split = data::load(data_dir, Which::Test)?;
        if let Some(n) = opts.limit {
            if n > split.len() {
                return Err(Error::msg(format!(
                    "--limit {n} exceeds the {} test images",
                    split.len()
                )));
            }
            split = split.slice(0..n);
        }
        Ok(TestSet {
            checkpoint,
            dataset,
            split,
            pairs: opts.pairs,
            batch_size: opts.batch_size,
        })
    }

    /// The checkpoint's model evaluated on the test set on `backend`; `then` gets the tape, the model,
    /// the examples (and their source) and the report, for what is drawn from them.
    pub fn evaluate<B: StepRuntime, T>(
        &self,
        backend: B,
        then: impl FnOnce(&mut Tape<B>, &CapsNet, &Source, &[usize], &EvalReport) -> Result<T>,
    ) -> Result<(EvalReport, T)> {
        let src = Source::new(self.dataset, &self.split, multimnist::TEST_SEED)?;
        let examples = src.eval_examples(self.pairs);
        let mut tape = Tape::new(backend);
        let model = CapsNet::from_checkpoint(&mut tape, &self.checkpoint)?;
        let report = evaluate(&mut tape, &model, &src, &examples, self.batch_size, "test")?;
        let then = then(&mut tape, &model, &src, &examples, &report)?;
        Ok((report, then))
    }
}

/// Test-set evaluation of a checkpoint.
pub fn eval_checkpoint<B: StepRuntime>(
    backend: B,
    ckpt: &Path,
    data_dir: &Path,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    Ok(TestSet::load(ckpt, data_dir, opts)?
        .evaluate(backend, |_, _, _, _, _| Ok(()))?
        .0)
}
