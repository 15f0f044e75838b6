//! Crash-safe files: every change is written to a temporary file in the same directory, synced,
//! renamed over the target, and the directory is synced, so a crash at any point leaves either
//! the old or the new content, never a mix.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File-system steps of one atomic write, in order (for fault injection).
const STEPS_PER_WRITE: u32 = 4;

/// Injected crashes for tests: the write fails, as if the process died, right before step
/// number `crash_at` (counting every step of every write since it was set).
#[derive(Debug, Default)]
pub(crate) struct Faults {
    crash_at: Option<u32>,
    steps: u32,
}

impl Faults {
    #[cfg(test)]
    pub(crate) fn crash_at(step: u32) -> Self {
        Self {
            crash_at: Some(step),
            steps: 0,
        }
    }

    fn step(&mut self) -> std::io::Result<()> {
        let this = self.steps;
        self.steps += 1;
        if self.crash_at == Some(this) {
            return Err(std::io::Error::other("injected crash"));
        }
        Ok(())
    }
}

/// A file path with the error context we report.
fn io_err(path: &Path, e: std::io::Error) -> crate::TrustCenterError {
    crate::TrustCenterError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Writes `bytes` to `path` atomically with `mode` (unix permissions, applied at creation).
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    faults: &mut Faults,
) -> Result<(), crate::TrustCenterError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let run = |faults: &mut Faults| -> std::io::Result<()> {
        faults.step()?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        faults.step()?;
        file.sync_all()?;
        faults.step()?;
        std::fs::rename(&tmp, path)?;
        faults.step()?;
        File::open(dir)?.sync_all()
    };
    debug_assert_eq!(STEPS_PER_WRITE, 4);
    run(faults).map_err(|e| io_err(path, e))
}

/// Removes temporary files a crash left behind in `dir`.
pub(crate) fn clean_temporaries(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Reads a whole file, with the path in the error.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, crate::TrustCenterError> {
    std::fs::read(path).map_err(|e| io_err(path, e))
}

/// Creates a directory (and parents).
pub(crate) fn create_dir(path: &Path) -> Result<(), crate::TrustCenterError> {
    std::fs::create_dir_all(path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_at_any_step_leaves_old_or_new_content() {
        let dir = std::env::temp_dir().join(format!("ss-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        write_atomic(&path, b"old", 0o600, &mut Faults::default()).unwrap();
        for step in 0..STEPS_PER_WRITE {
            let result = write_atomic(&path, b"new", 0o600, &mut Faults::crash_at(step));
            assert!(result.is_err());
            let content = std::fs::read(&path).unwrap();
            // Before the rename the old content stays; the rename itself is the commit point.
            let expected: &[u8] = if step >= 3 { b"new" } else { b"old" };
            assert_eq!(content, expected, "crash before step {step}");
            write_atomic(&path, b"old", 0o600, &mut Faults::default()).unwrap();
        }
        clean_temporaries(&dir);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "temporaries cleaned");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
