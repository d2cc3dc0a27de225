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
/// A record written by a call carries the [type tag](Record::type_tag) of the
/// value it holds, so that it is never decoded as another type, whatever got
/// it under a key (two functions pinned to one `name`, a deploy that changed
/// a return type).
///
/// On the wire ([`encode`](Record::encode)) a record is two header bytes, the
/// format version and `o`, `e` or `u` for the outcome, then (format 2) the
/// eight bytes of the type tag, then the payload. Format 1, written before
/// records had a tag (and still for a record without one), has no tag and is
/// read as untagged.
/// `()`, `None`, `0`, `""` and `[]` are payloads like any other and replay
/// exactly as they were returned. One limit is JSON's own: `Some(None)` of an
/// `Option<Option<T>>` is `null`, and replays as `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    outcome: Outcome,
    type_tag: Option<u64>,
    payload: Bytes,
}

impl Record {
    /// The newest record format this version of idem writes and reads: 2,
    /// a record with a type tag. It reads format 1 too.
    pub const FORMAT_VERSION: u8 = 2;

    /// An untagged record (format 1 on the wire).
    const UNTAGGED_VERSION: u8 = 1;

    /// A record of `outcome` with an already serialized JSON `payload`, and
    /// no type tag.
    pub fn new(outcome: Outcome, payload: impl Into<Bytes>) -> Self {
        Self {
            outcome,
            type_tag: None,
            payload: payload.into(),
        }
    }

    /// The record with the type tag of the value it holds: calls refuse to
    /// decode a record whose tag is not their result type's.
    #[must_use]
    pub fn with_type_tag(mut self, tag: u64) -> Self {
        self.type_tag = Some(tag);
        self
    }

    /// The tag of the type the payload was serialized from, if the record
    /// has one (records written before tags existed do not). idem computes
    /// it from the type's name without module paths (see the crate docs'
    /// "Identity" section); stores keep it as they keep the payload.
    #[must_use]
    pub fn type_tag(&self) -> Option<u64> {
        self.type_tag
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

    /// A record saying the call ran but `self` could not be kept (too
    /// large, or refused by a full store): `reason` says why. It keeps
    /// `self`'s type tag, an error's [marked](unkept_err_tag), so that a
    /// failure kept so is still told from a value.
    pub(crate) fn unkept(&self, reason: &str) -> Self {
        let compact = Self::unserializable(reason);
        match (self.outcome, self.type_tag) {
            (Outcome::Err, Some(tag)) => compact.with_type_tag(unkept_err_tag(tag)),
            (_, Some(tag)) => compact.with_type_tag(tag),
            (_, None) => compact,
        }
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
        let mut out = BytesMut::with_capacity(10 + self.payload.len());
        out.put_u8(match self.type_tag {
            Some(_) => Self::FORMAT_VERSION,
            None => Self::UNTAGGED_VERSION,
        });
        out.put_u8(match self.outcome {
            Outcome::Ok => b'o',
            Outcome::Err => b'e',
            Outcome::Unserializable => b'u',
        });
        if let Some(tag) = self.type_tag {
            out.put_u64_le(tag);
        }
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
        let tagged = match header[0] {
            Self::UNTAGGED_VERSION => false,
            Self::FORMAT_VERSION => true,
            v if v > Self::FORMAT_VERSION && v < b' ' => {
                return Err(corrupt(format!(
                    "a stored record has format version {v}, newer than this idem reads ({}); \
                     upgrade idem-core on this service",
                    Self::FORMAT_VERSION
                )));
            }
            _ => return Err(corrupt("a stored record is not an idem record")),
        };
        let type_tag = if tagged {
            if bytes.len() < 8 {
                return Err(corrupt("a stored record is too short to be an idem record"));
            }
            let tag = bytes.split_to(8);
            Some(u64::from_le_bytes(tag[..].try_into().unwrap_or([0; 8])))
        } else {
            None
        };
        let outcome = match header[1] {
            b'o' => Outcome::Ok,
            b'e' => Outcome::Err,
            b'u' => Outcome::Unserializable,
            _ => return Err(corrupt("a stored record has an unknown outcome marker")),
        };
        Ok(Self {
            outcome,
            type_tag,
            payload: bytes,
        })
    }
}

/// The tag of a record that says a call failed whose error, of the type
/// `err_tag` tags, was not kept: told apart from a value's record even when
/// the two types' names are alike.
pub(crate) const fn unkept_err_tag(err_tag: u64) -> u64 {
    err_tag ^ 0x756e_6b65_7074_2065 // "unkept e"
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
    fn round_trips_type_tags_and_reads_untagged_records() {
        let tagged = Record::new(Outcome::Ok, &b"7"[..]).with_type_tag(0x0123_4567_89ab_cdef);
        let bytes = tagged.encode();
        assert_eq!(bytes[0], Record::FORMAT_VERSION);
        assert_eq!(Record::decode(bytes).unwrap(), tagged);
        // A record written before tags existed: format 1, no tag.
        let old = Record::decode(&[1, b'o', b'7'][..]).unwrap();
        assert_eq!(old.type_tag(), None);
        assert_eq!(old.payload().as_ref(), b"7");
        assert_eq!(Record::new(Outcome::Ok, &b"7"[..]).encode()[0], 1);
        // A tagged header cut short is corrupt, not a short tag.
        assert!(Record::decode(&[2, b'o', 1, 2, 3][..]).is_err());
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        let newer = Record::decode(&[3, b'o', b'1'][..]).unwrap_err();
        assert_eq!(newer.kind(), StoreErrorKind::Corrupt);
        assert!(newer.to_string().contains("newer"), "{newer}");
        for garbage in [&b""[..], b"\x01", b"{\"json\":true}", b"\x01x1"] {
            let err = Record::decode(garbage).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{garbage:?}");
        }
    }
}
