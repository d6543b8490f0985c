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
        if let Some(server) = try_start_redis() {
            return server;
        }
    }
    panic!("could not start a private redis-server on a free port in 20 tries");
}

fn try_start_redis() -> Option<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/bootstrap)");
    let mut server = Server { child, port };
    for _ in 0..200 {
        if let Ok(Some(_)) = server.child.try_wait() {
            return None; // it could not bind: the port was taken meanwhile
        }
        if let Some(pid) = answering_pid(port) {
            return (pid == server.child.id()).then_some(server);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = server.child.kill();
    None
}

/// The `process_id` of the redis-server answering on `port`, if one does.
fn answering_pid(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(rest) = text.split("process_id:").nth(1) {
            if let Some(line) = rest.split("\r\n").next().filter(|_| rest.contains("\r\n")) {
                return line.trim().parse().ok();
            }
        }
    }
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
