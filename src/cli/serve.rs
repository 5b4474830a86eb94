//! `capsnet serve`: the capsule explorer's page and API.

use capsnet::config::Dataset;
use capsnet::data::{self, Which};
use capsnet::{Error, Result};

use super::args::*;
use super::device::{Selected, select};

pub fn run(a: ServeArgs) -> Result<()> {
    if !(a.threshold.is_finite() && (0.0..=1.0).contains(&a.threshold)) {
        return Err(Error::msg(format!(
            "--threshold must be between 0 and 1 (a capsule length), got {}",
            a.threshold
        )));
    }
    if a.host.trim().is_empty() {
        return Err(Error::msg(
            "--host is empty: give an address such as 127.0.0.1 or 0.0.0.0",
        ));
    }
    if let Some(n) = a.gallery_limit
        && !(1..=10_000).contains(&n)
    {
        return Err(Error::msg(format!(
            "--gallery-limit must be between 1 and 10000, got {n}"
        )));
    }
    let ck = capsnet::checkpoint::load(&a.checkpoint)?;
    // the gallery needs the test set; without it the page still works, and says why it has none
    let test_set = data::load(&a.data.data, Which::Test)
        .and_then(|s| {
            capsnet::train::check_side(&ck.config, ck.state.run.dataset, &a.checkpoint)?;
            Ok(s)
        })
        .map(|s| match a.gallery_limit {
            Some(n) if n < s.len() => s.slice(0..n),
            _ => s,
        })
        .map_err(|e| e.to_string());
    if let Err(why) = &test_set {
        eprintln!("note: no gallery of test errors: {why}");
    }
    if ck.state.run.dataset == Dataset::MultiMnist {
        eprintln!("note: a MultiMNIST model: the page shows the two longest capsules' reconstructions");
    }
    let sel = select(a.device, &a.kernels)?;
    let opts = |name: String| capsnet::serve::Options {
        host: a.host.clone(),
        port: a.port,
        threshold: a.threshold,
        checkpoint: a.checkpoint.clone(),
        test_set: test_set.clone(),
        backend_name: name,
    };
    with_backend!(sel, |be| {
        let name = capsnet::backend::Core::name(&be);
        capsnet::serve::run(be, &ck, opts(name))
    })
}
