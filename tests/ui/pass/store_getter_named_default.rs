use idem_core::{Idempotency, idempotent};

/// Handles by purpose; `default` is a getter here, not a constructor.
struct Registry {
    idem: Idempotency,
}

impl Registry {
    fn default(&self) -> &Idempotency {
        &self.idem
    }
}

struct Service {
    registry: Registry,
}

impl Service {
    #[idempotent(key = id, store = self.registry.default())]
    async fn handle(&self, id: u64) -> Result<u64, String> {
        Ok(id)
    }
}

fn main() {
    let service = Service {
        registry: Registry {
            idem: Idempotency::memory(),
        },
    };
    let _ = service.handle(1);
}
