//! `predict` and `figures` on a trained model: a small CapsNet (32 conv1 channels, 8 primary capsule
//! types) trained here for one epoch on 15,000 MNIST images (about 93% test accuracy, ~20 s on two
//! cores), once for the whole file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use capsnet::backend::fast::FastCpu;
use capsnet::checkpoint;
use capsnet::data::{self, MNIST_SIDE, Split, Which};
use capsnet::infer;
use capsnet::model::CapsNet;
use capsnet::tape::Tape;
use common::{assert_clean_error, capsnet, mnist_dir, stderr, stdout, temp_dir};
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};

/// The trained checkpoint (trained on first use), or the one `CAPSNET_TRAINED_CHECKPOINT` names (to
/// measure these tests' figures on a fully trained model).
fn trained() -> &'static Path {
    static CK: OnceLock<PathBuf> = OnceLock::new();
    CK.get_or_init(|| {
        if let Some(ck) = std::env::var_os("CAPSNET_TRAINED_CHECKPOINT") {
            return PathBuf::from(ck);
        }
        let dir = temp_dir(&format!("trained-{}", std::process::id()));
        let data = mnist_dir();
        let run = dir.join("run");
        let o = capsnet(
            &[
                "train",
                "--device",
                "cpu",
                "--data",
                data.to_str().unwrap(),
                "--epochs",
                "1",
                "--limit",
                "15000",
                "--val-limit",
                "1000",
                "--conv1-channels",
                "32",
                "--primary-maps",
                "8",
                "--checkpoint-dir",
                run.to_str().unwrap(),
            ],
            &[],
        );
        assert!(o.status.success(), "training the fixture failed:\n{}", stderr(&o));
        run.join("best.safetensors")
    })
}

fn test_split(n: usize) -> Split {
    data::load(&mnist_dir(), Which::Test).unwrap().slice(0..n)
}

/// The backend `--device cpu` runs by default (bf16 where the CPU has AMX, or AVX512_BF16 on an AMD CPU; else fp32).
fn default_cpu() -> FastCpu {
    FastCpu::with_precision(FastCpu::default_precision()).unwrap()
}

/// The lengths and predictions of the raw test pixels, as `eval` computes them (its pixel scaling,
/// batch 100, the CPU's default precision).
fn raw_classes(split: &Split) -> infer::Classified {
    let ck = checkpoint::load(trained()).unwrap();
    let mut tape = Tape::new(default_cpu());
    let model = CapsNet::from_checkpoint(&mut tape, &ck).unwrap();
    let idx: Vec<usize> = (0..split.len()).collect();
    let (x, _) = split.batch::<f32>(&idx);
    infer::classify(&mut tape, &model, &x, 100).unwrap()
}

fn digit(split: &Split, i: usize) -> GrayImage {
    let px = MNIST_SIDE * MNIST_SIDE;
    GrayImage::from_raw(28, 28, split.images[i * px..(i + 1) * px].to_vec()).unwrap()
}

/// The ways a user's picture of a test digit differs from MNIST's bytes.
#[derive(Clone, Copy, Debug)]
enum Variant {
    /// Scaled up to 56x56.
    Big,
    /// Scaled to 80x80 in a 100x80 canvas, off centre.
    Wide,
    /// Black on white, 28x28.
    Inverted,
    /// Dark blue ink on cream paper, 100x80.
    Colour,
}

fn render(d: &GrayImage, v: Variant) -> image::DynamicImage {
    use image::imageops::{FilterType, resize};
    let wide = |d: &GrayImage| {
        let s = resize(d, 80, 80, FilterType::CatmullRom);
        let mut c = GrayImage::new(100, 80);
        image::imageops::overlay(&mut c, &s, 14, 0);
        c
    };
    match v {
        Variant::Big => resize(d, 56, 56, FilterType::CatmullRom).into(),
        Variant::Wide => wide(d).into(),
        Variant::Inverted => ImageBuffer::from_fn(28, 28, |x, y| Luma([255 - d.get_pixel(x, y).0[0]])).into(),
        Variant::Colour => {
            let w = wide(d);
            let (paper, ink) = ([250.0, 240.0, 200.0], [20.0, 30.0, 120.0]);
            let img: RgbImage = ImageBuffer::from_fn(100, 80, |x, y| {
                let a = w.get_pixel(x, y).0[0] as f32 / 255.0;
                Rgb(std::array::from_fn(|c| {
                    (paper[c] * (1.0 - a) + ink[c] * a).round() as u8
                }))
            });
            img.into()
        }
    }
}

fn predict_json(files: &[PathBuf], extra: &[&str]) -> (std::process::Output, Vec<serde_json::Value>) {
    let ck = trained().to_str().unwrap().to_string();
    let mut args = vec!["predict", "--device", "cpu", "--json", "--checkpoint", &ck];
    args.extend(extra);
    let names: Vec<String> = files.iter().map(|f| f.to_str().unwrap().to_string()).collect();
    args.extend(names.iter().map(|s| s.as_str()));
    let o = capsnet(&args, &[]);
    let objs = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (o, objs)
}

fn lengths_of(obj: &serde_json::Value) -> Vec<f32> {
    obj["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn mnist_digits_as_28x28_pngs_get_exactly_evals_lengths() {
    let n = 60;
    let split = test_split(n);
    let raw = raw_classes(&split);
    let dir = temp_dir("predict-exact");
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let f = dir.join(format!("{i:02}.png"));
            digit(&split, i).save(&f).unwrap();
            f
        })
        .collect();
    let (o, objs) = predict_json(&files, &["--raw"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(objs.len(), n);
    for (i, obj) in objs.iter().enumerate() {
        assert_eq!(obj["file"], files[i].to_str().unwrap());
        assert_eq!(obj["resized"], false, "with --raw a 28x28 image is taken as it is");
        assert_eq!(lengths_of(obj), raw.lengths[i * 10..(i + 1) * 10], "image {i}");
        assert_eq!(obj["digit"], raw.pred[i]);
    }
    // the model is a real one: most of these are right
    let right = (0..n).filter(|&i| raw.pred[i] == split.labels[i] as u32).count();
    assert!(right >= n * 85 / 100, "{right} of {n} right");
}

/// Bound: at least 90% of the digits keep eval's class in every variant. Measured with this fixture
/// on 2026-11-26: 195 (56x56), 193 (100x80), 193 (colour) of 200. Each variant goes through the whole
/// preparation except the 28x28 inverted one, which is only inverted and must then agree exactly.
#[test]
fn resized_inverted_and_coloured_digits_mostly_keep_evals_class() {
    let n = 200;
    let split = test_split(n);
    let raw = raw_classes(&split);
    let dir = temp_dir("predict-variants");
    for v in [Variant::Big, Variant::Wide, Variant::Inverted, Variant::Colour] {
        let files: Vec<PathBuf> = (0..n)
            .map(|i| {
                let f = dir.join(format!("{v:?}-{i:03}.png"));
                render(&digit(&split, i), v).save(&f).unwrap();
                f
            })
            .collect();
        // the 28x28 inverted digits as they are: only inverted
        let flags: &[&str] = if matches!(v, Variant::Inverted) {
            &["--raw"]
        } else {
            &[]
        };
        let (o, objs) = predict_json(&files, flags);
        assert!(o.status.success(), "{v:?}: {}", stderr(&o));
        assert_eq!(objs.len(), n);
        let same = objs
            .iter()
            .enumerate()
            .filter(|(i, obj)| obj["digit"] == raw.pred[*i])
            .count();
        let inverted = objs.iter().filter(|o| o["inverted"] == true).count();
        eprintln!("{v:?}: {same} of {n} keep eval's class, {inverted} inverted");
        match v {
            Variant::Inverted => {
                assert_eq!(inverted, n);
                assert_eq!(same, n, "inverting back gives the same pixels");
            }
            Variant::Colour => assert_eq!(inverted, n, "dark ink on light paper is inverted"),
            _ => assert_eq!(inverted, 0),
        }
        assert!(same * 100 >= n * 90, "{v:?}: only {same} of {n} keep eval's class");
    }
}

/// The ways a photo of a test digit differs from MNIST's bytes (the digit scaled to 60x60 in a
/// 100x80 picture unless said otherwise; dark ink on light paper).
#[derive(Clone, Copy, Debug)]
enum Photo {
    /// A shadow over the left quarter: the paper there 90 levels darker.
    ShadowBand,
    /// Light falling off from right to left: the paper from 230 to 170.
    Gradient,
    /// Gaussian noise of σ = 18 levels on every pixel.
    Noise,
    /// White ink on a transparent sheet (RGBA).
    Transparent,
    /// MNIST's 28x28 digit moved 4 px right and 3 px up.
    OffCentre28,
}

fn photo(d: &GrayImage, v: Photo, rng: &mut common::Lcg) -> image::DynamicImage {
    use image::imageops::{FilterType, resize};
    let big = resize(d, 60, 60, FilterType::CatmullRom);
    let ink_at = |x: u32, y: u32| -> f32 {
        let (dx, dy) = (x as i64 - 32, y as i64 - 10);
        if (0..60).contains(&dx) && (0..60).contains(&dy) {
            big.get_pixel(dx as u32, dy as u32).0[0] as f32 / 255.0
        } else {
            0.0
        }
    };
    let on_paper = |paper: f32, a: f32| (paper * (1.0 - a) + 25.0 * a).round().clamp(0.0, 255.0) as u8;
    match v {
        Photo::ShadowBand => ImageBuffer::from_fn(100, 80, |x, y| {
            let paper = if x < 25 { 140.0 } else { 230.0 };
            Luma([on_paper(paper, ink_at(x, y))])
        })
        .into(),
        Photo::Gradient => ImageBuffer::from_fn(100, 80, |x, y| {
            Luma([on_paper(170.0 + 60.0 * x as f32 / 99.0, ink_at(x, y))])
        })
        .into(),
        Photo::Noise => {
            let img: GrayImage = ImageBuffer::from_fn(100, 80, |x, y| {
                let (u1, u2) = (rng.next_f64().max(1e-12), rng.next_f64());
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                let p = on_paper(220.0, ink_at(x, y)) as f64 + 18.0 * z;
                Luma([p.round().clamp(0.0, 255.0) as u8])
            });
            img.into()
        }
        Photo::Transparent => {
            let img: image::RgbaImage = ImageBuffer::from_fn(100, 80, |x, y| {
                image::Rgba([255, 255, 255, (ink_at(x, y) * 255.0).round() as u8])
            });
            img.into()
        }
        Photo::OffCentre28 => ImageBuffer::from_fn(28, 28, |x, y| {
            let (sx, sy) = (x as i64 - 4, y as i64 + 3);
            let p = if (0..28).contains(&sx) && (0..28).contains(&sy) {
                d.get_pixel(sx as u32, sy as u32).0[0]
            } else {
                0
            };
            Luma([p])
        })
        .into(),
    }
}

/// Bound: at least 90% of the digits keep eval's class in every photo-like variant (measured with
/// this fixture in the commit that added the test: see docs/CLI.md, predict). An off-centre 28x28
/// digit is centred like any other image, unless --raw says to take it as it is. Pure noise is
/// flagged as not confident.
#[test]
fn shadows_gradients_noise_transparency_and_off_centre_digits_keep_evals_class() {
    let n = 200;
    let split = test_split(n);
    let raw = raw_classes(&split);
    let dir = temp_dir("predict-photos");
    let mut rng = common::Lcg(5);
    for v in [
        Photo::ShadowBand,
        Photo::Gradient,
        Photo::Noise,
        Photo::Transparent,
        Photo::OffCentre28,
    ] {
        let files: Vec<PathBuf> = (0..n)
            .map(|i| {
                let f = dir.join(format!("{v:?}-{i:03}.png"));
                photo(&digit(&split, i), v, &mut rng).save(&f).unwrap();
                f
            })
            .collect();
        let (o, objs) = predict_json(&files, &[]);
        assert!(o.status.success(), "{v:?}: {}", stderr(&o));
        let same = (0..n).filter(|&i| objs[i]["digit"] == raw.pred[i]).count();
        let right = (0..n).filter(|&i| objs[i]["digit"] == split.labels[i] as u32).count();
        eprintln!("{v:?}: {same} of {n} keep eval's class, {right} are the label");
        let mut sep: Vec<f64> = objs.iter().map(|o| o["separation"].as_f64().unwrap()).collect();
        sep.sort_by(f64::total_cmp);
        eprintln!("{v:?}: separation from {:.3} (median {:.3})", sep[0], sep[n / 2]);
        let doubted = objs.iter().filter(|o| o["confident"] == false).count();
        let short = (0..n)
            .filter(|&i| raw.lengths[i * 10 + raw.pred[i] as usize] <= 0.5)
            .count();
        assert!(
            doubted <= short + n / 20,
            "{v:?}: {doubted} flagged, {short} short capsules in eval"
        );
        assert!(same * 100 >= n * 90, "{v:?}: only {same} of {n} keep eval's class");
        if let Photo::OffCentre28 = v {
            let (_, as_is) = predict_json(&files, &["--raw"]);
            let kept = (0..n).filter(|&i| as_is[i]["digit"] == raw.pred[i]).count();
            eprintln!("{v:?} with --raw: {kept} of {n} keep eval's class");
            assert!(kept < same, "--raw takes the digit off centre: {kept} vs {same}");
        }
    }
    // a directory is its image files; pure noise is not confidently a digit
    let noise_dir = temp_dir("predict-noise");
    for k in 0..5 {
        let img: GrayImage = ImageBuffer::from_fn(64, 64, |_, _| Luma([(rng.next_f64() * 255.0).round() as u8]));
        img.save(noise_dir.join(format!("noise-{k}.png"))).unwrap();
    }
    std::fs::write(noise_dir.join("notes.txt"), b"not an image").unwrap();
    let (_, objs) = predict_json(std::slice::from_ref(&noise_dir), &[]);
    assert_eq!(
        objs.len(),
        5,
        "the directory's five images, not its text file: {objs:?}"
    );
    // each is either no digit at all or a digit flagged as not confident
    for o in &objs {
        let no_digit = o["error"].as_str().is_some_and(|e| e.contains("no digit found"));
        assert!(no_digit || o["confident"] == false, "pure noise: {o}");
    }
    let doubtful = objs
        .iter()
        .find(|o| o["confident"] == false)
        .expect("one noise image is predicted");
    let ck = trained().to_str().unwrap().to_string();
    let one = doubtful["file"].as_str().unwrap();
    let o = capsnet(&["predict", "--device", "cpu", "--checkpoint", &ck, one], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("not confident"), "{}", stdout(&o));
    let empty = temp_dir("predict-empty-dir");
    let o = capsnet(
        &[
            "predict",
            "--device",
            "cpu",
            "--checkpoint",
            &ck,
            empty.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&o, &[empty.to_str().unwrap(), "without image files"]);
}

/// A PNG that declares `w` x `h` but holds no pixel data (a few dozen bytes).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = vec![];
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]); // an empty zlib stream
    chunk(b"IEND", &[]);
    out
}

#[test]
fn broken_images_are_named_and_the_others_still_predicted() {
    let split = test_split(1);
    let dir = temp_dir("predict-broken");
    let good = dir.join("good.png");
    digit(&split, 0).save(&good).unwrap();
    let mut full = vec![];
    render(&digit(&split, 0), Variant::Wide)
        .write_to(&mut std::io::Cursor::new(&mut full), image::ImageFormat::Png)
        .unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.png", full[..full.len() / 2].to_vec(), "cannot decode"),
        ("empty.png", vec![], "empty (0 bytes)"),
        ("notes.txt", b"seven, I think\n".to_vec(), "not an image"),
        ("huge.png", png_header_only(10_000, 10_000), "10000x10000"),
    ];
    let mut files = vec![good.clone()];
    for (name, bytes, _) in &cases {
        let f = dir.join(name);
        std::fs::write(&f, bytes).unwrap();
        files.push(f);
    }
    let one = dir.join("one.png");
    GrayImage::from_pixel(1, 1, Luma([200])).save(&one).unwrap();
    files.push(one);
    files.push(dir.join("missing.png"));
    let (o, objs) = predict_json(&files, &[]);
    let err = stderr(&o);
    assert_clean_error(&o, &["6 of 7 images could not be predicted"]);
    for (name, _, why) in &cases {
        let line = err
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not named:\n{err}"));
        assert!(line.contains(why), "{name}: {line}");
    }
    assert!(err.contains("one.png") && err.contains("blank"), "{err}");
    assert!(err.contains("missing.png") && err.contains("cannot read"), "{err}");
    // the good image is still predicted, in its place, and every file has its object
    assert_eq!(objs.len(), 7);
    assert!(objs[0]["digit"].is_u64() && objs[0]["error"].is_null(), "{}", objs[0]);
    assert!(objs[1..].iter().all(|o| o["error"].is_string()));
}

#[test]
fn predict_text_output_threshold_and_saved_inputs() {
    let split = test_split(3);
    let dir = temp_dir("predict-save");
    let files: Vec<PathBuf> = (0..3)
        .map(|i| {
            let f = dir.join(format!("in/{}.png", if i == 2 { "a/d" } else { "d" }));
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            if i == 1 {
                // the same name in another directory: a second file, not an overwrite
                let f = dir.join("in/b/d.png");
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                render(&digit(&split, i), Variant::Wide).save(&f).unwrap();
                return f;
            }
            render(&digit(&split, i), Variant::Wide).save(&f).unwrap();
            f
        })
        .collect();
    let out = dir.join("seen");
    let ck = trained().to_str().unwrap();
    let mut args = vec![
        "predict",
        "--device",
        "cpu",
        "--checkpoint",
        ck,
        "--save-input",
        out.to_str().unwrap(),
    ];
    // a file whose own name is what the second "d" became: it must not overwrite that one's files
    let taken = dir.join("in/c/d-2.png");
    std::fs::create_dir_all(taken.parent().unwrap()).unwrap();
    render(&digit(&split, 2), Variant::Big).save(&taken).unwrap();
    let mut names: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    names.push(taken.to_str().unwrap());
    args.extend(&names);
    let o = capsnet(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("  lengths 0:")).count(),
        4,
        "{text}"
    );
    for n in ["d", "d-2", "d-3", "d-2-2"] {
        for what in ["input", "recon"] {
            let f = out.join(format!("{n}.{what}.png"));
            assert_eq!(image::image_dimensions(&f).unwrap(), (28, 28), "{}", f.display());
        }
    }
    // the saved input is the prepared image: centred, light on dark, the digit's box 20 high or wide
    let seen = image::open(out.join("d.input.png")).unwrap().to_luma8();
    assert!(seen.get_pixel(0, 0).0[0] == 0 && seen.pixels().any(|p| p.0[0] > 200));
    // threshold 0 reports every digit as present
    let (o, objs) = predict_json(&files[..1], &["--threshold", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(objs[0]["present"].as_array().unwrap().len(), 10);
    let o = capsnet(&["predict", "--checkpoint", ck, "--threshold", "1.5", names[0]], &[]);
    assert_clean_error(&o, &["--threshold", "1.5"]);
}

fn trained_model() -> (Tape<FastCpu>, CapsNet) {
    let ck = checkpoint::load(trained()).unwrap();
    let mut tape = Tape::new(default_cpu());
    let model = CapsNet::from_checkpoint(&mut tape, &ck).unwrap();
    (tape, model)
}

/// The grey level the sheets draw for a pixel value.
fn shade(p: f32) -> u8 {
    255 - (p.clamp(0.0, 1.0) * 255.0).round() as u8
}

#[test]
fn reconstructions_are_the_decoders_and_follow_the_capsules() {
    use capsnet::figures::{self, LABEL, PAD, RECON_LEFT};
    let (n, side, scale) = (6usize, 28usize, 2u32);
    let split = test_split(n);
    let (mut tape, model) = trained_model();
    let (x, y) = split.batch::<f32>(&(0..n).collect::<Vec<_>>());
    let c = infer::classify(&mut tape, &model, &x, 100).unwrap();
    let recon = infer::reconstruct(&mut tape, &model, &c.v, &c.pred, 100).unwrap();
    let sheet = figures::reconstructions(&x, &recon, &c.pred, &y, side, scale).unwrap();
    let cell = side as u32 * scale;
    assert_eq!(
        sheet.img.dimensions(),
        (
            RECON_LEFT + n as u32 * (cell + PAD) + PAD,
            LABEL + 2 * (cell + PAD) + PAD
        )
    );
    // every cell of the lower row is the decoder's output, pixel for pixel
    let px = side * side;
    for k in 0..n {
        for i in 0..px {
            let (cx, cy) = (RECON_LEFT + k as u32 * (cell + PAD), LABEL + cell + PAD);
            let (sx, sy) = (cx + (i % side) as u32 * scale, cy + (i / side) as u32 * scale);
            assert_eq!(sheet.img.get_pixel(sx + 1, sy + 1).0[0], shade(recon[k * px + i]));
            let top = sheet.img.get_pixel(sx, LABEL + (i / side) as u32 * scale).0[0];
            assert_eq!(top, shade(x[k * px + i]), "the upper row is the input");
        }
    }
    // another capsule, another picture: shrink the predicted capsules, and the lower row changes
    let mut v = c.v.clone();
    v.iter_mut().for_each(|e| *e *= 0.3);
    let faint = infer::reconstruct(&mut tape, &model, &v, &c.pred, 100).unwrap();
    let diff = recon
        .iter()
        .zip(&faint)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 0.2, "the decoder ignores its capsules: largest change {diff}");
    let other = figures::reconstructions(&x, &faint, &c.pred, &y, side, scale).unwrap();
    let band = |s: &figures::Sheet, y0: u32, y1: u32| -> Vec<u8> {
        (y0..y1)
            .flat_map(|yy| (0..s.img.width()).map(move |xx| (xx, yy)))
            .map(|(xx, yy)| s.img.get_pixel(xx, yy).0[0])
            .collect()
    };
    let (upper, lower) = ((LABEL, LABEL + cell), (LABEL + cell + PAD, LABEL + 2 * cell + PAD));
    assert_eq!(band(&sheet, upper.0, upper.1), band(&other, upper.0, upper.1));
    assert_ne!(band(&sheet, lower.0, lower.1), band(&other, lower.0, lower.1));
}

#[test]
fn tweak_rows_change_along_the_row_and_pass_through_the_plain_reconstruction() {
    use capsnet::figures::{self, LABEL, PAD, TWEAK_LEFT, TWEAK_STEPS};
    let (digits, side) = (2usize, 28usize);
    let split = test_split(digits);
    let (mut tape, model) = trained_model();
    let (x, _) = split.batch::<f32>(&(0..digits).collect::<Vec<_>>());
    let c = infer::classify(&mut tape, &model, &x, 100).unwrap();
    let plain = infer::reconstruct(&mut tape, &model, &c.v, &c.pred, 100).unwrap();
    let dims = model.cfg.caps2_dim;
    let (tv, keep) = figures::tweaked_capsules(&c, digits, model.cfg.classes, dims);
    assert_eq!(keep.len(), dims * digits * TWEAK_STEPS);
    let recon = infer::reconstruct(&mut tape, &model, &tv, &keep, 176).unwrap();
    let px = side * side;
    let at = |d: usize, k: usize, step: usize| &recon[((d * digits + k) * TWEAK_STEPS + step) * px..][..px];
    let mut moved = vec![];
    for d in 0..dims {
        for k in 0..digits {
            // the middle step shifts by exactly 0: the plain reconstruction
            let mid = at(d, k, TWEAK_STEPS / 2);
            let off = mid
                .iter()
                .zip(&plain[k * px..(k + 1) * px])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(off < 1e-5, "dim {d}, digit {k}: the unshifted picture differs by {off}");
            let ends = at(d, k, 0)
                .iter()
                .zip(at(d, k, TWEAK_STEPS - 1))
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>();
            moved.push(ends);
            for s in 1..TWEAK_STEPS {
                assert_ne!(
                    at(d, k, s - 1),
                    at(d, k, s),
                    "dim {d}, digit {k}: steps {} and {s} are the same picture",
                    s - 1
                );
            }
        }
    }
    // the pictures really change, not by rounding: on average the ends of a row differ by many grey levels
    let mean = moved.iter().sum::<f32>() / moved.len() as f32;
    assert!(mean > 1.0, "rows barely change: mean summed difference {mean}");
    let sheet = figures::tweaks(&recon, dims, digits, side, 1).unwrap();
    let group = TWEAK_STEPS as u32 * side as u32;
    assert_eq!(
        sheet.img.dimensions(),
        (
            TWEAK_LEFT + digits as u32 * (group + 8 * PAD),
            LABEL + dims as u32 * side as u32 + PAD
        )
    );
}

#[test]
fn figures_and_eval_figures_write_every_png_and_refuse_bad_flags() {
    let data = mnist_dir();
    let ck = trained().to_str().unwrap().to_string();
    let dir = temp_dir("figures-cli");
    let out = dir.join("figs");
    let o = capsnet(
        &[
            "figures",
            "--checkpoint",
            &ck,
            "--out",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
            "--limit",
            "300",
            "--count",
            "7",
            "--tweak-digits",
            "2",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dims = |name: &str| image::image_dimensions(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cell = 56;
    use capsnet::figures::{LABEL, PAD, RECON_LEFT, TWEAK_LEFT, TWEAK_STEPS};
    assert_eq!(
        dims("reconstructions.png"),
        (RECON_LEFT + 7 * (cell + PAD) + PAD, LABEL + 2 * (cell + PAD) + PAD)
    );
    let group = TWEAK_STEPS as u32 * cell;
    assert_eq!(
        dims("tweaks.png"),
        (TWEAK_LEFT + 2 * (group + 8 * PAD), LABEL + 16 * cell + PAD)
    );
    // every label whole: nothing drawn on the top rows of a sheet or of a band of labels
    let blank_rows = |name: &str, rows: std::ops::Range<u32>| {
        let img = image::open(out.join(name)).unwrap().to_luma8();
        for y in rows {
            let dark = (0..img.width()).filter(|&x| img.get_pixel(x, y).0[0] < 200).count();
            assert_eq!(
                dark, 0,
                "{name}: row {y} has {dark} drawn pixels (a label cut at the top)"
            );
        }
        img
    };
    blank_rows("reconstructions.png", 0..2);
    blank_rows("errors.png", 0..2);
    let tweaks = blank_rows("tweaks.png", 0..2);
    // the first panel's "+0.25" and the second's "-0.25" stay apart: 16 clear columns between them
    let inked = |x: u32| (2..LABEL).any(|y| tweaks.get_pixel(x, y).0[0] < 200);
    let end_of_first = TWEAK_LEFT + group;
    let clear = (end_of_first - 20..end_of_first + 8 * PAD + 20)
        .map(inked)
        .collect::<Vec<bool>>()
        .split(|&ink| ink)
        .map(<[bool]>::len)
        .max()
        .unwrap();
    assert!(clear >= 16, "only {clear} clear columns between the panels' headings");
    assert_eq!(dims("curves.png"), (1000, 400));
    assert_eq!(dims("confusion.png"), (64 + 10 * 44 + 8, 40 + 10 * 44 + 8));
    // about 7% of 300 are wrong: at least a row of 10
    let (ew, eh) = dims("errors.png");
    assert!(ew == 10 * (cell + PAD) + PAD && eh >= LABEL + cell + PAD, "{ew}x{eh}");
    // no temporary file is left behind
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    // eval --figures: the usual report and the same files
    let out2 = dir.join("eval-figs");
    let o = capsnet(
        &[
            "eval",
            "--checkpoint",
            &ck,
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
            "--limit",
            "200",
            "--figures",
            out2.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("test accuracy:") && text.contains("confusion matrix"),
        "{text}"
    );
    for f in [
        "reconstructions.png",
        "tweaks.png",
        "errors.png",
        "confusion.png",
        "curves.png",
    ] {
        assert!(
            text.contains(&format!("wrote {}", out2.join(f).display())),
            "{f}: {text}"
        );
        assert!(out2.join(f).is_file(), "{f}");
    }
    // bad flags are refused before the evaluation
    for (flag, value) in [("--count", "0"), ("--scale", "20"), ("--tweak-digits", "11")] {
        let o = capsnet(
            &[
                "figures",
                "--checkpoint",
                &ck,
                "--out",
                out.to_str().unwrap(),
                "--data",
                "/nonexistent",
                flag,
                value,
            ],
            &[],
        );
        assert_clean_error(&o, &[flag, value]);
    }
    let o = capsnet(
        &[
            "figures",
            "--checkpoint",
            "/nonexistent.safetensors",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&o, &["/nonexistent.safetensors"]);
}
