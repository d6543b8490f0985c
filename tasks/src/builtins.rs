//! Celery's built-in tasks that carry other tasks: `celery.map` and
//! `celery.starmap`. The client sends them for `task.map(items)`,
//! `task.starmap(items)` and `task.chunks(items, n)` (a group of
//! `celery.starmap`, one per chunk); the worker runs the named task once
//! per item, in the same process and one after the other, and the result
//! is the list of what each call returned (Celery's `xmap`/`xstarmap` in
//! `celery.app.builtins`). Only the item is passed: the signature's own
//! args and options are not used, as in Celery, which calls the task
//! object directly.

use serde_json::{Map, Value};

use crate::registry::{DynTask, Registry};
use crate::task::{PyException, TaskContext, TaskError, TaskOptions};

pub const MAP: &str = "celery.map";
pub const STARMAP: &str = "celery.starmap";

/// `celery.map` (each item is the one argument) or `celery.starmap`
/// (each item is the argument list), over the tasks of `registry`.
pub(crate) struct MapTask {
    pub(crate) star: bool,
    pub(crate) registry: Registry,
}

impl MapTask {
    fn task_name(&self) -> &'static str {
        if self.star {
            STARMAP
        } else {
            MAP
        }
    }
}

/// `(task, it)` from the message, positional (what the client sends) or
/// by name.
fn bind(
    name: &str,
    mut args: Vec<Value>,
    mut kwargs: Map<String, Value>,
) -> Result<(Value, Vec<Value>), TaskError> {
    let mut take = |index: usize, key: &str| {
        kwargs
            .remove(key)
            .or_else(|| (index < args.len()).then(|| std::mem::take(&mut args[index])))
            .ok_or_else(|| {
                TaskError::type_error(format!("{name}() missing required argument: '{key}'"))
            })
    };
    let task = take(0, "task")?;
    let it = match take(1, "it")? {
        Value::Array(items) => items,
        other => {
            return Err(TaskError::type_error(format!(
                "{name}(): 'it' must be a list, not {other}"
            )))
        }
    };
    Ok((task, it))
}

impl DynTask for MapTask {
    fn name(&self) -> &'static str {
        self.task_name()
    }

    fn params(&self) -> &'static [&'static str] {
        &["task", "it"]
    }

    fn options(&self) -> TaskOptions {
        TaskOptions::default()
    }

    fn call(
        &self,
        ctx: &TaskContext<'_>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError> {
        let (task, items) = bind(self.task_name(), args, kwargs)?;
        let inner = task
            .get("task")
            .or(Some(&task))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                TaskError::type_error(format!(
                    "{}(): 'task' is not a task signature: {task}",
                    self.task_name()
                ))
            })?;
        let target = self.registry.get(inner).ok_or_else(|| {
            TaskError::failed(PyException::new(
                "celery.exceptions",
                "NotRegistered",
                inner.to_owned(),
            ))
        })?;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            if ctx.cancel.is_cancelled() {
                return Err(TaskError::SoftTimeLimitExceeded);
            }
            let args = match (self.star, item) {
                (false, item) => vec![item],
                (true, Value::Array(args)) => args,
                (true, other) => {
                    return Err(TaskError::type_error(format!(
                        "{}(): each item must be a list of arguments, not {other}",
                        STARMAP
                    )))
                }
            };
            results.push(target.call(ctx, args, Map::new())?);
        }
        Ok(Value::Array(results))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{CancelFlag, NoProgress};
    use serde_json::json;

    fn run(registry: &Registry, name: &str, args: Value) -> Result<Value, TaskError> {
        let cancel = CancelFlag::new();
        let progress = NoProgress;
        let ctx = TaskContext {
            id: "t",
            name,
            retries: 0,
            cancel: &cancel,
            progress: &progress,
        };
        let task = registry.get(name).expect("built-ins are always there");
        let Value::Array(args) = args else { panic!() };
        task.call(&ctx, args, Map::new())
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register(crate::diagnostics::Echo)
            .register(crate::diagnostics::Fail);
        r
    }

    #[test]
    fn starmap_calls_the_task_once_per_argument_list() {
        // What `echo.chunks(...)` sends for one chunk: the signature as a
        // dict, then the chunk's argument lists.
        let sig = json!({"task": "tori.echo", "args": [], "kwargs": {}, "options": {}});
        let got = run(&registry(), STARMAP, json!([sig, [[1, 2], [3]]])).unwrap();
        assert_eq!(
            got,
            json!([{"args": [1, 2], "kwargs": {}}, {"args": [3], "kwargs": {}}])
        );
    }

    #[test]
    fn map_passes_each_item_as_the_one_argument() {
        let sig = json!({"task": "tori.echo"});
        let got = run(&registry(), MAP, json!([sig, [[1, 2], "x"]])).unwrap();
        assert_eq!(
            got,
            json!([{"args": [[1, 2]], "kwargs": {}}, {"args": ["x"], "kwargs": {}}])
        );
    }

    #[test]
    fn the_first_failure_fails_the_whole_call_and_unknown_tasks_say_so() {
        let sig = json!({"task": "tori.fail"});
        let err = run(&registry(), STARMAP, json!([sig, [["boom"]]])).unwrap_err();
        assert!(format!("{err:?}").contains("boom"), "{err:?}");
        let missing = run(&registry(), MAP, json!([{"task": "nope"}, [1]])).unwrap_err();
        assert!(
            format!("{missing:?}").contains("NotRegistered"),
            "{missing:?}"
        );
    }
}
