//! Result-backend state documents (`celery-task-meta-<id>`, SPEC §3.3).

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::{pyjson, task_message::format_time};

/// Celery task states that a worker writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Started,
    Progress,
    Success,
    Failure,
    Retry,
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "STARTED",
            Self::Progress => "PROGRESS",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Retry => "RETRY",
            Self::Revoked => "REVOKED",
        }
    }

    /// The state a stored document names, if it is one a worker writes.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Started,
            Self::Progress,
            Self::Success,
            Self::Failure,
            Self::Retry,
            Self::Revoked,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Ready states get a `date_done` and end `AsyncResult.get()`.
    pub fn is_ready(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Revoked)
    }
}

/// The exception dict Python's `exception_to_python` turns back into an
/// exception instance.
pub fn exception_value(module: &str, name: &str, args: &[Value]) -> Value {
    json!({"exc_type": name, "exc_message": args, "exc_module": module})
}

/// The reverse of [`exception_value`], for results read back (chord
/// headers); `None` when `value` is not an exception dict. A bare
/// `exc_message` (older Celery) is one argument.
pub fn exception_from_value(value: &Value) -> Option<tasks::PyException> {
    let name = value.get("exc_type")?.as_str()?;
    let module = value
        .get("exc_module")
        .and_then(Value::as_str)
        .unwrap_or("builtins");
    let args = match value.get("exc_message") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(other) => vec![other.clone()],
    };
    Some(tasks::PyException {
        module: module.to_owned(),
        name: name.to_owned(),
        args,
    })
}

/// Fields added with `result_extended=True`.
#[derive(Debug, Clone, PartialEq)]
pub struct Extended {
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub worker: String,
    pub retries: u32,
    pub queue: String,
}

/// One write to `celery-task-meta-<id>`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateDoc {
    pub task_id: String,
    pub state: State,
    pub result: Value,
    pub traceback: Option<String>,
    /// `None` is written as `null` (Celery's revoke-time write does that).
    pub children: Option<Vec<Value>>,
    pub group_id: Option<String>,
    pub parent_id: Option<String>,
    pub extended: Option<Extended>,
}

impl StateDoc {
    pub fn new(task_id: &str, state: State, result: Value) -> Self {
        Self {
            task_id: task_id.to_owned(),
            state,
            result,
            traceback: None,
            children: Some(Vec::new()),
            group_id: None,
            parent_id: None,
            extended: None,
        }
    }

    /// Serializes with Celery's key order; `now` becomes `date_done` for
    /// ready states.
    pub fn to_json(&self, now: DateTime<Utc>) -> String {
        let mut doc = Map::new();
        doc.insert("status".into(), json!(self.state.as_str()));
        doc.insert("result".into(), self.result.clone());
        doc.insert("traceback".into(), json!(self.traceback));
        doc.insert("children".into(), json!(self.children));
        doc.insert(
            "date_done".into(),
            if self.state.is_ready() {
                json!(format_time(now))
            } else {
                Value::Null
            },
        );
        if let Some(group) = &self.group_id {
            doc.insert("group_id".into(), json!(group));
        }
        if let Some(parent) = &self.parent_id {
            doc.insert("parent_id".into(), json!(parent));
        }
        if let Some(ext) = &self.extended {
            doc.insert("name".into(), json!(ext.name));
            doc.insert("args".into(), json!(ext.args));
            doc.insert("kwargs".into(), json!(ext.kwargs));
            doc.insert("worker".into(), json!(ext.worker));
            doc.insert("retries".into(), json!(ext.retries));
            doc.insert("queue".into(), json!(ext.queue));
        }
        doc.insert("task_id".into(), json!(self.task_id));
        pyjson::to_string(&doc)
    }
}

/// A child result tuple as Celery stores it in `children`:
/// `[["<id>", null], null]`.
pub fn child_ref(task_id: &str) -> Value {
    json!([[task_id, null], null])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_read_back() {
        for name in [
            "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "RETRY", "REVOKED",
        ] {
            assert_eq!(State::from_name(name).map(State::as_str), Some(name));
        }
        assert_eq!(State::from_name("PENDING"), None);
        assert_eq!(State::from_name("success"), None);
    }

    #[test]
    fn exception_dicts_read_back() {
        let v = exception_value("builtins", "ValueError", &[json!("boom"), json!(2)]);
        let e = exception_from_value(&v).unwrap();
        assert_eq!(
            (e.module.as_str(), e.name.as_str()),
            ("builtins", "ValueError")
        );
        assert_eq!(e.repr(), "ValueError('boom', 2)");
        assert!(exception_from_value(&json!(2)).is_none());
    }

    fn golden(name: &str) -> (String, DateTime<Utc>) {
        let path = format!(
            "{}/tests/vectors/backend/{name}.raw",
            env!("CARGO_MANIFEST_DIR")
        );
        let raw = std::fs::read_to_string(path).unwrap();
        let v: Value = serde_json::from_str(&raw).unwrap();
        let done = v["date_done"]
            .as_str()
            .and_then(crate::protocol::task_message::parse_time)
            .unwrap_or_else(Utc::now);
        (raw, done)
    }

    #[test]
    fn failure_unregistered_is_byte_exact() {
        let (raw, done) = golden("failure_unregistered");
        let v: Value = serde_json::from_str(&raw).unwrap();
        let doc = StateDoc::new(
            v["task_id"].as_str().unwrap(),
            State::Failure,
            exception_value(
                "celery.exceptions",
                "NotRegistered",
                &[json!("capapp.no_such_task")],
            ),
        );
        assert_eq!(doc.to_json(done), raw);
    }

    #[test]
    fn success_extended_is_byte_exact() {
        let (raw, done) = golden("success_result_extended");
        let v: Value = serde_json::from_str(&raw).unwrap();
        let mut doc = StateDoc::new(v["task_id"].as_str().unwrap(), State::Success, json!(42));
        doc.extended = Some(Extended {
            name: "capapp.add".into(),
            args: vec![json!(20), json!(22)],
            kwargs: Map::new(),
            worker: "crash2@vm".into(),
            retries: 0,
            queue: "celery".into(),
        });
        assert_eq!(doc.to_json(done), raw);
    }

    #[test]
    fn retry_with_children_is_byte_exact() {
        let (raw, done) = golden("retry");
        let v: Value = serde_json::from_str(&raw).unwrap();
        let id = v["task_id"].as_str().unwrap();
        let mut doc = StateDoc::new(
            id,
            State::Retry,
            exception_value("builtins", "KeyError", &[json!("transient")]),
        );
        doc.traceback = v["traceback"].as_str().map(str::to_owned);
        doc.children = Some(vec![child_ref(id)]);
        assert_eq!(doc.to_json(done), raw);
    }

    #[test]
    fn every_golden_backend_vector_round_trips() {
        let dir = format!("{}/tests/vectors/backend", env!("CARGO_MANIFEST_DIR"));
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("raw") {
                continue;
            }
            let raw = std::fs::read_to_string(&path).unwrap();
            let v: Value = serde_json::from_str(&raw).unwrap();
            let Some(status) = v.get("status").and_then(Value::as_str) else {
                continue; // group_saved holds a GroupResult, not a state
            };
            let state = match status {
                "STARTED" => State::Started,
                "SUCCESS" => State::Success,
                "FAILURE" => State::Failure,
                "RETRY" => State::Retry,
                "REVOKED" => State::Revoked,
                other => panic!("unexpected state {other}"),
            };
            let mut doc = StateDoc::new(v["task_id"].as_str().unwrap(), state, v["result"].clone());
            doc.traceback = v["traceback"].as_str().map(str::to_owned);
            doc.children = v["children"].as_array().cloned();
            doc.group_id = v.get("group_id").and_then(Value::as_str).map(str::to_owned);
            doc.parent_id = v
                .get("parent_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if v.get("worker").is_some() {
                doc.extended = Some(Extended {
                    name: v["name"].as_str().unwrap().into(),
                    args: v["args"].as_array().cloned().unwrap(),
                    kwargs: v["kwargs"].as_object().cloned().unwrap(),
                    worker: v["worker"].as_str().unwrap().into(),
                    retries: v["retries"].as_u64().unwrap() as u32,
                    queue: v["queue"].as_str().unwrap().into(),
                });
            }
            let done = v["date_done"]
                .as_str()
                .and_then(crate::protocol::task_message::parse_time)
                .unwrap_or_else(Utc::now);
            assert_eq!(doc.to_json(done), raw, "{}", path.display());
            checked += 1;
        }
        assert!(checked >= 15, "only {checked} backend vectors");
    }
}
