//! The notebook's pictures, as PNGs written atomically: test digits over their reconstructions,
//! what each capsule dimension encodes (the tweaks), training curves, misclassified digits and the
//! confusion matrix.
//!
//! Pixel grids are drawn straight into an RGB buffer; labels and the curves are drawn by `plotters`
//! on the same buffer, with DejaVu Sans Mono compiled in (licence beside it), so no system font is
//! needed. Digits are dark ink on white, as the notebook shows them.

use std::path::{Path, PathBuf};
use std::sync::Once;

use image::{Rgb, RgbImage};
use plotters::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::data::Split;
use crate::dataset::Source;
use crate::error::write_atomic;
use crate::infer::{self, Classified};
use crate::model::CapsNet;
use crate::ops::Backend;
use crate::tape::Tape;
use crate::train::{EvalOptions, EvalReport, METRICS, TestSet};
use crate::{Error, Result};

const FONT_BYTES: &[u8] = include_bytes!("DejaVuSansMono.ttf");
const FONT: &str = "capsnet-mono";

/// The notebook's tweak range: each capsule dimension moved from −0.25 to +0.25...
pub const TWEAK_RANGE: f32 = 0.25;
/// ...in this many steps.
pub const TWEAK_STEPS: usize = 11;

fn font(size: u32) -> TextStyle<'static> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // the bytes are compiled in and parsed by a test: failure here is a broken build
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            eprintln!("warning: the figures' font did not load; labels will be missing");
        }
    });
    (FONT, size as f64).into_font().color(&BLACK)
}

fn draw_err(what: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::msg(format!("drawing {what}: {e}"))
}

/// A white RGB sheet with digits and labels on it.
pub struct Sheet {
    pub img: RgbImage,
}

impl Sheet {
    pub fn new(width: u32, height: u32) -> Sheet {
        Sheet {
            img: RgbImage::from_pixel(width, height, Rgb([255, 255, 255])),
        }
    }

    /// A side x side digit (values in [0, 1], 1 = ink) at (x, y), each pixel `scale` x `scale`.
    pub fn digit(&mut self, x: u32, y: u32, pixels: &[f32], side: usize, scale: u32) {
        for (i, &p) in pixels.iter().enumerate() {
            let g = 255 - (p.clamp(0.0, 1.0) * 255.0).round() as u8;
            let (px, py) = (x + (i % side) as u32 * scale, y + (i / side) as u32 * scale);
            for dy in 0..scale {
                for dx in 0..scale {
                    if px + dx < self.img.width() && py + dy < self.img.height() {
                        self.img.put_pixel(px + dx, py + dy, Rgb([g, g, g]));
                    }
                }
            }
        }
    }

    pub fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, c: [u8; 3]) {
        for py in y..(y + h).min(self.img.height()) {
            for px in x..(x + w).min(self.img.width()) {
                self.img.put_pixel(px, py, Rgb(c));
            }
        }
    }

    /// Text with its top-left corner at (x, y).
    pub fn text(&mut self, x: i32, y: i32, s: &str, size: u32, c: [u8; 3]) -> Result<()> {
        let (w, h) = self.img.dimensions();
        let area = BitMapBackend::with_buffer(&mut self.img, (w, h)).into_drawing_area();
        area.draw_text(s, &font(size).color(&RGBColor(c[0], c[1], c[2])), (x, y))
            .map_err(|e| draw_err("a label")(e.to_string()))?;
        area.present().map_err(|e| draw_err("a label")(e.to_string()))
    }

    /// The sheet as PNG bytes: 8-bit grey when every pixel is grey (a third of the size), else RGB.
    pub fn png(&self) -> Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(vec![]);
        let grey = self.img.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]);
        let res = if grey {
            image::DynamicImage::ImageRgb8(self.img.clone())
                .to_luma8()
                .write_to(&mut out, image::ImageFormat::Png)
        } else {
            self.img.write_to(&mut out, image::ImageFormat::Png)
        };
        res.map_err(|e| Error::msg(format!("cannot encode PNG: {e}")))?;
        Ok(out.into_inner())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.png()?)
    }
}

/// Space between cells.
pub const PAD: u32 = 4;
/// Height of a column's label band.
pub const LABEL: u32 = 20;
/// Where a label in a band starts: low enough that the tallest glyph is whole.
pub const LABEL_TOP: i32 = 4;
/// Width of the row labels of reconstructions.png ("input", "recon").
pub const RECON_LEFT: u32 = 56;
/// Width of the row labels of tweaks.png ("d0".."d15").
pub const TWEAK_LEFT: u32 = 40;
const RED: [u8; 3] = [200, 0, 0];
const INK: [u8; 3] = [0, 0, 0];

/// n digits in a row over their reconstructions, each column headed "predicted/true" (red where
/// they differ). `inputs` and `recons` are n·side² pixels.
pub fn reconstructions(
    inputs: &[f32],
    recons: &[f32],
    pred: &[u32],
    labels: &[u32],
    side: usize,
    scale: u32,
) -> Result<Sheet> {
    let n = pred.len();
    let cell = side as u32 * scale;
    let left = RECON_LEFT;
    let mut s = Sheet::new(left + n as u32 * (cell + PAD) + PAD, LABEL + 2 * (cell + PAD) + PAD);
    s.text(4, LABEL as i32 + cell as i32 / 2 - 7, "input", 12, INK)?;
    s.text(4, (LABEL + cell + PAD) as i32 + cell as i32 / 2 - 7, "recon", 12, INK)?;
    let px = side * side;
    for k in 0..n {
        let x = left + k as u32 * (cell + PAD);
        let c = if pred[k] == labels[k] { INK } else { RED };
        s.text(
            x as i32 + cell as i32 / 2 - 12,
            LABEL_TOP,
            &format!("{}/{}", pred[k], labels[k]),
            12,
            c,
        )?;
        s.digit(x, LABEL, &inputs[k * px..(k + 1) * px], side, scale);
        s.digit(x, LABEL + cell + PAD, &recons[k * px..(k + 1) * px], side, scale);
    }
    Ok(s)
}

/// The capsule shifts of the tweak figure: TWEAK_STEPS values from −TWEAK_RANGE to +TWEAK_RANGE.
pub fn tweak_deltas() -> Vec<f32> {
    (0..TWEAK_STEPS)
        .map(|i| -TWEAK_RANGE + 2.0 * TWEAK_RANGE * i as f32 / (TWEAK_STEPS - 1) as f32)
        .collect()
}

/// The tweak figure's capsules: for every dimension d, digit k and step, digit k's capsules `v` with
/// dimension d of its predicted capsule moved by the step. Returns them and the capsule each keeps,
/// in that (d, k, step) order.
pub fn tweaked_capsules(c: &Classified, digits: usize, classes: usize, dim: usize) -> (Vec<f32>, Vec<u32>) {
    let per = classes * dim;
    let (mut v, mut keep) = (vec![], vec![]);
    for d in 0..dim {
        for k in 0..digits {
            for delta in tweak_deltas() {
                let mut caps = c.v[k * per..(k + 1) * per].to_vec();
                caps[c.pred[k] as usize * dim + d] += delta;
                v.extend(caps);
                keep.push(c.pred[k]);
            }
        }
    }
    (v, keep)
}

/// One row per capsule dimension; in each row, for each digit, its reconstructions as that
/// dimension goes through [`tweak_deltas`]. `recons` in [`tweaked_capsules`]' order.
pub fn tweaks(recons: &[f32], dims: usize, digits: usize, side: usize, scale: u32) -> Result<Sheet> {
    let cell = side as u32 * scale;
    // panels far enough apart that one's "+0.25" does not run into the next one's "-0.25"
    let (left, gap) = (TWEAK_LEFT, 8 * PAD);
    let group = TWEAK_STEPS as u32 * cell;
    let width = left + digits as u32 * (group + gap);
    let mut s = Sheet::new(width, LABEL + dims as u32 * cell + PAD);
    for k in 0..digits as u32 {
        let x = (left + k * (group + gap)) as i32;
        s.text(x, LABEL_TOP, &format!("{:+.2}", -TWEAK_RANGE), 11, INK)?;
        s.text(x + group as i32 / 2 - 4, LABEL_TOP, "0", 11, INK)?;
        s.text(
            x + group as i32 - 36,
            LABEL_TOP,
            &format!("{:+.2}", TWEAK_RANGE),
            11,
            INK,
        )?;
    }
    let px = side * side;
    for d in 0..dims {
        let y = LABEL + d as u32 * cell;
        s.text(2, y as i32 + cell as i32 / 2 - 7, &format!("d{d}"), 12, INK)?;
        for k in 0..digits {
            for step in 0..TWEAK_STEPS {
                let i = (d * digits + k) * TWEAK_STEPS + step;
                let x = left + k as u32 * (group + gap) + step as u32 * cell;
                s.digit(x, y, &recons[i * px..(i + 1) * px], side, scale);
            }
        }
    }
    Ok(s)
}

/// A sheet that says why a figure has nothing to show (written so that no older figure of the same
/// name is left standing for this one).
pub fn note(text: &str) -> Result<Sheet> {
    let mut s = Sheet::new(8 * text.chars().count() as u32 + 24, 32);
    s.text(12, 9, text, 13, INK)?;
    Ok(s)
}

/// Up to `max` misclassified images, each headed "predicted/true". None when there are none.
pub fn errors(
    images: &[f32],
    pred: &[u32],
    labels: &[u32],
    side: usize,
    scale: u32,
    max: usize,
) -> Result<Option<Sheet>> {
    let wrong: Vec<usize> = (0..pred.len()).filter(|&i| pred[i] != labels[i]).take(max).collect();
    if wrong.is_empty() {
        return Ok(None);
    }
    let cell = side as u32 * scale;
    let cols = wrong.len().min(10) as u32;
    let rows = wrong.len().div_ceil(10) as u32;
    let mut s = Sheet::new(cols * (cell + PAD) + PAD, rows * (LABEL + cell + PAD) + PAD);
    let px = side * side;
    for (j, &i) in wrong.iter().enumerate() {
        let (x, y) = (
            PAD + (j as u32 % 10) * (cell + PAD),
            (j as u32 / 10) * (LABEL + cell + PAD),
        );
        s.text(
            x as i32 + cell as i32 / 2 - 12,
            y as i32 + LABEL_TOP,
            &format!("{}/{}", pred[i], labels[i]),
            12,
            RED,
        )?;
        s.digit(x, y + LABEL, &images[i * px..(i + 1) * px], side, scale);
    }
    Ok(Some(s))
}

/// The confusion matrix: counts in cells shaded by their share of the row (true class).
pub fn confusion(m: &[Vec<usize>]) -> Result<Sheet> {
    let n = m.len() as u32;
    let (cell, left, top) = (44, 64, 40);
    let mut s = Sheet::new(left + n * cell + 8, top + n * cell + 8);
    s.text(left as i32, 2, "predicted", 13, INK)?;
    s.text(2, top as i32 - 18, "true", 13, INK)?;
    for k in 0..n {
        s.text(
            (left + k * cell + cell / 2 - 4) as i32,
            top as i32 - 18,
            &k.to_string(),
            13,
            INK,
        )?;
        s.text(40, (top + k * cell + cell / 2 - 8) as i32, &k.to_string(), 13, INK)?;
    }
    for (t, row) in m.iter().enumerate() {
        let total = row.iter().sum::<usize>().max(1) as f64;
        for (p, &count) in row.iter().enumerate() {
            let share = count as f64 / total;
            // diagonal blue, errors red; even one error shows
            let strength = if count == 0 { 0.0 } else { 0.15 + 0.85 * share.sqrt() };
            let fade = |full: u8| (255.0 - (255.0 - full as f64) * strength).round() as u8;
            let c = if t == p {
                [fade(40), fade(90), fade(200)]
            } else {
                [fade(220), fade(40), fade(40)]
            };
            let (x, y) = (left + p as u32 * cell, top + t as u32 * cell);
            s.fill(x, y, cell - 1, cell - 1, c);
            if count > 0 {
                let text = count.to_string();
                let colour = if strength > 0.6 { [255, 255, 255] } else { INK };
                let tx = x as i32 + cell as i32 / 2 - 4 * text.len() as i32;
                s.text(tx, (y + cell / 2 - 7) as i32, &text, 12, colour)?;
            }
        }
    }
    Ok(s)
}

/// One epoch of a run's history (a line of metrics.jsonl).
#[derive(Clone, Debug, PartialEq)]
pub struct EpochPoint {
    pub epoch: f64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_acc: f64,
}

/// The epochs of a run's history; a line without the figures is an error naming `source`.
pub fn epoch_points(history: &[serde_json::Value], source: &Path) -> Result<Vec<EpochPoint>> {
    history
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let f = |k: &str| {
                h.get(k)
                    .and_then(|x| x.as_f64())
                    .ok_or_else(|| Error::file(source, format!("epoch record {} has no number '{k}'", i + 1)))
            };
            Ok(EpochPoint {
                epoch: f("epoch")?,
                train_loss: f("train_loss")?,
                val_loss: f("val_loss")?,
                val_acc: f("val_acc")?,
            })
        })
        .collect()
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A chart over epochs 1..=`last` on `area`, with its axes drawn: whole epochs on x, `y` with
/// `digits` decimals.
fn epoch_chart<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    last: f64,
    y: std::ops::Range<f64>,
    digits: usize,
) -> Result<Chart<'a, 'b>> {
    let e = draw_err("curves.png");
    let mut c = ChartBuilder::on(area)
        .caption(title, font(16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5..last + 0.5, y)
        .map_err(|x| e(x.to_string()))?;
    let whole = |x: &f64| {
        if x.fract() == 0.0 {
            format!("{x:.0}")
        } else {
            String::new()
        }
    };
    c.configure_mesh()
        .x_desc("epoch")
        .x_labels((last as usize).min(20) + 1)
        .x_label_formatter(&whole)
        .light_line_style(WHITE)
        .label_style(font(12))
        .axis_desc_style(font(13))
        .y_label_formatter(&|y| format!("{y:.digits$}"))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    Ok(c)
}

/// Training and validation loss (left) and validation accuracy (right) per epoch.
pub fn curves(points: &[EpochPoint]) -> Result<Sheet> {
    if points.is_empty() {
        return Err(Error::msg("curves: no epochs recorded"));
    }
    let (w, h) = (1000u32, 400u32);
    let mut s = Sheet::new(w, h);
    {
        let area = BitMapBackend::with_buffer(&mut s.img, (w, h)).into_drawing_area();
        let (l, r) = area.split_horizontally(w / 2);
        let e = draw_err("curves.png");
        let last = points.iter().map(|p| p.epoch).fold(1.0, f64::max);
        let range = |ys: &mut dyn Iterator<Item = f64>| ys.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        let (lo, hi) = range(&mut points.iter().flat_map(|p| [p.train_loss, p.val_loss]));
        let mut c = epoch_chart(&l, "loss", last, (lo * 0.9).max(0.0)..hi * 1.05, 3)?;
        let (blue, red) = (RGBColor(40, 90, 200), RGBColor(200, 40, 40));
        let losses = [
            ("train", points.iter().map(|p| p.train_loss).collect::<Vec<_>>(), blue),
            ("validation", points.iter().map(|p| p.val_loss).collect(), red),
        ];
        for (name, ys, colour) in losses {
            let at: Vec<(f64, f64)> = points.iter().zip(ys).map(|(p, y)| (p.epoch, y)).collect();
            c.draw_series(LineSeries::new(at.clone(), colour.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
            c.draw_series(at.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
                .map_err(|x| e(x.to_string()))?;
        }
        c.configure_series_labels()
            .label_font(font(12))
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let (alo, ahi) = range(&mut points.iter().map(|p| 100.0 * p.val_acc));
        let pad = ((ahi - alo) * 0.1).max(0.05);
        let mut c = epoch_chart(
            &r,
            "validation accuracy (%)",
            last,
            alo - pad..(ahi + pad).min(100.0 + pad),
            2,
        )?;
        let at: Vec<(f64, f64)> = points.iter().map(|p| (p.epoch, 100.0 * p.val_acc)).collect();
        c.draw_series(LineSeries::new(at.clone(), red.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?;
        c.draw_series(at.into_iter().map(|p| Circle::new(p, 3, red.filled())))
            .map_err(|x| e(x.to_string()))?;
        area.present().map_err(|x| e(x.to_string()))?;
    }
    Ok(s)
}

/// curves.png's sheet: the curves, or a note that the run recorded no epochs.
fn curves_or_note(history: &[EpochPoint]) -> Result<Sheet> {
    match history.is_empty() {
        false => curves(history),
        true => note("no epochs recorded: no metrics.jsonl beside the checkpoint, no history in it"),
    }
}

/// What [`write_all`] draws.
#[derive(Clone, Debug)]
pub struct FigureOptions {
    /// Test digits in reconstructions.png.
    pub count: usize,
    /// Digits per dimension in tweaks.png.
    pub tweak_digits: usize,
    /// Screen pixels per image pixel.
    pub scale: u32,
    /// Misclassified digits in errors.png at most.
    pub max_errors: usize,
}

impl Default for FigureOptions {
    fn default() -> Self {
        FigureOptions {
            count: 10,
            tweak_digits: 3,
            scale: 2,
            max_errors: 50,
        }
    }
}

impl FigureOptions {
    /// Each option within its range, checked before any work.
    pub fn validate(&self) -> Result<()> {
        let checks = [
            ("--count", self.count, 1, 100),
            ("--tweak-digits", self.tweak_digits, 1, 10),
            ("--scale", self.scale as usize, 1, 8),
            ("--max-errors", self.max_errors, 0, 1000),
        ];
        for (flag, v, lo, hi) in checks {
            if !(lo..=hi).contains(&v) {
                return Err(Error::msg(format!("{flag} must be between {lo} and {hi}, got {v}")));
            }
        }
        Ok(())
    }
}

/// Writes reconstructions.png, tweaks.png, errors.png, confusion.png and curves.png into `out` (a
/// figure with nothing to show says so), from the model, the evaluated `test` split
/// and its `report`. Returns the files written.
pub fn write_all<B: Backend>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    test: &Split,
    report: &EvalReport,
    history: &[EpochPoint],
    out: &Path,
    opts: &FigureOptions,
) -> Result<Vec<PathBuf>> {
    let cfg = &model.cfg;
    let side = cfg.image_side;
    opts.validate()?;
    if report.predictions.len() != test.len() {
        return Err(Error::msg("figures: the report is not of this split"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create the directory: {e}")))?;
    let n = opts.count.max(opts.tweak_digits).min(test.len());
    let idx: Vec<usize> = (0..n).collect();
    let (x, y) = test.batch::<f32>(&idx);
    let c = infer::classify(tape, model, &x, 100)?;
    let recons = infer::reconstruct(tape, model, &c.v, &c.pred, 100)?;
    let mut written = vec![];
    let mut save = |name: &str, sheet: &Sheet| -> Result<()> {
        let p = out.join(name);
        sheet.save(&p)?;
        written.push(p);
        Ok(())
    };
    let k = opts.count.min(n);
    let px = side * side;
    save(
        "reconstructions.png",
        &reconstructions(&x[..k * px], &recons[..k * px], &c.pred[..k], &y[..k], side, opts.scale)?,
    )?;
    let digits = opts.tweak_digits.min(n);
    let (tv, keep) = tweaked_capsules(&c, digits, cfg.classes, cfg.caps2_dim);
    let tr = infer::reconstruct(tape, model, &tv, &keep, 176)?;
    save("tweaks.png", &tweaks(&tr, cfg.caps2_dim, digits, side, opts.scale)?)?;
    let all: Vec<usize> = (0..test.len()).collect();
    let labels: Vec<u32> = test.labels.iter().map(|&l| l as u32).collect();
    let wrong: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| report.predictions[i] != labels[i])
        .take(opts.max_errors)
        .collect();
    let (wx, wy) = test.batch::<f32>(&wrong);
    let wp: Vec<u32> = wrong.iter().map(|&i| report.predictions[i]).collect();
    let none = format!("no misclassified digits among the {} test images", test.len());
    match errors(&wx, &wp, &wy, side, opts.scale, opts.max_errors)? {
        Some(sheet) => save("errors.png", &sheet)?,
        None if opts.max_errors == 0 => save("errors.png", &note("--max-errors 0: none shown")?)?,
        None => save("errors.png", &note(&none)?)?,
    }
    save("confusion.png", &confusion(&report.confusion)?)?;
    save("curves.png", &curves_or_note(history)?)?;

    Ok(written)
}

/// Two reconstructions overlaid on white, `a` in red ink and `b` in blue (dark where both are).
pub fn overlay(s: &mut Sheet, x: u32, y: u32, a: &[f32], b: &[f32], side: usize, scale: u32) {
    for i in 0..side * side {
        let (ia, ib) = (a[i].clamp(0.0, 1.0), b[i].clamp(0.0, 1.0));
        let c = [1.0 - ib, (1.0 - ia) * (1.0 - ib), 1.0 - ia].map(|v| (v * 255.0).round() as u8);
        let (px, py) = (x + (i % side) as u32 * scale, y + (i / side) as u32 * scale);
        s.fill(px, py, scale, scale, c);
    }
}

/// The paper's Figure 5: MultiMNIST inputs over the reconstructions from their two longest capsules,
/// the longer in red, the other in blue; heads "L:a,b" (labels) and "R:c,d" (the two capsules, red
/// when they are not the labels). `inputs` [n, side²], `recons` [2, n, side²].
pub fn multi_reconstructions(
    inputs: &[f32],
    recons: &[f32],
    pred: &[u32],
    labels: &[u32],
    side: usize,
    scale: u32,
) -> Result<Sheet> {
    let n = labels.len() / 2;
    let cell = side as u32 * scale;
    let px = side * side;
    let mut s = Sheet::new(n as u32 * (cell + PAD) + PAD, 2 * LABEL + 2 * (cell + PAD) + PAD);
    for k in 0..n {
        let x = PAD + k as u32 * (cell + PAD);
        let (l, p) = (&labels[2 * k..2 * k + 2], &pred[2 * k..2 * k + 2]);
        let right = l.iter().all(|d| p.contains(d));
        s.text(x as i32 + 2, LABEL_TOP, &format!("L:{},{}", l[0], l[1]), 12, INK)?;
        s.digit(x, LABEL, &inputs[k * px..(k + 1) * px], side, scale);
        let c = if right { INK } else { RED };
        s.text(
            x as i32 + 2,
            (LABEL + cell + PAD) as i32 + LABEL_TOP - 2,
            &format!("R:{},{}", p[0], p[1]),
            12,
            c,
        )?;
        let a = &recons[k * px..(k + 1) * px];
        let b = &recons[(n + k) * px..(n + k + 1) * px];
        overlay(&mut s, x, 2 * LABEL + cell + PAD, a, b, side, scale);
    }
    Ok(s)
}

/// MultiMNIST's figures: multimnist.png ([`multi_reconstructions`] of `opts.count` test examples,
/// about a third of them misread ones when there are any) and curves.png. `examples` and `report`
/// are the evaluation's.
#[allow(clippy::too_many_arguments)]
pub fn write_multi<B: Backend>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    m: &crate::multimnist::MultiMnist,
    examples: &[usize],
    report: &EvalReport,
    history: &[EpochPoint],
    out: &Path,
    opts: &FigureOptions,
) -> Result<Vec<PathBuf>> {
    opts.validate()?;
    if report.per != 2 || report.predictions.len() != 2 * examples.len() {
        return Err(Error::msg("figures: the report is not of these MultiMNIST examples"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create the directory: {e}")))?;
    let wrong_at = |i: usize| {
        let (p, l) = (&report.predictions[2 * i..2 * i + 2], &report.labels[2 * i..2 * i + 2]);
        !l.iter().all(|d| p.contains(d))
    };
    let wrong: Vec<usize> = (0..examples.len())
        .filter(|&i| wrong_at(i))
        .take(opts.count / 3)
        .collect();
    let right = (0..examples.len())
        .filter(|&i| !wrong_at(i))
        .take(opts.count - wrong.len());
    let chosen: Vec<usize> = right.chain(wrong.iter().copied()).map(|i| examples[i]).collect();
    let (x, y, _) = m.batch::<f32>(&chosen);
    let c = infer::classify(tape, model, &x, 100)?;
    let top = crate::runtime::top_classes(&c.lengths, model.cfg.classes, 2);
    let firsts: Vec<u32> = top.iter().step_by(2).copied().collect();
    let seconds: Vec<u32> = top.iter().skip(1).step_by(2).copied().collect();
    let mut recons = infer::reconstruct(tape, model, &c.v, &firsts, 100)?;
    recons.extend(infer::reconstruct(tape, model, &c.v, &seconds, 100)?);
    let mut written = vec![];
    let side = model.cfg.image_side;
    let sheet = multi_reconstructions(&x, &recons, &top, &y, side, opts.scale)?;
    let p = out.join("multimnist.png");
    sheet.save(&p)?;
    written.push(p);
    let p = out.join("curves.png");
    curves_or_note(history)?.save(&p)?;
    written.push(p);
    Ok(written)
}

/// A grid of MultiMNIST examples with their labels: `images` [n, 36²] bytes, `labels` [n, 2].
pub fn multimnist_sheet(images: &[u8], labels: &[u8], scale: u32) -> Result<Sheet> {
    use crate::multimnist::{PIXELS, SIDE};
    let n = labels.len() / 2;
    let cols = n.clamp(1, 10) as u32;
    let rows = n.div_ceil(10).max(1) as u32;
    let cell = SIDE as u32 * scale;
    let mut s = Sheet::new(cols * (cell + PAD) + PAD, rows * (LABEL + cell + PAD) + PAD);
    for k in 0..n {
        let (x, y) = (
            PAD + (k as u32 % 10) * (cell + PAD),
            (k as u32 / 10) * (LABEL + cell + PAD),
        );
        s.text(
            x as i32 + 2,
            y as i32 + LABEL_TOP,
            &format!("{},{}", labels[2 * k], labels[2 * k + 1]),
            12,
            [0, 0, 0],
        )?;
        let px: Vec<f32> = images[k * PIXELS..(k + 1) * PIXELS]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        s.digit(x, y + LABEL, &px, SIDE, scale);
    }
    Ok(s)
}

/// The epochs of the run that wrote `ckpt`: its directory's metrics.jsonl when there is one (the
/// whole run, also past a best checkpoint's epoch), else the history the checkpoint carries.
pub fn run_history(ckpt: &Path, ck: &Checkpoint) -> Result<Vec<EpochPoint>> {
    let beside = ckpt.parent().map(|d| d.join(METRICS)).filter(|p| p.is_file());
    if let Some(path) = beside {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::file(&path, format!("line {}: {e}", i + 1))))
            .collect::<Result<_>>()?;
        return epoch_points(&lines, &path);
    }
    epoch_points(&ck.history, ckpt)
}

/// Test-set evaluation of a checkpoint ([`crate::train::TestSet`]), and its figures when `figures`
/// says where ([`write_all`], or [`write_multi`] on MultiMNIST). The report and the files written.
pub fn eval_with_figures<B: crate::runtime::StepRuntime>(
    backend: B,
    ckpt: &Path,
    data_dir: &Path,
    opts: &EvalOptions,
    figures: Option<(&Path, &FigureOptions)>,
) -> Result<(EvalReport, Vec<PathBuf>)> {
    if let Some((_, f)) = figures {
        f.validate()?;
    }
    let set = TestSet::load(ckpt, data_dir, opts)?;
    let history = match figures {
        Some(_) => run_history(ckpt, &set.checkpoint)?,
        None => vec![],
    };
    set.evaluate(backend, |tape, model, src, examples, report| match (figures, src) {
        (None, _) => Ok(vec![]),
        (Some((out, f)), Source::Mnist(test)) => write_all(tape, model, test, report, &history, out, f),
        (Some((out, f)), Source::Multi(m)) => write_multi(tape, model, m, examples, report, &history, out, f),
    })
}
