//! Property tests of the pool's pipe (issue #25): whatever a job or a
//! result can hold within the nesting the worker accepts crosses the pipe
//! unchanged, in both directions, through the blocking reader (the child)
//! and the async one (the parent). Kept apart from `ipc` so that the frame
//! format can change without touching them.

use proptest::prelude::*;
use serde_json::{Map, Value};
use tasks::{PyException, TaskError};

use super::ipc::{read_frame, read_frame_async, write_frame, FromChild, JobSpec, ToChild};
use crate::protocol::strategies::{finite_f64, json_within, text};

/// Frames nest a value two or three levels deep themselves (`{"Done":
/// {"Ok": value}}`); 64 leaves the rest of serde_json's 128 to spare.
const DEPTH: u32 = 64;

fn object(depth: u32) -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::vec((text(), json_within(depth)), 0..4)
        .prop_map(|kv| kv.into_iter().collect())
}

fn exception() -> impl Strategy<Value = PyException> {
    (
        text(),
        text(),
        proptest::collection::vec(json_within(DEPTH), 0..3),
    )
        .prop_map(|(module, name, args)| PyException { module, name, args })
}

fn task_error() -> impl Strategy<Value = TaskError> {
    prop_oneof![
        (exception(), proptest::option::of(text())).prop_map(|(exception, traceback)| {
            TaskError::Failed {
                exception,
                traceback,
            }
        }),
        (
            proptest::option::of(finite_f64()),
            proptest::option::of(exception()),
            proptest::option::of(proptest::option::of(any::<u32>())),
        )
            .prop_map(|(countdown, reason, max_retries)| TaskError::Retry {
                countdown,
                reason,
                max_retries,
            }),
        (any::<bool>(), text()).prop_map(|(requeue, reason)| TaskError::Reject { requeue, reason }),
        Just(TaskError::SoftTimeLimitExceeded),
    ]
}

fn to_child() -> impl Strategy<Value = ToChild> {
    (
        text(),
        text(),
        proptest::collection::vec(json_within(DEPTH), 0..4),
        object(DEPTH),
        any::<u32>(),
    )
        .prop_map(|(id, name, args, kwargs, retries)| {
            ToChild::Run(JobSpec {
                id,
                name,
                args,
                kwargs,
                retries,
            })
        })
}

fn from_child() -> impl Strategy<Value = FromChild> {
    prop_oneof![
        any::<u32>().prop_map(|pid| FromChild::Ready { pid }),
        json_within(DEPTH).prop_map(FromChild::Progress),
        json_within(DEPTH).prop_map(|v| FromChild::Done(Ok(v))),
        task_error().prop_map(|e| FromChild::Done(Err(e))),
        text().prop_map(FromChild::Panicked),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(crate::protocol::strategies::config())]
    #[test]
    fn jobs_cross_the_pipe_unchanged(frames in proptest::collection::vec(to_child(), 1..4)) {
        let mut buf = Vec::new();
        for frame in &frames {
            write_frame(&mut buf, frame).expect("write");
        }
        let mut r = &buf[..];
        for frame in &frames {
            let read = read_frame::<ToChild>(&mut r).expect("read");
            prop_assert_eq!(read.as_ref(), Some(frame));
        }
        prop_assert!(read_frame::<ToChild>(&mut r).expect("end").is_none());
        let mut r = &buf[..];
        let first = runtime().block_on(read_frame_async::<ToChild>(&mut r)).expect("async read");
        prop_assert_eq!(first.as_ref(), frames.first());
    }

    #[test]
    fn results_cross_the_pipe_unchanged(frames in proptest::collection::vec(from_child(), 1..4)) {
        let mut buf = Vec::new();
        for frame in &frames {
            write_frame(&mut buf, frame).expect("write");
        }
        let rt = runtime();
        let mut r = &buf[..];
        for frame in &frames {
            let read = rt.block_on(read_frame_async::<FromChild>(&mut r)).expect("read");
            prop_assert_eq!(read.as_ref(), Some(frame));
        }
        prop_assert!(rt.block_on(read_frame_async::<FromChild>(&mut r)).expect("end").is_none());
    }
}

/// `retry(max_retries=None)` means "retry for ever" (`Some(None)`), not
/// "the task's default" (`None`): the difference must survive the pipe,
/// or a prefork task that asks to retry for ever stops at the default 3.
#[test]
fn unlimited_retries_survive_the_pipe() {
    for max_retries in [None, Some(None), Some(Some(0)), Some(Some(7))] {
        let frame = FromChild::Done(Err(TaskError::Retry {
            countdown: None,
            reason: None,
            max_retries,
        }));
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).expect("write");
        let read = read_frame::<FromChild>(&mut &buf[..]).expect("read");
        assert_eq!(read, Some(frame), "{max_retries:?}");
    }
}

/// Floats the property tests found changed by one ULP on the way
/// through, before serde_json's `float_roundtrip`.
#[test]
fn floats_cross_the_pipe_exactly() {
    for f in [
        2.656926209546977e-52,
        1.8976910564100087e-72,
        -3.9742705791554596e31,
    ] {
        let frame = FromChild::Done(Ok(serde_json::json!([f])));
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).expect("write");
        let read = read_frame::<FromChild>(&mut &buf[..]).expect("read");
        assert_eq!(read, Some(frame), "{f:e}");
    }
}
