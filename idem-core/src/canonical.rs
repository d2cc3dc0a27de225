//! The canonical encoding that keys and fingerprints hash.
//!
//! A small tagged binary format, written straight into a hasher by a serde
//! `Serializer`, in which equal values always encode equal:
//!
//! - one tag byte starts every value, so the encoding is self-delimiting;
//!   sequences and maps need no length prefix, only an end tag; strings and
//!   bytes carry their length as a LEB128 varint (one byte up to 127);
//! - integers encode by value whatever their width (`5u8` and `5i64` are
//!   equal), as a zigzag varint, `-0.0` as `0.0`, every NaN as one NaN;
//! - map entries are encoded one by one and written sorted, so a `HashMap`
//!   encodes the same whatever its iteration order; so are the elements of
//!   unordered sets (`HashSet`, hashbrown's, `IndexSet`), told by their type
//!   name because serde hands them over as plain sequences. A `Vec`'s order
//!   counts. A hand-written `Serialize` that writes an unordered collection
//!   with `serialize_seq` is not recognised: it must sort what it writes;
//! - struct and enum *type* names are left out, as in JSON; a struct's field
//!   names (and which fields serde skipped) are folded into one 64-bit digest
//!   at its end, so that structs of other types with equal values still
//!   differ, without hashing every name; variant names and map keys are kept.
//!
//! Only map entries and set elements are buffered; everything else goes to
//! the hasher through a small stack buffer.

use std::fmt;

use serde::Serialize;
use serde::ser;
use sha2::{Digest as _, Sha256};

/// Writes the canonical encoding of `value` into `hasher`.
pub(crate) fn hash<T: Serialize + ?Sized>(
    hasher: &mut Sha256,
    value: &T,
) -> Result<(), EncodeError> {
    encode(&mut Buffered::new(hasher), value)
}

/// Writes the canonical encoding of `value` into `sink`.
fn encode<S: Sink, T: Serialize + ?Sized>(sink: &mut S, value: &T) -> Result<(), EncodeError> {
    value.serialize(&mut Canonical { sink })
}

/// Where canonical bytes go: a hasher, or a buffer for a map entry.
trait Sink {
    fn put(&mut self, bytes: &[u8]);

    /// One byte: a tag.
    fn put_byte(&mut self, byte: u8) {
        self.put(&[byte]);
    }
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

impl Buffered<'_> {
    /// Makes room for `n` more bytes, flushing the buffer into the hasher;
    /// `false` when `n` is more than the buffer holds at all.
    #[inline]
    fn room(&mut self, n: usize) -> bool {
        if self.len + n > self.buf.len() {
            self.hasher.update(&self.buf[..self.len]);
            self.len = 0;
        }
        n <= self.buf.len()
    }
}

impl Sink for Buffered<'_> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        if !self.room(bytes.len()) {
            self.hasher.update(bytes);
            return;
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    #[inline]
    fn put_byte(&mut self, byte: u8) {
        self.room(1);
        self.buf[self.len] = byte;
        self.len += 1;
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

    fn put_byte(&mut self, byte: u8) {
        self.push(byte);
    }
}

/// Whether a type, by its name, is a set whose iteration order is not part of
/// its value: std's and hashbrown's `HashSet` (and sets named like them, such
/// as `AHashSet` or `FxHashSet`) and indexmap's `IndexSet`, whose equality
/// ignores order. `BTreeSet` iterates in order already.
fn is_unordered_set(type_name: &str) -> bool {
    let name = type_name.trim_start_matches('&').trim_start_matches("mut ");
    let path = name.split('<').next().unwrap_or(name);
    let last = path.rsplit("::").next().unwrap_or(path);
    last.ends_with("HashSet") || last == "IndexSet"
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
pub(crate) mod tag {
    pub(crate) const FALSE: u8 = b'0';
    pub(crate) const TRUE: u8 = b'1';
    pub(crate) const INT: u8 = b'i';
    pub(crate) const BIG_UINT: u8 = b'U';
    pub(crate) const FLOAT: u8 = b'f';
    pub(crate) const STR: u8 = b's';
    pub(crate) const BYTES: u8 = b'y';
    pub(crate) const NONE: u8 = b'n';
    pub(crate) const SOME: u8 = b'?';
    pub(crate) const UNIT: u8 = b'u';
    pub(crate) const VARIANT: u8 = b'e';
    pub(crate) const SEQ: u8 = b'[';
    pub(crate) const SEQ_END: u8 = b']';
    pub(crate) const MAP: u8 = b'{';
    pub(crate) const STRUCT: u8 = b'(';
    pub(crate) const FIELDS_END: u8 = b'}';
}

struct Canonical<'a, S> {
    sink: &'a mut S,
}

/// `tag` followed by `n` as a LEB128 varint: 7 bits a byte, low bits first,
/// the high bit set on every byte but the last. Written as one slice.
#[inline]
pub(crate) fn header(tag: u8, mut n: u128) -> ([u8; 20], usize) {
    let mut out = [0; 20];
    out[0] = tag;
    if n < 0x80 {
        out[1] = n as u8;
        return (out, 2);
    }
    let mut len = 1;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out[len] = byte;
            return (out, len + 1);
        }
        out[len] = byte | 0x80;
        len += 1;
    }
}

impl<S: Sink> Canonical<'_, S> {
    /// A tag, the length as a varint, and the bytes.
    #[inline]
    fn put_str(&mut self, tag: u8, bytes: &[u8]) {
        if let Ok(len @ 0..0x80) = u8::try_from(bytes.len()) {
            self.sink.put_byte(tag);
            self.sink.put_byte(len);
        } else {
            let (head, len) = header(tag, bytes.len() as u128);
            self.sink.put(&head[..len]);
        }
        self.sink.put(bytes);
    }

    /// An integer of any width, by value: the tag and its zigzag varint
    /// (`0, -1, 1, -2, …` as `0, 1, 2, 3, …`), so that small magnitudes of
    /// either sign take one byte.
    fn put_int(&mut self, v: i128) {
        let zigzag = ((v << 1) ^ (v >> 127)).cast_unsigned();
        let (head, len) = header(tag::INT, zigzag);
        self.sink.put(&head[..len]);
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
    type SerializeStruct = StructFields<'a, 'b, S>;
    type SerializeStructVariant = StructFields<'a, 'b, S>;

    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.sink.put_byte(if v { tag::TRUE } else { tag::FALSE });
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
                self.sink.put_byte(tag::BIG_UINT);
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
        self.sink.put_byte(tag::FLOAT);
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
        self.sink.put_byte(tag::NONE);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        self.sink.put_byte(tag::SOME);
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.sink.put_byte(tag::UNIT);
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

    /// Sequences of unordered sets are written sorted, like map entries, so
    /// that equal sets encode equal whatever their iteration order. serde
    /// hands a set to the serializer as a plain sequence, so the set is told
    /// by its type: the collection `collect_seq` is given.
    fn collect_seq<I>(self, iter: I) -> Result<(), EncodeError>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        if !is_unordered_set(std::any::type_name::<I>()) {
            self.sink.put_byte(tag::SEQ);
            for item in iter {
                item.serialize(&mut *self)?;
            }
            self.sink.put_byte(tag::SEQ_END);
            return Ok(());
        }
        let mut items: Vec<Vec<u8>> = Vec::new();
        for item in iter {
            let mut buf = Vec::new();
            encode(&mut buf, &item)?;
            items.push(buf);
        }
        items.sort_unstable();
        self.sink.put_byte(tag::SEQ);
        for item in &items {
            self.sink.put(item);
        }
        self.sink.put_byte(tag::SEQ_END);
        Ok(())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, EncodeError> {
        self.sink.put_byte(tag::SEQ);
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

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<StructFields<'a, 'b, S>, EncodeError> {
        self.sink.put_byte(tag::STRUCT);
        Ok(StructFields {
            out: self,
            names: NAMES_SEED,
        })
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<StructFields<'a, 'b, S>, EncodeError> {
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
        self.sink.put_byte(tag::SEQ_END);
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

/// A struct's fields: their values go to the hash as they come; their names
/// (and which ones serde skipped) are folded into a 64-bit digest written
/// once at the struct's end. A struct of another type with equal values thus
/// still encodes differently, for 8 bytes instead of every name's bytes: the
/// names are the type's, not data, so a fast non-cryptographic mix suffices.
pub(crate) struct StructFields<'a, 'b, S> {
    out: &'a mut Canonical<'b, S>,
    names: u64,
}

const NAMES_SEED: u64 = 0x243f_6a88_85a3_08d3;

/// Folds `name` (and a marker telling a field from a skipped one) into
/// `names`, 8 bytes at a time.
fn fold_name(names: u64, marker: u64, name: &str) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let mut h = mix(names, marker ^ name.len() as u64);
    let mut chunks = name.as_bytes().chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(word));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(word));
    }
    h
}

impl<S: Sink> ser::SerializeStruct for StructFields<'_, '_, S> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.names = fold_name(self.names, 1, name);
        value.serialize(&mut *self.out)
    }

    fn skip_field(&mut self, name: &'static str) -> Result<(), EncodeError> {
        self.names = fold_name(self.names, 2, name);
        Ok(())
    }

    fn end(self) -> Result<(), EncodeError> {
        self.out.sink.put_byte(tag::FIELDS_END);
        self.out.sink.put(&self.names.to_le_bytes());
        Ok(())
    }
}

impl<S: Sink> ser::SerializeStructVariant for StructFields<'_, '_, S> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        ser::SerializeStruct::serialize_field(self, name, value)
    }

    fn skip_field(&mut self, name: &'static str) -> Result<(), EncodeError> {
        ser::SerializeStruct::skip_field(self, name)
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
        sink.put_byte(tag::MAP);
        for (key, value) in &self.entries {
            sink.put(key);
            sink.put(value);
        }
        sink.put_byte(tag::FIELDS_END);
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn encoded<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, value).unwrap();
        out
    }

    #[test]
    fn lengths_and_integers_are_varints() {
        assert_eq!(encoded("ab"), [tag::STR, 2, b'a', b'b']);
        let long = "x".repeat(300);
        assert_eq!(encoded(long.as_str())[..3], [tag::STR, 0xac, 0x02]);
        assert_eq!(encoded(&0u8), [tag::INT, 0]);
        assert_eq!(encoded(&-1i64), [tag::INT, 1]);
        assert_eq!(encoded(&1u64), [tag::INT, 2]);
        assert_eq!(encoded(&300u16), [tag::INT, 0xd8, 0x04]);
        assert_eq!(encoded(&i128::MIN).len(), 1 + 19);
        assert_eq!(encoded(&u128::MAX)[0], tag::BIG_UINT);
    }

    #[test]
    fn struct_names_are_one_digest_and_skipped_fields_count() {
        #[derive(Serialize)]
        struct Order {
            id: u64,
            note: &'static str,
        }
        #[derive(Serialize)]
        struct Optional {
            #[serde(skip_serializing_if = "Option::is_none")]
            a: Option<u8>,
            #[serde(skip_serializing_if = "Option::is_none")]
            b: Option<u8>,
        }
        let order = encoded(&Order { id: 7, note: "x" });
        assert_eq!(
            order[..7],
            [
                tag::STRUCT,
                tag::INT,
                14,
                tag::STR,
                1,
                b'x',
                tag::FIELDS_END
            ]
        );
        assert_eq!(order.len(), 7 + 8, "the names' digest closes the struct");
        assert_ne!(
            encoded(&Optional {
                a: Some(1),
                b: None
            }),
            encoded(&Optional {
                a: None,
                b: Some(1)
            }),
            "which field a value belongs to is kept when others are skipped"
        );
    }

    #[test]
    fn equal_values_of_other_widths_encode_equal_and_others_differ() {
        assert_eq!(encoded(&5u8), encoded(&5i64));
        assert_eq!(encoded(&-7i8), encoded(&-7i128));
        assert_ne!(encoded(&5u8), encoded(&-5i8));
        assert_ne!(
            encoded(&(i128::MAX as u128)),
            encoded(&(i128::MAX as u128 + 1))
        );
        // Prefix-free: a string's length keeps ("ab", "c") from ("a", "bc").
        assert_ne!(encoded(&("ab", "c")), encoded(&("a", "bc")));
    }
}
