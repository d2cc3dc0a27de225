//! Keys and fingerprints: what a call is stored under, and what it was called
//! with.
//!
//! Both are SHA-256 digests of the [canonical encoding](crate::canonical) of
//! `Serialize` values, so equal values always hash equal. User bytes never
//! reach a store: a store sees only the digest.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde::Serialize;
use serde::ser;
use sha2::{Digest as _, Sha256};

use crate::canonical::{hash, tag};

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
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key([u8; 32]);

/// A key is a SHA-256 digest already: eight of its bytes are hash enough.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes([
            self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5], self.0[6], self.0[7],
        ]));
    }
}

/// Hashes a [`Key`] for in-process maps: its hash is eight of its digest's
/// bytes, kept as they are.
pub(crate) type DigestHasher = BuildHasherDefault<Digest64>;

/// The hasher behind [`DigestHasher`].
#[derive(Default)]
pub(crate) struct Digest64(u64);

impl Hasher for Digest64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

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

/// The first bytes of a key's digest, shown in hex.
struct ShortHash([u8; 6]);

impl fmt::Display for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

/// What keys hash first: separates them from fingerprints, and names the
/// encoding's version (2: varint lengths and integers). Two bytes, so that a
/// typical key (a name and a UUID) fits one SHA-256 block.
const KEY_DOMAIN: &[u8] = b"k2";
/// What fingerprints hash first; see [`KEY_DOMAIN`].
const FINGERPRINT_DOMAIN: &[u8] = b"f2";

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

    /// The key's short hash, as the `idem.call` span's `key` field shows it:
    /// the first 6 bytes of its digest, in hex (events print the whole
    /// digest, `Display`, which starts with it). It says which key without
    /// saying what the key or the arguments were.
    ///
    /// ```
    /// let key = idem_core::Key::new("op", &1)?;
    /// assert_eq!(key.short().to_string().len(), 12);
    /// assert!(key.to_string().starts_with(&key.short().to_string()));
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    #[must_use]
    pub fn short(&self) -> impl fmt::Display + use<> {
        ShortHash([
            self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5],
        ])
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
        // One allocation of the exact length: every store operation builds
        // one.
        let hex = hex_digits(&self.0);
        let mut stored = String::with_capacity(prefix.len() + ":{}".len() + hex.len());
        stored.push_str(prefix);
        stored.push_str(":{");
        stored.push_str(std::str::from_utf8(&hex).unwrap_or_default());
        stored.push('}');
        stored
    }
}

impl Fingerprint {
    /// The fingerprint used when arguments are not checked
    /// (`fingerprint = false`; a fn pinned to a name whose instance has
    /// generic arguments of its `Self` type or trait uses that instance's
    /// instead): every call made with it matches every other made with it. It is a fingerprint like others to the stores: a
    /// record written with a checked fingerprint and a call with this one
    /// (or the reverse) are [`Error::KeyReused`](crate::Error::KeyReused),
    /// so turning checks off for a function that has records takes effect
    /// for its keys as their records expire.
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

    /// The fingerprint's short hash: the first 6 bytes of its digest, in
    /// hex. It says which arguments without saying what they were.
    ///
    /// ```
    /// let fingerprint = idem_core::Fingerprint::of(&(7, "order"))?;
    /// assert_eq!(fingerprint.short().to_string().len(), 12);
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    #[must_use]
    pub fn short(&self) -> impl fmt::Display + use<> {
        ShortHash([
            self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5],
        ])
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
        let (head, len) = crate::canonical::header(tag::STR, name.len() as u128);
        hasher.update(&head[..len]);
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

    /// Starts a key value that is a tuple, given element by element with
    /// [`value_element`](Self::value_element) and closed with
    /// [`value_tuple_end`](Self::value_tuple_end): the key is the one of the
    /// whole tuple.
    pub(crate) fn value_tuple(&mut self) {
        if !self.scoped {
            self.hasher.update([0]);
        }
        self.hasher.update([tag::SEQ]);
    }

    /// Adds the next element of a tuple key value.
    pub(crate) fn value_element<K: Serialize + ?Sized>(&mut self, element: &K) {
        if let Err(e) = hash(&mut self.hasher, element) {
            self.error.get_or_insert(crate::Error::encode("key", e));
        }
    }

    /// Closes a tuple key value.
    pub(crate) fn value_tuple_end(&mut self) {
        self.hasher.update([tag::SEQ_END]);
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

/// A digest's 64 lowercase hex digits, on the stack: what keys and
/// fingerprints display as, and what a store key holds.
fn hex_digits(digest: &[u8; 32]) -> [u8; 64] {
    let mut hex = [0u8; 64];
    // Cannot fail: the buffer is exactly twice the digest's length.
    let _ = hex::encode_to_slice(digest, &mut hex);
    hex
}

macro_rules! hex_formatting {
    ($($ty:ident),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(std::str::from_utf8(&hex_digits(&self.0)).map_err(|_| fmt::Error)?)
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

    /// Inserts `0..n` forwards and backwards into two sets of type `S`, which
    /// then iterate in different orders.
    fn two_orders<S: Default + Extend<u32>>(n: u32) -> (S, S) {
        let (mut forward, mut backward) = (S::default(), S::default());
        forward.extend(0..n);
        backward.extend((0..n).rev());
        (forward, backward)
    }

    #[test]
    fn equal_sets_fingerprint_equal_in_any_order() {
        #[derive(Serialize)]
        struct Nested<S> {
            set: S,
            list: Vec<S>,
            map: BTreeMap<u8, S>,
        }
        fn check<S: Serialize + Default + Extend<u32> + Clone>() {
            let (a, b) = two_orders::<S>(200);
            assert_eq!(fp(&a), fp(&b), "{}", std::any::type_name::<S>());
            let nest = |s: &S| Nested {
                set: s.clone(),
                list: vec![s.clone(), s.clone()],
                map: [(1, s.clone())].into(),
            };
            assert_eq!(fp(&nest(&a)), fp(&nest(&b)));
            assert_eq!(fp(&(&a, 1)), fp(&(&b, 1)));
        }
        check::<std::collections::HashSet<u32>>();
        check::<hashbrown::HashSet<u32>>();
        check::<indexmap::IndexSet<u32>>();
        let (a, b) = two_orders::<std::collections::HashSet<u32>>(200);
        assert_ne!(
            a.iter().collect::<Vec<_>>(),
            b.iter().collect::<Vec<_>>(),
            "the sets really iterate in different orders"
        );
    }

    #[test]
    fn sets_differ_by_content_and_sequences_by_order() {
        let (a, _) = two_orders::<std::collections::HashSet<u32>>(10);
        let (c, _) = two_orders::<std::collections::HashSet<u32>>(11);
        assert_ne!(fp(&a), fp(&c));
        assert_ne!(
            fp(&vec![1, 2, 3]),
            fp(&vec![3, 2, 1]),
            "a Vec's order counts"
        );
    }

    /// The documented limit: a hand-written `Serialize` that writes a hash
    /// set as a plain sequence, unsorted, is not recognised.
    #[test]
    fn a_hand_written_unsorted_sequence_is_not_recognised() {
        struct Bag(std::collections::HashSet<u32>);
        impl Serialize for Bag {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq as _;
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for item in &self.0 {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
        let (a, b) = two_orders(200);
        assert_ne!(fp(&Bag(a)), fp(&Bag(b)));
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
    fn a_tuple_key_given_element_by_element_is_the_tuples_key() {
        for scope in [None, Some("tenant")] {
            let whole = {
                let mut hasher = super::KeyHasher::new("op");
                if let Some(scope) = scope {
                    hasher.scope(scope);
                }
                hasher.value(&("order", 7_u32));
                hasher.finish().unwrap()
            };
            let parts = {
                let mut hasher = super::KeyHasher::new("op");
                if let Some(scope) = scope {
                    hasher.scope(scope);
                }
                hasher.value_tuple();
                hasher.value_element("order");
                hasher.value_element(&7_u32);
                hasher.value_tuple_end();
                hasher.finish().unwrap()
            };
            assert_eq!(whole, parts);
        }
    }

    #[test]
    fn store_key_carries_a_hash_tag_and_no_user_bytes() {
        let key = Key::new("op", &"secret-customer-id").unwrap();
        let stored = key.to_store_key("idem");
        assert!(!stored.contains("secret"));
        assert_eq!(stored, format!("idem:{{{key}}}"));
    }
}
