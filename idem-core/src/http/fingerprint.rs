//! The fingerprint of a request: what makes two requests under one key "the
//! same request". Method, the path the client sent, the query as
//! form-encoded pairs, the chosen headers and the body.

use http::HeaderName;
use http::request::Parts;
use serde::ser::{Serialize, SerializeTuple as _, Serializer};

use crate::error::Error;
use crate::key::Fingerprint;

/// The parts of a request that its fingerprint is made of.
struct Print<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    body: &'a [u8],
}

/// Bytes, serialized as bytes (one tag and length), not as a sequence.
struct Raw<'a>(&'a [u8]);

impl Serialize for Raw<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl Serialize for Print<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(5)?;
        tuple.serialize_element(self.method)?;
        tuple.serialize_element(self.path)?;
        tuple.serialize_element(self.query)?;
        let headers: Vec<(&str, Raw<'_>)> = self
            .headers
            .iter()
            .map(|(name, value)| (*name, Raw(value)))
            .collect();
        tuple.serialize_element(&headers)?;
        tuple.serialize_element(&Raw(self.body))?;
        tuple.end()
    }
}

/// The request's fingerprint: SHA-256 of its method, the path the client
/// sent, its [normal query](normal_query), the values of the headers
/// `names` and its body.
pub(crate) fn fingerprint(
    parts: &Parts,
    names: &[HeaderName],
    body: &[u8],
) -> Result<Fingerprint, Error> {
    let headers = names
        .iter()
        .flat_map(|name| {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(move |value| (name.as_str(), value.as_bytes()))
        })
        .collect();
    let uri = sent_uri(parts);
    Fingerprint::of(&Print {
        method: parts.method.as_str(),
        path: uri.path(),
        query: &normal_query(uri.query().unwrap_or("")),
        headers,
        body,
    })
}

/// The URI the client sent. A router that mounts services under a prefix
/// (axum's `nest`) strips it from the URI the inner layers see; axum keeps
/// the original in the request's `OriginalUri`, which is used when present,
/// so that `/orders/create` and `/refunds/create` never look alike. It is
/// read with or without the `axum` feature: an axum app that takes the
/// layer alone is nested as well.
pub(crate) fn sent_uri(parts: &Parts) -> &http::Uri {
    if let Some(original) = parts.extensions.get::<axum::extract::OriginalUri>() {
        return &original.0;
    }
    &parts.uri
}

/// A query as the fingerprint sees it: its `name=value` pairs, each
/// percent-decoded with `+` read as a space (as HTML forms, axum's `Query`
/// and serde_urlencoded read them), sorted by name, and written again
/// with every byte but the unreserved ones percent-encoded. Pairs with
/// equal names keep their order, which may mean something
/// (`tag=a&tag=b`); empty pieces (`a=1&&b=2`) are dropped. A query written
/// that way already (`a=1&b=2`, and no query at all) is left as it is, so
/// its fingerprint is the one it had before queries were normalised.
pub(crate) fn normal_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (name, value) in query_pairs(query) {
        if !out.is_empty() {
            out.push('&');
        }
        percent_encode(&name, &mut out);
        out.push('=');
        percent_encode(&value, &mut out);
    }
    out
}

fn percent_encode(bytes: &[u8], out: &mut String) {
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

fn query_pairs(query: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            (form_decode(name), form_decode(value))
        })
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs
}

/// `+` as a space and `%XX` as its byte; a `%` without two hex digits stays
/// as it is.
fn form_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(uri: &str) -> Fingerprint {
        let (parts, ()) = http::Request::post(uri).body(()).unwrap().into_parts();
        fingerprint(&parts, &[], b"{}").unwrap()
    }

    #[test]
    fn equal_queries_fingerprint_alike() {
        assert_eq!(print("/a?x=1&y=2"), print("/a?y=2&x=1"));
        assert_eq!(print("/a?q=a%20b"), print("/a?q=a+b"));
        assert_eq!(print("/a?q=%41"), print("/a?q=A"));
        assert_eq!(print("/a?x=1&&y=2"), print("/a?x=1&y=2"));
        assert_eq!(print("/a?"), print("/a"));
    }

    #[test]
    fn a_query_in_normal_form_is_kept() {
        assert_eq!(normal_query("a=1&b=x_y"), "a=1&b=x_y");
        assert_eq!(normal_query(""), "");
        assert_eq!(normal_query("b=x+y&a=%31"), "a=1&b=x%20y");
        assert_eq!(normal_query("q=%C3%A9&flag"), "flag=&q=%C3%A9");
    }

    #[test]
    fn different_queries_do_not() {
        assert_ne!(print("/a?tag=x&tag=y"), print("/a?tag=y&tag=x"));
        assert_ne!(print("/a?q=a%2Bb"), print("/a?q=a+b"));
        assert_ne!(print("/a?x=1"), print("/a?x=2"));
        assert_ne!(print("/a?x"), print("/a?y"));
        assert_ne!(print("/a?x=1"), print("/b?x=1"));
        assert_ne!(print("/a?q=%zz"), print("/a?q=zz"));
    }
}
