//! The Celery Redis result backend (SPEC §3): `celery-task-meta-<id>`.
//!
//! Knows task ids and state documents; knows nothing of queues.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::Utc;
use redis::{RedisError, Script};
use serde_json::Value;

pub mod chord;

use crate::protocol::{State, StateDoc};
use crate::redis_link::RedisLink;

/// Writes a state unless the stored one is already SUCCESS (Celery's guard
/// against late duplicates), then PUBLISHes it on the key's own channel so
/// waiting `AsyncResult.get()` calls wake up — in one atomic step where
/// Python uses GET and then MULTI.
///
/// KEYS: meta key. ARGV: document, expiry seconds (0 = none).
/// Returns 1 written, 0 skipped.
static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and doc['status'] == 'SUCCESS' then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then
  redis.call('SETEX', KEYS[1], ttl, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#,
    )
});

#[derive(Debug, Clone)]
pub struct ResultBackend {
    link: RedisLink,
    key_prefix: String,
    expires: Option<Duration>,
}

impl ResultBackend {
    /// `expires` is Celery's `result_expires` (default one day); `None`
    /// keeps results forever.
    /// The connection results are written on.
    pub fn link(&self) -> &RedisLink {
        &self.link
    }

    pub fn new(link: RedisLink, key_prefix: &str, expires: Option<Duration>) -> Self {
        Self {
            link,
            key_prefix: key_prefix.to_owned(),
            expires,
        }
    }

    pub fn meta_key(&self, task_id: &str) -> String {
        format!("{}celery-task-meta-{task_id}", self.key_prefix)
    }

    /// Stores a state, retrying while Redis is away: a result is never
    /// dropped because the connection blinked. Returns false when skipped
    /// because the task already succeeded.
    pub async fn store(&self, doc: &StateDoc) -> Result<bool, RedisError> {
        let key = self.meta_key(&doc.task_id);
        let json = doc.to_json(Utc::now());
        let ttl = self.expires.map(|d| d.as_secs().max(1)).unwrap_or(0);
        // EVALSHA in the shared write batch; the first store on a fresh
        // server (script not cached yet) loads it through a plain call.
        let batched = self
            .link
            .batched(vec![redis::cmd("EVALSHA")
                .arg(STORE.get_hash())
                .arg(1)
                .arg(&key)
                .arg(&json)
                .arg(ttl)
                .clone()])
            .await?;
        let written: i64 = match batched.into_iter().next() {
            Some(redis::Value::ServerError(e)) if e.code() == "NOSCRIPT" => {
                self.link
                    .retry("store result", |mut c| {
                        let mut inv = STORE.prepare_invoke();
                        inv.key(&key).arg(&json).arg(ttl);
                        async move { inv.invoke_async(&mut c).await }
                    })
                    .await?
            }
            Some(redis::Value::ServerError(e)) => return Err(e.into()),
            Some(v) => redis::from_redis_value(v)?,
            None => 0,
        };
        if written == 0 {
            tracing::info!(task_id = %doc.task_id, state = doc.state.as_str(), "result not written: task already succeeded");
        }
        Ok(written == 1)
    }

    /// The stored state name, if any (`None` means PENDING).
    pub async fn state_of(&self, task_id: &str) -> Result<Option<String>, RedisError> {
        let doc = self
            .read_doc(&self.meta_key(task_id), "read result")
            .await?;
        Ok(doc.and_then(|d| d.get("status")?.as_str().map(str::to_owned)))
    }

    /// The final state stored for a task (SUCCESS, FAILURE or REVOKED) as a
    /// document with its result and traceback, e.g. to count it in its
    /// chord; `None` while it has none.
    pub async fn final_doc(&self, task_id: &str) -> Result<Option<StateDoc>, RedisError> {
        let doc = self
            .read_doc(&self.meta_key(task_id), "read result")
            .await?;
        let Some(doc) = doc else { return Ok(None) };
        let state = doc
            .get("status")
            .and_then(Value::as_str)
            .and_then(State::from_name)
            .filter(|s| s.is_ready());
        Ok(state.map(|state| {
            let result = doc.get("result").cloned().unwrap_or(Value::Null);
            let mut stored = StateDoc::new(task_id, state, result);
            stored.traceback = doc
                .get("traceback")
                .and_then(Value::as_str)
                .map(str::to_owned);
            stored
        }))
    }

    /// The JSON document stored at `key` (a result or a saved group),
    /// retrying while Redis is away; `None` when absent or not JSON.
    pub(crate) async fn read_doc(
        &self,
        key: &str,
        what: &str,
    ) -> Result<Option<Value>, RedisError> {
        let raw: Option<String> = self
            .link
            .retry(what, |mut c| {
                let cmd = redis::cmd("GET").arg(key).clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        Ok(raw.and_then(|r| serde_json::from_str::<Value>(&r).ok()))
    }
}

/// True for states after which a redelivered message must not run again.
pub fn is_final(state: &str) -> bool {
    matches!(state, "SUCCESS" | "FAILURE" | "REVOKED")
}

/// Convenience for callers mapping our enum to Celery's names.
pub fn state_name(state: State) -> &'static str {
    state.as_str()
}
