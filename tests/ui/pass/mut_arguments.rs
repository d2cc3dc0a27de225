//! `mut` arguments taken by value move into the body whole, as into an
//! `async fn`'s future: a field assigned and not read again (a connection
//! dropped before the slow part) is no dead assignment.

#![deny(warnings)]

use idem_core::{Idempotency, idempotent};
use serde::Serialize;

struct Connection;

struct Session {
    idem: Idempotency,
    conn: Option<Connection>,
}

#[derive(Serialize)]
struct Request {
    id: u64,
    note: String,
}

impl Session {
    #[idempotent(key = id, store = self.idem)]
    async fn close(mut self, id: u64) -> Result<u64, idem_core::Error> {
        self.conn = None; // release the connection before the slow part
        tokio::task::yield_now().await;
        Ok(id)
    }
}

#[idempotent(key = request.id)]
async fn annotate(mut request: Request) -> Result<u64, idem_core::Error> {
    request.note = String::new();
    tokio::task::yield_now().await;
    Ok(request.id)
}

// A `mut` argument compiled out, and one compiled in.
#[idempotent(key = id)]
async fn configured(
    id: u64,
    #[cfg(any())] mut extra: u32,
    #[cfg(all())] mut count: u32,
) -> Result<u64, idem_core::Error> {
    #[cfg(any())]
    {
        extra += 1;
    }
    count += 1;
    Ok(id + u64::from(count))
}

fn main() {
    let session = Session {
        idem: Idempotency::memory(),
        conn: Some(Connection),
    };
    let _ = session.close(1);
    let _ = configured(1, 2);
    let _ = annotate(Request {
        id: 1,
        note: "n".to_owned(),
    });
}
