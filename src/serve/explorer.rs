//! The model's side of the explorer: one image through the network with what each layer made of it,
//! and the decoder on any capsules. Runs on one thread (the tape is not shared); [`super`] feeds it.

use crate::checkpoint::Checkpoint;
use crate::config::Dataset;
use crate::float::Float;
use crate::infer::{host, untaped};
use crate::model::CapsNet;
use crate::ops::Backend;
use crate::ops::capsules::CapsShape;
use crate::predict::{self, MIN_SEPARATION};
use crate::tape::Tape;
use crate::{Error, Result};

/// conv1's feature maps shown: the most active ones.
pub const CONV1_MAPS: usize = 16;

/// What the network made of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Look {
    /// The capsule lengths, one per class.
    pub lengths: Vec<f32>,
    /// The longest capsule.
    pub digit: usize,
    /// The classes over the threshold, longest first.
    pub present: Vec<usize>,
    /// The longest capsule is over the threshold and the ink stood out as a digit's does.
    pub confident: bool,
    /// The digit capsules [classes, dim].
    pub capsules: Vec<f32>,
    /// The decoder's image from each class shown: the longest capsule, or on a MultiMNIST model the
    /// two longest (as the paper's Figure 5), side² pixels each.
    pub reconstructions: Vec<(usize, Vec<f32>)>,
}

/// Inside the network for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Inside {
    /// conv1's [`CONV1_MAPS`] most active feature maps: (channel, side² values scaled to [0, 1] by
    /// the largest of them all).
    pub conv1: Vec<(usize, Vec<f32>)>,
    pub conv1_side: usize,
    /// The primary capsules' lengths [maps, side, side] (capsule i = (map, y, x) as the model reshapes).
    pub primary_lengths: Vec<f32>,
    pub primary_maps: usize,
    pub primary_side: usize,
    /// The coupling coefficients of every routing round [rounds][primary capsule][class]: how much
    /// each primary capsule sends to each digit capsule (each row sums to 1).
    pub coupling: Vec<Vec<f32>>,
}

/// A checkpoint's model on a backend, for one image at a time.
pub struct Explorer<B: Backend> {
    tape: Tape<B>,
    model: CapsNet,
    pub dataset: Dataset,
    pub threshold: f32,
}

impl<B: Backend> Explorer<B> {
    pub fn new(backend: B, ck: &Checkpoint, threshold: f32) -> Result<Self> {
        let mut tape = Tape::new(backend);
        let model = CapsNet::from_checkpoint(&mut tape, ck)?;
        Ok(Explorer {
            tape,
            model,
            dataset: ck.state.run.dataset,
            threshold,
        })
    }

    pub fn config(&self) -> &crate::config::Config {
        &self.model.cfg
    }

    fn check_pixels(&self, pixels: &[f32]) -> Result<()> {
        let side = self.model.cfg.image_side;
        if pixels.len() != side * side {
            return Err(Error::msg(format!(
                "{} pixels given; the model takes {side}x{side} = {}",
                pixels.len(),
                side * side
            )));
        }
        if let Some(p) = pixels.iter().find(|p| !(0.0..=1.0).contains(*p)) {
            return Err(Error::msg(format!("pixel value {p} is outside 0 to 1")));
        }
        Ok(())
    }

    /// Images (n·side² pixels in [0, 1]) → their lengths, predictions and capsules, as
    /// [`crate::infer::classify`].
    pub fn classify(&mut self, pixels: &[f32], batch: usize) -> Result<crate::infer::Classified> {
        crate::infer::classify(&mut self.tape, &self.model, pixels, batch)
    }

    /// One image (side² pixels) through the encoder, and the reconstructions of the digits found.
    /// `separation` is the preparation's (1 for pixels given as they are).
    pub fn look(&mut self, pixels: &[f32], separation: f32) -> Result<Look> {
        self.check_pixels(pixels)?;
        let c = self.classify(pixels, 1)?;
        let (classes, dim) = (self.model.cfg.classes, self.model.cfg.caps2_dim);
        let digit = c.pred[0] as usize;
        let mut shown = vec![digit];
        if self.dataset == Dataset::MultiMnist {
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| c.lengths[b].total_cmp(&c.lengths[a]));
            shown = order[..2.min(classes)].to_vec();
        }
        let mut inputs = vec![];
        for &k in &shown {
            inputs.extend(masked(&c.v, k, classes, dim));
        }
        let recons = self.decode(&inputs)?;
        let px = self.model.cfg.image_pixels();
        Ok(Look {
            present: predict::present(&c.lengths, self.threshold),
            confident: c.lengths[digit] > self.threshold && separation >= MIN_SEPARATION,
            digit,
            reconstructions: shown
                .iter()
                .zip(recons.chunks(px))
                .map(|(&k, r)| (k, r.to_vec()))
                .collect(),
            lengths: c.lengths,
            capsules: c.v,
        })
    }

    /// The decoder on its inputs as given: n rows of classes·dim (one capsule kept and the rest zero,
    /// a capsule tweaked, or a blend of two digits' rows) → n reconstructions of side² pixels.
    pub fn decode(&mut self, inputs: &[f32]) -> Result<Vec<f32>> {
        let width = self.model.cfg.classes * self.model.cfg.caps2_dim;
        if inputs.is_empty() || !inputs.len().is_multiple_of(width) {
            return Err(Error::msg(format!(
                "{} capsule values are not whole decoder inputs of {width} ({} capsules of {})",
                inputs.len(),
                self.model.cfg.classes,
                self.model.cfg.caps2_dim
            )));
        }
        if let Some(x) = inputs.iter().find(|x| !x.is_finite() || x.abs() > 1e3) {
            return Err(Error::msg(format!("capsule value {x} is not a number within ±1000")));
        }
        let rows = inputs.len() / width;
        let model = &self.model;
        untaped(&mut self.tape, |t| {
            let up: Vec<B::E> = inputs.iter().map(|&x| B::E::from_f64(x as f64)).collect();
            let buf = t.backend().upload(&up)?;
            let var = t.input(buf, &[rows, width])?;
            let recon = model.decode_masked(t, var)?;
            host(t.backend(), &t.value(recon).buf)
        })
    }

    /// One image (side² pixels) through the encoder, keeping conv1's maps, the primary capsules and
    /// the coupling coefficients of every routing round.
    pub fn inside(&mut self, pixels: &[f32]) -> Result<Inside> {
        self.check_pixels(pixels)?;
        let model = &self.model;
        let cfg = model.cfg.clone();
        untaped(&mut self.tape, |t| {
            let side = cfg.image_side;
            let up: Vec<B::E> = pixels.iter().map(|&x| B::E::from_f64(x as f64)).collect();
            let buf = t.backend().upload(&up)?;
            let x = t.input(buf, &[1, side, side, 1])?;
            let (h, u) = model.primary_capsules(t, x)?;
            // the model's routing op, called for what it saves: c [1, R, I, J]
            let s = CapsShape {
                batch: 1,
                in_caps: cfg.primary_caps(),
                in_dim: cfg.caps1_dim,
                out_caps: cfg.classes,
                out_dim: cfg.caps2_dim,
            };
            let rounds = cfg.routing_rounds;
            let be = t.backend();
            let mut v = be.alloc_out(s.v_len())?;
            let mut saved = be.routing_saved(&s, rounds)?;
            be.caps_routing_fwd(
                &s,
                rounds,
                &t.value(u).buf,
                &t.value(model.params.digit_w).buf,
                &mut v,
                &mut saved,
            )?;
            let c = host(be, &saved.c)?;
            let per_round = s.in_caps * s.out_caps;
            let coupling = c.chunks(per_round).map(<[f32]>::to_vec).collect();
            // conv1 [1, s1, s1, C]: the most active channels, on one scale
            let hv = host(be, &t.value(h).buf)?;
            let (s1, ch) = (cfg.conv1_side(), cfg.conv1_channels);
            let mut mean: Vec<(usize, f32)> = (0..ch)
                .map(|k| (k, hv.iter().skip(k).step_by(ch).sum::<f32>()))
                .collect();
            mean.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let top = hv.iter().fold(0f32, |m, &x| m.max(x)).max(1e-12);
            let conv1 = mean
                .iter()
                .take(CONV1_MAPS.min(ch))
                .map(|&(k, _)| (k, (0..s1 * s1).map(|p| hv[p * ch + k] / top).collect()))
                .collect();
            // u [1, I, 8]: lengths; capsule i is (y, x, map) as the reshape of [s2, s2, maps·8] reads
            let uv = host(be, &t.value(u).buf)?;
            let (s2, maps) = (cfg.primary_side(), cfg.primary_maps);
            let mut primary_lengths = vec![0f32; s.in_caps];
            for (i, cap) in uv.chunks(cfg.caps1_dim).enumerate() {
                let (yx, m) = (i / maps, i % maps);
                primary_lengths[m * s2 * s2 + yx] = cap.iter().map(|x| x * x).sum::<f32>().sqrt();
            }
            Ok(Inside {
                conv1,
                conv1_side: s1,
                primary_lengths,
                primary_maps: maps,
                primary_side: s2,
                coupling,
            })
        })
    }
}

/// The decoder's input for capsule `keep` of `v` [classes, dim] alone.
pub fn masked(v: &[f32], keep: usize, classes: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; classes * dim];
    out[keep * dim..(keep + 1) * dim].copy_from_slice(&v[keep * dim..(keep + 1) * dim]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fast::FastCpu;
    use crate::checkpoint::TrainState;
    use crate::config::Config;

    fn small() -> Checkpoint {
        let config = Config {
            conv1_channels: 8,
            primary_maps: 4,
            routing_rounds: 3,
            // large enough weights that the predictions agree and routing moves the coefficients
            w_std: 0.5,
            ..Config::default()
        };
        let params = crate::model::init_params(&config, 7)
            .into_iter()
            .map(|v| v.into_iter().map(|x| x as f32).collect())
            .collect();
        Checkpoint {
            config,
            state: TrainState::start(crate::config::RunSettings {
                dataset: Dataset::Mnist,
                seed: 1,
                batch_size: 32,
                lr: 1e-3,
                lr_decay: 1.0,
                lr_decay_steps: 2000,
                shift: 0,
                patience: 0,
                limit: None,
                val_limit: None,
            }),
            params,
            adam_m: vec![],
            adam_v: vec![],
            history: vec![],
        }
    }

    #[test]
    fn the_explorer_answers_as_the_model_does() {
        let ck = small();
        let mut ex = Explorer::new(FastCpu::new(), &ck, 0.5).unwrap();
        let mut tape = Tape::new(FastCpu::new());
        let model = CapsNet::from_checkpoint(&mut tape, &ck).unwrap();
        let px: Vec<f32> = (0..784).map(|i| ((i * 37 % 101) as f32 / 100.0).min(1.0)).collect();
        let c = crate::infer::classify(&mut tape, &model, &px, 1).unwrap();
        let look = ex.look(&px, 1.0).unwrap();
        assert_eq!(
            (look.lengths.clone(), look.digit),
            (c.lengths.clone(), c.pred[0] as usize)
        );
        let want = crate::infer::reconstruct(&mut tape, &model, &c.v, &c.pred, 1).unwrap();
        assert_eq!(look.reconstructions, vec![(look.digit, want.clone())]);
        // the decoder on a masked capsule is the reconstruction
        assert_eq!(ex.decode(&masked(&c.v, look.digit, 10, 16)).unwrap(), want);
        // routing: each round's coefficients of a primary capsule sum to 1; the first round's are
        // uniform; the last round's weighted sums squash to the model's v
        let inside = ex.inside(&px).unwrap();
        assert_eq!(inside.coupling.len(), 3);
        for round in &inside.coupling {
            for row in round.chunks(10) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
        assert!(inside.coupling[0].iter().all(|&x| (x - 0.1).abs() < 1e-6));
        assert!(
            inside.coupling[2].iter().any(|&x| (x - 0.1).abs() > 1e-4),
            "routing moved the coefficients"
        );
        assert_eq!(inside.primary_lengths.len(), 4 * 36);
        assert!(inside.primary_lengths.iter().all(|&l| (0.0..1.0).contains(&l)));
        assert_eq!(inside.conv1.len(), 8);
        assert!(
            inside
                .conv1
                .iter()
                .flat_map(|(_, m)| m)
                .all(|&x| (0.0..=1.0).contains(&x))
        );
        // bad input names what is wrong
        assert!(ex.look(&px[..10], 1.0).unwrap_err().to_string().contains("28x28"));
        assert!(
            ex.decode(&[f32::NAN; 160])
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
    }
}
