//! Valid shapes compile, without a warning: `&mut self` methods whose body
//! uses `self` mutably, a handle cloned in `store = …`, generic impls, trait
//! default methods and `#[async_trait]` methods whose arguments only the
//! attribute uses.

#![deny(warnings)]

use std::marker::PhantomData;

use idem_core::{Idempotency, idempotent};

struct Counter {
    idem: Idempotency,
    count: u32,
}

impl Counter {
    fn bump(&mut self) -> u32 {
        self.count += 1;
        self.count
    }

    /// A `&mut self` body that calls another `&mut self` method.
    #[idempotent(key = id, store = self.idem)]
    async fn add(&mut self, id: u64) -> Result<u32, String> {
        Ok(self.bump())
    }

    /// The handle cloned in the argument.
    #[idempotent(key = id, store = self.idem.clone())]
    async fn add_again(&mut self, id: u64) -> Result<u32, String> {
        self.count += 2;
        Ok(self.bump())
    }
}

struct Repo<T> {
    idem: Idempotency,
    rows: PhantomData<T>,
}

impl<T: serde::Serialize + serde::de::DeserializeOwned + Default + Send> Repo<T> {
    #[idempotent(key = id, store = self.idem)]
    async fn create(&self, id: u64) -> Result<T, String> {
        Ok(T::default())
    }

    #[idempotent(key = id, store = idem, skip(idem))]
    async fn create_with(idem: &Idempotency, id: u64) -> Result<T, String> {
        Ok(T::default())
    }
}

trait Ledger {
    fn idem(&self) -> &Idempotency;

    #[idempotent(key = amount, store = self.idem())]
    async fn record(&self, amount: u64) -> Result<String, String> {
        Ok(format!("{amount}"))
    }
}

#[async_trait::async_trait]
trait Mailer {
    async fn send(&self, key: String, to: String) -> Result<u32, String>;
}

struct Smtp {
    idem: Idempotency,
}

#[async_trait::async_trait]
impl Mailer for Smtp {
    /// `key` is used by the attribute only.
    #[idempotent(key = key, store = self.idem)]
    async fn send(&self, key: String, to: String) -> Result<u32, String> {
        Ok(u32::try_from(to.len()).unwrap_or(u32::MAX))
    }
}

#[idempotent(key = id)]
async fn generic<T: serde::Serialize + Send + Sync>(id: u64, value: T) -> Result<u64, String> {
    let _ = &value;
    Ok(id)
}

fn main() {
    let _ = Counter::add;
    let _ = Counter::add_again;
    let _ = Repo::<u8>::create;
    let _ = Repo::<u8>::create_with;
    let _ = <Smtp as Mailer>::send;
    let _ = generic::<u8>;
    let _ = |ledger: &dyn Fn() -> Idempotency| ledger();
    struct L(Idempotency);
    impl Ledger for L {
        fn idem(&self) -> &Idempotency {
            &self.0
        }
    }
    let _ = L::record;
    let _ = Smtp {
        idem: Idempotency::memory(),
    };
    let _ = Counter {
        idem: Idempotency::memory(),
        count: 0,
    };
}
