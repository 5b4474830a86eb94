//! Checkpoints as safetensors files, readable by PyTorch (`safetensors.torch.load_file`) and numpy.
//!
//! Tensors (F32): every parameter under its name in [`Config::param_specs`] (e.g. `conv1.weight`,
//! [9, 9, 1, 256] HWIO), then the Adam moments as `adam.m.<name>` and `adam.v.<name>`.
//! Metadata (strings): `format` = `capsnet/1`, `epoch` (completed epochs), `step` (Adam updates),
//! `config` (the model config as JSON), `train` (seed, batch size, learning rate, early-stopping
//! state and data limits, as JSON), `metrics` (the run's history) and `sha256` (every tensor's data,
//! as `{name: hex digest}`, verified on every load). Files are written to a temporary name and renamed.
//!
//! A weights-only file (`capsnet export`) has no Adam moments (`content` = `weights`): eval, predict
//! and figures read it, training cannot resume from it. With `layout` = `pytorch` its tensors carry
//! the names and layouts of the PyTorch CapsNet in benches/capsnet_torch_bench.py (OIHW convolutions,
//! `[out, in]` linear layers), so `model.load_state_dict(safetensors.torch.load_file(F))` takes it.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::{Config, DEFAULT_DECAY_STEPS, Dataset, RunSettings};
use crate::error::write_atomic;
use crate::{Error, Result};

pub const FORMAT: &str = "capsnet/1";
/// The run directory's checkpoints: the latest state, and the one of the lowest validation loss.
pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";

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
    /// The epochs the run was started (or last resumed) to reach: a resume without --epochs goes on
    /// to it. None in checkpoints from before it was stored.
    pub target_epochs: Option<usize>,
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
            target_epochs: None,
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
            "epochs": self.target_epochs,
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

impl Checkpoint {
    /// Whether it holds Adam's moments (a training checkpoint; a weights-only file does not).
    pub fn has_optimizer(&self) -> bool {
        !self.adam_m.is_empty()
    }

    /// The same model without its optimiser state: what `capsnet export` writes.
    pub fn weights_only(mut self) -> Checkpoint {
        self.adam_m.clear();
        self.adam_v.clear();
        self
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// How a file's tensors are named and laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// capsnet's own: HWIO convolutions, `[in, out]` linear layers, names from `Config::param_specs`.
    Capsnet,
    /// The PyTorch CapsNet's (benches/capsnet_torch_bench.py): OIHW convolutions, `[out, in]` linear
    /// layers, its module names. W is `[1152, 10, 16, 8]` in both, its capsules in NHWC order.
    Pytorch,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Capsnet => "capsnet",
            Layout::Pytorch => "pytorch",
        }
    }

    /// The name, the permutation of capsnet's axes, of parameter `name` in this layout.
    fn param(self, name: &str, rank: usize) -> (String, Vec<usize>) {
        if self == Layout::Capsnet {
            return (name.to_string(), (0..rank).collect());
        }
        let renamed = match name {
            "primary.weight" => "conv2.weight".to_string(),
            "primary.bias" => "conv2.bias".to_string(),
            "digit.W" => "W".to_string(),
            n => n.strip_prefix("decoder.").unwrap_or(n).to_string(),
        };
        let perm = match (name.ends_with(".weight"), rank) {
            (true, 4) => vec![3, 2, 0, 1], // HWIO -> OIHW
            (true, 2) => vec![1, 0],       // [in, out] -> [out, in]
            _ => (0..rank).collect(),
        };
        (renamed, perm)
    }
}

/// `data` of row-major `shape` with its axes reordered: axis k of the result is axis `perm[k]`.
fn permute(data: &[f32], shape: &[usize], perm: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    if perm.iter().enumerate().all(|(k, &p)| k == p) {
        return (data.to_vec(), out_shape);
    }
    let mut strides = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..data.len() {
        out.push(data[idx.iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum::<usize>()]);
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < out_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    (out, out_shape)
}

/// The inverse of a permutation.
fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (k, &p) in perm.iter().enumerate() {
        inv[p] = k;
    }
    inv
}

/// Writes `ck` in capsnet's layout: with its Adam moments when it has them (a training checkpoint),
/// weights only when it has none.
pub fn save(path: &Path, ck: &Checkpoint) -> Result<()> {
    save_as(path, ck, Layout::Capsnet)
}

/// Writes `ck` in `layout` (a PyTorch-layout file holds the weights only).
pub fn save_as(path: &Path, ck: &Checkpoint, layout: Layout) -> Result<()> {
    let specs = ck.config.param_specs();
    let with_adam = ck.has_optimizer() && layout == Layout::Capsnet;
    let groups: &[(&str, &Vec<Vec<f32>>)] = if with_adam {
        &[("", &ck.params), ("adam.m.", &ck.adam_m), ("adam.v.", &ck.adam_v)]
    } else {
        &[("", &ck.params)]
    };
    let mut named = vec![];
    let mut names = serde_json::Map::new();
    for &(prefix, values) in groups {
        if values.len() != specs.len() {
            return Err(Error::file(
                path,
                format!("{} {prefix}tensors for {} parameters", values.len(), specs.len()),
            ));
        }
        for (spec, v) in specs.iter().zip(values.iter()) {
            let (name, perm) = layout.param(spec.name, spec.shape.len());
            let (data, shape) = permute(v, &spec.shape, &perm);
            if prefix.is_empty() && layout != Layout::Capsnet {
                names.insert(spec.name.to_string(), json!(name));
            }
            named.push((format!("{prefix}{name}"), shape, to_bytes(&data)));
        }
    }
    let sums: serde_json::Map<String, serde_json::Value> = named
        .iter()
        .map(|(n, _, b)| (n.clone(), json!(sha256_hex(b))))
        .collect();
    let views = named
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::file(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        (
            "content".to_string(),
            if with_adam { "training" } else { "weights" }.to_string(),
        ),
        ("layout".to_string(), layout.name().to_string()),
        ("epoch".to_string(), ck.state.epoch.to_string()),
        ("step".to_string(), ck.state.step.to_string()),
        ("config".to_string(), ck.config.to_json().to_string()),
        ("train".to_string(), ck.state.to_json().to_string()),
        (
            "metrics".to_string(),
            serde_json::Value::Array(ck.history.clone()).to_string(),
        ),
        ("sha256".to_string(), serde_json::Value::Object(sums).to_string()),
    ]);
    if layout != Layout::Capsnet {
        meta.insert("names".to_string(), serde_json::Value::Object(names).to_string());
    }
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
    if path.is_dir() {
        let inside: Vec<String> = [BEST, LAST]
            .iter()
            .filter(|f| path.join(f).is_file())
            .map(|f| path.join(f).display().to_string())
            .collect();
        let hint = match inside.first() {
            Some(f) => format!(", such as {f}"),
            None => String::new(),
        };
        return Err(Error::file(
            path,
            format!("is a directory; name a checkpoint file in it{hint}"),
        ));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| Error::file(path, format!("cannot read checkpoint: {}", crate::error::io_words(&e))))?;
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
        target_epochs: opt_usize("epochs"),
    };
    let history = match meta.get("metrics") {
        None => vec![],
        Some(_) => match parse_json("metrics")? {
            serde_json::Value::Array(a) => a,
            _ => return Err(bad("metadata 'metrics' is not a list".into())),
        },
    };
    let layout = match meta.get("layout").map(String::as_str) {
        None | Some("capsnet") => Layout::Capsnet,
        Some("pytorch") => Layout::Pytorch,
        Some(other) => return Err(bad(format!("metadata 'layout' is '{other}', not capsnet or pytorch"))),
    };
    // files from before checksums carry none: read as they are
    let sums = match meta.get("sha256") {
        None => None,
        Some(_) => Some(parse_json("sha256")?),
    };
    let read = |prefix: &str, param: &str, own_shape: &[usize]| -> Result<Vec<f32>> {
        let (stored, perm) = layout.param(param, own_shape.len());
        let name = format!("{prefix}{stored}");
        let shape: Vec<usize> = perm.iter().map(|&p| own_shape[p]).collect();
        let t = st
            .tensor(&name)
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
        if let Some(sums) = &sums {
            let Some(want) = sums.get(&name).and_then(|v| v.as_str()) else {
                return Err(bad(format!("metadata 'sha256' has no checksum for tensor '{name}'")));
            };
            if sha256_hex(t.data()) != want {
                return Err(Error::file(
                    path,
                    format!(
                        "damaged: the data of tensor '{name}' does not match the SHA-256 stored with it (the file was changed after it was written){}",
                        sibling_hint(path)
                    ),
                ));
            }
        }
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("tensor '{name}' holds a non-finite value at index {i}")));
        }
        Ok(permute(&v, &shape, &inverse(&perm)).0)
    };
    let specs = config.param_specs();
    let group =
        |prefix: &str| -> Result<Vec<Vec<f32>>> { specs.iter().map(|s| read(prefix, s.name, &s.shape)).collect() };
    // a weights-only file (capsnet export) has no Adam moments
    let weights_only = meta.get("content").is_some_and(|c| c == "weights");
    let (adam_m, adam_v) = if weights_only {
        (vec![], vec![])
    } else {
        (group("adam.m.")?, group("adam.v.")?)
    };
    Ok(Checkpoint {
        params: group("")?,
        adam_m,
        adam_v,
        config,
        state,
        history,
    })
}

/// For a damaged run checkpoint: whether the other one beside it is sound, and how to use it.
fn sibling_hint(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let other = match name {
        LAST => BEST,
        BEST => LAST,
        _ => return String::new(),
    };
    let sibling = path.with_file_name(other);
    if !sibling.is_file() {
        return String::new();
    }
    match load(&sibling) {
        Ok(ck) => format!(
            "; {} beside it is sound (epoch {}, step {}){}",
            other,
            ck.state.epoch,
            ck.state.step,
            if name == LAST {
                format!(": to continue the run from it, copy it over {LAST} and --resume")
            } else {
                String::new()
            }
        ),
        Err(_) => format!("; {other} beside it is damaged too"),
    }
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
