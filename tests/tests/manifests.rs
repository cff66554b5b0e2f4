//! The DaemonSet manifests: the kustomizations under `daemonset/` (the
//! Istio-mode base, the local and eBPF overlays), each rendered with
//! `kubectl kustomize` (`manifests/render.rs`) and checked two ways:
//!
//! - against the Kubernetes API schema (`manifests/schema.rs`): every
//!   document read into its `k8s-openapi` type and written back, each
//!   difference reported with its JSON path;
//! - against the agent: the container's arguments (and the flags its
//!   literal environment stands for) go through the agent's own command
//!   line parser, the ConfigMap's config through its config loader, the
//!   local mesh through its mesh parser, and the ports, probe,
//!   annotations, environment, mounts and capabilities must be the ones
//!   that config and the operator guide (`daemonset/README.md`) say.

#[path = "manifests/render.rs"]
mod render;
#[path = "manifests/schema.rs"]
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use ambient_agent::admin::{METRICS_PATH, READINESS_PATH};
use ambient_agent::capture::CaptureMode;
use ambient_agent::cli::{run_env_vars, Cli, Command};
use ambient_agent::config::{Config, Mode};
use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use render::{rendered, Variant};
use schema::{parse, Manifests};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The operator guide.
fn guide() -> String {
    let path = repo().join("daemonset/README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The guide's table row (in section `title`) of variant `v`.
fn guide_row(title: &str, v: Variant) -> String {
    let guide = guide();
    let section = guide
        .split("\n## ")
        .find(|s| s.starts_with(title))
        .unwrap_or_else(|| panic!("no {title} section in daemonset/README.md"));
    let dir = format!("`{}`", v.dir());
    section
        .lines()
        .find(|l| l.starts_with('|') && l.split('|').nth(1).is_some_and(|c| c.contains(&dir)))
        .unwrap_or_else(|| panic!("no row for {dir} in the guide's {title} table"))
        .to_string()
}

/// The capabilities the guide's "Privileges" table gives `v`.
fn documented_capabilities(v: Variant) -> BTreeSet<String> {
    guide_row("Privileges", v)
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

fn pod(m: &Manifests) -> &PodSpec {
    m.daemon_set.spec.template.spec.as_ref().expect("pod spec")
}

fn agent(m: &Manifests) -> &Container {
    pod(m)
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("a container named agent")
}

/// The agent's mount at the deepest mount point holding `path`.
fn mount_for<'a>(m: &'a Manifests, path: &Path) -> &'a VolumeMount {
    agent(m)
        .volume_mounts
        .iter()
        .flatten()
        .filter(|mnt| path.starts_with(&mnt.mount_path))
        .max_by_key(|mnt| mnt.mount_path.len())
        .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()))
}

/// The volume the agent sees `path` in.
fn volume_for<'a>(m: &'a Manifests, path: &Path) -> &'a Volume {
    let mount = mount_for(m, path);
    pod(m)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("mount {} has no volume", mount.name))
}

fn host_path(v: &Volume) -> Option<&str> {
    v.host_path.as_ref().map(|h| h.path.as_str())
}

/// The file at `path`, from the rendering's ConfigMap mounted there.
fn mounted_file<'a>(m: &'a Manifests, path: &Path) -> &'a str {
    let mount = mount_for(m, path);
    let source = volume_for(m, path)
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("{}: not from a ConfigMap", path.display()));
    assert!(source.items.is_none(), "{}: every key, as is", mount.name);
    let cm = m
        .config_map(&source.name)
        .unwrap_or_else(|| panic!("ConfigMap {} is not in the rendering", source.name));
    let key = path
        .strip_prefix(&mount.mount_path)
        .ok()
        .and_then(|k| k.to_str())
        .expect("a key");
    cm.data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap {} has no {key}", source.name))
}

/// The flags the container's literal environment stands for (`CRL_PATH`
/// is `--crl`) where its arguments do not give them: clap would read the
/// environment of this process, not the pod's.
fn env_flags(c: &Container, args: &[String]) -> Vec<String> {
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("a run command");
    let mut flags = Vec::new();
    for e in c.env.iter().flatten() {
        let Some(value) = &e.value else { continue };
        let Some(arg) = run
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(&e.name)))
        else {
            continue;
        };
        let long = format!("--{}", arg.get_long().expect("a long flag"));
        if !args.contains(&long) {
            flags.extend([long, value.clone()]);
        }
    }
    flags
}

/// A rendering, checked, with the config the agent would run with.
struct Deployed {
    m: Manifests,
    cfg: Config,
}

/// Renders `v`, checks it against the schema and the agent (what every
/// variant must hold), and returns it with the agent's config.
fn deploy(v: Variant) -> Deployed {
    let m = parse(rendered(v)).unwrap_or_else(|e| panic!("daemonset/{}:\n{e}", v.dir()));
    let cfg = load_config(v, &m);
    check_common(v, &m, &cfg);
    Deployed { m, cfg }
}

/// The container's arguments through the agent's parser, then the config
/// file from its ConfigMap through the agent's loader.
fn load_config(v: Variant, m: &Manifests) -> Config {
    let c = agent(m);
    let mut argv = vec!["ambient-agent".to_string()];
    argv.extend(c.args.iter().flatten().cloned());
    argv.extend(env_flags(c, &argv));
    let cli = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("daemonset/{}: agent refuses {argv:?}: {e}", v.dir()));
    let Command::Run(mut overrides) = cli.command else {
        panic!("the container does not run the agent: {:?}", c.args);
    };
    assert!(c.command.is_none(), "the image's entrypoint is the agent");

    let config_path = overrides.config.clone().expect("--config");
    let text = mounted_file(m, &config_path);
    let dir = tempfile::tempdir().expect("tempdir");
    let key = config_path.file_name().expect("a file name");
    let local = dir.path().join(key);
    std::fs::write(&local, text).expect("write config");
    overrides.config = Some(local);
    overrides.node = Some("manifest-test".into());
    let mut cfg = Config::load(&overrides).unwrap_or_else(|e| {
        panic!(
            "daemonset/{}: agent refuses {}: {e}",
            v.dir(),
            config_path.display()
        )
    });
    // Paths relative to the config file are relative to where the pod has it.
    let config_dir = config_path.parent().expect("a directory");
    for p in cfg.file_relative_paths() {
        if let Ok(rest) = p.strip_prefix(dir.path()) {
            *p = config_dir.join(rest);
        }
    }
    cfg
}

fn check_common(v: Variant, m: &Manifests, cfg: &Config) {
    let spec = &m.daemon_set.spec;
    let template = &spec.template;
    let pod = pod(m);
    let c = agent(m);

    // Ports, probe and the Prometheus scrape annotations (as Istio's
    // ztunnel chart's default podAnnotations, plus the path).
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
    let metrics_port = cfg.metrics_port.to_string();
    assert_eq!(ann("prometheus.io/port"), Some(metrics_port.as_str()));
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

    // Environment: only variables the agent reads; the node's name from
    // the downward API.
    let known = run_env_vars();
    for e in c.env.iter().flatten() {
        assert!(
            known.contains(&e.name),
            "the agent does not read {}",
            e.name
        );
    }
    let refs = field_refs(c);
    let node = refs.get("AMBIENT_NODE").or(refs.get("NODE_NAME"));
    assert_eq!(node, Some(&"spec.nodeName"), "{refs:?}");

    // Mounts and volumes match each other; a CRL the agent is told to
    // follow is mounted.
    let volumes: Vec<&str> = pod.volumes.iter().flatten().map(|v| &*v.name).collect();
    let mounts: Vec<&str> = c.volume_mounts.iter().flatten().map(|v| &*v.name).collect();
    for mount in &mounts {
        assert!(volumes.contains(mount), "mount {mount} has no volume");
    }
    for volume in &volumes {
        assert!(mounts.contains(volume), "volume {volume} is not mounted");
    }
    if let Some(crl) = &cfg.crl {
        let v = volume_for(m, crl);
        assert!(
            v.config_map.is_some() || v.secret.is_some(),
            "{crl:?}: {v:?}"
        );
    }

    // Privileges: exactly the guide's capabilities, nothing else.
    let sc = c.security_context.as_ref().expect("securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    assert_eq!(added, documented_capabilities(v), "{}", v.dir());
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_ne!(
        pod.host_network,
        Some(true),
        "in-pod capture needs no host network"
    );

    // The pieces refer to each other, in the namespace the guide says.
    assert_eq!(
        pod.service_account_name, m.service_account.metadata.name,
        "the pod runs as the rendering's ServiceAccount"
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
    let ns = namespace(m);
    let namespaces: BTreeSet<_> = std::iter::once(&m.service_account.metadata)
        .chain(m.config_maps.iter().map(|cm| &cm.metadata))
        .map(|meta| meta.namespace.as_deref())
        .collect();
    assert_eq!(namespaces, BTreeSet::from([Some(ns)]), "one namespace");
    let row = guide_row("Variants", v);
    assert!(row.contains(&format!("`{ns}`")), "namespace {ns}: {row}");
}

fn namespace(m: &Manifests) -> &str {
    m.daemon_set
        .metadata
        .namespace
        .as_deref()
        .expect("a namespace")
}

/// The container's variables from the downward API, and their fields.
fn field_refs(c: &Container) -> BTreeMap<&str, &str> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| {
            let f = e.value_from.as_ref()?.field_ref.as_ref()?;
            Some((e.name.as_str(), f.field_path.as_str()))
        })
        .collect()
}

#[test]
fn every_kustomization_renders_to_the_kubernetes_schema() {
    for v in Variant::ALL {
        if let Err(e) = parse(rendered(v)) {
            panic!("daemonset/{}:\n{e}", v.dir());
        }
    }
}

#[test]
fn the_tested_variants_are_all_there_is() {
    let daemonset = repo().join("daemonset");
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&daemonset),
        BTreeSet::from(["README.md", "base", "overlays"].map(String::from)),
        "daemonset/ holds the kustomizations and the guide, no static manifest"
    );
    let overlays: BTreeSet<String> = names(&daemonset.join("overlays"))
        .into_iter()
        .map(|o| format!("overlays/{o}"))
        .collect();
    let tested: BTreeSet<String> = Variant::ALL[1..].iter().map(|v| v.dir().into()).collect();
    assert_eq!(overlays, tested, "every overlay is rendered and checked");
}

#[test]
fn schema_check_names_the_path_of_a_mistake() {
    let good = rendered(Variant::Base);
    let cases = [
        // A misspelt field is not in the schema.
        (
            "failureThreshold: 3",
            "failureTreshold: 3",
            "$.spec.template.spec.containers[0].readinessProbe.failureTreshold: not a field",
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
        assert!(good.contains(from), "{from:?} not in the rendering");
        let bad = good.replacen(from, to, 1);
        let err = match parse(&bad) {
            Ok(_) => panic!("{to:?} accepted"),
            Err(e) => e,
        };
        assert!(err.contains(want), "{to:?}: want {want:?} in\n{err}");
    }
}

#[test]
fn base_is_istio_mode_with_the_mounts_of_istios_ztunnel_chart() {
    let Deployed { m, cfg } = deploy(Variant::Base);
    assert_eq!(cfg.mode, Mode::Istio);
    // istio-cni redirects the pods' traffic; the agent adding its own
    // capture would redirect twice.
    assert_eq!(cfg.capture(), CaptureMode::None);
    assert_eq!(namespace(&m), "istio-system");

    // The agent's own pod, as it introduces itself to istiod.
    let refs = field_refs(agent(&m));
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
    ] {
        assert_eq!(refs.get(var), Some(&field), "{var}: {refs:?}");
    }

    // Where the Istio-mode config looks, mounted as Istio's chart does.
    let cp = &cfg.control_plane;
    let socket_dir = cp.cni_socket.parent().expect("socket dir");
    assert_eq!(socket_dir, Path::new("/var/run/ztunnel"));
    let v = volume_for(&m, &cp.cni_socket);
    assert_eq!(
        host_path(v),
        socket_dir.to_str(),
        "CNI socket from the host"
    );
    let kind = v.host_path.as_ref().and_then(|h| h.type_.as_deref());
    assert_eq!(kind, Some("DirectoryOrCreate"), "istio-cni may start later");

    assert_eq!(
        mount_for(&m, &cp.token_path).mount_path,
        "/var/run/secrets/tokens"
    );
    let token = volume_for(&m, &cp.token_path)
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
    assert_eq!(token.expiration_seconds, Some(43200));

    assert_eq!(
        mount_for(&m, &cp.root_cert).mount_path,
        "/var/run/secrets/istio"
    );
    let v = volume_for(&m, &cp.root_cert);
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

    // Revocation lists, while istiod publishes none, revoke nothing.
    let crl = cfg.crl.as_ref().expect("the CRL istiod publishes");
    let v = volume_for(&m, crl);
    let source = v.config_map.as_ref().expect("from a ConfigMap");
    assert_eq!(source.name, "istio-ca-crl");
    assert_eq!(source.optional, Some(true));
}

/// Istio's pieces, absent where there is no Istio.
fn assert_no_istio(m: &Manifests) {
    let c = agent(m);
    for e in c.env.iter().flatten() {
        assert!(
            !["POD_NAME", "POD_NAMESPACE", "INSTANCE_IP", "CRL_PATH"].contains(&e.name.as_str())
                && !e.name.starts_with("ISTIO_"),
            "{} is for Istio mode",
            e.name
        );
    }
    for v in pod(m).volumes.iter().flatten() {
        assert!(v.projected.is_none(), "{}: no token for istiod", v.name);
        assert_ne!(host_path(v), Some("/var/run/ztunnel"), "no istio-cni");
        let cm = v.config_map.as_ref().map(|s| s.name.as_str());
        assert!(!cm.is_some_and(|n| n.starts_with("istio-")), "{cm:?}");
    }
}

#[test]
fn local_overlay_is_local_mode_with_its_own_ca_mesh_and_capture() {
    let Deployed { m, cfg } = deploy(Variant::Local);
    assert_eq!(cfg.mode, Mode::Local);
    assert_eq!(cfg.capture(), CaptureMode::Nft);
    assert_no_istio(&m);
    let guide = guide();
    let ns = namespace(&m);
    assert!(
        guide.contains(&format!("kubectl create namespace {ns}")),
        "the guide creates {ns}"
    );

    // The mesh: from a ConfigMap whose name stays (edits are re-read,
    // not rolled out), and one the agent reads.
    let mesh_file = cfg.mesh_file.as_ref().expect("a mesh file");
    let mesh = mounted_file(&m, mesh_file);
    ambient_agent::xds::local::parse_mesh("mesh.yaml", mesh)
        .unwrap_or_else(|e| panic!("the agent refuses the mesh: {e}"));
    let source = volume_for(&m, mesh_file)
        .config_map
        .as_ref()
        .expect("a ConfigMap");
    assert_eq!(source.name, "ambient-agent-mesh", "no hash suffix");

    // The CA: one root for every node, from a Secret the guide creates.
    let root = cfg.ca.root_cert.as_ref().expect("ca.rootCert");
    let key = cfg.ca.root_key.as_ref().expect("ca.rootKey");
    let v = volume_for(&m, root);
    assert_eq!(v.name, volume_for(&m, key).name, "cert and key together");
    let secret = v.secret.as_ref().expect("from a Secret");
    let name = secret.secret_name.as_deref().expect("a Secret name");
    assert_ne!(secret.optional, Some(true), "no agent without the root");
    assert!(
        guide.contains(&format!("create secret generic {name}")),
        "the guide creates {name}"
    );
    for file in [root, key] {
        let file = file.file_name().and_then(|f| f.to_str()).expect("name");
        assert!(
            guide.contains(&format!("--from-file={file}")),
            "the guide puts {file} in {name}"
        );
    }

    // The pods' network namespaces, as the mesh file names them, with
    // the ones made after the agent started.
    let netns = Path::new("/var/run/netns");
    let v = volume_for(&m, netns);
    assert_eq!(host_path(v), Some("/var/run/netns"));
    let mount = mount_for(&m, netns);
    assert_eq!(mount.mount_path, "/var/run/netns");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
}

#[test]
fn ebpf_overlay_is_the_local_one_with_ebpf_capture() {
    let Deployed { m, cfg } = deploy(Variant::Ebpf);
    let local = deploy(Variant::Local);
    assert_eq!(cfg.capture(), CaptureMode::Ebpf);
    assert_eq!(
        Config {
            capture: local.cfg.capture,
            ..cfg.clone()
        },
        local.cfg,
        "the local overlay's config but for capture"
    );
    assert_no_istio(&m);
    assert_eq!(namespace(&m), namespace(&local.m));

    // Loading the programs and maps.
    let caps = documented_capabilities(Variant::Ebpf);
    assert!(caps.contains("BPF"), "{caps:?}");

    // The pods' cgroups (outbound capture hooks them) from the host's
    // cgroup v2 hierarchy, mounted beside the container's own
    // /sys/fs/cgroup (the agent's own cgroup, for the getsockopt hook);
    // the mesh file names the pods' cgroups under it.
    let names = |m: &Manifests| -> BTreeSet<String> {
        pod(m)
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect()
    };
    let added: Vec<String> = names(&m).difference(&names(&local.m)).cloned().collect();
    assert_eq!(added, ["cgroup"], "the volumes eBPF adds");
    assert!(names(&local.m).is_subset(&names(&m)));
    let mount = agent(&m)
        .volume_mounts
        .iter()
        .flatten()
        .find(|mnt| mnt.name == "cgroup")
        .expect("the host's cgroups mounted");
    assert_ne!(mount.mount_path, "/sys/fs/cgroup", "the container's own");
    assert_eq!(mount.read_only, Some(true));
    let v = volume_for(&m, Path::new(&mount.mount_path));
    assert_eq!(host_path(v), Some("/sys/fs/cgroup"));
    let mesh = mounted_file(&m, cfg.mesh_file.as_ref().expect("a mesh file"));
    assert!(
        mesh.contains(&format!("cgroup: {}/", mount.mount_path)),
        "the mesh file shows where the pods' cgroups are"
    );
}
