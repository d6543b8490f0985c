//! Redis key names of kombu's Redis transport (SPEC §1).

/// Separator kombu puts between a queue name and its priority step, and
/// between the parts of a binding-table member: ACK + SYN.
pub const SEP: &str = "\x06\x16";

/// kombu's default `priority_steps`.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The list holding messages of `queue` with `priority`: the queue name
/// for step 0, else `queue SEP step` with the largest step <= priority.
pub fn queue_list_key(prefix: &str, queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS
        .iter()
        .copied()
        .filter(|s| *s <= priority)
        .max()
        .unwrap_or(0);
    if step == 0 {
        format!("{prefix}{queue}")
    } else {
        format!("{prefix}{queue}{SEP}{step}")
    }
}

/// Strips the prefix and any priority suffix from a list key.
pub fn queue_of_list_key<'a>(prefix: &str, key: &'a str) -> &'a str {
    let key = key.strip_prefix(prefix).unwrap_or(key);
    match key.rfind(SEP) {
        Some(i) => &key[..i],
        None => key,
    }
}

/// Every list key of `queues`, step-major: all queues' step-0 lists first,
/// then step 3, and so on — the order kombu BRPOPs them in, so lower
/// numbers are served first.
pub fn consume_keys(prefix: &str, queues: &[String]) -> Vec<String> {
    PRIORITY_STEPS
        .iter()
        .flat_map(|step| queues.iter().map(move |q| queue_list_key(prefix, q, *step)))
        .collect()
}

/// Binding-table set of an exchange.
pub fn binding_key(prefix: &str, exchange: &str) -> String {
    format!("{prefix}_kombu.binding.{exchange}")
}

pub fn binding_permanent_key(prefix: &str, exchange: &str) -> String {
    format!("{prefix}_kombu.binding_permanent.{exchange}")
}

/// A binding-table member: `routing_key SEP pattern SEP queue`.
pub fn binding_member(routing_key: &str, pattern: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{pattern}{SEP}{queue}")
}

/// Splits a binding member into (routing_key, pattern, queue).
pub fn parse_binding_member(member: &str) -> Option<(&str, &str, &str)> {
    let mut parts = member.splitn(3, SEP);
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// The shared keys every kombu consumer of a database uses, plus ours.
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
    pub unacked: String,
    pub unacked_index: String,
    pub unacked_mutex: String,
    /// Our dead-letter list (see README): messages no worker can run.
    pub dead_letter: String,
    /// Our sorted set of far-future ETA messages, scored by due time.
    pub eta_parked: String,
    /// Prefix of our per-task counters of deliveries that killed their
    /// process (`tori.lost.<task id>`), for the poison-message guard:
    /// Redis keeps no redelivery count, so we do.
    pub lost_prefix: String,
    /// Per delivery tag, how many rounds of a message ended unsettled
    /// because settling its handler's panic panicked too
    /// (`tori.unsettled.<tag>`), for the same guard.
    pub unsettled_prefix: String,
}

impl Keys {
    pub fn new(prefix: &str, dead_letter: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            unacked: format!("{prefix}unacked"),
            unacked_index: format!("{prefix}unacked_index"),
            unacked_mutex: format!("{prefix}unacked_mutex"),
            dead_letter: format!("{prefix}{dead_letter}"),
            eta_parked: format!("{prefix}tori.eta"),
            lost_prefix: format!("{prefix}tori.lost."),
            unsettled_prefix: format!("{prefix}tori.unsettled."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_lists_match_kombu() {
        assert_eq!(queue_list_key("", "celery", 0), "celery");
        assert_eq!(queue_list_key("", "celery", 2), "celery");
        assert_eq!(queue_list_key("", "celery", 7), "celery\x06\x166");
        assert_eq!(queue_list_key("", "celery", 9), "celery\x06\x169");
        assert_eq!(queue_of_list_key("", "celery\x06\x166"), "celery");
        assert_eq!(queue_of_list_key("p:", "p:extra"), "extra");
    }

    #[test]
    fn consume_order_is_step_major_like_kombu_brpop() {
        let keys = consume_keys("", &["celery".into(), "extra".into()]);
        assert_eq!(
            keys,
            vec![
                "celery",
                "extra",
                "celery\x06\x163",
                "extra\x06\x163",
                "celery\x06\x166",
                "extra\x06\x166",
                "celery\x06\x169",
                "extra\x06\x169"
            ]
        );
    }

    #[test]
    fn binding_members_round_trip() {
        let m = binding_member("celery", "", "celery");
        assert_eq!(m, "celery\x06\x16\x06\x16celery");
        assert_eq!(parse_binding_member(&m), Some(("celery", "", "celery")));
    }
}
