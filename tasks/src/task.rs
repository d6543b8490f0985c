//! The task contract: what a task is, what it may return, and what it can
//! observe while it runs.
//!
//! A task sees its arguments, a read-only view of its request, a way to
//! report progress and a cancellation flag. It never sees the broker, the
//! result backend or the wire format: the worker translates between this
//! contract and Celery's messages, so tasks stay testable as plain
//! functions.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Default retry limit, Celery's `Task.max_retries`.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Per-task defaults that Celery users know from `@app.task(...)` options.
///
/// `None` means "use the worker's default", so a CLI flag such as
/// `--acks-late` can fill in what a task leaves open.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    /// Acknowledge after the outcome is stored instead of before running.
    pub acks_late: Option<bool>,
    /// Hard time limit in seconds (the process is killed).
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds (the task is asked to stop).
    pub soft_time_limit: Option<f64>,
    /// Celery rate-limit string such as `"10/s"` or `"100/m"`.
    pub rate_limit: Option<String>,
    /// Never store a result for this task.
    pub ignore_result: bool,
    /// How many times `retry` may republish; `None` retries forever.
    pub max_retries: Option<u32>,
    /// Countdown used by `retry` when the task gives none (Celery: 180 s).
    pub default_retry_delay: f64,
    /// Exponential backoff for retries: delay = min(max, base * 2^retries).
    pub retry_backoff: Option<f64>,
    /// Upper bound for the exponential backoff, seconds.
    pub retry_backoff_max: f64,
    /// Randomize the backoff delay between 0 and the computed value.
    pub retry_jitter: bool,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            acks_late: None,
            time_limit: None,
            soft_time_limit: None,
            rate_limit: None,
            ignore_result: false,
            max_retries: Some(DEFAULT_MAX_RETRIES),
            default_retry_delay: 180.0,
            retry_backoff: None,
            retry_backoff_max: 600.0,
            retry_jitter: false,
        }
    }
}

/// An exception as Python will see it: `exc_module.exc_type(*args)`.
///
/// The Python client re-creates the exception from these three fields, so
/// picking a builtin (`builtins.RuntimeError`) makes `AsyncResult.get()`
/// raise a type Python code already catches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PyException {
    pub module: String,
    pub name: String,
    pub args: Vec<Value>,
}

impl PyException {
    pub fn new(module: &str, name: &str, message: impl Into<String>) -> Self {
        Self {
            module: module.to_owned(),
            name: name.to_owned(),
            args: vec![Value::String(message.into())],
        }
    }

    /// A `builtins.<name>(message)` exception.
    pub fn builtin(name: &str, message: impl Into<String>) -> Self {
        Self::new("builtins", name, message)
    }

    /// The first argument as text, for logs and event `exception` reprs.
    pub fn message(&self) -> String {
        match self.args.first() {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }

    /// Python-style `repr`, e.g. `RuntimeError('boom')`.
    pub fn repr(&self) -> String {
        let args: Vec<String> = self.args.iter().map(py_repr).collect();
        format!("{}({})", self.name, args.join(", "))
    }
}

/// A small Python `repr` of JSON values, good enough for logs and events.
pub fn py_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let escaped = s
                .replace('\\', "\\\\")
                .replace('\'', "\\'")
                .replace('\n', "\\n");
            format!("'{escaped}'")
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(py_repr).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("'{k}': {}", py_repr(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

/// Why a task did not return a value. Serializable because the prefork
/// pool carries it from a child process to the parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskError {
    /// The task failed; the result becomes FAILURE with this exception.
    Failed {
        exception: PyException,
        traceback: Option<String>,
    },
    /// The task asks to be run again later (Celery's `self.retry`).
    Retry {
        /// Seconds from now; `None` uses the task's default delay/backoff.
        countdown: Option<f64>,
        /// The reason, stored with the RETRY state and raised when the
        /// retry budget is spent.
        reason: Option<PyException>,
        /// Overrides the task's `max_retries` for this call; `Some(None)`
        /// retries for ever. Absent from the prefork pipe's JSON when
        /// `None`, so the two stay apart (both would be `null`).
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "override_option"
        )]
        max_retries: Option<Option<u32>>,
    },
    /// The message should not be processed by this worker (Celery's
    /// `Reject`); with `requeue` it goes back to the queue.
    Reject { requeue: bool, reason: String },
    /// The soft time limit fired and the task stopped cooperatively.
    SoftTimeLimitExceeded,
}

/// Serde for an override that may itself be "none": present (`null`
/// included) is `Some`, absent is `None` (with `default` and
/// `skip_serializing_if`).
mod override_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

impl TaskError {
    /// `builtins.RuntimeError(message)`.
    pub fn runtime(message: impl Into<String>) -> Self {
        Self::failed(PyException::builtin("RuntimeError", message))
    }

    /// `builtins.ValueError(message)`.
    pub fn value(message: impl Into<String>) -> Self {
        Self::failed(PyException::builtin("ValueError", message))
    }

    /// `builtins.TypeError(message)`: what Python raises for bad arguments.
    pub fn type_error(message: impl Into<String>) -> Self {
        Self::failed(PyException::builtin("TypeError", message))
    }

    pub fn failed(exception: PyException) -> Self {
        Self::Failed {
            exception,
            traceback: None,
        }
    }
}

/// Where progress reports go; the worker turns them into PROGRESS states.
pub trait ProgressSink: Send + Sync {
    fn progress(&self, meta: Value);
}

/// A sink that drops reports, for running tasks outside a worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn progress(&self, _meta: Value) {}
}

/// A flag the worker raises when the soft time limit fires or the task is
/// revoked. Tasks that loop check it between units of work.
#[derive(Debug, Default)]
pub struct CancelFlag(AtomicBool);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// Lowers the flag, for a runner that reuses one flag across jobs.
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What a running task may know about its request and do besides
/// computing its value.
#[derive(Clone, Copy)]
pub struct TaskContext<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// How many times this request was retried before (Celery's
    /// `self.request.retries`).
    pub retries: u32,
    pub cancel: &'a CancelFlag,
    pub progress: &'a dyn ProgressSink,
}

impl std::fmt::Debug for TaskContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl TaskContext<'_> {
    /// Returns `SoftTimeLimitExceeded` once the worker asked the task to
    /// stop; call it between pages, chunks or batches.
    pub fn checkpoint(&self) -> Result<(), TaskError> {
        if self.cancel.is_cancelled() {
            Err(TaskError::SoftTimeLimitExceeded)
        } else {
            Ok(())
        }
    }

    /// Reports progress (becomes the PROGRESS state's `result`).
    pub fn report_progress(&self, meta: Value) {
        self.progress.progress(meta);
    }
}

/// A task: a name, typed arguments, a typed result.
///
/// Adding a task is one file: implement this trait and register the value
/// in [`crate::registry::Registry`]. Building the value is the task's
/// per-process initialisation (load a model there, not in `run`).
pub trait Task: Send + Sync + 'static {
    /// The name producers use, e.g. `tori.echo`.
    const NAME: &'static str;
    /// Parameter names in positional order, used to bind Celery's
    /// `(args, kwargs)` onto [`Task::Args`].
    const PARAMS: &'static [&'static str];
    type Args: DeserializeOwned;
    type Output: Serialize;

    fn options(&self) -> TaskOptions {
        TaskOptions::default()
    }

    /// Turns Celery's positional and keyword arguments into `Args`, the way
    /// Python binds a call: positionals fill `PARAMS` in order, keywords
    /// by name, and mistakes are a `TypeError`.
    fn bind(args: Vec<Value>, kwargs: Map<String, Value>) -> Result<Self::Args, TaskError> {
        bind_by_name(Self::NAME, Self::PARAMS, args, kwargs)
    }

    fn run(&self, ctx: &TaskContext<'_>, args: Self::Args) -> Result<Self::Output, TaskError>;
}

/// Python-like binding of positional and keyword arguments to names.
pub fn bind_by_name<A: DeserializeOwned>(
    task: &str,
    params: &[&str],
    args: Vec<Value>,
    kwargs: Map<String, Value>,
) -> Result<A, TaskError> {
    if args.len() > params.len() {
        return Err(TaskError::type_error(format!(
            "{task}() takes {} positional argument{} but {} were given",
            params.len(),
            if params.len() == 1 { "" } else { "s" },
            args.len()
        )));
    }
    let mut bound = Map::new();
    for (name, value) in params.iter().zip(args) {
        bound.insert((*name).to_owned(), value);
    }
    for (name, value) in kwargs {
        if bound.contains_key(&name) {
            return Err(TaskError::type_error(format!(
                "{task}() got multiple values for argument '{name}'"
            )));
        }
        if !params.contains(&name.as_str()) {
            return Err(TaskError::type_error(format!(
                "{task}() got an unexpected keyword argument '{name}'"
            )));
        }
        bound.insert(name, value);
    }
    serde_json::from_value(Value::Object(bound))
        .map_err(|e| TaskError::type_error(format!("{task}(): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Args {
        a: i64,
        #[serde(default)]
        b: Option<String>,
    }

    fn bind(args: Value, kwargs: Value) -> Result<Args, TaskError> {
        let Value::Array(args) = args else { panic!() };
        let Value::Object(kwargs) = kwargs else {
            panic!()
        };
        bind_by_name("t", &["a", "b"], args, kwargs)
    }

    #[test]
    fn binds_positional_then_keyword() {
        assert_eq!(
            bind(json!([1]), json!({"b": "x"})).unwrap(),
            Args {
                a: 1,
                b: Some("x".into())
            }
        );
    }

    #[test]
    fn too_many_positionals_is_a_type_error() {
        let err = bind(json!([1, "x", 3]), json!({})).unwrap_err();
        let TaskError::Failed { exception, .. } = err else {
            panic!()
        };
        assert_eq!(exception.name, "TypeError");
        assert!(exception
            .message()
            .contains("takes 2 positional arguments but 3"));
    }

    #[test]
    fn duplicate_and_unknown_keywords_are_type_errors() {
        assert!(bind(json!([1]), json!({"a": 2})).is_err());
        assert!(bind(json!([1]), json!({"zz": 2})).is_err());
    }

    #[test]
    fn missing_required_is_a_type_error() {
        assert!(bind(json!([]), json!({})).is_err());
    }

    #[test]
    fn repr_looks_like_python() {
        let e = PyException::builtin("RuntimeError", "it's bad");
        assert_eq!(e.repr(), "RuntimeError('it\\'s bad')");
        assert_eq!(
            py_repr(&json!([1, null, true, {"k": "v"}])),
            "[1, None, True, {'k': 'v'}]"
        );
    }
}
