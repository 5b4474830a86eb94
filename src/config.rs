//! What a model is and what a run trains on: the CapsNet's sizes ([`Config`], stored in every
//! checkpoint), the data set, and the training presets. The lowest layer that knows the model: it
//! depends on nothing above the op interface's shapes.

use crate::data::MNIST_SIDE;
use crate::multimnist;
use crate::ops::{CapsShape, ConvShape, DenseShape};
use crate::{Error, Result};

/// Both convolutions' kernel side.
pub const KERNEL: usize = 9;
/// The smallest input side: conv1 must leave room for one primary-capsule position.
pub const MIN_IMAGE_SIDE: usize = 2 * KERNEL - 1;
/// The largest input side (36 is MultiMNIST's; beyond this is a mistake, not a dataset).
pub const MAX_IMAGE_SIDE: usize = 256;

/// Upper limits of the configuration (checked by [`Config::validate`]): conv1 channels and primary
/// maps at most this many (the decoder's widths four times as many).
pub const MAX_CHANNELS: usize = 4096;
/// Routing rounds at most this many (the paper uses 3, the notebook 2).
pub const MAX_ROUTING_ROUNDS: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Side of the square one-channel input image (MNIST: 28).
    pub image_side: usize,
    /// conv1 filters (256).
    pub conv1_channels: usize,
    /// Primary capsule types M; the primary conv has M·caps1_dim filters (32 → 256).
    pub primary_maps: usize,
    pub caps1_dim: usize,
    /// Digit capsules = classes (10).
    pub classes: usize,
    pub caps2_dim: usize,
    pub routing_rounds: usize,
    /// Standard deviation of W's normal initialisation.
    pub w_std: f64,
    pub decoder_hidden: [usize; 2],
    pub recon_weight: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            image_side: 28,
            conv1_channels: 256,
            primary_maps: 32,
            caps1_dim: 8,
            classes: 10,
            caps2_dim: 16,
            routing_rounds: 2,
            w_std: 0.01,
            decoder_hidden: [512, 1024],
            recon_weight: 0.0005,
        }
    }
}

impl Config {
    pub fn image_pixels(&self) -> usize {
        self.image_side * self.image_side
    }

    /// conv1's output side (28 → 20).
    pub fn conv1_side(&self) -> usize {
        self.image_side + 1 - KERNEL
    }

    /// The primary capsules' grid side (28 → 6, 36 → 10).
    pub fn primary_side(&self) -> usize {
        (self.conv1_side() - KERNEL) / 2 + 1
    }

    pub fn primary_caps(&self) -> usize {
        self.primary_side() * self.primary_side() * self.primary_maps
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("conv1 channels", self.conv1_channels),
            ("primary maps", self.primary_maps),
            ("primary capsule dimension", self.caps1_dim),
            ("classes", self.classes),
            ("digit capsule dimension", self.caps2_dim),
            ("routing rounds", self.routing_rounds),
            ("decoder width", self.decoder_hidden[0]),
            ("decoder width", self.decoder_hidden[1]),
        ];
        for (what, n) in positive {
            if n == 0 {
                return Err(Error::msg(format!("model config: {what} must be at least 1")));
            }
        }
        if !(MIN_IMAGE_SIDE..=MAX_IMAGE_SIDE).contains(&self.image_side) {
            return Err(Error::msg(format!(
                "model config: image side must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}, got {}",
                self.image_side
            )));
        }
        // sizes beyond these are mistakes, and would ask for more memory than any machine has
        let bounded = [
            ("conv1 channels", self.conv1_channels, MAX_CHANNELS),
            ("primary maps", self.primary_maps, MAX_CHANNELS),
            ("routing rounds", self.routing_rounds, MAX_ROUTING_ROUNDS),
            ("decoder width", self.decoder_hidden[0], MAX_CHANNELS * 4),
            ("decoder width", self.decoder_hidden[1], MAX_CHANNELS * 4),
        ];
        for (what, n, max) in bounded {
            if n > max {
                return Err(Error::msg(format!(
                    "model config: {what} must be between 1 and {max}, got {n}"
                )));
            }
        }
        if !(self.w_std.is_finite() && self.w_std > 0.0) {
            return Err(Error::msg(format!(
                "model config: W init std must be positive, got {}",
                self.w_std
            )));
        }
        if !(self.recon_weight.is_finite() && self.recon_weight >= 0.0) {
            return Err(Error::msg(format!(
                "model config: reconstruction weight must be ≥ 0, got {}",
                self.recon_weight
            )));
        }
        Ok(())
    }

    /// The largest batch `train` and `bench` accept.
    pub const MAX_BATCH: usize = 4096;

    /// `--batch-size` between 1 and [`Config::MAX_BATCH`], checked before anything is allocated.
    pub fn check_batch_size(n: usize) -> Result<()> {
        if n == 0 || n > Self::MAX_BATCH {
            return Err(Error::msg(format!(
                "--batch-size must be between 1 and {}, got {n}",
                Self::MAX_BATCH
            )));
        }
        Ok(())
    }

    /// conv1 at batch `batch`: [B,28,28,1] → [B,20,20,C1].
    pub fn conv1_shape(&self, batch: usize) -> ConvShape {
        let (side, c) = (self.image_side, self.conv1_channels);
        ConvShape {
            batch,
            in_h: side,
            in_w: side,
            in_c: 1,
            out_c: c,
            k: KERNEL,
            stride: 1,
        }
    }

    /// The primary-capsule conv at batch `batch`: [B,20,20,C1] → [B,6,6,M·8].
    pub fn primary_shape(&self, batch: usize) -> ConvShape {
        let (side, c) = (self.conv1_side(), self.conv1_channels);
        ConvShape {
            batch,
            in_h: side,
            in_w: side,
            in_c: c,
            out_c: self.primary_maps * self.caps1_dim,
            k: KERNEL,
            stride: 2,
        }
    }

    /// Prediction vectors and routing at batch `batch`: u [B,I,8] → û [B,I,10,16].
    pub fn caps_shape(&self, batch: usize) -> CapsShape {
        CapsShape {
            batch,
            in_caps: self.primary_caps(),
            in_dim: self.caps1_dim,
            out_caps: self.classes,
            out_dim: self.caps2_dim,
        }
    }

    /// The decoder's three dense layers at batch `batch`: 160 → 512 → 1024 → 784.
    pub fn decoder_shapes(&self, batch: usize) -> [DenseShape; 3] {
        let [h1, h2] = self.decoder_hidden;
        let d = |inp, out| DenseShape { rows: batch, inp, out };
        [
            d(self.classes * self.caps2_dim, h1),
            d(h1, h2),
            d(h2, self.image_pixels()),
        ]
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "image_side": self.image_side,
            "conv1_channels": self.conv1_channels,
            "primary_maps": self.primary_maps,
            "caps1_dim": self.caps1_dim,
            "classes": self.classes,
            "caps2_dim": self.caps2_dim,
            "routing_rounds": self.routing_rounds,
            "w_std": self.w_std,
            "decoder_hidden": self.decoder_hidden,
            "recon_weight": self.recon_weight,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Config> {
        let n = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| Error::msg(format!("model config: missing or non-integer '{k}'")))
        };
        let f = |k: &str| -> Result<f64> {
            v.get(k)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| Error::msg(format!("model config: missing or non-numeric '{k}'")))
        };
        let hidden = v
            .get("decoder_hidden")
            .and_then(|x| x.as_array())
            .filter(|a| a.len() == 2 && a.iter().all(|x| x.as_u64().is_some()))
            .ok_or_else(|| Error::msg("model config: 'decoder_hidden' must be two integers"))?;
        let cfg = Config {
            // checkpoints from before the side was configurable are MNIST's
            image_side: match v.get("image_side") {
                None => 28,
                Some(_) => n("image_side")?,
            },
            conv1_channels: n("conv1_channels")?,
            primary_maps: n("primary_maps")?,
            caps1_dim: n("caps1_dim")?,
            classes: n("classes")?,
            caps2_dim: n("caps2_dim")?,
            routing_rounds: n("routing_rounds")?,
            w_std: f("w_std")?,
            decoder_hidden: [
                hidden[0].as_u64().unwrap_or(0) as usize,
                hidden[1].as_u64().unwrap_or(0) as usize,
            ],
            recon_weight: f("recon_weight")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// FLOPs of one training step per image (forward + both backward GEMMs; conv1 has no input
    /// gradient), the cost model of the PyTorch peer: 1.2004 GFLOP for the default config.
    pub fn train_flops_per_image(&self) -> f64 {
        let (c1, pc) = (self.conv1_channels, self.primary_maps * self.caps1_dim);
        let kk = KERNEL * KERNEL;
        let (s1, s2) = (self.conv1_side(), self.primary_side());
        let conv1 = s1 * s1 * c1 * kk;
        let conv2 = s2 * s2 * pc * c1 * kk;
        let caps = self.primary_caps() * self.classes * self.caps2_dim;
        let uhat = caps * self.caps1_dim;
        let routing = (2 * self.routing_rounds - 1) * caps;
        let [h1, h2] = self.decoder_hidden;
        let decoder = self.classes * self.caps2_dim * h1 + h1 * h2 + h2 * self.image_pixels();
        2.0 * (2 * conv1 + 3 * (conv2 + uhat + routing + decoder)) as f64
    }
}

/// What a run trains and evaluates on.
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

/// The official code's decay interval: 0.96 every 2,000 steps.
pub const DEFAULT_DECAY_STEPS: u64 = 2000;

/// What a training run is beyond its model: stored in each of its checkpoints, so that a resumed run
/// is the same run (the options of `capsnet train` and the state of a checkpoint both hold one).
#[derive(Clone, Debug, PartialEq)]
pub struct RunSettings {
    /// MNIST, or MultiMNIST pairs of its digits.
    pub dataset: Dataset,
    pub seed: u64,
    pub batch_size: usize,
    pub lr: f64,
    /// The learning rate is lr · lr_decay^(step / lr_decay_steps) (1: constant).
    pub lr_decay: f64,
    pub lr_decay_steps: u64,
    /// Shift each training image by up to this many pixels each way, per image per epoch (0: never).
    pub shift: usize,
    /// Stop after this many epochs without a better validation loss (0: never).
    pub patience: usize,
    /// The first this-many training / validation images only (None: all).
    pub limit: Option<usize>,
    pub val_limit: Option<usize>,
}

/// The largest shift (a 28x28 digit moved further leaves the canvas).
pub const MAX_SHIFT: usize = 8;

impl RunSettings {
    /// The settings' own checks (the model's are [`Config::validate`]'s), each naming its flag.
    pub fn validate(&self) -> Result<()> {
        Config::check_batch_size(self.batch_size)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::msg(format!("--lr must be a positive number, got {}", self.lr)));
        }
        if self.shift > 0 && self.dataset == Dataset::MultiMnist {
            return Err(Error::msg(
                "--shift: MultiMNIST examples are shifted already (each digit by up to 4 px); leave it at 0",
            ));
        }
        if self.shift > MAX_SHIFT {
            return Err(Error::msg(format!(
                "--shift must be between 0 and {MAX_SHIFT} pixels, got {}",
                self.shift
            )));
        }
        if !(self.lr_decay.is_finite() && self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return Err(Error::msg(format!(
                "--lr-decay must be in (0, 1] (1: a constant learning rate), got {}",
                self.lr_decay
            )));
        }
        if self.lr_decay_steps == 0 {
            return Err(Error::msg("--lr-decay-steps must be at least 1"));
        }
        for (flag, v) in [("--limit", self.limit), ("--val-limit", self.val_limit)] {
            if v == Some(0) {
                return Err(Error::msg(format!("{flag} must be at least 1")));
            }
        }
        Ok(())
    }

    /// Where this run differs from `stored`: (flag, this value, the stored one), in the flags' words.
    pub fn differences(&self, stored: &RunSettings) -> Vec<Difference> {
        // an absent limit is every image
        let limit = |l: Option<usize>| l.map_or_else(|| "not given (all images)".to_string(), |n| n.to_string());
        let (a, b) = (self, stored);
        let rows = [
            (
                a.batch_size != b.batch_size,
                "--batch-size",
                a.batch_size.to_string(),
                b.batch_size.to_string(),
            ),
            (a.seed != b.seed, "--seed", a.seed.to_string(), b.seed.to_string()),
            (a.lr != b.lr, "--lr", a.lr.to_string(), b.lr.to_string()),
            (a.limit != b.limit, "--limit", limit(a.limit), limit(b.limit)),
            (
                a.val_limit != b.val_limit,
                "--val-limit",
                limit(a.val_limit),
                limit(b.val_limit),
            ),
            (
                a.dataset != b.dataset,
                "--dataset",
                a.dataset.name().into(),
                b.dataset.name().into(),
            ),
            (a.shift != b.shift, "--shift", a.shift.to_string(), b.shift.to_string()),
            (
                a.lr_decay != b.lr_decay,
                "--lr-decay",
                a.lr_decay.to_string(),
                b.lr_decay.to_string(),
            ),
            (
                a.lr_decay_steps != b.lr_decay_steps,
                "--lr-decay-steps",
                a.lr_decay_steps.to_string(),
                b.lr_decay_steps.to_string(),
            ),
            (
                a.patience != b.patience,
                "--patience",
                a.patience.to_string(),
                b.patience.to_string(),
            ),
        ];
        rows.into_iter()
            .filter(|r| r.0)
            .map(|(_, flag, given, stored)| Difference { flag, given, stored })
            .collect()
    }
}

/// A setting given for a resumed run that differs from the stored run's, named by its flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub flag: &'static str,
    pub given: String,
    pub stored: String,
}

impl Config {
    /// Where this model differs from `stored`, by the flags that set it (fields no flag sets are
    /// named as fields).
    pub fn differences(&self, stored: &Config) -> Vec<Difference> {
        let (a, b) = (self, stored);
        let rows = [
            (
                a.routing_rounds != b.routing_rounds,
                "--routing",
                a.routing_rounds.to_string(),
                b.routing_rounds.to_string(),
            ),
            (
                a.conv1_channels != b.conv1_channels,
                "--conv1-channels",
                a.conv1_channels.to_string(),
                b.conv1_channels.to_string(),
            ),
            (
                a.primary_maps != b.primary_maps,
                "--primary-maps",
                a.primary_maps.to_string(),
                b.primary_maps.to_string(),
            ),
            (a.w_std != b.w_std, "--w-std", a.w_std.to_string(), b.w_std.to_string()),
            (
                a.image_side != b.image_side,
                "image side",
                a.image_side.to_string(),
                b.image_side.to_string(),
            ),
            (
                a.caps1_dim != b.caps1_dim,
                "caps1_dim",
                a.caps1_dim.to_string(),
                b.caps1_dim.to_string(),
            ),
            (
                a.classes != b.classes,
                "classes",
                a.classes.to_string(),
                b.classes.to_string(),
            ),
            (
                a.caps2_dim != b.caps2_dim,
                "caps2_dim",
                a.caps2_dim.to_string(),
                b.caps2_dim.to_string(),
            ),
            (
                a.decoder_hidden != b.decoder_hidden,
                "decoder_hidden",
                format!("{:?}", a.decoder_hidden),
                format!("{:?}", b.decoder_hidden),
            ),
            (
                a.recon_weight != b.recon_weight,
                "recon_weight",
                a.recon_weight.to_string(),
                b.recon_weight.to_string(),
            ),
        ];
        rows.into_iter()
            .filter(|r| r.0)
            .map(|(_, flag, given, stored)| Difference { flag, given, stored })
            .collect()
    }
}

/// A named training configuration: the values it gives the flags it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Géron's notebook: 2 routing rounds, batch 50, no shifts, a constant learning rate.
    Notebook,
    /// Sabour et al.'s setup (their official code): 3 routing rounds, batch 128, random shifts of up
    /// to 2 px (MNIST only: MultiMNIST is shifted already), learning rate × 0.96 every 2,000 steps.
    Paper,
}

/// What a [`Preset`] sets.
pub struct PresetValues {
    pub routing: usize,
    pub batch_size: usize,
    pub shift: usize,
    pub lr_decay: f64,
    pub lr_decay_steps: u64,
}

impl Preset {
    pub fn values(self) -> PresetValues {
        match self {
            Preset::Notebook => PresetValues {
                routing: 2,
                batch_size: 50,
                shift: 0,
                lr_decay: 1.0,
                lr_decay_steps: DEFAULT_DECAY_STEPS,
            },
            Preset::Paper => PresetValues {
                routing: 3,
                batch_size: 128,
                shift: 2,
                lr_decay: 0.96,
                lr_decay_steps: DEFAULT_DECAY_STEPS,
            },
        }
    }
}
