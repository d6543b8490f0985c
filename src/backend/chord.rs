//! Chord counting in the Redis result backend (SPEC §3.7), the way Celery
//! 5.7's Redis backend counts, so Python and Rust workers can finish the
//! header tasks of one chord between them.
//!
//! Every header task, once its own result is stored, adds
//! `[1, task_id, state, result]` to the sorted set `<gid>.j` (score: its
//! place in the group) in one script that also dedupes redeliveries
//! (`<gid>.d`) and, when the set is full, lets exactly one worker claim the
//! chord (`SET <gid>.c <token> NX`). The claimer reads the results, calls
//! the body, then marks the chord done so a late redelivery cannot call
//! it again.
//!
//! Celery 4.4 and 5.0 clients write no size key (`.s`); the size travels
//! as `chord_size` in the body signature each header task carries, and
//! their workers counted against it. The caller passes that size and it is
//! used when `.s` is absent, so those chords complete too.
//!
//! Knows keys, scripts and member documents; what to do with the results
//! (publish the body, or fail it) is the caller's.

use std::sync::LazyLock;

use redis::{RedisError, Script};
use serde_json::Value;

use super::ResultBackend;

/// How long a claim holds before another worker may take the chord over
/// (Celery uses a few seconds; publishing the body takes milliseconds).
const CLAIM_SECS: u64 = 10;
/// Celery's `result_chord_join_timeout`-independent key lifetime for the
/// counting keys (its default `result_expires`, one day).
const CHORD_EXPIRES_SECS: u64 = 86_400;

/// Records one header result and says whether the chord is complete.
///
/// KEYS: .j .t .s .d <group key> .c
/// ARGV: task id, member, group index (or +inf), key expiry, claim
/// seconds, token, the size the body signature carries (0: none).
/// Returns {ready, totaldiff, size, claimed}; ready = -1 when the chord
/// was already called. The `.s` key wins over the carried size: only
/// Celery <= 5.0 clients carry one, and they never write `.s`.
static PART_RETURN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[6]) == 'done' then return {-1, 0, 0, 0} end
local mark = ARGV[1] .. ':' .. ARGV[3]
if redis.call('SISMEMBER', KEYS[4], mark) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('SADD', KEYS[4], mark)
end
local ready = redis.call('ZCOUNT', KEYS[1], '-inf', '+inf')
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
local t = redis.call('GET', KEYS[2])
local s = redis.call('GET', KEYS[3])
local total = (t and tonumber(t)) or 0
local size = (s and tonumber(s)) or tonumber(ARGV[7]) or 0
local claimed = 0
if size > 0 and ready == size + total then
  if redis.call('SET', KEYS[6], ARGV[6], 'NX', 'EX', ARGV[5]) then claimed = 1 end
end
return {ready, total, size, claimed}
"#,
    )
});

/// Forgets the counting keys and marks the chord done, if we still hold
/// the claim.
///
/// KEYS: .c .j .t .s .d. ARGV: token, seconds to remember "done".
static FINISHED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
return 1
"#,
    )
});

/// One header result as the chord's join set holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordMember {
    pub task_id: String,
    pub state: String,
    pub result: Value,
}

/// What recording a header result led to.
#[derive(Debug, Clone, PartialEq)]
pub enum ChordCount {
    /// Results so far and the chord's size (0: the client has not written
    /// it yet; the last header to finish will see it).
    Waiting { ready: i64, size: i64 },
    /// Complete, and this worker holds the claim: call the body with
    /// `members` (in group order), then [`ResultBackend::chord_finished`].
    Claimed {
        token: String,
        members: Vec<ChordMember>,
    },
    /// Complete, but another worker claimed it first.
    ClaimedElsewhere,
    /// The body was already called (a redelivered header).
    AlreadyDone,
}

impl ResultBackend {
    fn chord_key(&self, group_id: &str, suffix: &str) -> String {
        format!("{}celery-taskset-meta-{group_id}{suffix}", self.key_prefix)
    }

    /// Records a header task's final state (`member` is
    /// `[1, task_id, state, result]` as Python's json.dumps writes it),
    /// retrying while Redis is away: a lost count would strand the chord.
    ///
    /// `carried_size` is the `chord_size` of the body signature the header
    /// task's message carries. Celery 4.4 and 5.0 clients write no `.s`
    /// key; their workers counted against that size (plus `.t`), so it is
    /// used when `.s` is absent, as a Celery 5.0 worker would.
    pub async fn chord_part_return(
        &self,
        group_id: &str,
        task_id: &str,
        group_index: Option<i64>,
        member: &str,
        carried_size: Option<u64>,
    ) -> Result<ChordCount, RedisError> {
        let keys: Vec<String> = [".j", ".t", ".s", ".d", "", ".c"]
            .iter()
            .map(|s| self.chord_key(group_id, s))
            .collect();
        let token = uuid::Uuid::new_v4().simple().to_string();
        // Celery scores a header without a place in the group last.
        let score = group_index.map_or_else(|| "+inf".to_owned(), |i| i.to_string());
        let reply: Vec<i64> = self
            .link
            .retry("count chord part", |mut c| {
                let mut inv = PART_RETURN.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(task_id)
                    .arg(member)
                    .arg(&score)
                    .arg(CHORD_EXPIRES_SECS)
                    .arg(CLAIM_SECS)
                    .arg(&token)
                    .arg(carried_size.unwrap_or(0));
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let [ready, total, size, claimed] = reply[..] else {
            return Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "chord count script returned an unexpected reply",
            )));
        };
        if ready < 0 {
            return Ok(ChordCount::AlreadyDone);
        }
        if claimed == 0 {
            // `.t` counts header tasks replaced by more, as in the script.
            return Ok(if size > 0 && ready >= size + total {
                ChordCount::ClaimedElsewhere
            } else {
                ChordCount::Waiting { ready, size }
            });
        }
        let join = &keys[0];
        let raw: Vec<String> = self
            .link
            .retry("read chord results", |mut c| {
                let cmd = redis::cmd("ZRANGE").arg(join).arg(0).arg(-1).clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        let members = raw
            .iter()
            .map(|m| parse_member(m))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "chord join set holds a malformed member",
                    e,
                ))
            })?;
        Ok(ChordCount::Claimed { token, members })
    }

    /// The header's shape as the client saved it (`celery-taskset-meta-<gid>`,
    /// the `GroupResult.as_tuple()` under `"result"`), if it did: Celery
    /// saves it only when a header member's result is itself a group (a
    /// chain that ends in a group), so that the body gets nested lists.
    pub async fn saved_group(&self, group_id: &str) -> Result<Option<Value>, RedisError> {
        let doc = self
            .read_doc(&self.chord_key(group_id, ""), "read saved group")
            .await?;
        Ok(doc.and_then(|mut v| v.get_mut("result").map(Value::take)))
    }

    /// Saves a chord header's shape (`GroupResult.as_tuple()`) where the
    /// header's last member to finish reads it ([`Self::saved_group`]), as
    /// Celery's `apply_chord` does for a worker that starts a chord whose
    /// member ends in a group. Written as Python's `json.dumps` writes it.
    pub async fn save_group(&self, group_id: &str, shape: &Value) -> Result<(), RedisError> {
        let key = self.chord_key(group_id, "");
        let doc = crate::protocol::pyjson::to_string(&serde_json::json!({"result": shape}));
        let ttl = self.chord_ttl();
        self.link
            .retry("save chord header", |mut c| {
                let cmd = redis::cmd("SETEX").arg(&key).arg(ttl).arg(&doc).clone();
                async move { cmd.query_async::<()>(&mut c).await }
            })
            .await
    }

    fn chord_ttl(&self) -> u64 {
        self.expires
            .map_or(CHORD_EXPIRES_SECS, |d| d.as_secs().max(1))
    }

    /// Records how many header results a chord waits for (`<gid>.s`, what
    /// Celery's `set_chord_size` writes). A client writes it for the chords
    /// it starts; a worker writes it for a chord that follows a task in a
    /// chain. Like Celery it first forgets a finished run's "done" mark
    /// (`.c`): a frozen chord started again reuses its group id. Retried
    /// while Redis is away: without it the chord never completes.
    pub async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), RedisError> {
        let key = self.chord_key(group_id, ".s");
        let claim = self.chord_key(group_id, ".c");
        let ttl = self.chord_ttl();
        self.link
            .retry("record chord size", |mut c| {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .del(&claim)
                    .ignore()
                    .set_ex(&key, size, ttl)
                    .ignore();
                async move { pipe.query_async::<()>(&mut c).await }
            })
            .await
    }

    /// The body was called: drop the counting keys and remember the chord
    /// as done (Celery keeps "done" for twice the claim, at least 300 s).
    pub async fn chord_finished(&self, group_id: &str, token: &str) -> Result<(), RedisError> {
        let keys: Vec<String> = [".c", ".j", ".t", ".s", ".d"]
            .iter()
            .map(|s| self.chord_key(group_id, s))
            .collect();
        let remember = (2 * CLAIM_SECS).max(300);
        let _: i64 = self
            .link
            .retry("finish chord", |mut c| {
                let mut inv = FINISHED.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(token).arg(remember);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(())
    }
}

/// `[1, task_id, state, result]`.
fn parse_member(raw: &str) -> Result<ChordMember, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("{e}: {raw}"))?;
    match v.as_array().map(Vec::as_slice) {
        Some([_, Value::String(id), Value::String(state), result]) => Ok(ChordMember {
            task_id: id.clone(),
            state: state.clone(),
            result: result.clone(),
        }),
        _ => Err(format!("not [1, id, state, result]: {raw}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis::redis_and_link;

    #[tokio::test]
    async fn a_saved_header_reads_back_and_a_new_size_forgets_the_last_run() {
        let (_server, link) = redis_and_link();
        let backend = ResultBackend::new(link.clone(), "", None);
        let shape = serde_json::json!([
            ["g", null],
            [[["c", [["b", null], null]], [[["d", null], null]]]]
        ]);
        backend.save_group("g", &shape).await.unwrap();
        assert_eq!(backend.saved_group("g").await.unwrap(), Some(shape));
        let mut conn = link.conn().await.unwrap();
        let raw: String = redis::cmd("GET")
            .arg("celery-taskset-meta-g")
            .query_async(&mut conn)
            .await
            .unwrap();
        // As Python's json.dumps writes it, which Celery's GroupResult.restore reads.
        assert_eq!(
            raw,
            r#"{"result": [["g", null], [[["c", [["b", null], null]], [[["d", null], null]]]]]}"#
        );

        let _: () = redis::cmd("SET")
            .arg("celery-taskset-meta-g.c")
            .arg("done")
            .query_async(&mut conn)
            .await
            .unwrap();
        backend.set_chord_size("g", 3).await.unwrap();
        let (size, done): (Option<String>, Option<String>) = redis::pipe()
            .get("celery-taskset-meta-g.s")
            .get("celery-taskset-meta-g.c")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!((size.as_deref(), done), (Some("3"), None));
    }

    /// Counts `n` header results of chord `g` as tasks `t0..`, each
    /// carrying `carried` as its body's size.
    async fn count(backend: &ResultBackend, n: usize, carried: Option<u64>) -> Vec<ChordCount> {
        let mut out = Vec::new();
        for i in 0..n {
            let id = format!("t{i}");
            let member = format!(r#"[1, "{id}", "SUCCESS", {i}]"#);
            let got = backend
                .chord_part_return("g", &id, Some(i as i64), &member, carried)
                .await
                .unwrap();
            out.push(got);
        }
        out
    }

    #[tokio::test]
    async fn without_a_size_key_the_carried_size_completes_the_chord() {
        let (_server, link) = redis_and_link();
        let backend = ResultBackend::new(link.clone(), "", None);
        // A Celery 5.0 client: no `.s`, size 3 in the body signature.
        let got = count(&backend, 3, Some(3)).await;
        assert_eq!(got[0], ChordCount::Waiting { ready: 1, size: 3 });
        assert_eq!(got[1], ChordCount::Waiting { ready: 2, size: 3 });
        let ChordCount::Claimed { token, members } = &got[2] else {
            panic!("the third of three did not claim the chord: {:?}", got[2]);
        };
        let results: Vec<Value> = members.iter().map(|m| m.result.clone()).collect();
        assert_eq!(results, [Value::from(0), Value::from(1), Value::from(2)]);
        backend.chord_finished("g", token).await.unwrap();
        let again = backend
            .chord_part_return("g", "t2", Some(2), r#"[1, "t2", "SUCCESS", 2]"#, Some(3))
            .await
            .unwrap();
        assert_eq!(again, ChordCount::AlreadyDone);

        // `.t` (header tasks replaced by more) adds to it, as in Celery 5.0.
        let (_server, link) = redis_and_link();
        let backend = ResultBackend::new(link.clone(), "", None);
        let mut conn = link.conn().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("celery-taskset-meta-g.t")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let got = count(&backend, 3, Some(2)).await;
        assert_eq!(got[1], ChordCount::Waiting { ready: 2, size: 2 });
        assert!(matches!(got[2], ChordCount::Claimed { .. }), "{got:?}");
    }

    #[tokio::test]
    async fn the_size_key_wins_over_the_carried_size() {
        let (_server, link) = redis_and_link();
        let backend = ResultBackend::new(link.clone(), "", None);
        backend.set_chord_size("g", 3).await.unwrap();
        let got = count(&backend, 3, Some(2)).await;
        assert_eq!(got[1], ChordCount::Waiting { ready: 2, size: 3 });
        assert!(matches!(got[2], ChordCount::Claimed { .. }), "{got:?}");

        // Neither: the chord waits for a size (a newer client's `.s`).
        let (_server, link) = redis_and_link();
        let backend = ResultBackend::new(link.clone(), "", None);
        let got = count(&backend, 2, None).await;
        assert_eq!(got[1], ChordCount::Waiting { ready: 2, size: 0 });
    }

    #[test]
    fn members_parse_as_celery_writes_them() {
        let m =
            parse_member(r#"[1, "c4673c63-059f-4e1c-b123-16b3a21f9a7a", "SUCCESS", 2]"#).unwrap();
        assert_eq!(m.task_id, "c4673c63-059f-4e1c-b123-16b3a21f9a7a");
        assert_eq!(
            (m.state.as_str(), m.result.clone()),
            ("SUCCESS", Value::from(2))
        );
        assert!(parse_member("[1, 2]").is_err());
        assert!(parse_member("nope").is_err());
    }
}
