//! One policy for how deep and how large the values a worker decodes and
//! carries may be, applied everywhere a message, a job frame or a result
//! is read or written: what the worker accepts from the broker it can also
//! hand to a pool process and carry back as a result.
//!
//! Why a depth limit at all: serde_json refuses input nested deeper than
//! 128 containers, and every hop adds wrappers (the body is `[args,
//! kwargs, embed]`, a job frame `{"Run": {"args": [...]}}`, a result frame
//! `{"Done": {"Ok": ...}}`). Without one agreed limit a value could be
//! accepted at one hop and be unreadable at the next, which is how a job
//! once occupied a pool slot for ever. Python's own `json` stops near
//! 1,000 levels; no real task argument comes close to [`MAX_DEPTH`].

use serde_json::Value;

/// Deepest nesting of containers (lists, dicts) allowed in one task
/// argument, keyword argument value, result or progress report. Leaves
/// room below serde_json's 128 for every wrapper a value travels in.
pub const MAX_DEPTH: usize = 100;

/// Deepest nesting of a task's result (or its exception's arguments): two
/// levels less than an argument, because a result becomes part of the
/// next step's arguments, and a chord body receives it inside the list of
/// header results (inside another list when a header is a group). What a
/// task may return, the next step may then also receive.
pub const MAX_RESULT_DEPTH: usize = MAX_DEPTH - 2;

/// Deepest nesting a decoder of a whole document (a message body, a frame)
/// is allowed to follow: [`MAX_DEPTH`] plus room for the wrappers. Also
/// the msgpack decoder's limit, so both serializers refuse at one depth.
pub const MAX_DOCUMENT_DEPTH: usize = 127;

/// Longest duration, in seconds, taken from a producer or an operator (a
/// time limit, an ETA wait, a sleep): about 31 years. A larger number is
/// an error to report, not a wait; `Duration::from_secs_f64` would panic
/// on it.
pub const MAX_SECONDS: f64 = 1e9;

/// `value` seconds as a `Duration`, when it is a finite number from 0 to
/// [`MAX_SECONDS`].
pub fn seconds(value: f64) -> Option<std::time::Duration> {
    if value.is_finite() && (0.0..=MAX_SECONDS).contains(&value) {
        std::time::Duration::try_from_secs_f64(value).ok()
    } else {
        None
    }
}

/// How deeply `value` nests containers: a scalar is 0, `[]` is 1, `[[1]]`
/// is 2. Iterative, so a value of any depth is measured without
/// recursion; stops counting once past `limit` (the answer is then
/// `limit + 1`), so a hostile value costs no more than needed.
pub fn depth_beyond(value: &Value, limit: usize) -> usize {
    fn is_container(v: &Value) -> bool {
        matches!(v, Value::Array(_) | Value::Object(_))
    }
    if !is_container(value) {
        return 0;
    }
    // Only containers go on the stack: the common argument (a string, a
    // number, a flat list) costs one small allocation or none.
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((v, here)) = stack.pop() {
        if here > limit {
            return limit + 1;
        }
        deepest = deepest.max(here);
        match v {
            Value::Array(items) => stack.extend(
                items
                    .iter()
                    .filter(|c| is_container(c))
                    .map(|c| (c, here + 1)),
            ),
            Value::Object(map) => stack.extend(
                map.values()
                    .filter(|c| is_container(c))
                    .map(|c| (c, here + 1)),
            ),
            _ => {}
        }
    }
    deepest
}

/// A value nested deeper than [`MAX_DEPTH`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is nested more than {max} levels deep (tori-worker's limit for values it carries)")]
pub struct TooDeep {
    pub what: String,
    pub max: usize,
}

/// Checks an argument against [`MAX_DEPTH`]; `what` names it in the error.
pub fn check_depth(value: &Value, what: impl FnOnce() -> String) -> Result<(), TooDeep> {
    check_depth_at(value, MAX_DEPTH, what)
}

/// Checks a value against `max` levels; `what` names it in the error.
pub fn check_depth_at(
    value: &Value,
    max: usize,
    what: impl FnOnce() -> String,
) -> Result<(), TooDeep> {
    if depth_beyond(value, max) > max {
        Err(TooDeep { what: what(), max })
    } else {
        Ok(())
    }
}

/// Builds `[[…[leaf]…]]`, `depth` lists deep, without recursion (tests).
#[cfg(test)]
pub(crate) fn nested_list(depth: usize, leaf: Value) -> Value {
    let mut v = leaf;
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seconds_accepts_only_usable_numbers() {
        assert_eq!(seconds(1.5), Some(std::time::Duration::from_millis(1500)));
        assert_eq!(seconds(0.0), Some(std::time::Duration::ZERO));
        for bad in [-1.0, 1e300, f64::INFINITY, f64::NAN, MAX_SECONDS * 2.0] {
            assert_eq!(seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn depth_counts_containers() {
        assert_eq!(depth_beyond(&json!(1), 10), 0);
        assert_eq!(depth_beyond(&json!([]), 10), 1);
        assert_eq!(depth_beyond(&json!({"a": [1, {"b": []}]}), 10), 4);
        assert_eq!(depth_beyond(&nested_list(50, json!("x")), 100), 50);
    }

    #[test]
    fn depth_stops_counting_past_the_limit() {
        assert_eq!(depth_beyond(&nested_list(100, json!(null)), 100), 100);
        assert_eq!(depth_beyond(&nested_list(101, json!(null)), 100), 101);
        assert_eq!(depth_beyond(&nested_list(5_000, json!(null)), 100), 101);
    }

    #[test]
    fn check_depth_names_the_value() {
        assert!(check_depth(&nested_list(MAX_DEPTH, json!(1)), || "x".into()).is_ok());
        let err =
            check_depth(&nested_list(MAX_DEPTH + 1, json!(1)), || "args[0]".into()).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("args[0] is nested more than 100"));
    }

    /// The wrappers a value travels in stay within serde_json's limit.
    #[test]
    fn a_value_at_the_limit_survives_every_wrapper() {
        let v = nested_list(MAX_DEPTH, json!(1));
        let body = json!([[v.clone()], {"k": v.clone()}, {}]);
        let text = serde_json::to_string(&body).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
        let frame = json!({"Run": {"args": [v.clone()], "kwargs": {"k": v.clone()}}});
        let text = serde_json::to_string(&frame).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
        let done = json!({"Done": {"Ok": {"result": v}}});
        let text = serde_json::to_string(&done).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }
}
