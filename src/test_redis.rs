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

pub(crate) fn start_redis() -> Server {
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
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Server { child, port }
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
