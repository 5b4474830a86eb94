//! Any image file → the model's input, prepared as MNIST's digits were made (LeCun et al.): one
//! light digit on a dark background, its bounding box scaled to fit 20x20 keeping the aspect
//! ratio, centred by its centre of mass in 28x28.
//!
//! Steps, for an image of any size and colour:
//! 1. decode (PNG, JPEG, GIF, BMP, WebP, PNM); transparency is laid over white; grey = the luma of
//!    the colour (Rec. 709 weights, as the `image` crate converts);
//! 2. the background is the median of the border pixels; when it is lighter than mid-grey the
//!    image is a dark digit on light paper and is inverted;
//! 3. contrast: the background goes to 0 and the darkest ink (after inversion: the lightest
//!    pixel) to 1, clamped;
//! 4. the digit's bounding box: every pixel above [`INK`];
//! 5. the box scaled to fit a square of side·20/28 (20 for 28), with a triangle (bilinear) filter
//!    widened to the scale when shrinking, so a photo is averaged rather than sampled;
//! 6. placed in the side x side canvas with its centre of mass at the centre, rounded to a whole
//!    pixel (and kept inside the canvas).
//!
//! An image that is already the model's size (28x28 for MNIST) is taken as it is, after steps 1
//! and 2 only: MNIST's own digits are already cropped, scaled and centred, and redoing it would
//! move them by rounding.

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
    let img = r.decode().map_err(not_image)?;
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

/// The grey image `g` as the model's side x side input (the steps in the module's documentation).
/// A blank image (no contrast) is an error.
pub fn prepare(g: &Gray, side: usize) -> Result<Prepared> {
    let (w, h) = (g.width, g.height);
    if w == 0 || h == 0 || g.pixels.len() != w * h {
        return Err(Error::msg(format!("a {w}x{h} image with {} pixels", g.pixels.len())));
    }
    let border: Vec<f32> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| x == 0 || y == 0 || x == w - 1 || y == h - 1)
        .map(|(x, y)| g.pixels[y * w + x])
        .collect();
    let inverted = median(border.clone()) > 0.5;
    let ink: Vec<f32> = if inverted {
        g.pixels.iter().map(|&p| 1.0 - p).collect()
    } else {
        g.pixels.clone()
    };
    if w == side && h == side {
        return Ok(Prepared {
            pixels: ink,
            inverted,
            as_is: true,
        });
    }
    let bg = if inverted { 1.0 - median(border) } else { median(border) };
    let top = ink.iter().copied().fold(f32::MIN, f32::max);
    if top - bg < MIN_CONTRAST {
        return Err(Error::msg(
            "no digit found: the image is blank (no contrast between background and ink)",
        ));
    }
    let norm: Vec<f32> = ink.iter().map(|&p| ((p - bg) / (top - bg)).clamp(0.0, 1.0)).collect();
    // bounding box of the ink
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if norm[y * w + x] > INK {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    let (bw, bh) = (x1 + 1 - x0, y1 + 1 - y0);
    let crop: ImageBuffer<Luma<f32>, Vec<f32>> = ImageBuffer::from_fn(bw as u32, bh as u32, |x, y| {
        Luma([norm[(y0 + y as usize) * w + x0 + x as usize]])
    });
    // the box's longer side becomes 20/28 of the canvas
    let fit = ((side * 20) as f64 / 28.0).round().max(1.0) as usize;
    let scale = fit as f64 / bw.max(bh) as f64;
    let (sw, sh) = (
        ((bw as f64 * scale).round() as usize).clamp(1, fit),
        ((bh as f64 * scale).round() as usize).clamp(1, fit),
    );
    let small = image::imageops::resize(&crop, sw as u32, sh as u32, image::imageops::FilterType::Triangle);
    let small: Vec<f32> = small.into_raw().into_iter().map(|p| p.clamp(0.0, 1.0)).collect();
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
pub fn predict_files<B: crate::backend::Backend>(
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
