//! Waiting for a file to change, without reading it until it does.
//!
//! [`FileWatch`] asks inotify about the file's directory (and, when the
//! path is a symlink, its target's directory): a Kubernetes ConfigMap or
//! Secret is updated by swapping a `..data` symlink, an editor or
//! `kubectl cp` by writing or renaming the file itself, and each shows as
//! an event there. A burst of events (a write in many chunks, a swap of
//! several links) wakes the caller once, after the burst settles. Where
//! inotify cannot be had (no such directory yet, the kernel's watch limit
//! reached), it falls back to waking every `fallback` interval, and says so
//! once.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventStream, Inotify, WatchMask};
use tracing::warn;

/// How long a burst of events must be quiet before the caller is woken.
const SETTLE: Duration = Duration::from_millis(50);
/// A burst that never settles still wakes the caller this often.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// Wakes its owner when a file may have changed.
pub struct FileWatch {
    events: Option<(EventStream<Vec<u8>>, Vec<OsString>)>,
    fallback: Duration,
}

impl FileWatch {
    /// Watches `path`; `fallback` is the polling interval used if inotify
    /// cannot be set up.
    pub fn new(path: &Path, fallback: Duration) -> Self {
        let events = match Self::inotify(path) {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(path = %path.display(), error = %e, interval = ?fallback,
                    "cannot watch file with inotify; polling it instead");
                None
            }
        };
        FileWatch {
            events,
            // tokio's sleep of zero would spin.
            fallback: fallback.max(Duration::from_millis(10)),
        }
    }

    /// Whether changes are noticed by inotify (not by polling).
    pub fn is_inotify(&self) -> bool {
        self.events.is_some()
    }

    fn inotify(path: &Path) -> std::io::Result<(EventStream<Vec<u8>>, Vec<OsString>)> {
        let inotify = Inotify::init()?;
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MODIFY
            | WatchMask::ATTRIB;
        let mut names = Vec::new();
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut add = |p: &Path| {
            if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                names.push(name.to_os_string());
                if !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_path_buf());
                }
            }
        };
        add(path);
        if let Ok(target) = std::fs::canonicalize(path) {
            add(&target);
        }
        if dirs.is_empty() {
            return Err(std::io::Error::other("path has no directory"));
        }
        for d in &dirs {
            inotify.watches().add(d, mask)?;
        }
        let stream = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok((stream, names))
    }

    /// Resolves after the file may have changed (spurious wakes happen;
    /// callers compare what they read).
    pub async fn changed(&mut self) {
        let Some((events, names)) = &mut self.events else {
            tokio::time::sleep(self.fallback).await;
            return;
        };
        // A ConfigMap's files are links through `..data`, swapped whole.
        let concerns = |name: Option<&std::ffi::OsStr>| {
            name.is_none_or(|n| {
                names.iter().any(|w| w == n) || n.as_encoded_bytes().starts_with(b"..")
            })
        };
        loop {
            match events.next().await {
                Some(Ok(e)) if concerns(e.name.as_deref()) => break,
                Some(Ok(_)) => continue,
                // Overflow or a read error: assume a change.
                Some(Err(_)) => break,
                None => {
                    self.events = None;
                    return;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + SETTLE_MAX;
        loop {
            let quiet = tokio::time::sleep(SETTLE);
            tokio::select! {
                () = quiet => return,
                () = tokio::time::sleep_until(deadline) => return,
                e = events.next() => if e.is_none() {
                    self.events = None;
                    return;
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn woken(w: &mut FileWatch) -> bool {
        tokio::time::timeout(Duration::from_secs(2), w.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn writes_renames_and_configmap_swaps_wake_once_other_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "a").unwrap();
        let mut w = FileWatch::new(&path, Duration::from_secs(3600));
        assert!(w.is_inotify());

        // A write in many pieces is one wake.
        for i in 0..20 {
            std::fs::write(&path, format!("v{i}")).unwrap();
        }
        assert!(woken(&mut w).await);
        let quiet = tokio::time::timeout(Duration::from_millis(300), w.changed()).await;
        assert!(quiet.is_err(), "the burst woke more than once");

        // A rename over the file.
        let tmp = dir.path().join("mesh.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(woken(&mut w).await);

        // Another file in the directory: nothing.
        std::fs::write(dir.path().join("other"), "x").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(300), w.changed()).await;
        assert!(quiet.is_err(), "woken for another file");

        // A ConfigMap-style swap of the `..data` link.
        std::os::unix::fs::symlink("x", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert!(woken(&mut w).await);
    }

    #[tokio::test]
    async fn a_missing_directory_falls_back_to_polling() {
        let mut w = FileWatch::new(Path::new("/nonexistent-dir/f"), Duration::from_millis(20));
        assert!(!w.is_inotify());
        assert!(woken(&mut w).await);
    }
}
