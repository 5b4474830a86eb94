//! `capsnet multimnist`: MultiMNIST examples as IDX files and a sample grid.

use capsnet::{Error, Result, data};

use super::args::*;

pub fn run(a: MultiMnistArgs) -> Result<()> {
    use capsnet::multimnist::{self, MultiMnist};
    const MAX: usize = 10_000_000;
    if a.count == 0 || a.count > MAX {
        return Err(Error::msg(format!(
            "--count must be between 1 and {MAX}, got {}",
            a.count
        )));
    }
    let (digits, name) = match a.split {
        SplitArg::Test => (data::load(&a.data.data, data::Which::Test)?, "test"),
        SplitArg::Train | SplitArg::Validation => {
            let (t, v) = data::train_val(data::load(&a.data.data, data::Which::Train)?, None, None)?;
            if a.split == SplitArg::Train {
                (t, "train")
            } else {
                (v, "validation")
            }
        }
    };
    let seed = a.seed.unwrap_or(if a.split == SplitArg::Test {
        multimnist::TEST_SEED
    } else {
        42
    });
    let m = MultiMnist::new(&digits, seed)?;
    if a.count > m.len() {
        return Err(Error::msg(format!(
            "--count {} exceeds the {} examples of the {name} split",
            a.count,
            m.len()
        )));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::file(&a.out, format!("cannot create the directory: {e}")))?;
    let (mut images, mut labels) = (Vec::with_capacity(a.count * multimnist::PIXELS), vec![]);
    for j in 0..a.count {
        let e = m.example(m.nth(j));
        images.extend(&e.image);
        labels.extend(e.labels);
    }
    let files = [
        (
            format!("multimnist-{name}-images-idx3-ubyte"),
            multimnist::idx_images(&images, a.count, multimnist::SIDE),
        ),
        (
            format!("multimnist-{name}-labels-idx2-ubyte"),
            multimnist::idx_label_pairs(&labels, a.count),
        ),
    ];
    for (f, bytes) in files {
        let p = a.out.join(f);
        capsnet::error::write_atomic(&p, &bytes)?;
        println!("wrote {} ({} bytes)", p.display(), bytes.len());
    }
    let shown = a.count.min(100);
    let sheet = capsnet::figures::multimnist_sheet(&images[..shown * multimnist::PIXELS], &labels[..2 * shown], 2)?;
    let p = a.out.join(format!("multimnist-{name}-sample.png"));
    sheet.save(&p)?;
    println!(
        "wrote {} (the first {shown} examples; seed {seed}; pixels combined by clipped sum)",
        p.display()
    );
    Ok(())
}
