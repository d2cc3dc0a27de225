//! The stored result of a completed call, and its versioned byte format.

use bytes::{BufMut as _, Bytes, BytesMut};

use crate::error::{StoreError, StoreErrorKind};

/// Whether a stored result was the function's `Ok` or its `Err`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The payload is the serialized `T` of `Ok(T)`.
    Ok,
    /// The payload is the serialized `E` of `Err(E)` (only when errors are cached).
    Err,
    /// The call completed, but its result could not be serialized; the
    /// payload is the serializer's message. Retries get
    /// [`Error::NotReplayable`](crate::Error::NotReplayable), and the body
    /// does not run again until the record expires.
    Unserializable,
}

/// The result of a completed call, as a store keeps it: an [`Outcome`] and the
/// value serialized with `serde_json`.
///
/// On the wire ([`encode`](Record::encode)) a record is two header bytes, the
/// format version and `o`, `e` or `u` for the outcome, followed by the
/// payload.
/// `()`, `None`, `0`, `""` and `[]` are payloads like any other and replay
/// exactly as they were returned. One limit is JSON's own: `Some(None)` of an
/// `Option<Option<T>>` is `null`, and replays as `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    outcome: Outcome,
    payload: Bytes,
}

impl Record {
    /// The record format this version of idem writes and reads.
    pub const FORMAT_VERSION: u8 = 1;

    /// A record of `outcome` with an already serialized JSON `payload`.
    pub fn new(outcome: Outcome, payload: impl Into<Bytes>) -> Self {
        Self {
            outcome,
            payload: payload.into(),
        }
    }

    /// Whether the call returned `Ok` or `Err`.
    #[must_use]
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The record of a call whose result could not be serialized: `reason`
    /// is the serializer's message.
    pub fn unserializable(reason: &str) -> Self {
        Self::new(
            Outcome::Unserializable,
            Bytes::copy_from_slice(reason.as_bytes()),
        )
    }

    /// The serialized value, as JSON (or, for
    /// [`Outcome::Unserializable`], the serializer's message).
    #[must_use]
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The record as bytes, for stores that keep bytes.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(2 + self.payload.len());
        out.put_u8(Self::FORMAT_VERSION);
        out.put_u8(match self.outcome {
            Outcome::Ok => b'o',
            Outcome::Err => b'e',
            Outcome::Unserializable => b'u',
        });
        out.put_slice(&self.payload);
        out.freeze()
    }

    /// Reads a record that [`encode`](Record::encode) wrote.
    ///
    /// # Errors
    /// A [`StoreErrorKind::Corrupt`] error for bytes that are not a record, or
    /// that a newer version of idem wrote.
    ///
    /// ```
    /// use idem_core::store::{Outcome, Record};
    ///
    /// let record = Record::new(Outcome::Ok, &b"null"[..]);
    /// assert_eq!(Record::decode(record.encode())?, record);
    /// assert!(Record::decode(&b"garbage"[..]).is_err());
    /// # Ok::<(), idem_core::store::StoreError>(())
    /// ```
    pub fn decode(bytes: impl Into<Bytes>) -> Result<Self, StoreError> {
        let mut bytes: Bytes = bytes.into();
        if bytes.len() < 2 {
            return Err(corrupt("a stored record is too short to be an idem record"));
        }
        let header = bytes.split_to(2);
        match header[0] {
            Self::FORMAT_VERSION => {}
            v if v > Self::FORMAT_VERSION && v < b' ' => {
                return Err(corrupt(format!(
                    "a stored record has format version {v}, newer than this idem reads ({}); \
                     upgrade idem-core on this service",
                    Self::FORMAT_VERSION
                )));
            }
            _ => return Err(corrupt("a stored record is not an idem record")),
        }
        let outcome = match header[1] {
            b'o' => Outcome::Ok,
            b'e' => Outcome::Err,
            b'u' => Outcome::Unserializable,
            _ => return Err(corrupt("a stored record has an unknown outcome marker")),
        };
        Ok(Self {
            outcome,
            payload: bytes,
        })
    }
}

fn corrupt(message: impl Into<std::borrow::Cow<'static, str>>) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_outcomes() {
        for outcome in [Outcome::Ok, Outcome::Err, Outcome::Unserializable] {
            let record = Record::new(outcome, &b"{\"a\":1}"[..]);
            assert_eq!(Record::decode(record.encode()).unwrap(), record);
        }
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        let newer = Record::decode(&[2, b'o', b'1'][..]).unwrap_err();
        assert_eq!(newer.kind(), StoreErrorKind::Corrupt);
        assert!(newer.to_string().contains("newer"), "{newer}");
        for garbage in [&b""[..], b"\x01", b"{\"json\":true}", b"\x01x1"] {
            let err = Record::decode(garbage).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{garbage:?}");
        }
    }
}
