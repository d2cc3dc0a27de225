use idem_core::idempotent;

#[derive(Debug)]
struct Error;

impl From<idem_core::Error> for Error {
    fn from(_: idem_core::Error) -> Self {
        Error
    }
}

struct Pool;
struct Client;

#[idempotent(key = id, skip(pool), skip(client))]
async fn charge(pool: &Pool, client: &Client, id: u64) -> Result<u64, Error> {
    let _ = (pool, client);
    Ok(id)
}

fn main() {}
