//! A test control plane speaking Istio's protocols over real gRPC and unix
//! sockets, driven by the same YAML mesh model as local mode: an Istio CA
//! (`ca`), a Delta xDS server (`xds`) and the CNI side of ZDS (`zds`).

pub mod ca;
pub mod xds;
pub mod zds;
