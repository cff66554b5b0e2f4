//! What a message carries that this build's .proto files do not declare:
//! fields newer than our schema, and enum values our enums do not name.
//!
//! prost drops unknown fields silently and keeps unknown enum values as
//! bare numbers. Code that must not act on what it does not understand
//! (authorization: an unknown condition may not widen an ALLOW or narrow a
//! DENY) decodes the same bytes once more through reflection over our own
//! descriptors and asks here where the unknown parts are.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, Kind, Value};

/// One step down into a message: a field by number, and the element's
/// position when the field is repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub field: u32,
    pub index: Option<usize>,
}

/// A part of a message this schema does not declare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unknown {
    /// Field `number` of the message found at `at`.
    Field { at: Vec<Step>, number: u32 },
    /// The enum field at `at` holds `value`, which its enum does not name.
    EnumValue { at: Vec<Step>, value: i32 },
}

impl Unknown {
    /// Where it was found: the message holding the field, or the enum field.
    pub fn at(&self) -> &[Step] {
        match self {
            Unknown::Field { at, .. } | Unknown::EnumValue { at, .. } => at,
        }
    }

    /// What it is: `field 13`, `enum value 7`.
    pub fn what(&self) -> String {
        match self {
            Unknown::Field { number, .. } => format!("field {number}"),
            Unknown::EnumValue { value, .. } => format!("enum value {value}"),
        }
    }
}

/// Why a message could not be examined.
#[derive(Debug, thiserror::Error)]
pub enum UnknownError {
    #[error("no message {0} in the compiled descriptors")]
    NoSuchMessage(String),
    #[error("cannot decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Our descriptors, built once: they are compiled in and never change.
fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
            // The bytes are protox's own output, checked by this crate's tests.
            .unwrap_or_else(|e| panic!("compiled descriptors are invalid: {e}"))
    })
}

/// Whether our schema declares `field` (by name) in `message` (full name).
pub fn declares(message: &str, field: &str) -> bool {
    pool()
        .get_message_by_name(message)
        .is_some_and(|m| m.get_field_by_name(field).is_some())
}

/// Where `unknown` is and what it is (e.g.
/// `virtual_hosts[0].routes[2].route: field 13`), for an error message.
pub fn describe(message: &str, unknown: &Unknown) -> String {
    let at = path(message, unknown);
    if at.is_empty() {
        unknown.what()
    } else {
        format!("{at}: {}", unknown.what())
    }
}

/// Where `unknown` is, in field names from `message` down (e.g.
/// `virtual_hosts[0].routes[2].route`; empty at the top).
pub fn path(message: &str, unknown: &Unknown) -> String {
    let mut out = String::new();
    let mut desc = pool().get_message_by_name(message);
    for step in unknown.at() {
        let field = desc.as_ref().and_then(|d| d.get_field(step.field));
        if !out.is_empty() {
            out.push('.');
        }
        match &field {
            Some(f) => out.push_str(f.name()),
            None => out.push_str(&step.field.to_string()),
        }
        if let Some(i) = step.index {
            out.push_str(&format!("[{i}]"));
        }
        desc = field.and_then(|f| match f.kind() {
            Kind::Message(m) if m.is_map_entry() => match m.map_entry_value_field().kind() {
                Kind::Message(v) => Some(v),
                _ => None,
            },
            Kind::Message(m) => Some(m),
            _ => None,
        });
    }
    out
}

/// Everything in `bytes`, a serialized `message` (full name, e.g.
/// `istio.security.Authorization`), that our schema does not declare.
pub fn find(message: &str, bytes: &[u8]) -> Result<Vec<Unknown>, UnknownError> {
    let desc = pool()
        .get_message_by_name(message)
        .ok_or_else(|| UnknownError::NoSuchMessage(message.to_string()))?;
    let msg = DynamicMessage::decode(desc, bytes)?;
    let mut out = Vec::new();
    walk(&msg, &mut Vec::new(), &mut out);
    Ok(out)
}

fn walk(msg: &DynamicMessage, at: &mut Vec<Step>, out: &mut Vec<Unknown>) {
    for f in msg.unknown_fields() {
        out.push(Unknown::Field {
            at: at.clone(),
            number: f.number(),
        });
    }
    for (field, value) in msg.fields() {
        let number = field.number();
        let kind = field.kind();
        match value {
            Value::List(items) => {
                for (i, v) in items.iter().enumerate() {
                    at.push(Step {
                        field: number,
                        index: Some(i),
                    });
                    visit(&kind, v, at, out);
                    at.pop();
                }
            }
            Value::Map(entries) => {
                // Map values are reached by key, not position: no index.
                let value_kind = match &kind {
                    Kind::Message(entry) => entry.map_entry_value_field().kind(),
                    other => other.clone(),
                };
                for v in entries.values() {
                    at.push(Step {
                        field: number,
                        index: None,
                    });
                    visit(&value_kind, v, at, out);
                    at.pop();
                }
            }
            v => {
                at.push(Step {
                    field: number,
                    index: None,
                });
                visit(&kind, v, at, out);
                at.pop();
            }
        }
    }
}

fn visit(kind: &Kind, value: &Value, at: &mut Vec<Step>, out: &mut Vec<Unknown>) {
    match (kind, value) {
        (_, Value::Message(m)) => walk(m, at, out),
        (Kind::Enum(e), Value::EnumNumber(n)) if e.get_value(*n).is_none() => {
            out.push(Unknown::EnumValue {
                at: at.clone(),
                value: *n,
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::{Authorization, Clause, Match, Rule};
    use prost::Message;

    /// `body` with `extra` (already-encoded fields) appended.
    fn with(body: &impl Message, extra: &[u8]) -> Vec<u8> {
        let mut b = body.encode_to_vec();
        b.extend_from_slice(extra);
        b
    }

    #[test]
    fn finds_unknown_fields_and_enum_values_by_path() {
        let known = Authorization {
            name: "p".into(),
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match::default(), Match::default()],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(
            find("istio.security.Authorization", &known.encode_to_vec()).unwrap(),
            []
        );

        // Field 20 (varint 1) on the second match, field 30 on the policy,
        // action = 7.
        let second_match = with(&Match::default(), &[0xa0, 0x01, 0x01]);
        let clause = [&[0x12, second_match.len() as u8][..], &second_match].concat();
        let clause = [&[0x12, 0x00][..], &clause].concat();
        let rule = [&[0x0a, clause.len() as u8][..], &clause].concat();
        let mut body = vec![0x2a, rule.len() as u8];
        body.extend_from_slice(&rule);
        body.extend_from_slice(&[0x20, 0x07]);
        body.extend_from_slice(&[0xf0, 0x01, 0x01]);
        let found = find("istio.security.Authorization", &body).unwrap();
        let step = |field, index| Step { field, index };
        assert_eq!(
            found,
            [
                Unknown::Field {
                    at: vec![],
                    number: 30
                },
                Unknown::EnumValue {
                    at: vec![step(4, None)],
                    value: 7
                },
                Unknown::Field {
                    at: vec![step(5, Some(0)), step(1, Some(0)), step(2, Some(1))],
                    number: 20
                },
            ]
        );
        let named: Vec<String> = found
            .iter()
            .map(|u| describe("istio.security.Authorization", u))
            .collect();
        assert_eq!(
            named,
            [
                "field 30",
                "action: enum value 7",
                "rules[0].clauses[0].matches[1]: field 20"
            ]
        );
        assert!(matches!(
            find("no.Such", &[]),
            Err(UnknownError::NoSuchMessage(_))
        ));
        assert!(matches!(
            find("istio.security.Authorization", &[0x2a, 0x05]),
            Err(UnknownError::Decode(_))
        ));
    }
}
