//! The `Idempotency-Key` request header.

use std::fmt;

use http::HeaderMap;
use http::header::HeaderName;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest key accepted, in characters (as Stripe's).
pub const MAX_KEY_LEN: usize = 255;

/// The `Idempotency-Key` of a request: 1 to [`MAX_KEY_LEN`] characters.
///
/// The IETF draft makes the header a structured-field string
/// (`Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`, with `\"` and
/// `\\` escapes); a bare token of visible ASCII (`Idempotency-Key: 8e03…`),
/// as Stripe takes it, is accepted too. It serializes as its text and
/// deserializes through [`new`](Self::new), which checks that text, so it can
/// be the `key` of an `#[idempotent]` fn, round-trips through serde and never
/// holds an invalid key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses a header value.
    ///
    /// ```
    /// use idem_core::http::IdempotencyKey;
    ///
    /// assert_eq!(IdempotencyKey::parse("\"8e03978e\"")?.as_str(), "8e03978e");
    /// assert_eq!(IdempotencyKey::parse("\"a \\\"b\\\"\"")?.as_str(), "a \"b\"");
    /// assert_eq!(IdempotencyKey::parse("order-17")?.as_str(), "order-17");
    /// assert!(IdempotencyKey::parse("").is_err());
    /// assert!(IdempotencyKey::parse("\"unterminated").is_err());
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for an empty, overlong or malformed key.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let value = value.trim_matches([' ', '\t']);
        let text = match value.strip_prefix('"') {
            Some(quoted) => sf_string(quoted)?,
            None => {
                if !value.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
                    return Err(invalid(
                        "the Idempotency-Key header is a quoted string (or a bare token of \
                         visible ASCII characters)",
                    ));
                }
                value.to_owned()
            }
        };
        Self::new(text)
    }

    /// A key from its text, as [`as_str`](Self::as_str) gives it (and as a
    /// quoted header carries it once unescaped): 1 to [`MAX_KEY_LEN`]
    /// characters, each visible ASCII or a space.
    ///
    /// ```
    /// use idem_core::http::IdempotencyKey;
    ///
    /// assert_eq!(IdempotencyKey::new("order 17 \"b\"")?.as_str(), "order 17 \"b\"");
    /// assert!(IdempotencyKey::new("").is_err());
    /// assert!(IdempotencyKey::new("tab\there").is_err());
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for an empty or overlong text, or one with other
    /// characters.
    pub fn new(text: impl Into<String>) -> Result<Self, Error> {
        let text = text.into();
        if text.is_empty() {
            return Err(invalid("the Idempotency-Key header is empty"));
        }
        if !text.bytes().all(|b| matches!(b, b' '..=b'~')) {
            return Err(invalid(
                "the Idempotency-Key header may hold visible ASCII characters and spaces only",
            ));
        }
        if text.len() > MAX_KEY_LEN {
            return Err(invalid(format!(
                "the Idempotency-Key header is longer than {MAX_KEY_LEN} characters"
            )));
        }
        Ok(Self(text))
    }

    /// The key's text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of a request's headers: `None` without the header, an error
    /// for a malformed or repeated one.
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, Error> {
        let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(invalid(
                "the request carries more than one Idempotency-Key header",
            ));
        }
        let text = value.to_str().map_err(|_| {
            invalid("the Idempotency-Key header may hold visible ASCII characters only")
        })?;
        Self::parse(text).map(Some)
    }
}

/// `text` written as a structured-field string (`"…"`, with `"` and `\`
/// escaped), the form [`IdempotencyKey::parse`] reads back; `None` for text
/// such a string cannot carry (only visible ASCII and spaces).
#[cfg(feature = "client")]
pub(crate) fn sf_string_header(text: &str) -> Option<http::HeaderValue> {
    if !text.bytes().all(|byte| matches!(byte, b' '..=b'~')) {
        return None;
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    http::HeaderValue::try_from(quoted).ok()
}

/// The rest of a structured-field string after its opening quote.
fn sf_string(rest: &str) -> Result<String, Error> {
    let mut text = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                return if chars.as_str().is_empty() {
                    Ok(text)
                } else {
                    Err(invalid(
                        "the Idempotency-Key header has text after its closing quote",
                    ))
                };
            }
            '\\' => match chars.next() {
                Some(escaped @ ('"' | '\\')) => text.push(escaped),
                _ => {
                    return Err(invalid(
                        "the Idempotency-Key header escapes only `\\\"` and `\\\\`",
                    ));
                }
            },
            ' '..='~' => text.push(c),
            _ => {
                return Err(invalid(
                    "the Idempotency-Key header may hold visible ASCII characters and spaces only",
                ));
            }
        }
    }
    Err(invalid("the Idempotency-Key header has no closing quote"))
}

/// The reason of the [`Error::InvalidKey`] of a request that carries no key
/// where one is needed: a `400` of type `#missing-key`, on both paths.
pub(crate) const MISSING: &str = "this endpoint needs an Idempotency-Key header: a fresh UUID per operation, sent again \
     on every retry of it";

pub(crate) fn invalid(reason: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::InvalidKey {
        reason: reason.into(),
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = Error;

    fn try_from(value: String) -> Result<Self, Error> {
        Self::new(value)
    }
}

impl From<IdempotencyKey> for String {
    fn from(key: IdempotencyKey) -> Self {
        key.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(&IDEMPOTENCY_KEY, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn quoted_and_bare_keys_are_read() {
        for (value, text) in [
            ("\"abc-123\"", "abc-123"),
            ("abc-123", "abc-123"),
            ("  \"a b\"  ", "a b"),
            ("\"q\\\"uote\\\\\"", "q\"uote\\"),
        ] {
            let key = IdempotencyKey::from_headers(&headers(&[value]))
                .unwrap()
                .unwrap();
            assert_eq!(key.as_str(), text, "{value}");
        }
        assert!(
            IdempotencyKey::from_headers(&headers(&[]))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        let quoted_long = format!("\"{long}\"");
        for bad in [
            "",
            "\"\"",
            "has space",
            "\"open",
            "\"x\"y",
            "\"bad\\n\"",
            &long,
            &quoted_long,
        ] {
            let err = IdempotencyKey::from_headers(&headers(&[bad])).unwrap_err();
            assert_eq!(err.http_status(), 400, "{bad:?}");
        }
        let twice = IdempotencyKey::from_headers(&headers(&["a", "b"])).unwrap_err();
        assert!(twice.to_string().contains("more than one"), "{twice}");
        assert!(IdempotencyKey::parse(&"k".repeat(MAX_KEY_LEN)).is_ok());
    }

    #[test]
    fn a_deserialized_key_is_validated() {
        let key: IdempotencyKey = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(key.as_str(), "abc");
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"abc\"");
        for bad in ["\"\"", "\"tab\\there\"", "\"caf\u{e9}\""] {
            assert!(
                serde_json::from_str::<IdempotencyKey>(bad).is_err(),
                "{bad}"
            );
        }
        let long = format!("\"{}\"", "k".repeat(MAX_KEY_LEN + 1));
        assert!(serde_json::from_str::<IdempotencyKey>(&long).is_err());
    }

    #[test]
    fn every_key_a_header_gives_round_trips_through_serde() {
        for header in [
            "abc",
            "\"a b\"",
            "\"q\\\"uote\\\\\"",
            "\" lead\"",
            "\"\\\"x\\\"\"",
        ] {
            let key = IdempotencyKey::parse(header).unwrap();
            let json = serde_json::to_string(&key).unwrap();
            let back: IdempotencyKey = serde_json::from_str(&json).unwrap();
            assert_eq!(back, key, "{header} as {json}");
        }
    }
}
