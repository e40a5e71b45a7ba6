//! The Redis read cache of stored payloads (inputs and results), under the `maos:` key prefix.
//!
//! A result is cached under its task and the fencing token it was written with
//! (`maos:result:<task>:<token>`) and an input under its task: once the replicated state refers to
//! one, it never changes, so an entry cannot go stale and needs no invalidation. A retried task
//! completes under a new token, which is a new key. Checkpoints change within an attempt and are
//! not cached. Task status is never cached: every node holds it in memory, applied from the log,
//! and reads it faster than a Redis round trip.
//!
//! Two more uses, both under the same prefix:
//! - agents' scratch state: key-value keys under `scratch/` live in Redis as
//!   `maos:scratch:<key>` with a TTL (lossy, fast, not replicated; see `api.rs`);
//! - task events on the `maos:events` channel, published by the leader as it mirrors the task
//!   table (`projector.rs`), for dashboards and other services to subscribe to. MAOS's own
//!   watches do not need them: every node applies every change from the replicated log.
//!
//! Redis is optional. A failed cache command is counted (`maos_redis_errors_total`) and the read
//! goes to PostgreSQL; the connection manager reconnects in the background.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Payload, StorageError, StorageMetrics};
use crate::config::RedisSection;

/// Scripts run by their SHA-1 (`EVALSHA`); the first call on a connection whose server lacks
/// one (a new or restarted Redis) loads it, so the text crosses the network once per server.
///
/// A scratch put, one round trip and atomic: bump the revision, set the value, set the expiry.
static SCRATCH_PUT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "local r = redis.call('HINCRBY', KEYS[1], 'r', 1) \
         redis.call('HSET', KEYS[1], 'v', ARGV[1]) \
         redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
         return r",
    )
});

/// One call against a GCRA rate limit ([`Cache::rate_take`]): 0, or the microseconds to wait.
static RATE_TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "local t = redis.call('TIME') \
         local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
         local arrival = tonumber(redis.call('GET', KEYS[1]) or '0') \
         if arrival < now then arrival = now end \
         local wait = arrival - tonumber(ARGV[2]) - now \
         if wait > 0 then return wait end \
         arrival = arrival + tonumber(ARGV[1]) \
         redis.call('SET', KEYS[1], string.format('%.0f', arrival), 'PX', \
             math.floor((arrival - now) / 1000) + 1000) \
         return 0",
    )
});

/// The prefix of every key MAOS writes.
pub const KEY_PREFIX: &str = "maos:";
/// The channel task events are published on.
pub const EVENTS_CHANNEL: &str = "maos:events";
/// Background cache writes in flight, at most; past it a write is skipped (the cache is best
/// effort), so a slow Redis cannot pile up payloads in memory.
const WRITES_IN_FLIGHT_MAX: usize = 64;

pub struct Cache {
    /// `redis.pool_size` multiplexed connections, used in turn.
    connections: Vec<ConnectionManager>,
    next: AtomicUsize,
    ttl_s: u64,
    /// `host:port`, for messages.
    pub name: String,
    metrics: Arc<StorageMetrics>,
    writes: Arc<tokio::sync::Semaphore>,
}

/// The cache key of `payload`, if it is cached.
pub fn key(payload: &Payload) -> Option<String> {
    match payload {
        Payload::Input(id) => Some(format!("{KEY_PREFIX}input:{id}")),
        Payload::Result(id, token) => Some(format!("{KEY_PREFIX}result:{id}:{token}")),
        Payload::Checkpoint(_) => None,
    }
}

impl Cache {
    /// Connections are made on first use; must be called inside a tokio runtime.
    pub fn new(url: &str, settings: &RedisSection, metrics: Arc<StorageMetrics>) -> Result<Self, StorageError> {
        let client = redis::Client::open(url).map_err(|e| StorageError::Unavailable {
            store: "Redis (redis.url)".into(),
            cause: format!("the URL is not valid: {}", super::postgres::redact(&e.to_string(), url)),
        })?;
        let name = format!("{}", client.get_connection_info().addr());
        let timeout = Some(Duration::from_millis(settings.response_timeout_ms));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connections = (0..settings.pool_size)
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StorageError::Unavailable { store: format!("Redis at {name}"), cause: e.to_string() })?;
        let writes = Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT_MAX));
        Ok(Self { connections, next: AtomicUsize::new(0), ttl_s: settings.cache_ttl, name, metrics, writes })
    }

    fn connection(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }

    fn failed(&self, what: &str, error: &redis::RedisError) {
        self.metrics.redis_errors_total.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(redis = %self.name, %error, "{what} failed; reading from the source");
    }

    /// The cached payloads among `wanted` (none when Redis fails).
    pub async fn get_payloads(&self, wanted: &[Payload]) -> BTreeMap<Payload, String> {
        let keyed: Vec<(&Payload, String)> = wanted.iter().filter_map(|p| Some((p, key(p)?))).collect();
        let mut found = BTreeMap::new();
        if keyed.is_empty() {
            return found;
        }
        let keys: Vec<&str> = keyed.iter().map(|(_, k)| k.as_str()).collect();
        let values: Vec<Option<String>> = match redis::cmd("MGET").arg(&keys).query_async(&mut self.connection()).await
        {
            Ok(values) => values,
            Err(error) => {
                self.failed("a cache read", &error);
                return found;
            }
        };
        for ((payload, _), value) in keyed.iter().zip(values) {
            match value {
                Some(value) => {
                    self.metrics.cache_hits_total.fetch_add(1, Ordering::Relaxed);
                    found.insert((*payload).clone(), value);
                }
                None => {
                    self.metrics.cache_misses_total.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        found
    }

    /// Cache `loaded` in the background (best effort): the caller never waits for Redis, so a
    /// slow or absent Redis costs it nothing.
    pub fn put_payloads(&self, loaded: &BTreeMap<Payload, String>) {
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            tracing::debug!(redis = %self.name, "{WRITES_IN_FLIGHT_MAX} cache writes in flight; this one is skipped");
            return;
        };
        let mut pipe = redis::pipe();
        let mut any = false;
        for (payload, value) in loaded {
            if let Some(key) = key(payload) {
                pipe.cmd("SET").arg(key).arg(value).arg("EX").arg(self.ttl_s).ignore();
                any = true;
            }
        }
        if !any {
            return;
        }
        let mut connection = self.connection();
        let (metrics, name) = (self.metrics.clone(), self.name.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = pipe.query_async::<()>(&mut connection).await {
                metrics.redis_errors_total.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(redis = %name, %error, "a cache write failed");
            }
        });
    }

    fn unavailable(&self, error: redis::RedisError) -> StorageError {
        self.metrics.redis_errors_total.fetch_add(1, Ordering::Relaxed);
        StorageError::Unavailable { store: format!("Redis at {}", self.name), cause: error.to_string() }
    }

    /// Write a scratch key (`maos:scratch:<key>`) with a TTL; returns its revision (writes to the
    /// key since it last expired).
    pub async fn scratch_put(&self, key: &str, value: &str, ttl_ms: u64) -> Result<u64, StorageError> {
        let key = format!("{KEY_PREFIX}scratch:{key}");
        SCRATCH_PUT
            .key(key)
            .arg(value)
            .arg(ttl_ms)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// Count one call by `caller` against a cluster-wide rate limit (GCRA, `api/limits.rs`):
    /// 0 when it is allowed, else the microseconds until the caller may call again. The
    /// arrival time lives in `maos:rl:<caller>` by Redis's own clock, so every node agrees.
    pub async fn rate_take(&self, caller: &str, interval_us: u64, tolerance_us: u64) -> Result<u64, StorageError> {
        RATE_TAKE
            .key(format!("{KEY_PREFIX}rl:{caller}"))
            .arg(interval_us)
            .arg(tolerance_us)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// A scratch key's value and revision.
    pub async fn scratch_get(&self, key: &str) -> Result<Option<(String, u64)>, StorageError> {
        let key = format!("{KEY_PREFIX}scratch:{key}");
        let (value, revision): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(key)
            .arg("v")
            .arg("r")
            .query_async(&mut self.connection())
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(value.map(|v| (v, revision.unwrap_or(0))))
    }

    /// Delete a scratch key; whether it existed.
    pub async fn scratch_delete(&self, key: &str) -> Result<bool, StorageError> {
        let key = format!("{KEY_PREFIX}scratch:{key}");
        let removed: u64 =
            redis::cmd("DEL").arg(key).query_async(&mut self.connection()).await.map_err(|e| self.unavailable(e))?;
        Ok(removed > 0)
    }

    /// Publish task events (JSON) on [`EVENTS_CHANNEL`]; at most once, like all of Redis pub/sub.
    pub async fn publish_events(&self, events: &[String]) {
        if events.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for event in events {
            pipe.cmd("PUBLISH").arg(EVENTS_CHANNEL).arg(event).ignore();
        }
        if let Err(error) = pipe.query_async::<()>(&mut self.connection()).await {
            self.failed("publishing task events", &error);
        }
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), String> {
        redis::cmd("PING").query_async::<String>(&mut self.connection()).await.map(|_| ()).map_err(|e| {
            self.failed("a ping", &e);
            format!("Redis at {} does not answer: {e}", self.name)
        })
    }
}
