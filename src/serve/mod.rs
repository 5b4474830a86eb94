//! `capsnet serve`: the capsule explorer, one web page and the small JSON API it uses.
//!
//! The HTTP side is axum on a small tokio runtime; the model stays on the thread that loaded it (its
//! tape is not shared, a GPU's context is not sent), which takes jobs from a queue. Image decoding and
//! preparation run beside it on the runtime's blocking pool. Decodes that carry the same `stream` (a
//! moving slider) are coalesced: when several wait, only the newest runs and the older ones are
//! answered 409 "superseded". When no request has come for a quarter of a second, the model
//! classifies the test set, two images at a time, for the gallery of errors.
//!
//! Endpoints (docs/CLI.md has their fields):
//! - `GET /`: the page; every asset is in the binary.
//! - `GET /api/model`: the checkpoint's model and run.
//! - `POST /api/prepare`: an image file's bytes → the model's input.
//! - `POST /api/encode`: an image file's bytes, or JSON `{"pixels": [...]}` → capsules, lengths,
//!   prediction, reconstructions.
//! - `POST /api/decode`: JSON `{"capsules": [...], "keep": k, "stream": "..."}` → the decoder's image.
//! - `POST /api/routing`: as encode → conv1's maps, primary capsule lengths, coupling coefficients.
//! - `GET /api/errors?offset=&limit=`: misclassified test images found so far.

pub mod explorer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::checkpoint::Checkpoint;
use crate::data::Split;
use crate::dataset::Source;
use crate::ops::Backend;
use crate::{Error, Result};
use explorer::{Explorer, Inside, Look};

/// The largest request body taken: an image file or a JSON request.
pub const MAX_BODY: usize = 8 << 20;
/// Test images classified per slice of the gallery's work: small, so a request arriving meanwhile
/// waits one slice at most (two images, about 20 ms for the notebook's model on two cores).
const GALLERY_SLICE: usize = 2;
/// The gallery's work waits until no request has come for this long.
const QUIET: Duration = Duration::from_millis(250);
/// Misclassified images returned per `/api/errors` request at most.
pub const MAX_ERRORS_PAGE: usize = 200;

static PAGE: &str = include_str!("page.html");

/// What `capsnet serve` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub host: String,
    pub port: u16,
    /// A capsule longer than this counts as present.
    pub threshold: f32,
    /// The checkpoint's file, shown on the page.
    pub checkpoint: PathBuf,
    /// The test set for the gallery of errors (its first `gallery_limit` images), or why there is none.
    pub test_set: std::result::Result<Split, String>,
    /// The backend's name, shown on the page.
    pub backend_name: String,
}

/// An answer of the API: a status and a JSON body.
type Answer = (StatusCode, Value);

fn bad(status: StatusCode, msg: impl std::fmt::Display) -> Answer {
    (status, json!({ "error": msg.to_string() }))
}

fn ok(v: Value) -> Answer {
    (StatusCode::OK, v)
}

enum Work {
    Encode(Vec<f32>, f32),
    Decode(Vec<f32>),
    Inside(Vec<f32>),
}

struct Job {
    work: Work,
    /// Decodes of one stream (a slider) are coalesced.
    stream: Option<String>,
    reply: oneshot::Sender<Answer>,
}

/// The gallery's progress and what it found.
#[derive(Default)]
struct Gallery {
    /// Why there is no gallery (no test set).
    unavailable: Option<String>,
    checked: usize,
    total: usize,
    errors: Vec<Misclassified>,
}

/// One test image the model gets wrong.
struct Misclassified {
    index: usize,
    labels: Vec<u32>,
    /// The longest capsules, as many as the image has labels.
    predicted: Vec<u32>,
    pixels: Vec<f32>,
}

struct App {
    jobs: Mutex<mpsc::Sender<Job>>,
    gallery: Arc<Mutex<Gallery>>,
    model: Value,
    side: usize,
}

/// Pixels in [0, 1] rounded to 3 decimals for JSON.
fn px(xs: &[f32]) -> Value {
    Value::Array(
        xs.iter()
            .map(|&x| json!((x as f64 * 1000.0).round() / 1000.0))
            .collect(),
    )
}

fn look_json(l: &Look, dim: usize) -> Value {
    json!({
        "lengths": l.lengths.iter().map(|&x| (x as f64 * 1e4).round() / 1e4).collect::<Vec<_>>(),
        "digit": l.digit,
        "present": l.present,
        "confident": l.confident,
        "capsules": l.capsules.chunks(dim).map(|c| c.to_vec()).collect::<Vec<_>>(),
        "reconstructions": l.reconstructions.iter().map(|(k, r)| json!({ "digit": k, "pixels": px(r) })).collect::<Vec<_>>(),
    })
}

fn inside_json(i: &Inside, classes: usize) -> Value {
    json!({
        "conv1": {
            "side": i.conv1_side,
            "maps": i.conv1.iter().map(|(k, m)| json!({ "channel": k, "pixels": px(m) })).collect::<Vec<_>>(),
        },
        "primary": {
            "maps": i.primary_maps,
            "side": i.primary_side,
            "lengths": px(&i.primary_lengths),
        },
        // per round, per class: the coupling of every primary capsule to that class
        "coupling": i.coupling.iter().map(|c| {
            (0..classes).map(|j| px(&c.iter().skip(j).step_by(classes).copied().collect::<Vec<_>>())).collect::<Vec<_>>()
        }).collect::<Vec<_>>(),
    })
}

/// Of the jobs waiting (each a decode's stream, or None for any other job), those a newer decode of
/// the same stream makes pointless: a slider that moved on.
fn superseded(streams: &[Option<&str>]) -> Vec<bool> {
    let mut newest: HashMap<&str, usize> = HashMap::new();
    for (n, s) in streams.iter().enumerate() {
        if let Some(s) = s {
            newest.insert(s, n);
        }
    }
    streams
        .iter()
        .enumerate()
        .map(|(n, s)| s.is_some_and(|s| newest[s] != n))
        .collect()
}

/// The worker: the model on one thread, jobs in arrival order, the older of coalesced decodes
/// answered as superseded, the gallery's work when no job has come for [`QUIET`].
fn work<B: Backend>(mut ex: Explorer<B>, jobs: mpsc::Receiver<Job>, test: Option<Split>, gallery: Arc<Mutex<Gallery>>) {
    let (classes, dim) = (ex.config().classes, ex.config().caps2_dim);
    let source = test
        .as_ref()
        .and_then(|s| Source::new(ex.dataset, s, crate::multimnist::TEST_SEED).ok());
    let examples = source.as_ref().map(|s| s.eval_examples(1)).unwrap_or_default();
    let mut next = 0usize;
    let mut last_job = Instant::now();
    loop {
        let gallery_left = source.is_some() && next < examples.len();
        let first = if gallery_left {
            // the gallery's slices wait for a quiet moment: a user drawing or moving a slider sends
            // requests closer together than this
            let wait = QUIET.saturating_sub(last_job.elapsed());
            match jobs.recv_timeout(wait) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match jobs.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            }
        };
        let Some(first) = first else {
            // a slice of the gallery
            let src = source.as_ref().expect("gallery_left");
            let end = (next + GALLERY_SLICE).min(examples.len());
            let ids = &examples[next..end];
            let batch = src.batch::<f32>(ids);
            let found = ex.classify(&batch.images, ids.len());
            let mut g = gallery.lock().unwrap_or_else(|e| e.into_inner());
            match found {
                Ok(c) => {
                    let px = batch.images.len() / ids.len();
                    for (n, &id) in ids.iter().enumerate() {
                        let labels = batch.labels[n * batch.per..(n + 1) * batch.per].to_vec();
                        let lengths = &c.lengths[n * classes..(n + 1) * classes];
                        let mut order: Vec<u32> = (0..classes as u32).collect();
                        order.sort_by(|&a, &b| lengths[b as usize].total_cmp(&lengths[a as usize]));
                        let mut guess = order[..batch.per].to_vec();
                        let (mut l, mut gs) = (labels.clone(), guess.clone());
                        l.sort();
                        gs.sort();
                        if l != gs {
                            guess.truncate(batch.per);
                            g.errors.push(Misclassified {
                                index: id,
                                labels,
                                predicted: guess,
                                pixels: batch.images[n * px..(n + 1) * px].to_vec(),
                            });
                        }
                    }
                    g.checked = end;
                    next = end;
                }
                Err(e) => {
                    g.unavailable = Some(format!("classifying the test set failed: {e}"));
                    next = examples.len();
                }
            }
            continue;
        };
        last_job = Instant::now();
        let mut batch = vec![first];
        while let Ok(j) = jobs.try_recv() {
            batch.push(j);
        }
        let superseded = superseded(
            &batch
                .iter()
                .map(|j| {
                    matches!(j.work, Work::Decode(_))
                        .then_some(j.stream.as_deref())
                        .flatten()
                })
                .collect::<Vec<_>>(),
        );
        for (j, superseded) in batch.into_iter().zip(superseded) {
            let answer = if superseded {
                bad(StatusCode::CONFLICT, "superseded by a newer decode of the same stream")
            } else {
                match &j.work {
                    Work::Encode(p, sep) => match ex.look(p, *sep) {
                        Ok(l) => ok(look_json(&l, dim)),
                        Err(e) => bad(StatusCode::BAD_REQUEST, e),
                    },
                    Work::Decode(inputs) => match ex.decode(inputs) {
                        Ok(r) => ok(json!({ "pixels": px(&r) })),
                        Err(e) => bad(StatusCode::BAD_REQUEST, e),
                    },
                    Work::Inside(p) => match ex.inside(p) {
                        Ok(i) => ok(inside_json(&i, classes)),
                        Err(e) => bad(StatusCode::BAD_REQUEST, e),
                    },
                }
            };
            // the client may have gone
            let _ = j.reply.send(answer);
        }
    }
}

/// Serves the explorer of `ck` on `backend` until Ctrl-C. Prints the address on stdout when it listens.
pub fn run<B: Backend>(backend: B, ck: &Checkpoint, opts: Options) -> Result<()> {
    let cfg = ck.config.clone();
    let threshold = opts.threshold;
    let dataset = ck.state.run.dataset;
    let mut gallery = Gallery::default();
    let test = match opts.test_set {
        Ok(split) => {
            gallery.total = split.len();
            Some(split)
        }
        Err(why) => {
            gallery.unavailable = Some(why);
            None
        }
    };
    let gallery = Arc::new(Mutex::new(gallery));
    let (tx, rx) = mpsc::channel::<Job>();
    // the model (its tape, a GPU's context) stays on this thread; the server runs on the runtime's
    let explorer = Explorer::new(backend, ck, threshold)?;
    let model = json!({
        "checkpoint": opts.checkpoint.file_name().map(|f| f.to_string_lossy().into_owned()),
        "dataset": dataset.name(),
        "side": cfg.image_side,
        "classes": cfg.classes,
        "capsule_dim": cfg.caps2_dim,
        "conv1_channels": cfg.conv1_channels,
        "primary_maps": cfg.primary_maps,
        "primary_side": cfg.primary_side(),
        "routing_rounds": cfg.routing_rounds,
        "epoch": ck.state.epoch,
        "threshold": threshold,
        "backend": opts.backend_name,
        "history": ck.history.last(),
    });
    let app = Arc::new(App {
        jobs: Mutex::new(tx),
        gallery: gallery.clone(),
        model,
        side: cfg.image_side,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::msg(format!("cannot start the server's runtime: {e}")))?;
    let listener = rt.block_on(async {
        let addr = format!("{}:{}", opts.host, opts.port);
        tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
            Error::msg(format!(
                "--host {} --port {}: cannot listen: {}",
                opts.host,
                opts.port,
                crate::error::io_words(&e)
            ))
        })
    })?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::msg(format!("cannot read the address listened on: {e}")))?;
    let host = if local.ip().is_unspecified() {
        "localhost".to_string()
    } else if local.is_ipv6() {
        format!("[{}]", local.ip())
    } else {
        local.ip().to_string()
    };
    let server = rt.spawn(async move {
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    });
    println!("capsnet serve: http://{host}:{}/ (Ctrl-C stops)", local.port());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // until the server stops and drops the queue's sender
    work(explorer, rx, test, gallery);
    let served = rt
        .block_on(server)
        .map_err(|e| Error::msg(format!("the server stopped: {e}")))?
        .map_err(|e| Error::msg(format!("the server stopped: {e}")));
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

/// The page and the API.
fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/index.html", get(page))
        .route("/api/model", get(model))
        .route("/api/prepare", post(prepare))
        .route("/api/encode", post(encode))
        .route("/api/decode", post(decode))
        .route("/api/routing", post(routing))
        .route("/api/errors", get(errors))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

fn reply((status, v): Answer) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], axum::Json(v)).into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    reply(bad(
        StatusCode::NOT_FOUND,
        format!("{}: no such page or endpoint", uri.path()),
    ))
}

async fn model(State(app): State<Arc<App>>) -> Response {
    reply(ok(app.model.clone()))
}

fn body_or_error(body: std::result::Result<Bytes, BytesRejection>) -> std::result::Result<Bytes, Answer> {
    match body {
        Ok(b) if b.is_empty() => Err(bad(
            StatusCode::BAD_REQUEST,
            "the request has no body: send an image file",
        )),
        Ok(b) => Ok(b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the upload is over {} MiB", MAX_BODY >> 20),
        )),
        Err(e) => Err(bad(e.status(), e.body_text())),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The model's input from a request: an image file prepared as predict prepares it, or JSON pixels
/// taken as they are. With what the preparation said (null for pixels).
async fn input(app: &App, headers: &HeaderMap, body: Bytes) -> std::result::Result<(Vec<f32>, Value, f32), Answer> {
    if is_json(headers) {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")))?;
        let pixels = floats(&v, "pixels")?;
        let n = app.side * app.side;
        if pixels.len() != n {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                format!(
                    "\"pixels\" has {} values; the model takes {1}x{1} = {n}",
                    pixels.len(),
                    app.side
                ),
            ));
        }
        return Ok((pixels, Value::Null, 1.0));
    }
    let side = app.side;
    let prepared = tokio::task::spawn_blocking(move || {
        let g = crate::predict::decode_gray(&body)?;
        crate::predict::prepare(&g, side, crate::predict::Preparation::Full).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| {
        bad(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("preparing the image failed: {e}"),
        )
    })?
    .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("the upload: {e}")))?;
    let info = json!({
        "side": side,
        "pixels": px(&prepared.pixels),
        "inverted": prepared.inverted,
        "separation": (prepared.separation as f64 * 1000.0).round() / 1000.0,
    });
    Ok((prepared.pixels, info, prepared.separation))
}

fn floats(v: &Value, key: &str) -> std::result::Result<Vec<f32>, Answer> {
    let arr = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| bad(StatusCode::BAD_REQUEST, format!("\"{key}\" is missing or not an array")))?;
    let mut out = Vec::with_capacity(arr.len());
    for x in arr {
        // rows of numbers are taken as one flat list
        match x {
            Value::Array(row) => {
                for y in row {
                    out.push(number(y, key)?);
                }
            }
            y => out.push(number(y, key)?),
        }
    }
    Ok(out)
}

fn number(v: &Value, key: &str) -> std::result::Result<f32, Answer> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| bad(StatusCode::BAD_REQUEST, format!("\"{key}\" holds {v}, not a number")))
}

async fn ask(app: &App, work: Work, stream: Option<String>) -> Answer {
    let (reply, answer) = oneshot::channel();
    let sent = app
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Job { work, stream, reply });
    if sent.is_err() {
        return bad(StatusCode::SERVICE_UNAVAILABLE, "the model's worker has stopped");
    }
    answer
        .await
        .unwrap_or_else(|_| bad(StatusCode::SERVICE_UNAVAILABLE, "the model's worker has stopped"))
}

async fn prepare(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(a) => return reply(a),
    };
    if is_json(&headers) {
        return reply(bad(
            StatusCode::BAD_REQUEST,
            "prepare takes an image file's bytes (PNG, JPEG, GIF, BMP, WebP, PNM), not JSON",
        ));
    }
    match input(&app, &headers, body).await {
        Ok((_, info, _)) => reply(ok(info)),
        Err(a) => reply(a),
    }
}

async fn encode(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(a) => return reply(a),
    };
    let (pixels, info, sep) = match input(&app, &headers, body).await {
        Ok(x) => x,
        Err(a) => return reply(a),
    };
    let (status, mut v) = ask(&app, Work::Encode(pixels, sep), None).await;
    if status == StatusCode::OK {
        v["prepared"] = info;
    }
    reply((status, v))
}

async fn routing(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(a) => return reply(a),
    };
    let (pixels, _, _) = match input(&app, &headers, body).await {
        Ok(x) => x,
        Err(a) => return reply(a),
    };
    reply(ask(&app, Work::Inside(pixels), None).await)
}

async fn decode(State(app): State<Arc<App>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(a) => return reply(a),
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reply(bad(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}"))),
    };
    let mut capsules = match floats(&v, "capsules") {
        Ok(c) => c,
        Err(a) => return reply(a),
    };
    let (classes, dim) = (
        app.model["classes"].as_u64().unwrap_or(10) as usize,
        app.model["capsule_dim"].as_u64().unwrap_or(16) as usize,
    );
    if capsules.len() != classes * dim {
        return reply(bad(
            StatusCode::BAD_REQUEST,
            format!(
                "\"capsules\" has {} values; the decoder takes {classes} capsules of {dim} = {}",
                capsules.len(),
                classes * dim
            ),
        ));
    }
    match v.get("keep") {
        None | Some(Value::Null) => {}
        Some(k) => match k.as_u64() {
            Some(k) if (k as usize) < classes => capsules = explorer::masked(&capsules, k as usize, classes, dim),
            _ => {
                return reply(bad(
                    StatusCode::BAD_REQUEST,
                    format!("\"keep\" is {k}: a class from 0 to {}", classes - 1),
                ));
            }
        },
    }
    let stream = match v.get("stream") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 64 => Some(s.clone()),
        Some(s) => {
            return reply(bad(
                StatusCode::BAD_REQUEST,
                format!("\"stream\" is {s}: a name of at most 64 characters"),
            ));
        }
    };
    reply(ask(&app, Work::Decode(capsules), stream).await)
}

/// `offset=N&limit=M` of a query, each optional.
fn page_query(q: Option<&str>) -> std::result::Result<(usize, usize), String> {
    let (mut offset, mut limit) = (0, 50);
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n: usize = v
            .parse()
            .map_err(|_| format!("{k}={v}: offset and limit are whole numbers (/api/errors?offset=0&limit=50)"))?;
        match k {
            "offset" => offset = n,
            "limit" => limit = n,
            _ => return Err(format!("{k}: only offset and limit are taken")),
        }
    }
    Ok((offset, limit))
}

async fn errors(State(app): State<Arc<App>>, axum::extract::RawQuery(q): axum::extract::RawQuery) -> Response {
    let (offset, limit) = match page_query(q.as_deref()) {
        Ok(x) => x,
        Err(e) => return reply(bad(StatusCode::BAD_REQUEST, e)),
    };
    if limit > MAX_ERRORS_PAGE {
        return reply(bad(
            StatusCode::BAD_REQUEST,
            format!("limit {limit}: at most {MAX_ERRORS_PAGE} per request"),
        ));
    }
    let g = app.gallery.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = &g.unavailable {
        return reply(bad(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no gallery of errors: {why}"),
        ));
    }
    let items: Vec<Value> = g
        .errors
        .iter()
        .skip(offset)
        .take(limit)
        .map(|e| json!({ "index": e.index, "labels": e.labels, "predicted": e.predicted, "pixels": px(&e.pixels) }))
        .collect();
    reply(ok(json!({
        "checked": g.checked,
        "total": g.total,
        "done": g.checked >= g.total,
        "found": g.errors.len(),
        "side": app.side,
        "errors": items,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_decode_of_a_stream_runs() {
        let got = superseded(&[Some("tweak"), None, Some("blend"), Some("tweak"), Some("tweak"), None]);
        assert_eq!(got, [true, false, false, true, false, false]);
        assert_eq!(superseded(&[None, None]), [false, false]);
    }

    #[test]
    fn error_pages_are_read_from_the_query() {
        assert_eq!(page_query(None), Ok((0, 50)));
        assert_eq!(page_query(Some("offset=10&limit=5")), Ok((10, 5)));
        assert!(page_query(Some("limit=-1")).unwrap_err().contains("whole numbers"));
        assert!(
            page_query(Some("page=2"))
                .unwrap_err()
                .contains("only offset and limit")
        );
    }
}
