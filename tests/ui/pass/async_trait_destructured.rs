//! In an `#[async_trait]` method, `key` and `scope` may name the bindings
//! of a destructured argument, as in a plain `async fn`.

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
}
