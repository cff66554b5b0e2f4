//! The mesh's trust anchors as they are now, changing without a restart.
//!
//! The live set is the union of two sources:
//! - the configured roots: a PEM file (Istio mode: the mesh root file;
//!   local mode: the local CA's root plus an optional bundle of extra
//!   roots), re-read when it changes; a file that cannot be read or holds
//!   no certificate leaves the last good set in place;
//! - the roots the CA returned with each identity's current certificate
//!   (an Istio CA answer ends with its root): a CA that moved to a new
//!   root brings it along with the first certificate it signs under it,
//!   and a root no current certificate came with is dropped again.
//!
//! Readers take a snapshot ([`TrustStore::bundle`]); every change makes a
//! new [`TrustBundle`] with a higher generation, announced on a watch
//! channel, so TLS configurations are rebuilt.
//!
//! Open connections register the chain their peer was authenticated with
//! ([`TrustStore::register_peer`]). After each change every registered
//! chain is verified again against the new set, as of the moment it was
//! first accepted (an expiry since is not this check's business): those
//! still anchored keep running, untouched by a rotation; those whose root
//! is gone are told to close, and counted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::{CaError, Identity, TrustBundle};

/// The live trust anchors of an agent.
pub struct TrustStore {
    sources: Mutex<Sources>,
    current: RwLock<Arc<TrustBundle>>,
    changes: watch::Sender<u64>,
    peers: Mutex<HashMap<u64, Peer>>,
    next_peer: AtomicU64,
    /// Connections closed because their peer's root left the set.
    untrusted: AtomicU64,
}

/// An open connection's authenticated peer.
struct Peer {
    /// Leaf first, then the intermediates it sent.
    chain: Vec<CertificateDer<'static>>,
    role: PeerRole,
    accepted: UnixTime,
    close: Arc<Notify>,
}

/// Which end the peer is: its certificate is checked for that use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer connected to us (client authentication).
    Client,
    /// We connected to the peer (server authentication).
    Server,
}

/// One registered connection; dropping it forgets the connection.
pub struct PeerGuard {
    store: Arc<TrustStore>,
    id: u64,
    close: Arc<Notify>,
}

impl PeerGuard {
    /// Resolves once the trust anchors no longer vouch for the peer.
    pub async fn untrusted(&self) {
        self.close.notified().await
    }
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        self.store
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.bundle();
        f.debug_struct("TrustStore")
            .field("generation", &b.generation)
            .field("roots", &b.roots.len())
            .finish()
    }
}

#[derive(Default)]
struct Sources {
    /// Roots always trusted (the local CA's own), beside the file's.
    fixed: Vec<CertificateDer<'static>>,
    /// The configured file's roots, as last read successfully.
    file: Vec<CertificateDer<'static>>,
    /// Roots returned by the CA, by the identity whose certificate came
    /// with them.
    from_ca: HashMap<Identity, Vec<CertificateDer<'static>>>,
}

impl Sources {
    /// Every root once, in a stable order: fixed, file, then the CA's.
    fn union(&self) -> Vec<CertificateDer<'static>> {
        let mut out: Vec<CertificateDer<'static>> = Vec::new();
        let mut ca: Vec<&Identity> = self.from_ca.keys().collect();
        ca.sort();
        let from_ca = ca.into_iter().flat_map(|id| &self.from_ca[id]);
        for root in self.fixed.iter().chain(&self.file).chain(from_ca) {
            if !out.contains(root) {
                out.push(root.clone());
            }
        }
        out
    }
}

impl TrustStore {
    /// A store trusting `fixed` (never removed) and nothing else yet.
    pub fn new(fixed: Vec<CertificateDer<'static>>) -> Arc<TrustStore> {
        let bundle = TrustBundle {
            roots: Arc::new(fixed.clone()),
            generation: 0,
        };
        Arc::new(TrustStore {
            sources: Mutex::new(Sources {
                fixed,
                ..Sources::default()
            }),
            current: RwLock::new(Arc::new(bundle)),
            changes: watch::Sender::new(0),
            peers: Mutex::default(),
            next_peer: AtomicU64::new(0),
            untrusted: AtomicU64::new(0),
        })
    }

    /// Remembers the peer of an open connection, authenticated now with
    /// `chain` (leaf first), until the guard is dropped.
    pub fn register_peer(
        self: &Arc<Self>,
        chain: Vec<CertificateDer<'static>>,
        role: PeerRole,
    ) -> PeerGuard {
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        let peer = Peer {
            chain,
            role,
            accepted: UnixTime::now(),
            close: close.clone(),
        };
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, peer);
        PeerGuard {
            store: self.clone(),
            id,
            close,
        }
    }

    /// Open connections registered now.
    pub fn peers(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Connections closed so far because their peer's root left the set.
    pub fn untrusted_closed(&self) -> u64 {
        self.untrusted.load(Ordering::Relaxed)
    }

    /// Tells every registered connection `bundle` no longer anchors to
    /// close; returns how many.
    fn recheck(&self, bundle: &TrustBundle) -> usize {
        let verifier = Verifier::new(bundle);
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for p in peers.values() {
            if verifier.anchors(p) {
                continue;
            }
            p.close.notify_one();
            closed += 1;
        }
        drop(peers);
        if closed > 0 {
            self.untrusted.fetch_add(closed as u64, Ordering::Relaxed);
            warn!(
                closed,
                generation = bundle.generation,
                "closing connections whose peer no root trusts any more"
            );
        }
        closed
    }

    /// The trust anchors now.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Announces every new generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Replaces the configured file's roots (an empty set is refused: a
    /// file emptied by mistake must not drop every peer).
    pub fn set_file_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), CaError> {
        if roots.is_empty() {
            return Err(CaError::BadPem(
                "the trust bundle holds no certificate".into(),
            ));
        }
        self.update(|s| s.file = roots);
        Ok(())
    }

    /// Records the roots the CA returned with `id`'s new certificate (they
    /// replace what came with its previous one).
    pub fn set_ca_roots(&self, id: &Identity, roots: Vec<CertificateDer<'static>>) {
        self.update(|s| {
            if roots.is_empty() {
                s.from_ca.remove(id);
            } else {
                s.from_ca.insert(id.clone(), roots);
            }
        });
    }

    /// `id` holds no certificate any more: its CA roots go with it.
    pub fn forget_ca_roots(&self, id: &Identity) {
        self.update(|s| {
            s.from_ca.remove(id);
        });
    }

    fn lock(&self) -> MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `change`; publishes a new generation if the union changed.
    fn update(&self, change: impl FnOnce(&mut Sources)) {
        let mut sources = self.lock();
        change(&mut sources);
        let roots = sources.union();
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if *current.roots == roots {
            return;
        }
        let generation = current.generation + 1;
        info!(
            generation,
            roots = roots.len(),
            before = current.roots.len(),
            "trust bundle changed"
        );
        let bundle = Arc::new(TrustBundle {
            roots: Arc::new(roots),
            generation,
        });
        *current = bundle.clone();
        drop(current);
        drop(sources);
        self.changes.send_replace(generation);
        self.recheck(&bundle);
    }
}

/// Checks peers' chains against one bundle.
struct Verifier {
    roots: Arc<RootCertStore>,
    /// None when no root parses: then nothing is anchored.
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl Verifier {
    fn new(bundle: &TrustBundle) -> Verifier {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(bundle.roots.iter().cloned());
        let roots = Arc::new(roots);
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            crate::hbone::tls::provider(),
        )
        .build()
        .ok();
        Verifier { roots, clients }
    }

    /// Whether `peer`'s chain leads to one of the roots, for its role, as
    /// of when it was accepted.
    fn anchors(&self, peer: &Peer) -> bool {
        let Some((leaf, intermediates)) = peer.chain.split_first() else {
            return false;
        };
        match peer.role {
            PeerRole::Client => self.clients.as_ref().is_some_and(|v| {
                v.verify_client_cert(leaf, intermediates, peer.accepted)
                    .is_ok()
            }),
            PeerRole::Server => {
                let Ok(leaf) = rustls::server::ParsedCertificate::try_from(leaf) else {
                    return false;
                };
                let algorithms = crate::hbone::tls::provider().signature_verification_algorithms;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &leaf,
                    &self.roots,
                    intermediates,
                    peer.accepted,
                    algorithms.all,
                )
                .is_ok()
            }
        }
    }
}

/// Every certificate in the PEM file at `path`.
pub fn read_pem_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source: Arc::new(source),
    };
    let data = std::fs::read(path).map_err(io)?;
    let roots = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    if roots.is_empty() {
        return Err(CaError::BadPem(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// Keeps `store`'s file roots following `path`: polled every `interval`
/// (modification time and length, then the content); a read that fails
/// keeps the last good roots and is logged once per failure streak.
pub async fn watch_file(store: Arc<TrustStore>, path: PathBuf, interval: Duration) {
    let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    // Read once more at the first tick: the file may have changed since
    // the caller read it.
    let mut seen = None;
    let mut failing = false;
    loop {
        tokio::time::sleep(interval).await;
        let now = stamp(&path);
        if now == seen && !failing {
            continue;
        }
        seen = now;
        match read_pem_roots(&path).and_then(|roots| store.set_file_roots(roots)) {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    warn!(path = %path.display(), error = %e, "trust bundle file unusable; keeping the roots last read");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(n: u8) -> CertificateDer<'static> {
        CertificateDer::from(vec![0x30, n])
    }

    fn id(sa: &str) -> Identity {
        format!("spiffe://td/ns/ns/sa/{sa}").parse().unwrap()
    }

    #[test]
    fn the_live_set_is_the_union_and_each_change_a_new_generation() {
        let store = TrustStore::new(vec![cert(1)]);
        let mut rx = store.subscribe();
        assert_eq!(store.bundle().generation, 0);
        assert_eq!(*store.bundle().roots, [cert(1)]);

        store.set_file_roots(vec![cert(1), cert(2)]).unwrap();
        assert_eq!(*store.bundle().roots, [cert(1), cert(2)]);
        assert_eq!(store.bundle().generation, 1);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();

        // Nothing new: no new generation.
        store.set_ca_roots(&id("a"), vec![cert(2)]);
        assert_eq!(store.bundle().generation, 1);
        assert!(!rx.has_changed().unwrap());

        // A CA root no file names: trusted while a certificate came with it.
        store.set_ca_roots(&id("b"), vec![cert(3)]);
        assert_eq!(*store.bundle().roots, [cert(1), cert(2), cert(3)]);
        store.set_ca_roots(&id("b"), vec![cert(4)]);
        assert_eq!(*store.bundle().roots, [cert(1), cert(2), cert(4)]);
        store.forget_ca_roots(&id("b"));
        assert_eq!(*store.bundle().roots, [cert(1), cert(2)]);

        // An empty file is refused; the fixed roots are never dropped.
        assert!(store.set_file_roots(Vec::new()).is_err());
        assert_eq!(*store.bundle().roots, [cert(1), cert(2)]);
        store.set_file_roots(vec![cert(5)]).unwrap();
        assert_eq!(*store.bundle().roots, [cert(1), cert(5), cert(2)]);
    }

    #[tokio::test]
    async fn the_file_is_followed_and_a_bad_version_keeps_the_last_good() {
        let dir = std::env::temp_dir().join(format!("amb-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("roots.pem");
        let pem = |certs: &[&rcgen::Certificate]| {
            certs.iter().map(|c| c.pem()).collect::<Vec<_>>().join("")
        };
        let mk = |cn: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.self_signed(&key).unwrap()
        };
        let (a, b) = (mk("a"), mk("b"));
        std::fs::write(&path, pem(&[&a])).unwrap();
        let store = TrustStore::new(Vec::new());
        store
            .set_file_roots(read_pem_roots(&path).unwrap())
            .unwrap();
        let task = tokio::spawn(watch_file(
            store.clone(),
            path.clone(),
            Duration::from_millis(10),
        ));
        let wait_for = |n: usize| {
            let store = store.clone();
            async move {
                for _ in 0..300 {
                    if store.bundle().roots.len() == n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("trust bundle never had {n} roots");
            }
        };
        std::fs::write(&path, pem(&[&a, &b])).unwrap();
        wait_for(2).await;
        assert_eq!(store.bundle().roots[1], *b.der());
        // Garbage, then an empty file: the last good set stays.
        let generation = store.bundle().generation;
        std::fs::write(&path, "not a certificate, and longer than before").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.bundle().generation, generation);
        assert_eq!(store.bundle().roots.len(), 2);
        // The old root removed: applied.
        std::fs::write(&path, pem(&[&b])).unwrap();
        wait_for(1).await;
        assert_eq!(store.bundle().roots[0], *b.der());
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
