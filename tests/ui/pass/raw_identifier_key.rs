use idem_core::{Error, Idempotency, idempotent};

// A key and a scope written as raw identifiers, also fingerprinted.
#[idempotent(name = "ui.raw", key = r#type, scope = r#ref, store = idem, skip(idem))]
async fn classify(idem: &Idempotency, r#ref: u64, r#type: u64) -> Result<u64, Error> {
    Ok(r#ref + r#type)
}

fn main() {
    let _ = classify;
}
