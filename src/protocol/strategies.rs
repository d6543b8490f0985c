//! proptest strategies for JSON values, shared by the property tests of
//! the wire formats and of the pool's pipe (issue #25).

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Value};

/// proptest's defaults, without its failure files (they would go to a
/// `proptest-regressions/` directory at the top of the repository): a
/// failure found becomes a named regression test instead.
pub(crate) fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// Strings a producer may send: ASCII, non-ASCII, astral-plane characters
/// (two UTF-16 units in `\u` escapes), quotes and control characters.
pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,8}",
        any::<String>(),
        proptest::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('\n'),
                Just('\u{0}'),
                Just('\u{7f}'),
                Just('é'),
                Just('\u{2028}'),
                Just('😀'),
                Just('\u{10ffff}'),
            ],
            0..6
        )
        .prop_map(|cs| cs.into_iter().collect()),
    ]
}

/// Any finite `f64` (JSON has no NaN or infinity).
pub(crate) fn finite_f64() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite_f64().prop_map(Value::from),
        text().prop_map(Value::String),
    ]
}

/// A JSON value nested at most `depth` deep (a scalar is depth 0), wide
/// or narrow: a small tree, wrapped in arrays and objects down to the
/// depth drawn, so deep values are as likely as shallow ones.
pub(crate) fn json_within(depth: u32) -> impl Strategy<Value = Value> {
    let tree_depth = depth.min(3);
    let tree = leaf().prop_recursive(tree_depth, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((text(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    });
    let wraps = depth - tree_depth;
    (
        tree,
        proptest::collection::vec(
            prop_oneof![Just(None), text().prop_map(Some)],
            0..=wraps as usize,
        ),
    )
        .prop_map(|(mut value, layers)| {
            for layer in layers {
                value = match layer {
                    None => Value::Array(vec![value]),
                    Some(key) => Value::Object(Map::from_iter([(key, value)])),
                };
            }
            value
        })
}
