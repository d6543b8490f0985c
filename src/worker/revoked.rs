//! Revoked task ids, bounded like Celery's (50 000 ids, 3 hours).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_REVOKED: usize = 50_000;
const REVOKED_TTL: Duration = Duration::from_secs(3 * 3600);

#[derive(Debug, Default)]
pub struct Revoked {
    inner: Mutex<(HashMap<String, Instant>, VecDeque<String>)>,
}

impl Revoked {
    pub fn add(&self, id: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        if map.insert(id.to_owned(), Instant::now()).is_none() {
            order.push_back(id.to_owned());
        }
        while order.len() > MAX_REVOKED {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        let now = Instant::now();
        while let Some(front) = order.front() {
            match map.get(front) {
                Some(at) if now.duration_since(*at) > REVOKED_TTL => {
                    let old = order.pop_front().unwrap_or_default();
                    map.remove(&old);
                }
                _ => break,
            }
        }
        map.contains_key(id)
    }

    pub fn ids(&self) -> Vec<String> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_bounds() {
        let r = Revoked::default();
        r.add("a");
        r.add("a");
        assert!(r.contains("a"));
        assert!(!r.contains("b"));
        assert_eq!(r.ids(), vec!["a"]);
        for i in 0..MAX_REVOKED + 10 {
            r.add(&i.to_string());
        }
        assert!(!r.contains("a"));
        assert_eq!(r.ids().len(), MAX_REVOKED);
    }
}
