//! A test control plane speaking Istio's protocols over real gRPC and unix
//! sockets, driven by the same YAML mesh model as local mode: an Istio CA
//! (`ca`), a Delta xDS server (`xds`), both on one address as istiod
//! (`istiod`), and the CNI side of ZDS (`zds`).

pub mod ca;
pub mod istiod;
pub mod xds;
pub mod zds;
