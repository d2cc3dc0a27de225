//! In an `#[async_trait]` method, `key` and `scope` may name the bindings
//! of a destructured argument, as in a plain `async fn`, whatever the
//! pattern says of how it binds (`mut`, `ref`, `&`).

#![deny(warnings)]

use idem_core::{Idempotency, idempotent};
use serde::Serialize;

#[derive(Serialize)]
struct Request {
    id: u64,
    tenant: String,
    amount: u64,
}

#[async_trait::async_trait]
trait Shapes {
    async fn pair(&self, pair: (u32, u32)) -> Result<u32, idem_core::Error>;
    async fn charge(&self, request: Request) -> Result<u64, idem_core::Error>;
    async fn counted(&self, pair: (u32, String)) -> Result<usize, idem_core::Error>;
    async fn borrowed(&self, pair: (&'static u32, u32)) -> Result<u32, idem_core::Error>;
    async fn named(&self, request: Request) -> Result<u64, idem_core::Error>;
    async fn nested(
        &self,
        id: u64,
        pair: (u32, &'static (u32, u32)),
    ) -> Result<u64, idem_core::Error>;
    async fn inner(&self, pair: (u32, &'static (u32, u32))) -> Result<u32, idem_core::Error>;
}

struct Service {
    idem: Idempotency,
}

#[async_trait::async_trait]
impl Shapes for Service {
    #[idempotent(key = a, store = self.idem)]
    async fn pair(&self, (a, b): (u32, u32)) -> Result<u32, idem_core::Error> {
        Ok(a + b)
    }

    #[idempotent(key = id, scope = tenant, store = self.idem)]
    async fn charge(
        &self,
        Request { id, tenant, amount }: Request,
    ) -> Result<u64, idem_core::Error> {
        let _ = tenant;
        Ok(id + amount)
    }

    #[idempotent(key = a, scope = name, store = self.idem)]
    async fn counted(
        &self,
        (mut a, ref name): (u32, String),
    ) -> Result<usize, idem_core::Error> {
        a += 1;
        Ok(name.len() + a as usize)
    }

    #[idempotent(key = a, store = self.idem)]
    async fn borrowed(
        &self,
        (&a, b): (&'static u32, u32),
    ) -> Result<u32, idem_core::Error> {
        Ok(a + b)
    }

    #[idempotent(key = id, scope = tenant, store = self.idem)]
    async fn named(
        &self,
        Request {
            id,
            ref tenant,
            mut amount,
        }: Request,
    ) -> Result<u64, idem_core::Error> {
        amount += tenant.len() as u64;
        Ok(id + amount)
    }

    // A pattern under a reference (`(a, b)` of a `&(u32, u32)`) beside a
    // `mut` binding, whether the key names its bindings or not.
    #[idempotent(key = id, store = self.idem)]
    async fn nested(
        &self,
        id: u64,
        (mut n, (a, b)): (u32, &'static (u32, u32)),
    ) -> Result<u64, idem_core::Error> {
        n += a + b;
        Ok(id + u64::from(n))
    }

    #[idempotent(key = b, store = self.idem)]
    async fn inner(
        &self,
        (mut n, &(a, b)): (u32, &'static (u32, u32)),
    ) -> Result<u32, idem_core::Error> {
        n += a;
        Ok(n + b)
    }
}

fn main() {
    let service = Service {
        idem: Idempotency::memory(),
    };
    let _ = service.pair((1, 2));
    let _ = service.charge(Request {
        id: 1,
        tenant: "t".to_owned(),
        amount: 2,
    });
    let _ = service.counted((1, "n".to_owned()));
    let _ = service.borrowed((&1, 2));
    let _ = service.named(Request {
        id: 1,
        tenant: "t".to_owned(),
        amount: 2,
    });
    let _ = service.nested(1, (2, &(3, 4)));
    let _ = service.inner((2, &(3, 4)));
}
