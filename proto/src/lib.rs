//! Wire types shared with Istio.
//!
//! This crate owns the protobuf and gRPC contract between the ambient node
//! agent and real Istio peers: istiod (delta xDS carrying the workload API and
//! L4 authorization policies), the Istio CA (certificate signing), and
//! istio-cni (the ZDS pod hand-off protocol). The `.proto` files under
//! `proto/` are our own declarations that keep Istio's package names, message
//! names, field numbers, types and enum values; Rust is generated at build
//! time by `protox` (pure Rust, no `protoc`) and `tonic-prost-build`.
//!
//! Modules:
//! - [`workload`] — `istio.workload` (`Address`, `Workload`, `Service`, ...).
//! - [`security`] — `istio.security` (`Authorization`, `Rule`, `Clause`, `Match`, ...).
//! - [`ca`] — `istio.v1.auth` with the `IstioCertificateService` client and server.
//! - [`discovery`] — `envoy.service.discovery.v3` delta messages and the
//!   `AggregatedDiscoveryService` client and server.
//! - [`core`] — `envoy.config.core.v3` (`Node`, `Locality`, `ControlPlane`,
//!   `Address`, `DataSource`).
//! - [`route`], [`endpoint`], [`cluster`], [`fault`], [`matcher`],
//!   [`envoy_type`] — the subset of Envoy's route configuration (RDS),
//!   endpoint assignment (EDS), clusters (CDS) and fault filter that the
//!   waypoint implements; only implemented fields
//!   are declared, so [`unknown`] finds everything else a resource carries.
//! - [`rpc`] — `google.rpc.Status`.
//! - [`zds`] — `istio.workload.zds` (istio-cni to node proxy messages).
//! - [`unknown`] — what a message carries that these files do not declare.
//!
//! Every message implements [`prost::Name`] with a
//! `type.googleapis.com/...` type URL, so [`prost_types::Any::from_msg`] and
//! [`prost_types::Any::to_msg`] produce and accept what istiod sends.
//! `prost`, `prost-types` and `tonic` are re-exported so users build against
//! the same versions as the generated code.

pub use prost;
pub use prost_types;
pub use tonic;

pub mod unknown;

/// The compiled descriptors of every .proto file here (a serialized
/// `google.protobuf.FileDescriptorSet`).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Generated code, one module per protobuf package (`pb::istio::workload`, ...).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::all,
    unreachable_pub
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/_includes.rs"));
}

pub use pb::envoy::config::cluster::v3 as cluster;
pub use pb::envoy::config::core::v3 as core;
pub use pb::envoy::config::endpoint::v3 as endpoint;
pub use pb::envoy::config::route::v3 as route;
pub use pb::envoy::extensions::filters::common::fault::v3 as fault_common;
pub use pb::envoy::extensions::filters::http::fault::v3 as fault;
pub use pb::envoy::r#type::matcher::v3 as matcher;
pub use pb::envoy::r#type::v3 as envoy_type;
pub use pb::envoy::service::discovery::v3 as discovery;
pub use pb::google::rpc;
pub use pb::istio::security;
pub use pb::istio::v1::auth as ca;
pub use pb::istio::workload;
pub use pb::istio::workload::zds;

/// xDS type URL of [`workload::Address`] resources (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// xDS type URL of [`route::RouteConfiguration`] resources (a waypoint's routes).
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// xDS type URL of [`endpoint::ClusterLoadAssignment`] resources (the
/// endpoints of the clusters a waypoint's routes name).
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// xDS type URL of [`cluster::Cluster`] resources (a waypoint's outlier
/// detection, per service).
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// The name under which a route carries HTTP fault injection
/// ([`fault::HttpFault`]) in `typed_per_filter_config`.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// xDS type URL of [`security::Authorization`] resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
