//! Readiness (`GET /healthz/ready`): the agent is ready once the mesh is
//! loaded, its listeners are up, it knows its pods (Istio mode: the CNI's
//! snapshot arrived), every pod it should serve is served, and every one
//! holds a valid certificate — as ztunnel, which is ready only with xDS
//! synced, the snapshot received and no pod pending. A new agent taking
//! over a node is ready only once it really serves it. The decision is a
//! pure function of [`Conditions`] so it can be checked without sockets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::identity::{Identity, WorkloadCert};

use crate::xds::delta::XdsStatus;

/// Where the mesh comes from, and so when it counts as loaded.
#[derive(Clone, Debug)]
pub enum MeshReady {
    /// Local mode: the initial load finished before the agent started.
    Loaded,
    /// Istio mode: loaded once the xDS client has synced every type.
    Xds(watch::Receiver<XdsStatus>),
}

/// The agent's progress towards readiness. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    mesh: MeshReady,
    listeners: AtomicBool,
}

impl Readiness {
    pub fn new(mesh: MeshReady) -> Self {
        Readiness {
            inner: Arc::new(Inner {
                mesh,
                listeners: AtomicBool::new(false),
            }),
        }
    }

    /// The xDS client's status, in Istio mode.
    pub fn xds_status(&self) -> Option<XdsStatus> {
        match &self.inner.mesh {
            MeshReady::Loaded => None,
            MeshReady::Xds(rx) => Some(rx.borrow().clone()),
        }
    }

    /// Records that the first reconciliation ran: the listeners of the
    /// workloads known at start are open.
    pub fn listeners_started(&self) {
        self.inner.listeners.store(true, Ordering::Release);
    }

    /// The conditions now, given the local workloads and the certificates
    /// held.
    pub fn conditions(
        &self,
        workloads: &dyn super::LocalWorkloads,
        certs: &[Arc<WorkloadCert>],
        shutting_down: bool,
        now: SystemTime,
    ) -> Conditions {
        let served = workloads.served();
        let mesh_loaded = match &self.inner.mesh {
            MeshReady::Loaded => true,
            MeshReady::Xds(status) => status.borrow().synced,
        };
        let mut without_certificate: Vec<Identity> = served
            .iter()
            .map(|w| w.identity())
            .filter(|id| {
                !certs
                    .iter()
                    .any(|c| &c.identity == id && c.is_valid_at(now))
            })
            .collect();
        without_certificate.sort();
        without_certificate.dedup();
        Conditions {
            mesh_loaded,
            listeners_up: self.inner.listeners.load(Ordering::Acquire),
            pods_known: workloads.pods_known(),
            not_served: workloads
                .pending()
                .into_iter()
                .map(|(uid, _)| uid)
                .collect(),
            without_certificate,
            shutting_down,
        }
    }
}

/// What readiness is decided from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Local mode: initial load done; Istio mode: xDS synced.
    pub mesh_loaded: bool,
    /// The reconciler has run once.
    pub listeners_up: bool,
    /// Istio mode: the CNI's snapshot arrived (always true otherwise).
    pub pods_known: bool,
    /// Workloads that should be served and are not (yet).
    pub not_served: Vec<String>,
    /// Identities of served workloads with no valid certificate yet.
    pub without_certificate: Vec<Identity>,
    /// The agent was told to stop.
    pub shutting_down: bool,
}

impl Conditions {
    /// `Ok` when ready, else a short reason for the 503 body.
    pub fn check(&self) -> Result<(), String> {
        if self.shutting_down {
            return Err("shutting down".into());
        }
        if !self.mesh_loaded {
            return Err("mesh configuration not loaded yet".into());
        }
        if !self.listeners_up {
            return Err("listeners not started yet".into());
        }
        if !self.pods_known {
            return Err("pods not known yet (no snapshot from the CNI)".into());
        }
        if !self.not_served.is_empty() {
            return Err(format!("not serving {} yet", self.not_served.join(", ")));
        }
        if !self.without_certificate.is_empty() {
            let ids: Vec<String> = self
                .without_certificate
                .iter()
                .map(|i| i.to_string())
                .collect();
            return Err(format!("no certificate yet for {}", ids.join(", ")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Workload;

    fn ready() -> Conditions {
        Conditions {
            mesh_loaded: true,
            listeners_up: true,
            pods_known: true,
            ..Default::default()
        }
    }

    /// Local workloads for tests.
    #[derive(Default)]
    struct Fixed {
        served: Vec<Arc<Workload>>,
        pending: Vec<(String, String)>,
        unknown: bool,
    }

    impl crate::admin::LocalWorkloads for Fixed {
        fn served(&self) -> Vec<Arc<Workload>> {
            self.served.clone()
        }
        fn pending(&self) -> Vec<(String, String)> {
            self.pending.clone()
        }
        fn pods_known(&self) -> bool {
            !self.unknown
        }
    }

    #[test]
    fn every_condition_is_needed() {
        assert_eq!(ready().check(), Ok(()));
        let not_loaded = Conditions {
            mesh_loaded: false,
            ..ready()
        };
        assert!(not_loaded.check().unwrap_err().contains("mesh"));
        let no_listeners = Conditions {
            listeners_up: false,
            ..ready()
        };
        assert!(no_listeners.check().unwrap_err().contains("listeners"));
        let no_cert = Conditions {
            without_certificate: vec![Identity::new("td", "ns", "sa")],
            ..ready()
        };
        assert!(no_cert
            .check()
            .unwrap_err()
            .contains("spiffe://td/ns/ns/sa/sa"));
        let no_snapshot = Conditions {
            pods_known: false,
            ..ready()
        };
        assert!(no_snapshot.check().unwrap_err().contains("snapshot"));
        let pending = Conditions {
            not_served: vec!["pod-a".into()],
            ..ready()
        };
        assert_eq!(pending.check(), Err("not serving pod-a yet".into()));
        let stopping = Conditions {
            shutting_down: true,
            ..ready()
        };
        assert_eq!(stopping.check(), Err("shutting down".into()));
    }

    fn workload(sa: &str) -> Arc<Workload> {
        Arc::new(Workload {
            protocol: Default::default(),
            ..Workload::for_test(sa, "ns", None)
        })
    }

    #[tokio::test]
    async fn follows_xds_listeners_and_certificates() {
        let (tx, rx) = watch::channel(XdsStatus::default());
        let r = Readiness::new(MeshReady::Xds(rx));
        let now = SystemTime::now();
        let none = Fixed::default();
        let c = r.conditions(&none, &[], false, now);
        assert!(!c.mesh_loaded && !c.listeners_up);
        assert!(c.check().is_err());

        tx.send_modify(|s| s.synced = true);
        r.listeners_started();
        assert_eq!(r.conditions(&none, &[], false, now).check(), Ok(()));
        let waiting = Fixed {
            pending: vec![("pod-a".into(), "address in use".into())],
            ..Default::default()
        };
        assert!(r.conditions(&waiting, &[], false, now).check().is_err());
        let unknown = Fixed {
            unknown: true,
            ..Default::default()
        };
        assert!(r.conditions(&unknown, &[], false, now).check().is_err());

        let ca = Arc::new(crate::identity::LocalCa::generate("td").expect("CA"));
        let trust = ca.trust_bundle();
        let certs = crate::identity::CertManager::new(ca, trust, Default::default());
        let served = Fixed {
            served: vec![workload("a")],
            ..Default::default()
        };
        let c = r.conditions(&served, &certs.certificates(), false, now);
        assert_eq!(c.without_certificate, vec![Identity::new("td", "ns", "a")]);
        assert!(c.check().is_err());

        certs
            .fetch(&Identity::new("td", "ns", "a"))
            .await
            .expect("certificate");
        let c = r.conditions(&served, &certs.certificates(), false, SystemTime::now());
        assert_eq!(c.check(), Ok(()));
        let c = r.conditions(&served, &certs.certificates(), true, SystemTime::now());
        assert!(c.check().is_err());
    }
}
