//! A test Delta xDS server (`DeltaAggregatedResources`, plaintext h2c)
//! serving a [`Mesh`] the way istiod does: workloads and services as
//! `istio.workload.Address`, policies as `istio.security.Authorization`,
//! versions that change only when a resource does, and pushes that carry
//! only what changed plus `removed_resources`.
//!
//! A new subscription is answered at once (even when empty) with every
//! resource the client does not already hold at the same version, and the
//! removal of those it holds that are gone: the resume after a reconnect.
//! The server records ACKs, NACKs and what clients said they held, and can
//! be stopped and restarted on the same address with its resources kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::state::{Mesh, State};
use ambient_agent::xds::delta::{encode_mesh, XdsClient, XdsConfig, XdsStatus, WAYPOINT_TYPE_URLS};
use ambient_proto::core::Node;
use ambient_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambient_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use ambient_proto::tonic::codegen::tokio_stream::wrappers::{
    TcpListenerStream, UnboundedReceiverStream,
};
use ambient_proto::tonic::codegen::tokio_stream::{Stream, StreamExt};
use ambient_proto::tonic::transport::{Server, ServerTlsConfig};
use ambient_proto::tonic::{self, Request, Response, Status, Streaming};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

type Outbound = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

/// A running (or stopped) test xDS server.
pub struct TestXds {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Option<Running>,
    tls: Option<ServerTlsConfig>,
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Type URL -> name -> resource (with its version).
    resources: BTreeMap<String, BTreeMap<String, Resource>>,
    clients: HashMap<u64, Client>,
    next_client: u64,
    next_nonce: u64,
    acks: usize,
    nacks: Vec<String>,
    last_initial_versions: BTreeMap<String, String>,
    last_authorization: Option<String>,
    last_cluster_id: Option<String>,
    /// The node of the last stream's first request that carried one.
    last_node: Option<Node>,
}

struct Client {
    tx: Outbound,
    subscribed: BTreeSet<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn nonce(&mut self) -> String {
        self.next_nonce += 1;
        self.next_nonce.to_string()
    }

    /// Sends a response of `type_url` to every client subscribed to it.
    fn push(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) {
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            let nonce = self.nonce();
            if let Some(c) = self.clients.get(&id) {
                if c.subscribed.contains(type_url) {
                    let _ = c.tx.send(Ok(DeltaDiscoveryResponse {
                        type_url: type_url.to_string(),
                        nonce,
                        resources: resources.clone(),
                        removed_resources: removed.clone(),
                        ..Default::default()
                    }));
                }
            }
        }
    }

    fn on_request(&mut self, id: u64, req: DeltaDiscoveryRequest) {
        if let Some(node) = &req.node {
            self.last_node = Some(node.clone());
        }
        if !req.response_nonce.is_empty() {
            match req.error_detail {
                Some(status) => self.nacks.push(status.message),
                None => self.acks += 1,
            }
            return;
        }
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if !client.subscribed.insert(req.type_url.clone()) {
            return;
        }
        // Resume: send what the client lacks or holds at another version,
        // remove what it holds that is gone.
        let held = req.initial_resource_versions;
        let current = self
            .resources
            .get(&req.type_url)
            .cloned()
            .unwrap_or_default();
        let resources = current
            .values()
            .filter(|r| held.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        let removed = held
            .keys()
            .filter(|n| !current.contains_key(*n))
            .cloned()
            .collect();
        self.last_initial_versions.extend(held);
        let nonce = self.nonce();
        if let Some(client) = self.clients.get(&id) {
            let _ = client.tx.send(Ok(DeltaDiscoveryResponse {
                type_url: req.type_url,
                nonce,
                resources,
                removed_resources: removed,
                ..Default::default()
            }));
        }
    }
}

/// A content hash written as istiod writes its address versions (a 64-bit
/// hash in lowercase hex, no leading zeros: `strconv.FormatUint(h, 16)`
/// in `pilot/pkg/model/service.go`): the version changes exactly when the
/// body does.
fn version(any: &ambient_proto::prost_types::Any) -> String {
    let digest = Sha256::digest(&any.value);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    format!("{:x}", u64::from_be_bytes(first))
}

impl TestXds {
    /// Serves on `addr` (e.g. `127.x.0.1:0`) with no resources yet.
    pub async fn start(addr: SocketAddr) -> anyhow::Result<TestXds> {
        Self::start_with(addr, None).await
    }

    /// Serves over TLS with `cert_pem` (chain) and `key_pem`, as istiod
    /// does on 15012.
    pub async fn start_tls(
        addr: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<TestXds> {
        let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
        Self::start_with(addr, Some(ServerTlsConfig::new().identity(identity))).await
    }

    async fn start_with(addr: SocketAddr, tls: Option<ServerTlsConfig>) -> anyhow::Result<TestXds> {
        let listener = TcpListener::bind(addr).await?;
        let mut xds = TestXds {
            addr: listener.local_addr()?,
            shared: Arc::default(),
            running: None,
            tls,
        };
        xds.serve(listener)?;
        Ok(xds)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ADS service on this server's state, for a server that carries
    /// it beside others (istiod's 15012 serves xDS and the CA).
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<impl AggregatedDiscoveryService> {
        let stop = match &self.running {
            Some(r) => r.stop.subscribe(),
            None => watch::channel(false).1,
        };
        AggregatedDiscoveryServiceServer::new(Ads {
            shared: self.shared.clone(),
            stop,
        })
    }

    /// `http://<addr>` (or `https://`), for an `XdsConfig`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) -> anyhow::Result<()> {
        let mut builder = Server::builder();
        if let Some(tls) = &self.tls {
            builder = builder.tls_config(tls.clone())?;
        }
        let (stop, stop_rx) = watch::channel(false);
        let ads = Ads {
            shared: self.shared.clone(),
            stop: stop_rx.clone(),
        };
        let mut signal = stop_rx;
        let task = tokio::spawn(async move {
            let result = builder
                .add_service(AggregatedDiscoveryServiceServer::new(ads))
                .serve_with_incoming_shutdown(incoming(listener), async move {
                    let _ = signal.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "test xDS server failed");
            }
        });
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Serves `mesh` from now on: pushes the resources that changed and
    /// the removal of those that are gone to every subscribed client.
    ///
    /// Panics if the mesh has what the protos cannot carry (a test bug).
    pub fn set_mesh(&self, mesh: &Mesh) {
        let encoded = encode_mesh(mesh).expect("mesh can be served over xDS");
        let mut inner = self.shared.lock();
        for type_url in WAYPOINT_TYPE_URLS {
            let new: BTreeMap<String, Resource> = encoded
                .of_type(type_url)
                .into_iter()
                .map(|(name, any)| {
                    let r = Resource {
                        name: name.clone(),
                        version: version(&any),
                        resource: Some(any),
                        ..Default::default()
                    };
                    (name, r)
                })
                .collect();
            let old = inner.resources.remove(type_url).unwrap_or_default();
            let changed: Vec<Resource> = new
                .values()
                .filter(|r| old.get(&r.name).map(|o| &o.version) != Some(&r.version))
                .cloned()
                .collect();
            let removed: Vec<String> = old
                .keys()
                .filter(|n| !new.contains_key(*n))
                .cloned()
                .collect();
            inner.resources.insert(type_url.to_string(), new);
            if !changed.is_empty() || !removed.is_empty() {
                inner.push(type_url, changed, removed);
            }
        }
    }

    /// Pushes `resource` as `name` to every client subscribed to
    /// `type_url`, without keeping it (e.g. a malformed one).
    pub fn push_raw(&self, type_url: &str, name: &str, mut resource: Resource) {
        resource.name = name.to_string();
        self.push_response(type_url, vec![resource]);
    }

    /// Pushes `resources` (named) in one response to every client
    /// subscribed to `type_url`, without keeping them.
    pub fn push_response(&self, type_url: &str, mut resources: Vec<Resource>) {
        for r in &mut resources {
            if r.version.is_empty() {
                r.version = "raw".into();
            }
        }
        self.shared.lock().push(type_url, resources, Vec::new());
    }

    /// A client configuration for the agent of `node`, reconnecting fast.
    pub fn client_config(&self, node: &str) -> XdsConfig {
        XdsConfig {
            address: self.url(),
            node_id: format!(
                "ztunnel~127.0.0.1~ztunnel-{node}.istio-system~istio-system.svc.cluster.local"
            ),
            node_metadata: [("NODE_NAME".to_string(), node.to_string())].into(),
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(400),
            ..Default::default()
        }
    }

    /// The resource served as `name` of `type_url`, if any.
    pub fn resource(&self, type_url: &str, name: &str) -> Option<Resource> {
        self.shared
            .lock()
            .resources
            .get(type_url)?
            .get(name)
            .cloned()
    }

    /// ACKs received so far.
    pub fn acks(&self) -> usize {
        self.shared.lock().acks
    }

    /// The `error_detail` messages of the NACKs received so far.
    pub fn nacks(&self) -> Vec<String> {
        self.shared.lock().nacks.clone()
    }

    /// Open streams.
    pub fn connected_clients(&self) -> usize {
        self.shared.lock().clients.len()
    }

    /// What the last connecting client said it held (both types).
    pub fn last_initial_versions(&self) -> BTreeMap<String, String> {
        self.shared.lock().last_initial_versions.clone()
    }

    /// The `authorization` header of the last stream.
    pub fn last_authorization(&self) -> Option<String> {
        self.shared.lock().last_authorization.clone()
    }

    /// The `clusterid` header of the last stream.
    pub fn last_cluster_id(&self) -> Option<String> {
        self.shared.lock().last_cluster_id.clone()
    }

    /// The node the last stream's client introduced itself as.
    pub fn last_node(&self) -> Option<Node> {
        self.shared.lock().last_node.clone()
    }

    /// Name -> version of everything served (both types).
    pub fn versions(&self) -> BTreeMap<String, String> {
        let inner = self.shared.lock();
        let all = inner.resources.values().flat_map(|m| m.values());
        all.map(|r| (r.name.clone(), r.version.clone())).collect()
    }

    /// Ends every stream with UNAVAILABLE and stops listening. Resources
    /// are kept for [`TestXds::restart`].
    pub async fn stop(&mut self) {
        let Some(Running { stop, mut task }) = self.running.take() else {
            return;
        };
        let _ = stop.send(true);
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        self.shared.lock().clients.clear();
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener)
    }
}

impl Drop for TestXds {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(true);
            r.task.abort();
        }
    }
}

/// Accepted connections, with Nagle off (it delays small responses by the
/// peer's delayed-ACK timeout).
fn incoming(
    listener: TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

struct Ads {
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let authorization = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let cluster_id = req
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut inner = self.shared.lock();
            inner.next_client += 1;
            let id = inner.next_client;
            inner.last_authorization = authorization;
            inner.last_cluster_id = cluster_id;
            inner.last_node = None;
            inner.last_initial_versions.clear();
            inner.clients.insert(
                id,
                Client {
                    tx: tx.clone(),
                    subscribed: BTreeSet::new(),
                },
            );
            id
        };
        let shared = self.shared.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {
                        let _ = tx.send(Err(Status::unavailable("test xDS server stopping")));
                        break;
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => shared.lock().on_request(id, req),
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            shared.lock().clients.remove(&id);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// An xDS client feeding `state` until the handle is dropped.
pub struct Feed {
    pub status: watch::Receiver<XdsStatus>,
    _stop: oneshot::Sender<()>,
}

/// Runs an xDS client with `cfg` into `state`.
pub fn feed(cfg: XdsConfig, state: Arc<State>) -> Feed {
    let client = XdsClient::new(cfg, state);
    let status = client.status();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(client.run(async move {
        let _ = stopped.await;
    }));
    Feed {
        status,
        _stop: stop,
    }
}

/// An agent of `w` whose mesh comes only from `xds` (no mesh file).
pub async fn xds_agent(w: &crate::World, xds: &TestXds, node: &str) -> (Agent, Feed) {
    let mut cfg = w.config(node);
    cfg.mesh_file = None;
    let agent = w.agent_with(cfg).await;
    let feed = feed(xds.client_config(node), agent.state.clone());
    (agent, feed)
}

/// Waits up to 5 s for `cond`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
