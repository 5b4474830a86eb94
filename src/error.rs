//! One error type for the whole crate: a message that names the file, flag or tensor at fault.
//! Every user-facing failure (bad data, bad checkpoint, bad flag, no network) ends up here and is
//! printed by the binary as `error: ...` with a non-zero exit code, never as a panic.

use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error(m.into())
    }
    /// An error about a file: `PATH: what`.
    pub fn file(path: &Path, what: impl fmt::Display) -> Self {
        Error(format!("{}: {what}", path.display()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// `return Err(Error::msg(format!(...)))` in one line.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::msg(format!($($arg)*))) };
}

/// An I/O error in words, without Rust's "(os error N)" suffix: "No space left on device".
pub fn io_words(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Fault injection for the tests of full disks: with `CAPSNET_FAULT_WRITES=N`, the writes of
/// [`write_atomic`] after the first N of the process fail half-way as a full disk does.
fn simulated_full_disk() -> bool {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let Some(n) = std::env::var("CAPSNET_FAULT_WRITES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return false;
    };
    WRITES.fetch_add(1, Ordering::SeqCst) >= n
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed to disk,
/// then renamed over the target, so a crash never leaves a half-written file under the real name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| Error::file(path, "not a file name"))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        if simulated_full_disk() {
            f.write_all(&bytes[..bytes.len() / 2])?;
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // the rename itself is durable only once the directory is
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, format!("cannot write: {}", io_words(&e))));
    }
    Ok(())
}
