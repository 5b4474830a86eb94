//! Any image file → the model's input, prepared as MNIST's digits were made (LeCun et al.): one
//! light digit on a dark background, its bounding box scaled to fit 20x20 keeping the aspect
//! ratio, centred by its centre of mass in 28x28.
//!
//! Steps, for an image of any size and colour:
//! 1. decode (PNG, JPEG, GIF, BMP, WebP, PNM), turned as its EXIF orientation says; transparency
//!    is laid over white; grey = the luma of the colour (Rec. 709 weights, as `image` converts);
//! 2. the background is the median of the border pixels; when it is lighter than mid-grey the
//!    image is a dark digit on light paper and is inverted;
//! 3. contrast: the background goes to 0 and the ink's level to 1, clamped. The ink's level is the
//!    99.9th percentile, so a few bright specks do not set it;
//! 4. the digit's bounding box: of the rows (and the columns) with ink above [`INK`], the stretch
//!    holding the most ink, where gaps under a tenth of the image do not part it; so a speck or a
//!    shadow apart from the digit does not stretch the box;
//! 5. the box scaled to fit a 20x20 square (MNIST's digit box; less for a model under 28x28),
//!    keeping its aspect ratio, with a triangle filter widened to the scale when shrinking, so a
//!    photo is averaged rather than sampled; then stretched again so its brightest pixel is 1;
//! 6. placed in the side x side canvas with its centre of mass at the centre, rounded to a whole
//!    pixel (and kept inside the canvas).
//!
//! An image that is already the model's size (28x28 for MNIST) is taken as it is, after steps 1
//! and 2 only: MNIST's own digits are already cropped, scaled and centred, and redoing it would
//! move them by rounding. Memory: the decoded image, one grey copy and the cropped box.

use std::path::Path;

use image::{GrayImage, ImageBuffer, ImageReader, Luma};

use crate::{Error, Result};

/// Largest width or height read (a 48-megapixel photo is 8000 wide).
pub const MAX_SIDE: u32 = 8192;
/// Memory the decoder may allocate for one image.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// A pixel belongs to the digit's bounding box above this (after contrast, in [0, 1]).
pub const INK: f32 = 0.2;
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
}

/// Reads and decodes `path` to grey, within [`MAX_SIDE`] and [`MAX_DECODE_BYTES`]. Every failure
/// names the file.
pub fn load_gray(path: &Path) -> Result<Gray> {
    let open_err = |e: std::io::Error| Error::file(path, format!("cannot read: {e}"));
    let meta = std::fs::metadata(path).map_err(open_err)?;
    if meta.is_dir() {
        return Err(Error::file(path, "is a directory, not an image"));
    }
    if meta.len() == 0 {
        return Err(Error::file(path, "is empty (0 bytes), not an image"));
    }
    let not_image = |e: image::ImageError| Error::file(path, format!("cannot decode the image: {e}"));
    let reader = || -> Result<_> {
        ImageReader::open(path)
            .map_err(open_err)?
            .with_guessed_format()
            .map_err(open_err)
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err(Error::file(
            path,
            "not an image in a known format (PNG, JPEG, GIF, BMP, WebP, PNM)",
        ));
    }
    let (w, h) = r.into_dimensions().map_err(not_image)?;
    if w == 0 || h == 0 {
        return Err(Error::file(path, format!("the image is {w}x{h}: it has no pixels")));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(Error::file(
            path,
            format!("the image is {w}x{h}; at most {MAX_SIDE} pixels on a side are read (scale it down first)"),
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
    let pixels = la
        .pixels()
        .map(|p| {
            let (l, a) = (p.0[0] as f64 / 255.0, p.0[1] as f64 / 255.0);
            // over white; an opaque pixel is its grey level exactly (as MNIST's bytes / 255)
            if p.0[1] == 255 {
                l as f32
            } else {
                (l * a + (1.0 - a)) as f32
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

/// The `q`-quantile (0..1) of `xs`, from at most about a million evenly spaced samples.
fn quantile(xs: &[f32], q: f64) -> f32 {
    let step = (xs.len() / (1 << 20)).max(1);
    let mut sample: Vec<f32> = xs.iter().step_by(step).copied().collect();
    sample.sort_by(f32::total_cmp);
    sample[((sample.len() - 1) as f64 * q).round() as usize]
}

/// The span of `mass` (a row or column profile of the ink) that holds the most ink, where stretches
/// of ink count as one when less than `gap` empty entries part them: the digit, without a speck or a
/// shadow that lies apart from it.
fn main_span(mass: &[f64], gap: usize) -> (usize, usize) {
    let mut spans: Vec<(usize, usize, f64)> = vec![];
    for (i, &m) in mass.iter().enumerate() {
        if m == 0.0 {
            continue;
        }
        match spans.last_mut() {
            Some(last) if i - last.1 <= gap => {
                last.1 = i;
                last.2 += m;
            }
            _ => spans.push((i, i, m)),
        }
    }
    spans
        .into_iter()
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .map_or((0, 0), |(a, b, _)| (a, b))
}

/// The grey image `g` as the model's side x side input (the steps in the module's documentation).
/// A blank image (no contrast) is an error.
pub fn prepare(g: &Gray, side: usize) -> Result<Prepared> {
    let (w, h) = (g.width, g.height);
    if w == 0 || h == 0 || g.pixels.len() != w * h {
        return Err(Error::msg(format!("a {w}x{h} image with {} pixels", g.pixels.len())));
    }
    if g.pixels.iter().any(|p| !p.is_finite()) {
        return Err(Error::msg("the image has pixels that are not numbers"));
    }
    let border: Vec<f32> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| x == 0 || y == 0 || x == w - 1 || y == h - 1)
        .map(|(x, y)| g.pixels[y * w + x])
        .collect();
    let paper = median(border);
    let inverted = paper > 0.5;
    // the one working copy: ink bright on a dark background
    let mut ink = g.pixels.clone();
    if inverted {
        ink.iter_mut().for_each(|p| *p = 1.0 - *p);
    }
    let bg = if inverted { 1.0 - paper } else { paper };
    let top = quantile(&ink, 0.999).max(bg);
    let blank = || Error::msg("no digit found: the image is blank (no contrast between background and ink)");
    if top - bg < MIN_CONTRAST && ink.iter().copied().fold(f32::MIN, f32::max) - bg < MIN_CONTRAST {
        return Err(blank());
    }
    if w == side && h == side {
        return Ok(Prepared {
            pixels: ink,
            inverted,
            as_is: true,
        });
    }
    // a digit thinner than 0.1% of the image: its own brightest pixels set the level
    let top = if top - bg < MIN_CONTRAST {
        ink.iter().copied().fold(f32::MIN, f32::max)
    } else {
        top
    };
    ink.iter_mut()
        .for_each(|p| *p = ((*p - bg) / (top - bg)).clamp(0.0, 1.0));
    // the box: by rows and by columns, the span with most of the ink (parts apart by a tenth of the
    // image or more are something else)
    let (mut rows, mut cols) = (vec![0f64; h], vec![0f64; w]);
    for y in 0..h {
        for x in 0..w {
            let p = ink[y * w + x];
            if p > INK {
                rows[y] += p as f64;
                cols[x] += p as f64;
            }
        }
    }
    if rows.iter().all(|&m| m == 0.0) {
        return Err(blank());
    }
    let gap = (w.max(h) / 10).max(2);
    let (y0, y1) = main_span(&rows, gap);
    let (x0, x1) = main_span(&cols, gap);
    let (bw, bh) = (x1 + 1 - x0, y1 + 1 - y0);
    let crop: ImageBuffer<Luma<f32>, Vec<f32>> = ImageBuffer::from_fn(bw as u32, bh as u32, |x, y| {
        Luma([ink[(y0 + y as usize) * w + x0 + x as usize]])
    });
    drop(ink);
    // MNIST's digits fit a 20x20 box; a model for smaller images gets a proportionally smaller one
    let fit = 20.min(((side * 20) as f64 / 28.0).round().max(1.0) as usize);
    let scale = fit as f64 / bw.max(bh) as f64;
    let (sw, sh) = (
        ((bw as f64 * scale).round() as usize).clamp(1, fit),
        ((bh as f64 * scale).round() as usize).clamp(1, fit),
    );
    let small = image::imageops::resize(&crop, sw as u32, sh as u32, image::imageops::FilterType::Triangle);
    let mut small: Vec<f32> = small.into_raw().into_iter().map(|p| p.clamp(0.0, 1.0)).collect();
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
    })
}

/// `path` as the model's side x side input; errors name the file.
pub fn load_prepared(path: &Path, side: usize) -> Result<Prepared> {
    let g = load_gray(path)?;
    prepare(&g, side).map_err(|e| Error::file(path, e))
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
        let p = prepare(&g, 28).unwrap();
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
    fn the_models_size_is_taken_as_it_is_and_a_blank_image_is_an_error() {
        let g = gray(28, 28, |x, y| ((x * 3 + y * 5) % 7) as f32 / 7.0 * 0.4);
        let p = prepare(&g, 28).unwrap();
        assert!(p.as_is && !p.inverted);
        assert_eq!(p.pixels, g.pixels);
        let blank = gray(40, 30, |_, _| 0.7);
        assert!(prepare(&blank, 28).unwrap_err().to_string().contains("blank"));
        let one = gray(1, 1, |_, _| 0.3);
        assert!(prepare(&one, 28).is_err());
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
        let p = prepare(&g, 28).unwrap();
        let on: Vec<usize> = (0..28 * 28).filter(|&i| p.pixels[i] > 0.5).collect();
        let rows: std::collections::BTreeSet<usize> = on.iter().map(|i| i / 28).collect();
        let cols: std::collections::BTreeSet<usize> = on.iter().map(|i| i % 28).collect();
        assert_eq!((rows.len(), cols.len()), (20, 5), "rows {rows:?} cols {cols:?}");
        // a MultiMNIST model (36x36) sees digits of MNIST's size, not scaled up to 26 px
        let p = prepare(&g, 36).unwrap();
        let rows: std::collections::BTreeSet<usize> =
            (0..36 * 36).filter(|&i| p.pixels[i] > 0.5).map(|i| i / 36).collect();
        assert_eq!(rows.len(), 20);
    }

    #[test]
    fn blank_and_broken_pixels_are_errors_at_any_size() {
        let blank = gray(28, 28, |_, _| 0.0);
        assert!(prepare(&blank, 28).unwrap_err().to_string().contains("blank"));
        let mut nan = gray(40, 40, |x, _| x as f32 / 40.0);
        nan.pixels[5] = f32::NAN;
        assert!(prepare(&nan, 28).unwrap_err().to_string().contains("not numbers"));
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
) -> Result<Vec<(std::path::PathBuf, Result<ImagePrediction>)>> {
    let side = model.cfg.image_side;
    let mut prepared: Vec<(usize, Prepared)> = vec![];
    let mut out: Vec<Option<Result<ImagePrediction>>> = vec![];
    for (i, f) in files.iter().enumerate() {
        match load_prepared(f, side) {
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
