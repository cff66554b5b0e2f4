//! Delta xDS client: the mesh from istiod.
//!
//! One `DeltaAggregatedResources` stream carries two wildcard subscriptions,
//! `istio.workload.Address` (workloads and services) and
//! `istio.security.Authorization` (L4 policies), as ztunnel makes them; a
//! waypoint adds Envoy's `RouteConfiguration`, `ClusterLoadAssignment` and
//! `Cluster` (its L7 routes, see `routes`).
//! Every response is applied resource by resource, as ztunnel does: its
//! removals, and each resource that decodes and fits with the rest
//! (`convert`); what changed becomes a [`Delta`](crate::state::Delta)
//! installed with [`State::apply_since`]. A bad resource is refused on its own: its last
//! good version (if any) keeps serving, and the response is NACKed with
//! `INVALID_ARGUMENT` naming only the refused resources and what is wrong
//! with them. A valid DENY is never held back by a bad neighbour.
//!
//! The mesh is installed only once both types have answered, so the agent
//! never serves workloads without the policies that guard them. After a
//! reconnect (exponential backoff with jitter) the client tells the server
//! what it holds (`initial_resource_versions`) and keeps serving it
//! meanwhile; the server sends what changed and what was removed.

mod convert;
mod encode;
mod ignored;
mod resources;
mod routes;
#[cfg(test)]
mod tests;
mod version;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_proto::core::Node;
use ambient_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambient_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambient_proto::prost_types::{value::Kind, Struct, Value};
use ambient_proto::rpc;
use ambient_proto::tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use ambient_proto::tonic::metadata::MetadataValue;
use ambient_proto::tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use ambient_proto::tonic::{self, Request};
use ambient_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, ROUTE_TYPE_URL,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::state::State;

pub use convert::{Invalid, RejectReason, Rejected, ResponseError};
pub use encode::{canonical, encode_mesh, EncodeError, EncodedMesh};

/// The types a node agent subscribes to, in the order they are requested.
pub const TYPE_URLS: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];
/// A waypoint's: the node agent's, then its routes, their clusters'
/// endpoints, and the services' clusters (outlier detection).
pub const WAYPOINT_TYPE_URLS: [&str; 5] = [
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    ROUTE_TYPE_URL,
    ENDPOINT_TYPE_URL,
    CLUSTER_TYPE_URL,
];

/// The header naming the agent's cluster, beside its token.
const CLUSTER_ID_HEADER: &str = "clusterid";
/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;
/// istiod pushes can be large (every workload of a cluster).
const MAX_MESSAGE_SIZE: usize = 256 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PINGs find a dead control plane connection that TCP would not.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A response with at least this many resources (added or removed) is
/// followed by handing what its decoding freed back to the OS.
const LARGE_RESPONSE: usize = 1_000;

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// e.g. `https://istiod.istio-system.svc:15012`; `http://` is plaintext.
    pub address: String,
    /// PEM root(s) to verify the control plane with; required for https.
    pub root_cert: Option<PathBuf>,
    /// Name to verify in the control plane's certificate, when it is not
    /// the address's host (e.g. `istiod.istio-system.svc`).
    pub server_name: Option<String>,
    /// Bearer token, re-read on each (re)connect (tokens are rotated).
    pub token_path: Option<PathBuf>,
    /// Sent beside the token as the `clusterid` header, as ztunnel does on
    /// both the xDS and CA streams (istiod picks the cluster whose API
    /// server reviews the token by it).
    pub cluster_id: Option<String>,
    /// Istio form: `ztunnel~<pod ip>~<pod name>.<namespace>~<namespace>.svc.cluster.local`.
    pub node_id: String,
    /// Node metadata, as string values (`NAMESPACE`, `CLUSTER_ID`, `NODE_NAME`...).
    pub node_metadata: BTreeMap<String, String>,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Also subscribe to a waypoint's L7 configuration (Envoy routes,
    /// endpoint assignments and clusters).
    pub waypoint: bool,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            address: "https://istiod.istio-system.svc:15012".into(),
            root_cert: None,
            server_name: None,
            token_path: None,
            cluster_id: None,
            node_id: String::new(),
            node_metadata: BTreeMap::new(),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(15),
            waypoint: false,
        }
    }
}

/// What the client is doing, for tests, readiness and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdsStatus {
    /// A stream to the control plane is open.
    pub connected: bool,
    /// Every subscribed type has been received and accepted at least once
    /// (the mesh is being installed).
    pub synced: bool,
    /// Streams opened so far.
    pub connections: u64,
    /// Connection attempts that failed, or streams that ended, so far.
    pub failures: u64,
    pub acks: u64,
    pub nacks: u64,
    /// The message of the last NACK sent.
    pub last_nack: Option<String>,
    /// Why the last connection attempt or stream failed.
    pub last_error: Option<String>,
    /// Resources held, over all types.
    pub resources: usize,
    /// Times a new mesh was installed into the state.
    pub installs: u64,
    /// Fields istiod sent that this agent does not act on (`Message.field`),
    /// with how many held resources carry each.
    pub ignored_fields: BTreeMap<String, usize>,
}

/// Why a connection attempt or stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("invalid control plane address {address:?}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("an https control plane address needs root_cert")]
    NoRootCert,
    #[error("reading root certificate {}: {source}", path.display())]
    RootCert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS settings: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("reading token {}: {source}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token {} is empty or not a valid header value", path.display())]
    BadToken { path: PathBuf },
    #[error("cluster id {0:?} is not a valid header value")]
    BadClusterId(String),
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("stream: {0}")]
    Stream(Box<tonic::Status>),
    #[error("the control plane closed the stream")]
    Closed,
}

/// The Delta xDS client; [`XdsClient::run`] keeps `state` in step with
/// the control plane.
pub struct XdsClient {
    cfg: XdsConfig,
    state: Arc<State>,
    resources: resources::Resources,
    /// The types subscribed to.
    types: &'static [&'static str],
    /// Types not yet received and accepted once; nothing is installed
    /// until this is empty.
    unsynced: BTreeSet<&'static str>,
    status: watch::Sender<XdsStatus>,
}

impl XdsClient {
    pub fn new(cfg: XdsConfig, state: Arc<State>) -> Self {
        let types: &'static [&'static str] = if cfg.waypoint {
            &WAYPOINT_TYPE_URLS
        } else {
            &TYPE_URLS
        };
        XdsClient {
            cfg,
            state,
            resources: resources::Resources::default(),
            types,
            unsynced: types.iter().copied().collect(),
            status: watch::channel(XdsStatus::default()).0,
        }
    }

    /// A receiver of the client's status.
    pub fn status(&self) -> watch::Receiver<XdsStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` resolves: connect, subscribe, apply, ACK or
    /// NACK; reconnect with exponential backoff when the stream ends.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let initial = self.cfg.reconnect_initial.max(Duration::from_millis(1));
        let max = self.cfg.reconnect_max.max(initial);
        let mut backoff = initial;
        loop {
            let mut received = false;
            let result = tokio::select! {
                () = &mut shutdown => return,
                r = self.stream(&mut received) => r,
            };
            // A stream that worked resets the backoff: a control plane
            // restart or a max-connection-age close is not an outage.
            if received {
                backoff = initial;
            }
            let error = match result {
                Ok(()) => XdsError::Closed,
                Err(e) => e,
            };
            let delay = jitter(backoff);
            let error = chain(&error);
            warn!(address = %self.cfg.address, %error, retry_in = ?delay, "xDS stream ended");
            self.status.send_modify(|s| {
                s.connected = false;
                s.failures += 1;
                s.last_error = Some(error);
            });
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(max);
        }
    }

    /// One stream, from connecting to its end. Sets `received` once a
    /// response arrives.
    async fn stream(&mut self, received: &mut bool) -> Result<(), XdsError> {
        let channel = self.connect().await?;
        let (tx, rx) = mpsc::channel(self.types.len() + 1);
        for type_url in self.types {
            let req = self.initial_request(type_url);
            debug!(
                type_url,
                held = req.initial_resource_versions.len(),
                "subscribing"
            );
            // Cannot fail: the receiver is alive and there is room.
            let _ = tx.try_send(req);
        }
        let mut request = Request::new(ReceiverStream::new(rx));
        if let Some(token) = self.token().await? {
            request.metadata_mut().insert("authorization", token);
            if let Some(id) = &self.cfg.cluster_id {
                let id = id.parse().map_err(|_| XdsError::BadClusterId(id.clone()))?;
                request.metadata_mut().insert(CLUSTER_ID_HEADER, id);
            }
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        let mut responses = client
            .delta_aggregated_resources(request)
            .await
            .map_err(|s| XdsError::Stream(Box::new(s)))?
            .into_inner();
        info!(address = %self.cfg.address, "connected to the control plane");
        self.status.send_modify(|s| {
            s.connected = true;
            s.connections += 1;
        });
        while let Some(resp) = responses
            .message()
            .await
            .map_err(|s| XdsError::Stream(Box::new(s)))?
        {
            *received = true;
            let large = resp.resources.len() + resp.removed_resources.len() >= LARGE_RESPONSE;
            let reply = self.handle(resp);
            if large {
                // The response and its decoding are freed by now.
                crate::heap::release_freed();
            }
            if tx.send(reply).await.is_err() {
                // The request stream is gone: so is the call.
                return Err(XdsError::Closed);
            }
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Channel, XdsError> {
        let address = &self.cfg.address;
        let mut endpoint =
            Endpoint::from_shared(address.clone()).map_err(|source| XdsError::Address {
                address: address.clone(),
                source,
            })?;
        endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if endpoint.uri().scheme_str() == Some("https") {
            let path = self.cfg.root_cert.as_ref().ok_or(XdsError::NoRootCert)?;
            let pem = tokio::fs::read(path)
                .await
                .map_err(|source| XdsError::RootCert {
                    path: path.clone(),
                    source,
                })?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(name) = &self.cfg.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(XdsError::Tls)?;
        }
        endpoint
            .connect()
            .await
            .map_err(|source| XdsError::Connect {
                address: address.clone(),
                source,
            })
    }

    /// `Bearer <token>` from the token file, read now (it rotates).
    async fn token(&self) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, XdsError> {
        let Some(path) = &self.cfg.token_path else {
            return Ok(None);
        };
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| XdsError::Token {
                path: path.clone(),
                source,
            })?;
        let token = text.trim();
        let bad = || XdsError::BadToken { path: path.clone() };
        if token.is_empty() {
            return Err(bad());
        }
        format!("Bearer {token}")
            .parse()
            .map(Some)
            .map_err(|_| bad())
    }

    fn node(&self) -> Node {
        let fields = self
            .cfg
            .node_metadata
            .iter()
            .map(|(k, v)| {
                let value = Value {
                    kind: Some(Kind::StringValue(v.clone())),
                };
                (k.clone(), value)
            })
            .collect();
        Node {
            id: self.cfg.node_id.clone(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }

    /// A wildcard subscription (no names) carrying the node, as istiod
    /// expects on a stream's first requests, and the resources held.
    fn initial_request(&self, type_url: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node()),
            type_url: type_url.to_string(),
            initial_resource_versions: self.resources.versions(type_url),
            ..Default::default()
        }
    }

    /// Applies one response and returns its ACK, or a NACK naming the
    /// resources it refused (the rest of the response is applied).
    fn handle(&mut self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let started = std::time::Instant::now();
        let type_url = resp.type_url.clone();
        let nonce = resp.nonce.clone();
        let (added, removed) = (resp.resources.len(), resp.removed_resources.len());
        let (installed, error) = match self.apply(resp, started) {
            Ok((installed, rejected)) => (installed, rejected),
            Err(e) => (false, Some(e)),
        };
        let resources = self.resources.len();
        let ignored_fields = self.resources.ignored_fields();
        let synced = self.unsynced.is_empty();
        self.status.send_modify(|s| {
            s.synced = synced;
            s.resources = resources;
            s.ignored_fields = ignored_fields;
            s.installs += u64::from(installed);
        });
        let Some(e) = error else {
            info!(%type_url, %nonce, added, removed, installed, "ACK");
            self.status.send_modify(|s| s.acks += 1);
            return DeltaDiscoveryRequest {
                type_url,
                response_nonce: nonce,
                ..Default::default()
            };
        };
        let message = e.to_string();
        warn!(%type_url, %nonce, added, removed, installed, error = %message,
            "NACK; the refused resources keep their last good version");
        self.status.send_modify(|s| {
            s.nacks += 1;
            s.last_nack = Some(message.clone());
        });
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail: Some(rpc::Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    /// Applies `resp` resource by resource. Returns whether a new mesh was
    /// installed and what was refused; an error refuses the whole response.
    fn apply(
        &mut self,
        resp: DeltaDiscoveryResponse,
        started: std::time::Instant,
    ) -> Result<(bool, Option<ResponseError>), ResponseError> {
        let type_url = resp.type_url.clone();
        if !self.types.contains(&type_url.as_str()) {
            return Err(ResponseError::UnknownType(type_url));
        }
        let applied = self.resources.apply(resp)?;
        // A type has answered once its first response is processed, even
        // if some of it was refused: the server will not send it again.
        if let Some(t) = self.types.iter().find(|t| **t == type_url) {
            self.unsynced.remove(t);
        }
        let rejected = applied.into_error();
        if !self.unsynced.is_empty() {
            return Ok((false, rejected));
        }
        // Only what this response touched is compared and installed.
        let delta = self.resources.delta(&self.state.snapshot());
        Ok((self.state.apply_since(delta, started), rejected))
    }
}

/// `e: its source: its source's source...` (tonic's transport errors say
/// little at the top: "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// `d` spread by ±20% so agents do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..1.2))
}
