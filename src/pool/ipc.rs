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

/// The parent's view of a [`JobSpec`]: serialized exactly like
/// `ToChild::Run(JobSpec)`, but borrowing the job's arguments, so a large
/// argument is not copied once more on its way into the frame.
#[derive(Debug, Serialize)]
pub enum ToChildRef<'a> {
    Run {
        id: &'a str,
        name: &'a str,
        args: &'a [Value],
        kwargs: &'a Map<String, Value>,
        retries: u32,
    },
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
    /// The child could not read the job frame it was sent; the parent
    /// fails the job with this reason and replaces the child.
    Unreadable(String),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The pipe failed (the other side is gone or the read was cut).
    #[error("pipe: {0}")]
    Io(#[from] io::Error),
    /// The length prefix names more than [`MAX_FRAME`]; the stream is no
    /// longer in step (the body was not read).
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooBig(usize),
    /// The frame was read whole but is not a message of this protocol (too
    /// deeply nested, not JSON, wrong shape). The stream is still in step.
    #[error("unreadable frame of {len} bytes: {source}")]
    Unreadable {
        len: usize,
        source: serde_json::Error,
    },
}

fn too_big(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
    )
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|source| FrameError::Unreadable {
        len: body.len(),
        source,
    })
}

/// Length prefix and body in one buffer, so a frame goes out in a single
/// `write` where the pipe takes it whole: two writes cost the child a
/// system call per task and could wake the parent twice. Fails (nothing
/// written) when the message is larger than [`MAX_FRAME`].
pub fn encode_frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
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
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<Option<T>, FrameError> {
    Ok(read_frame_sized(r)?.map(|(msg, _)| msg))
}

/// [`read_frame`], also saying how many bytes the frame's body had.
pub fn read_frame_sized<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<Option<(T, usize)>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooBig(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    parse_body(&body).map(|msg| Some((msg, len)))
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
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooBig(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    parse_body(&body).map(Some)
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
        assert!(matches!(
            read_frame::<FromChild>(&mut &buf[..]),
            Err(FrameError::TooBig(_))
        ));
    }

    /// A frame that is read whole but cannot be parsed says so, and the
    /// next frame is still read: the stream stays in step.
    #[test]
    fn an_unreadable_frame_leaves_the_stream_in_step() {
        let deep = crate::protocol::limits::nested_list(200, json!(1));
        let mut buf = Vec::new();
        write_frame(&mut buf, &json!({"Done": {"Ok": deep}})).unwrap();
        write_frame(&mut buf, &FromChild::Panicked("next".into())).unwrap();
        let mut r = &buf[..];
        assert!(matches!(
            read_frame::<FromChild>(&mut r),
            Err(FrameError::Unreadable { .. })
        ));
        assert_eq!(
            read_frame::<FromChild>(&mut r).unwrap(),
            Some(FromChild::Panicked("next".into()))
        );
    }

    /// Every value within the depth policy crosses the pipe both ways.
    #[test]
    fn values_at_the_depth_limit_cross_the_pipe() {
        use crate::protocol::limits::{nested_list, MAX_DEPTH};
        let v = nested_list(MAX_DEPTH, json!("leaf"));
        let mut kwargs = Map::new();
        kwargs.insert("k".into(), v.clone());
        let job = ToChild::Run(JobSpec {
            id: "i".into(),
            name: "n".into(),
            args: vec![v.clone()],
            kwargs,
            retries: 0,
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &job).unwrap();
        write_frame(&mut buf, &FromChild::Done(Ok(v.clone()))).unwrap();
        write_frame(&mut buf, &FromChild::Progress(v)).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<ToChild>(&mut r).unwrap(), Some(job.clone()));
        let ToChild::Run(spec) = &job;
        let borrowed = encode_frame(&ToChildRef::Run {
            id: &spec.id,
            name: &spec.name,
            args: &spec.args,
            kwargs: &spec.kwargs,
            retries: spec.retries,
        })
        .unwrap();
        assert_eq!(
            read_frame::<ToChild>(&mut &borrowed[..]).unwrap(),
            Some(job)
        );
        assert!(matches!(
            read_frame::<FromChild>(&mut r),
            Ok(Some(FromChild::Done(Ok(_))))
        ));
        assert!(matches!(
            read_frame::<FromChild>(&mut r),
            Ok(Some(FromChild::Progress(_)))
        ));
    }
}
