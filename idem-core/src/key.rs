//! Keys and fingerprints: what a call is stored under, and what it was called with.
//!
//! Both are SHA-256 digests of a *canonical* encoding of `Serialize` values:
//! equal values always hash equal. The encoding is a small tagged binary format
//! written straight into the hasher; only map entries are buffered, so that they
//! can be sorted (a `HashMap` hashes the same whatever its iteration order).
//! Integers hash by value whatever their width (`5u8` and `5i64` are equal),
//! `-0.0` hashes as `0.0`, and struct and enum *type* names are ignored, as they
//! are in JSON; field and variant names are not.
//!
//! User bytes never reach a store: a store sees only the digest.

use std::fmt;

use serde::Serialize;
use serde::ser;
use sha2::{Digest as _, Sha256};

/// The stored identity of one idempotent operation call.
///
/// A key is the SHA-256 of the operation's name, an optional scope (a tenant or
/// user: equal keys in different scopes never meet) and the canonical encoding
/// of the key value. Stores render it as `{prefix}:{hex}`; see
/// [`Key::to_store_key`].
///
/// ```
/// use idem_core::Key;
///
/// let a = Key::new("payments.charge", &"order-17")?;
/// let b = Key::scoped("payments.charge", &42u64, &"order-17")?;
/// assert_ne!(a, b, "a scope separates otherwise equal keys");
/// assert_eq!(a, Key::new("payments.charge", &String::from("order-17"))?);
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

/// The digest of the arguments a call was made with.
///
/// A completed record keeps the fingerprint of the call that produced it, so a
/// reused key that comes with different arguments is answered with
/// [`Error::KeyReused`](crate::Error::KeyReused) instead of somebody else's
/// result.
///
/// ```
/// use std::collections::HashMap;
/// use idem_core::Fingerprint;
///
/// let a: HashMap<_, _> = [("x", 1), ("y", 2)].into_iter().collect();
/// let b: HashMap<_, _> = [("y", 2), ("x", 1)].into_iter().collect();
/// assert_eq!(Fingerprint::of(&a)?, Fingerprint::of(&b)?);
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

const KEY_DOMAIN: &[u8] = b"idem/key/v1\0";
const FINGERPRINT_DOMAIN: &[u8] = b"idem/fingerprint/v1\0";

impl Key {
    /// The key of the operation `name` for the key value `value`.
    ///
    /// # Errors
    /// [`Error::Encode`](crate::Error::Encode) when `value`'s `Serialize`
    /// implementation fails.
    pub fn new<K: Serialize + ?Sized>(name: &str, value: &K) -> Result<Self, crate::Error> {
        Self::build(name, None::<&()>, value)
    }

    /// The key of the operation `name` for `value` within `scope`.
    ///
    /// # Errors
    /// [`Error::Encode`](crate::Error::Encode) when `scope`'s or `value`'s
    /// `Serialize` implementation fails.
    pub fn scoped<S, K>(name: &str, scope: &S, value: &K) -> Result<Self, crate::Error>
    where
        S: Serialize + ?Sized,
        K: Serialize + ?Sized,
    {
        Self::build(name, Some(scope), value)
    }

    fn build<S, K>(name: &str, scope: Option<&S>, value: &K) -> Result<Self, crate::Error>
    where
        S: Serialize + ?Sized,
        K: Serialize + ?Sized,
    {
        let mut hasher = KeyHasher::new(name);
        if let Some(scope) = scope {
            hasher.scope(scope);
        }
        hasher.value(value);
        hasher.finish()
    }

    /// Rebuilds a key from its digest, e.g. one a store listed.
    #[must_use]
    pub const fn from_digest(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The 32-byte digest.
    #[must_use]
    pub const fn digest(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as a store writes it: `{prefix}:{hex}`, with the hex inside a
    /// `{…}` hash tag so that every key of one record lands in one Redis
    /// Cluster slot.
    ///
    /// ```
    /// let key = idem_core::Key::new("op", &1)?;
    /// let stored = key.to_store_key("idem");
    /// assert!(stored.starts_with("idem:{") && stored.ends_with('}'));
    /// assert_eq!(stored.len(), "idem:{}".len() + 64);
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    #[must_use]
    pub fn to_store_key(&self, prefix: &str) -> String {
        format!("{prefix}:{{{self}}}")
    }
}

impl Fingerprint {
    /// The fingerprint used when arguments are not checked
    /// (`fingerprint = false`): every call matches every other.
    pub const UNCHECKED: Self = Self([0; 32]);

    /// The fingerprint of `args`, typically a tuple of references to the
    /// arguments that take part.
    ///
    /// # Errors
    /// [`Error::Encode`](crate::Error::Encode) when `args`' `Serialize`
    /// implementation fails.
    pub fn of<A: Serialize + ?Sized>(args: &A) -> Result<Self, crate::Error> {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        hash(&mut hasher, args).map_err(|e| crate::Error::encode("arguments", e))?;
        Ok(Self(hasher.finalize().into()))
    }

    /// Rebuilds a fingerprint from its digest, e.g. one a store kept.
    #[must_use]
    pub const fn from_digest(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The 32-byte digest.
    #[must_use]
    pub const fn digest(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

/// Hashes a [`Key`] part by part: the name, then an optional scope, then the
/// value. The first part that fails to serialize is reported by `finish`.
pub(crate) struct KeyHasher {
    hasher: Sha256,
    scoped: bool,
    error: Option<crate::Error>,
}

impl KeyHasher {
    /// Starts the key of the operation `name`.
    #[must_use]
    pub(crate) fn new(name: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(KEY_DOMAIN);
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        Self {
            hasher,
            scoped: false,
            error: None,
        }
    }

    /// Adds the scope; call it at most once, before [`value`](Self::value).
    pub(crate) fn scope<S: Serialize + ?Sized>(&mut self, scope: &S) {
        self.scoped = true;
        self.hasher.update([1]);
        if let Err(e) = hash(&mut self.hasher, scope) {
            self.error.get_or_insert(crate::Error::encode("scope", e));
        }
    }

    /// Adds the key value.
    pub(crate) fn value<K: Serialize + ?Sized>(&mut self, value: &K) {
        if !self.scoped {
            self.hasher.update([0]);
        }
        if let Err(e) = hash(&mut self.hasher, value) {
            self.error.get_or_insert(crate::Error::encode("key", e));
        }
    }

    /// The key, or the first serialization error.
    ///
    /// # Errors
    /// [`Error::Encode`](crate::Error::Encode) when a part failed to serialize.
    pub(crate) fn finish(self) -> Result<Key, crate::Error> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(Key(self.hasher.finalize().into())),
        }
    }
}

/// Hashes a [`Fingerprint`] argument by argument. The arguments `a, b` give
/// the same fingerprint as [`Fingerprint::of(&(a, b))`](Fingerprint::of).
pub(crate) struct Fingerprinter {
    hasher: Sha256,
    error: Option<crate::Error>,
}

impl Fingerprinter {
    /// Starts an empty argument list.
    #[must_use]
    pub(crate) fn new() -> Self {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        hasher.update([tag::SEQ]);
        Self {
            hasher,
            error: None,
        }
    }

    /// Adds the next argument.
    pub(crate) fn argument<A: Serialize + ?Sized>(&mut self, argument: &A) {
        if let Err(e) = hash(&mut self.hasher, argument) {
            self.error
                .get_or_insert(crate::Error::encode("arguments", e));
        }
    }

    /// The fingerprint, or the first serialization error.
    ///
    /// # Errors
    /// [`Error::Encode`](crate::Error::Encode) when an argument failed to
    /// serialize.
    pub(crate) fn finish(mut self) -> Result<Fingerprint, crate::Error> {
        self.hasher.update([tag::SEQ_END]);
        match self.error {
            Some(error) => Err(error),
            None => Ok(Fingerprint(self.hasher.finalize().into())),
        }
    }
}

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::new()
    }
}

macro_rules! hex_formatting {
    ($($ty:ident),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; 64];
                // Cannot fail: the buffer is exactly twice the digest's length.
                hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($ty), "({})"), self)
            }
        }
    )*};
}
hex_formatting!(Key, Fingerprint);

/// Writes the canonical encoding of `value` into `hasher`.
fn hash<T: Serialize + ?Sized>(hasher: &mut Sha256, value: &T) -> Result<(), EncodeError> {
    encode(&mut Buffered::new(hasher), value)
}

/// Writes the canonical encoding of `value` into `sink`.
fn encode<S: Sink, T: Serialize + ?Sized>(sink: &mut S, value: &T) -> Result<(), EncodeError> {
    value.serialize(&mut Canonical { sink })
}

/// Where canonical bytes go: a hasher, or a buffer for a map entry.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

/// A hasher behind a small stack buffer: the canonical encoding is many tiny
/// writes, and feeding them to SHA-256 in blocks is several times cheaper
/// than one `update` each. Nothing is allocated.
struct Buffered<'a> {
    hasher: &'a mut Sha256,
    buf: [u8; 256],
    len: usize,
}

impl<'a> Buffered<'a> {
    fn new(hasher: &'a mut Sha256) -> Self {
        Self {
            hasher,
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Sink for Buffered<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.hasher.update(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.hasher.update(&self.buf[..self.len]);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A value's `Serialize` implementation reported an error.
#[derive(Debug)]
pub(crate) struct EncodeError(String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

impl ser::Error for EncodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

// One tag byte starts every value, so the encoding is self-delimiting:
// sequences and maps need no length prefix, only an end tag.
mod tag {
    pub(super) const FALSE: u8 = b'0';
    pub(super) const TRUE: u8 = b'1';
    pub(super) const INT: u8 = b'i';
    pub(super) const BIG_UINT: u8 = b'U';
    pub(super) const FLOAT: u8 = b'f';
    pub(super) const STR: u8 = b's';
    pub(super) const BYTES: u8 = b'y';
    pub(super) const NONE: u8 = b'n';
    pub(super) const SOME: u8 = b'?';
    pub(super) const UNIT: u8 = b'u';
    pub(super) const VARIANT: u8 = b'e';
    pub(super) const SEQ: u8 = b'[';
    pub(super) const SEQ_END: u8 = b']';
    pub(super) const MAP: u8 = b'{';
    pub(super) const STRUCT: u8 = b'(';
    pub(super) const FIELDS_END: u8 = b'}';
}

struct Canonical<'a, S> {
    sink: &'a mut S,
}

impl<S: Sink> Canonical<'_, S> {
    fn put_str(&mut self, tag: u8, bytes: &[u8]) {
        self.sink.put(&[tag]);
        self.sink.put(&(bytes.len() as u64).to_le_bytes());
        self.sink.put(bytes);
    }

    fn put_int(&mut self, v: i128) {
        self.sink.put(&[tag::INT]);
        self.sink.put(&v.to_le_bytes());
    }

    fn put_variant(&mut self, variant: &str) {
        self.put_str(tag::VARIANT, variant.as_bytes());
    }
}

impl<'a, 'b, S: Sink> ser::Serializer for &'a mut Canonical<'b, S> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = MapEntries<'a, 'b, S>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.sink.put(&[if v { tag::TRUE } else { tag::FALSE }]);
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i128(self, v: i128) -> Result<(), EncodeError> {
        self.put_int(v);
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        self.serialize_i128(v.into())
    }

    fn serialize_u128(self, v: u128) -> Result<(), EncodeError> {
        match i128::try_from(v) {
            Ok(v) => self.put_int(v),
            Err(_) => {
                self.sink.put(&[tag::BIG_UINT]);
                self.sink.put(&v.to_le_bytes());
            }
        }
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        self.serialize_f64(v.into())
    }

    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        // Equal floats hash equal: -0.0 == 0.0, and every NaN is one NaN.
        let v = if v == 0.0 {
            0.0
        } else if v.is_nan() {
            f64::NAN
        } else {
            v
        };
        self.sink.put(&[tag::FLOAT]);
        self.sink.put(&v.to_bits().to_le_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        self.put_str(tag::STR, v.as_bytes());
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        self.put_str(tag::BYTES, v);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), EncodeError> {
        self.sink.put(&[tag::NONE]);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        self.sink.put(&[tag::SOME]);
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.sink.put(&[tag::UNIT]);
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), EncodeError> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.put_variant(variant);
        self.serialize_unit()
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.put_variant(variant);
        value.serialize(self)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, EncodeError> {
        self.sink.put(&[tag::SEQ]);
        Ok(self)
    }

    fn serialize_tuple(self, len: usize) -> Result<Self, EncodeError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, EncodeError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, EncodeError> {
        self.put_variant(variant);
        self.serialize_seq(Some(len))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<MapEntries<'a, 'b, S>, EncodeError> {
        Ok(MapEntries {
            out: self,
            entries: Vec::with_capacity(len.unwrap_or(0)),
            pending_key: None,
        })
    }

    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self, EncodeError> {
        self.sink.put(&[tag::STRUCT]);
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, EncodeError> {
        self.put_variant(variant);
        self.serialize_struct("", len)
    }
}

impl<S: Sink> ser::SerializeSeq for &mut Canonical<'_, S> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        self.sink.put(&[tag::SEQ_END]);
        Ok(())
    }
}

macro_rules! seq_like {
    ($($trait:ident :: $method:ident),*) => {$(
        impl<S: Sink> ser::$trait for &mut Canonical<'_, S> {
            type Ok = ();
            type Error = EncodeError;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
                ser::SerializeSeq::serialize_element(self, value)
            }

            fn end(self) -> Result<(), EncodeError> {
                ser::SerializeSeq::end(self)
            }
        }
    )*};
}
seq_like!(
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl<S: Sink> ser::SerializeStruct for &mut Canonical<'_, S> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.put_str(tag::STR, name.as_bytes());
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        self.sink.put(&[tag::FIELDS_END]);
        Ok(())
    }
}

impl<S: Sink> ser::SerializeStructVariant for &mut Canonical<'_, S> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        ser::SerializeStruct::serialize_field(self, name, value)
    }

    fn end(self) -> Result<(), EncodeError> {
        ser::SerializeStruct::end(self)
    }
}

/// A map's entries, encoded one by one and written sorted when the map ends.
struct MapEntries<'a, 'b, S> {
    out: &'a mut Canonical<'b, S>,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    pending_key: Option<Vec<u8>>,
}

impl<S: Sink> ser::SerializeMap for MapEntries<'_, '_, S> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), EncodeError> {
        let mut buf = Vec::new();
        encode(&mut buf, key)?;
        self.pending_key = Some(buf);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| <EncodeError as ser::Error>::custom("map value without a key"))?;
        let mut buf = Vec::new();
        encode(&mut buf, value)?;
        self.entries.push((key, buf));
        Ok(())
    }

    fn end(mut self) -> Result<(), EncodeError> {
        self.entries.sort_unstable();
        let sink = &mut *self.out.sink;
        sink.put(&[tag::MAP]);
        for (key, value) in &self.entries {
            sink.put(key);
            sink.put(value);
        }
        sink.put(&[tag::FIELDS_END]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::Serialize;

    use super::{Fingerprint, Key};

    fn fp<T: Serialize + ?Sized>(v: &T) -> Fingerprint {
        Fingerprint::of(v).unwrap()
    }

    #[test]
    fn hash_map_insertion_order_does_not_matter() {
        let pairs: Vec<(String, u32)> = (0..200).map(|i| (format!("k{i}"), i)).collect();
        let forward: HashMap<_, _> = pairs.iter().cloned().collect();
        let mut backward = HashMap::with_capacity(7);
        for (k, v) in pairs.iter().rev() {
            backward.insert(k.clone(), *v);
        }
        let sorted: BTreeMap<_, _> = pairs.iter().cloned().collect();
        assert_eq!(fp(&forward), fp(&backward));
        assert_eq!(fp(&forward), fp(&sorted));
    }

    #[test]
    fn nested_maps_are_sorted_too() {
        let inner_a: HashMap<&str, i32> = [("a", 1), ("b", 2)].into_iter().collect();
        let inner_b: HashMap<&str, i32> = [("b", 2), ("a", 1)].into_iter().collect();
        let a: HashMap<u8, _> = [(1, inner_a.clone()), (2, inner_b.clone())]
            .into_iter()
            .collect();
        let b: HashMap<u8, _> = [(2, inner_a), (1, inner_b)].into_iter().collect();
        assert_eq!(fp(&vec![a]), fp(&vec![b]));
    }

    #[test]
    fn different_values_differ() {
        let cases = [
            fp(&1),
            fp(&2),
            fp(&"1"),
            fp(&Some(1)),
            fp(&None::<i32>),
            fp(&()),
            fp(&""),
            fp(&Vec::<u8>::new()),
            fp(&(1, 2)),
            fp(&(2, 1)),
            fp(&[("a", "b")]),
            fp(&("ab", "")),
            fp(&("a", "b")),
            fp(&true),
            fp(&false),
            fp(&1.0),
        ];
        for (i, a) in cases.iter().enumerate() {
            for b in &cases[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn integers_hash_by_value_and_zero_by_sign_free_value() {
        assert_eq!(fp(&5u8), fp(&5i64));
        assert_eq!(fp(&5u128), fp(&5i32));
        assert_ne!(fp(&u128::MAX), fp(&(u128::MAX - 1)));
        assert_eq!(fp(&-0.0f64), fp(&0.0f64));
        assert_eq!(fp(&1.5f32), fp(&1.5f64));
    }

    #[test]
    fn strings_hash_by_content_not_type() {
        assert_eq!(fp("abc"), fp(&String::from("abc")));
        assert_eq!(fp(&'a'), fp("a"));
    }

    #[test]
    fn struct_fields_and_variants_count() {
        #[derive(Serialize)]
        struct A {
            x: u32,
        }
        #[derive(Serialize)]
        struct B {
            y: u32,
        }
        #[derive(Serialize)]
        enum E {
            One(u32),
            Two(u32),
        }
        assert_ne!(fp(&A { x: 1 }), fp(&B { y: 1 }));
        assert_ne!(fp(&E::One(1)), fp(&E::Two(1)));
    }

    #[test]
    fn scope_and_name_separate_keys() {
        let plain = Key::new("op", &"k").unwrap();
        assert_ne!(plain, Key::new("op2", &"k").unwrap());
        assert_ne!(plain, Key::scoped("op", &"tenant", &"k").unwrap());
        assert_ne!(
            Key::scoped("op", &"t1", &"k").unwrap(),
            Key::scoped("op", &"t2", &"k").unwrap()
        );
        // Name and value boundaries cannot be shifted.
        assert_ne!(Key::new("ab", &"c").unwrap(), Key::new("a", &"bc").unwrap());
    }

    #[test]
    fn a_failing_serialize_is_an_encode_error() {
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no way"))
            }
        }
        let err = Key::new("op", &Bad).unwrap_err();
        assert!(err.to_string().contains("no way"), "{err}");
    }

    #[test]
    fn fingerprinter_agrees_with_a_tuple() {
        let mut parts = super::Fingerprinter::new();
        parts.argument(&"a");
        parts.argument(&7_u8);
        assert_eq!(parts.finish().unwrap(), fp(&("a", 7)));
        assert_eq!(
            super::Fingerprinter::new().finish().unwrap(),
            fp(&[0_u8; 0])
        );
    }

    #[test]
    fn store_key_carries_a_hash_tag_and_no_user_bytes() {
        let key = Key::new("op", &"secret-customer-id").unwrap();
        let stored = key.to_store_key("idem");
        assert!(!stored.contains("secret"));
        assert_eq!(stored, format!("idem:{{{key}}}"));
    }
}
