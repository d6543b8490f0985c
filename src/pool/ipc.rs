//! The parent ↔ child protocol of the prefork pool: length-prefixed JSON
//! frames over the child's stdin (parent → child) and a private copy of its
//! stdout (child → parent). Four bytes of big-endian length, then the JSON.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tasks::TaskError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest frame accepted; a task result bigger than this is a bug.
pub const MAX_FRAME: usize = 256 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: u32,
}

/// Parent → child. The soft time limit is not a frame but SIGUSR1 (see
/// `child`), so the child needs no thread reading its pipe while a job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToChild {
    Run(JobSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromChild {
    /// Initialisation done; `registry_inits` proves it happened once.
    Ready {
        pid: u32,
    },
    Progress(Value),
    Done(Result<Value, TaskError>),
    Panicked(String),
}

fn too_big(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("frame of {len} bytes exceeds the limit"),
    )
}

/// Length prefix and body in one buffer, so a frame goes out in a single
/// `write` where the pipe takes it whole: two writes cost the child a
/// system call per task and could wake the parent twice.
fn encode_frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 4];
    serde_json::to_writer(&mut frame, msg)?;
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(too_big(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    w.write_all(&encode_frame(msg)?)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(too_big(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(serde_json::from_slice(&body)?))
}

pub async fn write_frame_async<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
) -> io::Result<()> {
    w.write_all(&encode_frame(msg)?).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` at end of stream (the child is gone).
/// Not cancel-safe: callers keep the future alive (see `prefork`).
pub async fn read_frame_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(too_big(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let msg = FromChild::Done(Err(TaskError::runtime("boom")));
        write_frame(&mut buf, &msg).unwrap();
        write_frame(&mut buf, &FromChild::Progress(json!({"page": 1}))).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<FromChild>(&mut r).unwrap(), Some(msg));
        assert_eq!(
            read_frame::<FromChild>(&mut r).unwrap(),
            Some(FromChild::Progress(json!({"page": 1})))
        );
        assert_eq!(read_frame::<FromChild>(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        let buf = (u32::MAX).to_be_bytes();
        assert!(read_frame::<FromChild>(&mut &buf[..]).is_err());
    }
}
