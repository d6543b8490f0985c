//! Cheap built-in tasks for operations, tests and benchmarks (`tori.*`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::registry::Registry;
use crate::task::{PyException, Task, TaskContext, TaskError};

/// How many times this process built a registry: each build is the
/// per-process initialisation of every task, so with a warm pool it stays
/// at 1 however many tasks run (`tori.whoami` reports it).
static REGISTRY_INITS: AtomicU64 = AtomicU64::new(0);

pub fn register(registry: &mut Registry) {
    REGISTRY_INITS.fetch_add(1, Ordering::SeqCst);
    registry
        .register(WhoAmI)
        .register(Echo)
        .register(Noop)
        .register(Sleep)
        .register(Fail)
        .register(Flaky);
}

/// `tori.echo(*args, **kwargs)` → `{"args": args, "kwargs": kwargs}`.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

#[derive(Debug, Serialize, Deserialize)]
pub struct Echoed {
    args: Vec<Value>,
    kwargs: Map<String, Value>,
}

impl Task for Echo {
    const NAME: &'static str = "tori.echo";
    const PARAMS: &'static [&'static str] = &["*args", "**kwargs"];
    type Args = Echoed;
    type Output = Echoed;

    fn bind(args: Vec<Value>, kwargs: Map<String, Value>) -> Result<Echoed, TaskError> {
        Ok(Echoed { args, kwargs })
    }

    fn run(&self, _ctx: &TaskContext<'_>, args: Echoed) -> Result<Echoed, TaskError> {
        Ok(args)
    }
}

/// Deserializes `Args = ()` from an empty argument object.
#[derive(Debug, Deserialize)]
pub struct NoArgs {}

/// `tori.noop()` → `None`: the cheapest task, for throughput benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct Noop;

impl Task for Noop {
    const NAME: &'static str = "tori.noop";
    const PARAMS: &'static [&'static str] = &[];
    type Args = NoArgs;
    type Output = ();

    fn run(&self, _ctx: &TaskContext<'_>, _args: NoArgs) -> Result<(), TaskError> {
        Ok(())
    }
}

/// `tori.sleep(seconds)` → `seconds`. Sleeps in short steps so a soft time
/// limit or revoke stops it promptly, like a well-behaved long task.
#[derive(Debug, Clone, Copy)]
pub struct Sleep;

#[derive(Debug, Deserialize)]
pub struct SleepArgs {
    /// Kept as given so `sleep(1)` returns `1`, not `1.0`, like Python.
    seconds: serde_json::Number,
}

impl Task for Sleep {
    const NAME: &'static str = "tori.sleep";
    const PARAMS: &'static [&'static str] = &["seconds"];
    type Args = SleepArgs;
    type Output = serde_json::Number;

    fn run(&self, ctx: &TaskContext<'_>, args: SleepArgs) -> Result<serde_json::Number, TaskError> {
        let seconds = args.seconds.as_f64().unwrap_or(f64::NAN);
        if !seconds.is_finite() || seconds < 0.0 {
            return Err(TaskError::value(format!(
                "seconds must be a finite number >= 0, got {}",
                args.seconds
            )));
        }
        let deadline = Duration::try_from_secs_f64(seconds)
            .ok()
            .and_then(|d| Instant::now().checked_add(d))
            .ok_or_else(|| {
                TaskError::value(format!(
                    "seconds is too large to sleep for: {}",
                    args.seconds
                ))
            })?;
        loop {
            ctx.checkpoint()?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(args.seconds);
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
    }
}

/// `tori.fail(message)` raises; Python re-raises `RuntimeError(message)`.
#[derive(Debug, Clone, Copy)]
pub struct Fail;

#[derive(Debug, Deserialize)]
pub struct FailArgs {
    #[serde(default = "default_fail_message")]
    message: String,
}

fn default_fail_message() -> String {
    "tori.fail was asked to fail".into()
}

impl Task for Fail {
    const NAME: &'static str = "tori.fail";
    const PARAMS: &'static [&'static str] = &["message"];
    type Args = FailArgs;
    type Output = ();

    fn run(&self, _ctx: &TaskContext<'_>, args: FailArgs) -> Result<(), TaskError> {
        Err(TaskError::runtime(args.message))
    }
}

/// `tori.whoami()` → `{"pid": …, "registry_inits": …}`: which process ran
/// the task and how often that process initialised its tasks.
#[derive(Debug, Clone, Copy)]
pub struct WhoAmI;

impl Task for WhoAmI {
    const NAME: &'static str = "tori.whoami";
    const PARAMS: &'static [&'static str] = &[];
    type Args = NoArgs;
    type Output = Value;

    fn run(&self, _ctx: &TaskContext<'_>, _args: NoArgs) -> Result<Value, TaskError> {
        Ok(serde_json::json!({
            "pid": std::process::id(),
            "registry_inits": REGISTRY_INITS.load(Ordering::SeqCst),
        }))
    }
}

/// `tori.flaky(times, countdown=0.2)`: retries itself until it has been
/// retried `times` times, then returns that count. Exercises the retry path
/// (republish, RETRY state, `max_retries`) end to end.
#[derive(Debug, Clone, Copy)]
pub struct Flaky;

#[derive(Debug, Deserialize)]
pub struct FlakyArgs {
    times: u32,
    #[serde(default = "default_flaky_countdown")]
    countdown: f64,
}

fn default_flaky_countdown() -> f64 {
    0.2
}

impl Task for Flaky {
    const NAME: &'static str = "tori.flaky";
    const PARAMS: &'static [&'static str] = &["times", "countdown"];
    type Args = FlakyArgs;
    type Output = u32;

    fn run(&self, ctx: &TaskContext<'_>, args: FlakyArgs) -> Result<u32, TaskError> {
        if ctx.retries >= args.times {
            return Ok(ctx.retries);
        }
        Err(TaskError::Retry {
            countdown: Some(args.countdown),
            reason: Some(PyException::builtin(
                "RuntimeError",
                format!("flaky: attempt {} of {}", ctx.retries + 1, args.times + 1),
            )),
            max_retries: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{CancelFlag, NoProgress};
    use crate::DynTask;
    use serde_json::json;

    fn call(
        task: &dyn DynTask,
        retries: u32,
        args: Value,
        kwargs: Value,
    ) -> Result<Value, TaskError> {
        let cancel = CancelFlag::new();
        let ctx = TaskContext {
            id: "id",
            name: task.name(),
            retries,
            cancel: &cancel,
            progress: &NoProgress,
        };
        let (Value::Array(a), Value::Object(k)) = (args, kwargs) else {
            panic!("bad test input")
        };
        task.call(&ctx, a, k)
    }

    #[test]
    fn echo_returns_its_arguments() {
        let out = call(&Echo, 0, json!([1, "a"]), json!({"k": [1, 2]})).unwrap();
        assert_eq!(out, json!({"args": [1, "a"], "kwargs": {"k": [1, 2]}}));
    }

    #[test]
    fn noop_returns_null_and_rejects_arguments() {
        assert_eq!(call(&Noop, 0, json!([]), json!({})).unwrap(), Value::Null);
        assert!(call(&Noop, 0, json!([1]), json!({})).is_err());
    }

    #[test]
    fn fail_raises_runtime_error_with_message() {
        let err = call(&Fail, 0, json!(["boom"]), json!({})).unwrap_err();
        assert_eq!(err, TaskError::runtime("boom"));
    }

    #[test]
    fn sleep_stops_when_cancelled() {
        let cancel = CancelFlag::new();
        cancel.cancel();
        let ctx = TaskContext {
            id: "id",
            name: "tori.sleep",
            retries: 0,
            cancel: &cancel,
            progress: &NoProgress,
        };
        let out = Sleep.run(&ctx, SleepArgs { seconds: 10.into() });
        assert_eq!(out, Err(TaskError::SoftTimeLimitExceeded));
    }

    #[test]
    fn flaky_retries_then_succeeds() {
        assert!(matches!(
            call(&Flaky, 1, json!([2]), json!({})),
            Err(TaskError::Retry { .. })
        ));
        assert_eq!(call(&Flaky, 2, json!([2]), json!({})).unwrap(), json!(2));
    }
}
