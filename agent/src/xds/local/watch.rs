//! Keeps the shared state in step with the mesh file.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{parse_mesh, LocalConfigError};
use crate::fswatch::FileWatch;
use crate::state::{Mesh, State};

/// Watches the mesh file and installs each good version into the state.
///
/// The file is read again only when inotify says it may have changed
/// ([`FileWatch`]; polled every `poll_interval` where inotify cannot be
/// had), and parsed only when its content differs from the last read: a
/// Kubernetes ConfigMap update is a symlink swap that may keep the old
/// mtime, and two edits in the same second look identical by mtime. What
/// is installed is only what differs from the mesh in force
/// ([`State::replace_since`]).
pub struct LocalSource {
    path: PathBuf,
    state: Arc<State>,
    poll_interval: Duration,
    /// A digest of the text last parsed, good or bad, so an unchanged file
    /// is neither parsed nor logged again (the text itself is not kept:
    /// it can be tens of megabytes).
    last_digest: Option<u64>,
    /// The last read failure, so a missing file is logged once, not per read.
    last_read_error: Option<String>,
}

fn digest(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl LocalSource {
    pub fn new(path: PathBuf, state: Arc<State>, poll_interval: Duration) -> Self {
        LocalSource {
            path,
            state,
            poll_interval,
            last_digest: None,
            last_read_error: None,
        }
    }

    /// Loads the file once; the agent refuses to start on error.
    pub fn load_initial(&mut self) -> Result<(), LocalConfigError> {
        let started = Instant::now();
        let text = std::fs::read_to_string(&self.path).map_err(|source| LocalConfigError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mesh = parse_mesh(&self.source_name(), &text)?;
        self.last_digest = Some(digest(&text));
        drop(text);
        self.install(mesh, started);
        // Parsing the YAML takes tens of bytes per byte of text for a
        // moment; without this each reload left the agent larger
        // (measured: +130 MiB after 100 reloads of a 10,000-workload file).
        crate::heap::release_freed();
        Ok(())
    }

    /// Re-reads the file whenever it may have changed, until `shutdown`
    /// resolves. A bad version is logged and the last good one keeps serving.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut watch = FileWatch::new(&self.path, self.poll_interval);
        // It may have changed between the first read and the watch.
        self.reload().await;
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = watch.changed() => self.reload().await,
            }
        }
    }

    async fn reload(&mut self) {
        let started = Instant::now();
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => text,
            Err(e) => {
                let error = e.to_string();
                if self.last_read_error.as_ref() != Some(&error) {
                    tracing::warn!(
                        path = %self.path.display(),
                        %error,
                        "cannot read mesh file; keeping the last good mesh"
                    );
                    self.last_read_error = Some(error);
                }
                return;
            }
        };
        self.last_read_error = None;
        let d = digest(&text);
        if self.last_digest == Some(d) {
            return;
        }
        self.last_digest = Some(d);
        // Parsing takes seconds for a file of 100,000 workloads (~1.4 s of
        // it in the YAML parser alone): off the runtime's workers, which
        // are carrying traffic meanwhile.
        let name = self.source_name();
        let parsed = tokio::task::spawn_blocking(move || parse_mesh(&name, &text)).await;
        match parsed {
            Ok(Ok(mesh)) => self.install(mesh, started),
            Ok(Err(e)) => {
                tracing::warn!("ignoring invalid mesh file, keeping the last good mesh: {e}")
            }
            Err(e) => tracing::error!(
                path = %self.path.display(),
                error = %e,
                "mesh file parser failed; keeping the last good mesh"
            ),
        }
        crate::heap::release_freed();
    }

    /// Installs what differs from the mesh in force, unless nothing does
    /// (e.g. only comments changed), so watchers such as policy re-checks
    /// are not woken for nothing.
    fn install(&self, mesh: Mesh, started: Instant) {
        let (workloads, services, policies) = (
            mesh.workloads.len(),
            mesh.services.len(),
            mesh.policies.len(),
        );
        if !self.state.replace_since(mesh, started) {
            tracing::debug!(path = %self.path.display(), "mesh file changed, mesh did not");
            return;
        }
        tracing::info!(
            path = %self.path.display(),
            workloads,
            services,
            policies,
            took = ?started.elapsed(),
            "applied mesh file"
        );
    }

    fn source_name(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::Path;

    use tokio::sync::watch;

    use super::*;

    const POLL: Duration = Duration::from_millis(50);
    /// Long enough for several polls, for checking that nothing happened.
    const QUIET: Duration = Duration::from_millis(300);

    fn mesh_text(ip: &str) -> String {
        format!(
            "workloads:\n  - uid: a\n    name: a\n    namespace: default\n    \
             addresses: [{ip}]\n    node: n\n"
        )
    }

    /// Replaces the file in one step, as editors and kubelet do, so a poll
    /// never sees half a file.
    fn write_atomic(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn addresses(state: &State) -> Vec<IpAddr> {
        let snap = state.snapshot();
        snap.to_mesh()
            .workloads
            .iter()
            .flat_map(|w| w.addresses.clone())
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    async fn next_version(versions: &mut watch::Receiver<u64>) {
        tokio::time::timeout(Duration::from_secs(5), versions.changed())
            .await
            .expect("no new mesh version within 5s")
            .unwrap();
    }

    async fn assert_no_new_version(versions: &mut watch::Receiver<u64>) {
        tokio::time::sleep(QUIET).await;
        assert!(!versions.has_changed().unwrap(), "state was replaced");
    }

    #[tokio::test]
    async fn applies_good_edits_and_keeps_the_last_good_mesh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        write_atomic(&path, &mesh_text("10.0.0.1"));
        let state = Arc::new(State::default());
        let mut versions = state.subscribe();

        let mut source = LocalSource::new(path.clone(), state.clone(), POLL);
        source.load_initial().unwrap();
        assert_eq!(addresses(&state), [ip("10.0.0.1")]);
        assert!(versions.has_changed().unwrap());
        versions.borrow_and_update();

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(source.run(async {
            let _ = stopped.await;
        }));
        // The first poll sees the file load_initial already installed.
        assert_no_new_version(&mut versions).await;

        write_atomic(&path, &mesh_text("10.0.0.2"));
        next_version(&mut versions).await;
        assert_eq!(addresses(&state), [ip("10.0.0.2")]);

        // A bad edit is ignored; so is a missing file.
        write_atomic(&path, "workloads:\n  - uid: [a\n");
        assert_no_new_version(&mut versions).await;
        std::fs::remove_file(&path).unwrap();
        assert_no_new_version(&mut versions).await;
        assert_eq!(addresses(&state), [ip("10.0.0.2")]);

        write_atomic(&path, &mesh_text("10.0.0.3"));
        next_version(&mut versions).await;
        assert_eq!(addresses(&state), [ip("10.0.0.3")]);

        // Truncated in place (a non-atomic write caught half way, an
        // editor): blank is not "no workloads", so nothing is released.
        std::fs::write(&path, "").unwrap();
        assert_no_new_version(&mut versions).await;
        assert_eq!(addresses(&state), [ip("10.0.0.3")]);
        // An empty mesh is applied when it is said.
        std::fs::write(&path, "workloads: []\n").unwrap();
        next_version(&mut versions).await;
        assert!(addresses(&state).is_empty());
        write_atomic(&path, &mesh_text("10.0.0.3"));
        next_version(&mut versions).await;

        // New text, same mesh: no new version to wake watchers with.
        write_atomic(&path, &format!("# reformatted\n{}", mesh_text("10.0.0.3")));
        assert_no_new_version(&mut versions).await;

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run did not stop on shutdown")
            .unwrap();
    }

    fn three_workloads(b_ip: &str) -> String {
        ["a:10.0.0.1", &format!("b:{b_ip}"), "c:10.0.0.3"]
            .iter()
            .map(|e| {
                let (uid, ip) = e.split_once(':').unwrap();
                format!(
                    "  - uid: {uid}\n    name: {uid}\n    namespace: default\n    \
                     addresses: [{ip}]\n    node: n\n"
                )
            })
            .fold("workloads:\n".to_string(), |acc, w| acc + &w)
    }

    // With polling an hour away, only inotify can notice the edit; what is
    // installed is the one workload that changed, the others are the very
    // copies the version before holds.
    #[tokio::test]
    async fn an_edit_is_noticed_without_polling_and_changes_only_its_workload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        write_atomic(&path, &three_workloads("10.0.0.2"));
        let state = Arc::new(State::default());
        let mut source = LocalSource::new(path.clone(), state.clone(), Duration::from_secs(3600));
        source.load_initial().unwrap();
        let before = state.snapshot();
        let updates = state.stats().updates;
        let mut versions = state.subscribe();
        versions.borrow_and_update();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(source.run(async {
            let _ = stopped.await;
        }));

        write_atomic(&path, &three_workloads("10.0.0.22"));
        next_version(&mut versions).await;
        let after = state.snapshot();
        assert_eq!(state.stats().updates, updates + 1);
        let b = after.workload_by_uid("b").unwrap();
        assert_eq!(b.addresses.as_slice(), [ip("10.0.0.22")]);
        assert!(after.workload_by_ip(ip("10.0.0.2")).is_none());
        for uid in ["a", "c"] {
            let (old, new) = (before.workload_by_uid(uid), after.workload_by_uid(uid));
            assert!(Arc::ptr_eq(old.unwrap(), new.unwrap()), "{uid} was copied");
        }
        stop.send(()).unwrap();
        task.await.unwrap();
    }

    /// A ConfigMap volume swaps a `..data` symlink; the file's path, size and
    /// mtime second may all stay the same.
    #[tokio::test]
    async fn sees_configmap_symlink_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let version_dir = |name: &str, ip: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("mesh.yaml"), mesh_text(ip)).unwrap();
        };
        version_dir("..v1", "10.0.0.1");
        version_dir("..v2", "10.0.0.2");
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink("..v1", &data).unwrap();
        let path = dir.path().join("mesh.yaml");
        std::os::unix::fs::symlink("..data/mesh.yaml", &path).unwrap();

        let state = Arc::new(State::default());
        let mut source = LocalSource::new(path, state.clone(), POLL);
        source.load_initial().unwrap();
        assert_eq!(addresses(&state), [ip("10.0.0.1")]);
        let mut versions = state.subscribe();
        versions.borrow_and_update();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(source.run(async {
            let _ = stopped.await;
        }));

        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink("..v2", &tmp).unwrap();
        std::fs::rename(&tmp, &data).unwrap();
        next_version(&mut versions).await;
        assert_eq!(addresses(&state), [ip("10.0.0.2")]);

        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn load_initial_fails_on_a_bad_file_and_leaves_the_state_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "workloads:\n  - uid: a\n").unwrap();
        let state = Arc::new(State::default());
        let mut source = LocalSource::new(path.clone(), state.clone(), POLL);
        let err = source.load_initial().unwrap_err().to_string();
        let want = format!("{}:2:8: workloads[0]: missing field `name`", path.display());
        assert_eq!(err, want);
        assert_eq!(state.snapshot().to_mesh(), Mesh::default());

        std::fs::remove_file(&path).unwrap();
        let err = source.load_initial().unwrap_err();
        assert!(matches!(err, LocalConfigError::Io { .. }), "{err}");
    }
}
