//! Local mode: the mesh described in a YAML file instead of istiod.
//!
//! This module owns the file format (the [`schema`] types), its validation
//! and conversion into the [`Mesh`] model, the errors that point at the
//! offending line and field, and [`LocalSource`], which installs each good
//! version of the file into the shared [`State`](crate::state::State).
//!
//! ```yaml
//! workloads:
//!   - uid: node-a/client
//!     name: client
//!     namespace: default
//!     addresses: [10.0.1.2]
//!     node: node-a
//! services:
//!   - name: echo
//!     namespace: default
//!     vips: [10.96.0.10]
//!     ports: [{port: 80, targetPort: 8080}]
//!     endpoints: [node-b/echo]
//! policies:
//!   - name: allow-client
//!     namespace: default
//!     rules:
//!       - clauses:
//!           - matches:
//!               - principals: ["cluster.local/ns/default/sa/client"]
//! ```

mod aliases;
mod convert;
mod schema;
#[cfg(test)]
mod tests;
mod watch;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use marked_yaml::{FromYamlError, LoadError, LoaderOptions, Marker};

use crate::identity::IdentityParseError;
use crate::state::Mesh;

pub use watch::LocalSource;

/// Parses and validates a mesh file's text; `source_name` names it in errors.
pub fn parse_mesh(source_name: &str, text: &str) -> Result<Mesh, LocalConfigError> {
    // A file caught mid-write (truncated, not yet filled) reads as blank;
    // taking that for "no workloads" would release every pod.
    if is_blank_document(text) {
        return Err(LocalConfigError::Blank {
            file: source_name.to_string(),
        });
    }
    // Duplicate keys are almost always a copy-paste mistake; the default
    // (last one wins) would hide half of an entry.
    let options = LoaderOptions::default().error_on_duplicate_keys(true);
    let file: schema::MeshFile = marked_yaml::from_yaml_with_options(0, text, options)
        .map_err(|e| from_yaml_error(source_name, e))?;
    convert::convert(source_name, file)
}

/// Reads and parses the mesh file at `path`.
pub fn load_mesh(path: &Path) -> Result<Mesh, LocalConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_mesh(&path.display().to_string(), &text)
}

/// A 1-based position in the file. (`u32` keeps the error small.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: u32,
    pub column: u32,
}

impl Location {
    fn from_marker(m: &Marker) -> Self {
        let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Location {
            line: narrow(m.line()),
            column: narrow(m.column()),
        }
    }
}

/// Renders `file:line:column`, or just `file` when the position is unknown.
struct At<'a>(&'a str, &'a Option<Location>);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(l) => write!(f, "{}:{}:{}", self.0, l.line, l.column),
            None => f.write_str(self.0),
        }
    }
}

/// Why a mesh file was rejected. Every variant names the file; all but
/// [`Io`](Self::Io) also name the line and column, and all but
/// [`Syntax`](Self::Syntax) the field path (e.g. `workloads[1].addresses[0]`).
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("{}: cannot read mesh file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No YAML document at all (empty, or only comments): a file being
    /// written, never an empty mesh, which must be said (`workloads: []`).
    #[error("{file}: the mesh file is blank; an empty mesh is written `workloads: []`")]
    Blank { file: String },
    /// Not well-formed YAML, or not a mapping at the top.
    #[error("{}: {message}", At(file, at))]
    Syntax {
        file: String,
        at: Option<Location>,
        message: String,
    },
    /// Well-formed YAML that does not fit the schema: unknown field, wrong
    /// type, bad enum value, missing required field.
    #[error("{}: {field}: {message}", At(file, at))]
    Schema {
        file: String,
        at: Option<Location>,
        field: String,
        message: String,
    },
    /// Fits the schema, but a value is bad or entries contradict each other.
    #[error("{}: {field}: {problem}", At(file, at))]
    Invalid {
        file: String,
        at: Option<Location>,
        field: String,
        problem: Problem,
    },
}

/// What the validation pass found wrong with one value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Problem {
    #[error("must not be empty")]
    Empty,
    #[error("must not contain '/' (it is part of a SPIFFE identity)")]
    Slash,
    #[error("invalid IP address {0:?}")]
    InvalidIp(String),
    #[error("invalid CIDR or IP address {0:?}")]
    InvalidCidr(String),
    #[error("port must be in 1..=65535")]
    PortZero,
    #[error(transparent)]
    InvalidIdentity(IdentityParseError),
    #[error("duplicate workload uid {uid:?} (first at {first})")]
    DuplicateUid { uid: String, first: String },
    #[error("address {ip} is already used by {first}")]
    DuplicateAddress { ip: IpAddr, first: String },
    /// `service` is `namespace/hostname`.
    #[error("duplicate service {service} (first at {first})")]
    DuplicateService { service: String, first: String },
    #[error("duplicate port {port} (first at {first})")]
    DuplicatePort { port: u16, first: String },
    #[error("workload {uid:?} is listed twice")]
    DuplicateEndpoint { uid: String },
    #[error("duplicate policy {key} (first at {first})")]
    DuplicatePolicy { key: String, first: String },
    #[error("service account {0:?} is not `name` or `namespace/name` (no wildcards)")]
    ServiceAccount(String),
    #[error("no workload has uid {0:?}")]
    UnknownWorkload(String),
    #[error("workload {uid:?} is in namespace {workload_namespace:?}, not the policy's namespace")]
    SelectorNamespace {
        uid: String,
        workload_namespace: String,
    },
    #[error("waypoint needs exactly one of `address` and `service`, not both")]
    WaypointBoth,
    #[error("waypoint needs exactly one of `address` and `service`, found neither")]
    WaypointNeither,
    #[error("waypoint service {0:?} is not of the form <namespace>/<hostname>")]
    WaypointService(String),
    #[error("scope WORKLOAD_SELECTOR needs a non-empty `selector`")]
    MissingSelector,
    #[error("`selector` is only allowed with scope WORKLOAD_SELECTOR")]
    UnexpectedSelector,
    #[error("{0:?} is not a DNS name")]
    Hostname(String),
    #[error("`applicationTunnelPort` needs `applicationTunnel: PROXY`")]
    TunnelPortWithoutProxy,
    #[error("no service {0:?} (expected <namespace>/<hostname> of a service in this file)")]
    UnknownService(String),
    #[error(
        "a rule needs exactly one of `deny: true`, `backends` and `directResponse`; found {0}"
    )]
    RuleActions(usize),
    #[error("at least one backend needs a weight above 0")]
    NoWeight,
    #[error("a header match needs exactly one of `exact`, `prefix`, `regex` and `present: true`; found {0}")]
    HeaderMatchKinds(usize),
    #[error("invalid regular expression: {0}")]
    Regex(String),
    #[error("invalid duration {0:?} (e.g. 2s, 500ms)")]
    Duration(String),
    #[error(transparent)]
    RetryOn(crate::state::l7::UnknownCondition),
    #[error("a percentage must be in 0..=100")]
    Percentage,
    #[error("an HTTP status must be in 200..=599")]
    HttpStatus,
}

/// True for a file with no YAML document in it (only comments, blank lines
/// or document markers).
fn is_blank_document(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    })
}

fn from_yaml_error(file: &str, e: FromYamlError) -> LocalConfigError {
    let syntax = |m: &Marker, message: String| LocalConfigError::Syntax {
        file: file.to_string(),
        at: Some(Location::from_marker(m)),
        message,
    };
    match e {
        FromYamlError::ParseYaml(e) => match e {
            LoadError::ScanError(m, scan) => {
                syntax(&m, format!("YAML syntax error: {}", scan.info()))
            }
            LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => syntax(
                &m,
                "the top level must be a mapping with `workloads`, `services` and `policies`"
                    .to_string(),
            ),
            LoadError::UnexpectedAnchor(m) => {
                syntax(&m, "YAML anchors and aliases are not supported".to_string())
            }
            LoadError::MappingKeyMustBeScalar(m) => {
                syntax(&m, "mapping keys must be scalars".to_string())
            }
            LoadError::UnexpectedTag(m) => syntax(&m, "YAML tags are not supported".to_string()),
            LoadError::DuplicateKey(dup) => {
                let first = dup
                    .prev_key
                    .span()
                    .start()
                    .map_or_else(String::new, |m| format!(" (first at line {})", m.line()));
                LocalConfigError::Syntax {
                    file: file.to_string(),
                    at: dup.key.span().start().map(Location::from_marker),
                    message: format!("duplicate key `{}`{first}", dup.key.as_str()),
                }
            }
        },
        FromYamlError::FromNode(e) => LocalConfigError::Schema {
            file: file.to_string(),
            at: e.start_mark().as_ref().map(Location::from_marker),
            field: e.path().unwrap_or("(top level)").to_string(),
            // The inner error's Display, without the path the outer one adds.
            message: (*e).to_string(),
        },
    }
}
