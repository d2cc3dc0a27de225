#![deny(unused_qualifications)]

use idem_core::idempotent;

// The body is the user's: its lints are the user's to allow.
#[idempotent(key = id)]
async fn count(id: u64) -> Result<usize, idem_core::Error> {
    let items: Vec<u8> = std::vec::Vec::new();
    Ok(items.len() + usize::from(id > 0))
}

fn main() {}
