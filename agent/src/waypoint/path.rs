//! Request paths made canonical before authorization and routing, as
//! Istio's default path normalization (`BASE`, Envoy's `normalize_path`):
//! percent-encoded unreserved characters are decoded and dot segments
//! removed (RFC 3986 §6.2.2.2, §5.2.4). The backend gets the canonical
//! path too. Without it, `/public/../admin` or `/%61dmin` would slip past
//! a DENY on `/admin` and still reach `/admin` at a backend that
//! normalizes.

use std::borrow::Cow;

use http::uri::{PathAndQuery, Uri};

/// `uri` with its path canonical; `None` when the result is not a valid
/// path (the request is then refused).
pub(super) fn normalize_uri(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    let canonical = normalize(path);
    if canonical == path {
        return Some(uri.clone());
    }
    let pq = match uri.query() {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical.into_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).ok()?);
    Uri::from_parts(parts).ok()
}

/// The canonical form of `path`.
pub(super) fn normalize(path: &str) -> Cow<'_, str> {
    let decoded = decode_unreserved(path);
    if !decoded.split('/').any(|s| s == "." || s == "..") {
        return decoded;
    }
    Cow::Owned(remove_dot_segments(&decoded))
}

/// `%XX` of an unreserved character (ALPHA, DIGIT, `-._~`) becomes the
/// character; every other escape is kept as it is (`%2F` stays, so an
/// encoded slash never becomes a separator).
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    Cow::Owned(out)
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments dropped, `..` takes
/// the previous segment away (never above the root).
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    for (i, s) in parts.iter().enumerate() {
        match *s {
            "." => {
                if i == last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if i == last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_canonical() {
        // (path, canonical): RFC 3986 §5.4's dot-segment cases for an
        // absolute path, and unreserved escapes.
        let cases = [
            ("/", "/"),
            ("/api/users", "/api/users"),
            ("/public/../admin", "/admin"),
            ("/public/./admin", "/public/admin"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/x/..", "/admin/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            // An encoded slash is not a separator, and stays encoded.
            ("/public%2F..%2Fadmin", "/public%2F..%2Fadmin"),
            ("/a%20b", "/a%20b"),
            ("/a%", "/a%"),
            ("/a%4", "/a%4"),
            ("/a..b/c", "/a..b/c"),
            ("//admin", "//admin"),
        ];
        for (path, want) in cases {
            assert_eq!(normalize(path), want, "{path}");
        }
    }

    #[test]
    fn the_query_is_kept_and_the_authority_too() {
        let uri: Uri = "http://reviews:80/public/../admin?x=/../y"
            .parse()
            .expect("uri");
        let n = normalize_uri(&uri).expect("valid");
        assert_eq!(n.to_string(), "http://reviews:80/admin?x=/../y");
        let uri: Uri = "/a/./b".parse().expect("uri");
        assert_eq!(normalize_uri(&uri).expect("valid").to_string(), "/a/b");
    }
}
