//! The CapsNet of Géron's notebook (Sabour, Frosst & Hinton 2017), on any backend.
//!
//! ```text
//! x [B,28,28,1] → conv1 9x9/1 ReLU → [B,20,20,C1]
//!   → primary conv 9x9/2 ReLU → [B,6,6,M·8] → view [B, I=36·M, 8] → squash        (u)
//!   → û = W[I,10,16,8] · u → routing by agreement (R rounds) → v [B,10,16]
//!   → lengths ‖v‖ [B,10] → margin loss, prediction = argmax
//!   → mask v (label when training, prediction when evaluating) [B,160]
//!   → dense 512 ReLU → 1024 ReLU → 784 sigmoid → 0.0005 · Σ(recon − x)², mean over the batch
//! ```
//!
//! Primary capsule layout (the notebook's reshape of the NHWC conv output): capsule
//! i = (y·6 + x)·M + m is the 8 consecutive channels m·8 .. m·8+7 at grid position (y, x).

use std::rc::Rc;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::checkpoint::Checkpoint;
use crate::config::{Config, KERNEL};
use crate::dataset::Batch;
use crate::float::Float;
use crate::ops::{Act, Backend};
use crate::tape::{Tape, Var};
use crate::{Error, Result, ops};

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Glorot (Xavier) uniform: U(±√(6 / (fan_in + fan_out))).
    Glorot {
        fan_in: usize,
        fan_out: usize,
    },
    Normal {
        std: f64,
    },
    Zeros,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl Config {
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let (c1, pc) = (self.conv1_channels, self.primary_maps * self.caps1_dim);
        let kk = KERNEL * KERNEL;
        let caps_out = self.classes * self.caps2_dim;
        let [h1, h2] = self.decoder_hidden;
        let glorot = |fan_in, fan_out| Init::Glorot { fan_in, fan_out };
        let p = |name, shape: &[usize], init| ParamSpec {
            name,
            shape: shape.to_vec(),
            init,
        };
        vec![
            p("conv1.weight", &[KERNEL, KERNEL, 1, c1], glorot(kk, kk * c1)),
            p("conv1.bias", &[c1], Init::Zeros),
            p("primary.weight", &[KERNEL, KERNEL, c1, pc], glorot(kk * c1, kk * pc)),
            p("primary.bias", &[pc], Init::Zeros),
            p(
                "digit.W",
                &[self.primary_caps(), self.classes, self.caps2_dim, self.caps1_dim],
                Init::Normal { std: self.w_std },
            ),
            p("decoder.fc1.weight", &[caps_out, h1], glorot(caps_out, h1)),
            p("decoder.fc1.bias", &[h1], Init::Zeros),
            p("decoder.fc2.weight", &[h1, h2], glorot(h1, h2)),
            p("decoder.fc2.bias", &[h2], Init::Zeros),
            p(
                "decoder.fc3.weight",
                &[h2, self.image_pixels()],
                glorot(h2, self.image_pixels()),
            ),
            p("decoder.fc3.bias", &[self.image_pixels()], Init::Zeros),
        ]
    }

    pub fn param_count(&self) -> usize {
        self.param_specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }
}

/// Initial values of every parameter, in [`Config::param_specs`] order, from one seeded generator.
pub fn init_params(cfg: &Config, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    cfg.param_specs()
        .iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            match spec.init {
                Init::Zeros => vec![0.0; n],
                Init::Normal { std } => {
                    let d = Normal::new(0.0, std).expect("std validated positive");
                    (0..n).map(|_| d.sample(&mut rng)).collect()
                }
                Init::Glorot { fan_in, fan_out } => {
                    let lim = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    let d = Uniform::new(-lim, lim).expect("a non-empty range");
                    (0..n).map(|_| d.sample(&mut rng)).collect()
                }
            }
        })
        .collect()
}

/// A layer's weight and bias on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    pub weight: Var,
    pub bias: Var,
}

/// The parameters on the tape, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub conv1: Layer,
    pub primary: Layer,
    /// The transformation matrices W [I, classes, 16, 8] of the digit capsules.
    pub digit_w: Var,
    /// fc1 (ReLU), fc2 (ReLU), fc3 (sigmoid).
    pub decoder: [Layer; 3],
}

impl Params {
    /// Every parameter in [`Config::param_specs`] order (the order of checkpoints and of Adam).
    pub fn all(&self) -> [Var; 11] {
        let [d1, d2, d3] = self.decoder;
        [
            self.conv1.weight,
            self.conv1.bias,
            self.primary.weight,
            self.primary.bias,
            self.digit_w,
            d1.weight,
            d1.bias,
            d2.weight,
            d2.bias,
            d3.weight,
            d3.bias,
        ]
    }

    fn from_spec_order(v: &[Var]) -> Params {
        let layer = |i: usize| Layer {
            weight: v[i],
            bias: v[i + 1],
        };
        Params {
            conv1: layer(0),
            primary: layer(2),
            digit_w: v[4],
            decoder: [layer(5), layer(7), layer(9)],
        }
    }
}

/// The model: its config and the tape variables of its parameters.
pub struct CapsNet {
    pub cfg: Config,
    pub params: Params,
}

/// The encoder's variables for one batch of images.
pub struct Encoded<Idx> {
    /// The images [B, side, side, 1].
    pub x: Var,
    /// Digit capsules v [B, classes, 16].
    pub v: Var,
    /// Capsule lengths [B, classes]: the class probabilities.
    pub lengths: Var,
    /// The predicted class of every image (the longest capsule).
    pub pred: Rc<Idx>,
}

/// The terms of the loss.
pub struct Losses {
    pub margin: Var,
    /// The reconstruction term, weight included.
    pub recon: Var,
    /// margin + recon, mean over the batch.
    pub total: Var,
}

/// The variables of one forward pass.
pub struct Forward<Idx> {
    pub v: Var,
    /// Capsule lengths [B, classes]: the class probabilities.
    pub lengths: Var,
    /// The predicted class of every image.
    pub pred: Rc<Idx>,
    pub recon: Var,
    pub margin: Var,
    /// The reconstruction term of the loss, weight included.
    pub recon_loss: Var,
    pub loss: Var,
    /// The labels on the backend, [B, per].
    pub labels: Rc<Idx>,
}

impl CapsNet {
    /// Puts the parameters on the tape (which must hold nothing yet), initialised from `values`
    /// (in [`Config::param_specs`] order, e.g. from [`init_params`] or a checkpoint).
    pub fn new<B: Backend>(cfg: Config, tape: &mut Tape<B>, values: &[Vec<f64>]) -> Result<CapsNet> {
        cfg.validate()?;
        let specs = cfg.param_specs();
        if values.len() != specs.len() {
            return Err(Error::msg(format!(
                "model: {} parameter tensors given, {} expected",
                values.len(),
                specs.len()
            )));
        }
        let mut vars = vec![];
        for (spec, vals) in specs.iter().zip(values) {
            let host: Vec<B::E> = vals.iter().map(|&x| B::E::from_f64(x)).collect();
            let buf = tape.backend().upload(&host)?;
            vars.push(
                tape.param(buf, &spec.shape)
                    .map_err(|e| Error::msg(format!("{}: {e}", spec.name)))?,
            );
        }
        Ok(CapsNet {
            cfg,
            params: Params::from_spec_order(&vars),
        })
    }

    /// The model a checkpoint holds (its config and weights; its optimiser state is not needed).
    pub fn from_checkpoint<B: Backend>(tape: &mut Tape<B>, ck: &Checkpoint) -> Result<CapsNet> {
        let values: Vec<Vec<f64>> = ck
            .params
            .iter()
            .map(|v| v.iter().map(|&x| x as f64).collect())
            .collect();
        CapsNet::new(ck.config.clone(), tape, &values)
    }

    /// Images ([B·side²] pixels in [0, 1], row-major) → digit capsules, their lengths and the
    /// predicted classes.
    pub fn encode<B: Backend>(&self, t: &mut Tape<B>, images: &[B::E]) -> Result<Encoded<B::Idx>> {
        let cfg = &self.cfg;
        let pixels = cfg.image_pixels();
        if images.is_empty() || images.len() % pixels != 0 {
            return Err(Error::msg(format!(
                "model: {} pixels is not a whole number of {}x{} images",
                images.len(),
                cfg.image_side,
                cfg.image_side
            )));
        }
        let batch = images.len() / pixels;
        let x = t.backend().upload(images)?;
        self.encode_on_backend(t, x, batch)
    }

    /// [`CapsNet::encode`] of `batch` images already on the backend (x: [B·side²] pixels).
    pub fn encode_on_backend<B: Backend>(&self, t: &mut Tape<B>, x: B::Buf, batch: usize) -> Result<Encoded<B::Idx>> {
        let (cfg, p) = (&self.cfg, &self.params);
        let side = cfg.image_side;
        let x = t.input(x, &[batch, side, side, 1])?;
        let (_, u) = self.primary_capsules(t, x)?;
        let v = ops::predict_routing(t, u, p.digit_w, cfg.routing_rounds)?;
        let lengths = ops::lengths(t, v)?;
        let pred = ops::argmax(t, lengths)?;
        Ok(Encoded { x, v, lengths, pred })
    }

    /// The images x [B, side, side, 1] → conv1's feature maps [B, s1, s1, conv1_channels] and the
    /// squashed primary capsules u [B, primary_caps, caps1_dim]: the encoder up to routing.
    pub fn primary_capsules<B: Backend>(&self, t: &mut Tape<B>, x: Var) -> Result<(Var, Var)> {
        let (cfg, p) = (&self.cfg, &self.params);
        let batch = t.value(x).shape[0];
        let h = ops::conv2d(t, x, p.conv1.weight, p.conv1.bias, 1, Act::Relu)?;
        let prim = ops::conv2d(t, h, p.primary.weight, p.primary.bias, 2, Act::Relu)?;
        t.reshape(prim, &[batch, cfg.primary_caps(), cfg.caps1_dim])?;
        Ok((h, ops::squash(t, prim)?))
    }

    /// Digit capsules v [B, classes, 16], each image's all but capsule `keep[b]` zeroed → the
    /// reconstruction [B, side²] in [0, 1].
    pub fn decode<B: Backend>(&self, t: &mut Tape<B>, v: Var, keep: Rc<B::Idx>) -> Result<Var> {
        let masked = ops::mask(t, v, keep)?;
        self.decode_masked(t, masked)
    }

    /// The decoder alone: its input [B, classes·16] as given (masked or blended by the caller) → the
    /// reconstruction [B, side²] in [0, 1].
    pub fn decode_masked<B: Backend>(&self, t: &mut Tape<B>, masked: Var) -> Result<Var> {
        let [d1, d2, d3] = self.params.decoder;
        let h1 = ops::dense(t, masked, d1.weight, d1.bias, Act::Relu)?;
        let h2 = ops::dense(t, h1, d2.weight, d2.bias, Act::Relu)?;
        ops::dense(t, h2, d3.weight, d3.bias, Act::Sigmoid)
    }

    /// Margin loss of the lengths against `labels` ([B, per], each present), plus the weighted
    /// squared error of each reconstruction in `recons` (one per label) against its target: the
    /// encoded images themselves when `targets` is None (one label), else `targets` [per, B, side²],
    /// each label's digit alone. The reconstruction terms are summed.
    pub fn loss<B: Backend>(
        &self,
        t: &mut Tape<B>,
        enc: &Encoded<B::Idx>,
        recons: &[Var],
        labels: Rc<B::Idx>,
        targets: Option<&[B::E]>,
    ) -> Result<Losses> {
        let batch = t.value(enc.x).shape[0];
        let (per, px) = (recons.len(), self.cfg.image_pixels());
        if per == 0 || (targets.is_none() && per != 1) {
            return Err(Error::msg(format!(
                "model: {per} reconstructions need a target image each (only one can be the input)"
            )));
        }
        let margin = ops::margin_loss(t, enc.lengths, labels, per)?;
        let mut recon = None;
        for (j, &r) in recons.iter().enumerate() {
            let target = match targets {
                None => {
                    // the image is the reconstruction target: view it as [B, side²] (conv1 kept its shape)
                    t.reshape(enc.x, &[batch, px])?;
                    enc.x
                }
                Some(all) => {
                    let part = all.get(j * batch * px..(j + 1) * batch * px).ok_or_else(|| {
                        Error::msg(format!("model: {} target pixels for {per} x {batch} images", all.len()))
                    })?;
                    let buf = t.backend().upload(part)?;
                    t.input(buf, &[batch, px])?
                }
            };
            let term = ops::sq_err(t, r, target, self.cfg.recon_weight)?;
            recon = Some(match recon {
                None => term,
                Some(sum) => ops::add(t, sum, term)?,
            });
        }
        let recon = recon.expect("at least one reconstruction");
        let total = ops::add(t, margin, recon)?;
        Ok(Losses { margin, recon, total })
    }

    /// Runs the network on `images` ([B·side²] pixels in [0, 1]) with `labels` [B]. The decoder sees
    /// the label's capsule when `mask_with_labels`, else the predicted one's.
    pub fn forward<B: Backend>(
        &self,
        t: &mut Tape<B>,
        images: &[B::E],
        labels: &[u32],
        mask_with_labels: bool,
    ) -> Result<Forward<B::Idx>> {
        let batch = labels.len();
        if images.len() != batch * self.cfg.image_pixels() {
            return Err(Error::msg(format!("model: {} pixels for {batch} labels", images.len())));
        }
        let x = t.backend().upload(images)?;
        let label_idx = Rc::new(t.backend().upload_idx(labels)?);
        self.forward_on_backend(t, x, label_idx, mask_with_labels)
    }

    /// [`CapsNet::forward`] of images and labels already on the backend (a resident data set's
    /// batch): x [B·side²] pixels, labels [B].
    pub fn forward_on_backend<B: Backend>(
        &self,
        t: &mut Tape<B>,
        x: B::Buf,
        label_idx: Rc<B::Idx>,
        mask_with_labels: bool,
    ) -> Result<Forward<B::Idx>> {
        let pixels = self.cfg.image_pixels();
        let batch = t.backend().buf_len(&x) / pixels;
        if batch == 0 || t.backend().buf_len(&x) != batch * pixels {
            return Err(Error::msg(format!(
                "model: {} pixels is not a whole number of images",
                t.backend().buf_len(&x)
            )));
        }
        let enc = self.encode_on_backend(t, x, batch)?;
        let keep = if mask_with_labels {
            label_idx.clone()
        } else {
            enc.pred.clone()
        };
        let recon = self.decode(t, enc.v, keep)?;
        let l = self.loss(t, &enc, &[recon], label_idx.clone(), None)?;
        Ok(Forward {
            v: enc.v,
            lengths: enc.lengths,
            pred: enc.pred,
            recon,
            margin: l.margin,
            recon_loss: l.recon,
            loss: l.total,
            labels: label_idx,
        })
    }

    /// The training forward on a data set's batch: the decoder masked by the labels. With one label
    /// per image `mask_with_labels` false masks it by the prediction (MNIST's evaluation); with two,
    /// each pass is always masked by its label, since each has its own target.
    pub fn forward_batch<B: Backend>(
        &self,
        t: &mut Tape<B>,
        batch: &Batch<B::E>,
        mask_with_labels: bool,
    ) -> Result<Forward<B::Idx>> {
        match &batch.targets {
            None => self.forward(t, &batch.images, &batch.labels, mask_with_labels),
            Some(targets) => self.forward_multi(t, &batch.images, &batch.labels, batch.per, targets),
        }
    }

    /// Runs the network on images that each hold `per` digits (MultiMNIST: 2): `labels` [B, per],
    /// `targets` [per, B, side²] each label's digit alone. The decoder runs once per label, masked by
    /// that label's capsule, against that digit's target. `recon` of the result is the first pass.
    pub fn forward_multi<B: Backend>(
        &self,
        t: &mut Tape<B>,
        images: &[B::E],
        labels: &[u32],
        per: usize,
        targets: &[B::E],
    ) -> Result<Forward<B::Idx>> {
        let px = self.cfg.image_pixels();
        let batch = images.len() / px;
        if per == 0 || images.len() != batch * px || labels.len() != batch * per || targets.len() != per * batch * px {
            return Err(Error::msg(format!(
                "model: {} pixels, {} labels and {} target pixels are not {per} digits in each {px}-pixel image",
                images.len(),
                labels.len(),
                targets.len()
            )));
        }
        let enc = self.encode(t, images)?;
        let label_idx = Rc::new(t.backend().upload_idx(labels)?);
        let mut recons = vec![];
        for j in 0..per {
            let keep: Vec<u32> = (0..batch).map(|b| labels[b * per + j]).collect();
            let keep = Rc::new(t.backend().upload_idx(&keep)?);
            recons.push(self.decode(t, enc.v, keep)?);
        }
        let l = self.loss(t, &enc, &recons, label_idx.clone(), Some(targets))?;
        Ok(Forward {
            v: enc.v,
            lengths: enc.lengths,
            pred: enc.pred,
            recon: recons[0],
            margin: l.margin,
            recon_loss: l.recon,
            loss: l.total,
            labels: label_idx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MAX_IMAGE_SIDE, MIN_IMAGE_SIDE};

    #[test]
    fn default_model_has_the_notebooks_parameter_count() {
        assert_eq!(Config::default().param_count(), 8_215_568);
        assert_eq!(Config::default().primary_caps(), 1152);
    }

    #[test]
    fn layer_shapes_agree_with_the_parameters() {
        for c in [
            Config::default(),
            Config {
                conv1_channels: 5,
                primary_maps: 3,
                decoder_hidden: [7, 9],
                ..Config::default()
            },
        ] {
            let numel: Vec<usize> = c.param_specs().iter().map(|p| p.shape.iter().product()).collect();
            let [fc1, fc2, fc3] = c.decoder_shapes(4);
            assert_eq!(c.conv1_shape(4).w_len(), numel[0]);
            assert_eq!(c.primary_shape(4).w_len(), numel[2]);
            assert_eq!(
                (c.primary_shape(4).out_h(), c.primary_shape(4).out_w()),
                (c.primary_side(), c.primary_side())
            );
            assert_eq!(c.caps_shape(4).w_len(), numel[4]);
            assert_eq!(
                c.caps_shape(4).u_len(),
                c.primary_shape(4).y_len(),
                "the primary conv's output is u"
            );
            assert_eq!(
                [fc1.inp * fc1.out, fc2.inp * fc2.out, fc3.inp * fc3.out],
                [numel[5], numel[7], numel[9]]
            );
        }
    }

    #[test]
    fn sizes_follow_the_image_side() {
        let multi = Config {
            image_side: 36,
            ..Config::default()
        };
        // MultiMNIST: conv1 28x28, a 10x10 grid of 32 capsule types
        assert_eq!(
            (multi.conv1_side(), multi.primary_side(), multi.primary_caps()),
            (28, 10, 3200)
        );
        assert_eq!(multi.decoder_shapes(1)[2].out, 36 * 36);
        let d = Config::default();
        assert_eq!((d.conv1_side(), d.primary_side()), (20, 6));
        for side in [MIN_IMAGE_SIDE - 1, MAX_IMAGE_SIDE + 1] {
            let c = Config {
                image_side: side,
                ..Config::default()
            };
            assert!(c.validate().unwrap_err().to_string().contains("image side"), "{side}");
        }
        // a config written before the side was stored is MNIST's
        let mut old = d.to_json();
        old.as_object_mut().unwrap().remove("image_side");
        assert_eq!(Config::from_json(&old).unwrap(), d);
    }

    #[test]
    fn config_round_trips_through_json() {
        let c = Config {
            image_side: 36,
            routing_rounds: 3,
            conv1_channels: 7,
            ..Config::default()
        };
        assert_eq!(Config::from_json(&c.to_json()).unwrap(), c);
        let mut bad = c.to_json();
        bad["routing_rounds"] = serde_json::json!(0);
        assert!(
            Config::from_json(&bad)
                .unwrap_err()
                .to_string()
                .contains("routing rounds")
        );
    }

    #[test]
    fn initialisation_is_seeded_and_scaled() {
        let c = Config {
            conv1_channels: 8,
            primary_maps: 2,
            ..Config::default()
        };
        let (a, b) = (init_params(&c, 1), init_params(&c, 1));
        assert_eq!(a, b);
        assert_ne!(a, init_params(&c, 2));
        // conv1: Glorot limit √(6 / (81 + 81·8)) ≈ 0.0907; biases zero; W ~ N(0, 0.01)
        let lim = (6.0f64 / (81.0 + 648.0)).sqrt();
        assert!(a[0].iter().all(|x| x.abs() <= lim) && a[0].iter().any(|x| x.abs() > lim * 0.9));
        assert!(a[1].iter().all(|&x| x == 0.0));
        let w = &a[4];
        let std = (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.01).abs() < 0.0005, "W std {std}");
    }
}
