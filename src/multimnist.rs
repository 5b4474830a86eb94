//! MultiMNIST (Sabour et al. 2017, section 6): two MNIST digits of different classes from the same
//! split, each shifted by up to 4 pixels in each direction inside a 36x36 canvas, overlaid.
//!
//! - Pixels combine by **clipped sum**: min(a + b, 255), so where strokes cross they stay at full ink.
//! - Example `n` of a split is a function of (seed, n) only, never stored: its first digit is the
//!   split's digit n / 1000, its second a digit of another class drawn by a hash of (seed, n), and
//!   both shifts come from the same hash. A split of D digits has D · 1000 examples, the paper's 1,000
//!   per digit (60M from the training digits, 10M from the test digits).
//! - Training epoch e shows every base digit once, paired as in example digit · 1000 + e mod 1000,
//!   so 1,000 epochs see each of the paper's examples once.
//! - The validation examples pair the 5,000 held-out training digits among themselves.

use crate::data::{MNIST_PIXELS, MNIST_SIDE, Split, mix};
use crate::{Error, Result};

/// The canvas side.
pub const SIDE: usize = 36;
pub const PIXELS: usize = SIDE * SIDE;
/// Each digit moves by up to this many pixels in each direction.
pub const MAX_SHIFT: i32 = 4;
/// Examples per base digit (the paper's 1,000).
pub const PAIRS_PER_DIGIT: usize = 1000;
/// The seed of the test examples, the same for every run so that runs compare.
pub const TEST_SEED: u64 = 2017;

/// One example: the overlay, its two labels (first digit first), and each digit alone on the canvas
/// at its shift (the reconstruction targets).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub image: Vec<u8>,
    pub labels: [u8; 2],
    pub parts: [Vec<u8>; 2],
    /// (dx, dy) of each digit from the canvas centre.
    pub shifts: [(i32, i32); 2],
    /// The digits' indices in the split.
    pub sources: [usize; 2],
}

/// The MultiMNIST examples of one MNIST split.
pub struct MultiMnist<'a> {
    digits: &'a Split,
    seed: u64,
    /// The indices of each class's digits, for drawing a partner of another class.
    by_class: Vec<Vec<usize>>,
}

/// A 28x28 digit placed on the canvas with its top-left corner at (4 + dx, 4 + dy).
fn place(digit: &[u8], (dx, dy): (i32, i32)) -> Vec<u8> {
    let mut out = vec![0u8; PIXELS];
    let (ox, oy) = ((MAX_SHIFT + dx) as usize, (MAX_SHIFT + dy) as usize);
    for y in 0..MNIST_SIDE {
        let dst = (oy + y) * SIDE + ox;
        out[dst..dst + MNIST_SIDE].copy_from_slice(&digit[y * MNIST_SIDE..(y + 1) * MNIST_SIDE]);
    }
    out
}

impl<'a> MultiMnist<'a> {
    /// The examples of `digits` (which must hold at least two classes) under `seed`.
    pub fn new(digits: &'a Split, seed: u64) -> Result<Self> {
        let mut by_class = vec![vec![]; 10];
        for (i, &l) in digits.labels.iter().enumerate() {
            by_class[l as usize].push(i);
        }
        if by_class.iter().filter(|c| !c.is_empty()).count() < 2 {
            return Err(Error::msg(
                "MultiMNIST needs digits of at least two classes to pair (use more images)",
            ));
        }
        Ok(MultiMnist { digits, seed, by_class })
    }

    /// Examples in all: 1,000 per digit.
    pub fn len(&self) -> usize {
        self.digits.len() * PAIRS_PER_DIGIT
    }

    pub fn is_empty(&self) -> bool {
        self.digits.is_empty()
    }

    /// The base digits (one example per digit per epoch).
    pub fn digits(&self) -> usize {
        self.digits.len()
    }

    /// Example `n` (below [`MultiMnist::len`]).
    pub fn example(&self, n: usize) -> Example {
        let first = n / PAIRS_PER_DIGIT;
        let c1 = self.digits.labels[first] as usize;
        let mut h = mix(mix(self.seed) ^ n as u64);
        // a class other than the first digit's, among those present, uniformly
        let others: Vec<usize> = (0..10).filter(|&c| c != c1 && !self.by_class[c].is_empty()).collect();
        let c2 = others[(h % others.len() as u64) as usize];
        h = mix(h);
        let pool = &self.by_class[c2];
        let second = pool[(h % pool.len() as u64) as usize];
        h = mix(h);
        let span = (2 * MAX_SHIFT + 1) as u64;
        let shift = |k: u32| ((h >> (8 * k)) % span) as i32 - MAX_SHIFT;
        let shifts = [(shift(0), shift(1)), (shift(2), shift(3))];
        let px = |i: usize| &self.digits.images[i * MNIST_PIXELS..(i + 1) * MNIST_PIXELS];
        let parts = [place(px(first), shifts[0]), place(px(second), shifts[1])];
        let image = parts[0]
            .iter()
            .zip(&parts[1])
            .map(|(&a, &b)| a.saturating_add(b))
            .collect();
        Example {
            image,
            labels: [c1 as u8, c2 as u8],
            parts,
            shifts,
            sources: [first, second],
        }
    }

    /// The `j`-th example in digit order: every digit's first pairing, then every digit's second, and
    /// so on (the first `digits()` are what training epoch 0 shows).
    pub fn nth(&self, j: usize) -> usize {
        (j % self.digits.len()) * PAIRS_PER_DIGIT + j / self.digits.len()
    }

    /// The example that shows base digit `digit` in epoch `epoch`.
    pub fn epoch_example(digit: usize, epoch: usize) -> usize {
        digit * PAIRS_PER_DIGIT + epoch % PAIRS_PER_DIGIT
    }

    /// Examples `ns` as a batch: pixels in [0, 1] [B, 36²], labels [B, 2], and each digit alone
    /// [2, B, 36²] (the reconstruction targets: all first digits, then all second digits).
    pub fn batch<E: crate::float::Float>(&self, ns: &[usize]) -> (Vec<E>, Vec<u32>, Vec<E>) {
        let scale = |p: &u8| E::from_f64(*p as f64 / 255.0);
        let (mut x, mut y) = (vec![], vec![]);
        let mut parts = [vec![], vec![]];
        for &n in ns {
            let e = self.example(n);
            x.extend(e.image.iter().map(scale));
            y.extend(e.labels.iter().map(|&l| l as u32));
            for (j, p) in e.parts.iter().enumerate() {
                parts[j].extend(p.iter().map(scale));
            }
        }
        let [a, b] = parts;
        (x, y, [a, b].concat())
    }
}

/// The ink's bounding box of a canvas image, (x0, y0, x1, y1) inclusive; None when blank.
pub fn ink_box(img: &[u8], side: usize) -> Option<(usize, usize, usize, usize)> {
    let mut b: Option<(usize, usize, usize, usize)> = None;
    for (i, &p) in img.iter().enumerate() {
        if p > 0 {
            let (x, y) = (i % side, i / side);
            b = Some(match b {
                None => (x, y, x, y),
                Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
            });
        }
    }
    b
}

/// The overlap of two boxes as the paper counts it: the area they share over one box's area, for
/// boxes of `w` x `h` at the two shifts (the paper takes the 20x20 box a digit fills).
pub fn box_overlap(a: (i32, i32), b: (i32, i32), w: i32, h: i32) -> f64 {
    let ox = (w - (a.0 - b.0).abs()).max(0);
    let oy = (h - (a.1 - b.1).abs()).max(0);
    (ox * oy) as f64 / (w * h) as f64
}

/// IDX bytes of `n` images of side x side (magic 0x803).
pub fn idx_images(images: &[u8], n: usize, side: usize) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 3];
    for d in [n, side, side] {
        out.extend((d as u32).to_be_bytes());
    }
    out.extend(images);
    out
}

/// IDX bytes of `n` label pairs (magic 0x802: unsigned bytes, two dimensions [n, 2]).
pub fn idx_label_pairs(labels: &[u8], n: usize) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 2];
    for d in [n, 2] {
        out.extend((d as u32).to_be_bytes());
    }
    out.extend(labels);
    out
}
