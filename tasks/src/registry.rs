//! The set of tasks a worker process can run, looked up by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::task::{Task, TaskContext, TaskError, TaskOptions};

/// A task with its types erased, so tasks of any signature share one map.
pub trait DynTask: Send + Sync {
    fn name(&self) -> &'static str;
    fn params(&self) -> &'static [&'static str];
    fn options(&self) -> TaskOptions;
    fn call(
        &self,
        ctx: &TaskContext<'_>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError>;
}

impl<T: Task> DynTask for T {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn params(&self) -> &'static [&'static str] {
        T::PARAMS
    }
    fn options(&self) -> TaskOptions {
        Task::options(self)
    }
    fn call(
        &self,
        ctx: &TaskContext<'_>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError> {
        let bound = T::bind(args, kwargs)?;
        let output = self.run(ctx, bound)?;
        serde_json::to_value(output)
            .map_err(|e| TaskError::type_error(format!("{}: result is not JSON: {e}", T::NAME)))
    }
}

/// One registry entry as `tori-worker tasks --json` prints it; the Python
/// bridge's stubs are checked against this so the two sides cannot drift.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskInfo {
    pub name: String,
    pub params: Vec<String>,
    pub aliases: Vec<String>,
    pub acks_late: Option<bool>,
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    pub rate_limit: Option<String>,
    pub ignore_result: bool,
    pub max_retries: Option<u32>,
}

/// Tasks by name (aliases included).
#[derive(Default, Clone)]
pub struct Registry {
    tasks: BTreeMap<String, Arc<dyn DynTask>>,
    aliases: BTreeMap<String, String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("tasks", &self.tasks.keys().collect::<Vec<_>>())
            .field("aliases", &self.aliases)
            .finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a task; a second task with the same name replaces the first.
    pub fn register<T: Task>(&mut self, task: T) -> &mut Self {
        self.tasks.insert(T::NAME.to_owned(), Arc::new(task));
        self
    }

    /// Makes `alias` resolve to the task registered as `name`.
    pub fn alias(&mut self, alias: &str, name: &str) -> &mut Self {
        self.aliases.insert(alias.to_owned(), name.to_owned());
        self
    }

    /// The task registered as (or aliased to) `name`; Celery's
    /// `celery.map` and `celery.starmap` are always there, running the
    /// tasks of this registry (`builtins`).
    pub fn get(&self, name: &str) -> Option<Arc<dyn DynTask>> {
        if name == crate::builtins::MAP || name == crate::builtins::STARMAP {
            return Some(Arc::new(crate::builtins::MapTask {
                star: name == crate::builtins::STARMAP,
                registry: self.clone(),
            }));
        }
        let canonical = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        self.tasks.get(canonical).cloned()
    }

    /// Names of registered tasks (not aliases), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    pub fn describe(&self) -> Vec<TaskInfo> {
        self.tasks
            .values()
            .map(|t| {
                let o = t.options();
                TaskInfo {
                    name: t.name().to_owned(),
                    params: t.params().iter().map(|p| (*p).to_owned()).collect(),
                    aliases: self
                        .aliases
                        .iter()
                        .filter(|(_, target)| target.as_str() == t.name())
                        .map(|(a, _)| a.clone())
                        .collect(),
                    acks_late: o.acks_late,
                    time_limit: o.time_limit,
                    soft_time_limit: o.soft_time_limit,
                    rate_limit: o.rate_limit,
                    ignore_result: o.ignore_result,
                    max_retries: o.max_retries,
                }
            })
            .collect()
    }
}
