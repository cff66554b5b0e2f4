//! The kustomizations under `daemonset/`, rendered as an operator's
//! `kubectl apply -k` would: by `kubectl kustomize` (kubectl's built-in
//! kustomize; Debian's kubernetes-client has it, scripts/setup installs
//! it). `KUBECTL` names another binary. No kubectl is a failure, never a
//! skip: the manifests are only what kustomize makes of them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::repo;

/// One deployable kustomization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `daemonset/base`: Istio mode.
    Base,
    /// `daemonset/overlays/local`: local mode, nft capture.
    Local,
    /// `daemonset/overlays/ebpf`: local mode, eBPF capture.
    Ebpf,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Base, Variant::Local, Variant::Ebpf];

    /// Its directory under `daemonset/`.
    pub fn dir(self) -> &'static str {
        match self {
            Variant::Base => "base",
            Variant::Local => "overlays/local",
            Variant::Ebpf => "overlays/ebpf",
        }
    }

    fn path(self) -> PathBuf {
        repo().join("daemonset").join(self.dir())
    }
}

/// `kubectl kustomize daemonset/<dir>`, once per test binary.
pub fn rendered(v: Variant) -> &'static str {
    static RENDERED: [OnceLock<String>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = Variant::ALL
        .iter()
        .position(|x| *x == v)
        .expect("a variant");
    RENDERED[i].get_or_init(|| kustomize(v))
}

fn kustomize(v: Variant) -> String {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let dir = v.path();
    let out = match Command::new(&kubectl).arg("kustomize").arg(&dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{kubectl} not found: the manifests are kustomizations rendered with \
             `kubectl kustomize`; run scripts/setup (it installs Debian's \
             kubernetes-client) or set KUBECTL to a kubectl binary"
        ),
        Err(e) => panic!("running {kubectl} kustomize {}: {e}", dir.display()),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{kubectl} kustomize daemonset/{} failed ({}):\n{stderr}",
        v.dir(),
        out.status
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 rendering");
    assert!(
        !text.trim().is_empty(),
        "{kubectl} kustomize daemonset/{} rendered nothing:\n{stderr}",
        v.dir()
    );
    text
}
