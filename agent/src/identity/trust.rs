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
use std::time::Duration;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::verify::ChainVerifier;
use super::{CaError, Identity, TrustBundle};

/// The live trust anchors of an agent.
pub struct TrustStore {
    sources: Mutex<Sources>,
    current: RwLock<Arc<TrustBundle>>,
    changes: watch::Sender<u64>,
    peers: Mutex<HashMap<u64, Peer>>,
    next_peer: AtomicU64,
    /// Connections closed because their peer's root left the set, or a
    /// certificate in its chain was revoked.
    untrusted: AtomicU64,
    /// Peers refused or closed for a revoked certificate, by
    /// [`PeerRole::reporter`].
    revoked: [AtomicU64; 2],
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

impl PeerRole {
    /// Istio's `reporter` label for what we are towards this peer:
    /// `source` when it is the server, `destination` when the client.
    pub fn reporter(self) -> usize {
        match self {
            PeerRole::Server => 0,
            PeerRole::Client => 1,
        }
    }

    /// The `reporter` label value of [`reporter`](Self::reporter)'s index.
    pub const REPORTERS: [&'static str; 2] = ["source", "destination"];
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
    /// The revocation lists, as last read successfully.
    crls: Vec<CertificateRevocationListDer<'static>>,
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
            crls: Arc::default(),
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
            revoked: Default::default(),
        })
    }

    /// Replaces the revocation lists (each already parsed by
    /// [`read_crls`]; empty: nothing revoked).
    pub fn set_crls(&self, crls: Vec<CertificateRevocationListDer<'static>>) {
        self.update(|s| s.crls = crls);
    }

    /// Counts a peer refused at its handshake for a revoked certificate.
    pub fn count_revoked(&self, role: PeerRole) {
        self.revoked[role.reporter()].fetch_add(1, Ordering::Relaxed);
    }

    /// Peers refused or closed for a revoked certificate, by reporter
    /// (see [`PeerRole::REPORTERS`]).
    pub fn revoked(&self) -> [u64; 2] {
        [
            self.revoked[0].load(Ordering::Relaxed),
            self.revoked[1].load(Ordering::Relaxed),
        ]
    }

    /// Remembers the peer of an open connection, authenticated now with
    /// `chain` (leaf first) under the trust generation `verified_under`,
    /// until the guard is dropped. If the set changed since, the chain is
    /// checked against it at once (the change's own re-check may have run
    /// before this registration).
    pub fn register_peer(
        self: &Arc<Self>,
        chain: Vec<CertificateDer<'static>>,
        role: PeerRole,
        verified_under: u64,
    ) -> PeerGuard {
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        let peer = Peer {
            chain,
            role,
            accepted: UnixTime::now(),
            close: close.clone(),
        };
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.bundle();
        // A peer found untrusted here is told to close at once, and not
        // kept for later checks.
        if now.generation == verified_under || self.check(&ChainVerifier::new(&now), &peer) {
            peers.insert(id, peer);
        }
        drop(peers);
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

    /// Whether `peer` still chains to a root of `verifier`'s bundle; if
    /// not, tells it to close and counts it (as revoked too, if that is
    /// why).
    fn check(&self, verifier: &ChainVerifier, peer: &Peer) -> bool {
        match verifier.verify(&peer.chain, peer.role, peer.accepted) {
            Ok(()) => return true,
            Err(webpki::Error::CertRevoked) => self.count_revoked(peer.role),
            Err(_) => {}
        }
        self.untrusted.fetch_add(1, Ordering::Relaxed);
        peer.close.notify_one();
        false
    }

    /// Tells every registered connection `bundle` no longer anchors to
    /// close.
    fn recheck(&self, bundle: &TrustBundle) {
        let verifier = ChainVerifier::new(bundle);
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = peers.values().filter(|p| !self.check(&verifier, p)).count();
        drop(peers);
        if closed > 0 {
            warn!(
                closed,
                generation = bundle.generation,
                "closing connections whose peer no root trusts any more"
            );
        }
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
        if *current.roots == roots && *current.crls == sources.crls {
            return;
        }
        let generation = current.generation + 1;
        info!(
            generation,
            roots = roots.len(),
            before = current.roots.len(),
            crls = sources.crls.len(),
            "trust bundle changed"
        );
        *current = Arc::new(TrustBundle {
            roots: Arc::new(roots),
            crls: Arc::new(sources.crls.clone()),
            generation,
        });
        drop(current);
        drop(sources);
        self.changes.send_replace(generation);
        // Against the set in force now, not `bundle`: a later change may
        // have been published (and re-checked) while this one got here.
        self.recheck(&self.bundle());
    }
}

/// Every certificate in the PEM file at `path`.
pub fn read_pem_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let io = |source| CaError::io(path, source);
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

/// The revocation lists in the file at `path`: PEM (`X509 CRL` blocks,
/// anything else skipped) or one DER CRL, as ztunnel reads its CRL file.
/// An empty file, or PEM without a CRL, revokes nothing; a CRL that does
/// not parse makes the whole file unusable.
pub fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CaError> {
    let io = |source| CaError::io(path, source);
    let data = std::fs::read(path).map_err(io)?;
    let crls = if data.trim_ascii_start().starts_with(b"-----BEGIN") {
        let mut out = Vec::new();
        for item in rustls_pemfile::read_all(&mut data.as_slice()) {
            if let rustls_pemfile::Item::Crl(crl) = item.map_err(io)? {
                out.push(crl);
            }
        }
        out
    } else if data.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        vec![CertificateRevocationListDer::from(data)]
    };
    for (i, crl) in crls.iter().enumerate() {
        if let Err(e) = webpki::OwnedCertRevocationList::from_der(crl) {
            return Err(CaError::BadPem(format!(
                "{}: CRL {} does not parse: {e}",
                path.display(),
                i + 1
            )));
        }
    }
    Ok(crls)
}

/// Keeps `store`'s file roots following `path`: see [`follow`].
pub async fn watch_file(store: Arc<TrustStore>, path: PathBuf, interval: Duration) {
    follow(&path, interval, "trust bundle", |p| {
        store.set_file_roots(read_pem_roots(p)?)
    })
    .await
}

/// Keeps `store`'s revocation lists following the CRL file at `path`
/// (see [`read_crls`] and [`follow`]).
pub async fn watch_crl_file(store: Arc<TrustStore>, path: PathBuf, interval: Duration) {
    follow(&path, interval, "CRL", |p| {
        store.set_crls(read_crls(p)?);
        Ok(())
    })
    .await
}

/// Applies the file at `path` whenever it may have changed (inotify, see
/// [`FileWatch`]; polled every `interval` where inotify cannot be had),
/// and once at the start (it may have changed since the caller read it).
/// A version that cannot be read or used keeps the last good one and is
/// logged once per failure streak.
async fn follow(
    path: &Path,
    interval: Duration,
    what: &str,
    apply: impl Fn(&Path) -> Result<(), CaError>,
) {
    let mut watch = crate::fswatch::FileWatch::new(path, interval);
    let mut first = true;
    let mut failing = false;
    loop {
        if !first {
            watch.changed().await;
        }
        first = false;
        match apply(path) {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    warn!(path = %path.display(), error = %e, "{what} file unusable; keeping what was last read");
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

    /// A connection verified under an older set than the one in force when
    /// it registers (the change's own re-check may have run in between)
    /// is checked at once; one verified under the current set is not
    /// touched. A change then closes those no root vouches for any more.
    #[tokio::test]
    async fn registrations_and_changes_close_what_no_root_vouches_for() {
        use crate::identity::{CertManager, LocalCa};
        let old = Arc::new(LocalCa::generate("td").unwrap());
        let new = LocalCa::generate("td").unwrap();
        let certs = CertManager::new(old.clone(), old.trust_bundle(), Default::default());
        let chain = certs.fetch(&id("a")).await.unwrap().chain.clone();
        let store = TrustStore::new(vec![new.trust_bundle().roots[0].clone()]);
        store
            .set_file_roots(vec![old.trust_bundle().roots[0].clone()])
            .unwrap();
        let verified_under = store.bundle().generation;

        let current = store.register_peer(chain.clone(), PeerRole::Client, verified_under);
        store
            .set_file_roots(vec![new.trust_bundle().roots[0].clone()])
            .unwrap();
        // Verified under the old set, registered after the change.
        let late = store.register_peer(chain, PeerRole::Server, verified_under);
        for guard in [&current, &late] {
            tokio::time::timeout(Duration::from_secs(1), guard.untrusted())
                .await
                .expect("told to close");
        }
        assert_eq!(store.untrusted_closed(), 2);
        assert_eq!(store.peers(), 1, "the late one is not kept");
        drop(current);
        assert_eq!(store.peers(), 0);
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
