use idem_core::idempotent;

struct Tenant(u64);

// The scope is also a fingerprinted argument: one error, as the scope.
#[idempotent(key = order, scope = tenant)]
async fn charge(tenant: Tenant, order: u64) -> Result<u64, String> {
    Ok(tenant.0 + order)
}

fn main() {}
