//! MNIST reading: every malformed file gets an error naming the file and the problem; the real files
//! load; the download verifies checksums, writes atomically and fails clearly without a network.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsnet::data::{self, Which};
use common::{mnist_dir, temp_dir};

fn idx_images(n: u32, rows: u32, cols: u32, pixels: usize) -> Vec<u8> {
    let mut b = vec![];
    for v in [0x803, n, rows, cols] {
        b.extend(u32::to_be_bytes(v));
    }
    b.extend((0..pixels).map(|i| (i % 251) as u8));
    b
}

fn idx_labels(n: u32, labels: &[u8]) -> Vec<u8> {
    let mut b = vec![];
    for v in [0x801, n] {
        b.extend(u32::to_be_bytes(v));
    }
    b.extend(labels);
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes a test split (t10k names) into a fresh directory.
fn write_split(name: &str, images: &[u8], labels: &[u8]) -> PathBuf {
    let d = temp_dir(name);
    std::fs::write(d.join("t10k-images-idx3-ubyte"), images).unwrap();
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), labels).unwrap();
    d
}

fn load_err(dir: &Path) -> String {
    data::load(dir, Which::Test)
        .expect_err("malformed data must be refused")
        .to_string()
}

#[test]
fn well_formed_small_files_load_raw_and_gzipped() {
    let (img, lbl) = (idx_images(3, 28, 28, 3 * 784), idx_labels(3, &[0, 9, 4]));
    let d = write_split("data_ok_raw", &img, &lbl);
    let s = data::load(&d, Which::Test).unwrap();
    assert_eq!((s.len(), s.labels.clone(), s.images.len()), (3, vec![0, 9, 4], 3 * 784));
    let d = temp_dir("data_ok_gz");
    std::fs::write(d.join("t10k-images-idx3-ubyte.gz"), gz(&img)).unwrap();
    std::fs::write(d.join("t10k-labels-idx1-ubyte.gz"), gz(&lbl)).unwrap();
    assert_eq!(data::load(&d, Which::Test).unwrap(), s);
}

#[test]
fn missing_directory_and_missing_file_are_named() {
    let e = data::load(Path::new("/nonexistent/mnist"), Which::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/mnist") && e.contains("not found"), "{e}");
    let d = temp_dir("data_missing_file");
    std::fs::write(d.join("t10k-images-idx3-ubyte"), idx_images(1, 28, 28, 784)).unwrap();
    let e = load_err(&d);
    assert!(e.contains("t10k-labels-idx1-ubyte") && e.contains("not found"), "{e}");
}

#[test]
fn truncated_files_are_refused() {
    let d = write_split(
        "data_trunc_px",
        &idx_images(3, 28, 28, 2 * 784 + 100),
        &idx_labels(3, &[1, 2, 3]),
    );
    let e = load_err(&d);
    assert!(e.contains("t10k-images-idx3-ubyte") && e.contains("truncated"), "{e}");
    let d = write_split(
        "data_trunc_hdr",
        &idx_images(3, 28, 28, 3 * 784)[..10],
        &idx_labels(3, &[1, 2, 3]),
    );
    assert!(load_err(&d).contains("shorter than the 16-byte IDX header"));
    let d = write_split(
        "data_trunc_lbl",
        &idx_images(3, 28, 28, 3 * 784),
        &idx_labels(3, &[1, 2]),
    );
    let e = load_err(&d);
    assert!(e.contains("t10k-labels-idx1-ubyte") && e.contains("truncated"), "{e}");
    // a gzip stream cut short
    let d = temp_dir("data_trunc_gz");
    let g = gz(&idx_images(3, 28, 28, 3 * 784));
    std::fs::write(d.join("t10k-images-idx3-ubyte.gz"), &g[..g.len() / 2]).unwrap();
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), idx_labels(3, &[1, 2, 3])).unwrap();
    let e = load_err(&d);
    assert!(e.contains("t10k-images-idx3-ubyte.gz") && e.contains("gzip"), "{e}");
}

#[test]
fn wrong_magic_wrong_size_and_trailing_bytes_are_refused() {
    let mut img = idx_images(2, 28, 28, 2 * 784);
    img[3] = 0x01; // now 0x801: a label file's magic
    let d = write_split("data_magic", &img, &idx_labels(2, &[1, 2]));
    let e = load_err(&d);
    assert!(
        e.contains("wrong magic number 0x00000801") && e.contains("0x00000803"),
        "{e}"
    );
    let d = write_split("data_size", &idx_images(2, 32, 32, 2 * 1024), &idx_labels(2, &[1, 2]));
    assert!(load_err(&d).contains("32x32, expected 28x28"));
    let d = write_split(
        "data_trailing",
        &idx_images(2, 28, 28, 2 * 784 + 5),
        &idx_labels(2, &[1, 2]),
    );
    assert!(load_err(&d).contains("5 bytes after the 2 images"));
}

#[test]
fn count_mismatch_and_bad_labels_are_refused() {
    let d = write_split("data_count", &idx_images(3, 28, 28, 3 * 784), &idx_labels(2, &[1, 2]));
    let e = load_err(&d);
    assert!(e.contains("3 images") && e.contains("2 labels"), "{e}");
    let d = write_split(
        "data_label",
        &idx_images(3, 28, 28, 3 * 784),
        &idx_labels(3, &[1, 12, 2]),
    );
    assert!(load_err(&d).contains("label 12 at index 1 is not a digit 0-9"));
}

#[test]
fn real_mnist_loads_with_the_published_checksums() {
    let dir = mnist_dir();
    let train = data::load(&dir, Which::Train).unwrap();
    let test = data::load(&dir, Which::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60000, 10000));
    for (name, sha) in data::FILES {
        let p = data::find(&dir, name).unwrap();
        assert_eq!(data::sha256_hex(&data::read_maybe_gz(&p).unwrap()), sha, "{name}");
    }
    let (tr, val) = data::train_val(train.clone(), None, None).unwrap();
    assert_eq!((tr.len(), val.len()), (55000, 5000));
    assert_eq!(
        val.labels[..],
        train.labels[55000..],
        "validation is the last 5,000 training images"
    );
    let (tr, val) = data::train_val(train, Some(100), Some(30)).unwrap();
    assert_eq!((tr.len(), val.len()), (100, 30));
}

/// Serves `dir`'s files over HTTP on loopback, for at most `max` connections.
fn serve(dir: PathBuf, max: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut s) = stream else { continue };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            if r.read_line(&mut line).is_err() {
                continue;
            }
            // drain the headers
            let mut h = String::new();
            while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                h.clear();
            }
            let path = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/')
                .to_string();
            let (status, body) = match std::fs::read(dir.join(&path)) {
                Ok(b) => ("200 OK", b),
                Err(_) => ("404 Not Found", b"no such file".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}/")
}

#[test]
fn download_checks_checksums_and_fails_clearly() {
    // 1. a mirror serving the real files: all four arrive, verified, and load
    let mirror = serve(mnist_dir(), 16);
    let target = temp_dir("download_ok");
    let report = data::download(&target, std::slice::from_ref(&mirror)).unwrap();
    assert_eq!(report.len(), 4, "{report:?}");
    assert!(report.iter().all(|l| l.contains("checksum ok")), "{report:?}");
    assert_eq!(data::load(&target, Which::Test).unwrap().len(), 10000);
    // a second run finds them present
    assert!(
        data::download(&target, &[mirror])
            .unwrap()
            .iter()
            .all(|l| l.contains("present"))
    );

    // 2. a mirror serving wrong content: refused, nothing written
    let fake = temp_dir("download_fake_src");
    for (name, _) in data::FILES {
        std::fs::write(fake.join(format!("{name}.gz")), gz(b"not mnist")).unwrap();
    }
    let mirror = serve(fake, 16);
    let target = temp_dir("download_bad_sum");
    let e = data::download(&target, &[mirror]).unwrap_err().to_string();
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("does not match"),
        "{e}"
    );
    assert!(
        e.contains("no mirror gave the file") && !e.contains("network"),
        "a wrong checksum is not a network problem: {e}"
    );
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing may be left behind"
    );

    // 3. a mirror without the files: HTTP 404, named as such, not blamed on the network
    let mirror = serve(temp_dir("download_empty_src"), 4);
    let target = temp_dir("download_404");
    let e = data::download(&target, &[mirror]).unwrap_err().to_string();
    assert!(e.contains("HTTP 404") && !e.contains("network"), "{e}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

    // 4. no network: a closed port on loopback refuses at once
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // dropped: now closed
    let target = temp_dir("download_offline");
    let e = data::download(&target, &[format!("http://{closed}/")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot download train-images-idx3-ubyte") && e.contains("network"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}
