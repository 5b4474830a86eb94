//! Checkpoints as safetensors files, readable by PyTorch (`safetensors.torch.load_file`) and numpy.
//!
//! Tensors (F32): every parameter under its name in [`Config::param_specs`] (e.g. `conv1.weight`,
//! [9, 9, 1, 256] HWIO), then the Adam moments as `adam.m.<name>` and `adam.v.<name>`.
//! Metadata (strings): `format` = `capsnet/1`, `epoch` (completed epochs), `step` (Adam updates),
//! `config` (the model config as JSON) and `train` (seed, batch size, learning rate, early-stopping
//! state and data limits, as JSON). Files are written to a temporary name and renamed.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::json;

use crate::config::{Config, DEFAULT_DECAY_STEPS, Dataset, RunSettings};
use crate::error::write_atomic;
use crate::{Error, Result};

pub const FORMAT: &str = "capsnet/1";

/// Training state beside the weights: everything a resumed run needs to continue exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// What the run is.
    pub run: RunSettings,
    /// Completed epochs.
    pub epoch: usize,
    /// Adam updates made.
    pub step: u64,
    pub best_val_loss: Option<f64>,
    /// Epochs since the validation loss last improved.
    pub bad_epochs: usize,
    /// How far into epoch `epoch` (0-based, not yet complete) a step checkpoint was taken; None at an
    /// epoch's end.
    pub partial: Option<EpochProgress>,
}

/// The part of an epoch done when a step checkpoint was taken: the batches of the epoch's shuffle
/// already trained on and the running sums of its metrics, so the resumed epoch reports exactly what
/// an uninterrupted one does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochProgress {
    pub batches: usize,
    pub loss: f64,
    pub margin: f64,
    pub recon: f64,
    pub correct: usize,
    pub images: usize,
    /// Training seconds spent on the epoch so far.
    pub seconds: f64,
}

impl EpochProgress {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "batches": self.batches, "loss": self.loss, "margin": self.margin, "recon": self.recon,
            "correct": self.correct, "images": self.images, "seconds": self.seconds,
        })
    }
    fn from_json(v: &serde_json::Value) -> Option<EpochProgress> {
        let u = |k: &str| v.get(k)?.as_u64().map(|x| x as usize);
        let f = |k: &str| v.get(k)?.as_f64();
        Some(EpochProgress {
            batches: u("batches")?,
            loss: f("loss")?,
            margin: f("margin")?,
            recon: f("recon")?,
            correct: u("correct")?,
            images: u("images")?,
            seconds: f("seconds")?,
        })
    }
}

impl TrainState {
    /// Records an epoch's validation loss; true when it is the best so far (strictly lower).
    pub fn record_val_loss(&mut self, loss: f64) -> bool {
        let improved = self.best_val_loss.is_none_or(|b| loss < b);
        if improved {
            self.best_val_loss = Some(loss);
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        improved
    }

    /// A fresh run's state: nothing trained yet.
    pub fn start(run: RunSettings) -> TrainState {
        TrainState {
            run,
            epoch: 0,
            step: 0,
            best_val_loss: None,
            bad_epochs: 0,
            partial: None,
        }
    }

    /// Early stopping: `patience` epochs in a row without a better validation loss (never if 0).
    pub fn should_stop(&self) -> bool {
        self.run.patience > 0 && self.bad_epochs >= self.run.patience
    }

    fn to_json(&self) -> serde_json::Value {
        let r = &self.run;
        json!({
            "seed": r.seed, "batch_size": r.batch_size, "lr": r.lr, "patience": r.patience,
            "best_val_loss": self.best_val_loss, "bad_epochs": self.bad_epochs,
            "limit": r.limit, "val_limit": r.val_limit,
            "dataset": r.dataset.name(), "shift": r.shift, "lr_decay": r.lr_decay, "lr_decay_steps": r.lr_decay_steps,
            "partial": self.partial.as_ref().map(EpochProgress::to_json),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: Config,
    pub state: TrainState,
    /// Parameter values in [`Config::param_specs`] order.
    pub params: Vec<Vec<f32>>,
    pub adam_m: Vec<Vec<f32>>,
    pub adam_v: Vec<Vec<f32>>,
    /// The run's metrics.jsonl lines up to this checkpoint, one JSON object per completed epoch: the
    /// file is rewritten from here, so a kill between two writes cannot leave it out of step.
    pub history: Vec<serde_json::Value>,
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn save(path: &Path, ck: &Checkpoint) -> Result<()> {
    let specs = ck.config.param_specs();
    let groups = [("", &ck.params), ("adam.m.", &ck.adam_m), ("adam.v.", &ck.adam_v)];
    let mut named = vec![];
    for (prefix, values) in groups {
        if values.len() != specs.len() {
            return Err(Error::file(
                path,
                format!("{} {prefix}tensors for {} parameters", values.len(), specs.len()),
            ));
        }
        for (spec, v) in specs.iter().zip(values.iter()) {
            named.push((format!("{prefix}{}", spec.name), spec.shape.clone(), to_bytes(v)));
        }
    }
    let views = named
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::file(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("epoch".to_string(), ck.state.epoch.to_string()),
        ("step".to_string(), ck.state.step.to_string()),
        ("config".to_string(), ck.config.to_json().to_string()),
        ("train".to_string(), ck.state.to_json().to_string()),
        (
            "metrics".to_string(),
            serde_json::Value::Array(ck.history.clone()).to_string(),
        ),
    ]);
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

/// Why `bytes` is not a readable safetensors file, in the user's terms: cut short (a copy or a write
/// that did not finish), or not a safetensors file at all.
fn unreadable(bytes: &[u8], detail: &str) -> String {
    let not_ours = format!("not a capsnet checkpoint (not a safetensors file: {detail})");
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    else {
        return format!("truncated or not a capsnet checkpoint: only {} bytes", bytes.len());
    };
    let body = &bytes[8..];
    if body.first() != Some(&b'{') {
        return not_ours;
    }
    if len > body.len() as u64 {
        return format!(
            "truncated: its header needs {len} bytes and only {} follow ({detail})",
            body.len()
        );
    }
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&body[..len as usize]) else {
        return not_ours;
    };
    // the end of the last tensor's data, as the header states it
    let needed = header
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let have = body.len() as u64 - len;
    if have < needed {
        return format!(
            "truncated: {} bytes of tensor data are missing ({detail})",
            needed - have
        );
    }
    format!("damaged: {detail}")
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let bad = |what: String| Error::file(path, format!("not a valid capsnet checkpoint: {what}"));
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read checkpoint: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, unreadable(&bytes, &e.to_string())))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("{e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let Some(format) = meta.get("format") else {
        return Err(Error::file(
            path,
            "not a capsnet checkpoint: a safetensors file without capsnet's 'format' metadata",
        ));
    };
    if format != FORMAT {
        let whose = if format.starts_with("capsnet/") {
            "written by another version of capsnet"
        } else {
            "not a capsnet checkpoint"
        };
        return Err(Error::file(
            path,
            format!("{whose}: format '{format}', this version reads '{FORMAT}'"),
        ));
    }
    let get = |k: &str| meta.get(k).ok_or_else(|| bad(format!("metadata has no '{k}'")));
    let num = |k: &str| -> Result<u64> {
        get(k)?
            .parse()
            .map_err(|_| bad(format!("metadata '{k}' is not a number")))
    };
    let parse_json = |k: &str| -> Result<serde_json::Value> {
        serde_json::from_str(get(k)?).map_err(|e| bad(format!("metadata '{k}': {e}")))
    };
    let config = Config::from_json(&parse_json("config")?).map_err(|e| bad(e.to_string()))?;
    let train = parse_json("train")?;
    let field = |k: &str| train.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let req_u64 = |k: &str| {
        field(k)
            .as_u64()
            .ok_or_else(|| bad(format!("train state has no integer '{k}'")))
    };
    let opt_usize = |k: &str| field(k).as_u64().map(|x| x as usize);
    let run = RunSettings {
        seed: req_u64("seed")?,
        batch_size: req_u64("batch_size")? as usize,
        lr: field("lr")
            .as_f64()
            .ok_or_else(|| bad("train state has no 'lr'".into()))?,
        patience: req_u64("patience")? as usize,
        limit: opt_usize("limit"),
        val_limit: opt_usize("val_limit"),
        // checkpoints from before datasets, shifts and decay were: MNIST, none
        dataset: match field("dataset").as_str() {
            None => Dataset::Mnist,
            Some(name) => Dataset::from_name(name).map_err(|e| bad(format!("train state: {e}")))?,
        },
        shift: opt_usize("shift").unwrap_or(0),
        lr_decay: field("lr_decay").as_f64().unwrap_or(1.0),
        lr_decay_steps: field("lr_decay_steps").as_u64().unwrap_or(DEFAULT_DECAY_STEPS),
    };
    let state = TrainState {
        run,
        epoch: num("epoch")? as usize,
        step: num("step")?,
        best_val_loss: field("best_val_loss").as_f64(),
        bad_epochs: req_u64("bad_epochs")? as usize,
        partial: match field("partial") {
            serde_json::Value::Null => None,
            p => Some(EpochProgress::from_json(&p).ok_or_else(|| bad("train state: malformed 'partial'".into()))?),
        },
    };
    let history = match meta.get("metrics") {
        None => vec![],
        Some(_) => match parse_json("metrics")? {
            serde_json::Value::Array(a) => a,
            _ => return Err(bad("metadata 'metrics' is not a list".into())),
        },
    };
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("tensor '{name}' is missing")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("tensor '{name}' is {:?}, expected F32", t.dtype())));
        }
        if t.shape() != shape {
            return Err(bad(format!(
                "tensor '{name}' has shape {:?}, the config needs {shape:?}",
                t.shape()
            )));
        }
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("tensor '{name}' holds a non-finite value at index {i}")));
        }
        Ok(v)
    };
    let specs = config.param_specs();
    let group = |prefix: &str| -> Result<Vec<Vec<f32>>> {
        specs
            .iter()
            .map(|s| read(&format!("{prefix}{}", s.name), &s.shape))
            .collect()
    };
    Ok(Checkpoint {
        params: group("")?,
        adam_m: group("adam.m.")?,
        adam_v: group("adam.v.")?,
        config,
        state,
        history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_counts_epochs_without_a_better_validation_loss() {
        let mut s = TrainState::start(RunSettings {
            dataset: crate::config::Dataset::Mnist,
            seed: 1,
            batch_size: 1,
            lr: 1e-3,
            lr_decay: 1.0,
            lr_decay_steps: 2000,
            shift: 0,
            patience: 2,
            limit: None,
            val_limit: None,
        });
        let seen: Vec<(bool, bool)> = [1.0, 0.5, 0.5, 0.7, 0.4, 0.6, 0.6]
            .iter()
            .map(|&l| (s.record_val_loss(l), s.should_stop()))
            .collect();
        // equal is not better; two bad epochs in a row stop; a better one resets the count
        assert_eq!(
            seen,
            [
                (true, false),
                (true, false),
                (false, false),
                (false, true),
                (true, false),
                (false, false),
                (false, true)
            ]
        );
        assert_eq!(s.best_val_loss, Some(0.4));
        s.run.patience = 0;
        assert!(!s.should_stop(), "patience 0 never stops");
    }
}
