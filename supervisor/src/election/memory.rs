//! An in-memory [`LeaseStore`] with SSM's semantics, call counters and fault hooks, for
//! unit tests and the simulation.

use super::store::{term_of, Created, LeaseStore, StoreError, MAX_LIST_PAGES};
use crate::aws::Retry;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// SSM's page size for GetParametersByPath.
const PAGE_SIZE: usize = 10;

/// Calls made so far, by kind. `list` counts GetParametersByPath pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    pub create: u64,
    pub overwrite: u64,
    pub get: u64,
    pub delete: u64,
    pub list: u64,
}

impl Calls {
    pub fn total(&self) -> u64 {
        self.create + self.overwrite + self.get + self.delete + self.list
    }
}

/// What a frozen handle holds back: like a process under SIGSTOP or a stuck network path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// Calls wait before reaching the store and apply on thaw — even if the caller gave
    /// up meanwhile, as a request already on the wire would.
    Requests,
    /// Calls apply at once; their answers arrive on thaw.
    Responses,
}

#[derive(Default)]
struct Counters {
    create: AtomicU64,
    overwrite: AtomicU64,
    get: AtomicU64,
    delete: AtomicU64,
    list: AtomicU64,
}

type Params = BTreeMap<String, (String, u64)>;

#[derive(Default)]
struct Shared {
    params: Mutex<Params>,
    calls: Counters,
}

impl Shared {
    fn params(&self) -> MutexGuard<'_, Params> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.params.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Faults {
    fail_next: u64,
    fail_all: bool,
    latency: Option<Duration>,
    freeze: watch::Sender<Option<Freeze>>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            fail_next: 0,
            fail_all: false,
            latency: None,
            freeze: watch::channel(None).0,
        }
    }
}

/// Parameters shared by every handle; fault hooks per handle (see [`MemoryStore::handle`]).
#[derive(Clone, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
    faults: Arc<Mutex<Faults>>,
}

#[derive(Clone, Copy)]
enum Op {
    Create,
    Overwrite,
    Get,
    Delete,
    List,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Another view of the same parameters and counters with its own fault hooks: give
    /// each candidate its own to fail or freeze one of them.
    pub fn handle(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            faults: Arc::default(),
        }
    }

    pub fn calls(&self) -> Calls {
        let c = &self.shared.calls;
        Calls {
            create: c.create.load(Ordering::Relaxed),
            overwrite: c.overwrite.load(Ordering::Relaxed),
            get: c.get.load(Ordering::Relaxed),
            delete: c.delete.load(Ordering::Relaxed),
            list: c.list.load(Ordering::Relaxed),
        }
    }

    /// The next `n` calls through this handle fail with a transient error.
    pub fn fail_next(&self, n: u64) {
        self.faults().fail_next = n;
    }

    /// Every call through this handle fails until `fail_all(false)`.
    pub fn fail_all(&self, on: bool) {
        self.faults().fail_all = on;
    }

    /// Every call through this handle takes `latency` before reaching the store.
    pub fn set_latency(&self, latency: Option<Duration>) {
        self.faults().latency = latency;
    }

    pub fn freeze(&self, what: Freeze) {
        self.faults().freeze.send_replace(Some(what));
    }

    pub fn thaw(&self) {
        self.faults().freeze.send_replace(None);
    }

    /// Writes a value directly (a new version), uncounted and without faults.
    pub fn raw_put(&self, name: &str, value: &str) -> u64 {
        let mut params = self.shared.params();
        let version = params.get(name).map_or(1, |(_, v)| v + 1);
        params.insert(name.to_string(), (value.to_string(), version));
        version
    }

    /// The current value and version, uncounted.
    pub fn peek(&self, name: &str) -> Option<(String, u64)> {
        self.shared.params().get(name).cloned()
    }

    /// Every parameter name, in order, uncounted.
    pub fn names(&self) -> Vec<String> {
        self.shared.params().keys().cloned().collect()
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn call<T: Send + 'static>(
        &self,
        op: Op,
        name: &str,
        apply: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let c = &self.shared.calls;
        let counter = match op {
            Op::Create => &c.create,
            Op::Overwrite => &c.overwrite,
            Op::Get => &c.get,
            Op::Delete => &c.delete,
            Op::List => &c.list,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let (latency, mut freeze) = {
            let mut f = self.faults();
            if f.fail_all || f.fail_next > 0 {
                f.fail_next = f.fail_next.saturating_sub(1);
                return Err(injected(op, name));
            }
            (f.latency, f.freeze.subscribe())
        };
        if latency.is_none() && freeze.borrow().is_none() {
            return Ok(apply(&self.shared));
        }
        // Detached, so a caller that gives up does not take back a request already sent.
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            if let Some(d) = latency {
                tokio::time::sleep(d).await;
            }
            let _ = freeze.wait_for(|f| *f != Some(Freeze::Requests)).await;
            let out = apply(&shared);
            let _ = freeze.wait_for(Option::is_none).await;
            out
        });
        // A join error only happens when the runtime shuts down under the call.
        task.await.map_err(|_| injected(op, name))
    }
}

fn injected(op: Op, name: &str) -> StoreError {
    let (name, retry, detail) = (
        name.to_string(),
        Retry::Transient,
        "injected fault".to_string(),
    );
    match op {
        Op::Create | Op::Overwrite => StoreError::Put {
            name,
            retry,
            detail,
        },
        Op::Get => StoreError::Get {
            name,
            retry,
            detail,
        },
        Op::Delete => StoreError::Delete {
            name,
            retry,
            detail,
        },
        Op::List => StoreError::List {
            path: name,
            retry,
            detail,
        },
    }
}

impl LeaseStore for MemoryStore {
    async fn create(&self, name: &str, value: &str) -> Result<Created, StoreError> {
        let (n, v) = (name.to_string(), value.to_string());
        self.call(Op::Create, name, move |s| match s.params().entry(n) {
            Entry::Occupied(_) => Created::AlreadyExists,
            Entry::Vacant(e) => {
                e.insert((v, 1));
                Created::Won { version: 1 }
            }
        })
        .await
    }

    async fn overwrite(&self, name: &str, value: &str) -> Result<u64, StoreError> {
        let (n, v) = (name.to_string(), value.to_string());
        self.call(Op::Overwrite, name, move |s| {
            let mut params = s.params();
            let version = params.get(&n).map_or(1, |(_, old)| old + 1);
            params.insert(n, (v, version));
            version
        })
        .await
    }

    async fn get(&self, name: &str) -> Result<Option<(String, u64)>, StoreError> {
        let n = name.to_string();
        self.call(Op::Get, name, move |s| s.params().get(&n).cloned())
            .await
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let n = name.to_string();
        self.call(Op::Delete, name, move |s| {
            s.params().remove(&n);
        })
        .await
    }

    async fn latest_term(&self, prefix: &str) -> Result<Option<u64>, StoreError> {
        let p = prefix.to_string();
        let (pages, latest) = self
            .call(Op::List, prefix, move |s| {
                let params = s.params();
                // Every parameter one level down fills pages, terms or not.
                let children = params
                    .keys()
                    .filter(|k| {
                        k.strip_prefix(p.as_str())
                            .and_then(|rest| rest.strip_prefix('/'))
                            .is_some_and(|last| !last.is_empty() && !last.contains('/'))
                    })
                    .count();
                let latest = params.keys().filter_map(|k| term_of(&p, k)).max();
                (children.div_ceil(PAGE_SIZE).max(1), latest)
            })
            .await?;
        // The first page was counted by `call`; count the rest as the SDK would pay them,
        // up to the bound at which the listing gives up.
        self.shared
            .calls
            .list
            .fetch_add(pages.min(MAX_LIST_PAGES) as u64 - 1, Ordering::Relaxed);
        if pages > MAX_LIST_PAGES {
            return Err(StoreError::ListTooLong {
                path: prefix.to_string(),
            });
        }
        Ok(latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn has_ssm_semantics() {
        let s = MemoryStore::new();
        assert_eq!(
            s.create("/p/0000000001", "a").await.expect("ok"),
            Created::Won { version: 1 }
        );
        assert_eq!(
            s.create("/p/0000000001", "b").await.expect("ok"),
            Created::AlreadyExists
        );
        assert_eq!(s.overwrite("/p/0000000001", "c").await.expect("ok"), 2);
        assert_eq!(
            s.get("/p/0000000001").await.expect("ok"),
            Some(("c".into(), 2))
        );
        assert_eq!(s.overwrite("/p/0000000007", "x").await.expect("ok"), 1);
        s.raw_put("/p/other", "y");
        s.raw_put("/p/0000000009/deeper", "z");
        s.raw_put("/q/0000000099", "z");
        assert_eq!(s.latest_term("/p").await.expect("ok"), Some(7));
        s.delete("/p/0000000007").await.expect("ok");
        s.delete("/p/0000000007").await.expect("ok");
        assert_eq!(s.get("/p/0000000007").await.expect("ok"), None);
        assert_eq!(s.latest_term("/p").await.expect("ok"), Some(1));
        assert_eq!(s.latest_term("/none").await.expect("ok"), None);
        let c = s.calls();
        assert_eq!(
            (c.create, c.overwrite, c.get, c.delete, c.list),
            (2, 2, 2, 2, 3)
        );
    }

    #[tokio::test]
    async fn lists_count_pages() {
        let s = MemoryStore::new();
        for t in 1..=25 {
            s.raw_put(&format!("/p/{t:010}"), "v");
        }
        assert_eq!(s.latest_term("/p").await.expect("ok"), Some(25));
        assert_eq!(s.calls().list, 3);
    }

    #[tokio::test]
    async fn listing_gives_up_past_the_page_bound() {
        let s = MemoryStore::new();
        let full = MAX_LIST_PAGES * PAGE_SIZE;
        for t in 1..=full {
            s.raw_put(&format!("/p/{t:010}"), "v");
        }
        s.raw_put("/p/0000000009/deeper", "not listed");
        assert_eq!(s.latest_term("/p").await.expect("ok"), Some(full as u64));
        assert_eq!(s.calls().list, MAX_LIST_PAGES as u64);
        // One more parameter, a term or not, is one page too many.
        s.raw_put("/p/junk", "v");
        let e = s.latest_term("/p").await.expect_err("too long");
        assert!(matches!(e, StoreError::ListTooLong { .. }) && !e.is_transient());
        assert!(e.to_string().contains("election.prefix"), "{e}");
        assert_eq!(s.calls().list, 2 * MAX_LIST_PAGES as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn faults_are_per_handle() {
        let s = MemoryStore::new();
        let h = s.handle();
        h.fail_next(2);
        assert!(h.get("/a").await.expect_err("fails").is_transient());
        assert!(h.create("/a", "v").await.is_err());
        assert!(s.create("/a", "v").await.is_ok());
        assert!(h.get("/a").await.expect("ok").is_some());
        h.fail_all(true);
        assert!(h.delete("/a").await.is_err());
        h.fail_all(false);
        h.set_latency(Some(Duration::from_secs(3)));
        let t0 = tokio::time::Instant::now();
        assert_eq!(h.overwrite("/a", "w").await.expect("ok"), 2);
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert_eq!(s.calls().total(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn frozen_requests_apply_late_even_if_abandoned() {
        let s = MemoryStore::new();
        let h = s.handle();
        h.freeze(Freeze::Requests);
        let r = tokio::time::timeout(Duration::from_secs(1), h.overwrite("/a", "late")).await;
        assert!(r.is_err());
        assert_eq!(s.peek("/a"), None);
        h.thaw();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(s.peek("/a"), Some(("late".into(), 1)));

        h.freeze(Freeze::Responses);
        let r = tokio::time::timeout(Duration::from_secs(1), h.overwrite("/a", "now")).await;
        assert!(r.is_err());
        assert_eq!(s.peek("/a"), Some(("now".into(), 2)));
    }
}
