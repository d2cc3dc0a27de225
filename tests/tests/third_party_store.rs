//! A store written outside idem, from scratch on a `Mutex<HashMap>`, proves
//! itself with the conformance kit in one line, as a backend in another crate
//! would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use idem_core::HeldClaim;
use idem_core::store::{Begin, Completion, Inspection, Record, Store, StoreFuture, Token};
use idem_core::{Fingerprint, Key};
use idem_test::conformance::{Backend, Timing};
use tokio::time::Instant;

/// What one key holds.
enum Entry {
    Claimed {
        token: Token,
        fingerprint: Fingerprint,
        until: Instant,
        since: Instant,
    },
    Completed {
        token: Token,
        fingerprint: Fingerprint,
        record: Record,
        until: Instant,
        since: Instant,
    },
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Self::Claimed { until, .. } | Self::Completed { until, .. } => *until,
        }
    }
}

/// The simplest correct store: one lock over a map, on tokio's clock.
#[derive(Default)]
struct TableStore(Mutex<HashMap<Key, Entry>>);

impl TableStore {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<Key, Entry>, Instant) -> T) -> T {
        let mut table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        table.retain(|_, entry| entry.until() > now);
        f(&mut table, now)
    }
}

impl Store for TableStore {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        let begin = self.with(|table, now| match table.get_mut(&key) {
            None => {
                let until = now + lease;
                table.insert(
                    key,
                    Entry::Claimed {
                        token,
                        fingerprint,
                        until,
                        since: now,
                    },
                );
                Begin::Claimed
            }
            Some(
                Entry::Claimed {
                    fingerprint: held, ..
                }
                | Entry::Completed {
                    fingerprint: held, ..
                },
            ) if *held != fingerprint => Begin::Mismatch,
            Some(Entry::Completed { record, .. }) => Begin::Completed(record.clone()),
            Some(Entry::Claimed {
                token: holder,
                until,
                ..
            }) if *holder == token => {
                *until = now + lease;
                Begin::Claimed
            }
            Some(Entry::Claimed { until, .. }) => Begin::InProgress {
                retry_after: *until - now,
            },
        });
        Box::pin(std::future::ready(Ok(begin)))
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        let completion = self.with(|table, now| match table.get(&key) {
            Some(Entry::Claimed {
                token: holder,
                fingerprint,
                ..
            }) if *holder == token => {
                let fingerprint = *fingerprint;
                table.insert(
                    key,
                    Entry::Completed {
                        token,
                        fingerprint,
                        record,
                        until: now + ttl,
                        since: now,
                    },
                );
                Completion::Stored
            }
            Some(Entry::Completed { token: holder, .. }) if *holder == token => Completion::Stored,
            _ => Completion::Lost,
        });
        Box::pin(std::future::ready(Ok(completion)))
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.with(|table, _| {
            if matches!(table.get(&key), Some(Entry::Claimed { token: holder, .. }) if *holder == token)
            {
                table.remove(&key);
            }
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        let renewed = self.with(|table, now| match table.get_mut(&key) {
            Some(Entry::Claimed {
                token: holder,
                until,
                ..
            }) if *holder == token => {
                *until = now + lease;
                true
            }
            _ => false,
        });
        Box::pin(std::future::ready(Ok(renewed)))
    }

    fn inspect(&self, key: Key) -> StoreFuture<'_, Inspection> {
        let inspection = self.with(|table, now| match table.get(&key) {
            None => Inspection::Absent,
            Some(Entry::Claimed {
                fingerprint,
                until,
                since,
                ..
            }) => Inspection::InProgress {
                fingerprint: *fingerprint,
                expires_in: *until - now,
                held_for: Some(now - *since),
            },
            Some(Entry::Completed {
                fingerprint,
                record,
                until,
                since,
                ..
            }) => Inspection::Completed {
                outcome: record.outcome(),
                fingerprint: *fingerprint,
                stored_at: SystemTime::now().checked_sub(now - *since),
                expires_in: *until - now,
                size: record.payload().len(),
            },
        });
        Box::pin(std::future::ready(Ok(inspection)))
    }

    fn forget(&self, key: Key) -> StoreFuture<'_, bool> {
        let forgotten = self.with(|table, _| table.remove(&key).is_some());
        Box::pin(std::future::ready(Ok(forgotten)))
    }

    fn claims_older_than(&self, age: Duration, limit: usize) -> StoreFuture<'_, Vec<HeldClaim>> {
        let claims = self.with(|table, now| {
            table
                .iter()
                .filter_map(|(key, entry)| match entry {
                    Entry::Claimed {
                        fingerprint,
                        until,
                        since,
                        ..
                    } if now - *since > age => Some(HeldClaim::new(
                        *key,
                        *fingerprint,
                        now - *since,
                        *until - now,
                    )),
                    _ => None,
                })
                .take(limit)
                .collect()
        });
        Box::pin(std::future::ready(Ok(claims)))
    }
}

struct Table;

impl Backend for Table {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(TableStore::default())
    }

    fn timing(&self) -> Timing {
        Timing {
            lease: Duration::from_secs(2),
            ttl: Duration::from_secs(30),
        }
    }

    fn follows_tokio_clock(&self) -> bool {
        true
    }
}

mod conformance {
    idem_test::conformance_suite!(super::Table);
}

mod exactly_once {
    idem_test::exactly_once_suite!(super::Table);
}

/// The same table with only the protocol's four operations: the operators'
/// and the journal's are left at the trait's defaults (`Unsupported`), as a
/// first version of a store in another crate would have them.
#[derive(Default)]
struct ProtocolOnly(TableStore);

impl Store for ProtocolOnly {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        self.0.begin(key, fingerprint, token, lease)
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        self.0.complete(key, token, record, ttl)
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.0.release(key, token)
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        self.0.renew(key, token, lease)
    }
}

struct ProtocolTable;

impl Backend for ProtocolTable {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(ProtocolOnly::default())
    }

    fn timing(&self) -> Timing {
        Table.timing()
    }

    fn follows_tokio_clock(&self) -> bool {
        true
    }
}

/// A store of the four operations passes the suite: each optional
/// operation's test accepts `Unsupported`.
mod conformance_of_the_protocol_alone {
    idem_test::conformance_suite!(super::ProtocolTable);
}

/// A store with journals and epochs but none of the operators' operations
/// (`inspect`, `forget`, the listing): every test passes, each optional
/// operation on its own.
struct WithoutOperators(idem_core::MemoryStore);

impl Store for WithoutOperators {
    fn begin(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        token: Token,
        lease: Duration,
    ) -> StoreFuture<'_, Begin> {
        self.0.begin(key, fingerprint, token, lease)
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        record: Record,
        ttl: Duration,
    ) -> StoreFuture<'_, Completion> {
        self.0.complete(key, token, record, ttl)
    }

    fn release(&self, key: Key, token: Token) -> StoreFuture<'_, ()> {
        self.0.release(key, token)
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> StoreFuture<'_, bool> {
        self.0.renew(key, token, lease)
    }

    fn append_step(
        &self,
        key: Key,
        token: Token,
        name: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> StoreFuture<'_, bool> {
        self.0.append_step(key, token, name, value, ttl)
    }

    fn steps(&self, key: Key) -> StoreFuture<'_, Vec<idem_core::store::JournaledStep>> {
        self.0.steps(key)
    }

    fn epoch(&self, key: Key, token: Token, ttl: Duration) -> StoreFuture<'_, Option<u64>> {
        self.0.epoch(key, token, ttl)
    }
}

struct JournalsWithoutOperators;

impl Backend for JournalsWithoutOperators {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(WithoutOperators(idem_core::MemoryStore::new()))
    }

    fn timing(&self) -> Timing {
        Table.timing()
    }

    fn follows_tokio_clock(&self) -> bool {
        true
    }
}

mod conformance_of_journals_without_operators {
    idem_test::conformance_suite!(super::JournalsWithoutOperators);
}
