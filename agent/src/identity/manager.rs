//! Workload certificate cache and rotation: issues a certificate per identity
//! on first use (one signing request at a time per identity), renews it at
//! half-life, in the background for tracked identities, and keeps serving a
//! still-valid certificate while the CA is failing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::AbortHandle;
use tracing::{debug, warn};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CaError, CertificateSigner, Identity, TrustBundle, TrustStore, WorkloadCert};

#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    /// Lifetime requested for workload certificates.
    pub ttl: Duration,
    /// First delay before retrying a failed background renewal.
    pub retry_initial: Duration,
    /// Cap of the doubling retry delay.
    pub retry_max: Duration,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        CertManagerConfig {
            ttl: Duration::from_secs(24 * 3600),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Hands out workload certificates, signed by a [`CertificateSigner`].
pub struct CertManager {
    signer: Arc<dyn CertificateSigner>,
    trust: Arc<TrustStore>,
    cfg: CertManagerConfig,
    entries: Mutex<HashMap<Identity, Entry>>,
}

#[derive(Default)]
struct Entry {
    cert: Option<Cached>,
    /// The signing request in flight, shared by everyone waiting for it.
    pending: Option<Issuance>,
    /// Background renewal; aborted when the entry is dropped.
    tracker: Option<AbortOnDrop>,
}

#[derive(Clone)]
struct Cached {
    cert: Arc<WorkloadCert>,
    renew_at: SystemTime,
    /// The root(s) the CA sent along (trusted while this is current).
    ca_roots: Vec<CertificateDer<'static>>,
}

type Issuance = Shared<BoxFuture<'static, Result<Cached, CaError>>>;

/// What asking for a certificate came to.
enum Outcome {
    /// The cached certificate, not yet due for renewal.
    Fresh(Cached),
    /// A certificate just issued.
    Issued(Cached),
    /// Issuing failed; `stale` is what was cached before, if anything.
    Failed {
        stale: Option<Cached>,
        error: CaError,
    },
}

struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl CertManager {
    /// `trust`: the live trust anchors (a fixed [`TrustBundle`] will do);
    /// the roots the CA returns are added to them.
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        trust: impl Into<Arc<TrustStore>>,
        cfg: CertManagerConfig,
    ) -> Arc<Self> {
        Arc::new(CertManager {
            signer,
            trust: trust.into(),
            cfg,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate for `id`: cached, issued on first use, renewed once
    /// past half of its life. Concurrent callers for one identity share one
    /// signing request. If renewal fails while the cached certificate is
    /// still valid, that one is returned, so traffic keeps flowing while the
    /// CA is down.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CaError> {
        match self.obtain(id).await {
            Outcome::Fresh(c) | Outcome::Issued(c) => Ok(c.cert),
            Outcome::Failed { stale, error } => match stale {
                Some(c) if c.cert.is_valid_at(SystemTime::now()) => {
                    warn!(identity = %id, %error, "certificate renewal failed, serving the current one");
                    Ok(c.cert)
                }
                _ => Err(error),
            },
        }
    }

    /// Starts keeping `id`'s certificate fresh in the background: fetch now,
    /// then renew at half-life; on failure retry with a doubling delay from
    /// `retry_initial` to `retry_max`, never dropping a still-valid
    /// certificate. Idempotent per identity. Must be called within a Tokio
    /// runtime.
    pub fn track(self: &Arc<Self>, id: Identity) {
        let mut entries = self.lock();
        let entry = entries.entry(id.clone()).or_default();
        if entry.tracker.is_some() {
            return;
        }
        // The task holds a Weak only, and is aborted when the entry (or the
        // manager) is dropped.
        let task = tokio::spawn(renew_loop(Arc::downgrade(self), id));
        entry.tracker = Some(AbortOnDrop(task.abort_handle()));
    }

    /// Stops background renewal for `id` and drops its cached certificate.
    pub fn forget(&self, id: &Identity) {
        let removed = self.lock().remove(id);
        // Dropped outside the lock; this aborts the renewal task.
        drop(removed);
        self.trust.forget_ca_roots(id);
    }

    /// All cached certificates, by identity (for the admin config dump).
    pub fn certificates(&self) -> Vec<Arc<WorkloadCert>> {
        let entries = self.lock();
        let mut certs: Vec<_> = entries
            .values()
            .filter_map(|e| e.cert.as_ref().map(|c| c.cert.clone()))
            .collect();
        certs.sort_by(|a, b| a.identity.cmp(&b.identity));
        certs
    }

    /// The trust anchors now.
    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.trust.bundle()
    }

    /// The live trust anchors.
    pub fn trust(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        // The map stays consistent across a panic elsewhere: no poisoning.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached certificate if it is not due, else the result of a
    /// (possibly already running) signing request.
    async fn obtain(&self, id: &Identity) -> Outcome {
        let (issuance, stale) = {
            let mut entries = self.lock();
            if let Some(c) = entries.get(id).and_then(|e| e.cert.as_ref()) {
                if SystemTime::now() < c.renew_at {
                    return Outcome::Fresh(c.clone());
                }
            }
            let entry = entries.entry(id.clone()).or_default();
            let issuance = entry
                .pending
                .get_or_insert_with(|| {
                    issue(self.signer.clone(), id.clone(), self.cfg.ttl)
                        .boxed()
                        .shared()
                })
                .clone();
            (issuance, entry.cert.clone())
        };

        let result = issuance.clone().await;

        // Whichever waiter gets here first records the result; a `forget`
        // meanwhile removed the entry, and then nothing is recorded.
        let mut entries = self.lock();
        let mut recorded = None;
        if let Some(entry) = entries.get_mut(id) {
            if entry.pending.as_ref().is_some_and(|p| p.ptr_eq(&issuance)) {
                entry.pending = None;
                if let Ok(c) = &result {
                    entry.cert = Some(c.clone());
                    recorded = Some(c.ca_roots.clone());
                }
            }
            if entry.cert.is_none() && entry.pending.is_none() && entry.tracker.is_none() {
                entries.remove(id);
            }
        }
        drop(entries);
        if let Some(roots) = recorded {
            self.trust.set_ca_roots(id, roots);
        }
        match result {
            Ok(c) => Outcome::Issued(c),
            Err(error) => Outcome::Failed { stale, error },
        }
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        // Abort the renewal tasks now rather than when they next wake up.
        self.entries
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Background renewal of one identity's certificate.
async fn renew_loop(manager: Weak<CertManager>, id: Identity) {
    let mut backoff = None;
    loop {
        let Some(mgr) = manager.upgrade() else {
            return;
        };
        let (initial, max) = (mgr.cfg.retry_initial, mgr.cfg.retry_max);
        let wait = match mgr.obtain(&id).await {
            Outcome::Fresh(c) | Outcome::Issued(c) => {
                backoff = None;
                let wait = c
                    .renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                debug!(identity = %id, ?wait, "certificate renewal scheduled");
                // Floor: a CA answering with nearly expired certificates must
                // not make this loop spin.
                wait.max(initial)
            }
            Outcome::Failed { stale, error } => {
                let base = backoff.map_or(initial, |b: Duration| (b * 2).min(max));
                backoff = Some(base);
                let wait = jittered(base);
                let valid = stale.is_some_and(|c| c.cert.is_valid_at(SystemTime::now()));
                warn!(identity = %id, %error, ?wait, still_valid = valid, "certificate renewal failed, retrying");
                wait
            }
        };
        drop(mgr);
        tokio::time::sleep(wait).await;
    }
}

/// Generates a key, has the signer certify it for `id`, and checks the
/// answer.
async fn issue(
    signer: Arc<dyn CertificateSigner>,
    id: Identity,
    ttl: Duration,
) -> Result<Cached, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::KeyGen(e.to_string()))?;
    let csr = csr_pem(&id, &key)?;
    let pems = signer.sign(&id, &csr, ttl).await?;
    let received = SystemTime::now();
    let (cert, ca_roots) = workload_cert(id, &pems, &key, received)?;
    let renew_at = renew_time(&cert, received);
    debug!(identity = %cert.identity, "certificate issued");
    Ok(Cached {
        cert: Arc::new(cert),
        renew_at,
        ca_roots,
    })
}

/// A PKCS#10 request for `id`: empty subject, the SPIFFE URI as only SAN.
fn csr_pem(id: &Identity, key: &KeyPair) -> Result<String, CaError> {
    let uri = id
        .to_uri()
        .try_into()
        .map_err(|e| CaError::Csr(format!("identity is not a valid URI SAN: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| CaError::Csr(e.to_string()))
}

/// Checks a signer's PEM chain (leaf first, root last) and pairs it with
/// `key`; the root, if the chain ends with one, is returned apart.
fn workload_cert(
    id: Identity,
    pems: &[String],
    key: &KeyPair,
    now: SystemTime,
) -> Result<(WorkloadCert, Vec<CertificateDer<'static>>), CaError> {
    let mut chain = Vec::new();
    for pem in pems {
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            chain.push(cert.map_err(|e| CaError::BadChain(format!("bad PEM: {e}")))?);
        }
    }
    let (not_before, not_after) = {
        let leaf = chain
            .first()
            .ok_or_else(|| CaError::BadChain("no certificate in the answer".into()))?;
        let leaf = parse(leaf)?;
        check_identity(&leaf, &id)?;
        if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::BadChain("leaf does not certify our key".into()));
        }
        let validity = leaf.validity();
        (
            SystemTime::from(validity.not_before.to_datetime()),
            SystemTime::from(validity.not_after.to_datetime()),
        )
    };
    if not_after <= now {
        return Err(CaError::BadChain("leaf is already expired".into()));
    }
    // The root is the peers' trust anchor, not part of what we present.
    let mut roots = Vec::new();
    if chain.len() > 1 {
        if let Some(last) = chain.last() {
            let last = parse(last)?;
            if last.subject().as_raw() == last.issuer().as_raw() {
                roots.extend(chain.pop());
            }
        }
    }
    let cert = WorkloadCert {
        identity: id,
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before,
        not_after,
    };
    Ok((cert, roots))
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| CaError::BadChain(format!("unparsable certificate: {e}")))
}

/// The leaf must carry `id` as its one URI SAN.
fn check_identity(leaf: &X509Certificate<'_>, id: &Identity) -> Result<(), CaError> {
    let expected = id.to_uri();
    let sans = leaf
        .subject_alternative_name()
        .map_err(|e| CaError::BadChain(format!("bad SAN extension: {e}")))?;
    let uris: Vec<String> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect();
    if uris != [expected.as_str()] {
        return Err(CaError::IdentityMismatch {
            expected,
            found: uris,
        });
    }
    Ok(())
}

/// When to replace `cert`, received at `received`: between 40% and 50% of
/// the part of its life that is ours, at random, so the certificates of
/// many pods issued together (an agent's start, a CA back from an outage)
/// are not all renewed in the same instant. CAs backdate `not_before` for
/// clock skew (the local CA by a minute), which for short TTLs would put
/// the nominal half-life ([`WorkloadCert::refresh_at`]) in the past
/// already; this counts from receipt instead.
fn renew_time(cert: &WorkloadCert, received: SystemTime) -> SystemTime {
    let start = cert.not_before.max(received);
    let left = cert.not_after.duration_since(start).unwrap_or_default();
    start + left.mul_f64(0.4 + rand::random::<f64>() * 0.1)
}

/// `wait` stretched by up to a quarter, at random: retries of many
/// identities after a CA outage spread out instead of arriving together.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(1.0 + rand::random::<f64>() * 0.25)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    use super::super::{LocalCa, SignFuture};
    use super::*;

    /// A [`LocalCa`] that counts requests, can be slowed down, and can be
    /// switched to failing.
    struct TestSigner {
        ca: LocalCa,
        calls: AtomicUsize,
        failing: AtomicBool,
        delay: Duration,
        attempts: Mutex<Vec<Instant>>,
    }

    impl TestSigner {
        fn new(delay: Duration) -> Arc<Self> {
            Arc::new(TestSigner {
                ca: LocalCa::generate("td").unwrap(),
                calls: AtomicUsize::new(0),
                failing: AtomicBool::new(false),
                delay,
                attempts: Mutex::new(Vec::new()),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn fail(&self, failing: bool) {
            self.failing.store(failing, Ordering::SeqCst);
        }
    }

    impl CertificateSigner for TestSigner {
        fn sign<'a>(
            &'a self,
            identity: &'a Identity,
            csr: &'a str,
            ttl: Duration,
        ) -> SignFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                self.attempts.lock().unwrap().push(Instant::now());
                tokio::time::sleep(self.delay).await;
                if self.failing.load(Ordering::SeqCst) {
                    return Err(CaError::Unavailable("test CA is down".into()));
                }
                self.ca.sign(identity, csr, ttl).await
            })
        }
    }

    fn id() -> Identity {
        Identity::new("td", "ns", "sa")
    }

    fn manager(signer: &Arc<TestSigner>, ttl: Duration) -> Arc<CertManager> {
        let cfg = CertManagerConfig {
            ttl,
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_millis(200),
        };
        CertManager::new(signer.clone(), signer.ca.trust_bundle(), cfg)
    }

    /// Polls `cond` every 10ms until it holds or `limit` passes.
    async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn issues_and_caches() {
        let signer = TestSigner::new(Duration::ZERO);
        let mgr = manager(&signer, Duration::from_secs(3600));
        let cert = mgr.fetch(&id()).await.unwrap();
        assert_eq!(cert.identity, id());
        assert_eq!(cert.chain.len(), 1, "root dropped from the chain");
        assert!(cert.is_valid_at(SystemTime::now()));
        let life = cert.not_after.duration_since(cert.not_before).unwrap();
        assert!(life.abs_diff(Duration::from_secs(3660)) <= Duration::from_secs(2));

        // The key is the one the leaf certifies.
        let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
        let PrivateKeyDer::Pkcs8(key) = &cert.key else {
            panic!("not PKCS#8")
        };
        let key = KeyPair::try_from(key).unwrap();
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );

        let again = mgr.fetch(&id()).await.unwrap();
        assert!(Arc::ptr_eq(&cert, &again));
        assert_eq!(signer.calls(), 1);
        assert_eq!(mgr.certificates().len(), 1);
        assert!(mgr.trust_bundle().roots.len() == 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fetches_sign_once() {
        let signer = TestSigner::new(Duration::from_millis(100));
        let mgr = manager(&signer, Duration::from_secs(3600));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let mgr = mgr.clone();
                tokio::spawn(async move { mgr.fetch(&id()).await })
            })
            .collect();
        let mut certs = Vec::new();
        for task in tasks {
            certs.push(task.await.unwrap().unwrap());
        }
        assert_eq!(signer.calls(), 1);
        assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));

        // Another identity is signed on its own.
        let other = Identity::new("td", "ns", "other");
        assert_eq!(mgr.fetch(&other).await.unwrap().identity, other);
        assert_eq!(signer.calls(), 2);
    }

    #[tokio::test]
    async fn renews_after_half_life() {
        let signer = TestSigner::new(Duration::ZERO);
        let mgr = manager(&signer, Duration::from_secs(4));
        let first = mgr.fetch(&id()).await.unwrap();
        // Despite the CA backdating not_before by a minute, the certificate
        // is not renewed right away.
        assert!(Arc::ptr_eq(&first, &mgr.fetch(&id()).await.unwrap()));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let second = mgr.fetch(&id()).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(signer.calls(), 2);
    }

    #[tokio::test]
    async fn keeps_valid_cert_while_the_ca_fails() {
        let signer = TestSigner::new(Duration::ZERO);
        // Validity is in whole seconds: with 4s the cert is due after at
        // most 2s and still valid for at least 3s.
        let mgr = manager(&signer, Duration::from_secs(4));
        let first = mgr.fetch(&id()).await.unwrap();
        signer.fail(true);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let still = mgr.fetch(&id()).await.unwrap();
        assert!(Arc::ptr_eq(&first, &still));
        assert_eq!(signer.calls(), 2, "renewal was attempted");
    }

    /// A certificate past its end is never handed out, whatever the CA
    /// does: a workload without a valid one fails closed.
    #[tokio::test]
    async fn an_expired_certificate_is_never_served() {
        let signer = TestSigner::new(Duration::ZERO);
        let mgr = manager(&signer, Duration::from_secs(2));
        let first = mgr.fetch(&id()).await.unwrap();
        signer.fail(true);
        let until = first
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(until + Duration::from_millis(100)).await;
        assert!(!first.is_valid_at(SystemTime::now()));
        assert!(
            mgr.fetch(&id()).await.is_err(),
            "an expired certificate was served"
        );
        // Still held (for the config dump and metrics), but not served.
        assert_eq!(mgr.certificates().len(), 1);
        signer.fail(false);
        let renewed = mgr.fetch(&id()).await.unwrap();
        assert!(renewed.is_valid_at(SystemTime::now()));
    }

    /// An Istio CA answer ends with its root: that root joins the trust
    /// set while a certificate that came with it is held, and leaves with
    /// it.
    #[tokio::test]
    async fn the_cas_roots_join_the_trust_set_while_their_certificate_is_held() {
        let signer = TestSigner::new(Duration::ZERO);
        let configured = LocalCa::generate("td").unwrap().trust_bundle();
        let mgr = CertManager::new(signer.clone(), configured.clone(), Default::default());
        assert_eq!(*mgr.trust_bundle().roots, *configured.roots);
        let changes = mgr.trust().subscribe();
        mgr.fetch(&id()).await.unwrap();
        assert!(changes.has_changed().unwrap());
        let roots = mgr.trust_bundle().roots.clone();
        assert_eq!(roots.len(), 2);
        assert!(roots.contains(&signer.ca.trust_bundle().roots[0]));
        mgr.forget(&id());
        assert_eq!(*mgr.trust_bundle().roots, *configured.roots);
    }

    #[test]
    fn renewal_falls_between_40_and_50_percent_of_the_life_left() {
        let ca = LocalCa::generate("td").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_pem(&id(), &key).unwrap();
        let pems =
            futures_util::FutureExt::now_or_never(ca.sign(&id(), &csr, Duration::from_secs(1000)))
                .unwrap()
                .unwrap();
        let now = SystemTime::now();
        let (cert, _) = workload_cert(id(), &pems, &key, now).unwrap();
        let left = cert.not_after.duration_since(now).unwrap().as_secs_f64();
        let mut seen = Vec::new();
        for _ in 0..200 {
            let at = renew_time(&cert, now)
                .duration_since(now)
                .unwrap()
                .as_secs_f64();
            assert!((0.39 * left..=0.51 * left).contains(&at), "{at} of {left}");
            seen.push(at);
        }
        let spread = seen.iter().cloned().fold(f64::MIN, f64::max)
            - seen.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 0.05 * left, "no jitter: {spread}");
    }

    #[tokio::test]
    async fn error_without_a_cached_cert() {
        let signer = TestSigner::new(Duration::ZERO);
        signer.fail(true);
        let mgr = manager(&signer, Duration::from_secs(3600));
        let err = mgr.fetch(&id()).await.unwrap_err();
        assert!(matches!(err, CaError::Unavailable(_)), "{err}");
        assert!(mgr.certificates().is_empty());
        assert!(mgr.lock().is_empty(), "no empty entry left behind");
    }

    /// A signer answering with someone else's certificate is not believed.
    #[tokio::test]
    async fn rejects_a_chain_for_another_identity() {
        struct Liar(LocalCa);
        impl CertificateSigner for Liar {
            fn sign<'a>(&'a self, _: &'a Identity, _: &'a str, ttl: Duration) -> SignFuture<'a> {
                Box::pin(async move {
                    let other = Identity::new("td", "ns", "admin");
                    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                    let csr = csr_pem(&other, &key).unwrap();
                    self.0.sign(&other, &csr, ttl).await
                })
            }
        }
        let ca = LocalCa::generate("td").unwrap();
        let trust = ca.trust_bundle();
        let mgr = CertManager::new(Arc::new(Liar(ca)), trust, CertManagerConfig::default());
        let err = mgr.fetch(&id()).await.unwrap_err();
        assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn track_renews_in_the_background() {
        let signer = TestSigner::new(Duration::ZERO);
        let mgr = manager(&signer, Duration::from_secs(2));
        mgr.track(id());
        mgr.track(id());
        assert!(eventually(Duration::from_secs(1), || mgr.certificates().len() == 1).await);
        let first = mgr.certificates()[0].clone();
        assert!(
            eventually(Duration::from_secs(2), || !Arc::ptr_eq(
                &mgr.certificates()[0],
                &first
            ))
            .await,
            "renewed without anyone fetching"
        );
        assert_eq!(signer.calls(), 2, "one tracker per identity");

        mgr.forget(&id());
        assert!(mgr.certificates().is_empty());
        let calls = signer.calls();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            signer.calls(),
            calls,
            "forgotten identities are not renewed"
        );
    }

    #[tokio::test]
    async fn track_retries_with_backoff() {
        let signer = TestSigner::new(Duration::ZERO);
        signer.fail(true);
        let mgr = manager(&signer, Duration::from_secs(3600));
        mgr.track(id());
        // Attempts at about 0, 50, 150, 350, 550, 750 ms: doubling, capped.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let attempts = signer.attempts.lock().unwrap().clone();
        assert!(
            (4..=8).contains(&attempts.len()),
            "{} attempts",
            attempts.len()
        );
        let gaps: Vec<_> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[1] >= gaps[0] + Duration::from_millis(30), "{gaps:?}");
        assert!(
            gaps.iter().all(|g| *g <= Duration::from_millis(400)),
            "{gaps:?}"
        );
        assert!(mgr.certificates().is_empty());

        // Once the CA is back, the next retry succeeds.
        signer.fail(false);
        assert!(eventually(Duration::from_secs(1), || mgr.certificates().len() == 1).await);
    }

    #[tokio::test]
    async fn track_keeps_valid_cert_while_the_ca_fails() {
        let signer = TestSigner::new(Duration::ZERO);
        let mgr = manager(&signer, Duration::from_secs(4));
        mgr.track(id());
        assert!(eventually(Duration::from_secs(1), || mgr.certificates().len() == 1).await);
        let first = mgr.certificates()[0].clone();
        signer.fail(true);
        // Past the renewal time (at most 2s): failed attempts, the cert stays.
        assert!(eventually(Duration::from_secs(3), || signer.calls() >= 3).await);
        assert!(Arc::ptr_eq(&mgr.certificates()[0], &first));
        assert!(Arc::ptr_eq(&mgr.fetch(&id()).await.unwrap(), &first));
    }

    #[tokio::test]
    async fn background_tasks_do_not_keep_the_manager_alive() {
        let signer = TestSigner::new(Duration::ZERO);
        let mgr = manager(&signer, Duration::from_secs(3600));
        mgr.track(id());
        assert!(eventually(Duration::from_secs(1), || mgr.certificates().len() == 1).await);
        let weak = Arc::downgrade(&mgr);
        drop(mgr);
        assert!(weak.upgrade().is_none());
        assert_eq!(
            Arc::strong_count(&signer),
            1,
            "the signer went with the manager"
        );
    }
}
