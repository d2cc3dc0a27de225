//! The byte layout of a record key's value: the one definition that the
//! store, its Lua scripts and the tests derive from.
//!
//! Each record key holds one binary string:
//!
//! | bytes | in progress | completed |
//! |---|---|---|
//! | [`VERSION`] | [`CURRENT_VERSION`] | [`CURRENT_VERSION`] |
//! | [`STATE`] | [`CLAIMED`] (`p`) | [`COMPLETED`] (`c`) |
//! | [`TOKEN`] | the claim's token | the token that completed it |
//! | [`FINGERPRINT`] | the call's fingerprint | the call's fingerprint |
//! | [`STAMP`] | the lease's deadline, Unix ms | when the record was stored, Unix ms |
//! | [`HEADER`]`..` | [`CLAIMED_AT`]: when the claim was made, Unix ms | the encoded [`Record`] |
//!
//! Tokens and Unix milliseconds are big-endian. The key's expiry is the lease
//! while in progress and the TTL once completed, so Redis reclaims both by
//! itself.

use std::ops::Range;

use bytes::Bytes;

use crate::error::{StoreError, StoreErrorKind};
use crate::key::Fingerprint;
use crate::store::{Record, Token};

/// Where the layout version is.
pub const VERSION: usize = 0;
/// The layout this version of idem writes and reads.
pub const CURRENT_VERSION: u8 = 1;
/// Where the state marker is.
pub const STATE: usize = 1;
/// The state of a claim in progress.
pub const CLAIMED: u8 = b'p';
/// The state of a completed record.
pub const COMPLETED: u8 = b'c';
/// Where the holder's (or completer's) token is.
pub const TOKEN: Range<usize> = 2..18;
/// Where the call's fingerprint is.
pub const FINGERPRINT: Range<usize> = 18..50;
/// Where the lease deadline (in progress) or the completion time
/// (completed) is.
pub const STAMP: Range<usize> = 50..58;
/// The length of the header; a completed record's [`Record`] follows it.
pub const HEADER: usize = 58;
/// Where a claim keeps when it was made (renewals keep it), right after the
/// header.
pub const CLAIMED_AT: Range<usize> = 58..66;

/// What a record key holds.
#[derive(Debug)]
pub(crate) enum Held {
    /// A claim in progress.
    Claimed {
        token: Token,
        fingerprint: Fingerprint,
        /// The lease's deadline, Unix ms.
        deadline: u64,
        /// When the claim was made, Unix ms.
        claimed_at: Option<u64>,
    },
    /// A completed record.
    Completed {
        fingerprint: Fingerprint,
        record: Record,
        /// When it was stored, Unix ms.
        stored_at: u64,
    },
}

/// The value of a new claim, made at `now` (Unix ms). On the stack: every
/// claim sends one.
pub(crate) fn claim(
    token: Token,
    fingerprint: Fingerprint,
    deadline: u64,
    now: u64,
) -> [u8; CLAIMED_AT.end] {
    let mut value = [0; CLAIMED_AT.end];
    value[VERSION] = CURRENT_VERSION;
    value[STATE] = CLAIMED;
    value[TOKEN].copy_from_slice(&token.as_u128().to_be_bytes());
    value[FINGERPRINT].copy_from_slice(fingerprint.digest());
    value[STAMP].copy_from_slice(&deadline.to_be_bytes());
    value[CLAIMED_AT].copy_from_slice(&now.to_be_bytes());
    value
}

/// Reads what a record key holds.
pub(crate) fn parse(value: Vec<u8>) -> Result<Held, StoreError> {
    if value.len() < HEADER {
        return Err(not_a_record());
    }
    match value[VERSION] {
        CURRENT_VERSION => {}
        v if v > CURRENT_VERSION && v < b' ' => {
            return Err(StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "a Redis record has layout version {v}, newer than this idem reads \
                     ({CURRENT_VERSION}); upgrade idem-core on this service"
                ),
            ));
        }
        _ => return Err(not_a_record()),
    }
    let fingerprint =
        Fingerprint::from_digest(value[FINGERPRINT].try_into().map_err(|_| not_a_record())?);
    let stamp = u64::from_be_bytes(value[STAMP].try_into().map_err(|_| not_a_record())?);
    match value[STATE] {
        CLAIMED => Ok(Held::Claimed {
            token: Token::from_u128(u128::from_be_bytes(
                value[TOKEN].try_into().map_err(|_| not_a_record())?,
            )),
            fingerprint,
            deadline: stamp,
            claimed_at: value
                .get(CLAIMED_AT)
                .and_then(|bytes| Some(u64::from_be_bytes(bytes.try_into().ok()?))),
        }),
        COMPLETED => Ok(Held::Completed {
            fingerprint,
            record: Record::decode(Bytes::from(value).slice(HEADER..))?,
            stored_at: stamp,
        }),
        _ => Err(not_a_record()),
    }
}

/// A range as the 1-based, inclusive `string.sub` arguments of Lua.
pub(crate) fn lua_sub(range: &Range<usize>) -> String {
    format!("{}, {}", range.start + 1, range.end)
}

fn not_a_record() -> StoreError {
    StoreError::new(
        StoreErrorKind::Corrupt,
        "a Redis record key holds a value that is not an idem record",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_contiguous() {
        assert_eq!(STATE, VERSION + 1);
        assert_eq!(TOKEN.start, STATE + 1);
        assert_eq!(FINGERPRINT.start, TOKEN.end);
        assert_eq!(STAMP.start, FINGERPRINT.end);
        assert_eq!(HEADER, STAMP.end);
        assert_eq!(CLAIMED_AT.start, HEADER);
        assert_eq!(TOKEN.len(), 16);
        assert_eq!(FINGERPRINT.len(), 32);
    }

    #[test]
    fn a_claim_reads_back() {
        let token = Token::random();
        let fingerprint = Fingerprint::of(&1).unwrap();
        let Held::Claimed {
            token: t,
            fingerprint: f,
            deadline,
            claimed_at,
        } = parse(claim(token, fingerprint, 42, 7).to_vec()).unwrap()
        else {
            panic!("a claim")
        };
        assert_eq!(
            (t, f, deadline, claimed_at),
            (token, fingerprint, 42, Some(7))
        );
        assert_eq!(lua_sub(&TOKEN), "3, 18");
    }

    #[test]
    fn foreign_values_are_corrupt() {
        let mut newer = claim(Token::random(), Fingerprint::of(&1).unwrap(), 1, 0);
        newer[VERSION] = 9;
        for value in [b"garbage".to_vec(), vec![0; HEADER], newer.to_vec()] {
            assert_eq!(parse(value).unwrap_err().kind(), StoreErrorKind::Corrupt);
        }
    }
}
