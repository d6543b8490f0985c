//! Revoked task ids, bounded like Celery's (50 000 ids, 3 hours), and
//! optionally kept across restarts in a state file (`--statedb`, Celery's
//! name): without it a revoke sent while no worker is up, or just before
//! a restart, is forgotten and the task runs.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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

    /// The ids with the wall-clock time they were revoked, oldest first.
    fn snapshot(&self) -> Vec<(String, f64)> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &*g;
        let (now, wall) = (Instant::now(), unix_now());
        order
            .iter()
            .filter_map(|id| {
                let age = now.duration_since(*map.get(id)?);
                (age <= REVOKED_TTL).then(|| (id.clone(), wall - age.as_secs_f64()))
            })
            .collect()
    }

    /// Adds ids revoked at the given wall-clock times, skipping expired ones.
    fn restore(&self, entries: &[(String, f64)]) -> usize {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        let (now, wall) = (Instant::now(), unix_now());
        let mut added = 0;
        for (id, at) in entries {
            // `at` comes from another process: a time that is no number
            // of seconds ago counts as too old, not as a panic.
            let age = Duration::try_from_secs_f64((wall - at).max(0.0)).unwrap_or(Duration::MAX);
            if age > REVOKED_TTL || map.contains_key(id) {
                continue;
            }
            let Some(when) = now.checked_sub(age) else {
                continue;
            };
            map.insert(id.clone(), when);
            order.push_back(id.clone());
            added += 1;
        }
        while order.len() > MAX_REVOKED {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        added
    }
}

/// What `--statedb` holds (JSON): revoked ids and the Lamport clock.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    /// `[id, unix time revoked]`.
    pub revoked: Vec<(String, f64)>,
    pub clock: u64,
}

impl StateFile {
    /// Reads `path`; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("state file {} is not valid: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read state file {}: {e}", path.display())),
        }
    }

    /// Writes `path` atomically (a crash leaves the old or the new file).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("cannot write state file {}: {e}", path.display()))
    }
}

impl Revoked {
    /// The state to persist.
    pub fn to_state(&self, clock: u64) -> StateFile {
        StateFile {
            revoked: self.snapshot(),
            clock,
        }
    }

    /// Takes the revoked ids of a loaded state; returns how many are live.
    pub fn load_state(&self, state: &StateFile) -> usize {
        self.restore(&state.revoked)
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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

    #[test]
    fn state_round_trips_and_drops_expired_ids() {
        let r = Revoked::default();
        r.add("x");
        r.add("y");
        let dir = std::env::temp_dir().join(format!("tori-statedb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let mut state = r.to_state(7);
        state
            .revoked
            .push(("old".into(), unix_now() - REVOKED_TTL.as_secs_f64() - 5.0));
        state.save(&path).unwrap();
        let loaded = StateFile::load(&path).unwrap();
        assert_eq!(loaded.clock, 7);
        let fresh = Revoked::default();
        assert_eq!(fresh.load_state(&loaded), 2);
        assert!(fresh.contains("x") && fresh.contains("y") && !fresh.contains("old"));
        assert_eq!(fresh.ids(), vec!["x", "y"]);
        assert!(StateFile::load(&dir.join("missing.json"))
            .unwrap()
            .revoked
            .is_empty());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(StateFile::load(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
