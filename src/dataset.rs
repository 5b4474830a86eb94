//! What a run trains and evaluates on: MNIST digits, or MultiMNIST pairs generated from them.

use crate::Result;
pub use crate::config::Dataset;
use crate::data::Split;
use crate::float::Float;
use crate::multimnist::{self, MultiMnist};

/// One batch: pixels in [0, 1] [B, side²], labels [B, per], and for more than one label per image
/// each label's digit alone [per, B, side²] (one label: the image is its own target).
pub struct Batch<E> {
    pub images: Vec<E>,
    pub labels: Vec<u32>,
    pub per: usize,
    pub targets: Option<Vec<E>>,
}

impl<E: Float> Batch<E> {
    pub fn len(&self) -> usize {
        self.labels.len() / self.per
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A split's examples: MNIST's digits, or the MultiMNIST pairs of its digits.
pub enum Source<'a> {
    Mnist(&'a Split),
    Multi(MultiMnist<'a>),
}

impl<'a> Source<'a> {
    pub fn new(dataset: Dataset, split: &'a Split, seed: u64) -> Result<Source<'a>> {
        Ok(match dataset {
            Dataset::Mnist => Source::Mnist(split),
            Dataset::MultiMnist => Source::Multi(MultiMnist::new(split, seed)?),
        })
    }

    pub fn dataset(&self) -> Dataset {
        match self {
            Source::Mnist(_) => Dataset::Mnist,
            Source::Multi(_) => Dataset::MultiMnist,
        }
    }

    /// The base digits: one epoch shows each once.
    pub fn digits(&self) -> usize {
        match self {
            Source::Mnist(s) => s.len(),
            Source::Multi(m) => m.digits(),
        }
    }

    /// The example that shows base digit `digit` in epoch `epoch`.
    pub fn example_of(&self, digit: usize, epoch: usize) -> usize {
        match self {
            Source::Mnist(_) => digit,
            Source::Multi(_) => MultiMnist::epoch_example(digit, epoch),
        }
    }

    /// The evaluation examples: each digit once on MNIST; `pairs` examples per digit on MultiMNIST.
    pub fn eval_examples(&self, pairs: usize) -> Vec<usize> {
        match self {
            Source::Mnist(s) => (0..s.len()).collect(),
            Source::Multi(m) => (0..m.digits())
                .flat_map(|d| (0..pairs).map(move |k| d * multimnist::PAIRS_PER_DIGIT + k))
                .collect(),
        }
    }

    /// The labels of `examples` ([B, per]) without building their images.
    pub fn batch_labels(&self, examples: &[usize]) -> Vec<u32> {
        match self {
            Source::Mnist(s) => examples.iter().map(|&i| s.labels[i] as u32).collect(),
            Source::Multi(_) => self.batch::<f32>(examples).labels,
        }
    }

    pub fn batch<E: Float>(&self, examples: &[usize]) -> Batch<E> {
        match self {
            Source::Mnist(s) => {
                let (images, labels) = s.batch(examples);
                Batch {
                    images,
                    labels,
                    per: 1,
                    targets: None,
                }
            }
            Source::Multi(m) => {
                let (images, labels, targets) = m.batch(examples);
                Batch {
                    images,
                    labels,
                    per: 2,
                    targets: Some(targets),
                }
            }
        }
    }
}
