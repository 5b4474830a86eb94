//! MNIST: the four IDX files, raw or gzipped, checked before use, and an optional download.
//!
//! Why not the `mnist` crate: it reads only uncompressed files under fixed names and panics (unwrap,
//! assert) on a missing or malformed file, so it would have to be guarded by a check that already
//! reads and validates every byte (magic, counts, sizes, labels 0-9). Once that check has run, the
//! data is parsed; reading it a second time through the crate would add nothing, and gzipped files
//! (the common distribution) would still need this reader. So this module is the one reader.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::write_atomic;
use crate::{Error, Result};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// MNIST's images are this many pixels on a side.
pub const MNIST_SIDE: usize = 28;
pub const MNIST_PIXELS: usize = MNIST_SIDE * MNIST_SIDE;
const IMAGE_PIXELS: usize = MNIST_PIXELS;

/// The last this-many training images are the validation set (never the test set).
pub const VALIDATION_IMAGES: usize = 5000;

/// (file name, SHA-256 of the decompressed bytes).
pub const FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

/// Public mirrors serving `<name>.gz`; `CAPSNET_MNIST_MIRROR` (comma-separated base URLs) replaces them.
pub const MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// Images (28x28 bytes each, row-major) and their labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Images `range` of this split as a new split.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Split {
        Split {
            images: self.images[range.start * IMAGE_PIXELS..range.end * IMAGE_PIXELS].to_vec(),
            labels: self.labels[range].to_vec(),
        }
    }
    /// Pixels scaled to [0, 1] and labels of the images at `idx`.
    pub fn batch<E: crate::float::Float>(&self, idx: &[usize]) -> (Vec<E>, Vec<u32>) {
        let mut x = Vec::with_capacity(idx.len() * IMAGE_PIXELS);
        for &i in idx {
            x.extend(
                self.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
                    .iter()
                    .map(|&p| E::from_f64(p as f64 / 255.0)),
            );
        }
        (x, idx.iter().map(|&i| self.labels[i] as u32).collect())
    }
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The random shift (dx, dy) of training image `index` in epoch `epoch` (0-based), each uniform in
/// −max..=max: a function of (seed, epoch, index) only, so a resumed run shifts every image as an
/// uninterrupted one does, whatever the batch it falls in.
pub fn shift_of(seed: u64, epoch: usize, index: usize, max: usize) -> (i32, i32) {
    if max == 0 {
        return (0, 0);
    }
    let h = mix(mix(mix(seed) ^ epoch as u64) ^ index as u64);
    let n = 2 * max as u64 + 1;
    ((h % n) as i32 - max as i32, ((h >> 32) % n) as i32 - max as i32)
}

/// Moves each side x side image of `x` by its (dx, dy) (right and down positive), filling the
/// uncovered pixels with 0 (the background): the paper's augmentation.
pub fn shift_images<E: Copy + Default>(x: &mut [E], side: usize, shifts: &[(i32, i32)]) {
    let px = side * side;
    debug_assert_eq!(x.len(), shifts.len() * px);
    let mut tmp = vec![E::default(); px];
    for (img, &(dx, dy)) in x.chunks_mut(px).zip(shifts) {
        if (dx, dy) == (0, 0) {
            continue;
        }
        tmp.fill(E::default());
        for y in 0..side as i32 {
            let sy = y - dy;
            if !(0..side as i32).contains(&sy) {
                continue;
            }
            for xx in 0..side as i32 {
                let sx = xx - dx;
                if (0..side as i32).contains(&sx) {
                    tmp[(y * side as i32 + xx) as usize] = img[(sy * side as i32 + sx) as usize];
                }
            }
        }
        img.copy_from_slice(&tmp);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Train,
    Test,
}

impl Which {
    fn stems(self) -> (&'static str, &'static str) {
        match self {
            Which::Train => (FILES[0].0, FILES[1].0),
            Which::Test => (FILES[2].0, FILES[3].0),
        }
    }
}

fn hint(dir: &Path) -> String {
    format!(
        "put the MNIST files there, point --data or CAPSNET_DATA at them, or run `capsnet download --data {}`",
        dir.display()
    )
}

fn not_a_directory(dir: &Path) -> Error {
    Error::file(
        dir,
        "is a file, not a directory: --data and CAPSNET_DATA name the directory that holds the four MNIST files",
    )
}

/// `dir/name`, else `dir/name.gz`.
pub fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// Loads and checks the training or the test split from `dir`.
pub fn load(dir: &Path, which: Which) -> Result<Split> {
    if dir.is_file() {
        return Err(not_a_directory(dir));
    }
    if !dir.is_dir() {
        return Err(Error::file(dir, format!("MNIST directory not found; {}", hint(dir))));
    }
    let (img_name, lbl_name) = which.stems();
    let locate = |name: &str| {
        find(dir, name).ok_or_else(|| Error::file(dir, format!("{name} (or {name}.gz) not found; {}", hint(dir))))
    };
    let (img_path, lbl_path) = (locate(img_name)?, locate(lbl_name)?);
    let images = parse_images(&img_path, &read_maybe_gz(&img_path)?)?;
    let labels = parse_labels(&lbl_path, &read_maybe_gz(&lbl_path)?)?;
    let n = images.len() / IMAGE_PIXELS;
    if n != labels.len() {
        return Err(Error::file(
            &img_path,
            format!("{n} images, but {} has {} labels", lbl_path.display(), labels.len()),
        ));
    }
    Ok(Split { images, labels })
}

/// The file's bytes, decompressed when they start with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    gunzip_if_gz(path, raw)
}

fn gunzip_if_gz(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .map_err(|e| Error::file(path, format!("not a valid gzip file (truncated or corrupt?): {e}")))?;
    Ok(out)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn check_magic(path: &Path, bytes: &[u8], header: usize, magic: u32, what: &str) -> Result<usize> {
    if bytes.len() < header {
        return Err(Error::file(
            path,
            format!(
                "truncated: {} bytes, shorter than the {header}-byte IDX header",
                bytes.len()
            ),
        ));
    }
    let m = be_u32(bytes, 0);
    if m != magic {
        return Err(Error::file(
            path,
            format!("wrong magic number 0x{m:08x}, expected 0x{magic:08x} (IDX {what})"),
        ));
    }
    Ok(be_u32(bytes, 4) as usize)
}

fn check_size(path: &Path, bytes: &[u8], header: usize, n: usize, item: usize, what: &str) -> Result<()> {
    let expected = header + n * item;
    if bytes.len() < expected {
        return Err(Error::file(
            path,
            format!(
                "truncated: {} bytes, but the header announces {n} {what} ({expected} bytes)",
                bytes.len()
            ),
        ));
    }
    if bytes.len() > expected {
        return Err(Error::file(
            path,
            format!(
                "{} bytes after the {n} {what} the header announces",
                bytes.len() - expected
            ),
        ));
    }
    Ok(())
}

/// Checks an IDX image file (magic 0x803, 28x28, exact size) and returns its pixels.
pub fn parse_images(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let n = check_magic(path, bytes, 16, IMAGES_MAGIC, "images")?;
    let (rows, cols) = (be_u32(bytes, 8), be_u32(bytes, 12));
    if (rows, cols) != (28, 28) {
        return Err(Error::file(path, format!("images are {rows}x{cols}, expected 28x28")));
    }
    check_size(path, bytes, 16, n, IMAGE_PIXELS, "images")?;
    Ok(bytes[16..].to_vec())
}

/// Checks an IDX label file (magic 0x801, exact size, every label 0-9) and returns its labels.
pub fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let n = check_magic(path, bytes, 8, LABELS_MAGIC, "labels")?;
    check_size(path, bytes, 8, n, 1, "labels")?;
    if let Some((i, l)) = bytes[8..].iter().enumerate().find(|(_, l)| **l > 9) {
        return Err(Error::file(path, format!("label {l} at index {i} is not a digit 0-9")));
    }
    Ok(bytes[8..].to_vec())
}

/// The training split divided into (training, validation): the last [`VALIDATION_IMAGES`] images
/// validate. `limit` keeps the first `limit` training images, `val_limit` the first validation ones.
pub fn train_val(all: Split, limit: Option<usize>, val_limit: Option<usize>) -> Result<(Split, Split)> {
    let n = all.len();
    if n <= VALIDATION_IMAGES {
        return Err(Error::msg(format!(
            "the training files hold {n} images; more than {VALIDATION_IMAGES} are needed (the last {VALIDATION_IMAGES} validate)"
        )));
    }
    let n_train = n - VALIDATION_IMAGES;
    // a limit above what there is would silently train on less than asked
    if let Some(l) = limit.filter(|&l| l > n_train) {
        return Err(Error::msg(format!("--limit {l} exceeds the {n_train} training images")));
    }
    if let Some(l) = val_limit.filter(|&l| l > VALIDATION_IMAGES) {
        return Err(Error::msg(format!(
            "--val-limit {l} exceeds the {VALIDATION_IMAGES} validation images"
        )));
    }
    let take = limit.unwrap_or(n_train);
    let val_take = val_limit.unwrap_or(VALIDATION_IMAGES);
    Ok((all.slice(0..take), all.slice(n_train..n_train + val_take)))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The mirrors to try: `CAPSNET_MNIST_MIRROR` if set, else [`MIRRORS`].
pub fn mirrors() -> Vec<String> {
    match std::env::var("CAPSNET_MNIST_MIRROR") {
        Ok(s) if !s.trim().is_empty() => s.split(',').map(|m| m.trim().to_string()).collect(),
        _ => MIRRORS.iter().map(|s| s.to_string()).collect(),
    }
}

/// Why one mirror did not give a file: it could not be reached (`network`), or it answered with
/// something other than the right file (an HTTP error, bad gzip, a wrong checksum).
struct Failure {
    network: bool,
    why: String,
}

impl Failure {
    fn network(why: impl ToString) -> Self {
        Failure {
            network: true,
            why: why.to_string(),
        }
    }
    fn answered(why: impl ToString) -> Self {
        Failure {
            network: false,
            why: why.to_string(),
        }
    }
}

fn fetch(agent: &ureq::Agent, url: &str) -> std::result::Result<Vec<u8>, Failure> {
    let mut resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => Failure::answered(format!("HTTP {code}")),
        other => Failure::network(other),
    })?;
    resp.body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .map_err(Failure::network)
}

/// Downloads whichever of the four files `dir` lacks (or holds with the wrong content), trying each
/// mirror in turn and keeping a file only when the SHA-256 of its decompressed bytes matches.
/// Files are written atomically as `<name>.gz`. Returns what was done, one line per file.
pub fn download(dir: &Path, mirrors: &[String]) -> Result<Vec<String>> {
    if dir.is_file() {
        return Err(not_a_directory(dir));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create directory: {e}")))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut report = vec![];
    for (name, sha) in FILES {
        if let Some(p) = find(dir, name)
            && read_maybe_gz(&p).is_ok_and(|b| sha256_hex(&b) == sha)
        {
            report.push(format!("{}: present, checksum ok", p.display()));
            continue;
        }
        let mut failures = vec![];
        let mut done = false;
        for base in mirrors {
            let url = format!("{}/{name}.gz", base.trim_end_matches('/'));
            match fetch(&agent, &url).and_then(|gz| {
                let raw = gunzip_if_gz(Path::new(&url), gz.clone()).map_err(Failure::answered)?;
                let got = sha256_hex(&raw);
                if got != sha {
                    Err(Failure::answered(format!("SHA-256 {got} does not match {sha}")))
                } else {
                    Ok(gz)
                }
            }) {
                Ok(gz) => {
                    let target = dir.join(format!("{name}.gz"));
                    write_atomic(&target, &gz)?;
                    report.push(format!("{}: downloaded from {url}, checksum ok", target.display()));
                    done = true;
                    break;
                }
                Err(f) => failures.push(f),
            }
        }
        if !done {
            // the network is to blame only when no mirror answered at all
            let why = if failures.iter().all(|f| f.network) {
                "no mirror could be reached (is there a network connection?)"
            } else {
                "no mirror gave the file with its published checksum"
            };
            let tried: Vec<String> = mirrors
                .iter()
                .zip(&failures)
                .map(|(m, f)| format!("{}/{name}.gz: {}", m.trim_end_matches('/'), f.why))
                .collect();
            return Err(Error::msg(format!(
                "cannot download {name}: {why}; tried:\n  {}\nor copy the four MNIST files into {}",
                tried.join("\n  "),
                dir.display()
            )));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_are_seeded_bounded_and_cover_the_range() {
        let draws: Vec<(i32, i32)> = (0..5000).map(|i| shift_of(42, 3, i, 2)).collect();
        assert_eq!(draws, (0..5000).map(|i| shift_of(42, 3, i, 2)).collect::<Vec<_>>());
        assert!(draws.iter().all(|&(x, y)| x.abs() <= 2 && y.abs() <= 2));
        // all 25 shifts occur, each about 1/25 of the time
        for dx in -2..=2 {
            for dy in -2..=2 {
                let n = draws.iter().filter(|&&d| d == (dx, dy)).count();
                assert!((140..=260).contains(&n), "({dx}, {dy}) drawn {n} times of 5000");
            }
        }
        // another epoch or seed, other shifts; no shift at 0
        let other: Vec<_> = (0..5000).map(|i| shift_of(42, 4, i, 2)).collect();
        assert!(draws.iter().zip(&other).filter(|(a, b)| a != b).count() > 4000);
        assert_ne!(draws, (0..5000).map(|i| shift_of(43, 3, i, 2)).collect::<Vec<_>>());
        assert_eq!(shift_of(42, 3, 7, 0), (0, 0));
    }

    #[test]
    fn a_shift_moves_the_pixels_and_pads_with_zeros() {
        let side = 5;
        let img: Vec<u8> = (1..=25).collect();
        let mut x = [img.clone(), img.clone(), img.clone()].concat();
        shift_images(&mut x, side, &[(0, 0), (2, 1), (-1, -2)]);
        assert_eq!(&x[..25], &img[..]);
        let moved = &x[25..50];
        for y in 0..side {
            for c in 0..side {
                let want = if y >= 1 && c >= 2 {
                    img[(y - 1) * side + c - 2]
                } else {
                    0
                };
                assert_eq!(moved[y * side + c], want, "right 2, down 1 at ({c}, {y})");
            }
        }
        let back = &x[50..];
        for y in 0..side {
            for c in 0..side {
                let want = if y + 2 < side && c + 1 < side {
                    img[(y + 2) * side + c + 1]
                } else {
                    0
                };
                assert_eq!(back[y * side + c], want, "left 1, up 2 at ({c}, {y})");
            }
        }
    }
}
