//! Our .proto files against the upstream schema the agent consumes
//! (`fixtures/upstream_schema.txt`: names, numbers, types and labels of
//! every field and enum value, compiled from istio/ztunnel's and Envoy's
//! files). Every message, field, enum value and oneof of the fixture must
//! be declared here alike, and nothing else in those messages; a new
//! upstream field or a typo in a number fails this test.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

const FIXTURE: &str = include_str!("fixtures/upstream_schema.txt");

/// Upstream fields this agent does not declare, and why.
const NOT_DECLARED: &[(&str, &str, &str)] = &[(
    "envoy.config.core.v3.Node",
    "listening_addresses",
    "sent by the agent, never set: Envoy's Address tree is not ours to carry",
)];

#[derive(Default)]
struct Fixture {
    /// message -> field name -> (number, type, label)
    fields: BTreeMap<String, BTreeMap<String, (u32, String, String)>>,
    /// enum -> value name -> number
    enums: BTreeMap<String, BTreeMap<String, i32>>,
    /// message -> oneof -> fields
    oneofs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

fn fixture() -> Fixture {
    let mut f = Fixture::default();
    for line in FIXTURE.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["field", msg, name, number, ty, label] => {
                f.fields.entry(msg.to_string()).or_default().insert(
                    name.to_string(),
                    (
                        number.parse().expect("number"),
                        ty.to_string(),
                        label.to_string(),
                    ),
                );
            }
            ["enum", e, name, number] => {
                f.enums
                    .entry(e.to_string())
                    .or_default()
                    .insert(name.to_string(), number.parse().expect("number"));
            }
            ["oneof", msg, name, fields] => {
                f.oneofs.entry(msg.to_string()).or_default().insert(
                    name.to_string(),
                    fields.split(',').map(str::to_string).collect(),
                );
            }
            [] | ["reserved", ..] => {}
            [first, ..] if first.starts_with('#') => {}
            other => panic!("unreadable fixture line {other:?}"),
        }
    }
    f
}

fn scalar(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => format!(".{}", m.full_name()),
        Kind::Enum(e) => format!(".{}", e.full_name()),
    }
}

/// (number, type, label) in the fixture's terms.
fn describe(f: &FieldDescriptor) -> (u32, String, String) {
    if f.is_map() {
        let Kind::Message(entry) = f.kind() else {
            unreachable!("a map field's kind is its entry message")
        };
        let k = scalar(&entry.map_entry_key_field().kind());
        let v = scalar(&entry.map_entry_value_field().kind());
        return (f.number(), format!("map<{k},{v}>"), "map".into());
    }
    let label = if f.is_list() {
        "repeated"
    } else if f.field_descriptor_proto().proto3_optional() {
        "optional"
    } else {
        "singular"
    };
    (f.number(), scalar(&f.kind()), label.into())
}

/// Where `pool`'s enums differ from `enums` (name -> value -> number).
fn enum_problems(
    pool: &DescriptorPool,
    enums: &BTreeMap<String, BTreeMap<String, i32>>,
    problems: &mut Vec<String>,
) {
    for (e, values) in enums {
        let Some(d) = pool.get_enum_by_name(e) else {
            problems.push(format!("enum {e} is not declared"));
            continue;
        };
        let got: BTreeMap<String, i32> = d
            .values()
            .map(|v| (v.name().to_string(), v.number()))
            .collect();
        if &got != values {
            problems.push(format!("enum {e}: upstream {values:?}, ours {got:?}"));
        }
    }
}

fn ours() -> DescriptorPool {
    DescriptorPool::decode(ambient_proto::FILE_DESCRIPTOR_SET).expect("compiled descriptors")
}

fn message(pool: &DescriptorPool, name: &str) -> Option<MessageDescriptor> {
    pool.get_message_by_name(name)
}

#[test]
fn every_upstream_field_enum_value_and_oneof_is_declared_alike() {
    let (up, pool) = (fixture(), ours());
    assert!(up.fields.len() > 40, "the fixture is nearly empty");
    let mut problems = Vec::new();
    let skipped = |msg: &str, field: &str| {
        NOT_DECLARED
            .iter()
            .any(|(m, f, _)| *m == msg && *f == field)
    };
    for (msg, fields) in &up.fields {
        let Some(m) = message(&pool, msg) else {
            problems.push(format!("message {msg} is not declared"));
            continue;
        };
        for (name, want) in fields {
            match m.get_field_by_name(name) {
                None if skipped(msg, name) => {}
                None => problems.push(format!(
                    "{msg}.{name} ({} {}) is not declared",
                    want.0, want.1
                )),
                Some(f) => {
                    let got = describe(&f);
                    if &got != want {
                        problems.push(format!("{msg}.{name}: upstream {want:?}, ours {got:?}"));
                    }
                }
            }
        }
        for f in m.fields() {
            if !fields.contains_key(f.name()) {
                problems.push(format!(
                    "{msg}.{} ({}) is not upstream",
                    f.name(),
                    f.number()
                ));
            }
        }
        let real: BTreeMap<String, BTreeSet<String>> = m
            .oneofs()
            .filter(|o| !o.is_synthetic())
            .map(|o| {
                let fields = o.fields().map(|f| f.name().to_string()).collect();
                (o.name().to_string(), fields)
            })
            .collect();
        let mut want = up.oneofs.get(msg).cloned().unwrap_or_default();
        for fields in want.values_mut() {
            fields.retain(|f| !skipped(msg, f));
        }
        if real != want {
            problems.push(format!("{msg} oneofs: upstream {want:?}, ours {real:?}"));
        }
    }
    enum_problems(&pool, &up.enums, &mut problems);
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn what_is_left_out_is_said() {
    let up = fixture();
    for (msg, field, why) in NOT_DECLARED {
        assert!(
            up.fields.get(*msg).is_some_and(|f| f.contains_key(*field)),
            "{msg}.{field} is not upstream, so need not be excused"
        );
        assert!(!why.is_empty());
    }
}

/// Envoy's messages of which we declare a subset (the waypoint's route,
/// endpoint and fault types): `fixtures/envoy_subset.txt`, every upstream
/// field of each.
const SUBSET: &str = include_str!("fixtures/envoy_subset.txt");

/// The packages whose every message must be in the subset fixture.
const SUBSET_PACKAGES: &[&str] = &[
    "envoy.config.route.v3",
    "envoy.config.endpoint.v3",
    "envoy.config.cluster.v3",
    "envoy.type.matcher.v3",
    "envoy.extensions.filters.http.fault.v3",
    "envoy.extensions.filters.common.fault.v3",
];

/// (number, type, label, oneof) of an upstream field.
type SubsetField = (u32, String, String, Option<String>);

/// What we declare of a subset message must be upstream alike: the same
/// number, type and label, and the same oneof. Leaving a field out is the
/// point (the agent refuses what it does not declare), so fewer is fine.
#[test]
fn the_envoy_subset_declares_upstream_fields_alike() {
    let mut fields: BTreeMap<String, BTreeMap<String, SubsetField>> = BTreeMap::new();
    let mut enums: BTreeMap<String, BTreeMap<String, i32>> = BTreeMap::new();
    for line in SUBSET.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["field", msg, name, number, ty, label, rest @ ..] => {
                let oneof = rest
                    .iter()
                    .find_map(|r| r.strip_prefix("oneof="))
                    .map(str::to_string);
                fields.entry(msg.to_string()).or_default().insert(
                    name.to_string(),
                    (
                        number.parse().expect("number"),
                        ty.to_string(),
                        label.to_string(),
                        oneof,
                    ),
                );
            }
            ["enum", e, name, number] => {
                enums
                    .entry(e.to_string())
                    .or_default()
                    .insert(name.to_string(), number.parse().expect("number"));
            }
            [] => {}
            [first, ..] if first.starts_with('#') => {}
            other => panic!("unreadable fixture line {other:?}"),
        }
    }
    let pool = ours();
    let mut problems = Vec::new();
    let mut checked = 0;
    for m in pool.all_messages() {
        let name = m.full_name();
        let in_package = SUBSET_PACKAGES.contains(&m.package_name());
        let Some(upstream) = fields.get(name) else {
            if in_package && !m.is_map_entry() {
                problems.push(format!("{name} is declared but not in the fixture"));
            }
            continue;
        };
        checked += 1;
        for f in m.fields() {
            let (number, ty, label) = describe(&f);
            let oneof = f
                .containing_oneof()
                .filter(|o| !o.is_synthetic())
                .map(|o| o.name().to_string());
            match upstream.get(f.name()) {
                None => problems.push(format!("{name}.{} is not upstream", f.name())),
                Some(want) if *want != (number, ty.clone(), label.clone(), oneof.clone()) => {
                    problems.push(format!(
                        "{name}.{}: upstream {want:?}, ours {:?}",
                        f.name(),
                        (number, ty, label, oneof)
                    ))
                }
                Some(_) => {}
            }
        }
    }
    enum_problems(&pool, &enums, &mut problems);
    assert!(checked >= 20, "only {checked} subset messages were checked");
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
