//! What `istioctl ztunnel-config` decodes from a ztunnel's `/config_dump`:
//! its Go structs and their json tags (istio/istio@86c9f01f
//! `istioctl/pkg/writer/ztunnel/configdump/api.go`, read by
//! `configdump.go`, which takes only `workloads`, `services`, `policies`,
//! `certificates` and `workloadState`), written as serde types. Go's
//! decoder ignores unknown keys and leaves missing ones at their zero
//! value, but fails on a value of the wrong JSON type; so do these (no
//! `deny_unknown_fields`, `default` on every field).

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ZtunnelDump {
    pub workloads: Vec<ZtunnelWorkload>,
    pub services: Vec<ZtunnelService>,
    pub policies: Vec<ZtunnelPolicy>,
    pub certificates: Vec<CertsDump>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ZtunnelWorkload {
    pub uid: String,
    pub workload_ips: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
    pub network_gateway: Option<GatewayAddress>,
    pub protocol: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub cluster_id: String,
    pub trust_domain: String,
    pub locality: Option<Locality>,
    pub node: String,
    pub network: String,
    pub status: String,
    pub hostname: String,
    pub capacity: u32,
    pub application_tunnel: Option<ApplicationTunnel>,
    pub authorization_policies: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct GatewayAddress {
    pub destination: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApplicationTunnel {
    pub protocol: String,
    pub port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ZtunnelService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<String>,
    pub ports: HashMap<String, i64>,
    pub waypoint: Option<GatewayAddress>,
    pub endpoints: HashMap<String, ZtunnelEndpoint>,
    pub subject_alt_names: Vec<String>,
    pub ip_families: String,
    pub canonical: bool,
    pub visibility: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ZtunnelEndpoint {
    pub workload_uid: String,
    pub service: String,
    pub address: Option<serde_json::Value>,
    /// Go's `map[uint16]uint16`: keys are decimal strings in JSON.
    pub port: HashMap<u16, u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ZtunnelPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: String,
    pub action: String,
    pub rules: Vec<Vec<Vec<PolicyMatch>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PolicyMatch {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<String>,
    pub not_source_ips: Vec<String>,
    pub destination_ips: Vec<String>,
    pub not_destination_ips: Vec<String>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// Capitalized keys, one set: ztunnel's externally tagged `StringMatching`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StringMatch {
    #[serde(rename = "Exact")]
    pub exact: Option<String>,
    #[serde(rename = "Prefix")]
    pub prefix: Option<String>,
    #[serde(rename = "Suffix")]
    pub suffix: Option<String>,
    #[serde(rename = "Presence")]
    pub presence: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CertsDump {
    pub identity: String,
    pub state: String,
    pub cert_chain: Vec<Cert>,
    pub root_certs: Vec<Cert>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Cert {
    /// Base64 of the PEM text.
    pub pem: String,
    /// Decimal (istioctl parses it base 10).
    pub serial_number: String,
    /// RFC 3339.
    pub valid_from: String,
    pub expiration_time: String,
}
