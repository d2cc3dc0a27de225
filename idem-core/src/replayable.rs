//! A result that knows whether it was replayed.

use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that remembers whether it came from the store (a replay) or from
/// running the body (a first run).
///
/// It serializes exactly as the value it wraps, so it is stored like any other
/// result. A freshly made one ([`Replayable::new`]) is not a replay; one read
/// back from the store is. Return it from an `#[idempotent]` fn to tell
/// replays apart, e.g. to mark them with an `Idempotent-Replayed` header
/// (with the `axum` feature it does so by itself as a response).
///
/// ```
/// use idem_core::{idempotent, Replayable};
///
/// # #[derive(Debug)] struct Error;
/// # impl From<idem_core::Error> for Error { fn from(_: idem_core::Error) -> Self { Error } }
/// #[idempotent(key = id)]
/// async fn ship(id: u64) -> Result<Replayable<String>, Error> {
///     Ok(Replayable::new(format!("parcel {id}")))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let first = ship(7).await?;
/// let retry = ship(7).await?;
/// assert!(!first.is_replay() && retry.is_replay());
/// assert_eq!(*first, *retry);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Replayable<T> {
    value: T,
    replayed: bool,
}

impl<T> Replayable<T> {
    /// A value from a first run.
    pub const fn new(value: T) -> Self {
        Self {
            value,
            replayed: false,
        }
    }

    /// Whether the value was read back from the store.
    pub const fn is_replay(&self) -> bool {
        self.replayed
    }

    /// Transforms the value, keeping whether it was replayed; e.g.
    /// `receipt.map(Json)` in an HTTP handler.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Replayable<U> {
        Replayable {
            value: f(self.value),
            replayed: self.replayed,
        }
    }

    /// The value.
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> From<T> for Replayable<T> {
    fn from(value: T) -> Self {
        Self::new(value)
    }
}

impl<T> Deref for Replayable<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Replayable<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T: Serialize> Serialize for Replayable<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Replayable<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self {
            value: T::deserialize(deserializer)?,
            replayed: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Replayable;

    #[test]
    fn serializes_as_its_value_and_reads_back_as_a_replay() {
        let fresh = Replayable::new(vec![1, 2]);
        let json = serde_json::to_string(&fresh).unwrap();
        assert_eq!(json, "[1,2]");
        let back: Replayable<Vec<u8>> = serde_json::from_str(&json).unwrap();
        assert!(back.is_replay() && !fresh.is_replay());
        assert_eq!(back.into_inner(), vec![1, 2]);
    }
}
