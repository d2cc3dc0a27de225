//! How one call's result goes to the store and back: its `Ok` value encoded
//! and decoded, its `Err` kept or not, and idem's own errors turned into the
//! caller's error type.
//!
//! The public `run` methods build a codec from serde bounds; the attribute's
//! expansion builds one from function pointers that its checks produced, so
//! that an unfit type is reported once, where the user wrote it, and not
//! again by the engine's bounds.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

/// What the engine needs to know about a call's `Result<T, E>`.
pub(crate) trait ResultCodec<T, E> {
    /// `T` as stored bytes.
    fn encode_ok(&self, value: &T) -> serde_json::Result<Vec<u8>>;
    /// `T` from stored bytes.
    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<T>;
    /// idem's own failure as the caller's error.
    fn idem_error(&self, error: Error) -> E;
    /// The error's stored bytes, if it is to be stored. Asked once per call.
    fn keep_err(&mut self, error: &E) -> Option<serde_json::Result<Vec<u8>>>;
    /// A stored error read back.
    fn decode_err(&self, bytes: &[u8]) -> Result<E, Error>;
    /// A kept error read back from a record that says only that the call
    /// failed and `reason` why the error itself was not kept (too large, a
    /// full store, or it did not serialize). `None` (the default): what a
    /// value kept so gives, [`Error::NotReplayable`].
    fn unkept_err(&self, _reason: &str) -> Option<E> {
        None
    }
    /// Whether the caller must not get the outcome before it is recorded
    /// (a consumer acknowledges a message only then): a record whose store
    /// answer was lost is retried before returning instead of in the
    /// background.
    fn awaits_record(&self) -> bool {
        false
    }
    /// Told, after the body ran and its outcome went to the store, whether
    /// the store confirmed it: the result stored, or the claim of an
    /// unkept error released. With [`awaits_record`](Self::awaits_record),
    /// after the retries of an answer that was lost.
    fn recorded(&self, _confirmed: bool) {}
    /// The type tag of records holding a `T`.
    fn ok_tag(&self) -> u64 {
        type_tag::<T>()
    }
    /// The type tag of records holding an `E`.
    fn err_tag(&self) -> u64 {
        type_tag::<E>()
    }
}

/// The tag a record of a `T` carries: FNV-1a (64 bits) of `T`'s type name
/// with every path cut to its last segment, so `alloc::vec::Vec<shop::Receipt>`
/// is tagged as `Vec<Receipt>`. Moving a type to another module keeps its
/// tag (a retry across that deploy still replays); renaming it, or changing
/// its generic arguments, changes the tag, and records of the old type are
/// then refused rather than decoded as the new one.
pub(crate) fn type_tag<T: ?Sized>() -> u64 {
    remembered_tag(std::any::type_name::<T>())
}

/// The tag of `name`, remembered per thread by where the name is: every
/// call computes its result type's tag, and a type's name is one static
/// string. A tag depends on the name's text alone, so two names at one
/// address (merged equal strings) share it rightly.
pub(crate) fn remembered_tag(name: &'static str) -> u64 {
    const SLOTS: usize = 8;
    thread_local! {
        static TAGS: std::cell::Cell<[(usize, usize, u64); SLOTS]> =
            const { std::cell::Cell::new([(0, 0, 0); SLOTS]) };
    }
    let at = name.as_ptr() as usize;
    let slot = (at >> 3) % SLOTS;
    TAGS.try_with(|tags| {
        let mut all = tags.get();
        let (address, len, tag) = all[slot];
        if address == at && len == name.len() {
            return tag;
        }
        let tag = tag_of(name);
        all[slot] = (at, name.len(), tag);
        tags.set(all);
        tag
    })
    // The thread is being torn down: compute it.
    .unwrap_or_else(|_| tag_of(name))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn mix(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The tag of a type's name: one pass over its bytes (every call computes
/// its result type's tag, so this is on the replay path), or, for a name
/// that is not ASCII, [`tag_of_text`], whose tags it equals.
fn tag_of(name: &str) -> u64 {
    if !name.is_ascii() {
        return tag_of_text(name);
    }
    let bytes = name.as_bytes();
    let mut hash = FNV_OFFSET;
    let mut at = 0;
    while at < bytes.len() {
        // A path (`alloc::vec::Vec`), of which only the last segment counts
        // (after the last `::`, as a search from the right finds it), then
        // the delimiter after it.
        let start = at;
        while at < bytes.len()
            && (bytes[at].is_ascii_alphanumeric() || matches!(bytes[at], b'_' | b':'))
        {
            at += 1;
        }
        let segment = (start + 1..at)
            .rev()
            .find(|&i| bytes[i] == b':' && bytes[i - 1] == b':')
            .map_or(start, |i| i + 1);
        hash = mix(hash, &bytes[segment..at]);
        if at < bytes.len() {
            hash = mix(hash, &bytes[at..=at]);
            at += 1;
        }
    }
    hash
}

/// The tag of a type's name, char by char.
fn tag_of_text(name: &str) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut rest = name;
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let (path, tail) = rest.split_at(end);
        hash = mix(hash, path.rsplit("::").next().unwrap_or(path).as_bytes());
        let mut chars = tail.chars();
        if let Some(delimiter) = chars.next() {
            hash = mix(hash, delimiter.encode_utf8(&mut [0; 4]).as_bytes());
        }
        rest = chars.as_str();
    }
    hash
}

/// A codec lent to a step that answers for it (the transactional mode's
/// opening, which hands the codec back to the caller for the finish).
impl<T, E, C: ResultCodec<T, E> + ?Sized> ResultCodec<T, E> for &mut C {
    fn encode_ok(&self, value: &T) -> serde_json::Result<Vec<u8>> {
        (**self).encode_ok(value)
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<T> {
        (**self).decode_ok(bytes)
    }

    fn idem_error(&self, error: Error) -> E {
        (**self).idem_error(error)
    }

    fn keep_err(&mut self, error: &E) -> Option<serde_json::Result<Vec<u8>>> {
        (**self).keep_err(error)
    }

    fn decode_err(&self, bytes: &[u8]) -> Result<E, Error> {
        (**self).decode_err(bytes)
    }

    fn unkept_err(&self, reason: &str) -> Option<E> {
        (**self).unkept_err(reason)
    }

    fn awaits_record(&self) -> bool {
        (**self).awaits_record()
    }

    fn recorded(&self, confirmed: bool) {
        (**self).recorded(confirmed);
    }

    fn ok_tag(&self) -> u64 {
        (**self).ok_tag()
    }

    fn err_tag(&self) -> u64 {
        (**self).err_tag()
    }
}

/// The codec of [`Idempotency::run`](crate::Idempotency::run): serde for
/// `T`, `From` for `E`, errors never stored.
pub(crate) struct Serde;

impl<T, E> ResultCodec<T, E> for Serde
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
{
    fn encode_ok(&self, value: &T) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(value)
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<T> {
        serde_json::from_slice(bytes)
    }

    fn idem_error(&self, error: Error) -> E {
        error.into()
    }

    fn keep_err(&mut self, _: &E) -> Option<serde_json::Result<Vec<u8>>> {
        None
    }

    fn decode_err(&self, _: &[u8]) -> Result<E, Error> {
        Err(stored_error_not_cached())
    }
}

/// The codec of
/// [`Idempotency::run_caching_errors`](crate::Idempotency::run_caching_errors):
/// serde for both, errors stored when `P` accepts them.
pub(crate) struct SerdeCaching<P>(Option<P>);

impl<P> SerdeCaching<P> {
    pub(crate) fn new(predicate: P) -> Self {
        Self(Some(predicate))
    }
}

impl<T, E, P> ResultCodec<T, E> for SerdeCaching<P>
where
    T: Serialize + DeserializeOwned,
    E: From<Error> + Serialize + DeserializeOwned,
    P: FnOnce(&E) -> bool,
{
    fn encode_ok(&self, value: &T) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(value)
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<T> {
        serde_json::from_slice(bytes)
    }

    fn idem_error(&self, error: Error) -> E {
        error.into()
    }

    fn keep_err(&mut self, error: &E) -> Option<serde_json::Result<Vec<u8>>> {
        let keep = self.0.take()?;
        keep(error).then(|| serde_json::to_vec(error))
    }

    fn decode_err(&self, bytes: &[u8]) -> Result<E, Error> {
        serde_json::from_slice(bytes).map_err(Error::decode)
    }
}

/// A value's encoding and decoding, as plain functions.
#[doc(hidden)]
pub struct Codec<T> {
    encode: fn(&T) -> serde_json::Result<Vec<u8>>,
    decode: fn(&[u8]) -> serde_json::Result<T>,
}

impl<T> Clone for Codec<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Codec<T> {}

impl<T: Serialize + DeserializeOwned> Codec<T> {
    /// serde_json's encoding of `T`.
    pub(crate) fn serde() -> Self {
        Self {
            encode: |value| serde_json::to_vec(value),
            decode: |bytes| serde_json::from_slice(bytes),
        }
    }
}

/// The codec the attribute's expansion builds from its checks.
#[doc(hidden)]
pub struct Parts<T, E, P> {
    pub(crate) ok: Codec<T>,
    pub(crate) from_idem: fn(Error) -> E,
    /// With `cache_errors`: the error's codec and which errors to keep.
    pub(crate) cache: Option<(Codec<E>, Option<P>)>,
}

impl<T, E, P: FnOnce(&E) -> bool> ResultCodec<T, E> for Parts<T, E, P> {
    fn encode_ok(&self, value: &T) -> serde_json::Result<Vec<u8>> {
        (self.ok.encode)(value)
    }

    fn decode_ok(&self, bytes: &[u8]) -> serde_json::Result<T> {
        (self.ok.decode)(bytes)
    }

    fn idem_error(&self, error: Error) -> E {
        (self.from_idem)(error)
    }

    fn keep_err(&mut self, error: &E) -> Option<serde_json::Result<Vec<u8>>> {
        let (codec, keep) = self.cache.as_mut()?;
        let keep = keep.take()?;
        keep(error).then(|| (codec.encode)(error))
    }

    fn decode_err(&self, bytes: &[u8]) -> Result<E, Error> {
        match &self.cache {
            Some((codec, _)) => (codec.decode)(bytes).map_err(Error::decode),
            None => Err(stored_error_not_cached()),
        }
    }
}

fn stored_error_not_cached() -> Error {
    let message = "the stored result is an error, but this call does not cache errors; \
                   a call with this key and `cache_errors` stored it";
    Error::Decode(std::sync::Arc::from(Box::<
        dyn std::error::Error + Send + Sync,
    >::from(message)))
}

#[cfg(test)]
mod tests {
    use super::type_tag;

    mod shop {
        pub(super) struct Receipt;
        pub(super) mod moved {
            pub(in super::super) struct Receipt;
        }
        pub(super) struct Refund;
    }

    #[test]
    fn the_one_pass_tag_equals_the_tag_char_by_char() {
        use super::{tag_of, tag_of_text};
        for name in [
            std::any::type_name::<Vec<shop::Receipt>>(),
            std::any::type_name::<Result<(u32, &str), Box<dyn std::error::Error + Send>>>(),
            std::any::type_name::<[Option<std::collections::HashMap<String, i64>>; 4]>(),
            std::any::type_name::<fn(&mut u8) -> *const u8>(),
            "",
            ":",
            "a:b",
            "::",
            "a::",
            "::a",
            "a:::b",
            "a::b::c<d::e, (f::g,)>",
            "{{closure}}",
            "r#type::r#match",
        ] {
            assert_eq!(tag_of(name), tag_of_text(name), "{name}");
        }
        assert_eq!(
            tag_of("grüße::Straße<x::ß>"),
            tag_of_text("grüße::Straße<x::ß>")
        );
    }

    #[test]
    fn remembered_tags_are_the_tags_of_their_names() {
        use super::{remembered_tag, tag_of};
        // More names than slots, so that they evict each other, and names
        // that start at one address with different lengths.
        static LONG: &str = "alloc::vec::Vec<shop::Receipt>, and more";
        let mut names: Vec<&'static str> = (1..LONG.len()).map(|n| &LONG[..n]).collect();
        names.extend([
            std::any::type_name::<u8>(),
            std::any::type_name::<Vec<String>>(),
            std::any::type_name::<Option<(u64, bool)>>(),
        ]);
        for _ in 0..3 {
            for name in &names {
                assert_eq!(remembered_tag(name), tag_of(name), "{name}");
            }
            names.reverse();
        }
    }

    #[test]
    fn type_tags_follow_the_type_not_its_module() {
        assert_eq!(
            type_tag::<shop::Receipt>(),
            type_tag::<shop::moved::Receipt>()
        );
        assert_eq!(
            type_tag::<Vec<shop::Receipt>>(),
            type_tag::<Vec<shop::moved::Receipt>>()
        );
        assert_ne!(type_tag::<shop::Receipt>(), type_tag::<shop::Refund>());
        assert_ne!(
            type_tag::<Vec<shop::Receipt>>(),
            type_tag::<Vec<shop::Refund>>()
        );
        assert_ne!(type_tag::<String>(), type_tag::<u32>());
        assert_ne!(type_tag::<Option<u32>>(), type_tag::<Vec<u32>>());
        assert_ne!(type_tag::<(u32, String)>(), type_tag::<(String, u32)>());
    }
}
