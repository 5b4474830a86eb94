//! What a run trains and evaluates on: MNIST digits, or MultiMNIST pairs generated from them.

use crate::backend::Backend;
use crate::data::{MNIST_SIDE, Split};
use crate::float::Float;
use crate::model::{CapsNet, Forward};
use crate::multimnist::{self, MultiMnist};
use crate::tape::Tape;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    /// 28x28 digits, one label each.
    Mnist,
    /// 36x36 overlays of two digits of different classes, two labels each.
    MultiMnist,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Mnist => "mnist",
            Dataset::MultiMnist => "multimnist",
        }
    }

    pub fn from_name(s: &str) -> Result<Dataset> {
        match s {
            "mnist" => Ok(Dataset::Mnist),
            "multimnist" => Ok(Dataset::MultiMnist),
            _ => Err(Error::msg(format!("unknown dataset '{s}' (mnist or multimnist)"))),
        }
    }

    /// The images' side.
    pub fn side(self) -> usize {
        match self {
            Dataset::Mnist => MNIST_SIDE,
            Dataset::MultiMnist => multimnist::SIDE,
        }
    }

    /// Labels (digits) per image.
    pub fn per_image(self) -> usize {
        match self {
            Dataset::Mnist => 1,
            Dataset::MultiMnist => 2,
        }
    }
}

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

    /// The model's training forward on this batch: the decoder masked by the labels. With one label
    /// per image `mask_with_labels` false masks it by the prediction (MNIST's evaluation); with two,
    /// each pass is always masked by its label, since each has its own target.
    pub fn forward<B: Backend<E = E>>(
        &self,
        model: &CapsNet,
        t: &mut Tape<B>,
        mask_with_labels: bool,
    ) -> Result<Forward<B::Idx>> {
        match &self.targets {
            None => model.forward(t, &self.images, &self.labels, mask_with_labels),
            Some(targets) => model.forward_multi(t, &self.images, &self.labels, self.per, targets),
        }
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

/// The `per` longest capsules of each image, longest first (ties: the lower class).
pub fn top_classes(lengths: &[f32], classes: usize, per: usize) -> Vec<u32> {
    lengths
        .chunks(classes)
        .flat_map(|l| {
            let mut k: Vec<u32> = (0..classes as u32).collect();
            k.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            k.truncate(per);
            k
        })
        .collect()
}

/// (images whose `per` longest capsules are exactly their labels, labels found among them).
pub fn count_correct(top: &[u32], labels: &[u32], per: usize) -> (usize, usize) {
    let (mut exact, mut digits) = (0, 0);
    for (t, y) in top.chunks(per).zip(labels.chunks(per)) {
        let found = y.iter().filter(|l| t.contains(l)).count();
        digits += found;
        exact += (found == per) as usize;
    }
    (exact, digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_longest_capsules_must_be_exactly_the_two_labels() {
        let l = [
            0.1, 0.9, 0.2, 0.8, /* */ 0.7, 0.1, 0.1, 0.6, /* */ 0.5, 0.5, 0.9, 0.1,
        ];
        let top = top_classes(&l, 4, 2);
        assert_eq!(top, vec![1, 3, 0, 3, 2, 0]);
        // labels {3, 1} (any order): exact; {0, 2}: one found; {2, 1}: one found
        assert_eq!(count_correct(&top, &[3, 1, 0, 2, 2, 1], 2), (1, 4));
        assert_eq!(count_correct(&top_classes(&l, 4, 1), &[1, 0, 2], 1), (3, 3));
    }
}
