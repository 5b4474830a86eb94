//! `capsnet serve`: its JSON API over HTTP, and its page in a real browser (headless Chromium driven
//! through chromedriver's WebDriver API): a digit drawn with pointer strokes, a slider moved, a broken
//! file dropped, the gallery of errors opened. The model is a small CapsNet trained here for one
//! epoch on 10,000 MNIST images, once for the whole file.
//!
//! The browser test needs `chromium` and `chromedriver` (Debian's `chromium` and `chromium-driver`;
//! `.ci/run` installs them), or `CAPSNET_CHROMEDRIVER` and `CAPSNET_CHROMIUM` naming them; without
//! them it fails saying so. `CAPSNET_SCREENSHOT=FILE` also saves the page as the test leaves it, and
//! `CAPSNET_TRAINED_CHECKPOINT` serves that checkpoint instead of training one.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use capsnet::data::{self, MNIST_SIDE, Split, Which};
use common::{assert_clean_error, capsnet, capsnet_command, mnist_dir, stderr, temp_dir};
use serde_json::{Value, json};

fn trained() -> &'static Path {
    static CK: OnceLock<PathBuf> = OnceLock::new();
    CK.get_or_init(|| {
        if let Some(ck) = std::env::var_os("CAPSNET_TRAINED_CHECKPOINT") {
            return PathBuf::from(ck);
        }
        let run = temp_dir(&format!("serve-model-{}", std::process::id())).join("run");
        let data = mnist_dir();
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
                "10000",
                "--val-limit",
                "500",
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

fn digit_pixels(split: &Split, i: usize) -> Vec<f64> {
    let px = MNIST_SIDE * MNIST_SIDE;
    split.images[i * px..(i + 1) * px]
        .iter()
        .map(|&b| b as f64 / 255.0)
        .collect()
}

/// A running `capsnet serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Server {
    let ck = trained().to_str().unwrap().to_string();
    let data = mnist_dir();
    let mut args = vec!["serve", "--checkpoint", &ck, "--port", "0", "--device", "cpu"];
    args.extend(["--data", data.to_str().unwrap()]);
    args.extend(extra);
    let mut child = capsnet_command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("capsnet serve starts");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("capsnet serve prints its address within a minute");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches('/')
        .to_string();
    Server { child, url }
}

/// One HTTP/1.1 request on its own connection: (status, body). A small client of std's sockets keeps
/// this test executable small. It reads a Content-Length or chunked body to its end (a server may
/// keep the connection open despite `Connection: close`), else until the server closes.
fn http(method: &str, url: &str, body: Option<(&[u8], &str)>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// address");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut sock = std::net::TcpStream::connect(host)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    sock.set_write_timeout(Some(Duration::from_secs(60)))?;
    let (bytes, ct) = body.unwrap_or((&[], "application/json"));
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if body.is_some() || method != "GET" {
        head += &format!("Content-Type: {ct}\r\nContent-Length: {}\r\n", bytes.len());
    }
    head += "\r\n";
    sock.write_all(head.as_bytes())?;
    // a server may answer (413) and stop reading before a large body is sent whole
    let _ = sock.write_all(bytes);

    let mut raw: Vec<u8> = vec![];
    let mut buf = [0u8; 16384];
    // reads more into `raw`; false at the end of the stream
    let mut more = |raw: &mut Vec<u8>| -> std::io::Result<bool> {
        match sock.read(&mut buf) {
            Ok(0) => Ok(false),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            Err(e) if raw.is_empty() => Err(e),
            Err(_) => Ok(false),
        }
    };
    let find = |raw: &[u8], pat: &[u8], from: usize| {
        raw.get(from..)
            .and_then(|r| r.windows(pat.len()).position(|w| w == pat))
            .map(|p| p + from)
    };
    let split = loop {
        if let Some(p) = find(&raw, b"\r\n\r\n", 0) {
            break p;
        }
        if !more(&mut raw)? {
            return Err(std::io::Error::other(format!("no HTTP head in {} bytes", raw.len())));
        }
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let start = split + 4;
    let payload = if let Some(n) = header("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        while raw.len() < start + n && more(&mut raw)? {}
        raw[start..(start + n).min(raw.len())].to_vec()
    } else if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        let (mut out, mut at) = (vec![], start);
        loop {
            let Some(eol) = find(&raw, b"\r\n", at) else {
                if more(&mut raw)? {
                    continue;
                }
                break;
            };
            let size = String::from_utf8_lossy(&raw[at..eol]).trim().to_string();
            let n = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            if n == 0 {
                break;
            }
            while raw.len() < eol + 2 + n + 2 && more(&mut raw)? {}
            out.extend_from_slice(&raw[eol + 2..(eol + 2 + n).min(raw.len())]);
            at = eol + 2 + n + 2;
        }
        out
    } else {
        while more(&mut raw)? {}
        raw[start..].to_vec()
    };
    Ok((status, String::from_utf8_lossy(&payload).to_string()))
}

/// (status, JSON body) of a request; `body` None is a GET.
fn call(url: &str, body: Option<(&[u8], &str)>) -> (u16, Value) {
    let method = if body.is_some() { "POST" } else { "GET" };
    let (status, text) = http(method, url, body).unwrap_or_else(|e| panic!("{url}: {e}"));
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"));
    (status, v)
}

fn post_json(url: &str, v: &Value) -> (u16, Value) {
    call(url, Some((v.to_string().as_bytes(), "application/json")))
}

fn png_of(pixels: &[u8], side: u32) -> Vec<u8> {
    let img = image::GrayImage::from_raw(side, side, pixels.to_vec()).unwrap();
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error in {v}"))
}

#[test]
fn api_answers_and_refuses_as_documented() {
    let s = serve(&["--gallery-limit", "200"]);
    assert!(
        s.url.starts_with("http://127.0.0.1:"),
        "localhost by default: {}",
        s.url
    );
    let (st, m) = call(&format!("{}/api/model", s.url), None);
    assert_eq!(st, 200);
    assert_eq!(
        (m["side"].as_u64(), m["classes"].as_u64(), m["capsule_dim"].as_u64()),
        (Some(28), Some(10), Some(16))
    );

    // exact pixels: what eval computes for the same test digit, on the backend `--device cpu`
    // gives both (bf16 where that is the default)
    let split = test_split(20);
    let ck = capsnet::checkpoint::load(trained()).unwrap();
    use capsnet::backend::fast::FastCpu;
    let be = FastCpu::with_precision(FastCpu::default_precision()).unwrap();
    let mut tape = capsnet::tape::Tape::new(be);
    let model = capsnet::model::CapsNet::from_checkpoint(&mut tape, &ck).unwrap();
    let (x, _) = split.batch::<f32>(&[3]);
    let want = capsnet::infer::classify(&mut tape, &model, &x, 1).unwrap();
    let (st, e) = post_json(
        &format!("{}/api/encode", s.url),
        &json!({ "pixels": digit_pixels(&split, 3) }),
    );
    assert_eq!(st, 200, "{e}");
    assert_eq!(e["digit"].as_u64(), Some(want.pred[0] as u64));
    for (k, l) in e["lengths"].as_array().unwrap().iter().enumerate() {
        assert!(
            (l.as_f64().unwrap() - want.lengths[k] as f64).abs() < 2e-4,
            "length {k}: {l} vs {}",
            want.lengths[k]
        );
    }
    let caps = e["capsules"].clone();
    assert_eq!(caps.as_array().unwrap().len(), 10);
    assert_eq!(e["reconstructions"][0]["pixels"].as_array().unwrap().len(), 784);

    // an image file: predict's preparation and answer for the same file
    let dir = temp_dir("serve-api");
    let big: Vec<u8> = {
        // the digit at 56x56, so it is prepared (scaled and centred), as a user's picture is
        let img = image::GrayImage::from_raw(28, 28, split.images[5 * 784..6 * 784].to_vec()).unwrap();
        image::imageops::resize(&img, 56, 56, image::imageops::FilterType::Triangle).into_raw()
    };
    let png = png_of(&big, 56);
    let file = dir.join("five.png");
    std::fs::write(&file, &png).unwrap();
    let o = capsnet(
        &[
            "predict",
            "--checkpoint",
            trained().to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let p: Value = serde_json::from_slice(&o.stdout).unwrap();
    let (st, e) = call(&format!("{}/api/encode", s.url), Some((&png, "image/png")));
    assert_eq!(st, 200, "{e}");
    assert_eq!(e["digit"], p["digit"]);
    assert_eq!(e["confident"], p["confident"]);
    assert_eq!(e["prepared"]["pixels"].as_array().unwrap().len(), 784);
    let (st, prep) = call(&format!("{}/api/prepare", s.url), Some((&png, "image/png")));
    assert_eq!(st, 200, "{prep}");
    assert_eq!(prep["pixels"], e["prepared"]["pixels"]);

    // decode: the capsule kept alone is the encode's reconstruction; a tweak changes it
    let digit = e["digit"].as_u64().unwrap();
    let (st, d) = post_json(
        &format!("{}/api/decode", s.url),
        &json!({ "capsules": e["capsules"], "keep": digit }),
    );
    assert_eq!(st, 200, "{d}");
    let close = |a: &Value, b: &Value| {
        a.as_array()
            .unwrap()
            .iter()
            .zip(b.as_array().unwrap())
            .all(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 2e-3)
    };
    assert!(close(&d["pixels"], &e["reconstructions"][0]["pixels"]));
    let mut tweaked = e["capsules"].clone();
    tweaked[digit as usize][0] = json!(tweaked[digit as usize][0].as_f64().unwrap() + 0.25);
    let (_, d2) = post_json(
        &format!("{}/api/decode", s.url),
        &json!({ "capsules": tweaked, "keep": digit, "stream": "t" }),
    );
    assert!(
        !close(&d["pixels"], &d2["pixels"]),
        "a tweak of +0.25 changes the reconstruction"
    );

    // routing: every round's coupling coefficients of a primary capsule sum to 1 over the classes;
    // the first round's are uniform (the logits start at 0)
    let (st, r) = post_json(
        &format!("{}/api/routing", s.url),
        &json!({ "pixels": digit_pixels(&split, 3) }),
    );
    assert_eq!(st, 200, "{r}");
    let rounds = r["coupling"].as_array().unwrap();
    assert_eq!(rounds.len(), ck.config.routing_rounds);
    let caps1 = ck.config.primary_caps();
    for (n, round) in rounds.iter().enumerate() {
        for i in (0..caps1).step_by(37) {
            let sum: f64 = (0..10).map(|j| round[j][i].as_f64().unwrap()).sum();
            assert!((sum - 1.0).abs() < 0.01, "round {n}, capsule {i}: {sum}");
            if n == 0 {
                assert!((round[0][i].as_f64().unwrap() - 0.1).abs() < 1e-3);
            }
        }
    }
    assert_eq!(r["primary"]["lengths"].as_array().unwrap().len(), caps1);
    assert_eq!(r["conv1"]["maps"].as_array().unwrap().len(), 16);

    // errors: each is JSON naming what is wrong
    let bad = [
        (
            call(&format!("{}/api/encode", s.url), Some((b"not an image", "image/png"))),
            400,
            "not an image",
        ),
        (
            call(&format!("{}/api/encode", s.url), Some((b"", "image/png"))),
            400,
            "no body",
        ),
        (
            post_json(&format!("{}/api/encode", s.url), &json!({ "pixels": [0.5, 0.5] })),
            400,
            "2 values",
        ),
        (
            call(
                &format!("{}/api/prepare", s.url),
                Some((&png_of(&[0; 784], 28), "image/png")),
            ),
            400,
            "blank",
        ),
        (
            post_json(&format!("{}/api/decode", s.url), &json!({ "capsules": [1, 2, 3] })),
            400,
            "3 values",
        ),
        (
            post_json(
                &format!("{}/api/decode", s.url),
                &json!({ "capsules": caps, "keep": 10 }),
            ),
            400,
            "\"keep\" is 10",
        ),
        (
            call(&format!("{}/api/decode", s.url), Some((b"{", "application/json"))),
            400,
            "not JSON",
        ),
        (
            call(&format!("{}/api/errors?limit=5000", s.url), None),
            400,
            "at most 200",
        ),
        (call(&format!("{}/api/nothing", s.url), None), 404, "no such page"),
        (call(&format!("{}/../../etc/passwd", s.url), None), 404, "no such page"),
        (
            call(&format!("{}/src/serve/page.html", s.url), None),
            404,
            "no such page",
        ),
    ];
    for ((st, v), want_st, needle) in bad {
        assert_eq!(st, want_st, "{v}");
        assert!(error_of(&v).contains(needle), "{needle:?} not in {v}");
    }
    // a body over the limit is refused before it is read whole
    let huge = vec![0u8; capsnet::serve::MAX_BODY + 1];
    let (st, v) = call(&format!("{}/api/encode", s.url), Some((&huge, "image/png")));
    assert_eq!(st, 413);
    assert!(error_of(&v).contains("MiB"), "{v}");

    // concurrent requests: each gets its own image's answer
    let url = s.url.clone();
    let answers: Vec<(usize, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (url, px) = (url.clone(), digit_pixels(&split, i));
                sc.spawn(move || {
                    let (st, v) = post_json(&format!("{url}/api/encode"), &json!({ "pixels": px }));
                    assert_eq!(st, 200, "{v}");
                    (i, v["digit"].as_u64().unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let idx: Vec<usize> = (0..8).collect();
    let (x, _) = split.batch::<f32>(&idx);
    let want = capsnet::infer::classify(&mut tape, &model, &x, 8).unwrap();
    for (i, d) in answers {
        assert_eq!(d, want.pred[i] as u64, "image {i}");
    }
    // decodes of one stream sent at once: each answered, as the newest or as superseded
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..12)
            .map(|_| {
                let (url, caps) = (url.clone(), caps.clone());
                sc.spawn(move || {
                    post_json(
                        &format!("{url}/api/decode"),
                        &json!({ "capsules": caps, "keep": 0, "stream": "s" }),
                    )
                    .0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200 || s == 409), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");

    // the gallery: the misclassified among the first 200 test images, as eval finds them
    let t0 = Instant::now();
    let g = loop {
        let (st, g) = call(&format!("{}/api/errors?limit=200", s.url), None);
        assert_eq!(st, 200, "{g}");
        if g["done"].as_bool() == Some(true) {
            break g;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the gallery of 200 images is not done: {g}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let all = test_split(200);
    let idx: Vec<usize> = (0..200).collect();
    let (x, labels) = all.batch::<f32>(&idx);
    let c = capsnet::infer::classify(&mut tape, &model, &x, 100).unwrap();
    let wrong: Vec<u64> = (0..200).filter(|&i| c.pred[i] != labels[i]).map(|i| i as u64).collect();
    let got: Vec<u64> = g["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(got, wrong);
    assert_eq!(g["checked"].as_u64(), Some(200));
}

#[test]
fn serve_refuses_bad_flags_by_name() {
    let ck = trained().to_str().unwrap().to_string();
    for (args, needles) in [
        (vec!["--threshold", "2"], vec!["--threshold", "between 0 and 1"]),
        (vec!["--gallery-limit", "0"], vec!["--gallery-limit"]),
        (
            vec!["--host", "no such host!"],
            vec!["--host no such host!", "cannot listen"],
        ),
    ] {
        let mut a = vec!["serve", "--checkpoint", &ck, "--device", "cpu", "--port", "0"];
        a.extend(args);
        assert_clean_error(&capsnet(&a, &[]), &needles);
    }
    let o = capsnet(
        &["serve", "--checkpoint", "missing.safetensors", "--device", "cpu"],
        &[],
    );
    assert_clean_error(&o, &["missing.safetensors"]);
    let o = capsnet(&["serve", "--checkpoint", &ck, "--port", "70000"], &[]);
    assert!(!o.status.success() && stderr(&o).contains("--port"), "{}", stderr(&o));
    // a port taken by another server
    let first = serve(&[]);
    let port = first.url.rsplit(':').next().unwrap().to_string();
    let o = capsnet(&["serve", "--checkpoint", &ck, "--device", "cpu", "--port", &port], &[]);
    assert_clean_error(&o, &[&format!("--port {port}"), "cannot listen"]);
}

// ---- the page in a browser

fn which(var: &str, names: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    for n in names {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(n);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "the browser test needs {} on PATH (Debian: apt-get install chromium chromium-driver) or {var} naming it",
        names.join(" or ")
    );
}

struct Driver {
    child: Child,
    url: String,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = http("DELETE", &format!("{}/session/{}", self.url, self.session), None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Driver {
        let driver = which("CAPSNET_CHROMEDRIVER", &["chromedriver"]);
        let browser = which("CAPSNET_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", driver.display()));
        let url = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        while http("GET", &format!("{url}/status"), None).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser.to_str().unwrap(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1700"]
            }
        }}});
        let (st, v) = post_json(&format!("{url}/session"), &caps);
        assert_eq!(st, 200, "no browser session: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Driver { child, url, session }
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.url, self.session);
        let sent = body.to_string();
        let payload = (method != "GET").then_some((sent.as_bytes(), "application/json"));
        let (status, text) = http(method, &url, payload).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {text}"));
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn js(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({ "script": script, "args": [] }))
    }

    fn element(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", json!({ "using": "css selector", "value": css }));
        v.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.cmd("POST", &format!("/element/{e}/click"), json!({}));
    }

    /// Until the page has no request in flight (and `also` holds), or a minute.
    fn settle(&self, also: &str) {
        let t0 = Instant::now();
        let cond = format!("return document.body.dataset.state === 'idle' && ({also});");
        let mut idle = 0;
        loop {
            // idle twice in a row: a request chained on an answer has started by then
            if self.js(&cond).as_bool() == Some(true) {
                idle += 1;
                if idle == 3 {
                    return;
                }
            } else {
                idle = 0;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the page did not settle on {also}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Pointer strokes that trace a 28x28 digit on the 280x280 pad: each row's runs of ink, left to
/// right, as a pen would hatch them. Offsets from the pad's centre, as WebDriver's element origin.
fn strokes(pixels: &[f64], pad: &str) -> Value {
    let mut actions = vec![];
    for r in 0..28 {
        let mut c = 0;
        while c < 28 {
            if pixels[r * 28 + c] < 0.5 {
                c += 1;
                continue;
            }
            let start = c;
            while c < 28 && pixels[r * 28 + c] >= 0.5 {
                c += 1;
            }
            let at = |col: usize| {
                json!({ "type": "pointerMove", "duration": 0, "origin": { "element-6066-11e4-a52e-4f735466cecf": pad },
                        "x": (col * 10 + 5) as i64 - 140, "y": (r * 10 + 5) as i64 - 140 })
            };
            actions.push(at(start));
            actions.push(json!({ "type": "pointerDown", "button": 0 }));
            for col in start..c {
                actions.push(at(col));
            }
            actions.push(json!({ "type": "pointerUp", "button": 0 }));
        }
    }
    json!({ "actions": [{ "type": "pointer", "id": "pen", "parameters": { "pointerType": "pen" }, "actions": actions }] })
}

#[test]
fn the_page_in_a_browser_draws_tweaks_refuses_and_shows_errors() {
    let s = serve(&["--gallery-limit", "300"]);
    let d = Driver::start();
    d.cmd("POST", "/url", json!({ "url": format!("{}/", s.url) }));
    d.settle("document.querySelectorAll('#sliders input').length === 16");

    // draw the first test digit (a 7) with the pen
    let split = test_split(1);
    let px = digit_pixels(&split, 0);
    let pad = d.element("#pad");
    d.cmd("POST", "/actions", strokes(&px, &pad));
    d.settle("document.getElementById('prediction').textContent !== '–'");
    let shown = d.js("return document.getElementById('prediction').textContent;");
    assert_eq!(shown, json!("7"), "the page's prediction of a drawn 7");
    // the page shows what the API answers for the pad's picture
    let pad_png = d.js("return document.getElementById('pad').toDataURL('image/png').split(',')[1];");
    let png = base64::engine::general_purpose::STANDARD
        .decode(pad_png.as_str().unwrap())
        .unwrap();
    let (_, e) = call(&format!("{}/api/encode", s.url), Some((&png, "image/png")));
    assert_eq!(e["digit"].as_u64(), Some(7));
    let bars = d.js("return [...document.querySelectorAll('#bars .val')].map(v => Number(v.textContent));");
    for (k, b) in bars.as_array().unwrap().iter().enumerate() {
        assert!(
            (b.as_f64().unwrap() - e["lengths"][k].as_f64().unwrap()).abs() < 1e-3,
            "bar {k}: {b}"
        );
    }
    // inside the network: conv1's maps, the primary capsules and each routing round drawn
    let counts = d.js(
        "return ['#conv1 canvas', '#primary canvas', '#rounds .row'].map(s => document.querySelectorAll(s).length);",
    );
    let cfg = capsnet::checkpoint::load(trained()).unwrap().config;
    assert_eq!(counts, json!([16, cfg.primary_maps, cfg.routing_rounds]));

    // a slider moved with the keyboard re-decodes the reconstruction
    let before = d.js("return document.getElementById('recon').toDataURL();");
    let slider = d.element("#sliders input[data-dim='3']");
    d.cmd(
        "POST",
        &format!("/element/{slider}/value"),
        json!({ "text": "\u{E014}".repeat(20) }),
    );
    d.settle("true");
    let value = d.js("return document.querySelector(\"#sliders input[data-dim='3']\").value;");
    assert_eq!(value, json!("0.2"));
    let after = d.js("return document.getElementById('recon').toDataURL();");
    assert!(before != after, "moving a slider changes the reconstruction");

    // interpolation: the drawing kept as A and as B with a tweak: the blend is drawn
    d.click("#keepA");
    d.click("#keepB");
    d.settle("!document.getElementById('blend').disabled");

    // a broken file dropped on the pad: the server's error on the page
    d.js(
        "const dt = new DataTransfer(); dt.items.add(new File([new Uint8Array([1, 2, 3, 4])], 'broken.png', { type: 'image/png' }));
         document.getElementById('pad').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));",
    );
    d.settle("document.getElementById('error').classList.contains('shown')");
    let err = d.js("return document.getElementById('error').textContent;");
    assert!(err.as_str().unwrap().contains("not an image"), "{err}");

    // the gallery of errors: open it, and a click loads an error on the pad with its wrong answer
    let t0 = Instant::now();
    loop {
        d.click("#show-errors");
        d.settle("true");
        let status = d.js("return document.getElementById('gallery-status').textContent;");
        if !status.as_str().unwrap().contains("still checking") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let n = d.js("return document.querySelectorAll('#gallery figure').length;");
    assert!(
        n.as_u64().unwrap() >= 1,
        "a model of about 93% misclassifies some of 300 test digits"
    );
    let caption = d.js("return document.querySelector('#gallery figcaption').textContent;");
    let wrong = caption.as_str().unwrap().rsplit(' ').next().unwrap().to_string();
    d.click("#gallery figure");
    d.settle("!document.getElementById('error').classList.contains('shown')");
    let shown = d.js("return document.getElementById('prediction').textContent;");
    assert_eq!(
        shown.as_str(),
        Some(wrong.as_str()),
        "the gallery's digit gets its recorded answer ({caption})"
    );

    if let Some(path) = std::env::var_os("CAPSNET_SCREENSHOT") {
        let shot = d.cmd("GET", "/screenshot", json!({}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().unwrap())
            .unwrap();
        std::fs::write(&path, png).unwrap();
    }

    // a phone's screen width (390 CSS pixels): one column, nothing wider than the screen, the
    // drawing pad whole on it
    d.cmd("POST", "/window/rect", json!({ "width": 390, "height": 844 }));
    d.settle("window.innerWidth <= 400");
    let fits = d.js(
        "const w = window.innerWidth, pad = document.getElementById('pad').getBoundingClientRect();
         return [w, document.documentElement.scrollWidth, pad.left >= 0 && pad.right <= w];",
    );
    let (w, scroll) = (fits[0].as_f64().unwrap(), fits[1].as_f64().unwrap());
    assert!(w <= 400.0, "the window did not narrow: {fits}");
    assert!(scroll <= w, "the page is wider than a phone's screen: {fits}");
    assert_eq!(fits[2], json!(true), "the pad does not fit: {fits}");
}

/// A MultiMNIST checkpoint: two reconstructions, of the two longest capsules, and the gallery of pairs
/// whose two digits are not the two longest capsules.
#[test]
fn multimnist_checkpoints_show_both_digits() {
    let run = temp_dir(&format!("serve-multi-{}", std::process::id())).join("run");
    let data = mnist_dir();
    let o = capsnet(
        &[
            "train",
            "--dataset",
            "multimnist",
            "--device",
            "cpu",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
            "--limit",
            "200",
            "--val-limit",
            "50",
            "--conv1-channels",
            "4",
            "--primary-maps",
            "2",
            "--checkpoint-dir",
            run.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = run.join("best.safetensors");
    let mut child = capsnet_command(&[
        "serve",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--port",
        "0",
        "--device",
        "cpu",
        "--data",
        data.to_str().unwrap(),
        "--gallery-limit",
        "40",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let s = Server {
        url: line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap()
            .trim_end_matches('/')
            .to_string(),
        child,
    };
    let (_, m) = call(&format!("{}/api/model", s.url), None);
    assert_eq!(
        (m["dataset"].as_str(), m["side"].as_u64()),
        (Some("multimnist"), Some(36))
    );
    let px = vec![0.0; 36 * 36];
    let mut px = px;
    for i in 8..28 {
        px[i * 36 + 12] = 1.0;
        px[10 * 36 + i] = 1.0;
    }
    let (st, e) = post_json(&format!("{}/api/encode", s.url), &json!({ "pixels": px }));
    assert_eq!(st, 200, "{e}");
    let lengths: Vec<f64> = e["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let shown: Vec<usize> = e["reconstructions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["digit"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(shown.len(), 2);
    assert!(lengths[shown[0]] >= lengths[shown[1]] - 1e-4, "{lengths:?} {shown:?}");
    // the two longest (the lengths come rounded to 4 decimals)
    for k in (0..10).filter(|k| !shown.contains(k)) {
        assert!(lengths[k] <= lengths[shown[1]] + 1e-4, "{lengths:?} {shown:?}");
    }
    for r in e["reconstructions"].as_array().unwrap() {
        assert_eq!(r["pixels"].as_array().unwrap().len(), 36 * 36);
    }
    let t0 = Instant::now();
    let g = loop {
        let (st, g) = call(&format!("{}/api/errors", s.url), None);
        assert_eq!(st, 200, "{g}");
        if g["done"].as_bool() == Some(true) {
            break g;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{g}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(g["checked"].as_u64(), Some(40));
    for e in g["errors"].as_array().unwrap() {
        let (mut l, mut p) = (
            e["labels"].as_array().unwrap().clone(),
            e["predicted"].as_array().unwrap().clone(),
        );
        assert_eq!(
            (l.len(), p.len(), e["pixels"].as_array().unwrap().len()),
            (2, 2, 36 * 36)
        );
        l.sort_by_key(|x| x.as_u64());
        p.sort_by_key(|x| x.as_u64());
        assert_ne!(l, p, "an error is a pair whose digits are not the two longest capsules");
    }
}
