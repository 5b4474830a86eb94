//! Any image file → the model's input, prepared as MNIST's digits were made (LeCun et al.): one
//! light digit on a dark background, its bounding box scaled to fit 20x20 keeping the aspect
//! ratio, centred by its centre of mass in 28x28.
//!
//! Steps, for an image of any size and colour:
//! 1. decode (PNG, JPEG, GIF, BMP, WebP, PNM), turned as its EXIF orientation says; transparency
//!    is laid over black when the visible pixels are light (white ink on a transparent sheet), else
//!    over white; grey = the luma of the colour (Rec. 709 weights, as `image` converts);
//! 2. the background is the median of the border pixels; when it is lighter than mid-grey the
//!    image is a dark digit on light paper and is inverted;
//! 3. illumination: where the border is even, its level is subtracted; where it is not (a shadow
//!    band, a gradient of light, noise: a spread over [`UNEVEN`]), the background's shape is
//!    estimated by a grey opening (minimum then maximum filter) a quarter of the image wide, which
//!    strokes do not survive, and subtracted;
//! 4. the ink: Otsu's threshold of a lightly smoothed copy, so noise averages out; its connected
//!    blobs; the digit is the blob with the most ink (a band along the image's edge, a shadow, only
//!    when nothing else has a fifth of its ink), with the blobs near it (a broken stroke); its box is
//!    widened to the faint edges of the strokes. Specks, shadows and background apart from the digit
//!    stay out of the box;
//! 5. contrast: the ink's level (99th percentile of the blobs) goes to 1, the background's noise
//!    (90th percentile of the border) to 0, clamped;
//! 6. the box scaled to fit a 20x20 square (MNIST's digit box; less for a model under 28x28),
//!    keeping its aspect ratio, with a triangle filter widened to the scale when shrinking, so a
//!    photo is averaged rather than sampled; then stretched again so its brightest pixel is 1;
//! 7. placed in the side x side canvas with its centre of mass at the centre, rounded to a whole
//!    pixel (and kept inside the canvas).
//!
//! An image of the model's size (28x28 for MNIST) gets the same preparation, so an off-centre digit
//! is centred; MNIST's own digits come out nearly as they were (they are already cropped, scaled
//! and centred). [`Preparation::Raw`] takes such an image as it is, after steps 1 and 2 only: the
//! pixels eval reads. Memory: the decoded image, a few grey copies and the cropped box.

use std::path::Path;

use image::{GrayImage, ImageBuffer, ImageReader, Luma};

use crate::{Error, Result};

/// Largest width or height read (a 48-megapixel photo is 8000 wide).
pub const MAX_SIDE: u32 = 8192;
/// The largest image file read (a camera's largest JPEGs are a few tens of MiB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Memory the decoder may allocate for one image.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// Pixels above this (after contrast, in [0, 1]) beside the digit's blobs belong to its box: the
/// faint edges of its strokes.
pub const FAINT: f32 = 0.05;
/// An edge of the image whose levels spread more than this (10th to 90th percentile) has an uneven
/// background: a shadow, a gradient of light, or noise.
pub const UNEVEN: f32 = 0.1;
/// Under this separation of ink and background (Otsu's η) a picture may hold no digit: measured on
/// MNIST test digits as photos (shadows, gradients, noise; 1,000 images) at 0.80 or more, on pure
/// noise at 0.65.
pub const MIN_SEPARATION: f32 = 0.72;
/// Less contrast than this between the background and the ink is a blank image.
pub const MIN_CONTRAST: f32 = 0.1;

/// A grey image in [0, 1], row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

/// The model's input for one image, and what was done to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// side² pixels in [0, 1], light digit on dark.
    pub pixels: Vec<f32>,
    /// The image was dark on light and was inverted.
    pub inverted: bool,
    /// The image was already the model's size and was not cropped, scaled or centred.
    pub as_is: bool,
    /// How well ink and background part (Otsu's η, 0 to 1): 0.8 and more for a digit on paper,
    /// about 0.65 for noise; under [`MIN_SEPARATION`] the picture may hold no digit at all. 1 for an
    /// image taken as it is.
    pub separation: f32,
}

/// Reads and decodes `path` to grey, within [`MAX_SIDE`] and [`MAX_DECODE_BYTES`]. Every failure
/// names the file.
pub fn load_gray(path: &Path) -> Result<Gray> {
    let open_err = |e: std::io::Error| Error::file(path, format!("cannot read: {e}"));
    let meta = std::fs::metadata(path).map_err(open_err)?;
    if meta.is_dir() {
        return Err(Error::file(path, "is a directory, not an image"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::file(
            path,
            format!(
                "is {} MiB; image files over {} MiB are not read",
                meta.len() >> 20,
                MAX_FILE_BYTES >> 20
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(open_err)?;
    decode_gray(&bytes).map_err(|e| Error::file(path, e))
}

/// An image file's bytes decoded to grey, within [`MAX_SIDE`] and [`MAX_DECODE_BYTES`]; the error
/// says what is wrong with them (the caller names where they came from).
pub fn decode_gray(bytes: &[u8]) -> std::result::Result<Gray, String> {
    if bytes.is_empty() {
        return Err("is empty (0 bytes), not an image".into());
    }
    let not_image = |e: image::ImageError| format!("cannot decode the image: {e}");
    let reader = || {
        ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err("not an image in a known format (PNG, JPEG, GIF, BMP, WebP, PNM)".into());
    }
    let (w, h) = r.into_dimensions().map_err(not_image)?;
    if w == 0 || h == 0 {
        return Err(format!("the image is {w}x{h}: it has no pixels"));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!(
            "the image is {w}x{h}; at most {MAX_SIDE} pixels on a side are read (scale it down first)"
        ));
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    r.limits(limits);
    // a phone photo's pixels may be stored turned: its EXIF orientation says how to show them
    let mut decoder = r.into_decoder().map_err(not_image)?;
    let orientation =
        image::ImageDecoder::orientation(&mut decoder).unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(not_image)?;
    img.apply_orientation(orientation);
    let (w, h) = (img.width(), img.height());
    let la = img.to_luma_alpha8();
    drop(img);
    // transparency over the colour the visible pixels stand out from: black under light ink
    let (mut seen, mut light) = (0f64, 0f64);
    for p in la.pixels().filter(|p| p.0[1] < 255) {
        let a = p.0[1] as f64 / 255.0;
        seen += a;
        light += a * p.0[0] as f64 / 255.0;
    }
    let under = if seen > 0.0 && light / seen > 0.5 { 0.0 } else { 1.0 };
    let pixels = la
        .pixels()
        .map(|p| {
            let (l, a) = (p.0[0] as f64 / 255.0, p.0[1] as f64 / 255.0);
            // an opaque pixel is its grey level exactly (as MNIST's bytes / 255)
            if p.0[1] == 255 {
                l as f32
            } else {
                (l * a + under * (1.0 - a)) as f32
            }
        })
        .collect();
    Ok(Gray {
        width: w as usize,
        height: h as usize,
        pixels,
    })
}

fn median(mut xs: Vec<f32>) -> f32 {
    xs.sort_by(f32::total_cmp);
    xs[xs.len() / 2]
}

/// The `q`-quantile (0..1) of `xs` (not empty), from at most about a million evenly spaced samples.
fn quantile(xs: &[f32], q: f64) -> f32 {
    let step = (xs.len() / (1 << 20)).max(1);
    let mut sample: Vec<f32> = xs.iter().step_by(step).copied().collect();
    sample.sort_by(f32::total_cmp);
    sample[((sample.len() - 1) as f64 * q).round() as usize]
}

/// `img` (w x h) resized to `nw` x `nh` with a triangle filter (averaging when shrinking).
fn resized(img: &[f32], w: usize, h: usize, nw: usize, nh: usize) -> Vec<f32> {
    let buf: ImageBuffer<Luma<f32>, Vec<f32>> =
        ImageBuffer::from_raw(w as u32, h as u32, img.to_vec()).expect("w*h pixels");
    image::imageops::resize(&buf, nw as u32, nh as u32, image::imageops::FilterType::Triangle).into_raw()
}

/// A k-wide minimum (or maximum) filter along rows, then along columns; the window is clipped at
/// the edges.
fn rank_filter(img: &[f32], w: usize, h: usize, k: usize, max: bool) -> Vec<f32> {
    let pick = |a: f32, b: f32| if max { a.max(b) } else { a.min(b) };
    let r = k / 2;
    let pass = |src: &[f32], len: usize, lines: usize, at: &dyn Fn(usize, usize) -> usize| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for l in 0..lines {
            for i in 0..len {
                let (lo, hi) = (i.saturating_sub(r), (i + r).min(len - 1));
                out[at(l, i)] = (lo..=hi).map(|j| src[at(l, j)]).reduce(pick).expect("a window");
            }
        }
        out
    };
    let rows = pass(img, w, h, &|y, x| y * w + x);
    pass(&rows, h, w, &|x, y| y * w + x)
}

/// The mean over a (2r+1)-square window, clipped at the edges (running sums: any r costs the same).
fn box_blur(img: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let pass = |src: &[f32], len: usize, lines: usize, at: &dyn Fn(usize, usize) -> usize| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        let mut sums = vec![0f64; len + 1];
        for l in 0..lines {
            for i in 0..len {
                sums[i + 1] = sums[i] + src[at(l, i)] as f64;
            }
            for i in 0..len {
                let (lo, hi) = (i.saturating_sub(r), (i + r + 1).min(len));
                out[at(l, i)] = ((sums[hi] - sums[lo]) / (hi - lo) as f64) as f32;
            }
        }
        out
    };
    let rows = pass(img, w, h, &|y, x| y * w + x);
    pass(&rows, h, w, &|x, y| y * w + x)
}

/// Otsu's threshold of values in [0, 1]: the level that best parts them into two classes; and how
/// well it parts them (the between-class share of the variance, η: near 1 for ink on paper, about
/// 2/π for noise of one level).
fn otsu(xs: &[f32]) -> (f32, f32) {
    let mut hist = [0f64; 256];
    for &x in xs {
        hist[(x.clamp(0.0, 1.0) * 255.0).round() as usize] += 1.0;
    }
    let total: f64 = hist.iter().sum();
    let sum: f64 = hist.iter().enumerate().map(|(i, &n)| i as f64 * n).sum();
    let (mut below, mut below_sum, mut best, mut at) = (0f64, 0f64, -1f64, 0usize);
    for (i, &n) in hist.iter().enumerate() {
        below += n;
        below_sum += i as f64 * n;
        let above = total - below;
        if below == 0.0 || above == 0.0 {
            continue;
        }
        let d = below_sum / below - (sum - below_sum) / above;
        let between = below * above * d * d;
        if between > best {
            (best, at) = (between, i);
        }
    }
    let mean = sum / total;
    let var: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &n)| n * (i as f64 - mean).powi(2))
        .sum::<f64>();
    let eta = if var > 0.0 { best.max(0.0) / total / var } else { 0.0 };
    ((at as f32 + 0.5) / 255.0, eta as f32)
}

/// One connected stretch of ink (8-neighbours): its ink, bounding box, and whether it is a band
/// along the image's edge (it touches the edge and spans most of a side: a shadow, a table edge).
#[derive(Clone, Debug)]
struct Blob {
    mass: f64,
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
    edge_band: bool,
}

impl Blob {
    /// The gap between two boxes, in pixels along the wider axis (0 when they overlap).
    fn gap(&self, o: &Blob) -> usize {
        let dx = o.x0.saturating_sub(self.x1).max(self.x0.saturating_sub(o.x1));
        let dy = o.y0.saturating_sub(self.y1).max(self.y0.saturating_sub(o.y1));
        dx.max(dy)
    }
}

/// The connected stretches of `mask`, their ink summed from `weight`.
fn blobs(mask: &[bool], weight: &[f32], w: usize, h: usize) -> Vec<Blob> {
    let mut seen = vec![false; mask.len()];
    let mut out = vec![];
    let mut stack = vec![];
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut b = Blob {
            mass: 0.0,
            x0: usize::MAX,
            y0: usize::MAX,
            x1: 0,
            y1: 0,
            edge_band: false,
        };
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            b.mass += weight[i] as f64;
            (b.x0, b.y0, b.x1, b.y1) = (b.x0.min(x), b.y0.min(y), b.x1.max(x), b.y1.max(y));
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = ny * w + nx;
                    if mask[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let touches = b.x0 == 0 || b.y0 == 0 || b.x1 == w - 1 || b.y1 == h - 1;
        let spans = (b.x1 + 1 - b.x0) * 10 >= w * 7 || (b.y1 + 1 - b.y0) * 10 >= h * 7;
        b.edge_band = touches && spans;
        out.push(b);
    }
    out
}

/// The digit among the blobs: the one with the most ink, preferring those that are not bands along
/// the edge when one of them has a fifth of the ink; then every blob near it (the parts of a broken
/// stroke). Its bounding box (x0, y0, x1, y1), inclusive.
fn digit_box(found: &[Blob]) -> Option<(usize, usize, usize, usize)> {
    let most = found.iter().map(|b| b.mass).fold(0.0, f64::max);
    let inner = found
        .iter()
        .filter(|b| !b.edge_band && b.mass >= most / 5.0)
        .max_by(|a, b| a.mass.total_cmp(&b.mass));
    let main = inner.or_else(|| found.iter().max_by(|a, b| a.mass.total_cmp(&b.mass)))?;
    // the parts near the main blob itself (not near each other: noise must not chain into a box)
    let gap = ((main.x1 - main.x0).max(main.y1 - main.y0) * 3 / 20).max(2);
    let mut digit = main.clone();
    for b in found {
        if !b.edge_band && b.mass >= main.mass / 100.0 && main.gap(b) <= gap && !std::ptr::eq(b, main) {
            (digit.x0, digit.y0, digit.x1, digit.y1) = (
                digit.x0.min(b.x0),
                digit.y0.min(b.y0),
                digit.x1.max(b.x1),
                digit.y1.max(b.y1),
            );
        }
    }
    Some((digit.x0, digit.y0, digit.x1, digit.y1))
}

/// How [`prepare`] takes an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preparation {
    /// MNIST's preparation, at any size (the module's documentation).
    #[default]
    Full,
    /// An image of the model's size as it is (only inverted when dark on light): MNIST's own digits
    /// exactly as eval reads them. Other sizes get the full preparation.
    Raw,
}

/// The grey image `g` as the model's side x side input (the steps in the module's documentation).
/// A blank image (no contrast) is an error.
pub fn prepare(g: &Gray, side: usize, how: Preparation) -> Result<Prepared> {
    let (w, h) = (g.width, g.height);
    if w == 0 || h == 0 || g.pixels.len() != w * h {
        return Err(Error::msg(format!("a {w}x{h} image with {} pixels", g.pixels.len())));
    }
    if g.pixels.iter().any(|p| !p.is_finite()) {
        return Err(Error::msg("the image has pixels that are not numbers"));
    }
    let border_of = |img: &[f32]| -> Vec<f32> {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .filter(|&(x, y)| x == 0 || y == 0 || x == w - 1 || y == h - 1)
            .map(|(x, y)| img[y * w + x])
            .collect()
    };
    let paper = median(border_of(&g.pixels));
    let inverted = paper > 0.5;
    // the one working copy: ink bright on a dark background
    let mut ink = g.pixels.clone();
    if inverted {
        ink.iter_mut().for_each(|p| *p = 1.0 - *p);
    }
    let blank = || Error::msg("no digit found: the image is blank (no contrast between background and ink)");
    let bg = if inverted { 1.0 - paper } else { paper };
    if ink.iter().copied().fold(f32::MIN, f32::max) - bg < MIN_CONTRAST {
        return Err(blank());
    }
    if how == Preparation::Raw && w == side && h == side {
        return Ok(Prepared {
            pixels: ink,
            inverted,
            as_is: true,
            separation: 1.0,
        });
    }
    // the background: one level where the edge of the image is even; where it is not (a shadow, a
    // gradient of light, noise) its shape, as what a grey opening wider than any stroke leaves,
    // estimated on a copy at most 128 pixels on a side
    let edge = border_of(&ink);
    let uneven = quantile(&edge, 0.9) - quantile(&edge, 0.1) > UNEVEN;
    if uneven {
        let f = w.max(h).div_ceil(128);
        let (sw, sh) = (w.div_ceil(f), h.div_ceil(f));
        let small = resized(&ink, w, h, sw, sh);
        let k = (sw.max(sh) / 4) | 1;
        let opened = rank_filter(&rank_filter(&small, sw, sh, k, false), sw, sh, k, true);
        let smooth = box_blur(&opened, sw, sh, k / 4);
        let background = resized(&smooth, sw, sh, w, h);
        ink.iter_mut()
            .zip(&background)
            .for_each(|(p, b)| *p = (*p - b).max(0.0));
    } else {
        ink.iter_mut().for_each(|p| *p = (*p - bg).max(0.0));
    }
    // the ink: Otsu's threshold of a lightly smoothed copy (noise averages out), in connected blobs
    let r = (w.max(h) / 150).max(1);
    let smooth = box_blur(&ink, w, h, r);
    let peak = smooth.iter().copied().fold(0f32, f32::max);
    if peak < MIN_CONTRAST / 2.0 {
        return Err(blank());
    }
    let (t, eta) = otsu(&smooth.iter().map(|p| p / peak).collect::<Vec<_>>());
    let t = t * peak;
    let mask: Vec<bool> = smooth.iter().map(|&p| p > t).collect();
    let found = blobs(&mask, &smooth, w, h);
    let Some((bx0, by0, bx1, by1)) = digit_box(&found) else {
        return Err(blank());
    };
    // levels: the ink's (99th percentile under the mask) and the background's noise (90th
    // percentile along the edge) go to 1 and 0
    let on: Vec<f32> = ink.iter().zip(&mask).filter(|(_, m)| **m).map(|(p, _)| *p).collect();
    let level = quantile(&on, 0.99);
    let floor = if uneven { quantile(&border_of(&ink), 0.9) } else { 0.0 };
    if level - floor < MIN_CONTRAST {
        return Err(Error::msg(
            "no digit found: no ink stands out from the background's noise",
        ));
    }
    ink.iter_mut()
        .for_each(|p| *p = ((*p - floor) / (level - floor)).clamp(0.0, 1.0));
    // the box of the digit's blobs, widened by the smoothing and narrowed again to its faint edges
    let pad = 2 * r + 1;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in by0.saturating_sub(pad)..=(by1 + pad).min(h - 1) {
        for x in bx0.saturating_sub(pad)..=(bx1 + pad).min(w - 1) {
            if ink[y * w + x] > FAINT {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    if x0 > x1 {
        return Err(blank());
    }
    let (bw, bh) = (x1 + 1 - x0, y1 + 1 - y0);
    let crop: Vec<f32> = (y0..=y1)
        .flat_map(|y| ink[y * w + x0..=y * w + x1].iter().copied())
        .collect();
    drop(ink);
    // MNIST's digits fit a 20x20 box; a model for smaller images gets a proportionally smaller one
    let fit = 20.min(((side * 20) as f64 / 28.0).round().max(1.0) as usize);
    let scale = fit as f64 / bw.max(bh) as f64;
    let (sw, sh) = (
        ((bw as f64 * scale).round() as usize).clamp(1, fit),
        ((bh as f64 * scale).round() as usize).clamp(1, fit),
    );
    let mut small: Vec<f32> = if (sw, sh) == (bw, bh) {
        crop
    } else {
        resized(&crop, bw, bh, sw, sh)
            .into_iter()
            .map(|p| p.clamp(0.0, 1.0))
            .collect()
    };
    // thin strokes averaged down come out faint: MNIST's strokes reach full ink
    let peak = small.iter().copied().fold(0f32, f32::max);
    if peak > 0.0 {
        small.iter_mut().for_each(|p| *p /= peak);
    }
    // centre of mass (pixel centres at +0.5) onto the canvas centre
    let mass: f64 = small.iter().map(|&p| p as f64).sum();
    let (mut cx, mut cy) = (sw as f64 / 2.0, sh as f64 / 2.0);
    if mass > 0.0 {
        cx = small
            .iter()
            .enumerate()
            .map(|(i, &p)| ((i % sw) as f64 + 0.5) * p as f64)
            .sum::<f64>()
            / mass;
        cy = small
            .iter()
            .enumerate()
            .map(|(i, &p)| ((i / sw) as f64 + 0.5) * p as f64)
            .sum::<f64>()
            / mass;
    }
    let half = side as f64 / 2.0;
    let ox = ((half - cx).round().max(0.0) as usize).min(side - sw);
    let oy = ((half - cy).round().max(0.0) as usize).min(side - sh);
    let mut pixels = vec![0f32; side * side];
    for y in 0..sh {
        let dst = (oy + y) * side + ox;
        pixels[dst..dst + sw].copy_from_slice(&small[y * sw..(y + 1) * sw]);
    }
    Ok(Prepared {
        pixels,
        inverted,
        as_is: false,
        separation: eta,
    })
}

/// `path` as the model's side x side input; errors name the file.
pub fn load_prepared(path: &Path, side: usize, how: Preparation) -> Result<Prepared> {
    let g = load_gray(path)?;
    prepare(&g, side, how).map_err(|e| Error::file(path, e))
}

/// Pixels in [0, 1] (side x side) as an 8-bit grey PNG's bytes.
pub fn gray_png(pixels: &[f32], side: usize) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = pixels
        .iter()
        .map(|&p| (p.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    let img = GrayImage::from_raw(side as u32, side as u32, bytes)
        .ok_or_else(|| Error::msg(format!("{} pixels are not {side}x{side}", pixels.len())))?;
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("cannot encode PNG: {e}")))?;
    Ok(out.into_inner())
}

/// The digits whose capsule is longer than `threshold`, longest first.
pub fn present(lengths: &[f32], threshold: f32) -> Vec<usize> {
    let mut d: Vec<usize> = (0..lengths.len()).filter(|&k| lengths[k] > threshold).collect();
    d.sort_by(|&a, &b| lengths[b].total_cmp(&lengths[a]));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: usize, h: usize, f: impl Fn(usize, usize) -> f32) -> Gray {
        Gray {
            width: w,
            height: h,
            pixels: (0..h)
                .flat_map(|y| (0..w).map(move |x| (x, y)))
                .map(|(x, y)| f(x, y))
                .collect(),
        }
    }

    #[test]
    fn a_dark_bar_on_white_becomes_a_light_centred_box_20_high() {
        // a 10 wide, 40 high dark bar near the top-left of a 100x80 white page
        let g = gray(100, 80, |x, y| {
            if (5..15).contains(&x) && (3..43).contains(&y) {
                0.1
            } else {
                0.95
            }
        });
        let p = prepare(&g, 28, Preparation::Full).unwrap();
        assert!(p.inverted && !p.as_is);
        let on: Vec<(usize, usize)> = (0..28 * 28)
            .filter(|&i| p.pixels[i] > 0.5)
            .map(|i| (i % 28, i / 28))
            .collect();
        let (ys, xs): (Vec<usize>, Vec<usize>) = (on.iter().map(|p| p.1).collect(), on.iter().map(|p| p.0).collect());
        let (ymin, ymax) = (*ys.iter().min().unwrap(), *ys.iter().max().unwrap());
        let (xmin, xmax) = (*xs.iter().min().unwrap(), *xs.iter().max().unwrap());
        assert_eq!(ymax + 1 - ymin, 20, "the longer side fills 20 pixels");
        assert_eq!(xmax + 1 - xmin, 5, "the aspect ratio is kept (10:40 → 5:20)");
        assert_eq!((ymin, xmin), (4, 12), "centred: rows 4..24, columns 12..17");
        assert!(p.pixels.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn the_models_size_is_taken_as_it_is_when_raw_and_a_blank_image_is_an_error() {
        let g = gray(28, 28, |x, y| ((x * 3 + y * 5) % 7) as f32 / 7.0 * 0.4);
        let p = prepare(&g, 28, Preparation::Raw).unwrap();
        assert!(p.as_is && !p.inverted);
        assert_eq!(p.pixels, g.pixels);
        let blank = gray(40, 30, |_, _| 0.7);
        assert!(
            prepare(&blank, 28, Preparation::Full)
                .unwrap_err()
                .to_string()
                .contains("blank")
        );
        let one = gray(1, 1, |_, _| 0.3);
        assert!(prepare(&one, 28, Preparation::Full).is_err());
    }

    #[test]
    fn a_speck_far_away_does_not_stretch_the_box_and_a_36_canvas_gets_mnists_20_px() {
        // the bar of the test above, plus a bright speck in the far corner and a faint shadow edge
        let g = gray(100, 80, |x, y| match (x, y) {
            (95, 75) => 0.0,
            (5..15, 3..43) => 0.1,
            (60.., 70..) => 0.85,
            _ => 0.95,
        });
        let p = prepare(&g, 28, Preparation::Full).unwrap();
        let on: Vec<usize> = (0..28 * 28).filter(|&i| p.pixels[i] > 0.5).collect();
        let rows: std::collections::BTreeSet<usize> = on.iter().map(|i| i / 28).collect();
        let cols: std::collections::BTreeSet<usize> = on.iter().map(|i| i % 28).collect();
        assert_eq!((rows.len(), cols.len()), (20, 5), "rows {rows:?} cols {cols:?}");
        // a MultiMNIST model (36x36) sees digits of MNIST's size, not scaled up to 26 px
        let p = prepare(&g, 36, Preparation::Full).unwrap();
        let rows: std::collections::BTreeSet<usize> =
            (0..36 * 36).filter(|&i| p.pixels[i] > 0.5).map(|i| i / 36).collect();
        assert_eq!(rows.len(), 20);
    }

    #[test]
    fn blank_and_broken_pixels_are_errors_at_any_size() {
        let blank = gray(28, 28, |_, _| 0.0);
        assert!(
            prepare(&blank, 28, Preparation::Full)
                .unwrap_err()
                .to_string()
                .contains("blank")
        );
        let mut nan = gray(40, 40, |x, _| x as f32 / 40.0);
        nan.pixels[5] = f32::NAN;
        assert!(
            prepare(&nan, 28, Preparation::Full)
                .unwrap_err()
                .to_string()
                .contains("not numbers")
        );
    }

    /// A JPEG whose EXIF orientation is 6 (stored turned 90° anticlockwise, shown turned clockwise)
    /// is read as it is shown.
    #[test]
    fn a_photos_exif_orientation_is_applied() {
        let img = image::GrayImage::from_fn(40, 20, |x, _| image::Luma([if x < 10 { 0 } else { 255 }]));
        let mut jpeg = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        // APP1 "Exif": a little-endian TIFF header and one IFD entry, Orientation (0x0112) = 6
        let mut tiff = b"II*\0\x08\0\0\0".to_vec();
        tiff.extend([1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(&tiff);
        let mut seg = vec![0xFF, 0xE1];
        seg.extend(((app1.len() + 2) as u16).to_be_bytes());
        seg.extend(&app1);
        let with_exif = [&jpeg[..2], &seg[..], &jpeg[2..]].concat();
        let path = std::env::temp_dir().join(format!("capsnet-exif-{}.jpg", std::process::id()));
        std::fs::write(&path, &with_exif).unwrap();
        let g = load_gray(&path);
        let _ = std::fs::remove_file(&path);
        let g = g.unwrap();
        assert_eq!((g.width, g.height), (20, 40), "turned upright");
        // the dark band was on the left; turned clockwise it is at the top
        assert!(g.pixels[..20].iter().all(|&p| p < 0.2) && g.pixels[39 * 20..].iter().all(|&p| p > 0.8));
    }

    #[test]
    fn present_digits_are_those_over_the_threshold_longest_first() {
        assert_eq!(present(&[0.1, 0.9, 0.2, 0.6, 0.5], 0.5), vec![1, 3]);
        assert!(present(&[0.1, 0.2], 0.5).is_empty());
    }
}

/// What `predict` found in one image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePrediction {
    /// The capsule lengths: each class's probability (they need not sum to 1).
    pub lengths: Vec<f32>,
    /// The longest capsule.
    pub digit: usize,
    /// Every class over the threshold, longest first (two digits in one image give two).
    pub present: Vec<usize>,
    /// The longest capsule is over the threshold and the ink stands out as a digit's does
    /// ([`MIN_SEPARATION`]).
    pub confident: bool,
    pub prepared: Prepared,
    /// The decoder's reconstruction from the predicted capsule.
    pub recon: Vec<f32>,
}

/// The images of `files` through a model: each file's prediction or the error that stopped it.
pub fn predict_files<B: crate::ops::Backend>(
    tape: &mut crate::tape::Tape<B>,
    model: &crate::model::CapsNet,
    files: &[std::path::PathBuf],
    threshold: f32,
    batch: usize,
    how: Preparation,
) -> Result<Vec<(std::path::PathBuf, Result<ImagePrediction>)>> {
    let side = model.cfg.image_side;
    let mut prepared: Vec<(usize, Prepared)> = vec![];
    let mut out: Vec<Option<Result<ImagePrediction>>> = vec![];
    for (i, f) in files.iter().enumerate() {
        match load_prepared(f, side, how) {
            Ok(p) => {
                prepared.push((i, p));
                out.push(None);
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    let pixels: Vec<f32> = prepared.iter().flat_map(|(_, p)| p.pixels.iter().copied()).collect();
    if !prepared.is_empty() {
        let c = crate::infer::classify(tape, model, &pixels, batch)?;
        let recon = crate::infer::reconstruct(tape, model, &c.v, &c.pred, batch)?;
        let classes = model.cfg.classes;
        for (k, (i, p)) in prepared.into_iter().enumerate() {
            let lengths = c.lengths[k * classes..(k + 1) * classes].to_vec();
            out[i] = Some(Ok(ImagePrediction {
                present: present(&lengths, threshold),
                confident: lengths[c.pred[k] as usize] > threshold && p.separation >= MIN_SEPARATION,
                lengths,
                digit: c.pred[k] as usize,
                prepared: p,
                recon: recon[k * side * side..(k + 1) * side * side].to_vec(),
            }));
        }
    }
    Ok(files
        .iter()
        .cloned()
        .zip(
            out.into_iter()
                .map(|r| r.expect("every file has a prediction or an error")),
        )
        .collect())
}
