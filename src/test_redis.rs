//! A private redis-server per unit test, on a free port, so runs never
//! collide and nothing depends on the machine's own Redis.

use std::time::Duration;

use crate::redis_link::RedisLink;

/// A private redis-server on a free port, stopped on drop.
pub(crate) struct Server {
    pub(crate) child: std::process::Child,
    pub(crate) port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tries new ports until a server of its own answers. A free port is only
/// free when picked: a test running in parallel may pick the same one, and
/// then one redis-server fails to bind while its test's readiness check
/// reaches the other's server, which vanishes when that test ends. So the
/// server that answers must be the child started here (INFO's
/// `process_id`), not just any server on the port.
pub(crate) fn start_redis() -> Server {
    for _ in 0..20 {
        if let Some(server) = try_start_redis(free_port()) {
            return server;
        }
    }
    panic!("could not start a private redis-server on a free port in 20 tries");
}

/// A server of its own on `port`, or `None` if another process holds it.
fn try_start_redis(port: u16) -> Option<Server> {
    let mut server = spawn_redis(port);
    for _ in 0..200 {
        if let Ok(Some(_)) = server.child.try_wait() {
            return None; // it could not bind: the port was taken meanwhile
        }
        if let Some(pid) = answering_pid(server.port) {
            return (pid == server.child.id()).then_some(server);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A port free at the moment (see [`start_redis`] for why only then).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a redis-server on `port` without waiting for it to listen.
pub(crate) fn spawn_redis(port: u16) -> Server {
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/bootstrap)");
    Server { child, port }
}

/// The `process_id` of the redis-server answering on `port`, if one does.
fn answering_pid(port: u16) -> Option<u32> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()?;
    let info: redis::InfoDict = redis::cmd("INFO").arg("server").query(&mut conn).ok()?;
    info.get("process_id")
}

/// A private server and a link to it (the server stops when dropped).
pub(crate) fn redis_and_link() -> (Server, RedisLink) {
    let server = start_redis();
    let url = format!("redis://127.0.0.1:{}/0", server.port);
    let link = RedisLink::open(&url, "test", Duration::from_secs(5)).unwrap();
    (server, link)
}

/// How many times Redis ran `command` (INFO commandstats), 0 if never.
pub(crate) async fn command_calls(link: &RedisLink, command: &str) -> u64 {
    let mut conn = link.conn().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_server_holds_is_not_taken_for_ours() {
        let theirs = start_redis();
        assert!(try_start_redis(theirs.port).is_none());
        assert_eq!(answering_pid(theirs.port), Some(theirs.child.id()));
    }
}
