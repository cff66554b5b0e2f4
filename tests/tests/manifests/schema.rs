//! A rendering checked against the Kubernetes API schema: each document is
//! read into the matching `k8s-openapi` type (generated from Kubernetes'
//! OpenAPI schema) and written back; a wrong type fails the read, an
//! unknown or misspelt field is dropped by it, and every difference is
//! reported with its JSON path.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

/// The typed objects of one rendering.
pub struct Manifests {
    pub service_account: ServiceAccount,
    /// The agent's config, and in local mode its mesh.
    pub config_maps: Vec<ConfigMap>,
    pub daemon_set: DaemonSet,
}

impl Manifests {
    /// The rendering's ConfigMap called `name`.
    pub fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps
            .iter()
            .find(|cm| cm.metadata.name.as_deref() == Some(name))
    }
}

/// The YAML documents of `text` as JSON values, empty ones left out.
fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc).map_err(|e| format!("document {i}: {e}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Appends to `out` every place where `after` differs from `before`,
/// named by its JSON path under `path`.
fn diff(path: &str, before: &Value, after: &Value, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => diff(&p, v, w, out),
                    None => out.push(format!("{p}: not a field of the schema")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: added when written back"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        _ if before == after => {}
        _ => out.push(format!("{path}: {before} was written back as {after}")),
    }
}

/// `doc` as a `T`, if it is one exactly: read (errors name the path), then
/// written back and compared.
fn typed<T: Resource + DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let what = format!("{}/{}", T::API_VERSION, T::KIND);
    let obj: T = serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| format!("{what}: $.{}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&obj).map_err(|e| format!("{what}: {e}"))?;
    let mut diffs = Vec::new();
    diff("$", doc, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(obj)
    } else {
        Err(format!("{what}:\n  {}", diffs.join("\n  ")))
    }
}

/// Checks every document against the schema of its kind; a rendering holds
/// exactly one ServiceAccount and one DaemonSet, and ConfigMaps.
pub fn parse(text: &str) -> Result<Manifests, String> {
    let (mut sa, mut config_maps, mut ds) = (None, Vec::new(), None);
    for doc in documents(text)? {
        let key = (doc["apiVersion"].as_str(), doc["kind"].as_str());
        let dup = |what: &str| format!("more than one {what}");
        match key {
            (Some(ServiceAccount::API_VERSION), Some(ServiceAccount::KIND)) => {
                if sa.replace(typed::<ServiceAccount>(&doc)?).is_some() {
                    return Err(dup("ServiceAccount"));
                }
            }
            (Some(ConfigMap::API_VERSION), Some(ConfigMap::KIND)) => {
                config_maps.push(typed::<ConfigMap>(&doc)?);
            }
            (Some(DaemonSet::API_VERSION), Some(DaemonSet::KIND)) => {
                if ds.replace(typed::<DaemonSet>(&doc)?).is_some() {
                    return Err(dup("DaemonSet"));
                }
            }
            other => return Err(format!("unexpected document {other:?}")),
        }
    }
    if config_maps.is_empty() {
        return Err("no ConfigMap".into());
    }
    Ok(Manifests {
        service_account: sa.ok_or("no ServiceAccount")?,
        config_maps,
        daemon_set: ds.ok_or("no DaemonSet")?,
    })
}
