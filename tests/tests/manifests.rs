//! The DaemonSet manifests (`daemonset/ambient-agent.yaml`), checked two
//! ways:
//!
//! - against the Kubernetes API schema: each document is read into the
//!   matching `k8s-openapi` type (generated from Kubernetes' OpenAPI
//!   schema) and written back; a wrong type fails the read, an unknown or
//!   misspelt field is dropped by it, and every difference is reported with
//!   its JSON path;
//! - against the agent: the container's arguments go through the agent's
//!   own command line parser, the ConfigMap's config through its config
//!   loader, and the ports, probe, annotations, environment, mounts and
//!   capabilities must be the ones that config and the operator guide say.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ambient_agent::admin::{METRICS_PATH, READINESS_PATH};
use ambient_agent::capture::CaptureMode;
use ambient_agent::cli::{run_env_vars, Cli, Command};
use ambient_agent::config::{Config, Mode};
use clap::Parser as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest_text() -> String {
    let path = repo().join("daemonset/ambient-agent.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The typed objects of the manifest file.
struct Manifests {
    service_account: ServiceAccount,
    config_map: ConfigMap,
    daemon_set: DaemonSet,
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

/// Checks every document against the schema of its kind; the manifest must
/// hold exactly one ServiceAccount, ConfigMap and DaemonSet.
fn parse(text: &str) -> Result<Manifests, String> {
    let (mut sa, mut cm, mut ds) = (None, None, None);
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
                if cm.replace(typed::<ConfigMap>(&doc)?).is_some() {
                    return Err(dup("ConfigMap"));
                }
            }
            (Some(DaemonSet::API_VERSION), Some(DaemonSet::KIND)) => {
                if ds.replace(typed::<DaemonSet>(&doc)?).is_some() {
                    return Err(dup("DaemonSet"));
                }
            }
            other => return Err(format!("unexpected document {other:?}")),
        }
    }
    Ok(Manifests {
        service_account: sa.ok_or("no ServiceAccount")?,
        config_map: cm.ok_or("no ConfigMap")?,
        daemon_set: ds.ok_or("no DaemonSet")?,
    })
}

#[test]
fn manifests_match_the_kubernetes_schema() {
    if let Err(e) = parse(&manifest_text()) {
        panic!("daemonset/ambient-agent.yaml:\n{e}");
    }
}

#[test]
fn schema_check_names_the_path_of_a_mistake() {
    let good = manifest_text();
    let cases = [
        // A misspelt field is not in the schema.
        (
            "mountPropagation: HostToContainer",
            "mountPropogation: HostToContainer",
            "$.spec.template.spec.containers[0].volumeMounts[2].mountPropogation: not a field",
        ),
        // A wrong type does not read.
        (
            "periodSeconds: 5",
            "periodSeconds: often",
            "$.spec.template.spec.containers[0].readinessProbe.periodSeconds: invalid type",
        ),
        // A field in the wrong place.
        (
            "      hostNetwork: false",
            "      hostNetwork: false\n      readOnlyRootFilesystem: true",
            "$.spec.template.spec.readOnlyRootFilesystem: not a field",
        ),
    ];
    for (from, to, want) in cases {
        assert!(good.contains(from), "{from:?} not in the manifest");
        let bad = good.replacen(from, to, 1);
        let err = match parse(&bad) {
            Ok(_) => panic!("{to:?} accepted"),
            Err(e) => e,
        };
        assert!(err.contains(want), "{to:?}: want {want:?} in\n{err}");
    }
}

fn agent_container(pod: &PodSpec) -> &Container {
    pod.containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("a container named agent")
}

/// The volume mounted at the deepest mount point holding `path`.
fn volume_for<'a>(pod: &'a PodSpec, c: &Container, path: &Path) -> &'a Volume {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()));
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("mount {} has no volume", mount.name))
}

fn host_path(v: &Volume) -> Option<&str> {
    v.host_path.as_ref().map(|h| h.path.as_str())
}

/// The capabilities the operator guide's "Privileges" section names.
fn documented_capabilities() -> BTreeSet<String> {
    let path = repo().join("daemonset/README.md");
    let guide = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let section = guide
        .split("\n## ")
        .find(|s| s.starts_with("Privileges"))
        .expect("a Privileges section");
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

#[test]
fn manifests_give_the_agent_what_it_accepts() {
    let m = parse(&manifest_text()).expect("schema (see the test above)");
    let ds = &m.daemon_set;
    let spec = &ds.spec;
    let template = &spec.template;
    let pod = template.spec.as_ref().expect("pod spec");
    let c = agent_container(pod);

    // Arguments: through the agent's own parser.
    let argv = std::iter::once("ambient-agent".to_string()).chain(c.args.iter().flatten().cloned());
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("agent refuses the args: {e}"));
    let Command::Run(mut overrides) = cli.command else {
        panic!("the container does not run the agent: {:?}", c.args);
    };
    assert!(c.command.is_none(), "the image's entrypoint is the agent");

    // The config file: from the ConfigMap mounted there, through the loader.
    let config_path = overrides.config.clone().expect("--config");
    let vol = volume_for(pod, c, &config_path);
    let cm_name = vol.config_map.as_ref().map(|s| s.name.as_str());
    assert_eq!(
        cm_name,
        m.config_map.metadata.name.as_deref(),
        "{config_path:?}"
    );
    let key = config_path
        .file_name()
        .and_then(|f| f.to_str())
        .expect("file name");
    let text = m
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap has no {key}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join(key);
    std::fs::write(&local, text).expect("write config");
    overrides.config = Some(local);
    overrides.node = Some("manifest-test".into());
    let cfg = Config::load(&overrides).unwrap_or_else(|e| panic!("agent refuses the config: {e}"));
    assert_eq!(cfg.mode, Mode::Istio);

    // Ports, probe and scrape annotations.
    let ports: Vec<(Option<&str>, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    let port = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| *n == Some(name))
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("no port {name} in {ports:?}"))
    };
    assert_eq!(port("metrics"), i32::from(cfg.metrics_port));
    assert_eq!(port("health"), i32::from(cfg.readiness_port));
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("an HTTP readiness probe");
    assert_eq!(probe.path.as_deref(), Some(READINESS_PATH));
    let probe_port = match &probe.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => port(name),
    };
    assert_eq!(probe_port, i32::from(cfg.readiness_port));
    let annotations = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    let ann = |k: &str| annotations.get(k).map(String::as_str);
    assert_eq!(ann("prometheus.io/scrape"), Some("true"));
    assert_eq!(
        ann("prometheus.io/port"),
        Some(&*cfg.metrics_port.to_string())
    );
    assert_eq!(ann("prometheus.io/path"), Some(METRICS_PATH));
    let grace = pod.termination_grace_period_seconds.expect("grace period");
    assert!(
        u64::try_from(grace).unwrap_or(0) > cfg.drain_timeout.as_secs(),
        "the drain ({:?}) must end within the grace period ({grace}s)",
        cfg.drain_timeout
    );

    // Upgrades hand a node over without a gap (issue 16, point 5): a new
    // agent starts beside the old one (surge) and the old one is stopped
    // only once the new one is ready; no node is ever left without one.
    // Istio's ztunnel chart uses the same strategy.
    let strategy = spec.update_strategy.as_ref().expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    let int = |v: &Option<IntOrString>| match v {
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(s)) => s.trim_end_matches('%').parse().ok(),
        None => None,
    };
    assert!(
        int(&rolling.max_surge).is_some_and(|n| n >= 1),
        "maxSurge: {:?}",
        rolling.max_surge
    );
    assert_eq!(
        int(&rolling.max_unavailable),
        Some(0),
        "maxUnavailable must be 0 so a node is never without an agent"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // In Istio mode istio-cni redirects the pods' traffic; the agent adding
    // its own capture would redirect twice.
    assert_eq!(cfg.capture(), CaptureMode::None);

    // Environment: only variables the agent reads; the ones Istio mode
    // needs to introduce itself to istiod come from the downward API.
    let known = run_env_vars();
    let mut field_refs = std::collections::BTreeMap::new();
    for e in c.env.iter().flatten() {
        assert!(
            known.contains(&e.name),
            "the agent does not read {}",
            e.name
        );
        if let Some(f) = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
            field_refs.insert(e.name.as_str(), f.field_path.as_str());
        }
    }
    let node = field_refs
        .get("AMBIENT_NODE")
        .or(field_refs.get("NODE_NAME"));
    assert_eq!(node, Some(&"spec.nodeName"), "{field_refs:?}");
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
    ] {
        assert_eq!(field_refs.get(var), Some(&field), "{var}: {field_refs:?}");
    }

    // Mounts: where the Istio-mode config looks.
    let cp = &cfg.control_plane;
    let socket_dir = cp.cni_socket.parent().expect("socket dir");
    let v = volume_for(pod, c, &cp.cni_socket);
    assert_eq!(
        host_path(v),
        socket_dir.to_str(),
        "CNI socket from the host"
    );
    let v = volume_for(pod, c, &cp.token_path);
    let token = v
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .into_iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a projected service-account token");
    assert_eq!(
        Some(Path::new(&token.path)),
        cp.token_path.file_name().map(Path::new)
    );
    assert_eq!(token.audience.as_deref(), Some("istio-ca"));
    let v = volume_for(pod, c, &cp.root_cert);
    assert_eq!(
        v.config_map.as_ref().map(|s| s.name.as_str()),
        Some("istio-ca-root-cert"),
        "istiod's root is published in this ConfigMap"
    );
    assert_eq!(
        cp.root_cert.file_name().and_then(|f| f.to_str()),
        Some("root-cert.pem"),
        "the key istiod writes"
    );
    // Network namespaces and the BPF filesystem come from the host.
    for path in ["/var/run/netns", "/sys/fs/bpf"] {
        let v = volume_for(pod, c, Path::new(path));
        assert_eq!(host_path(v), Some(path));
    }
    for mount in c.volume_mounts.iter().flatten() {
        assert!(
            pod.volumes.iter().flatten().any(|v| v.name == mount.name),
            "mount {} has no volume",
            mount.name
        );
    }

    // Privileges: exactly the guide's capabilities, nothing else.
    let sc = c.security_context.as_ref().expect("securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    assert_eq!(added, documented_capabilities());
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_ne!(
        pod.host_network,
        Some(true),
        "in-pod capture needs no host network"
    );

    // The pieces refer to each other.
    assert_eq!(
        pod.service_account_name, m.service_account.metadata.name,
        "the pod runs as the manifest's ServiceAccount"
    );
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "selector {k}={v} matches the pods");
    }
}
